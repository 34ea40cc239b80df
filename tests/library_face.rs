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
