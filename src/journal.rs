//! The journal: an append-only file of queue mutations, so a restart or a crash loses no
//! acknowledged `put`.
//!
//! # Records
//! ```text
//! record  = len:u32le crc32:u32le payload        (crc32 is IEEE, over the payload)
//! payload = kind:u8 field...                      (numbers are LEB128, strs/bytes len-prefixed)
//!   Declare    qnum name                          a queue's number for later records
//!   Put        qnum id deliveries memo bytes      item appended (at the tail)
//!   PutFront   qnum id deliveries memo bytes      item put back at the head (undelivered get)
//!   Take       qnum id                            item handed out by a plain get
//!   Reserve    qnum id                            item handed out under a lease
//!   Ack        qnum id                            leased item done
//!   Requeue    qnum id                            leased item back at the head
//!   DeadLetter qnum id to_qnum                    leased item moved to the dead-letter queue
//!   Clear      qnum count                         shutdown(immediate=True) dropped the items
//! ```
//!
//! # Writing without holding queue locks across I/O
//! Queues append records to an in-memory buffer while they hold their own lock (a
//! memcpy), so the journal's record order always matches each queue's order of events.
//! The bytes reach the file later, outside every queue lock: a `put` waits, after
//! releasing its queue, until its record has been written (and, with `--fsync always`,
//! synced) before its `#RETURN` goes out. Whoever waits first becomes the writer and
//! takes everything buffered so far, so concurrent puts share one `write` and one fsync
//! (group commit). Other records (gets, acks) are written by the next commit or by the
//! background flusher within one flush interval; losing them in a crash can only make an
//! item appear again, never disappear.
//!
//! # When a write fails
//! Memory has already applied every buffered record, so none is ever dropped: a failed
//! (or short, or unsynced) batch is cut back off the file and put back in front of the
//! buffer, and the next writer retries it, so the file always holds a prefix of the
//! queues' history. `written` only moves past a record once its bytes are in the file:
//! a put is acknowledged only then, by construction. A put whose batch failed is taken
//! back out of memory by its queue (see `Queue::withdraw`) and answered "not stored".
//! While writes keep failing, new puts are refused up front once the retry backlog
//! passes `MAX_BACKLOG` (16 MiB). The file goes through [`JournalFile`], so tests inject
//! failing writes, short writes and failing syncs.
//!
//! # Recovery
//! [`Journal::open`] replays the file. A damaged *final* record (a torn write from a
//! crash: truncated, or zero-filled) is cut off and the bytes dropped are logged. Damage
//! with any valid record after it means corruption in the middle, and so does a record
//! for a queue number no record declared: opening fails with a clear message unless
//! `repair` is set, which skips to the next valid record and rewrites the file from
//! what it kept (so a later compaction never meets the damage again).
//!
//! # Compaction
//! When the file grows past four times the (estimated) live data and a minimum size, the
//! flusher rewrites it: replay the file up to its current length into a snapshot (no
//! locks held), write the snapshot to a new file and sync it, then, briefly holding the
//! file lock, append what was written meanwhile, sync, rename over the old file and sync
//! the directory.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::log::log_at;
use crate::pickle::Fragment;
use crate::{Error, Result};

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
                    format!("--fsync {t:?}: expected always, never or every=MS (e.g. every=50ms)")
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
/// A record larger than this is corrupt by definition (frames are at most 64 MiB by
/// default; an item is smaller than its frame).
const MAX_RECORD: u32 = 1 << 30;
/// The largest item a put may journal: a record limit less room for its header fields.
const MAX_ITEM: usize = (MAX_RECORD as usize) - 64;
/// Records kept for a retry while writes fail, past which new puts are refused up front.
const MAX_BACKLOG: usize = 16 << 20;

mod kind {
    pub const DECLARE: u8 = 1;
    pub const PUT: u8 = 2;
    pub const PUT_FRONT: u8 = 3;
    pub const TAKE: u8 = 4;
    pub const RESERVE: u8 = 5;
    pub const ACK: u8 = 6;
    pub const REQUEUE: u8 = 7;
    pub const DEAD_LETTER: u8 = 8;
    pub const CLEAR: u8 = 9;
}

