//! Queued items packed back to back in one ring buffer.
//!
//! Each item is a LEB128 header, `len << 3 | uses_memo << 2 | has_count << 1 | has_id`,
//! then (if `has_count`) a LEB128 delivery count, then (if `has_id`) a LEB128 journal id,
//! then its pickle fragment. A queued small int costs 3 bytes (1 header + 2 opcode bytes)
//! plus the ring's spare capacity, against ~40 for a boxed item per slot (pointer, length,
//! allocator overhead). Items that were never delivered (the common case) pay nothing for
//! the delivery count, and without a journal nothing for an id.

use std::collections::VecDeque;

use crate::leb128;
use crate::pickle::Fragment;

/// An item taken out of a queue, with the number of times it has been handed out under
/// a lease (for dead-lettering items that keep failing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The item's pickle.
    pub item: Fragment,
    /// How many leases have handed this item out so far.
    pub deliveries: u32,
    /// The item's id in the journal (0 when the server keeps no journal).
    pub id: u64,
}

impl Taken {
    /// A new item: never delivered, not journaled.
    pub fn new(item: Fragment) -> Taken {
        Taken {
            item,
            deliveries: 0,
            id: 0,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Packed {
    bytes: VecDeque<u8>,
    count: usize,
}

impl Packed {
    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The bytes in use.
    #[cfg(test)]
    fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The header bytes for `t`: a LEB128 tag, then the count and the id if non-zero.
    fn header(t: &Taken) -> ([u8; 3 * leb128::MAX_LEN], usize) {
        let has_count = t.deliveries > 0;
        let has_id = t.id > 0;
        let tag = ((t.item.bytes().len() as u64) << 3)
            | (u64::from(t.item.uses_memo()) << 2)
            | (u64::from(has_count) << 1)
            | u64::from(has_id);
        let mut out = [0u8; 3 * leb128::MAX_LEN];
        let mut total = 0;
        let mut buf = [0u8; leb128::MAX_LEN];
        for (present, v) in [
            (true, tag),
            (has_count, u64::from(t.deliveries)),
            (has_id, t.id),
        ] {
            if present {
                let n = leb128::encode(v, &mut buf);
                out[total..total + n].copy_from_slice(&buf[..n]);
                total += n;
            }
        }
        (out, total)
    }

    pub(super) fn push_back(&mut self, t: &Taken) {
        let (header, n) = Packed::header(t);
        self.bytes.extend(&header[..n]);
        self.bytes.extend(t.item.bytes());
        self.count += 1;
    }

    pub(super) fn push_front(&mut self, t: &Taken) {
        let (header, n) = Packed::header(t);
        for &b in t.item.bytes().iter().rev().chain(header[..n].iter().rev()) {
            self.bytes.push_front(b);
        }
        self.count += 1;
    }

    /// Reads a LEB128 number starting at `at`; returns it and the bytes used.
    fn read_leb128(&self, at: usize) -> Option<(u64, usize)> {
        leb128::decode(self.bytes.iter().skip(at).copied())
    }

    pub(super) fn pop_front(&mut self) -> Option<Taken> {
        // Only this module writes the ring, so the headers always match what follows.
        let (tag, mut used) = self.read_leb128(0)?;
        let mut field = |present: bool| -> Option<u64> {
            if !present {
                return Some(0);
            }
            let (v, n) = self.read_leb128(used)?;
            used += n;
            Some(v)
        };
        let deliveries = u32::try_from(field(tag & 2 == 2)?).unwrap_or(u32::MAX);
        let id = field(tag & 1 == 1)?;
        let len = usize::try_from(tag >> 3).ok()?;
        self.bytes.drain(..used);
        // Copied slice by slice: collecting the drain byte by byte cost ~20 instructions
        // per byte.
        let (front, back) = self.bytes.as_slices();
        let in_front = front.len().min(len);
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(&front[..in_front]);
        bytes.extend_from_slice(back.get(..len - in_front)?);
        self.bytes.drain(..len);
        self.count -= 1;
        Some(Taken {
            item: Fragment::from_parts(bytes, tag & 4 == 4),
            deliveries,
            id,
        })
    }

    /// Returns memory after a burst: keep at most 4x what is in use (and 64 KiB).
    pub(super) fn shrink_if_sparse(&mut self) {
        let cap = self.bytes.capacity();
        if cap > 64 * 1024 && self.bytes.len() < cap / 4 {
            self.bytes.shrink_to((self.bytes.len() * 2).max(64 * 1024));
        }
    }

    /// Removes every item (Python's `shutdown(immediate=True)`), returning how many.
    pub(super) fn clear(&mut self) -> usize {
        let n = self.count;
        self.bytes = VecDeque::new();
        self.count = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn taken(v: Value, deliveries: u32) -> Taken {
        Taken {
            item: Fragment::encode(&v).unwrap(),
            deliveries,
            id: u64::from(deliveries) * 1000,
        }
    }

    #[test]
    fn keeps_order_sizes_memo_flags_and_counts() {
        let shared = Value::list(vec![Value::from(1)]);
        let items = vec![
            taken(Value::from(1), 0),
            taken(Value::from("x".repeat(300)), 3),
            taken(Value::from(2), 0),
            taken(Value::tuple(vec![shared.clone(), shared]), 0),
            taken(Value::from(vec![0u8; 70_000]), 200),
        ];
        let mut p = Packed::default();
        for t in &items[1..] {
            p.push_back(t);
        }
        p.push_front(&items[0]);
        assert_eq!(p.len(), 5);
        for t in &items {
            assert_eq!(p.pop_front().as_ref(), Some(t));
        }
        assert!(p.is_empty() && p.pop_front().is_none());
    }

    #[test]
    fn a_queued_small_int_costs_three_bytes() {
        let mut p = Packed::default();
        let one = taken(Value::from(200), 0);
        for _ in 0..100_000 {
            p.push_back(&one);
        }
        assert_eq!(p.byte_len(), 300_000);
    }
}
