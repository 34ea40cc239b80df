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

use super::op::*;
use super::{Construct, Global, Object, Value, MAX_DEPTH, MAX_EXPANDED};
use crate::{Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

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
        fail_at(self.op, self.op_pos, what)
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
            Item::Node(i) => Some(*i),
            Item::Val(_) => None,
        };
        let (op, pos) = (self.op, self.op_pos);
        idx.and_then(|i| self.arena.get_mut(i))
            .ok_or_else(|| fail_at(op, pos, format_args!("target is not {what}")))
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
                return Converter::new(&self.arena).root(&root);
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
            // Python writes POP and POP_MARK when a tuple turns out to contain itself.
            POP => {
                if self.stack.len() > self.fence() {
                    self.pop()?;
                } else {
                    self.pop_mark()?;
                }
            }
            POP_MARK => {
                self.pop_mark()?;
            }
            DUP => {
                let top = self.top()?.clone();
                self.stack.push(top);
            }
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

/// A protocol error about opcode `op` at offset `pos`.
pub(super) fn fail_at(op: u8, pos: usize, what: impl fmt::Display) -> Error {
    Error::protocol(format!("pickle: {what} ({} at offset {pos})", OpName(op)))
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
    /// On the current conversion path: meeting it again means the structure contains itself.
    Busy,
    /// Converted, with its nesting height (a container of scalars has height 1) and its
    /// expanded size: the number of values it would contain if no reference were shared.
    Done(Value, usize, u64),
}

/// Turns arena nodes into values, each node once, depth first with an explicit stack, so
/// that neither hostile nesting nor a debug build's large frames can overflow the thread's
/// stack.
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

    /// Converts the root item.
    fn root(mut self, root: &Item) -> Result<Value> {
        let Item::Node(root) = root else {
            return self.get(root).map(|(v, ..)| v);
        };
        // The path from the root: node index and the next child to look at.
        let mut path: Vec<(usize, usize)> = vec![(*root, 0)];
        self.enter(*root)?;
        while let Some((idx, next)) = path.last_mut() {
            let node = self.node(*idx)?;
            match child(node, *next) {
                Some(Item::Node(c)) => {
                    *next += 1;
                    let c = *c;
                    match self.slots.get(c) {
                        Some(Slot::Done(..)) => {}
                        Some(Slot::Busy) => {
                            return Err(Error::Value(
                                "pickle references itself; recursive structures are not supported"
                                    .into(),
                            ))
                        }
                        _ => {
                            if path.len() >= MAX_DEPTH {
                                return Err(too_deep());
                            }
                            self.enter(c)?;
                            path.push((c, 0));
                        }
                    }
                }
                Some(Item::Val(_)) => *next += 1,
                None => {
                    let idx = *idx;
                    let done = self.build(node)?;
                    self.set_slot(idx, done);
                    path.pop();
                }
            }
        }
        self.get(&Item::Node(*root)).map(|(v, ..)| v)
    }

    fn node(&self, idx: usize) -> Result<&'n Node> {
        let arena: &'n [Node] = self.arena;
        arena
            .get(idx)
            .ok_or_else(|| Error::protocol("pickle: internal node index out of range"))
    }

    fn enter(&mut self, idx: usize) -> Result<()> {
        self.node(idx)?;
        self.set_slot(idx, Slot::Busy);
        Ok(())
    }

    fn set_slot(&mut self, idx: usize, slot: Slot) {
        if let Some(s) = self.slots.get_mut(idx) {
            *s = slot;
        }
    }

    /// The value, height and expanded size of an item whose node (if any) is converted
    /// already.
    fn get(&self, item: &Item) -> Result<(Value, usize, u64)> {
        match item {
            Item::Val(v) => Ok((v.clone(), 0, 1)),
            Item::Node(idx) => match self.slots.get(*idx) {
                Some(Slot::Done(v, height, size)) => Ok((v.clone(), *height, *size)),
                _ => Err(Error::protocol("pickle: internal conversion order error")),
            },
        }
    }

    /// Builds a node's value once all its children are converted.
    fn build(&self, node: &Node) -> Result<Slot> {
        let mut height = 0;
        let mut size: u64 = 1;
        let mut conv = |it: &Item| -> Result<Value> {
            let (v, h, n) = self.get(it)?;
            height = height.max(h);
            size = size.saturating_add(n);
            Ok(v)
        };
        let value = match node {
            Node::Tuple(items) => Value::Tuple(items.iter().map(&mut conv).collect::<Result<_>>()?),
            Node::List(items) => Value::List(items.iter().map(&mut conv).collect::<Result<_>>()?),
            Node::Set(items) => Value::Set(items.iter().map(&mut conv).collect::<Result<_>>()?),
            Node::FrozenSet(items) => {
                Value::FrozenSet(items.iter().map(&mut conv).collect::<Result<_>>()?)
            }
            Node::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|(k, v)| Ok((conv(k)?, conv(v)?)))
                    .collect::<Result<_>>()?,
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
        // Heights come from cached children too, so a deep node first met near the root
        // still counts in full wherever else it is referenced.
        let height = height + 1;
        if height > MAX_DEPTH {
            return Err(too_deep());
        }
        // Sharing keeps the decoded graph small, but anything that walks it as a tree
        // (printing it, a Python client's `==`, a consumer's recursion) would expand it:
        // refuse "billion laughs" graphs whose expansion exceeds the limit.
        if size > MAX_EXPANDED {
            return Err(Error::Value(format!(
                "pickle expands to more than {MAX_EXPANDED} values through shared references \
                 (a \"billion laughs\" structure); refused"
            )));
        }
        Ok(Slot::Done(value, height, size))
    }
}

