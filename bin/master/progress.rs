//! `distq-master`'s progress line on stderr: results so far, the rate and the time left.
//!
//! Only the master knows how many tasks there are, so this is its module, not part of
//! bin/cli.rs, which every binary includes.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::cli::human_duration;

/// A progress report on stderr for a known number of tasks.
///
/// On a terminal it is one line rewritten in place (`\r`, at most every 0.2 s) so it
/// never scrolls the results away; elsewhere (a log file, CI) it is a plain line every
/// `every`, because carriage returns make logs unreadable.
#[derive(Debug)]
pub struct Progress {
    total: usize,
    start: Instant,
    last: Option<Instant>,
    tty: bool,
    every: Duration,
    enabled: bool,
    /// Whether the in-place line is on the terminal now (drawn and not cleared).
    shown: bool,
}

impl Progress {
    /// A report for `total` tasks; `enabled: false` (for `-q`) makes every call a no-op.
    pub fn new(total: usize, every: Duration, enabled: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            total,
            start: Instant::now(),
            last: None,
            tty,
            every: if tty {
                Duration::from_millis(200)
            } else {
                every
            },
            enabled,
            shown: false,
        }
    }

    /// Reports `done` successes and `failed` failures if the last report is old enough.
    pub fn update(&mut self, done: usize, failed: usize) {
        let now = Instant::now();
        let recent = self.last.is_some_and(|t| now - t < self.every);
        if !self.enabled || (recent && (self.shown || !self.tty)) {
            return;
        }
        self.shown = self.tty;
        self.last = Some(now);
        let line = progress_line(done, failed, self.total, self.start.elapsed());
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            // \x1b[K clears what a longer previous line left behind.
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "progress: {line}")
        };
        let _ = err.flush();
    }

    /// Takes the in-place line off the terminal before something else is written there
    /// (results on a stdout that is the same terminal), so the two never share a line;
    /// the next [`Progress::update`] draws it again.
    pub fn clear(&mut self) {
        if std::mem::take(&mut self.shown) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }

    /// Ends the in-place line so that what follows starts on a fresh line.
    pub fn finish(&mut self) {
        if std::mem::take(&mut self.shown) {
            eprintln!();
        }
    }
}

/// `12/100 done, 1 failed, 3.4/s, ETA 26s`: results so far, the rate since the start,
/// and the time left at that rate (unknown until the first result).
fn progress_line(done: usize, failed: usize, total: usize, elapsed: Duration) -> String {
    let finished = done + failed;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        finished as f64 / secs
    } else {
        0.0
    };
    let eta = if finished == 0 || rate <= 0.0 {
        "ETA ?".to_string()
    } else {
        let left = total.saturating_sub(finished) as f64 / rate;
        format!("ETA {}", human_duration(Duration::from_secs_f64(left)))
    };
    format!("{finished}/{total} done, {failed} failed, {rate:.1}/s, {eta}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_rate_and_eta() {
        assert_eq!(
            progress_line(0, 0, 10, Duration::from_secs(1)),
            "0/10 done, 0 failed, 0.0/s, ETA ?"
        );
        assert_eq!(
            progress_line(4, 1, 10, Duration::from_secs(2)),
            "5/10 done, 1 failed, 2.5/s, ETA 2s"
        );
    }
}
