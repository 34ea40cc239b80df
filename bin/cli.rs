//! What the binaries share: where the authkey comes from, `--help`/`--version`, the
//! exit codes, the warning about a key on the command line, and turning errors into one
//! clear line on stderr.
//!
//! It exits the process and parses flags, which no library caller wants, so it lives
//! with the binaries: each includes this file as its `cli` module (`distq-master`
//! through the worker it compiles in). What only the master needs, the progress line,
//! is its own module (bin/master/progress.rs); the few items here that some binaries
//! leave unused say which use them, each under its own `allow(dead_code)`.

use std::ffi::OsString;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use distq::log::{self, Level};
use distq::{AuthKey, Error};

/// The exit statuses of every binary, so scripts can tell failures apart without
/// parsing messages. Documented in the README ("Exit codes").
// One table for all, as the README has it: `distq-master` uses every code; distq-server,
// distq-worker and distq-stat a part (only the master has `MISSING` and `TASKS_FAILED`).
#[allow(dead_code)]
pub mod exit {
    /// Everything worked (for `distq-master`: every task has a successful result).
    pub const OK: i32 = 0;
    /// Any other failure (e.g. the port to listen on is taken, an unreadable input file).
    pub const FAILURE: i32 = 1;
    /// Bad usage: an unknown flag, a malformed value, no authkey.
    pub const USAGE: i32 = 2;
    /// The server refused our authkey (or we refused its).
    pub const AUTH: i32 = 3;
    /// The server could not be reached, or the connection was lost and not regained.
    pub const CONNECTION: i32 = 4;
    /// `distq-master`: some tasks have no result (deadline, result timeout, workers gone).
    pub const MISSING: i32 = 5;
    /// `distq-master`: every task has a result, but some of them are failures.
    pub const TASKS_FAILED: i32 = 6;
}

/// A failure to start a server, as the binaries say it: the library's message, which
/// names what went wrong, and the flag that changes it (the library knows its config
/// fields, not the flags that set them).
#[allow(dead_code)] // distq-server and distq-master, which host servers
pub fn with_flag_hint(e: &Error) -> String {
    match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
            format!("{e}; pick another with --bind")
        }
        Error::Journal(_) => {
            format!("{e}: start distq-server with --journal-repair to make it")
        }
        _ => e.to_string(),
    }
}

/// The exit status for a client-side error: authentication and connection problems
/// get their own codes, anything else is [`exit::FAILURE`].
// For the clients: distq-worker, distq-stat and distq-master, not distq-server.
#[allow(dead_code)]
pub fn status_for(e: &Error) -> i32 {
    match e {
        Error::AuthFailed(_) => exit::AUTH,
        Error::Io { .. } | Error::Closed | Error::Timeout(_) => exit::CONNECTION,
        _ => exit::FAILURE,
    }
}

/// The flags every binary accepts besides its own.
#[derive(Debug, Default)]
pub struct CommonFlags {
    /// `--authkey KEY`: on the command line, hence visible to every user in `ps`.
    authkey: Option<OsString>,
    authkey_file: Option<PathBuf>,
    verbosity: i8,
}

/// A command-line argument, owned, so that matching on it does not borrow the parser.
#[derive(Debug)]
pub enum Flag {
    /// `--name` (stored without the dashes).
    Long(String),
    /// `-c`.
    Short(char),
    /// A positional argument.
    Value(OsString),
}

impl Flag {
    /// The flag as typed (`--bind`, `-v`), or `""` for a positional argument.
    pub fn name(&self) -> String {
        match self {
            Flag::Long(l) => format!("--{l}"),
            Flag::Short(c) => format!("-{c}"),
            Flag::Value(_) => String::new(),
        }
    }

    /// The error for a flag the binary does not know.
    pub fn unexpected(self) -> lexopt::Error {
        match self {
            Flag::Value(v) => lexopt::Error::UnexpectedArgument(v),
            other => lexopt::Error::UnexpectedOption(other.name()),
        }
    }
}

