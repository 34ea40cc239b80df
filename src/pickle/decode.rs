//! The pickle decoder: a stack machine over the protocol 2–5 opcodes, without code execution.
//!
//! Decoding happens in two phases, because pickle mutates objects after it has shared them:
//! a list is created empty (`EMPTY_LIST`), memoized, and only then filled (`APPENDS`); an
//! object gets its state (`BUILD`) after it was memoized. So the stack machine works on an
//! *arena* of mutable nodes (containers and objects) addressed by index, and the stack and
//! the memo hold indices. At `STOP` the root is converted to an immutable [`Value`], each
//! node exactly once: every reference to a node becomes a clone of the same `Arc`, so the
//! conversion is linear in the pickle's size and a tiny pickle that references a big
//! string a thousand times yields one string shared a thousand times.
//!
//! Hostile input is expected. Every read is bounds-checked, a declared length is checked
//! against the bytes actually left before anything is allocated, nesting is capped at
//! [`MAX_DEPTH`], cycles are reported instead of followed, and the few reconstructions that
//! copy data (protocol 2/3 `set(list)` and `_codecs.encode(str, 'latin1')`) draw on a
//! budget equal to the input size, so no input can make the decoder do more than linear
//! work or allocate more than a small multiple of its own size.

use super::{Construct, Global, Object, Value, MAX_DEPTH};
use crate::{Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

// Opcodes (names as in CPython's `pickletools`).
const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const STOP: u8 = b'.';
const MEMOIZE: u8 = 0x94;
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
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
const BYTEARRAY8: u8 = 0x96;
const GLOBAL: u8 = b'c';
const STACK_GLOBAL: u8 = 0x93;
const REDUCE: u8 = b'R';
const NEWOBJ: u8 = 0x81;
const BUILD: u8 = b'b';

/// The highest pickle protocol this decoder (and CPython up to 3.14) knows.
const HIGHEST_PROTOCOL: u8 = 5;

/// Decodes one pickle (protocols 2–5) into a [`Value`].
///
/// Bytes after the `STOP` opcode are ignored, as Python's `pickle.loads` does.
///
/// # Errors
/// [`Error::Protocol`] for malformed input (truncation, unknown or unsupported opcodes,
/// stack underflow, a missing MARK, an unknown memo index, ill-typed operands) and
/// [`Error::Value`] for well-formed pickles distq cannot represent (nesting deeper than
/// [`MAX_DEPTH`], self-referencing structures, strs with lone surrogates).
pub fn decode(bytes: &[u8]) -> Result<Value> {
    Machine::new(bytes).run()
}

/// A stack or memo entry: an immutable value, or a node that later opcodes may mutate.
#[derive(Clone, Debug)]
enum Item {
    /// A leaf (scalar, str, bytes, global): nothing can change it any more.
    Val(Value),
    /// An index into the arena.
    Node(usize),
}

/// A container or object under construction.
#[derive(Debug)]
enum Node {
    Tuple(Vec<Item>),
    List(Vec<Item>),
    Dict(Vec<(Item, Item)>),
    Set(Vec<Item>),
    FrozenSet(Vec<Item>),
    Object {
        construct: Construct,
        callable: Item,
        args: Item,
        state: Option<Item>,
    },
}

/// The unpickling machine: input cursor, stack, mark stack, memo and node arena.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset and opcode being executed, for error messages.
    op_pos: usize,
    op: u8,
    stack: Vec<Item>,
    /// Stack lengths at each open MARK; the last one is the fence pops may not cross.
    marks: Vec<usize>,
    /// Keyed by index as Python's memo dict is: BINPUT may use any u32, MEMOIZE uses `len`.
    memo: HashMap<u32, Item>,
    arena: Vec<Node>,
    /// The protocol announced by PROTO; Python 2 names are mapped only below 3, as Python does.
    proto: u8,
    /// Units (bytes or items) that reconstructions may still copy; starts at the input size.
    budget: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine {
            data,
            pos: 0,
            op_pos: 0,
            op: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            arena: Vec::new(),
            proto: 0,
            budget: data.len(),
        }
    }

    /// A protocol error that names the current opcode and its offset.
    fn fail(&self, what: impl fmt::Display) -> Error {
        Error::protocol(format!(
            "pickle: {what} ({} at offset {})",
            OpName(self.op),
            self.op_pos
        ))
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    /// Consumes `n` bytes, checking first that they are there.
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
            .ok_or_else(|| {
                self.fail(format_args!(
                    "truncated: needs {n} bytes, {} left",
                    self.remaining()
                ))
            })?;
        self.pos += n;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take_array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        self.take_array().map(u32::from_le_bytes)
    }

    /// Reads a u64 length and converts it to usize; a length that does not even fit in
    /// usize certainly exceeds the input, which `take` then reports.
    fn len8(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.take_array()?);
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Reads a `\n`-terminated UTF-8 line (GLOBAL's operands).
    fn line(&mut self) -> Result<String> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.fail("truncated: unterminated line"))?;
        let raw = self.take(n + 1)?;
        let text = raw.get(..n).unwrap_or_default();
        std::str::from_utf8(text)
            .map(str::to_owned)
            .map_err(|_| self.fail("global name is not valid utf-8"))
    }

    fn push(&mut self, item: Item) {
        self.stack.push(item);
    }

    fn push_val(&mut self, v: Value) {
        self.stack.push(Item::Val(v));
    }

    fn push_node(&mut self, node: Node) {
        self.arena.push(node);
        self.stack.push(Item::Node(self.arena.len() - 1));
    }

    /// The bottom of the current MARK segment: pops may not go below it (as in Python).
    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Item> {
        if self.stack.len() <= self.fence() {
            return Err(self.fail("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.fail("stack underflow"))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Item>> {
        match self.stack.len().checked_sub(n) {
            Some(at) if at >= self.fence() => Ok(self.stack.split_off(at)),
            _ => Err(self.fail("stack underflow")),
        }
    }

    /// Pops everything above the innermost MARK, and the MARK.
    fn pop_mark(&mut self) -> Result<Vec<Item>> {
        let at = self
            .marks
            .pop()
            .ok_or_else(|| self.fail("no MARK before"))?;
        if at > self.stack.len() {
            return Err(self.fail("stack underflow"));
        }
        Ok(self.stack.split_off(at))
    }

    fn top(&self) -> Result<&Item> {
        match self.stack.last() {
            Some(item) if self.stack.len() > self.fence() => Ok(item),
            _ => Err(self.fail("stack underflow")),
        }
    }

    /// The arena node on top of the stack, for the opcodes that mutate one.
    fn top_node(&mut self, what: &str) -> Result<&mut Node> {
        let idx = match self.top()? {
            Item::Node(i) => *i,
            Item::Val(_) => return Err(self.fail(format_args!("target is not {what}"))),
        };
        let fail = self.fail(format_args!("target is not {what}"));
        self.arena.get_mut(idx).ok_or(fail)
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let top = self.top()?.clone();
        self.memo.insert(idx, top);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let item = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.fail(format_args!("memo get of unknown index {idx}")))?;
        self.push(item);
        Ok(())
    }

    /// Draws `n` units from the copy budget.
    fn charge(&mut self, n: usize) -> Result<()> {
        self.budget = self.budget.checked_sub(n).ok_or_else(|| {
            self.fail("reconstruction copies more data than the pickle holds (amplification)")
        })?;
        Ok(())
    }

    fn run(mut self) -> Result<Value> {
        loop {
            self.op_pos = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return Err(Error::protocol(format!(
                    "pickle: truncated at offset {}: no STOP opcode",
                    self.pos
                )));
            };
            self.op = op;
            self.pos += 1;
            if op == STOP {
                let root = self.pop()?;
                return Converter::new(&self.arena).item(&root, 0).map(|(v, _)| v);
            }
            self.step(op)?;
        }
    }

    /// Executes one opcode other than STOP.
    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            PROTO => {
                let p = self.u8()?;
                if p > HIGHEST_PROTOCOL {
                    return Err(self.fail(format_args!("unsupported protocol {p}")));
                }
                self.proto = p;
            }
            FRAME => {
                let n = self.len8()?;
                if n > self.remaining() {
                    return Err(self.fail(format_args!(
                        "truncated: frame of {n} bytes, {} left",
                        self.remaining()
                    )));
                }
            }
            MEMOIZE => {
                let idx = u32::try_from(self.memo.len()).map_err(|_| self.fail("memo full"))?;
                self.memo_put(idx)?;
            }
            BINPUT => {
                let idx = self.u8()?;
                self.memo_put(idx.into())?;
            }
            LONG_BINPUT => {
                let idx = self.u32()?;
                self.memo_put(idx)?;
            }
            BINGET => {
                let idx = self.u8()?;
                self.memo_get(idx.into())?;
            }
            LONG_BINGET => {
                let idx = self.u32()?;
                self.memo_get(idx)?;
            }
            MARK => self.marks.push(self.stack.len()),
            EMPTY_TUPLE => self.push_node(Node::Tuple(Vec::new())),
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let items = self.pop_n(usize::from(op - TUPLE1) + 1)?;
                self.push_node(Node::Tuple(items));
            }
            TUPLE => {
                let items = self.pop_mark()?;
                self.push_node(Node::Tuple(items));
            }
            EMPTY_LIST => self.push_node(Node::List(Vec::new())),
            APPEND => {
                let item = self.pop()?;
                match self.top_node("a list")? {
                    Node::List(list) => list.push(item),
                    _ => return Err(self.fail("target is not a list")),
                }
            }
            APPENDS => {
                let items = self.pop_mark()?;
                match self.top_node("a list")? {
                    Node::List(list) => list.extend(items),
                    _ => return Err(self.fail("target is not a list")),
                }
            }
            EMPTY_DICT => self.push_node(Node::Dict(Vec::new())),
            SETITEM => {
                let value = self.pop()?;
                let key = self.pop()?;
                match self.top_node("a dict")? {
                    Node::Dict(dict) => dict.push((key, value)),
                    _ => return Err(self.fail("target is not a dict")),
                }
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(self.fail("odd number of items"));
                }
                match self.top_node("a dict")? {
                    Node::Dict(dict) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            dict.push((k, v));
                        }
                    }
                    _ => return Err(self.fail("target is not a dict")),
                }
            }
            EMPTY_SET => self.push_node(Node::Set(Vec::new())),
            ADDITEMS => {
                let items = self.pop_mark()?;
                match self.top_node("a set")? {
                    Node::Set(set) => set.extend(items),
                    _ => return Err(self.fail("target is not a set")),
                }
            }
            FROZENSET => {
                let items = self.pop_mark()?;
                self.push_node(Node::FrozenSet(items));
            }
            NONE => self.push_val(Value::None),
            NEWTRUE => self.push_val(Value::Bool(true)),
            NEWFALSE => self.push_val(Value::Bool(false)),
            BININT1 => {
                let n = self.u8()?;
                self.push_val(Value::Int(n.into()));
            }
            BININT2 => {
                let n = u16::from_le_bytes(self.take_array()?);
                self.push_val(Value::Int(n.into()));
            }
            BININT => {
                let n = i32::from_le_bytes(self.take_array()?);
                self.push_val(Value::Int(n.into()));
            }
            LONG1 => {
                let n = self.u8()?;
                let raw = self.take(n.into())?;
                self.push_val(long_from_le(raw));
            }
            LONG4 => {
                let n = i32::from_le_bytes(self.take_array()?);
                let n = usize::try_from(n).map_err(|_| self.fail("negative length"))?;
                let raw = self.take(n)?;
                self.push_val(long_from_le(raw));
            }
            BINFLOAT => {
                let x = f64::from_be_bytes(self.take_array()?);
                self.push_val(Value::Float(x));
            }
            SHORT_BINUNICODE => {
                let n = self.u8()?;
                self.push_str(n.into())?;
            }
            BINUNICODE => {
                let n = self.u32()?;
                self.push_str(usize::try_from(n).unwrap_or(usize::MAX))?;
            }
            BINUNICODE8 => {
                let n = self.len8()?;
                self.push_str(n)?;
            }
            SHORT_BINBYTES => {
                let n = self.u8()?;
                let raw = self.take(n.into())?;
                self.push_val(Value::Bytes(Arc::from(raw)));
            }
            BINBYTES => {
                let n = self.u32()?;
                let raw = self.take(usize::try_from(n).unwrap_or(usize::MAX))?;
                self.push_val(Value::Bytes(Arc::from(raw)));
            }
            BINBYTES8 => {
                let n = self.len8()?;
                let raw = self.take(n)?;
                self.push_val(Value::Bytes(Arc::from(raw)));
            }
            BYTEARRAY8 => {
                let n = self.len8()?;
                let raw = self.take(n)?;
                self.push_val(Value::ByteArray(Arc::from(raw)));
            }
            GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                let global = if self.proto < 3 {
                    python2_name(module, name)
                } else {
                    Global { module, name }
                };
                self.push_val(Value::Global(Arc::new(global)));
            }
            STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Item::Val(Value::Str(module)), Item::Val(Value::Str(name))) => {
                        self.push_val(Value::Global(Arc::new(Global {
                            module: module.to_string(),
                            name: name.to_string(),
                        })));
                    }
                    _ => return Err(self.fail("module and name must be strs")),
                }
            }
            REDUCE => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let item = self.reduce(callable, args)?;
                self.push(item);
            }
            NEWOBJ => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.push_node(Node::Object {
                    construct: Construct::NewObj,
                    callable,
                    args,
                    state: None,
                });
            }
            BUILD => {
                let new_state = self.pop()?;
                match self.top_node("an object")? {
                    Node::Object { state, .. } if state.is_none() => *state = Some(new_state),
                    Node::Object { .. } => {
                        return Err(self.fail("object already has state (second BUILD)"))
                    }
                    _ => return Err(self.fail("target is not an object")),
                }
            }
            _ => {
                return Err(match op_name(op) {
                    Some(name) => Error::protocol(format!(
                        "pickle: unsupported opcode {name} (0x{op:02x}) at offset {}",
                        self.op_pos
                    )),
                    None => Error::protocol(format!(
                        "pickle: unknown opcode 0x{op:02x} at offset {}",
                        self.op_pos
                    )),
                })
            }
        }
        Ok(())
    }

    /// Reads `n` bytes of UTF-8 and pushes them as a str.
    fn push_str(&mut self, n: usize) -> Result<()> {
        let raw = self.take(n)?;
        let s = match std::str::from_utf8(raw) {
            Ok(s) => s,
            Err(e) => {
                let bad = raw.get(e.valid_up_to()..).unwrap_or_default();
                // Python encodes strs with `surrogatepass`: U+D800..U+DFFF become ED A0..BF xx.
                return Err(if matches!(bad, [0xed, 0xa0..=0xbf, ..]) {
                    Error::Value(format!(
                        "str at offset {} contains a lone surrogate; lone surrogates are unsupported",
                        self.op_pos
                    ))
                } else {
                    self.fail(format_args!(
                        "str is not valid utf-8 (bad byte at payload offset {})",
                        e.valid_up_to()
                    ))
                });
            }
        };
        self.push_val(Value::Str(Arc::from(s)));
        Ok(())
    }

    /// REDUCE: recognises the constructor calls that protocols 2/3 use for plain types
    /// (bytes, bytearray, set, frozenset) and turns them into those values; anything else
    /// stays an opaque [`Object`]. Nothing is called.
    fn reduce(&mut self, callable: Item, args: Item) -> Result<Item> {
        if let Some(item) = self.recognise(&callable, &args)? {
            return Ok(item);
        }
        self.arena.push(Node::Object {
            construct: Construct::Reduce,
            callable,
            args,
            state: None,
        });
        Ok(Item::Node(self.arena.len() - 1))
    }

    fn recognise(&mut self, callable: &Item, args: &Item) -> Result<Option<Item>> {
        let Item::Val(Value::Global(g)) = callable else {
            return Ok(None);
        };
        let Item::Node(idx) = args else {
            return Ok(None);
        };
        let Some(Node::Tuple(args)) = self.arena.get(*idx) else {
            return Ok(None);
        };
        let (module, name) = (g.module.as_str(), g.name.as_str());
        let empty = || Arc::<[u8]>::from(&[][..]);
        let item = match (module, name, args.as_slice()) {
            ("_codecs", "encode", [Item::Val(Value::Str(s)), Item::Val(Value::Str(enc))])
                if is_latin1(enc) =>
            {
                let s = s.clone();
                self.charge(s.len())?;
                latin1_bytes(&s).map(|b| Item::Val(Value::Bytes(b)))
            }
            ("builtins", "bytes", []) => Some(Item::Val(Value::Bytes(empty()))),
            ("builtins", "bytearray", []) => Some(Item::Val(Value::ByteArray(empty()))),
            ("builtins", "bytearray", [Item::Val(Value::Bytes(b))]) => {
                Some(Item::Val(Value::ByteArray(b.clone())))
            }
            ("builtins", "bytearray", [Item::Val(Value::Str(s)), Item::Val(Value::Str(enc))])
                if is_latin1(enc) =>
            {
                let s = s.clone();
                self.charge(s.len())?;
                latin1_bytes(&s).map(|b| Item::Val(Value::ByteArray(b)))
            }
            ("builtins", "set" | "frozenset", []) => Some(self.new_set(name == "set", Vec::new())),
            ("builtins", "set" | "frozenset", [Item::Node(list)]) => {
                // Python builds the set from the list as it is now; copy it (the list may
                // still grow later), paying from the budget so repeats cannot amplify.
                let items = match self.arena.get(*list) {
                    Some(Node::List(items)) => items.clone(),
                    _ => return Ok(None),
                };
                self.charge(items.len())?;
                Some(self.new_set(name == "set", items))
            }
            _ => None,
        };
        Ok(item)
    }

    fn new_set(&mut self, mutable: bool, items: Vec<Item>) -> Item {
        self.arena.push(if mutable {
            Node::Set(items)
        } else {
            Node::FrozenSet(items)
        });
        Item::Node(self.arena.len() - 1)
    }
}

