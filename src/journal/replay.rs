//! Replay: rebuilding the queues' live state from the records of a journal file, and
//! deciding what damage means. Both [`Journal::open`](super::Journal::open) and
//! compaction replay, so this is where "what the file says" is defined once.
//!
//! A damaged *final* record (a torn write from a crash: truncated, or zero-filled) is cut
//! off and the bytes dropped are logged. Damage with any valid record after it means
//! corruption in the middle, and so does a record for a queue number no record declared:
//! replay fails with a clear message unless `repair` is set, which skips to the next
//! valid record (and `open` then rewrites the file from what it kept, so a later
//! compaction never meets the damage again).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Seek};

use super::record::{kind, Fields, Records};
use super::{Recovered, RecoveredQueue};
use crate::log::log_at;
use crate::pickle::Fragment;
use crate::{Error, Result};

/// What applying one well-formed record did.
enum Applied {
    Ok,
    /// The record names a queue number no earlier record declared: refused, since its
    /// item would otherwise vanish without a trace.
    Undeclared(u32),
}

/// The live state a journal describes: what replay rebuilds and compaction writes.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) names: HashMap<u32, String>,
    pub(super) queues: HashMap<u32, QState>,
    pub(super) max_id: u64,
}

#[derive(Debug, Default)]
pub(super) struct QState {
    pub(super) ready: VecDeque<u64>,
    pub(super) reserved: Vec<u64>,
    pub(super) items: HashMap<u64, (u32, Fragment)>,
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
        let mut f = Fields::new(payload);
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

