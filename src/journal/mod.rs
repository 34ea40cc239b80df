//! The journal: an append-only file of queue mutations, so a restart or a crash loses no
//! acknowledged `put`.
//!
//! This file is the journal's public face: [`Journal`], its [`JournalConfig`] and
//! [`Fsync`] policy, what [`Journal::open`] recovers, and the journal as the queues'
//! `EventSink`: the one place where a queue `Event` becomes a [`Record`]. The parts
//! live beside it:
//!
//! - `record.rs`: the record layout (a length, a CRC-32, a payload of LEB128 fields) and
//!   encoding and decoding one record.
//! - `writer.rs`: group commit. Queue events are buffered as records under the queue's
//!   own lock; a `put` waits, outside every queue lock, for its record to reach the file
//!   (and, with `--fsync always`, the disk). A failed batch is cut back off the file and
//!   retried, never dropped. The file goes through [`JournalFile`], so tests inject
//!   failures.
//! - `replay.rs`: rebuilding the queues from the file. A damaged final record is a torn
//!   write and is cut off; damage with valid records after it refuses to start unless
//!   `repair`.
//! - `compact.rs`: rewriting the file as a snapshot of its live state once it is four
//!   times larger (and past a minimum size).

mod compact;
mod record;
mod replay;
mod writer;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::log::log_at;
use crate::pickle::Fragment;
use crate::queues::{Event, EventSink};
use crate::{Error, Result};

use compact::write_snapshot;
pub use record::Record;
use record::MAX_ITEM;
use replay::replay;
use writer::{wrap, write_failed, FileState, Pending, MAX_BACKLOG};
pub use writer::{FileWrapper, JournalFile};

/// When the journal's writes are made durable with `fsync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Before a `put` is acknowledged (concurrent puts share one sync).
    Always,
    /// In the background, this often (the default is every 50 ms).
    Every(Duration),
    /// Never: the kernel writes back when it likes.
    Never,
}

impl Fsync {
    /// Parses `always`, `never` or `every=50ms` / `every=0.05` (seconds).
    ///
    /// # Errors
    /// A message naming the accepted forms.
    pub fn parse(text: &str) -> std::result::Result<Fsync, String> {
        let every = |v: &str| -> Option<Duration> {
            let (num, scale) = match v.strip_suffix("ms") {
                Some(n) => (n, 1e-3),
                None => (v.strip_suffix('s').unwrap_or(v), 1.0),
            };
            let secs = num.trim().parse::<f64>().ok()? * scale;
            Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
        };
        match text {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            t => t
                .strip_prefix("every=")
                .and_then(every)
                .map(Fsync::Every)
                .ok_or_else(|| {
                    format!("{t:?}: expected always, never or every=MS (e.g. every=50ms)")
                }),
        }
    }
}

/// Where and how to keep the journal.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The directory holding `distq.journal` (created if missing).
    pub dir: PathBuf,
    /// The sync policy.
    pub fsync: Fsync,
    /// Skip corrupt records in the middle of the file instead of refusing to start.
    pub repair: bool,
    /// Never compact below this file size.
    pub compact_min_bytes: u64,
    /// Wraps the file the writer appends to (tests inject failing writes and syncs).
    pub wrap_file: Option<FileWrapper>,
}

impl JournalConfig {
    /// `dir` with `every=50ms`, no repair, compaction from 64 MiB.
    pub fn new(dir: impl Into<PathBuf>) -> JournalConfig {
        JournalConfig {
            dir: dir.into(),
            fsync: Fsync::Every(Duration::from_millis(50)),
            repair: false,
            compact_min_bytes: 64 << 20,
            wrap_file: None,
        }
    }
}

const FILE_NAME: &str = "distq.journal";
const COMPACT_NAME: &str = "distq.journal.compact";

/// One item as recovered from the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The journal id.
    pub id: u64,
    /// Leased deliveries so far.
    pub deliveries: u32,
    /// The item.
    pub item: Fragment,
}

/// One queue's state after replay.
#[derive(Debug, Default)]
pub struct RecoveredQueue {
    /// The queue's name.
    pub name: String,
    /// Items waiting, head first.
    pub ready: Vec<Recovered>,
    /// Items that were out under a lease: they come back ready, at the head.
    pub reserved: Vec<Recovered>,
}