/// The next argument, owned.
pub fn next(parser: &mut lexopt::Parser) -> Result<Option<Flag>, lexopt::Error> {
    Ok(parser.next()?.map(|arg| match arg {
        lexopt::Arg::Long(l) => Flag::Long(l.to_string()),
        lexopt::Arg::Short(c) => Flag::Short(c),
        lexopt::Arg::Value(v) => Flag::Value(v),
    }))
}

impl CommonFlags {
    /// Consumes `--authkey`, `--authkey-file`, `-v` and `-q` (returning `true`);
    /// `--help`/`--version` print and exit. Anything else is left to the binary.
    pub fn take(
        &mut self,
        flag: &Flag,
        parser: &mut lexopt::Parser,
        help: &str,
    ) -> Result<bool, lexopt::Error> {
        match flag.name().as_str() {
            "--authkey" => self.authkey = Some(parser.value()?),
            "--authkey-file" => self.authkey_file = Some(parser.value()?.into()),
            "-v" | "--verbose" => self.verbosity = self.verbosity.saturating_add(1),
            "-q" | "--quiet" => self.verbosity = self.verbosity.saturating_sub(1),
            "-h" | "--help" => {
                print!("{help}");
                std::process::exit(0);
            }
            "-V" | "--version" => {
                println!("distq {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `-v` count minus `-q` count: 0 by default, negative when asked to be quiet.
    // Read by distq-worker and distq-master; the others only log (`init_logging`).
    #[allow(dead_code)]
    pub fn verbosity(&self) -> i8 {
        self.verbosity
    }

    /// Warns (once, on stderr) when the key came from `--authkey` and `addr` is not a
    /// loopback address: anyone on this machine can read it with `ps`, and a server
    /// reachable from the network makes that key worth stealing. Loopback-only setups
    /// (tests, a classroom laptop) stay quiet.
    pub fn warn_if_key_exposed(&self, addr: &str) {
        // A Unix socket is not reachable from the network at all.
        if self.authkey.is_none() || distq::net::is_unix_path(addr) {
            return;
        }
        let exposed = match addr.to_socket_addrs() {
            Ok(mut addrs) => addrs.any(|a| !a.ip().is_loopback()),
            Err(_) => true,
        };
        if exposed {
            log::write(
                Level::Warn,
                format_args!(
                    "--authkey is visible to every user of this machine (ps); \
                     with {addr} reachable from the network, prefer --authkey-file PATH \
                     or the DISTQ_AUTHKEY environment variable"
                ),
            );
        }
    }

    /// Applies `-v`/`-q` to the library's logger.
    pub fn init_logging(&self) {
        log::set_level(match self.verbosity {
            i8::MIN..=-2 => Level::Error,
            -1 => Level::Warn,
            0 => Level::Info,
            _ => Level::Debug,
        });
    }

    /// The authkey from `--authkey`, else `--authkey-file`, else `DISTQ_AUTHKEY`.
    ///
    /// # Errors
    /// A message saying how to provide one, if none was given or the file is unreadable.
    ///
    /// An empty key is refused: it authenticates anyone, and Python workers unpickle
    /// whatever such a server sends them.
    pub fn authkey(&self) -> Result<AuthKey, String> {
        let key = self.authkey_bytes()?;
        if key.as_bytes().is_empty() {
            return Err(
                "the authkey is empty: anyone could connect (and Python peers unpickle \
                        what they receive); give a non-empty key"
                    .into(),
            );
        }
        Ok(key)
    }

    fn authkey_bytes(&self) -> Result<AuthKey, String> {
        use std::os::unix::ffi::OsStringExt;
        if let Some(key) = &self.authkey {
            return Ok(AuthKey::new(key.clone().into_vec()));
        }
        if let Some(path) = &self.authkey_file {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read the authkey file {}: {e}", path.display()))?;
            return Ok(AuthKey::new(key_from_file(bytes)));
        }
        if let Some(key) = std::env::var_os("DISTQ_AUTHKEY") {
            return Ok(AuthKey::new(key.into_vec()));
        }
        Err(
            "no authkey given: pass --authkey KEY, --authkey-file PATH, or set DISTQ_AUTHKEY \
             (the classic Python scripts use abc)"
                .into(),
        )
    }
}

/// Parses `HOST:PORT`, or a Unix socket path (`/...`, `./...`, or `\0name` for a Linux
/// abstract name), for `flag`: a malformed address is bad usage (exit 2), caught before
/// anything starts; whether the host resolves is found out when it is used. Read the
/// result with [`distq::net::Address::parse`].
pub fn address(flag: &str, value: OsString) -> Result<String, lexopt::Error> {
    let text = value.to_string_lossy().into_owned();
    if distq::net::is_unix_path(&text) {
        return match value.into_string() {
            Ok(path) => Ok(path),
            Err(_) => Err(format!("{flag}: the socket path {text:?} is not UTF-8").into()),
        };
    }
    let well_formed = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if well_formed {
        Ok(text)
    } else {
        Err(format!(
            "{flag} needs HOST:PORT (e.g. 127.0.0.1:5000) or a socket path (e.g. /tmp/q.sock), \
             not {text:?}"
        )
        .into())
    }
}

/// Parses a count for `flag` (`--tasks 10`), naming the flag when the value is not one.
// Used by distq-server, distq-worker and distq-master, not distq-stat.
#[allow(dead_code)]
pub fn count<T: std::str::FromStr>(flag: &str, value: OsString) -> Result<T, lexopt::Error> {
    let text = value.to_string_lossy().into_owned();
    text.parse()
        .map_err(|_| format!("{flag} needs a whole number >= 0, not {text:?}").into())
}

/// Parses a duration in seconds, e.g. `1`, `0.5`.
pub fn seconds(value: OsString) -> Result<Duration, lexopt::Error> {
    let text = value.to_string_lossy().into_owned();
    text.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{text:?} is not a number of seconds").into())
}

/// Prints `error: msg` and exits with `status` (one of [`exit`]).
pub fn fail(msg: impl std::fmt::Display, status: i32) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(status)
}

/// `850ms`, `42s`, `3m05s`, `2h07m`: short enough for a status line.
// For distq-stat (the uptime) and distq-master (the progress line's ETA).
#[allow(dead_code)]
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// The key in an authkey file: its bytes without one final `\n` (what `echo` and editors
/// add). Exactly one, and nothing else: a random binary key that ends in `\n` or `\r`
/// survives when written with one newline after it, and Python peers read the same key
/// with `key = open(path, 'rb').read(); key = key[:-1] if key.endswith(b'\n') else key`.
fn key_from_file(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    bytes
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_authkey_file_loses_exactly_one_final_newline() {
        assert_eq!(key_from_file(b"abc\n".to_vec()), b"abc");
        assert_eq!(key_from_file(b"abc".to_vec()), b"abc");
        assert_eq!(key_from_file(b"k\r\n".to_vec()), b"k\r");
        assert_eq!(key_from_file(b"k\n\n".to_vec()), b"k\n");
        assert_eq!(key_from_file(b"\r".to_vec()), b"\r");
    }

    use super::*;

    #[test]
    fn durations_are_short() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(7620)), "2h07m");
    }

    #[test]
    fn errors_map_to_distinct_exit_codes() {
        assert_eq!(status_for(&Error::AuthFailed("x".into())), exit::AUTH);
        assert_eq!(status_for(&Error::Closed), exit::CONNECTION);
        assert_eq!(status_for(&Error::Timeout("t")), exit::CONNECTION);
        assert_eq!(status_for(&Error::Protocol("p".into())), exit::FAILURE);
    }
}
