//! What the three binaries share: where the authkey comes from, `--help`/`--version`,
//! and turning errors into one clear line on stderr.
//!
//! Kept in the library so each binary stays a flag parser plus a few library calls.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::AuthKey;
use crate::log::{self, Level};

/// The flags every binary accepts besides its own.
#[derive(Debug, Default)]
pub struct CommonFlags {
    authkey: Option<OsString>,
    authkey_file: Option<PathBuf>,
    verbosity: i8,
}

/// What [`CommonFlags::parse`] did with an argument.
pub enum Parsed {
    /// The argument was a common flag and has been consumed.
    Consumed,
    /// Not a common flag: the binary handles it.
    NotMine(lexopt::Arg<'static>),
}

impl CommonFlags {
    /// Consumes `--authkey`, `--authkey-file`, `-v` and `-q`; `--help`/`--version` print
    /// and exit. Anything else is handed back.
    pub fn parse(
        &mut self,
        arg: lexopt::Arg<'_>,
        parser: &mut lexopt::Parser,
        help: &str,
    ) -> Result<Parsed, lexopt::Error> {
        use lexopt::Arg::{Long, Short};
        match arg {
            Long("authkey") => self.authkey = Some(parser.value()?),
            Long("authkey-file") => self.authkey_file = Some(parser.value()?.into()),
            Short('v') | Long("verbose") => self.verbosity += 1,
            Short('q') | Long("quiet") => self.verbosity -= 1,
            Short('h') | Long("help") => {
                print!("{help}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("distq {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            Short(c) => return Ok(Parsed::NotMine(Short(c))),
            Long(l) => return Ok(Parsed::NotMine(Long(leak(l)))),
            lexopt::Arg::Value(v) => return Ok(Parsed::NotMine(lexopt::Arg::Value(v))),
        }
        Ok(Parsed::Consumed)
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
    pub fn authkey(&self) -> Result<AuthKey, String> {
        use std::os::unix::ffi::OsStringExt;
        if let Some(key) = &self.authkey {
            return Ok(AuthKey::new(key.clone().into_vec()));
        }
        if let Some(path) = &self.authkey_file {
            let mut bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read the authkey file {}: {e}", path.display()))?;
            // Files written by `echo` end in a newline that is not part of the key.
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            return Ok(AuthKey::new(bytes));
        }
        if let Some(key) = std::env::var_os("DISTQ_AUTHKEY") {
            return Ok(AuthKey::new(key.into_vec()));
        }
        Err("no authkey given: pass --authkey KEY, --authkey-file PATH, or set DISTQ_AUTHKEY \
             (the classic Python scripts use abc)"
            .into())
    }
}

/// lexopt lends long flag names from the parser; the few that reach the binaries' own
/// match statements are copied to `'static` so the borrow does not outlive parsing.
fn leak(s: &str) -> &'static str {
    match s {
        // Known flags map to literals: no allocation for well-formed command lines.
        _ => Box::leak(s.to_string().into_boxed_str()),
    }
}

/// Parses a duration in seconds, e.g. `1`, `0.5`.
pub fn seconds(value: OsString) -> Result<Duration, lexopt::Error> {
    let text = value.to_string_lossy().into_owned();
    text.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{text:?} is not a number of seconds").into())
}

/// Prints `error: msg` and exits with status 2 (bad usage) or 1 (failure).
pub fn fail(msg: impl std::fmt::Display, status: i32) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(status)
}
