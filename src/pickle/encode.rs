//! The pickle encoder: writes a [`Value`] as a protocol-4 pickle.
//!
//! The output is what CPython's pickler would write at protocol 4, minus FRAME (optional
//! for readers, `python-wire.md` §4.3) and minus memo entries for objects that occur only
//! once: the smallest int/str/bytes opcodes, batches of 1000 for lists, dicts and sets,
//! and `builtins.bytearray(bytes)` via REDUCE for bytearrays (what 3.8–3.13 emit at
//! protocol 4; BYTEARRAY8 would need protocol 5).
//!
//! Sharing is preserved: an `Arc` that is referenced more than once (`strong_count > 1`,
//! a cheap over-approximation of "occurs twice in this value") is memoized on first
//! emission and written as BINGET/LONG_BINGET afterwards, so Python rebuilds the same
//! object graph and a shared DAG stays linear in size. This is the server's hot path
//! (every reply), so nothing is allocated beyond the growth of `out` unless a shared
//! node is met, which creates the memo table.

use super::{Construct, Global, Object, Value, MAX_DEPTH};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MEMOIZE: u8 = 0x94;
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const MARK: u8 = b'(';
const EMPTY_TUPLE: u8 = b')';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const TUPLE: u8 = b't';
const EMPTY_LIST: u8 = b']';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const EMPTY_DICT: u8 = b'}';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const EMPTY_SET: u8 = 0x8f;
const ADDITEMS: u8 = 0x90;
const FROZENSET: u8 = 0x91;
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const BINFLOAT: u8 = b'G';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const BINUNICODE8: u8 = 0x8d;
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES: u8 = b'B';
const BINBYTES8: u8 = 0x8e;
const STACK_GLOBAL: u8 = 0x93;
const REDUCE: u8 = b'R';
const NEWOBJ: u8 = 0x81;
const BUILD: u8 = b'b';

/// Items per APPENDS/SETITEMS/ADDITEMS batch, as CPython's pickler uses.
const BATCH: usize = 1000;

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
    let mut enc = Encoder {
        out,
        memo: None,
        next_memo: 0,
    };
    match enc.value(value, 0) {
        Ok(()) => {
            enc.out.push(STOP);
            Ok(())
        }
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
    fn value(&mut self, v: &Value, depth: usize) -> Result<()> {
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
            Value::Tuple(items) => {
                let key = shared_key(items, items.is_empty(), Kind::Tuple, depth);
                if !self.get(key) {
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
                    self.memoize(key)?;
                }
            }
            Value::List(items) => {
                let key = shared_key(items, items.is_empty(), Kind::List, depth);
                if !self.get(key) {
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
                }
            }
            Value::Dict(pairs) => {
                let key = shared_key(pairs, pairs.is_empty(), Kind::Dict, depth);
                if !self.get(key) {
                    let inner = nested(depth)?;
                    self.out.push(EMPTY_DICT);
                    self.memoize(key)?;
                    for batch in pairs.chunks(BATCH) {
                        if let [(k, v)] = batch {
                            self.value(k, inner)?;
                            self.value(v, inner)?;
                            self.out.push(SETITEM);
                        } else {
                            self.out.push(MARK);
                            for (k, v) in batch {
                                self.value(k, inner)?;
                                self.value(v, inner)?;
                            }
                            self.out.push(SETITEMS);
                        }
                    }
                }
            }
            Value::Set(items) => {
                let key = shared_key(items, items.is_empty(), Kind::Set, depth);
                if !self.get(key) {
                    let inner = nested(depth)?;
                    self.out.push(EMPTY_SET);
                    self.memoize(key)?;
                    for batch in items.chunks(BATCH) {
                        self.out.push(MARK);
                        self.values(batch, inner)?;
                        self.out.push(ADDITEMS);
                    }
                }
            }
            Value::FrozenSet(items) => {
                let key = shared_key(items, items.is_empty(), Kind::FrozenSet, depth);
                if !self.get(key) {
                    let inner = nested(depth)?;
                    self.out.push(MARK);
                    self.values(items, inner)?;
                    self.out.push(FROZENSET);
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
            Value::Object(o) => {
                let key = shared_key(o, false, Kind::Object, depth);
                if !self.get(key) {
                    let inner = nested(depth)?;
                    let Object {
                        construct,
                        callable,
                        args,
                        state,
                    } = &**o;
                    self.value(callable, inner)?;
                    self.value(args, inner)?;
                    self.out.push(match construct {
                        Construct::Reduce => REDUCE,
                        Construct::NewObj => NEWOBJ,
                    });
                    // Memoize before BUILD, as Python does: BUILD mutates this very object.
                    self.memoize(key)?;
                    if let Some(state) = state {
                        self.value(state, inner)?;
                        self.out.push(BUILD);
                    }
                }
            }
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
        self.sized(s.as_bytes(), [SHORT_BINUNICODE, BINUNICODE, BINUNICODE8]);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.sized(b, [SHORT_BINBYTES, BINBYTES, BINBYTES8]);
    }

    /// Writes a payload with the smallest of the u8/u32/u64-length opcodes.
    fn sized(&mut self, payload: &[u8], [short, long, huge]: [u8; 3]) {
        if let Ok(len) = u8::try_from(payload.len()) {
            self.out.extend_from_slice(&[short, len]);
        } else if let Ok(len) = u32::try_from(payload.len()) {
            self.out.push(long);
            self.out.extend_from_slice(&len.to_le_bytes());
        } else {
            self.out.push(huge);
            self.out
                .extend_from_slice(&(payload.len() as u64).to_le_bytes());
        }
        self.out.extend_from_slice(payload);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.str(module);
        self.str(name);
        self.out.push(STACK_GLOBAL);
    }
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