/// An open journal. Shared by every queue of a server.
#[derive(Debug)]
pub struct Journal {
    config: JournalConfig,
    pending: Mutex<Pending>,
    progress: Condvar,
    file: Mutex<FileState>,
    /// Queue names already declared, with their numbers.
    names: Mutex<HashMap<String, u32>>,
    next_id: AtomicU64,
    compacting: AtomicBool,
}

fn poisoned() -> Error {
    Error::Internal("the journal lock was poisoned by a panicking thread".into())
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

impl Journal {
    /// Opens (or creates) the journal in `config.dir` and replays it. Returns the journal
    /// and the queues it describes.
    ///
    /// # Errors
    /// I/O errors naming the path, and [`Error::Value`] for corruption in the middle of
    /// the file (unless `config.repair`).
    pub fn open(config: JournalConfig) -> Result<(Journal, Vec<RecoveredQueue>)> {
        fs::create_dir_all(&config.dir)
            .map_err(|e| io_err("creating the journal directory", &config.dir, e))?;
        let path = config.dir.join(FILE_NAME);
        // A compaction that crashed before its rename leaves a stale temporary file.
        let _ = fs::remove_file(config.dir.join(COMPACT_NAME));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("opening the journal", &path, e))?;
        let reading = |e| io_err("reading the journal", &path, e);
        let file_len = file.metadata().map_err(reading)?.len();
        let replay = replay(&file, file_len, config.repair).map_err(reading)??;
        let mut len = replay.valid_len;
        if replay.skipped > 0 {
            // Rewrite the file from what repair kept, so the damage is gone for good and a
            // later compaction (which replays strictly) never trips over it.
            let tmp = config.dir.join(COMPACT_NAME);
            let (_, snapshot_len) = write_snapshot(&replay.state, &tmp)?;
            fs::rename(&tmp, &path)
                .map_err(|e| io_err("renaming the repaired journal to", &path, e))?;
            if let Ok(dir) = File::open(&config.dir) {
                let _ = dir.sync_all();
            }
            log_at!(
                Warn,
                "journal {}: repair dropped {} damaged byte(s) and rewrote the file ({} bytes)",
                path.display(),
                replay.dropped,
                snapshot_len
            );
            file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_err("reopening the journal", &path, e))?;
            len = snapshot_len;
        } else if replay.valid_len < file_len {
            log_at!(
                Warn,
                "journal {}: dropped {} damaged byte(s) at the end (an interrupted write); recovered a prefix",
                path.display(),
                replay.dropped
            );
            file.set_len(replay.valid_len)
                .map_err(|e| io_err("truncating the journal", &path, e))?;
        }
        file.seek(SeekFrom::Start(len))
            .map_err(|e| io_err("seeking in the journal", &path, e))?;
        let live = replay.state.live_items();
        let recovered = replay.state.recovered();
        let next_qnum = replay.state.names.keys().max().map_or(0, |m| m + 1);
        // Recovered queues keep their numbers: `declare` finds them by name.
        let names = replay
            .state
            .names
            .iter()
            .map(|(q, n)| (n.clone(), *q))
            .collect();
        let journal = Journal {
            pending: Mutex::new(Pending::recovered(live as i64, next_qnum)),
            progress: Condvar::new(),
            file: Mutex::new(FileState {
                file: wrap(&config, file),
                len,
            }),
            names: Mutex::new(names),
            next_id: AtomicU64::new(replay.state.max_id + 1),
            compacting: AtomicBool::new(false),
            config,
        };
        Ok((journal, recovered))
    }

    fn lock_pending(&self) -> Result<MutexGuard<'_, Pending>> {
        self.pending.lock().map_err(|_| poisoned())
    }

    /// The number for queue `name`, declaring it if it is new.
    pub fn declare(&self, name: &str) -> Result<u32> {
        let mut known = self.names.lock().map_err(|_| poisoned())?;
        if let Some(q) = known.get(name) {
            return Ok(*q);
        }
        let mut p = self.lock_pending()?;
        let qnum = p.next_qnum;
        p.next_qnum += 1;
        Record::Declare { qnum, name }.encode(&mut p.buf);
        p.appended += 1;
        known.insert(name.to_string(), qnum);
        Ok(qnum)
    }

    /// A fresh item id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Buffers a record (no I/O) and returns its sequence number for [`Journal::commit`].
    /// Called with the queue's lock held, so records follow the queue's order of events.
    pub fn append(&self, record: &Record<'_>) -> u64 {
        let Ok(mut p) = self.pending.lock() else {
            return 0;
        };
        record.encode(&mut p.buf);
        match record {
            Record::Put {
                item, front: false, ..
            } => {
                p.live_items += 1;
                p.puts += 1;
                p.put_bytes += item.bytes().len() as u64 + 16;
            }
            Record::Take { .. } | Record::Ack { .. } => p.live_items -= 1,
            Record::Clear { count, .. } => p.live_items -= *count as i64,
            _ => {}
        }
        p.appended += 1;
        p.appended
    }

    /// Waits until record `seq` is written, and synced if the policy is `always`.
    ///
    /// # Errors
    /// [`Error::Io`] if the batch holding it could not be written (disk full...): the
    /// caller must not acknowledge what it journaled.
    pub fn commit(&self, seq: u64) -> Result<()> {
        let sync = self.config.fsync == Fsync::Always;
        self.flush(seq, sync)
    }

    /// Refuses new puts while writes keep failing and the records waiting for a retry
    /// exceed `MAX_BACKLOG` (16 MiB), so a full disk cannot grow the server's memory without bound.
    ///
    /// # Errors
    /// [`Error::Io`] naming the last write error.
    fn admit_bytes(&self, bytes: usize) -> Result<()> {
        let p = self.lock_pending()?;
        match &p.failing {
            Some(_) if p.buf.len().saturating_add(bytes) > MAX_BACKLOG => {
                Err(write_failed(p.failing.as_deref()))
            }
            _ => Ok(()),
        }
    }

    /// Refuses an item too large for one journal record (it would be acknowledged and
    /// then refused as corrupt at the next start).
    ///
    /// # Errors
    /// [`Error::Value`] naming the limit.
    fn check_item(&self, len: usize) -> Result<()> {
        if len > MAX_ITEM {
            return Err(Error::Value(format!(
                "an item of {len} bytes is larger than the journal's record limit of {MAX_ITEM} bytes; \
                 split it into smaller items"
            )));
        }
        Ok(())
    }

    /// Writes everything buffered and syncs per the policy, then compacts if due. Called
    /// by the server's flusher every [`Journal::flush_interval`], and at shutdown.
    pub fn tick(&self) -> Result<()> {
        let seq = self.lock_pending()?.appended;
        self.flush(seq, self.config.fsync != Fsync::Never)?;
        if self.compaction_due()? {
            self.compact()?;
        }
        Ok(())
    }

    /// How often [`Journal::tick`] should run.
    pub fn flush_interval(&self) -> Duration {
        match self.config.fsync {
            Fsync::Every(d) => d,
            _ => Duration::from_millis(50),
        }
    }

    /// Rewrites the journal as a snapshot of its live state (see `journal/compact.rs`).
    pub fn compact(&self) -> Result<()> {
        if self.compacting.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = self.compact_now();
        self.compacting.store(false, Ordering::SeqCst);
        result
    }

    /// The journal file's current length.
    pub fn len(&self) -> u64 {
        self.file.lock().map(|f| f.len).unwrap_or(0)
    }

    /// Whether the journal file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The queues' events as records. Record kinds are fewer than events: a withdrawn put
