//! What an embedding program sees of the library by default.

use distq::log::{enabled, Level};
use distq::{AuthKey, Server, ServerConfig};

/// An embedded server writes nothing to stderr until its caller sets a level: the
/// library does not decide where a host program's log lines go.
#[test]
fn the_library_is_silent_until_a_level_is_set() {
    let server = Server::bind("127.0.0.1:0", ServerConfig::new(AuthKey::new("k")))
        .unwrap()
        .spawn()
        .unwrap();
    // A wrong key would be a warning line, if anything were written.
    assert!(distq::Manager::connect(server.local_addr(), AuthKey::new("wrong")).is_err());
    assert!(!enabled(Level::Error), "logging is on by default");
    distq::log::set_level(Level::Warn);
    assert!(enabled(Level::Warn) && !enabled(Level::Info));
    server.shutdown().unwrap();
}

/// The library's errors say what happened in its own terms; flags are the binaries'
/// to add (distq-server adds "pick another with --bind" to this one).
#[test]
fn library_errors_name_no_flags() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Server::bind(addr, ServerConfig::new(AuthKey::new("k")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use") && !err.contains("--"), "{err}");
    let err = distq::journal::Fsync::parse("sometimes").unwrap_err();
    assert!(
        err.contains("always, never or every=MS") && !err.contains("--"),
        "{err}"
    );
}
