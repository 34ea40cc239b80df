//! Fragments inside larger pickles, and the one rule that makes it safe: no memo index
//! crosses a fragment boundary.
//!
//! A [`Fragment`] numbers its memo entries densely from 0, in the order its opcodes
//! write them, and reads only entries it wrote itself: the encoder starts every fragment
//! at 0, and the scanner renumbers what it cuts out of a request from 0 (copying in
//! whatever the item shared with the rest of its request). Everything that puts a
//! fragment next to other opcodes is in this file, and keeps the rule from the other
//! side: it memoizes nothing of its own before a fragment, so the first fragment of a
//! pickle goes in as it is, and it shifts every later fragment's indices past the
//! entries of those before it ([`splice`], which also refuses a fragment that reads an
//! entry it did not write). The memo opcodes that carry an index ([`put_op`],
//! [`get_op`], [`memo_arg`]) live here too, for the scanner's renumbering.

use super::encode::encode_str;
use super::op::*;
use super::scan::read_op;
use super::{encode_fragment, Fragment, Value};
use crate::{Error, Result};

/// The second element of a pair [`write_pair`] writes.
pub(crate) enum Second<'a> {
    /// A value, encoded here (its memo entries, if any, are the pickle's last).
    Value(&'a Value),
    /// A str, encoded here.
    Str(&'a str),
    /// A stored fragment, as it is.
    Fragment(&'a Fragment),
    /// A list of stored fragments, each shifted past those before it.
    List(&'a [Fragment]),
    /// The 2-tuple `(n, fragment)`: an int is never memoized, so the fragment goes in
    /// as it is.
    Paired(i64, &'a Fragment),
}

/// Appends the protocol-4 pickle of the 2-tuple `(first, second)` to `out`.
///
/// `first` is never memoized, so `second` starts at memo index 0 and a fragment in it
/// goes in as it is.
///
/// # Errors
/// [`Error::Value`] if `second` holds a value that cannot be pickled;
/// [`Error::Internal`] for a fragment that breaks the memo rule. `out` may then hold a
/// partial pickle and must be discarded.
#[inline]
pub(crate) fn write_pair(first: &str, second: Second<'_>, out: &mut Vec<u8>) -> Result<()> {
    // `encode_str` unrolled for the short str every reply starts with: ~30 instructions
    // a reply.
    match u8::try_from(first.len()) {
        Ok(len) => {
            out.extend_from_slice(&[PROTO, 4, SHORT_BINUNICODE, len]);
            out.extend_from_slice(first.as_bytes());
        }
        Err(_) => {
            out.extend_from_slice(&[PROTO, 4]);
            encode_str(first, out);
        }
    }
    match second {
        Second::Value(v) => {
            encode_fragment(v, out)?;
        }
        Second::Str(s) => encode_str(s, out),
        Second::Fragment(f) => out.extend_from_slice(f.bytes()),
        Second::List(items) => write_list(items, out)?,
        Second::Paired(n, f) => write_paired(n, f, out)?,
    }
    out.extend_from_slice(&PAIR_END);
    Ok(())
}

/// What [`write_pair`] writes after its second element: TUPLE2, STOP.
const PAIR_END: [u8; 2] = [TUPLE2, STOP];

/// What [`write_pair`] writes before its second element, for a `first` known when
/// compiling: a pair with a large fragment is then written from where the fragment is
/// ([`PairHead::parts`]) instead of copied next to its head.
pub(crate) struct PairHead<const N: usize>([u8; N]);

impl<const N: usize> PairHead<N> {
    /// The head of `(first, ...)`, `N` being `first`'s length plus 4 (anything else, or
    /// a `first` longer than 255 bytes, fails to compile).
    pub(crate) const fn new(first: &str) -> PairHead<N> {
        let s = first.as_bytes();
        assert!(s.len() <= 255 && N == s.len() + 4);
        let head = [PROTO, 4, SHORT_BINUNICODE, s.len() as u8];
        let mut bytes = [0; N];
        let mut i = 0;
        while i < N {
            bytes[i] = if i < head.len() {
                head[i]
            } else {
                s[i - head.len()]
            };
            i += 1;
        }
        PairHead(bytes)
    }

    /// The pickle `(first, item)` as its head, the item and its end: what
    /// [`write_pair`] writes for [`Second::Fragment`], in three parts.
    pub(crate) fn parts<'a>(&'a self, item: &'a Fragment) -> [&'a [u8]; 3] {
        [&self.0, item.bytes(), &PAIR_END]
    }
}

/// Appends the 2-tuple `(n, item)` to `out`, as one value.
pub(super) fn write_paired(n: i64, item: &Fragment, out: &mut Vec<u8>) -> Result<()> {
    encode_fragment(&Value::Int(n), out)?;
    out.extend_from_slice(item.bytes());
    out.push(TUPLE2);
    Ok(())
}

/// Appends a list of fragments to `out` as one list value.
fn write_list(items: &[Fragment], out: &mut Vec<u8>) -> Result<()> {
    out.push(EMPTY_LIST);
    let mut memo = 0;
    for batch in items.chunks(BATCH) {
        out.push(MARK);
        for item in batch {
            memo += splice(item, memo, out)?;
        }
        out.push(APPENDS);
    }
    Ok(())
}

/// Appends `frag` to `out` as if the memo already held `offset` entries, and returns
/// how many entries it adds.
fn splice(frag: &Fragment, offset: u32, out: &mut Vec<u8>) -> Result<u32> {
    let bytes = frag.bytes();
    if !frag.uses_memo() {
        out.extend_from_slice(bytes);
        return Ok(0);
    }
    let mut added = 0;
    let mut pos = 0;
    while pos < bytes.len() {
        let (op, arg, next) = read_op(bytes, pos)?;
        match op {
            MEMOIZE | BINPUT | LONG_BINPUT => {
                if op != MEMOIZE && memo_arg(op, &bytes[arg..next]) != added {
                    return Err(crosses(memo_arg(op, &bytes[arg..next])));
                }
                out.extend_from_slice(&put_op(shifted(added, offset)?));
                added += 1;
            }
            BINGET | LONG_BINGET => {
                let idx = memo_arg(op, &bytes[arg..next]);
                if idx >= added {
                    return Err(crosses(idx));
                }
                out.extend_from_slice(&get_op(shifted(idx, offset)?))
            }
            _ => out.extend_from_slice(&bytes[pos..next]),
        }
        pos = next;
    }
    Ok(added)
}

fn shifted(idx: u32, offset: u32) -> Result<u32> {
    idx.checked_add(offset)
        .ok_or_else(|| Error::Value("more than 2^32 memo entries in one reply".into()))
}

/// A fragment that breaks the memo rule: spliced, it would read a neighbour's entry.
fn crosses(idx: u32) -> Error {
    Error::Internal(format!(
        "a stored fragment uses memo index {idx} out of its own order"
    ))
}

/// A memo opcode with an index: the one-byte form when it fits.
pub(super) struct MemoOp {
    bytes: [u8; 5],
    len: usize,
}

impl std::ops::Deref for MemoOp {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn memo_op([short, long]: [u8; 2], n: u32) -> MemoOp {
    match u8::try_from(n) {
        Ok(small) => MemoOp {
            bytes: [short, small, 0, 0, 0],
            len: 2,
        },
        Err(_) => {
            let [a, b, c, d] = n.to_le_bytes();
            MemoOp {
                bytes: [long, a, b, c, d],
                len: 5,
            }
        }
    }
}

/// BINPUT or LONG_BINPUT of `n`.
pub(super) fn put_op(n: u32) -> MemoOp {
    memo_op([BINPUT, LONG_BINPUT], n)
}

/// BINGET or LONG_BINGET of `n`.
pub(super) fn get_op(n: u32) -> MemoOp {
    memo_op([BINGET, LONG_BINGET], n)
}

/// The index a BINPUT/BINGET (`arg` one byte) or LONG_BINPUT/LONG_BINGET (four) names.
pub(super) fn memo_arg(op: u8, arg: &[u8]) -> u32 {
    match op {
        BINGET | BINPUT => u32::from(arg[0]),
        _ => u32::from_le_bytes([arg[0], arg[1], arg[2], arg[3]]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::decode;

    fn pair(first: &str, second: Second<'_>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        write_pair(first, second, &mut out).map(|()| out)
    }

    #[test]
    fn splicing_shifts_memo_indices() {
        let f = Fragment::from_parts(b"]\x94h\x00a".to_vec(), true);
        let mut out = Vec::new();
        assert_eq!(splice(&f, 300, &mut out).unwrap(), 1);
        assert_eq!(out, b"]r\x2c\x01\x00\x00j\x2c\x01\x00\x00a");
    }

    #[test]
    fn a_fragment_reading_outside_its_own_entries_is_refused() {
        // A GET before the PUT it names, a GET of an entry never written, a PUT out of
        // order: each would read or overwrite a neighbour's entry once shifted.
        for bytes in [&b"h\x00]\x94a"[..], b"]\x94h\x01a", b"]q\x01h\x01a"] {
            let f = Fragment::from_parts(bytes.to_vec(), true);
            let err = write_list(&[f.clone(), f], &mut Vec::new()).unwrap_err();
            assert!(matches!(err, Error::Internal(_)), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn fragments_splice_into_lists_and_pairs() {
        let (values, frags) = crate::pickle::fragment::tests::samples();
        let tag = Value::str("tag");
        // The last list has two fragments that use the memo: the second is shifted.
        let twice = [frags[2].clone(), frags[0].clone(), frags[2].clone()];
        for items in [&frags[..2], &frags[..], &frags[1..], &[][..], &twice[..]] {
            let want = Value::list(items.iter().map(|f| f.decode().unwrap()).collect());
            let got = decode(&pair("tag", Second::List(items)).unwrap()).unwrap();
            assert_eq!(got, Value::tuple(vec![tag.clone(), want]));
        }
        // Decoded, an unshifted copy would read the same (its PUT rebinds index 0), so
        // the shift is pinned as bytes.
        let spliced = b"](]q\x00K\x01ah\x00\x86K\x07]q\x01K\x01ah\x01\x86e";
        let bytes = pair("tag", Second::List(&twice)).unwrap();
        assert!(
            bytes.windows(spliced.len()).any(|w| w == spliced),
            "{bytes:02x?}"
        );
        for (f, v) in frags.iter().zip(&values) {
            let got = decode(&pair("tag", Second::Fragment(f)).unwrap()).unwrap();
            assert_eq!(got, Value::tuple(vec![tag.clone(), v.clone()]));
            let got = decode(&pair("tag", Second::Paired(-3, f)).unwrap()).unwrap();
            let paired = Value::tuple(vec![Value::from(-3), v.clone()]);
            assert_eq!(got, Value::tuple(vec![tag.clone(), paired]));
        }
    }

    #[test]
    fn a_pair_in_parts_is_the_pair() {
        const HEAD: PairHead<9> = PairHead::new("#TAG0");
        let item = Fragment::encode(&Value::list(vec![Value::from(1), Value::str("x")])).unwrap();
        let whole = pair("#TAG0", Second::Fragment(&item)).unwrap();
        assert_eq!(HEAD.parts(&item).concat(), whole);
    }

    #[test]
    fn values_and_strs_are_encoded_in_place() {
        let long = "é".repeat(200);
        for s in ["", "a short one", &long] {
            let v = Value::str(s);
            assert_eq!(
                pair(&long, Second::Str(s)).unwrap(),
                pair(&long, Second::Value(&v)).unwrap()
            );
            let got = decode(&pair(s, Second::Str(s)).unwrap()).unwrap();
            assert_eq!(got, Value::tuple(vec![v.clone(), v]));
        }
    }
}
