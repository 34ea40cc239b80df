//! A tiny stderr logger: a UTC timestamp, a level, the message.
//!
//! distq logs few lines (connections, authentication failures, protocol faults), so a
//! logging framework would cost more binary size than it saves. The level is global and
//! set once by a binary (`-v` / `-q`); until someone sets it, the library writes nothing,
//! so an embedded [`Server`](crate::Server) is silent unless its caller asks for lines. Nothing secret is ever passed in: [`AuthKey`]
//! has no `Display` and a redacting `Debug`.
//!
//! [`AuthKey`]: crate::auth::AuthKey

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How much the library writes to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Only errors.
    Error = 0,
    /// Errors and warnings (authentication failures, protocol faults).
    Warn = 1,
    /// Also connections opening and closing (the binaries' default).
    Info = 2,
    /// Also every request.
    Debug = 3,
}

/// One more than the highest level written; 0 (the start) writes nothing.
static LEVEL: AtomicU8 = AtomicU8::new(0);

// The crate's own unit tests capture from the start.
static TO_TEST_CAPTURE: AtomicBool = AtomicBool::new(cfg!(test));

/// Sends log lines through `eprint!`, which a test harness captures: `cargo test` then
/// shows a server's log only for a test that fails. For tests only: unlike the default
/// writer, `eprint!` panics if stderr is closed.
#[doc(hidden)]
pub fn to_test_capture() {
    TO_TEST_CAPTURE.store(true, Ordering::Relaxed);
}

/// Sets the process-wide log level: lines at `level` and above go to stderr.
pub fn set_level(level: Level) {
    LEVEL.store(level as u8 + 1, Ordering::Relaxed);
}

/// Whether messages at `level` are written.
pub fn enabled(level: Level) -> bool {
    (level as u8) < LEVEL.load(Ordering::Relaxed)
}

/// Writes one line if `level` is enabled. Use through the `log!` macros' callers in the
/// crate, or directly from binaries.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let tag = match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN ",
        Level::Info => "INFO ",
        Level::Debug => "DEBUG",
    };
    // The line is rendered first and written with one `write` call, so lines of
    // processes sharing a terminal never interleave mid-line.
    let line = format!("{} {tag} {args}\n", Timestamp::now());
    if TO_TEST_CAPTURE.load(Ordering::Relaxed) {
        eprint!("{line}");
    } else {
        // A closed stderr is no reason to stop serving: the error is dropped (where
        // `eprint!` would panic).
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// A UTC wall-clock time rendered as RFC 3339 with milliseconds.
struct Timestamp(u64, u32);

impl Timestamp {
    fn now() -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(d.as_secs(), d.subsec_millis())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = (self.0 / 86_400) as i64;
        let secs = self.0 % 86_400;
        // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            self.1
        )
    }
}

macro_rules! log_at {
    // The level is checked before the arguments are evaluated: a line below the level
    // costs one atomic load, never a rendering of a client's value.
    ($level:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$level) {
            $crate::log::write($crate::log::Level::$level, format_args!($($arg)*))
        }
    };
}
pub(crate) use log_at;

#[cfg(test)]
mod tests {
    use super::Timestamp;

    #[test]
    fn timestamps_are_civil_dates() {
        assert_eq!(Timestamp(0, 0).to_string(), "1970-01-01T00:00:00.000Z");
        // 2026-11-29T12:54:16Z
        assert_eq!(
            Timestamp(1_795_956_856, 7).to_string(),
            "2026-11-29T12:54:16.007Z"
        );
        assert_eq!(
            Timestamp(951_782_400, 0).to_string(),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