    pub(super) fn recovered(&self) -> Vec<RecoveredQueue> {
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

    pub(super) fn live_items(&self) -> u64 {
        self.queues.values().map(|q| q.items.len() as u64).sum()
    }
}

/// What replaying a file found.
#[derive(Debug)]
pub(super) struct Replay {
    pub(super) state: State,
    /// Where the valid records end (the file is cut here if a torn tail followed).
    pub(super) valid_len: u64,
    pub(super) dropped: u64,
    /// Bytes `repair` skipped before the end: the file must be rewritten without them.
    pub(super) skipped: u64,
}

/// Replays the records of `file` up to `end`, one at a time (see [`Records`]). Damage at
/// the end is a torn tail; damage followed by a valid record is corruption, an error
/// unless `repair`.
///
/// # Errors
/// The outer error is the operating system's, reading the file (the caller knows which
/// file); the inner one says what is wrong with its contents.
pub(super) fn replay<R: Read + Seek>(
    file: R,
    end: u64,
    repair: bool,
) -> io::Result<Result<Replay>> {
    let mut records = Records::new(file, end)?;
    let mut state = State::default();
    let mut pos = 0u64;
    let mut valid_len = 0u64;
    let mut dropped = 0u64;
    let mut skipped = 0u64;
    while pos < end {
        match records.record_at(pos)? {
            Some((payload, next)) => {
                match state.apply(payload) {
                    Some(Applied::Ok) => {}
                    Some(Applied::Undeclared(qnum)) if !repair => {
                        return Ok(Err(Error::Journal(format!(
                            "journal record at byte {pos} is for queue number {qnum}, which no \
                             record declared; a repair skips such records"
                        ))));
                    }
                    Some(Applied::Undeclared(qnum)) => {
                        log_at!(Warn, "journal repair: skipped a record for undeclared queue {qnum} at byte {pos}");
                        dropped += next - pos;
                        skipped += next - pos;
                    }
                    None => {
                        return Ok(Err(Error::Value(format!(
                            "journal record at byte {pos} has a valid checksum but an unknown layout \
                             (written by a newer distq?)"
                        ))));
                    }
                }
                pos = next;
                valid_len = pos;
            }
            None => {
                // Only a damaged *final* record is what an interrupted append leaves; a
                // valid record after the damage means the middle of the file is hurt.
                let Some(next) = next_valid(&mut records, pos)? else {
                    dropped += end - pos;
                    break;
                };
                if !repair {
                    return Ok(Err(Error::Journal(format!(
                        "journal is corrupt at byte {pos} of {end} with valid data after it; \
                         a repair skips damaged records (their items are lost)"
                    ))));
                }
                // Skip forward to the next offset where a valid record starts.
                log_at!(
                    Warn,
                    "journal repair: skipped {} damaged bytes at byte {pos}",
                    next - pos
                );
                dropped += next - pos;
                skipped += next - pos;
                pos = next;
            }
        }
    }
    Ok(Ok(Replay {
        state,
        valid_len,
        dropped,
        skipped,
    }))
}

/// The first offset after the damage at `pos` where a valid record starts, if any: every
/// offset is tried, since damage can shift record boundaries anywhere.
fn next_valid<R: Read + Seek>(records: &mut Records<R>, pos: u64) -> io::Result<Option<u64>> {
    for p in pos + 1..records.end() {
        if records.record_at(p)?.is_some() {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::journal::record::{Record, CHUNK};
    use crate::Value;

    /// Replays `data` as a whole file.
    fn replay(data: &[u8], repair: bool) -> Result<Replay> {
        super::replay(io::Cursor::new(data), data.len() as u64, repair).unwrap()
    }

    pub(in crate::journal) fn frag(v: impl Into<Value>) -> Fragment {
        Fragment::encode(&v.into()).unwrap()
    }

    /// The records of a small history, and the ready items after each prefix.
    pub(in crate::journal) fn history() -> (Vec<Vec<u8>>, Vec<Vec<u64>>) {
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
            err.contains("corrupt") && err.contains("a repair skips"),
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
    fn a_record_larger_than_the_buffer_is_judged_like_a_small_one() {
        let (records, _) = history();
        let encode = |id: u64, item: &Fragment| {
            let mut b = Vec::new();
            Record::Put {
                qnum: 0,
                front: false,
                id,
                deliveries: 0,
                item,
            }
            .encode(&mut b);
            b
        };
        let mut all = records.concat();
        let at = all.len() as u64;
        all.extend(encode(9, &frag(vec![1u8; 3 * CHUNK + 5])));
        let r = replay(&all, false).unwrap();
        assert_eq!(r.valid_len, all.len() as u64);
        assert!(r.state.queues[&0].items.contains_key(&9));
        // Damaged or cut short as the final record: a torn tail.
        let mut torn = all.clone();
        torn[at as usize + 8 + 2 * CHUNK] ^= 1;
        for file in [&torn[..], &all[..at as usize + 8 + CHUNK]] {
            let r = replay(file, false).unwrap();
            assert_eq!(r.valid_len, at);
            assert!(!r.state.queues[&0].items.contains_key(&9));
        }
        // Damaged with a valid record after it: corruption, which repair skips.
        torn.extend(encode(10, &frag("after")));
        let err = replay(&torn, false).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        let kept = replay(&torn, true).unwrap();
        assert!(kept.state.queues[&0].items.contains_key(&10));
        assert!(!kept.state.queues[&0].items.contains_key(&9));
    }

    /// A file that remembers the largest single read asked of it and the bytes read.
    struct Watched<R> {
        inner: R,
        largest: usize,
        total: u64,
    }

    impl<R: Read> Read for Watched<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            let n = self.inner.read(buf)?;
            self.total += n as u64;
            Ok(n)
        }
    }

    impl<R: Seek> Seek for Watched<R> {
        fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }

    /// Replay holds one bounded buffer of the file, not the file: ~20 MB of small puts
    /// and takes (and one 200 KiB item) are never asked for more than 1 MiB at a time,
    /// and read once. Reading the whole file first (as replay once did) asks for
    /// buffers that grow to the file's size.
    #[test]
    fn replay_streams_a_file_far_larger_than_its_buffer() {
        let path = std::env::temp_dir().join(format!(
            "distq-journal-stream-{}.journal",
            std::process::id()
        ));
        let small = frag("x".repeat(100));
        let big = frag(vec![7u8; 200 << 10]);
        let mut out = io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut buf = Vec::new();
        let mut write = |r: Record<'_>| {
            buf.clear();
            r.encode(&mut buf);
            io::Write::write_all(&mut out, &buf).unwrap();
        };
        write(Record::Declare { qnum: 0, name: "q" });
        let pairs = 150_000;
        for id in 1..=pairs {
            let put = Record::Put {
                qnum: 0,
                front: false,
                id,
                deliveries: 0,
                item: &small,
            };
            write(put);
            write(Record::Take { qnum: 0, id });
        }
        for (id, item) in [(pairs + 1, &big), (pairs + 2, &small)] {
            let put = Record::Put {
                qnum: 0,
                front: false,
                id,
                deliveries: 0,
                item,
            };
            write(put);
        }
        drop(out);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > 16 << 20, "a journal of {len} bytes");
        let mut file = Watched {
            inner: std::fs::File::open(&path).unwrap(),
            largest: 0,
            total: 0,
        };
        let r = super::replay(&mut file, len, false).unwrap().unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(r.valid_len, len);
        assert_eq!(r.state.live_items(), 2);
        assert!(
            file.largest < 1 << 20,
            "replay asked for {} bytes at once from a file of {len}",
            file.largest
        );
        assert!(
            file.total < len + (1 << 20),
            "read {} bytes of a file of {len}",
            file.total
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
}