fn is_latin1(encoding: &str) -> bool {
    matches!(encoding, "latin1" | "latin-1")
}

/// `str.encode('latin-1')`, or `None` if a char is above U+00FF (Python would raise).
fn latin1_bytes(s: &str) -> Option<Arc<[u8]>> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Arc::from)
}

/// Maps the Python 2 names that Python 3 writes at protocols 2 and below (`fix_imports`),
/// for the modules a queue item plausibly references.
fn python2_name(module: String, name: String) -> Global {
    let module = match module.as_str() {
        "__builtin__" | "exceptions" => "builtins".to_owned(),
        "Queue" => "queue".to_owned(),
        "copy_reg" => "copyreg".to_owned(),
        _ => module,
    };
    let name = match (module.as_str(), name.as_str()) {
        ("builtins", "unicode") => "str".to_owned(),
        ("builtins", "long") => "int".to_owned(),
        ("builtins", "xrange") => "range".to_owned(),
        ("builtins", "unichr") => "chr".to_owned(),
        _ => name,
    };
    Global { module, name }
}

/// LONG1/LONG4 payload (little-endian two's complement) to an int, normalised: redundant
/// sign bytes are dropped, and whatever fits in `i64` becomes [`Value::Int`], so equal
/// numbers compare equal however they were encoded.
fn long_from_le(mut bytes: &[u8]) -> Value {
    while let [init @ .., last] = bytes {
        match init.last() {
            Some(&prev) if (*last == 0 && prev < 0x80) || (*last == 0xff && prev >= 0x80) => {
                bytes = init
            }
            _ => break,
        }
    }
    match bytes {
        [] => Value::Int(0),
        [.., last] if bytes.len() <= 8 => {
            let mut buf = if *last >= 0x80 { [0xff; 8] } else { [0; 8] };
            buf.iter_mut().zip(bytes).for_each(|(d, s)| *d = *s);
            Value::Int(i64::from_le_bytes(buf))
        }
        _ => Value::BigInt(Arc::from(bytes)),
    }
}

