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
        Err(
            "no authkey given: pass --authkey KEY, --authkey-file PATH, or set DISTQ_AUTHKEY \
             (the classic Python scripts use abc)"
                .into(),
        )
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