/// One queue mutation, as journaled. `qnum` is the queue's number (from
/// [`Journal::declare`]), `id` the item's journal id; the module docs have the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Record<'a> {
    /// Queue `qnum` is called `name`.
    Declare { qnum: u32, name: &'a str },
    /// An item was appended (`front: false`) or put back at the head (`front: true`).
    Put {
        qnum: u32,
        front: bool,
        id: u64,
        deliveries: u32,
        item: &'a Fragment,
    },
    /// An item was handed out by a plain `get`.
    Take { qnum: u32, id: u64 },
    /// An item was handed out under a lease.
    Reserve { qnum: u32, id: u64 },
    /// A leased item was acked.
    Ack { qnum: u32, id: u64 },
    /// A leased item went back to the head.
    Requeue { qnum: u32, id: u64 },
    /// A leased item moved to the dead-letter queue `to`.
    DeadLetter { qnum: u32, id: u64, to: u32 },
    /// `count` waiting items were dropped.
    Clear { qnum: u32, count: u64 },
}

fn put_leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

impl Record<'_> {
    /// Appends the framed record (length, CRC, payload) to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 8]);
        let (k, qnum) = match self {
            Record::Declare { qnum, .. } => (kind::DECLARE, qnum),
            Record::Put {
                qnum, front: false, ..
            } => (kind::PUT, qnum),
            Record::Put {
                qnum, front: true, ..
            } => (kind::PUT_FRONT, qnum),
            Record::Take { qnum, .. } => (kind::TAKE, qnum),
            Record::Reserve { qnum, .. } => (kind::RESERVE, qnum),
            Record::Ack { qnum, .. } => (kind::ACK, qnum),
            Record::Requeue { qnum, .. } => (kind::REQUEUE, qnum),
            Record::DeadLetter { qnum, .. } => (kind::DEAD_LETTER, qnum),
            Record::Clear { qnum, .. } => (kind::CLEAR, qnum),
        };
        out.push(k);
        put_leb(out, u64::from(*qnum));
        match self {
            Record::Declare { name, .. } => {
                put_leb(out, name.len() as u64);
                out.extend_from_slice(name.as_bytes());
            }
            Record::Put {
                id,
                deliveries,
                item,
                ..
            } => {
                put_leb(out, *id);
                put_leb(out, u64::from(*deliveries));
                out.push(u8::from(item.uses_memo()));
                put_leb(out, item.bytes().len() as u64);
                out.extend_from_slice(item.bytes());
            }
            Record::Take { id, .. }
            | Record::Reserve { id, .. }
            | Record::Ack { id, .. }
            | Record::Requeue { id, .. } => put_leb(out, *id),
            Record::DeadLetter { id, to, .. } => {
                put_leb(out, *id);
                put_leb(out, u64::from(*to));
            }
            Record::Clear { count, .. } => put_leb(out, *count),
        }
        let payload = &out[start + 8..];
        let len = payload.len() as u32;
        let crc = crc32(payload);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// CRC-32 (IEEE 802.3, the one zlib and `cksum -o3` use), table-driven. Written here
/// rather than pulled from a crate: twenty lines against a dependency in a tiny binary.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// A cursor over a record's payload; every read is bounds-checked.
struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn leb(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in 0..10 {
            let b = *self.data.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * shift);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.leb()?).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.leb()?).ok()?;
        let end = self.pos.checked_add(n)?;
        let out = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn u8(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
}

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

/// What applying one well-formed record did.
enum Applied {
    Ok,
    /// The record names a queue number no earlier record declared: refused, since its
    /// item would otherwise vanish without a trace.
    Undeclared(u32),
}

/// The live state a journal describes: what replay rebuilds and compaction writes.
#[derive(Debug, Default)]
struct State {
    names: HashMap<u32, String>,
    queues: HashMap<u32, QState>,
    max_id: u64,
}

#[derive(Debug, Default)]
struct QState {
    ready: VecDeque<u64>,
    reserved: Vec<u64>,
    items: HashMap<u64, (u32, Fragment)>,
}

impl QState {
    fn remove_ready(&mut self, id: u64) -> bool {
        // Nearly always the head: gets take from the front.
        match self.ready.iter().position(|&x| x == id) {
            Some(i) => {
                self.ready.remove(i);
                true
            }
            None => false,
        }
    }

