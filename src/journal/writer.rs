//! Getting records into the file: group commit, retries, and the file trait tests inject
//! faults through. Apart from replay and compaction because this is the part that runs
//! on every `put`, with its own locking rules.
//!
//! # Writing without holding queue locks across I/O
//! Queues emit their events while they hold their own lock and the journal encodes them
//! into an in-memory buffer (a memcpy), so the journal's record order always matches
//! each queue's order of events.
//! The bytes reach the file later, outside every queue lock: a `put` waits, after
//! releasing its queue, until its record has been written (and, with `--fsync always`,
//! synced) before its `#RETURN` goes out. Whoever waits first becomes the writer and
//! takes everything buffered so far, so concurrent puts share one `write` and one fsync
//! (group commit). Other records (gets, acks) are written by the next commit or by the
//! background flusher within one flush interval; what losing one in a crash means is in
//! `queues/event.rs`.
//!
//! # When a write fails
//! Memory has already applied every buffered record, so none is ever dropped: a failed
//! (or short, or unsynced) batch is cut back off the file and put back in front of the
//! buffer, and the next writer retries it, so the file always holds a prefix of the
//! queues' history. `written` only moves past a record once its bytes are in the file:
//! a put is acknowledged only then, by construction. A put whose batch failed is taken
//! back out of memory by its queue (see `Queue::withdraw`) and answered "not stored".
//! While writes keep failing, new puts are refused up front once the retry backlog
//! passes [`MAX_BACKLOG`] (16 MiB). The file goes through [`JournalFile`], so tests
//! inject failing writes, short writes and failing syncs.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use super::{poisoned, Journal, JournalConfig};
use crate::log::log_at;
use crate::{Error, Result};

/// Records kept for a retry while writes fail, past which new puts are refused up front.
pub(super) const MAX_BACKLOG: usize = 16 << 20;

/// The journal file as the group-commit writer uses it: positioned writes, a sync and a
/// truncation. Behind a trait so tests can make the Nth write fail, write short, or fail
/// its sync, and check that nothing acknowledged is lost and nothing refused comes back.
pub trait JournalFile: Send + std::fmt::Debug {
    /// Writes some of `data` at `offset` and returns how many bytes (like `pwrite`).
    ///
    /// # Errors
    /// The operating system's error (disk full, I/O error).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<usize>;
    /// Makes everything written so far durable (`fdatasync`).
    ///
    /// # Errors
    /// The operating system's error.
    fn sync(&mut self) -> std::io::Result<()>;
    /// Cuts the file to `len` bytes (drops a failed batch's partial bytes).
    ///
    /// # Errors
    /// The operating system's error.
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
}

impl JournalFile for File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        self.seek(SeekFrom::Start(offset))?;
        self.write(data)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }
}

/// A function wrapping every file the journal writes to (see [`JournalFile`]).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct FileWrapper(pub Arc<dyn Fn(Box<dyn JournalFile>) -> Box<dyn JournalFile> + Send + Sync>);

impl std::fmt::Debug for FileWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileWrapper(..)")
    }
}

/// Records appended but not yet handed to a writer, and how far writing has got.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) buf: Vec<u8>,
    /// Sequence number of the last record appended.
    pub(super) appended: u64,
    /// Every record up to here has been written (or its write failed).
    written: u64,
    /// Every record up to here has been synced.
    synced: u64,
    /// A thread is writing a batch right now.
    writing: bool,
    /// Failed writes so far: a waiter that sees this change while its record is still
    /// unwritten was in a failed batch and gets an error.
    failures: u64,
    /// The last write error, while writes keep failing (`None` once one succeeds).
    pub(super) failing: Option<String>,
    /// Estimates for the compaction trigger.
    pub(super) live_items: i64,
    pub(super) put_bytes: u64,
    pub(super) puts: u64,
    pub(super) next_qnum: u32,
}

impl Pending {
    /// Nothing buffered yet, with the estimates and numbering replay recovered.
    pub(super) fn recovered(live_items: i64, next_qnum: u32) -> Pending {
        Pending {
            live_items,
            next_qnum,
            ..Pending::default()
        }
    }
}

#[derive(Debug)]
pub(super) struct FileState {
    pub(super) file: Box<dyn JournalFile>,
    /// Where the last successful write ended: the next batch is written here, over any
    /// bytes a failed write left behind.
    pub(super) len: u64,
}

pub(super) fn write_failed(last: Option<&str>) -> Error {
    Error::io(
        "writing the journal",
        std::io::Error::other(last.unwrap_or("write failed").to_string()),
    )
}

/// The journal file as the writer sees it: `file` through the configured wrapper.
pub(super) fn wrap(config: &JournalConfig, file: File) -> Box<dyn JournalFile> {
    match &config.wrap_file {
        Some(w) => (w.0)(Box::new(file)),
        None => Box::new(file),
    }
}

impl Journal {
    /// Waits until record `seq` is written (and synced if `sync`), writing the batch
    /// itself if no other thread is.
    pub(super) fn flush(&self, seq: u64, sync: bool) -> Result<()> {
        let mut p = self.lock_pending()?;
        let failures = p.failures;
        loop {
            if p.written >= seq && (!sync || p.synced >= seq) {
                return Ok(());
            }
            if p.failures != failures {
                return Err(write_failed(p.failing.as_deref()));
            }
            if p.writing {
                p = self.progress.wait(p).map_err(|_| poisoned())?;
                continue;
            }
            // Become the writer for everything buffered so far: one write (and one sync)
            // for every put waiting meanwhile.
            p.writing = true;
            let batch = std::mem::take(&mut p.buf);
            let last = p.appended;
            drop(p);
            let result = self.write_batch(&batch, sync);
            p = self.lock_pending()?;
            p.writing = false;
            match result {
                Ok(()) => {
                    p.written = last;
                    if sync {
                        p.synced = last;
                    }
                    p.failing = None;
                }
                Err(e) => {
                    // Memory has applied these records: never drop them. They go back in
                    // front of what was appended meanwhile and the next writer retries.
                    let mut retry = batch;
                    retry.append(&mut p.buf);
                    p.buf = retry;
                    p.failures += 1;
                    if p.failing.is_none() {
                        log_at!(
                            Error,
                            "journal write failed: {e}; puts get an error until a write succeeds (retried every flush)"
                        );
                    }
                    p.failing = Some(e.to_string());
                }
            }
            self.progress.notify_all();
        }
    }

    /// Writes a batch at the end of the file, whole or not at all: a failed write, short
    /// write or sync is cut back to where the batch began (and written over by the retry),
    /// so a record whose put got an error never survives in the file.
    fn write_batch(&self, batch: &[u8], sync: bool) -> std::io::Result<()> {
        let mut f = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("journal lock poisoned"))?;
        let start = f.len;
        let mut done = 0;
        let mut result = Ok(());
        while done < batch.len() {
            match f.file.write_at(start + done as u64, &batch[done..]) {
                Ok(0) => {
                    result = Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "the journal file accepted no bytes",
                    ));
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() && sync {
            result = f.file.sync();
        }
        match result {
            Ok(()) => {
                f.len = start + batch.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = f.file.set_len(start) {
                    log_at!(
                        Error,
                        "journal: cannot cut a failed write back ({cut}); the retry writes over it"
                    );
                }
                Err(e)
            }
        }
    }
}