/// is journaled as a take and an unget as a put at the head, since replay rebuilds the
/// same queue from either.
impl EventSink for Journal {
    fn declare(&self, name: &str) -> Result<u32> {
        Journal::declare(self, name)
    }

    fn item_id(&self) -> u64 {
        self.next_id()
    }

    fn admit(&self, items: &[Fragment]) -> Result<()> {
        for item in items {
            self.check_item(item.bytes().len())?;
        }
        self.admit_bytes(items.iter().map(|i| i.bytes().len()).sum())
    }

    fn emit(&self, qnum: u32, event: &Event<'_>) -> u64 {
        let record = match event {
            Event::Put { id, item } => Record::Put {
                qnum,
                front: false,
                id: *id,
                deliveries: 0,
                item,
            },
            Event::Unget {
                id,
                deliveries,
                item,
            } => Record::Put {
                qnum,
                front: true,
                id: *id,
                deliveries: *deliveries,
                item,
            },
            Event::Take { id } | Event::Withdraw { id } => Record::Take { qnum, id: *id },
            Event::Reserve { id } => Record::Reserve { qnum, id: *id },
            Event::Ack { id } => Record::Ack { qnum, id: *id },
            Event::Requeue { id } => Record::Requeue { qnum, id: *id },
            Event::DeadLetter { id, to } => Record::DeadLetter {
                qnum,
                id: *id,
                // Only a poisoned lock fails this; replay then refuses the record as
                // naming an undeclared queue instead of moving the item somewhere wrong.
                to: Journal::declare(self, to).unwrap_or(u32::MAX),
            },
            Event::Clear { count } => Record::Clear {
                qnum,
                count: *count,
            },
        };
        self.append(&record)
    }