    fn remove_reserved(&mut self, id: u64) -> bool {
        match self.reserved.iter().position(|&x| x == id) {
            Some(i) => {
                self.reserved.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

impl State {
    /// Applies one record's payload. `None` means the payload is malformed (which a
    /// valid CRC makes a bug, not damage); records about unknown items are ignored,
    /// since their `Put` may have been lost with a failed write.
    fn apply(&mut self, payload: &[u8]) -> Option<Applied> {
        let mut f = Fields {
            data: payload,
            pos: 0,
        };
        let k = f.u8()?;
        let qnum = f.u32()?;
        if k == kind::DECLARE {
            let name = std::str::from_utf8(f.bytes()?).ok()?;
            self.names.insert(qnum, name.to_string());
            return Some(Applied::Ok);
        }
        if !self.names.contains_key(&qnum) {
            return Some(Applied::Undeclared(qnum));
        }
        let q = self.queues.entry(qnum).or_default();
        match k {
            kind::PUT | kind::PUT_FRONT => {
                let id = f.leb()?;
                let deliveries = f.u32()?;
                let memo = f.u8()? == 1;
                let item = Fragment::from_parts(f.bytes()?.to_vec(), memo);
                self.max_id = self.max_id.max(id);
                q.items.insert(id, (deliveries, item));
                if k == kind::PUT {
                    q.ready.push_back(id);
                } else {
                    q.ready.push_front(id);
                }
            }
            kind::TAKE => {
                let id = f.leb()?;
                if q.remove_ready(id) {
                    q.items.remove(&id);
                }
            }
            kind::RESERVE => {
                let id = f.leb()?;
                if q.remove_ready(id) {
                    q.reserved.push(id);
                    if let Some((d, _)) = q.items.get_mut(&id) {
                        *d = d.saturating_add(1);
                    }
                }
            }
            kind::ACK => {
                let id = f.leb()?;
                if q.remove_reserved(id) {
                    q.items.remove(&id);
                }
            }
            kind::REQUEUE => {
                let id = f.leb()?;
                if q.remove_reserved(id) {
                    q.ready.push_front(id);
                }
            }
            kind::DEAD_LETTER => {
                let id = f.leb()?;
                let to = f.u32()?;
                if !self.names.contains_key(&to) {
                    return Some(Applied::Undeclared(to));
                }
                if q.remove_reserved(id) {
                    if let Some(entry) = q.items.remove(&id) {
                        let dead = self.queues.entry(to).or_default();
                        dead.items.insert(id, entry);
                        dead.ready.push_back(id);
                    }
                }
            }
            kind::CLEAR => {
                let _count = f.leb()?;
                let ids: Vec<u64> = q.ready.drain(..).collect();
                for id in ids {
                    q.items.remove(&id);
                }
            }
            _ => return None,
        }
        Some(Applied::Ok)
    }

    fn item(&self, q: &QState, id: u64) -> Option<Recovered> {
        let (deliveries, item) = q.items.get(&id)?;
        Some(Recovered {
            id,
            deliveries: *deliveries,
            item: item.clone(),
        })
    }

    fn recovered(&self) -> Vec<RecoveredQueue> {
        let mut out: Vec<RecoveredQueue> = self
            .queues
            .iter()
            .filter_map(|(qnum, q)| {
                let name = self.names.get(qnum)?.clone();
                let mut reserved: Vec<u64> = q.reserved.clone();
                reserved.sort_unstable();
                Some(RecoveredQueue {
                    name,
                    ready: q.ready.iter().filter_map(|&id| self.item(q, id)).collect(),
                    reserved: reserved
                        .into_iter()
                        .filter_map(|id| self.item(q, id))
                        .collect(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The records that recreate this state from nothing.
    fn snapshot(&self, out: &mut Vec<u8>) {
        let mut qnums: Vec<&u32> = self.names.keys().collect();
        qnums.sort_unstable();
        for &qnum in &qnums {
            Record::Declare {
                qnum: *qnum,
                name: &self.names[qnum],
            }
            .encode(out);
        }
        for &qnum in &qnums {
            let Some(q) = self.queues.get(qnum) else {
                continue;
            };
            // Reserved items are written as put-then-reserve, so a later ack or requeue
            // in the journal's tail still finds them; replaying the reserve adds the
            // delivery back, so the put carries one less.
            for (&id, reserved) in q
                .reserved
                .iter()
                .map(|id| (id, true))
                .chain(q.ready.iter().map(|id| (id, false)))
            {
                if let Some((deliveries, item)) = q.items.get(&id) {
                    let deliveries = deliveries.saturating_sub(u32::from(reserved));
                    Record::Put {
                        qnum: *qnum,
                        front: false,
                        id,
                        deliveries,
                        item,
                    }
                    .encode(out);
                }
            }
            for &id in &q.reserved {
                Record::Reserve { qnum: *qnum, id }.encode(out);
            }
        }
    }

    fn live_items(&self) -> u64 {
        self.queues.values().map(|q| q.items.len() as u64).sum()
    }
}

/// What replaying a file found.
#[derive(Debug)]
struct Replay {
    state: State,
    /// Where the valid records end (the file is cut here if a torn tail followed).
    valid_len: u64,
    dropped: u64,
    /// Bytes `repair` skipped before the end: the file must be rewritten without them.
    skipped: u64,
}

/// Replays `data`. Damage at the end is a torn tail; damage followed by more data is
/// corruption, an error unless `repair`.
fn replay(data: &[u8], repair: bool) -> Result<Replay> {
    let mut state = State::default();
    let mut pos = 0usize;
    let mut valid_len = 0u64;
    let mut dropped = 0u64;
    let mut skipped = 0u64;
    while pos < data.len() {
        match record_at(data, pos) {
            Some((payload, next)) => {
                match state.apply(payload) {
                    Some(Applied::Ok) => {}
                    Some(Applied::Undeclared(qnum)) if !repair => {
                        return Err(Error::Value(format!(
                            "journal record at byte {pos} is for queue number {qnum}, which no \
                             record declared; start with --journal-repair to skip such records"
                        )));
                    }
                    Some(Applied::Undeclared(qnum)) => {
                        log_at!(Warn, "journal repair: skipped a record for undeclared queue {qnum} at byte {pos}");
                        dropped += (next - pos) as u64;
                        skipped += (next - pos) as u64;
                    }
                    None => {
                        return Err(Error::Value(format!(
                            "journal record at byte {pos} has a valid checksum but an unknown layout \
                             (written by a newer distq?)"
                        )));
                    }
                }
                pos = next;
                valid_len = pos as u64;
            }
            None => {
                // Only a damaged *final* record is what an interrupted append leaves; a
                // valid record after the damage means the middle of the file is hurt.
                let next_valid = (pos + 1..data.len()).find(|&p| record_at(data, p).is_some());
                if next_valid.is_none() {
                    dropped += (data.len() - pos) as u64;
                    break;
                }
                if !repair {
                    return Err(Error::Value(format!(
                        "journal is corrupt at byte {pos} of {} with valid data after it; \
                         start with --journal-repair to skip damaged records (their items are lost)",
                        data.len()
                    )));
                }
                // Skip forward to the next offset where a valid record starts.
                let skip = next_valid;
                let next = skip.unwrap_or(data.len());
                log_at!(
                    Warn,
                    "journal repair: skipped {} damaged bytes at byte {pos}",
                    next - pos
                );
                dropped += (next - pos) as u64;
                skipped += (next - pos) as u64;
                pos = next;
                if skip.is_none() {
                    break;
                }
            }
        }
    }
    Ok(Replay {
        state,
        valid_len,
        dropped,
        skipped,
    })
}

/// The payload of a valid record at `pos`, and where the next one starts.
fn record_at(data: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let header = data.get(pos..pos.checked_add(8)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let end = pos.checked_add(8)?.checked_add(len as usize)?;
    let payload = data.get(pos + 8..end)?;
    (crc32(payload) == crc).then_some((payload, end))
}

/// Records appended but not yet handed to a writer, and how far writing has got.
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    /// Sequence number of the last record appended.
    appended: u64,
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
    failing: Option<String>,
    /// Estimates for the compaction trigger.
    live_items: i64,
    put_bytes: u64,
    puts: u64,
    next_qnum: u32,
}

#[derive(Debug)]
struct FileState {
    file: Box<dyn JournalFile>,
    /// Where the last successful write ended: the next batch is written here, over any
    /// bytes a failed write left behind.
    len: u64,
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

fn write_failed(last: Option<&str>) -> Error {
    Error::io(
        "writing the journal",
        std::io::Error::other(last.unwrap_or("write failed").to_string()),
    )
}

fn poisoned() -> Error {
    Error::Internal("the journal lock was poisoned by a panicking thread".into())
}

fn wrap(config: &JournalConfig, file: File) -> Box<dyn JournalFile> {
    match &config.wrap_file {
        Some(w) => (w.0)(Box::new(file)),
        None => Box::new(file),
    }
}

/// Writes the records that recreate `state` to a new, synced file at `tmp`, returning it
/// and its length; the caller renames it over the journal (after appending anything newer).
fn write_snapshot(state: &State, tmp: &Path) -> Result<(File, u64)> {
    let mut snapshot = Vec::new();
    state.snapshot(&mut snapshot);
    let mut out = File::create(tmp).map_err(|e| io_err("creating", tmp, e))?;
    out.write_all(&snapshot)
        .and_then(|()| out.sync_data())
        .map_err(|e| io_err("writing", tmp, e))?;
    Ok((out, snapshot.len() as u64))
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
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|e| io_err("reading the journal", &path, e))?;
        let file_len = data.len() as u64;
        let replay = replay(&data, config.repair)?;
        drop(data);
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
            pending: Mutex::new(Pending {
                live_items: live as i64,
                next_qnum,
                ..Pending::default()
            }),
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

    fn flush(&self, seq: u64, sync: bool) -> Result<()> {
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

    /// Refuses new puts while writes keep failing and the records waiting for a retry
    /// exceed `MAX_BACKLOG` (16 MiB), so a full disk cannot grow the server's memory without bound.
    ///
    /// # Errors
    /// [`Error::Io`] naming the last write error.
    pub fn admit(&self, bytes: usize) -> Result<()> {
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
    pub fn check_item(&self, len: usize) -> Result<()> {
        if len > MAX_ITEM {
            return Err(Error::Value(format!(
                "an item of {len} bytes is larger than the journal's record limit of {MAX_ITEM} bytes; \
                 split it into smaller items"
            )));
        }
        Ok(())
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

    fn compaction_due(&self) -> Result<bool> {
        let (live, avg) = {
            let p = self.lock_pending()?;
            let avg = p.put_bytes.checked_div(p.puts).unwrap_or(64);
            (p.live_items.max(0) as u64, avg)
        };
        let len = self.file.lock().map_err(|_| poisoned())?.len;
        Ok(len > self.config.compact_min_bytes && len > 4 * live * avg.max(1))
    }

    /// Rewrites the journal as a snapshot of its live state (see the module docs).
    pub fn compact(&self) -> Result<()> {
        if self.compacting.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = self.compact_now();
        self.compacting.store(false, Ordering::SeqCst);
        result
    }

    fn compact_now(&self) -> Result<()> {
        let path = self.config.dir.join(FILE_NAME);
        let tmp = self.config.dir.join(COMPACT_NAME);
        let cut = self.file.lock().map_err(|_| poisoned())?.len;
        // Replay our own file up to `cut` with no lock held: writers keep appending.
        let mut data = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(cut).read_to_end(&mut data))
            .map_err(|e| io_err("reading the journal for compaction", &path, e))?;
        let replay = replay(&data, false)?;
        drop(data);
        let (mut out, snapshot_len) = write_snapshot(&replay.state, &tmp)?;
        // Now the short critical section: append what was written since `cut`, then swap.
        let mut f = self.file.lock().map_err(|_| poisoned())?;
        let mut tail = Vec::new();
        let mut old = File::open(&path).map_err(|e| io_err("reopening", &path, e))?;
        old.seek(SeekFrom::Start(cut))
            .and_then(|_| old.take(f.len - cut).read_to_end(&mut tail))
            .map_err(|e| io_err("reading the journal tail", &path, e))?;
        out.write_all(&tail)
            .and_then(|()| out.sync_data())
            .map_err(|e| io_err("writing", &tmp, e))?;
        fs::rename(&tmp, &path)
            .map_err(|e| io_err("renaming the compacted journal to", &path, e))?;
        if let Ok(dir) = File::open(&self.config.dir) {
            let _ = dir.sync_all();
        }
        let new_len = snapshot_len + tail.len() as u64;
        log_at!(Info, "journal compacted: {} -> {} bytes", f.len, new_len);
        let reopened = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io_err("reopening", &path, e))?;
        f.file = wrap(&self.config, reopened);
        f.len = new_len;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn frag(v: impl Into<Value>) -> Fragment {
        Fragment::encode(&v.into()).unwrap()
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("distq-journal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// The records of a small history, and the ready items after each prefix.
    fn history() -> (Vec<Vec<u8>>, Vec<Vec<u64>>) {
        let items: Vec<Fragment> = (0..6).map(|i| frag(format!("item {i}"))).collect();
        let put = |id: u64, front: bool| Record::Put {
            qnum: 0,
            front,
            id,
            deliveries: 0,
            item: &items[id as usize],
        };
        let recs = [
            Record::Declare { qnum: 0, name: "q" },
            put(1, false),
            put(2, false),
            Record::Take { qnum: 0, id: 1 },
            put(3, false),
            Record::Reserve { qnum: 0, id: 2 },
            put(4, true),
            Record::Ack { qnum: 0, id: 2 },
            put(5, false),
        ];
        let encoded: Vec<Vec<u8>> = recs
            .iter()
            .map(|r| {
                let mut b = Vec::new();
                r.encode(&mut b);
                b
            })
            .collect();
        let mut states = Vec::new();
        let mut all = Vec::new();
        for e in &encoded {
            all.extend_from_slice(e);
            let st = replay(&all, false).unwrap().state;
            states.push(
                st.queues
                    .get(&0)
                    .map(|q| q.ready.iter().copied().collect())
                    .unwrap_or_default(),
            );
        }
        (encoded, states)
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn replay_follows_the_records() {
        let (_, states) = history();
        assert_eq!(states.last().unwrap(), &vec![4, 3, 5]);
    }

    #[test]
    fn a_torn_tail_at_every_byte_recovers_a_prefix() {
        let (records, states) = history();
        let all: Vec<u8> = records.concat();
        // Truncate anywhere inside the last three records.
        let tail_start: usize = records[..records.len() - 3].iter().map(Vec::len).sum();
        for cut in tail_start..all.len() {
            let r = replay(&all[..cut], false).unwrap();
            let complete = records.iter().scan(0, |acc, r| {
                *acc += r.len();
                Some(*acc)
            });
            let k = complete.take_while(|&end| end <= cut).count();
            assert_eq!(
                r.valid_len as usize,
                records[..k].iter().map(Vec::len).sum::<usize>()
            );
            let ready: Vec<u64> = r
                .state
                .queues
                .get(&0)
                .map(|q| q.ready.iter().copied().collect())
                .unwrap_or_default();
            assert_eq!(ready, states[k - 1], "cut at {cut}");
        }
        // A zero-filled tail (blocks allocated, never written) is torn too.
        let mut zeroed = all.clone();
        zeroed.extend_from_slice(&[0; 100]);
        assert_eq!(
            replay(&zeroed, false).unwrap().valid_len as usize,
            all.len()
        );
    }

    #[test]
    fn corruption_in_the_middle_refuses_unless_repairing() {
        let (records, _) = history();
        let mut all: Vec<u8> = records.concat();
        let at = records[0].len() + records[1].len() + 10; // inside record 2
        all[at] ^= 0xff;
        let err = replay(&all, false).unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("--journal-repair"),
            "{err}"
        );
        let repaired = replay(&all, true).unwrap();
        let q = repaired.state.queues.get(&0).unwrap();
        assert!(
            !q.items.contains_key(&2),
            "the damaged record's item is lost"
        );
        assert!(q.items.contains_key(&5), "later records survive");
    }

    #[test]
    fn a_bad_length_in_the_middle_is_not_a_torn_tail() {
        let (records, _) = history();
        let mut all: Vec<u8> = records.concat();
        // Record 2's length now runs past the end of the file: once taken for a torn
        // write, which cut off every valid record after it.
        let at = records[0].len() + records[1].len() + 1;
        all[at] ^= 0x04;
        let err = replay(&all, false).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        let kept = replay(&all, true).unwrap();
        assert!(kept.state.queues[&0].items.contains_key(&5));
        // Damage in the final record alone is still a torn tail.
        let mut last = records.concat();
        let n = last.len();
        last[n - 1] ^= 0xff;
        assert_eq!(
            replay(&last, false).unwrap().valid_len as usize,
            n - records[records.len() - 1].len()
        );
    }

    #[test]
    fn a_record_for_an_undeclared_queue_is_refused() {
        let (records, _) = history();
        let all: Vec<u8> = records[1..].concat(); // the Declare is missing
        let err = replay(&all, false).unwrap_err().to_string();
        assert!(err.contains("no record declared"), "{err}");
        assert!(replay(&all, true).unwrap().state.queues.is_empty());
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
