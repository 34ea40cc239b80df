//! Pre-encoded values: how the server stores queue items.
//!
//! An item is encoded once, when it is put, and from then on only its bytes move: into
//! the queue's packed storage, and from there straight into the reply frame of the `get`
//! that takes it. That makes `get` a copy instead of an encode and keeps a queued small
//! int at a few bytes instead of a decoded tree.

use super::op::*;
use super::{decode, encode_fragment, Value};
use crate::Result;

/// The pickle opcodes of one value, without the protocol header or STOP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment {
    bytes: Vec<u8>,
    uses_memo: bool,
}

impl Fragment {
    /// Encodes `value`.
    ///
    /// # Errors
    /// [`crate::Error::Value`] if the value cannot be pickled (too deep).
    pub fn encode(value: &Value) -> Result<Fragment> {
        let mut bytes = Vec::new();
        let uses_memo = encode_fragment(value, &mut bytes)?;
        Ok(Fragment { bytes, uses_memo })
    }

    /// Rebuilds a fragment from bytes this crate produced earlier (e.g. read back from
    /// the queue's packed storage). The bytes are trusted to be a fragment.
    pub(crate) fn from_parts(bytes: Vec<u8>, uses_memo: bool) -> Fragment {
        Fragment { bytes, uses_memo }
    }

    /// The 2-tuple `(n, item)`, e.g. a lease and its item for `reserve_many`.
    pub(crate) fn paired(n: i64, item: &Fragment) -> Result<Fragment> {
        let mut bytes = Vec::with_capacity(item.bytes.len() + 10);
        super::splice::write_paired(n, item, &mut bytes)?;
        Ok(Fragment {
            bytes,
            uses_memo: item.uses_memo,
        })
    }

    /// The opcodes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the opcodes use memo indices (counting from 0, as `splice.rs` says), so
    /// that splicing it after other fragments means shifting them.
    pub fn uses_memo(&self) -> bool {
        self.uses_memo
    }

    /// Decodes the value back.
    pub fn decode(&self) -> Result<Value> {
        let mut whole = Vec::with_capacity(self.bytes.len() + 3);
        whole.extend_from_slice(&[PROTO, 4]);
        whole.extend_from_slice(&self.bytes);
        whole.push(STOP);
        decode(&whole)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A value of each kind a fragment can be: an int, a str (no memo), and a tuple
    /// sharing a list (memo), with their fragments.
    pub(in crate::pickle) fn samples() -> ([Value; 3], Vec<Fragment>) {
        let shared = Value::list(vec![Value::from(1)]);
        let values = [
            Value::from(7),
            Value::from("x"),
            Value::tuple(vec![shared.clone(), shared]),
        ];
        let frags = values
            .iter()
            .map(|v| Fragment::encode(v).unwrap())
            .collect();
        (values, frags)
    }

    #[test]
    fn fragments_round_trip() {
        let (values, frags) = samples();
        assert!(!frags[0].uses_memo() && frags[2].uses_memo());
        for (f, v) in frags.iter().zip(&values) {
            assert_eq!(&f.decode().unwrap(), v);
        }
        let paired = Fragment::paired(9, &frags[2]).unwrap();
        assert!(paired.uses_memo());
        let want = Value::tuple(vec![Value::from(9), values[2].clone()]);
        assert_eq!(paired.decode().unwrap(), want);
    }
}
