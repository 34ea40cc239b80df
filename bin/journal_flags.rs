//! `--journal DIR` and `--fsync POLICY`, parsed one way for `distq-server` and
//! `distq-master` (the server adds `--journal-repair` and `--compact-min`). Each binary
//! words its own refusal of a tuning flag without `--journal DIR`.

use std::path::PathBuf;

use distq::journal::{Fsync, JournalConfig};
use lexopt::ValueExt;

/// The journal flags as given; [`JournalFlags::config`] turns them into a journal.
#[derive(Default)]
pub(crate) struct JournalFlags {
    pub(crate) dir: Option<PathBuf>,
    pub(crate) fsync: Option<Fsync>,
    /// `--journal-repair` (the server only).
    pub(crate) repair: bool,
    /// `--compact-min BYTES` (the server only).
    pub(crate) compact_min: Option<u64>,
}

impl JournalFlags {
    /// Takes `--journal DIR` or `--fsync POLICY` (a repeated flag: the last one counts).
    /// Returns whether `name` was one of them.
    pub(crate) fn take(
        &mut self,
        name: &str,
        parser: &mut lexopt::Parser,
    ) -> Result<bool, lexopt::Error> {
        match name {
            "--journal" => self.dir = Some(parser.value()?.into()),
            "--fsync" => {
                let policy = parser.value()?.string()?;
                self.fsync = Some(Fsync::parse(&policy).map_err(|e| format!("--fsync {e}"))?);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether any journal flag was given.
    pub(crate) fn given(&self) -> bool {
        self.dir.is_some() || self.fsync.is_some() || self.repair || self.compact_min.is_some()
    }

    /// Whether a flag that tunes the journal was given without `--journal DIR`.
    pub(crate) fn lack_dir(&self) -> bool {
        self.dir.is_none() && self.given()
    }

    /// The journal the flags ask for; `None` without `--journal DIR`.
    pub(crate) fn config(self) -> Option<JournalConfig> {
        let mut config = JournalConfig::new(self.dir?);
        config.fsync = self.fsync.unwrap_or(config.fsync);
        config.repair = self.repair;
        config.compact_min_bytes = self.compact_min.unwrap_or(config.compact_min_bytes);
        Some(config)
    }
}
