//! Compaction: rewriting the journal as a snapshot of its live state, so the file stays a
//! small multiple of what the queues hold however long the server runs. Apart from the
//! writer because it runs beside it (from the flusher) and takes the file lock only for
//! its last step.
//!
//! When the file grows past four times the (estimated) live data and a minimum size, the
//! flusher rewrites it: replay the file up to its current length into a snapshot (no
//! locks held), write the snapshot to a new file and sync it, then, briefly holding the
//! file lock, append what was written meanwhile, sync, rename over the old file and sync
//! the directory. `open` uses the same snapshot to rewrite a repaired file.
//!
//! None of it holds the file in memory: replay reads one record at a time, the snapshot
//! is written record by record through a `BufWriter`, and the tail is `io::copy`'d. A
//! compaction costs the live state plus a record, whatever the file's size.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::record::Record;
use super::replay::{replay, State};
use super::writer::wrap;
use super::{io_err, poisoned, Journal, COMPACT_NAME, FILE_NAME};
use crate::log::log_at;
use crate::Result;

/// Records encoded one at a time into `out`, counting the bytes: a snapshot is as large
/// as the live data, so it is streamed to its file rather than built in memory.
struct RecordWriter<W> {
    out: W,
    /// One encoded record, reused.
    scratch: Vec<u8>,
    len: u64,
}

impl<W: Write> RecordWriter<W> {
    fn write(&mut self, record: &Record<'_>) -> io::Result<()> {
        self.scratch.clear();
        record.encode(&mut self.scratch);
        self.len += self.scratch.len() as u64;
        self.out.write_all(&self.scratch)
    }
}

impl State {
    /// Writes the records that recreate this state from nothing.
    fn snapshot<W: Write>(&self, out: &mut RecordWriter<W>) -> io::Result<()> {
        let mut qnums: Vec<&u32> = self.names.keys().collect();
        qnums.sort_unstable();
        for &qnum in &qnums {
            out.write(&Record::Declare {
                qnum: *qnum,
                name: &self.names[qnum],
            })?;
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
                    out.write(&Record::Put {
                        qnum: *qnum,
                        front: false,
                        id,
                        deliveries,
                        item,
                    })?;
                }
            }
            for &id in &q.reserved {
                out.write(&Record::Reserve { qnum: *qnum, id })?;
            }
        }
        Ok(())
    }
}

/// Writes the records that recreate `state` to a new, synced file at `tmp`, returning it
/// and its length; the caller renames it over the journal (after appending anything newer).
pub(super) fn write_snapshot(state: &State, tmp: &Path) -> Result<(File, u64)> {
    let file = File::create(tmp).map_err(|e| io_err("creating", tmp, e))?;
    let mut out = RecordWriter {
        out: BufWriter::new(file),
        scratch: Vec::new(),
        len: 0,
    };
    let file = state
        .snapshot(&mut out)
        .and_then(|()| out.out.into_inner().map_err(|e| e.into_error()))
        .and_then(|file| file.sync_data().map(|()| file))
        .map_err(|e| io_err("writing", tmp, e))?;
    Ok((file, out.len))
}

impl Journal {
    /// Whether the file has outgrown the live data enough to be worth rewriting.
    pub(super) fn compaction_due(&self) -> Result<bool> {
        let (live, avg) = {
            let p = self.lock_pending()?;
            let avg = p.put_bytes.checked_div(p.puts).unwrap_or(64);
            (p.live_items.max(0) as u64, avg)
        };
        let len = self.file.lock().map_err(|_| poisoned())?.len;
        Ok(len > self.config.compact_min_bytes && len > 4 * live * avg.max(1))
    }

    /// One compaction (the caller makes sure only one runs at a time).
    pub(super) fn compact_now(&self) -> Result<()> {
        let path = self.config.dir.join(FILE_NAME);
        let tmp = self.config.dir.join(COMPACT_NAME);
        let cut = self.file.lock().map_err(|_| poisoned())?.len;
        // Replay our own file up to `cut` with no lock held: writers keep appending.
        let reading = |e| io_err("reading the journal for compaction", &path, e);
        let old = File::open(&path).map_err(reading)?;
        let replay = replay(&old, cut, false).map_err(reading)??;
        let (mut out, snapshot_len) = write_snapshot(&replay.state, &tmp)?;
        drop(replay);
        // Now the short critical section: append what was written since `cut`, then swap.
        // The tail is copied through a small buffer (or by the kernel), however long.
        let mut f = self.file.lock().map_err(|_| poisoned())?;
        let tail_len = (&old)
            .seek(SeekFrom::Start(cut))
            .and_then(|_| io::copy(&mut (&old).take(f.len - cut), &mut out))
            .map_err(|e| io_err("copying the journal tail into", &tmp, e))?;
        out.sync_data().map_err(|e| io_err("writing", &tmp, e))?;
        fs::rename(&tmp, &path)
            .map_err(|e| io_err("renaming the compacted journal to", &path, e))?;
        if let Ok(dir) = File::open(&self.config.dir) {
            let _ = dir.sync_all();
        }
        let new_len = snapshot_len + tail_len;
        log_at!(Info, "journal compacted: {} -> {} bytes", f.len, new_len);
        let reopened = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io_err("reopening", &path, e))?;
        f.file = wrap(&self.config, reopened);
        f.len = new_len;
        Ok(())
    }
}