/// Conversion state of one arena node.
enum Slot {
    Todo,
    /// Being converted: meeting it again means the structure contains itself.
    Busy,
    /// Converted, with its nesting height (a container of scalars has height 1).
    Done(Value, usize),
}

/// Turns arena nodes into values, each node once.
struct Converter<'n> {
    arena: &'n [Node],
    slots: Vec<Slot>,
}

impl<'n> Converter<'n> {
    fn new(arena: &'n [Node]) -> Self {
        Converter {
            arena,
            slots: arena.iter().map(|_| Slot::Todo).collect(),
        }
    }

    /// Converts an item found inside `depth` containers; returns it and its height.
    fn item(&mut self, item: &Item, depth: usize) -> Result<(Value, usize)> {
        let idx = match item {
            Item::Val(v) => return Ok((v.clone(), 0)),
            Item::Node(idx) => *idx,
        };
        match self.slots.get(idx) {
            Some(Slot::Done(v, height)) => return Ok((v.clone(), *height)),
            Some(Slot::Busy) => {
                return Err(Error::Value(
                    "pickle references itself; recursive structures are not supported".into(),
                ))
            }
            Some(Slot::Todo) => {}
            None => return Err(Error::protocol("pickle: internal node index out of range")),
        }
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let node = self
            .arena
            .get(idx)
            .ok_or_else(|| Error::protocol("pickle: internal node index out of range"))?;
        self.set_slot(idx, Slot::Busy);
        let mut height = 0;
        let mut conv = |it: &Item| -> Result<Value> {
            let (v, h) = self.item(it, depth + 1)?;
            height = height.max(h);
            Ok(v)
        };
        let value = match node {
            Node::Tuple(items) => Value::Tuple(convert_all(items, &mut conv)?),
            Node::List(items) => Value::List(convert_all(items, &mut conv)?),
            Node::Set(items) => Value::Set(convert_all(items, &mut conv)?),
            Node::FrozenSet(items) => Value::FrozenSet(convert_all(items, &mut conv)?),
            Node::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|(k, v)| Ok((conv(k)?, conv(v)?)))
                    .collect::<Result<Arc<[_]>>>()?,
            ),
            Node::Object {
                construct,
                callable,
                args,
                state,
            } => Value::Object(Arc::new(Object {
                construct: *construct,
                callable: conv(callable)?,
                args: conv(args)?,
                state: state.as_ref().map(&mut conv).transpose()?,
            })),
        };
        let height = height + 1;
        if height > MAX_DEPTH {
            return Err(too_deep());
        }
        self.set_slot(idx, Slot::Done(value.clone(), height));
        Ok((value, height))
    }

    fn set_slot(&mut self, idx: usize, slot: Slot) {
        if let Some(s) = self.slots.get_mut(idx) {
            *s = slot;
        }
    }
}

