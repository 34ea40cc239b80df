//! The pickle encoder: writes a [`Value`] as a protocol-4 pickle.
//!
//! The output is what CPython's pickler would write at protocol 4, minus FRAME (optional
//! for readers: `../shared/python-wire.md` §4.3, beside the repository) and minus memo
//! entries for objects that occur only once: the smallest int/str/bytes opcodes, batches of 1000 for lists, dicts and sets,
//! and `builtins.bytearray(bytes)` via REDUCE for bytearrays (what 3.8–3.13 emit at
//! protocol 4; BYTEARRAY8 would need protocol 5).
//!
//! Sharing is preserved: an `Arc` that is referenced more than once (`strong_count > 1`,
//! a cheap over-approximation of "occurs twice in this value") is memoized on first
//! emission and written as BINGET/LONG_BINGET afterwards, so Python rebuilds the same
//! object graph and a shared DAG stays linear in size. This is the server's hot path
//! (every reply), so nothing is allocated beyond the growth of `out` unless a shared
//! node is met, which creates the memo table.

use super::op::*;
use super::{Construct, Global, Object, Value, MAX_DEPTH};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// Encodes a value as a protocol-4 pickle.
pub fn encode(value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Appends the pickle of `value` to `out`.
///
/// # Errors
/// [`Error::Value`] if the value nests deeper than [`MAX_DEPTH`] or holds an int or
/// string too long for the pickle format; `out` is then left as it was.
pub fn encode_into(value: &Value, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[PROTO, 4]);
    match encode_fragment(value, out) {
        Ok(_) => {
            out.push(STOP);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Appends the opcodes of `value` alone (no PROTO header, no STOP) to `out`, and returns
/// whether they use the memo.
///
/// A fragment can be spliced into a larger pickle as one element: that is how the server
/// stores queue items (encoded once on `put`, copied on `get`, never re-encoded). Its
/// memo indices count from 0, as `splice.rs` requires of every fragment.
///
/// # Errors
/// As [`encode_into`]; `out` is then left as it was.
pub fn encode_fragment(value: &Value, out: &mut Vec<u8>) -> Result<bool> {
    let start = out.len();
    let mut enc = Encoder {
        out,
        memo: None,
        next_memo: 0,
    };
    match enc.value(value, 0) {
        Ok(()) => Ok(enc.next_memo > 0),
        Err(e) => {
            enc.out.truncate(start);
            Err(e)
        }
    }
}

/// Identity of a shared node: the address of the `Arc`'s data plus the variant, because
/// one `Arc` may legitimately back two variants (the decoder shares a `bytes` buffer with
/// the `bytearray` built from it, and a caller may reuse a slice as tuple and list).
type MemoKey = (usize, u8);

struct Encoder<'o> {
    out: &'o mut Vec<u8>,
    /// Created on the first shared node; maps it to its memo index.
    memo: Option<HashMap<MemoKey, u32>>,
    /// The index the next MEMOIZE assigns (Python's `len(memo)`).
    next_memo: u32,
}

/// Kinds of shareable nodes, for [`MemoKey`].
#[derive(Clone, Copy)]
enum Kind {
    BigInt,
    Str,
    Bytes,
    ByteArray,
    Tuple,
    List,
    Dict,
    Set,
    FrozenSet,
    Global,
    Object,
}

/// A node that may be memoized: its key if it is shared, `None` if it occurs only once.
///
/// Empty slices are never memoized: they are cheap to repeat and zero-length `Arc`s may
/// share one static allocation, so their address says nothing about identity. The root
/// (`depth == 0`) cannot occur again inside itself, so it is never memoized either.
fn shared_key<T: ?Sized>(arc: &Arc<T>, empty: bool, kind: Kind, depth: usize) -> Option<MemoKey> {
    (depth > 0 && !empty && Arc::strong_count(arc) > 1)
        .then(|| (Arc::as_ptr(arc).cast::<u8>() as usize, kind as u8))
}

impl Encoder<'_> {
    /// Writes `v`, found inside `depth` containers.
    ///
    /// Each container kind has its own small method so that this recursive path keeps
    /// small stack frames even in debug builds ([`MAX_DEPTH`] levels must fit a thread).
    fn value(&mut self, v: &Value, depth: usize) -> Result<()> {
        match v {
            Value::Tuple(items) => self.tuple(items, depth),
            Value::List(items) => self.list(items, depth),
            Value::Dict(pairs) => self.dict(pairs, depth),
            Value::Set(items) => self.set(items, depth),
            Value::FrozenSet(items) => self.frozenset(items, depth),
            Value::Object(o) => self.object(o, depth),
            leaf => self.leaf(leaf, depth),
        }
    }

    /// Writes a value without children.
    fn leaf(&mut self, v: &Value, depth: usize) -> Result<()> {
        match v {
            Value::None => self.out.push(NONE),
            Value::Bool(true) => self.out.push(NEWTRUE),
            Value::Bool(false) => self.out.push(NEWFALSE),
            Value::Int(n) => self.int(*n),
            Value::Float(x) => {
                self.out.push(BINFLOAT);
                self.out.extend_from_slice(&x.to_be_bytes());
            }
            Value::BigInt(b) => {
                let key = shared_key(b, b.is_empty(), Kind::BigInt, depth);
                if !self.get(key) {
                    self.long(b)?;
                    self.memoize(key)?;
                }
            }
            Value::Str(s) => {
                let key = shared_key(s, s.is_empty(), Kind::Str, depth);
                if !self.get(key) {
                    self.str(s);
                    self.memoize(key)?;
                }
            }
            Value::Bytes(b) => {
                let key = shared_key(b, b.is_empty(), Kind::Bytes, depth);
                if !self.get(key) {
                    self.bytes(b);
                    self.memoize(key)?;
                }
            }
            Value::ByteArray(b) => {
                let key = shared_key(b, b.is_empty(), Kind::ByteArray, depth);
                if !self.get(key) {
                    self.global("builtins", "bytearray");
                    self.bytes(b);
                    self.out.extend_from_slice(&[TUPLE1, REDUCE]);
                    self.memoize(key)?;
                }
            }
            Value::Global(g) => {
                let key = shared_key(g, false, Kind::Global, depth);
                if !self.get(key) {
                    let Global { module, name } = &**g;
                    self.global(module, name);
                    self.memoize(key)?;
                }
            }
            Value::Tuple(_)
            | Value::List(_)
            | Value::Dict(_)
            | Value::Set(_)
            | Value::FrozenSet(_)
            | Value::Object(_) => return self.value(v, depth),
        }
        Ok(())
    }

    fn tuple(&mut self, items: &Arc<[Value]>, depth: usize) -> Result<()> {
        let key = shared_key(items, items.is_empty(), Kind::Tuple, depth);
        if self.get(key) {
            return Ok(());
        }
        let inner = nested(depth)?;
        match items.len() {
            0 => self.out.push(EMPTY_TUPLE),
            n @ 1..=3 => {
                self.values(items, inner)?;
                self.out.push([TUPLE1, TUPLE2, TUPLE3][n - 1]);
            }
            _ => {
                self.out.push(MARK);
                self.values(items, inner)?;
                self.out.push(TUPLE);
            }
        }
        self.memoize(key)
    }

    fn list(&mut self, items: &Arc<[Value]>, depth: usize) -> Result<()> {
        let key = shared_key(items, items.is_empty(), Kind::List, depth);
        if self.get(key) {
            return Ok(());
        }
        let inner = nested(depth)?;
        self.out.push(EMPTY_LIST);
        self.memoize(key)?;
        for batch in items.chunks(BATCH) {
            if let [item] = batch {
                self.value(item, inner)?;
                self.out.push(APPEND);
            } else {
                self.out.push(MARK);
                self.values(batch, inner)?;
                self.out.push(APPENDS);
            }
        }
        Ok(())
    }

    fn dict(&mut self, pairs: &Arc<[(Value, Value)]>, depth: usize) -> Result<()> {
        let key = shared_key(pairs, pairs.is_empty(), Kind::Dict, depth);
        if self.get(key) {
            return Ok(());
        }
        let inner = nested(depth)?;
        self.out.push(EMPTY_DICT);
        self.memoize(key)?;
        for batch in pairs.chunks(BATCH) {
            let single = batch.len() == 1;
            if !single {
                self.out.push(MARK);
            }
            for (k, v) in batch {
                self.value(k, inner)?;
                self.value(v, inner)?;
            }
            self.out.push(if single { SETITEM } else { SETITEMS });
        }
        Ok(())
    }

    fn set(&mut self, items: &Arc<[Value]>, depth: usize) -> Result<()> {
        let key = shared_key(items, items.is_empty(), Kind::Set, depth);
        if self.get(key) {
            return Ok(());
        }
        let inner = nested(depth)?;
        self.out.push(EMPTY_SET);
        self.memoize(key)?;
        for batch in items.chunks(BATCH) {
            self.out.push(MARK);
            self.values(batch, inner)?;
            self.out.push(ADDITEMS);
        }
        Ok(())
    }

    fn frozenset(&mut self, items: &Arc<[Value]>, depth: usize) -> Result<()> {
        let key = shared_key(items, items.is_empty(), Kind::FrozenSet, depth);
        if self.get(key) {
            return Ok(());
        }
        let inner = nested(depth)?;
        self.out.push(MARK);
        self.values(items, inner)?;
        self.out.push(FROZENSET);
        self.memoize(key)
    }

    fn object(&mut self, o: &Arc<Object>, depth: usize) -> Result<()> {
        let key = shared_key(o, false, Kind::Object, depth);
        if self.get(key) {
            return Ok(());
        }
        let inner = nested(depth)?;
        self.value(&o.callable, inner)?;
        self.value(&o.args, inner)?;
        self.out.push(match o.construct {
            Construct::Reduce => REDUCE,
            Construct::NewObj => NEWOBJ,
        });
        // Memoize before BUILD, as Python does: BUILD mutates this very object.
        self.memoize(key)?;
        if let Some(state) = &o.state {
            self.value(state, inner)?;
            self.out.push(BUILD);
        }
        Ok(())
    }

    fn values(&mut self, items: &[Value], depth: usize) -> Result<()> {
        items.iter().try_for_each(|item| self.value(item, depth))
    }

    /// Writes a memo reference if `key` was memoized already; returns whether it did.
    fn get(&mut self, key: Option<MemoKey>) -> bool {
        let Some(idx) = key.and_then(|k| self.memo.as_ref()?.get(&k).copied()) else {
            return false;
        };
        match u8::try_from(idx) {
            Ok(small) => self.out.extend_from_slice(&[BINGET, small]),
            Err(_) => {
                self.out.push(LONG_BINGET);
                self.out.extend_from_slice(&idx.to_le_bytes());
            }
        }
        true
    }

    /// Memoizes the object on top of the stack if it is shared.
    fn memoize(&mut self, key: Option<MemoKey>) -> Result<()> {
        let Some(key) = key else { return Ok(()) };
        let idx = self.next_memo;
        self.next_memo = idx
            .checked_add(1)
            .ok_or_else(|| Error::Value("more than 2**32 shared objects in one pickle".into()))?;
        self.memo.get_or_insert_with(HashMap::new).insert(key, idx);
        self.out.push(MEMOIZE);
        Ok(())
    }

    fn int(&mut self, n: i64) {
        if let Ok(small) = u8::try_from(n) {
            self.out.extend_from_slice(&[BININT1, small]);
        } else if let Ok(mid) = u16::try_from(n) {
            self.out.push(BININT2);
            self.out.extend_from_slice(&mid.to_le_bytes());
        } else if let Ok(word) = i32::try_from(n) {
            self.out.push(BININT);
            self.out.extend_from_slice(&word.to_le_bytes());
        } else {
            let bytes = n.to_le_bytes();
            let len = minimal_len(&bytes);
            self.out.push(LONG1);
            // `len` is 5..=8 here: anything shorter fits in an i32.
            self.out.push(len as u8);
            self.out
                .extend_from_slice(bytes.get(..len).unwrap_or(&bytes));
        }
    }

    fn long(&mut self, b: &[u8]) -> Result<()> {
        if let Ok(len) = u8::try_from(b.len()) {
            self.out.extend_from_slice(&[LONG1, len]);
        } else {
            let len = i32::try_from(b.len())
                .map_err(|_| Error::Value("int too large to pickle (over 2 GiB)".into()))?;
            self.out.push(LONG4);
            self.out.extend_from_slice(&len.to_le_bytes());
        }
        self.out.extend_from_slice(b);
        Ok(())
    }

    fn str(&mut self, s: &str) {
        encode_str(s, self.out);
    }

    fn bytes(&mut self, b: &[u8]) {
        sized(b, [SHORT_BINBYTES, BINBYTES, BINBYTES8], self.out);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.str(module);
        self.str(name);
        self.out.push(STACK_GLOBAL);
    }
}

/// Appends the opcodes of the str `s`, unmemoized: what [`encode_fragment`] writes for
/// `Value::str(s)`, without making the value.
pub(super) fn encode_str(s: &str, out: &mut Vec<u8>) {
    sized(
        s.as_bytes(),
        [SHORT_BINUNICODE, BINUNICODE, BINUNICODE8],
        out,
    );
}

/// Writes a payload with the smallest of the u8/u32/u64-length opcodes.
fn sized(payload: &[u8], [short, long, huge]: [u8; 3], out: &mut Vec<u8>) {
    if let Ok(len) = u8::try_from(payload.len()) {
        out.extend_from_slice(&[short, len]);
    } else if let Ok(len) = u32::try_from(payload.len()) {
        out.push(long);
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        out.push(huge);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(payload);
}

/// The depth of a container's children, or an error if the container is one too many.
fn nested(depth: usize) -> Result<usize> {
    if depth >= MAX_DEPTH {
        return Err(Error::Value(format!(
            "value nests containers deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(depth + 1)
}

/// Length of the minimal little-endian two's complement form of `bytes` (at least 1).
fn minimal_len(bytes: &[u8]) -> usize {
    let mut len = bytes.len();
    while let (Some(&last), Some(&prev)) = (
        bytes.get(len.wrapping_sub(1)),
        bytes.get(len.wrapping_sub(2)),
    ) {
        if (last == 0 && prev < 0x80) || (last == 0xff && prev >= 0x80) {
            len -= 1;
        } else {
            break;
        }
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::decode;

    fn big(bytes: &[u8]) -> Value {
        Value::BigInt(Arc::from(bytes))
    }

    /// One value of every variant, including ints at every opcode boundary.
    fn samples() -> Vec<Value> {
        let mut neg100 = vec![0u8; 12];
        neg100.push(0xf0); // -2**100
        let mut huge = vec![0x5a; 300];
        huge.push(0x01); // > 255 bytes: LONG4
        let exc = Value::Object(Arc::new(Object {
            construct: Construct::Reduce,
            callable: Value::global("builtins", "AttributeError"),
            args: Value::tuple(vec![Value::str("x")]),
            state: Some(Value::dict(vec![(Value::str("name"), Value::str("zzz"))])),
        }));
        let newobj = Value::Object(Arc::new(Object {
            construct: Construct::NewObj,
            callable: Value::global("multiprocessing.managers", "Token"),
            args: Value::tuple(vec![]),
            state: None,
        }));
        let ints = [
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -256,
            i64::from(i32::MAX),
            i64::from(i32::MIN),
            i64::from(i32::MAX) + 1,
            i64::from(i32::MIN) - 1,
            i64::MAX,
            i64::MIN,
        ];
        let mut v: Vec<Value> = ints.into_iter().map(Value::Int).collect();
        v.extend([
            Value::None,
            Value::Bool(true),
            Value::Bool(false),
            big(&[0, 0, 0, 0, 0, 0, 0, 0, 0x40]), // 2**70
            big(&[0, 0, 0, 0, 0, 0, 0, 0, 0xc0]), // -2**70
            big(&neg100),
            big(&huge),
            Value::Float(3.5),
            Value::Float(-0.0),
            Value::Float(f64::INFINITY),
            Value::str(""),
            Value::str("héllo 😀"),
            Value::str(&"s".repeat(300)),
            Value::from(Vec::new()),
            Value::from(b"\x00\xff".to_vec()),
            Value::from(vec![7u8; 70_000]),
            Value::ByteArray(Arc::from(&b""[..])),
            Value::ByteArray(Arc::from(&b"ab"[..])),
            Value::tuple(vec![]),
            Value::tuple(vec![Value::Int(1)]),
            Value::tuple(vec![Value::Int(1), Value::Int(2)]),
            Value::tuple(vec![Value::Int(1), Value::Int(2), Value::Int(3)]),
            Value::tuple((0..5).map(Value::Int).collect()),
            Value::list(vec![]),
            Value::list(vec![Value::None]),
            Value::list((0..1001).map(Value::Int).collect()),
            Value::dict(vec![]),
            Value::dict(vec![(Value::str("k"), Value::Int(1))]),
            Value::dict((0..1001).map(|i| (Value::Int(i), Value::None)).collect()),
            Value::Set(Arc::from(vec![])),
            Value::Set(Arc::from((0..2001).map(Value::Int).collect::<Vec<_>>())),
            Value::FrozenSet(Arc::from(vec![])),
            Value::FrozenSet(Arc::from(vec![Value::Int(3)])),
            Value::global("queue", "Full"),
            Value::global("m", &"n".repeat(300)),
            Value::exception("queue", "Full", vec![]),
            Value::exception("builtins", "KeyError", vec![Value::str("missing")]),
            exc,
            newobj,
        ]);
        let nested = Value::dict(vec![(
            Value::str("a"),
            Value::list(vec![
                Value::tuple(vec![Value::Int(1), Value::None]),
                Value::from(b"x".to_vec()),
                Value::Float(2.25),
            ]),
        )]);
        v.push(nested);
        v
    }

    #[test]
    fn round_trips_every_variant() {
        for v in samples() {
            let bytes = encode(&v).unwrap();
            assert_eq!(&bytes[..2], &[PROTO, 4]);
            assert_eq!(bytes.last(), Some(&STOP));
            assert_eq!(decode(&bytes).unwrap(), v, "{v}");
        }
        let all = Value::list(samples());
        assert_eq!(decode(&encode(&all).unwrap()).unwrap(), all);
    }

    #[test]
    fn smallest_opcodes() {
        let cases: [(Value, &[u8]); 12] = [
            (Value::None, b"N"),
            (Value::Int(255), b"K\xff"),
            (Value::Int(256), b"M\x00\x01"),
            (Value::Int(-1), b"J\xff\xff\xff\xff"),
            (Value::Int(1 << 31), b"\x8a\x05\x00\x00\x00\x80\x00"),
            (
                Value::Int(i64::MIN),
                b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80",
            ),
            (Value::Float(2.25), b"G\x40\x02\x00\x00\x00\x00\x00\x00"),
            (Value::str("ab"), b"\x8c\x02ab"),
            (Value::tuple(vec![]), b")"),
            (Value::list(vec![Value::None]), b"]Na"),
            (
                Value::ByteArray(Arc::from(&b"z"[..])),
                b"\x8c\x08builtins\x8c\x09bytearray\x93C\x01z\x85R",
            ),
            (
                Value::Set(Arc::from(vec![Value::None, Value::None])),
                b"\x8f(NN\x90",
            ),
        ];
        for (v, body) in cases {
            let bytes = encode(&v).unwrap();
            assert_eq!(&bytes[2..bytes.len() - 1], body, "{v}");
        }
    }

    #[test]
    fn reply_matches_section_4_3() {
        let reply = Value::tuple(vec![Value::str("#RETURN"), Value::Int(2201)]);
        assert_eq!(
            encode(&reply).unwrap(),
            b"\x80\x04\x8c\x07#RETURN\x4d\x99\x08\x86."
        );
        let empty = Value::tuple(vec![
            Value::str("#ERROR"),
            Value::exception("_queue", "Empty", vec![]),
        ]);
        assert_eq!(
            encode(&empty).unwrap(),
            b"\x80\x04\x8c\x06#ERROR\x8c\x06_queue\x8c\x05Empty\x93)R\x86."
        );
    }

    #[test]
    fn shared_nodes_are_memoized_once() {
        let blob = Value::from(vec![1u8; 1 << 20]);
        let list = Value::list(vec![blob.clone(); 1000]);
        drop(blob);
        let bytes = encode(&list).unwrap();
        assert!(bytes.len() < (1 << 20) + 3000, "{} bytes", bytes.len());
        let Value::List(items) = decode(&bytes).unwrap() else {
            panic!("not a list")
        };
        let Value::Bytes(first) = &items[0] else {
            panic!("not bytes")
        };
        assert!(items
            .iter()
            .all(|v| matches!(v, Value::Bytes(b) if Arc::ptr_eq(b, first))));

        // A shared list is memoized before its items, a shared tuple after TUPLE, and
        // memo indices above 255 use LONG_BINGET.
        let shared_list = Value::list(vec![Value::Int(1)]);
        let shared_tuple = Value::tuple(vec![Value::Int(2)]);
        let many: Vec<Value> = (0..300).map(|i| Value::str(&i.to_string())).collect();
        let mut items: Vec<Value> = many.iter().flat_map(|s| [s.clone(), s.clone()]).collect();
        items.extend([shared_list.clone(), shared_tuple.clone()]);
        items.extend([shared_list, shared_tuple]);
        let v = Value::list(items);
        let bytes = encode(&v).unwrap();
        assert!(bytes.contains(&LONG_BINGET));
        assert!(bytes.windows(2).any(|w| w == [EMPTY_LIST, MEMOIZE]));
        assert!(bytes.windows(2).any(|w| w == [TUPLE1, MEMOIZE]));
        assert_eq!(decode(&bytes).unwrap(), v);
    }

    #[test]
    fn sharing_survives_a_round_trip() {
        // Python's 3.12 AttributeError: BUILD state refers to the args tuple (BINGET).
        let args = Value::tuple(vec![Value::str("msg")]);
        let obj = Value::Object(Arc::new(Object {
            construct: Construct::Reduce,
            callable: Value::global("builtins", "AttributeError"),
            args: args.clone(),
            state: Some(Value::dict(vec![(Value::str("args"), args)])),
        }));
        let v = Value::tuple(vec![obj.clone(), obj]);
        let bytes = encode(&v).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back, v);
        let [Value::Object(a), Value::Object(b)] = back.as_tuple().unwrap() else {
            panic!("shape")
        };
        assert!(Arc::ptr_eq(a, b));
        let (Value::Tuple(x), Some(Value::Dict(state))) = (&a.args, &a.state) else {
            panic!("shape")
        };
        assert!(matches!(&state[0].1, Value::Tuple(y) if Arc::ptr_eq(x, y)));
        // Bytes and the bytearray built from them may share one buffer: two memo keys.
        let buf: Arc<[u8]> = Arc::from(&b"xy"[..]);
        let v = Value::list(vec![
            Value::Bytes(buf.clone()),
            Value::ByteArray(buf.clone()),
            Value::Bytes(buf.clone()),
            Value::ByteArray(buf),
        ]);
        assert_eq!(decode(&encode(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn shared_dag_encodes_linearly() {
        // 2**60 leaves as a tree, 60 nodes as a DAG: encodes small (the decoder then
        // refuses it as a "billion laughs"; 2**20 decodes back shared).
        let chain = |levels: usize| {
            (0..levels).fold(Value::list(vec![Value::str("x")]), |v, _| {
                Value::list(vec![v.clone(), v])
            })
        };
        let bytes = encode(&chain(60)).unwrap();
        assert!(bytes.len() < 1000, "{} bytes", bytes.len());
        assert!(decode(&bytes).is_err());
        let mut back = decode(&encode(&chain(20)).unwrap()).unwrap();
        for _ in 0..20 {
            let Value::List(pair) = back else {
                panic!("shape")
            };
            assert!(
                matches!((&pair[0], &pair[1]), (Value::List(a), Value::List(b)) if Arc::ptr_eq(a, b))
            );
            back = pair[0].clone();
        }
    }

    #[test]
    fn depth_limit_matches_the_decoder() {
        let nest = |n: usize| (0..n).fold(Value::None, |v, _| Value::list(vec![v]));
        let ok = nest(MAX_DEPTH);
        assert_eq!(decode(&encode(&ok).unwrap()).unwrap(), ok);
        let mut out = b"prefix".to_vec();
        let err = encode_into(&nest(MAX_DEPTH + 1), &mut out).unwrap_err();
        assert!(
            matches!(err, Error::Value(ref m) if m.contains("deeper than")),
            "{err}"
        );
        assert_eq!(out, b"prefix", "output restored on error");
    }
}