    fn commit(&self, ticket: u64) -> Result<()> {
        Journal::commit(self, ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::replay::tests::{frag, history};
    use super::*;
    use crate::Value;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("distq-journal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_repaired_journal_is_rewritten_so_compaction_works() {
        let dir = tmpdir("repair");
        fs::create_dir_all(&dir).unwrap();
        let (records, _) = history();
        let mut all: Vec<u8> = records.concat();
        all[records[0].len() + records[1].len() + 10] ^= 0xff;
        fs::write(dir.join(FILE_NAME), &all).unwrap();
        let mut cfg = JournalConfig::new(&dir);
        assert!(Journal::open(cfg.clone()).is_err());
        cfg.repair = true;
        let (j, _) = Journal::open(cfg.clone()).unwrap();
        j.compact().unwrap();
        drop(j);
        cfg.repair = false;
        let (_, recovered) = Journal::open(cfg).unwrap();
        let ids: Vec<u64> = recovered[0].ready.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![4, 3, 5]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_item_over_the_record_limit_is_refused() {
        let dir = tmpdir("big");
        let (j, _) = Journal::open(JournalConfig::new(&dir)).unwrap();
        assert!(j.check_item(MAX_ITEM).is_ok());
        let err = j.check_item(MAX_ITEM + 1).unwrap_err().to_string();
        assert!(err.contains("record limit"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn open_appends_replays_and_compacts() {
        let dir = tmpdir("open");
        let mut cfg = JournalConfig::new(&dir);
        cfg.compact_min_bytes = 0;
        {
            let (j, recovered) = Journal::open(cfg.clone()).unwrap();
            assert!(recovered.is_empty());
            let q = j.declare("jobs").unwrap();
            let mut last = 0;
            for i in 0..100u64 {
                let item = frag(i as i64);
                let id = j.next_id();
                last = j.append(&Record::Put {
                    qnum: q,
                    front: false,
                    id,
                    deliveries: 0,
                    item: &item,
                });
                if i < 90 {
                    j.append(&Record::Take { qnum: q, id });
                }
            }
            j.commit(last).unwrap();
            let before = j.len();
            j.tick().unwrap();
            assert!(j.len() < before / 4, "compacted {before} -> {}", j.len());
            // Appends after compaction land in the new file.
            let item = frag("after");
            let seq = j.append(&Record::Put {
                qnum: q,
                front: false,
                id: j.next_id(),
                deliveries: 0,
                item: &item,
            });
            j.commit(seq).unwrap();
        }
        let (_, recovered) = Journal::open(cfg).unwrap();
        assert_eq!(recovered.len(), 1);
        let got: Vec<Value> = recovered[0]
            .ready
            .iter()
            .map(|r| r.item.decode().unwrap())
            .collect();
        let mut want: Vec<Value> = (90..100).map(Value::from).collect();
        want.push(Value::from("after"));
        assert_eq!(got, want);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!(Fsync::parse("always"), Ok(Fsync::Always));
        assert_eq!(Fsync::parse("never"), Ok(Fsync::Never));
        assert_eq!(
            Fsync::parse("every=50ms"),
            Ok(Fsync::Every(Duration::from_millis(50)))
        );
        assert_eq!(
            Fsync::parse("every=0.5"),
            Ok(Fsync::Every(Duration::from_millis(500)))
        );
        assert!(Fsync::parse("sometimes").is_err());
        assert!(Fsync::parse("every=0").is_err());
    }
}
