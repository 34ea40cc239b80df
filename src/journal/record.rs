//! One journal record: its layout, its checksum, and encoding and decoding it. Kept apart
//! from replay and the writer so the file format is in one place, and a change to it is
//! a change to this file.
//!
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

use std::io::{self, BufReader, Read, Seek, SeekFrom};

use crate::leb128;
use crate::pickle::Fragment;

/// A record larger than this is corrupt by definition (frames are at most 64 MiB by
/// default; an item is smaller than its frame).
pub(super) const MAX_RECORD: u32 = 1 << 30;
/// The largest item a put may journal: a record limit less room for its header fields.
pub(super) const MAX_ITEM: usize = (MAX_RECORD as usize) - 64;

pub(super) mod kind {
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
/// [`Journal::declare`](super::Journal::declare)), `id` the item's journal id; the
/// layout is in the docs of `journal/record.rs`.
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

impl Record<'_> {
    /// Appends the framed record (length, CRC, payload) to `out`.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
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
        leb128::push(out, u64::from(*qnum));
        match self {
            Record::Declare { name, .. } => {
                leb128::push(out, name.len() as u64);
                out.extend_from_slice(name.as_bytes());
            }
            Record::Put {
                id,
                deliveries,
                item,
                ..
            } => {
                leb128::push(out, *id);
                leb128::push(out, u64::from(*deliveries));
                out.push(u8::from(item.uses_memo()));
                leb128::push(out, item.bytes().len() as u64);
                out.extend_from_slice(item.bytes());
            }
            Record::Take { id, .. }
            | Record::Reserve { id, .. }
            | Record::Ack { id, .. }
            | Record::Requeue { id, .. } => leb128::push(out, *id),
            Record::DeadLetter { id, to, .. } => {
                leb128::push(out, *id);
                leb128::push(out, u64::from(*to));
            }
            Record::Clear { count, .. } => leb128::push(out, *count),
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
pub(super) fn crc32(data: &[u8]) -> u32 {
    !crc32_update(!0, data)
}

/// Feeds `data` into a running CRC-32 (`crc` as the table loop keeps it: start from
/// `!0`, invert at the end), so a long payload can be checked piece by piece.
fn crc32_update(crc: u32, data: &[u8]) -> u32 {
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
    data.iter().fold(crc, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// How much of the file [`Records`] buffers, and the largest payload it reads without
/// first checking its CRC piece by piece.
pub(super) const CHUNK: usize = 64 << 10;

/// Records read one at a time from a journal file, through a bounded buffer.
///
/// Replay and compaction read files much larger than what they keep (a journal is
/// mostly records that later ones cancel), and the boxes that run this can be small, so
/// nothing here holds more than [`CHUNK`] bytes of file plus one payload: memory is the
/// live state plus the largest record, not the file. A record's length is checked
/// against [`MAX_RECORD`] and against the bytes left before anything is allocated for
/// it, and a payload over [`CHUNK`] is only given a buffer once its CRC matched, so a
/// damaged header cannot make the reader allocate what its length field says.
pub(super) struct Records<R> {
    inner: BufReader<R>,
    /// The file offset `inner` reads next.
    at: u64,
    /// Where the records end: the file's length, or the cut a compaction replays to.
    /// Nothing at or past it is read.
    end: u64,
    /// The last payload read, reused from record to record.
    payload: Vec<u8>,
}

impl<R: Read + Seek> Records<R> {
    /// Records of `file` from its start up to `end`.
    pub(super) fn new(mut file: R, end: u64) -> io::Result<Records<R>> {
        file.seek(SeekFrom::Start(0))?;
        Ok(Records {
            inner: BufReader::with_capacity(CHUNK, file),
            at: 0,
            end,
            payload: Vec::new(),
        })
    }

    /// Where the records end.
    pub(super) fn end(&self) -> u64 {
        self.end
    }

    /// The payload of a valid record at `pos`, and where the next one starts: `None` if
    /// the bytes there are not a whole record with a matching CRC (damage, a torn write,
    /// or an offset that is no record boundary).
    ///
    /// # Errors
    /// The operating system's read or seek error (a file shorter than `end` is one).
    pub(super) fn record_at(&mut self, pos: u64) -> io::Result<Option<(&[u8], u64)>> {
        let Some(start) = pos.checked_add(8).filter(|&s| s <= self.end) else {
            return Ok(None);
        };
        self.seek_to(pos)?;
        let mut header = [0; 8];
        self.inner.read_exact(&mut header)?;
        self.at = start;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_RECORD || u64::from(len) > self.end - start {
            return Ok(None);
        }
        let len = len as usize;
        if len > CHUNK {
            if !self.crc_matches(len, crc)? {
                return Ok(None);
            }
            self.seek_to(start)?;
        }
        self.payload.clear();
        self.payload.reserve_exact(len);
        self.payload.resize(len, 0);
        self.inner.read_exact(&mut self.payload)?;
        let next = start + len as u64;
        self.at = next;
        Ok((crc32(&self.payload) == crc).then_some((&self.payload[..], next)))
    }

    /// Whether the `len` bytes from here have CRC `crc`, read [`CHUNK`] at a time.
    fn crc_matches(&mut self, len: usize, crc: u32) -> io::Result<bool> {
        self.payload.clear();
        self.payload.resize(CHUNK, 0);
        let mut running = !0;
        let mut left = len;
        while left > 0 {
            let piece = &mut self.payload[..left.min(CHUNK)];
            self.inner.read_exact(piece)?;
            self.at += piece.len() as u64;
            running = crc32_update(running, piece);
            left -= piece.len();
        }
        Ok(!running == crc)
    }

    /// Moves to `pos`, keeping the buffered bytes when `pos` is among them (the search
    /// for the next valid record after damage steps back by a few bytes at a time).
    fn seek_to(&mut self, pos: u64) -> io::Result<()> {
        if pos != self.at {
            let delta = if pos > self.at {
                i64::try_from(pos - self.at)
            } else {
                i64::try_from(self.at - pos).map(|d| -d)
            };
            let delta = delta.map_err(|_| io::Error::other("journal offset out of range"))?;
            self.inner.seek_relative(delta)?;
            self.at = pos;
        }
        Ok(())
    }
}

/// A cursor over a record's payload; every read is bounds-checked.
pub(super) struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub(super) fn new(data: &'a [u8]) -> Fields<'a> {
        Fields { data, pos: 0 }
    }

    pub(super) fn leb(&mut self) -> Option<u64> {
        let (v, n) = leb128::decode(self.data.get(self.pos..)?.iter().copied())?;
        self.pos += n;
        Some(v)
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.leb()?).ok()
    }

    pub(super) fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.leb()?).ok()?;
        let end = self.pos.checked_add(n)?;
        let out = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
