//! LEB128, the variable-length integers of the journal's records (`journal/record.rs`)
//! and of the packed item store's headers (`queues/packed.rs`): seven bits per byte, low
//! bits first, the high bit set on every byte but the last.
//!
//! One implementation for both, so the two formats cannot drift apart on an edge case: a
//! `u64` takes at most [`MAX_LEN`] bytes, a longer run of continuation bytes is malformed,
//! and the bits of a tenth byte past the 64th are dropped (as both always did).

/// The most bytes a `u64` takes.
pub(crate) const MAX_LEN: usize = 10;

/// Writes `v` into `buf` and returns the number of bytes used (1 to [`MAX_LEN`]).
pub(crate) fn encode(mut v: u64, buf: &mut [u8; MAX_LEN]) -> usize {
    let mut n = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf[n] = byte;
            return n + 1;
        }
        buf[n] = byte | 0x80;
        n += 1;
    }
}

/// Appends `v` to `out`.
pub(crate) fn push(out: &mut Vec<u8>, v: u64) {
    let mut buf = [0; MAX_LEN];
    let n = encode(v, &mut buf);
    out.extend_from_slice(&buf[..n]);
}

/// Reads one number from the front of `bytes`; returns it and the bytes it used, or
/// `None` if the bytes end (or [`MAX_LEN`] pass) before a byte without the high bit.
/// Takes an iterator so slices and the packed store's ring buffer read it alike.
pub(crate) fn decode(bytes: impl IntoIterator<Item = u8>) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (n, byte) in bytes.into_iter().take(MAX_LEN).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * n);
        if byte & 0x80 == 0 {
            return Some((v, n + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_every_length_boundary() {
        let mut values = vec![0, 1, u64::MAX];
        for bits in (7..64).step_by(7) {
            values.extend([(1u64 << bits) - 1, 1u64 << bits]);
        }
        for v in values {
            let mut out = Vec::new();
            push(&mut out, v);
            let want_len = (64 - v.leading_zeros() as usize).div_ceil(7).max(1);
            assert_eq!(out.len(), want_len, "{v}");
            out.push(0xff); // what follows is not read
            assert_eq!(decode(out.iter().copied()), Some((v, want_len)), "{v}");
        }
        let mut out = Vec::new();
        push(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }

    #[test]
    fn unterminated_or_overlong_input_is_none() {
        assert_eq!(decode([]), None);
        assert_eq!(decode([0x80, 0x80]), None);
        assert_eq!(decode([0x80; 10].into_iter().chain([0])), None);
        // Ten bytes is the limit; the tenth byte's bits past the 64th are dropped.
        let mut ten = [0xff; 10];
        ten[9] = 0x7f;
        assert_eq!(decode(ten), Some((u64::MAX, 10)));
    }
}