/// The `k`-th child of a node, in conversion order.
fn child(node: &Node, k: usize) -> Option<&Item> {
    match node {
        Node::Tuple(items) | Node::List(items) | Node::Set(items) | Node::FrozenSet(items) => {
            items.get(k)
        }
        Node::Dict(pairs) => pairs
            .get(k / 2)
            .map(|(key, value)| if k % 2 == 0 { key } else { value }),
        Node::Object {
            callable,
            args,
            state,
            ..
        } => match k {
            0 => Some(callable),
            1 => Some(args),
            2 => state.as_ref(),
            _ => None,
        },
    }
}

fn too_deep() -> Error {
    Error::Value(format!(
        "pickle nests containers deeper than {MAX_DEPTH} levels"
    ))
}

/// Displays an opcode by name when known.
pub(super) struct OpName(pub(super) u8);

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses spaced hex; `'text'` inserts the text's bytes (for long idents).
    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).expect("test hex"))
            .collect()
    }

    fn s(text: &str) -> Value {
        Value::str(text)
    }

    fn t(items: Vec<Value>) -> Value {
        Value::tuple(items)
    }

    fn empty_dict() -> Value {
        Value::dict(vec![])
    }

    const CREATE_REQUEST: &str = "80 04 95 23 00 00 00 00 00 00 00 28 4e 8c 06 63 72 65 61 74 65 94 8c 0e 67 65 74 5f 74 61 73 6b 5f 71 75 65 75 65 94 85 94 7d 94 74 94 2e";
    const CREATE_REPLY: &str = "80 04 95 71 00 00 00 00 00 00 00 8c 07 23 52 45 54 55 52 4e 94 8c 0c 37 66 33 66 39 31 61 37 64 62 31 30 94 28 8c 05 65 6d 70 74 79 94 8c 04 66 75 6c 6c 94 8c 03 67 65 74 94 8c 0a 67 65 74 5f 6e 6f 77 61 69 74 94 8c 04 6a 6f 69 6e 94 8c 03 70 75 74 94 8c 0a 70 75 74 5f 6e 6f 77 61 69 74 94 8c 05 71 73 69 7a 65 94 8c 09 74 61 73 6b 5f 64 6f 6e 65 94 74 94 86 94 86 94 2e";
    const PUT_INT: &str = "80 04 95 20 00 00 00 00 00 00 00 28 8c 0c 37 66 33 66 39 31 61 37 64 62 31 30 94 8c 03 70 75 74 94 4d 99 08 85 94 7d 94 74 94 2e";
    const PUT_STR: &str = "80 04 95 35 00 00 00 00 00 00 00 28 8c 0c 37 66 33 66 39 31 61 37 66 38 64 30 94 8c 03 70 75 74 94 8c 15 32 32 30 31 20 2a 20 32 32 30 31 20 3d 20 34 38 34 34 34 30 31 94 85 94 7d 94 74 94 2e";
    const GET_TIMEOUT: &str = "80 04 95 29 00 00 00 00 00 00 00 28 8c 0c 37 66 33 66 39 31 61 37 64 62 31 30 94 8c 03 67 65 74 94 29 7d 94 8c 07 74 69 6d 65 6f 75 74 94 4b 01 73 74 94 2e";
    const ERROR_EMPTY: &str = "80 04 95 22 00 00 00 00 00 00 00 8c 06 23 45 52 52 4f 52 94 8c 06 5f 71 75 65 75 65 94 8c 05 45 6d 70 74 79 94 93 94 29 52 94 86 94 2e";
    const ERROR_FULL: &str = "80 04 95 20 00 00 00 00 00 00 00 8c 06 23 45 52 52 4f 52 94 8c 05 71 75 65 75 65 94 8c 04 46 75 6c 6c 94 93 94 29 52 94 86 94 2e";
    const ERROR_KEYERROR: &str = "80 04 95 32 00 00 00 00 00 00 00 8c 06 23 45 52 52 4f 52 94 8c 08 62 75 69 6c 74 69 6e 73 94 8c 08 4b 65 79 45 72 72 6f 72 94 93 94 8c 07 6d 69 73 73 69 6e 67 94 85 94 52 94 86 94 2e";
    /// `object().zzz` pickled by 3.12.1: REDUCE, then BUILD with a state dict whose
    /// `args` entry is a BINGET of the args tuple.
    const ERROR_ATTRIBUTE_312: &str = "80 04 95 72 00 00 00 00 00 00 00 8c 06 23 45 52 52 4f 52 94 8c 08 62 75 69 6c 74 69 6e 73 94 8c 0e 41 74 74 72 69 62 75 74 65 45 72 72 6f 72 94 93 94 8c 26 27 6f 62 6a 65 63 74 27 20 6f 62 6a 65 63 74 20 68 61 73 20 6e 6f 20 61 74 74 72 69 62 75 74 65 20 27 7a 7a 7a 27 94 85 94 52 94 7d 94 28 8c 04 6e 61 6d 65 94 8c 03 7a 7a 7a 94 8c 04 61 72 67 73 94 68 05 75 62 86 94 2e";

    /// Every valid pickle of this module, for the truncation test.
    const ALL_VALID: [&str; 9] = [
        CREATE_REQUEST,
        CREATE_REPLY,
        PUT_INT,
        PUT_STR,
        GET_TIMEOUT,
        ERROR_EMPTY,
        ERROR_FULL,
        ERROR_KEYERROR,
        ERROR_ATTRIBUTE_312,
    ];

    fn protocol_error(bytes: &[u8]) -> String {
        match decode(bytes) {
            Err(Error::Protocol(msg)) => msg,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    fn value_error(bytes: &[u8]) -> String {
        match decode(bytes) {
            Err(Error::Value(msg)) => msg,
            other => panic!("expected a value error, got {other:?}"),
        }
    }

    #[test]
    fn requests_from_python_wire_md() {
        let v = decode(&hex(CREATE_REQUEST)).unwrap();
        assert_eq!(
            v,
            t(vec![
                Value::None,
                s("create"),
                t(vec![s("get_task_queue")]),
                empty_dict()
            ])
        );
        let v = decode(&hex(PUT_INT)).unwrap();
        assert_eq!(
            v,
            t(vec![
                s("7f3f91a7db10"),
                s("put"),
                t(vec![Value::Int(2201)]),
                empty_dict()
            ])
        );
        let v = decode(&hex(PUT_STR)).unwrap();
        assert_eq!(
            v,
            t(vec![
                s("7f3f91a7f8d0"),
                s("put"),
                t(vec![s("2201 * 2201 = 4844401")]),
                empty_dict()
            ])
        );
        let v = decode(&hex(GET_TIMEOUT)).unwrap();
        assert_eq!(
            v,
            t(vec![
                s("7f3f91a7db10"),
                s("get"),
                t(vec![]),
                Value::dict(vec![(s("timeout"), Value::Int(1))])
            ])
        );
    }

    #[test]
    fn create_reply() {
        let names = [
            "empty",
            "full",
            "get",
            "get_nowait",
            "join",
            "put",
            "put_nowait",
            "qsize",
            "task_done",
        ];
        let v = decode(&hex(CREATE_REPLY)).unwrap();
        assert_eq!(
            v,
            t(vec![
                s("#RETURN"),
                t(vec![
                    s("7f3f91a7db10"),
                    t(names.iter().map(|n| s(n)).collect())
                ])
            ])
        );
    }

    #[test]
    fn error_replies() {
        let v = decode(&hex(ERROR_EMPTY)).unwrap();
        assert_eq!(
            v,
            t(vec![
                s("#ERROR"),
                Value::exception("_queue", "Empty", vec![])
            ])
        );
        let v = decode(&hex(ERROR_FULL)).unwrap();
        assert_eq!(
            v,
            t(vec![s("#ERROR"), Value::exception("queue", "Full", vec![])])
        );
        let v = decode(&hex(ERROR_KEYERROR)).unwrap();
        assert_eq!(
            v,
            t(vec![
                s("#ERROR"),
                Value::exception("builtins", "KeyError", vec![s("missing")])
            ])
        );
        assert_eq!(v.to_string(), "('#ERROR', builtins.KeyError('missing'))");
    }

    #[test]
    fn attribute_error_with_build_and_binget() {
        let v = decode(&hex(ERROR_ATTRIBUTE_312)).unwrap();
        let msg = s("'object' object has no attribute 'zzz'");
        let Value::Object(obj) = &v.as_tuple().unwrap()[1] else {
            panic!("not an object: {v:?}");
        };
        assert_eq!(obj.construct, Construct::Reduce);
        assert_eq!(obj.callable, Value::global("builtins", "AttributeError"));
        assert_eq!(obj.args, t(vec![msg.clone()]));
        let state = obj.state.as_ref().unwrap();
        assert_eq!(
            *state,
            Value::dict(vec![(s("name"), s("zzz")), (s("args"), t(vec![msg]))])
        );
        // The state's `args` is a memo reference to the very same tuple.
        let (Value::Tuple(args), Value::Dict(pairs)) = (&obj.args, state) else {
            panic!("shape");
        };
        let Value::Tuple(state_args) = &pairs[1].1 else {
            panic!("shape");
        };
        assert!(Arc::ptr_eq(args, state_args));
    }

    #[test]
    fn minimal_frames_of_section_4_3() {
        let ret_none = decode(&hex("80 04 8c 07 23 52 45 54 55 52 4e 4e 86 2e")).unwrap();
        assert_eq!(ret_none, t(vec![s("#RETURN"), Value::None]));
        let ret_int = decode(&hex("80 04 8c 07 23 52 45 54 55 52 4e 4d 99 08 86 2e")).unwrap();
        assert_eq!(ret_int, t(vec![s("#RETURN"), Value::Int(2201)]));
        let empty = t(vec![
            s("#ERROR"),
            Value::exception("_queue", "Empty", vec![]),
        ]);
        let stack_global = "80 04 8c 06 23 45 52 52 4f 52 8c 06 5f 71 75 65 75 65 8c 05 45 6d 70 74 79 93 29 52 86 2e";
        assert_eq!(decode(&hex(stack_global)).unwrap(), empty);
        let global =
            "80 02 8c 06 23 45 52 52 4f 52 63 71 75 65 75 65 0a 45 6d 70 74 79 0a 29 52 86 2e";
        assert_eq!(
            decode(&hex(global)).unwrap(),
            t(vec![
                s("#ERROR"),
                Value::exception("queue", "Empty", vec![])
            ])
        );
        let dummy = decode(&hex("80 04 28 4e 8c 05 64 75 6d 6d 79 29 7d 74 2e")).unwrap();
        assert_eq!(
            dummy,
            t(vec![Value::None, s("dummy"), t(vec![]), empty_dict()])
        );
    }

    #[test]
    fn protocol_2_and_3_forms() {
        // What 3.8–3.13 emit at protocols 2/3 for bytes, bytearray, set, frozenset, Full.
        let cases: [(&[u8], Value); 9] = [
            (
                b"\x80\x02c_codecs\nencode\nX\x04\x00\x00\x00ab\xc3\xbfX\x06\x00\x00\x00latin1\x86R.",
                Value::from(b"ab\xff".to_vec()),
            ),
            (
                b"\x80\x02c__builtin__\nbytes\n)R.",
                Value::from(Vec::new()),
            ),
            (
                b"\x80\x02c__builtin__\nbytearray\nc_codecs\nencode\nX\x02\x00\x00\x00a\x00X\x06\x00\x00\x00latin1\x86R\x85R.",
                Value::ByteArray(Arc::from(&b"a\x00"[..])),
            ),
            (
                b"\x80\x02c__builtin__\nbytearray\nX\x02\x00\x00\x00\xc3\xbfX\x07\x00\x00\x00latin-1\x86R.",
                Value::ByteArray(Arc::from(&b"\xff"[..])),
            ),
            (
                b"\x80\x03cbuiltins\nbytearray\nC\x01z\x85R.",
                Value::ByteArray(Arc::from(&b"z"[..])),
            ),
            (
                b"\x80\x02c__builtin__\nbytearray\n)R.",
                Value::ByteArray(Arc::from(&b""[..])),
            ),
            (
                b"\x80\x02c__builtin__\nset\n]q\x00(K\x01K\x02e\x85R.",
                Value::Set(Arc::from(vec![Value::Int(1), Value::Int(2)])),
            ),
            (
                b"\x80\x03cbuiltins\nfrozenset\n]\x85R.",
                Value::FrozenSet(Arc::from(vec![])),
            ),
            (
                b"\x80\x02cQueue\nFull\n)R.",
                Value::exception("queue", "Full", vec![]),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(bytes).unwrap(), want, "{bytes:?}");
        }
        // Python 2 names are only mapped below protocol 3, as Python does.
        assert_eq!(
            decode(b"\x80\x03cexceptions\nKeyError\n.").unwrap(),
            Value::global("exceptions", "KeyError")
        );
        assert_eq!(
            decode(b"\x80\x02cexceptions\nKeyError\n.").unwrap(),
            Value::global("builtins", "KeyError")
        );
    }

    #[test]
    fn ints() {
        let long = |payload: &[u8]| {
            let mut p = vec![0x80, 4, LONG1, payload.len() as u8];
            p.extend_from_slice(payload);
            p.push(STOP);
            decode(&p).unwrap()
        };
        assert_eq!(long(&[]), Value::Int(0));
        assert_eq!(long(&[0xff]), Value::Int(-1));
        assert_eq!(long(&[0xff, 0xff, 0xff]), Value::Int(-1));
        assert_eq!(long(&[0, 0, 0, 0x80, 0]), Value::Int(1 << 31));
        assert_eq!(long(&[0, 0, 0, 0, 0, 0, 0, 0x80]), Value::Int(i64::MIN));
        assert_eq!(
            long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0]),
            Value::BigInt(Arc::from(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0][..]))
        );
        let four = decode(b"\x80\x04\x8b\x02\x00\x00\x00\x01\x00.").unwrap();
        assert_eq!(four, Value::Int(1));
        assert_eq!(
            decode(b"\x80\x04J\xff\xff\xff\xff.").unwrap(),
            Value::Int(-1)
        );
        assert_eq!(decode(b"\x80\x04M\xff\xff.").unwrap(), Value::Int(65535));
    }

    #[test]
    fn several_frames_and_data_outside_frames() {
        // FRAME(3) [EMPTY_LIST MARK K1] FRAME(0) then K2 APPENDS STOP outside any frame.
        let p = b"\x80\x04\x95\x04\x00\x00\x00\x00\x00\x00\x00](K\x01\x95\x00\x00\x00\x00\x00\x00\x00\x00K\x02e.";
        assert_eq!(
            decode(p).unwrap(),
            Value::list(vec![Value::Int(1), Value::Int(2)])
        );
        // Trailing bytes after STOP are ignored, as in Python.
        assert_eq!(decode(b"\x80\x04N.garbage").unwrap(), Value::None);
    }

    #[test]
    fn shared_megabyte_costs_one_megabyte() {
        // [b, b, b, ...] with one 1 MB bytes and 999 BINGETs of it.
        let mut p = vec![0x80, 4, EMPTY_LIST, MARK, BINBYTES];
        p.extend_from_slice(&(1u32 << 20).to_le_bytes());
        p.resize(p.len() + (1 << 20), b'x');
        p.push(MEMOIZE);
        for _ in 0..999 {
            p.extend_from_slice(&[BINGET, 0]);
        }
        p.extend_from_slice(&[APPENDS, STOP]);
        let Value::List(items) = decode(&p).unwrap() else {
            panic!("not a list");
        };
        assert_eq!(items.len(), 1000);
        let Value::Bytes(first) = &items[0] else {
            panic!("not bytes");
        };
        assert_eq!(first.len(), 1 << 20);
        for item in items.iter() {
            let Value::Bytes(b) = item else {
                panic!("not bytes")
            };
            assert!(Arc::ptr_eq(first, b));
        }
    }

    /// l0 = ['x']; l(k+1) = [l(k), l(k)]: a DAG of 2**levels leaves in a few bytes each.
    fn doubling_chain(levels: u32) -> Vec<u8> {
        let mut p = vec![0x80, 4, EMPTY_LIST, SHORT_BINUNICODE, 1, b'x', APPEND];
        for k in 0..levels {
            p.extend_from_slice(&[LONG_BINPUT]);
            p.extend_from_slice(&k.to_le_bytes());
            p.extend_from_slice(&[EMPTY_LIST, MARK, LONG_BINGET]);
            p.extend_from_slice(&k.to_le_bytes());
            p.push(LONG_BINGET);
            p.extend_from_slice(&k.to_le_bytes());
            p.push(APPENDS);
        }
        p.push(STOP);
        p
    }

    #[test]
    fn memo_bomb_stays_linear() {
        // 2**20 leaves as a tree: decoded as 20 shared nodes.
        let mut v = decode(&doubling_chain(20)).unwrap();
        for _ in 0..20 {
            let Value::List(pair) = v else {
                panic!("shape")
            };
            let (Value::List(a), Value::List(b)) = (&pair[0], &pair[1]) else {
                panic!("shape")
            };
            assert!(Arc::ptr_eq(a, b));
            v = pair[0].clone();
        }
        assert_eq!(v, Value::list(vec![s("x")]));
    }

    #[test]
    fn billion_laughs_is_refused_not_expanded() {
        let err = value_error(&doubling_chain(60));
        assert!(err.contains("billion laughs"), "{err}");
        assert!(
            decode(&doubling_chain(24)).is_ok(),
            "2**24 leaves is within the limit"
        );
        assert!(decode(&doubling_chain(26)).is_err(), "2**26 leaves is not");
    }

    #[test]
    fn set_amplification_is_refused() {
        // A 1000-item list, then set(list) 1000 times: a million copies from 3 KB.
        let mut p = b"\x80\x02]q\x00(".to_vec();
        p.extend(std::iter::repeat([NONE]).take(1000).flatten());
        p.extend_from_slice(b"e(");
        for _ in 0..1000 {
            p.extend_from_slice(b"c__builtin__\nset\nh\x00\x85R");
        }
        p.extend_from_slice(b"t.");
        assert!(protocol_error(&p).contains("amplification"));
    }

    #[test]
    fn cycles_are_refused() {
        // l = []; l.append(l)
        let msg = value_error(b"\x80\x04]\x94h\x00a.");
        assert!(
            msg.contains("recursive structures are not supported"),
            "{msg}"
        );
        // d = {}; d['k'] = (d,)
        let msg = value_error(b"\x80\x04}\x94\x8c\x01kh\x00\x85s.");
        assert!(msg.contains("recursive"), "{msg}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 100000 EMPTY_LISTs, then 99999 APPENDs: a 100000-deep list.
        let mut p = vec![0x80, 4];
        p.extend(std::iter::repeat(EMPTY_LIST).take(100_000));
        p.extend(std::iter::repeat(APPEND).take(99_999));
        p.push(STOP);
        assert!(value_error(&p).contains("deeper than"));
        // 100000 MARKs then 100000 TUPLEs.
        let mut p = vec![0x80, 4];
        p.extend(std::iter::repeat(MARK).take(100_000));
        p.extend(std::iter::repeat(TUPLE).take(100_000));
        p.push(STOP);
        assert!(value_error(&p).contains("deeper than"));
    }

    #[test]
    fn depth_limit_is_exact() {
        let nested = |n: usize| {
            let mut p = vec![0x80, 4];
            p.extend(std::iter::repeat(EMPTY_LIST).take(n));
            p.extend(std::iter::repeat(APPEND).take(n - 1));
            p.push(STOP);
            p
        };
        assert!(decode(&nested(MAX_DEPTH)).is_ok());
        assert!(decode(&nested(MAX_DEPTH + 1)).is_err());
        // A shallow first reference to a deep shared node must not hide its depth:
        // x = 499 nested lists; root = [x, ([x],)] nests 501 deep through the tuple.
        let mut p = vec![0x80, 4];
        p.extend(std::iter::repeat(EMPTY_LIST).take(MAX_DEPTH - 1));
        p.extend(std::iter::repeat(APPEND).take(MAX_DEPTH - 2));
        p.extend_from_slice(&[MEMOIZE, EMPTY_LIST, MARK, BINGET, 0]);
        p.extend_from_slice(&[EMPTY_LIST, BINGET, 0, APPEND, TUPLE1, APPENDS, STOP]);
        assert!(value_error(&p).contains("deeper than"));
    }

    #[test]
    fn malformed_inputs_give_precise_errors() {
        assert_eq!(
            protocol_error(b"\x80\x04\x95\x03\x00\x00\x00\x00\x00\x00\x00Nc."),
            "pickle: truncated: unterminated line (GLOBAL at offset 12)"
        );
        assert_eq!(
            protocol_error(b"\x80\x04N\xff."),
            "pickle: unknown opcode 0xff at offset 3"
        );
        assert!(protocol_error(b"\x80\x04Q.").contains("unsupported opcode BINPERSID"));
        assert!(protocol_error(b"\x80\x04\x97.").contains("NEXT_BUFFER"));
        assert!(protocol_error(b"\x80\x04\x92.").contains("NEWOBJ_EX"));
        assert!(protocol_error(b"\x80\x06N.").contains("unsupported protocol 6"));
        assert!(protocol_error(b"\x80\x04N").contains("no STOP"));
        assert!(protocol_error(b"\x80\x04.").contains("stack underflow"));
        assert!(protocol_error(b"\x80\x04N\x86.").contains("stack underflow (TUPLE2"));
        assert!(protocol_error(b"\x80\x04Nt.").contains("no MARK before (TUPLE"));
        assert!(protocol_error(b"\x80\x04h\x07.").contains("memo get of unknown index 7"));
        assert!(protocol_error(b"\x80\x04NNa.").contains("target is not a list"));
        assert!(protocol_error(b"\x80\x04}(Nu.").contains("odd number"));
        assert!(protocol_error(b"\x80\x04NNb.").contains("target is not an object"));
        assert!(protocol_error(b"\x80\x04)NRNbNb.").contains("second BUILD"));
        assert!(protocol_error(b"\x80\x04K\x01N\x93.").contains("must be strs"));
        // A pop may not cross the innermost MARK (Python's stack fence).
        assert!(protocol_error(b"\x80\x04N(\x85.").contains("stack underflow"));
        assert!(protocol_error(b"\x80\x04\x8c\x01\xff.").contains("not valid utf-8"));
        // "\ud800" as Python writes it with surrogatepass.
        let msg = value_error(b"\x80\x04\x8c\x03\xed\xa0\x80.");
        assert!(msg.contains("lone surrogates are unsupported"), "{msg}");
    }

    #[test]
    fn huge_declared_lengths_allocate_nothing() {
        let cases: [&[u8]; 8] = [
            b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xffab.",
            b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7fab.",
            b"\x80\x05\x96\x00\x00\x00\x00\x00\x00\x00\x01ab.",
            b"\x80\x04X\xff\xff\xff\xffab.",
            b"\x80\x04B\xff\xff\xff\xffab.",
            b"\x80\x04\x8b\xff\xff\xff\x7fab.",
            b"\x80\x04\x8b\xff\xff\xff\xffab.",
            b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xffN.",
        ];
        for p in cases {
            let msg = protocol_error(p);
            assert!(
                msg.contains("truncated") || msg.contains("negative length"),
                "{msg}"
            );
        }
    }

    #[test]
    fn truncation_at_every_offset_fails_cleanly() {
        for pickle in ALL_VALID {
            let bytes = hex(pickle);
            assert!(decode(&bytes).is_ok());
            for end in 0..bytes.len() {
                assert!(decode(&bytes[..end]).is_err(), "{pickle} cut at {end}");
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seeds: Vec<Vec<u8>> = ALL_VALID.iter().map(|p| hex(p)).collect();
        for i in 0..20_000 {
            let mut bytes = if i % 2 == 0 {
                // Pure noise, biased to opcodes by a valid header.
                let len = (next() % 64) as usize;
                let mut b = vec![0x80, 4];
                b.extend((0..len).map(|_| next() as u8));
                b
            } else {
                // A valid pickle with a few bytes flipped.
                let seed = &seeds[(next() % seeds.len() as u64) as usize];
                let mut b = seed.clone();
                for _ in 0..=(next() % 4) {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] = next() as u8;
                }
                b
            };
            bytes.push(STOP);
            let _ = decode(&bytes);
        }
    }
}