fn convert_all(
    items: &[Item],
    conv: &mut impl FnMut(&Item) -> Result<Value>,
) -> Result<Arc<[Value]>> {
    items.iter().map(conv).collect()
}

fn too_deep() -> Error {
    Error::Value(format!(
        "pickle nests containers deeper than {MAX_DEPTH} levels"
    ))
}

/// Displays an opcode by name when known.
struct OpName(u8);

impl fmt::Display for OpName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match op_name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "opcode 0x{:02x}", self.0),
        }
    }
}

/// Names of every pickle opcode, including the ones this decoder rejects.
fn op_name(op: u8) -> Option<&'static str> {
    Some(match op {
        PROTO => "PROTO",
        FRAME => "FRAME",
        STOP => "STOP",
        MEMOIZE => "MEMOIZE",
        BINPUT => "BINPUT",
        LONG_BINPUT => "LONG_BINPUT",
        BINGET => "BINGET",
        LONG_BINGET => "LONG_BINGET",
        MARK => "MARK",
        EMPTY_TUPLE => "EMPTY_TUPLE",
        TUPLE1 => "TUPLE1",
        TUPLE2 => "TUPLE2",
        TUPLE3 => "TUPLE3",
        TUPLE => "TUPLE",
        EMPTY_LIST => "EMPTY_LIST",
        APPEND => "APPEND",
        APPENDS => "APPENDS",
        EMPTY_DICT => "EMPTY_DICT",
        SETITEM => "SETITEM",
        SETITEMS => "SETITEMS",
        EMPTY_SET => "EMPTY_SET",
        ADDITEMS => "ADDITEMS",
        FROZENSET => "FROZENSET",
        NONE => "NONE",
        NEWTRUE => "NEWTRUE",
        NEWFALSE => "NEWFALSE",
        BININT1 => "BININT1",
        BININT2 => "BININT2",
        BININT => "BININT",
        LONG1 => "LONG1",
        LONG4 => "LONG4",
        BINFLOAT => "BINFLOAT",
        SHORT_BINUNICODE => "SHORT_BINUNICODE",
        BINUNICODE => "BINUNICODE",
        BINUNICODE8 => "BINUNICODE8",
        SHORT_BINBYTES => "SHORT_BINBYTES",
        BINBYTES => "BINBYTES",
        BINBYTES8 => "BINBYTES8",
        BYTEARRAY8 => "BYTEARRAY8",
        GLOBAL => "GLOBAL",
        STACK_GLOBAL => "STACK_GLOBAL",
        REDUCE => "REDUCE",
        NEWOBJ => "NEWOBJ",
        BUILD => "BUILD",
        0x92 => "NEWOBJ_EX",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'g' => "GET",
        b'p' => "PUT",
        b'd' => "DICT",
        b'l' => "LIST",
        b'i' => "INST",
        b'o' => "OBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        _ => return None,
    })
}
