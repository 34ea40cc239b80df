//! The server's view of a pickle: its structure, without building a single object.
//!
//! A queue server never needs to know what an item *is*, only where it is. So a request
//! is not decoded into a tree: [`Scan`] runs the pickle's stack machine over *shapes*
//! (a stack of [`Kind`]s and the byte offset where each entry began), checks every
//! opcode the way CPython's unpickler would, and remembers three things: the region of
//! bytes that built each stack entry, what each memo index was bound to, and the children
//! of the few containers near the bottom of the stack (the request's 4-tuple, its
//! `args` and `kwds`). An item is then cut out of the request as its own opcodes
//! ([`Scan::extract`]): memo indices renumbered from 0, writes nobody reads dropped,
//! references to memo entries outside the item (a memoized method name that the item
//! happens to share) replaced by a copy of what they refer to.
//!
//! Forwarding Python's own opcodes is what makes the server faithful: a list subclass
//! that was APPENDed to, a dict that contains itself, a `__getnewargs_ex__` class, a
//! protocol-2 pickle with Python 2 names all come back exactly as they were sent,
//! because the server never had to represent them.
//!
//! # The region rule
//! Each stack entry starts where its first opcode is, and ends where the next entry
//! beside it starts (or where the opcode that consumes it is). Opcodes that only touch
//! the top of the stack (PUT, FRAME) belong to the entry below them; an entry popped by
//! POP or POP_MARK hands its bytes to whatever is pushed next in its place, so the
//! recursive-tuple idiom Python writes (`... POP BINGET n`) stays one region.
//!
//! # What stays refused
//! Out-of-band buffers and persistent ids (they cannot arrive over a manager
//! connection), protocol 0/1 text opcodes, DUP of an entry outside the item, and
//! mutating a memoized object through a memo reference from outside the region that
//! built it: CPython's pickler never writes the last two, and honouring them would mean
//! building the objects.

use super::decode::{fail_at, OpName};
use super::op::*;
use super::Fragment;
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::HashMap;

/// What the scanner knows about a stack entry: enough to refuse what CPython would refuse
/// and to read the request's own scalars. Positions are byte offsets into the pickle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kind {
    None,
    Bool(bool),
    Int(i64),
    /// An int beyond `i64` (LONG1/LONG4).
    BigInt,
    Float(f64),
    /// A str: where its UTF-8 is, and whether it is valid UTF-8 for Rust (a Python str may
    /// hold lone surrogates, which pickle writes as `surrogatepass` bytes).
    Str {
        at: u32,
        len: u32,
        utf8: bool,
    },
    /// A Python 2 `str` (BINSTRING): the receiving unpickler decides between bytes and str.
    OldStr {
        at: u32,
        len: u32,
    },
    Bytes,
    ByteArray,
    Tuple {
        hashable: bool,
    },
    List,
    Dict,
    Set,
    FrozenSet,
    /// The result of a name lookup or a call: could be anything.
    Object,
}

impl Kind {
    fn unhashable(self) -> bool {
        matches!(
            self,
            Kind::List | Kind::Dict | Kind::Set | Kind::ByteArray | Kind::Tuple { hashable: false }
        )
    }

    /// A str, as Python's `str` would be for STACK_GLOBAL's operands.
    fn str_like(self) -> bool {
        matches!(self, Kind::Str { .. } | Kind::OldStr { .. } | Kind::Object)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::None => "None",
            Kind::Bool(_) => "a bool",
            Kind::Int(_) | Kind::BigInt => "an int",
            Kind::Float(_) => "a float",
            Kind::Str { .. } | Kind::OldStr { .. } => "a str",
            Kind::Bytes => "bytes",
            Kind::ByteArray => "a bytearray",
            Kind::Tuple { .. } => "a tuple",
            Kind::List => "a list",
            Kind::Dict => "a dict",
            Kind::Set => "a set",
            Kind::FrozenSet => "a frozenset",
            Kind::Object => "an object",
        }
    }
}

/// One value in the pickle: the bytes that build it, `[start, end)`, and its kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Region {
    pub start: u32,
    pub end: u32,
    pub kind: Kind,
    serial: u32,
}

/// A stack entry while scanning.
#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u32,
    kind: Kind,
    /// Unique per push, so a children record can tell whether it belongs to this entry.
    serial: u32,
    /// The latest memo binding of this very entry (1-based into `defs`; 0 for none).
    def: u32,
    /// For an entry pushed by a memo GET: the binding it refers to (1-based; 0 otherwise).
    alias: u32,
}

/// One memo binding: a PUT/MEMOIZE opcode and the entry it memoized.
#[derive(Clone, Copy, Debug)]
struct Def {
    put_pos: u32,
    start: u32,
    /// `u32::MAX` until the entry is consumed.
    end: u32,
    kind: Kind,
    /// The previous binding of the same entry (1-based; 0 for none).
    prev: u32,
    /// If the memoized entry was itself a memo reference: the binding it refers to.
    alias: u32,
}

/// A name the item's unpickler will resolve (GLOBAL, STACK_GLOBAL, EXT1/2/4).
#[derive(Clone, Copy, Debug)]
struct Lookup {
    pos: u32,
    module: (u32, u32),
    name: (u32, u32),
    /// For EXT1/2/4: the extension code instead of names.
    code: Option<u32>,
}

/// The children of a container built near the bottom of the stack.
#[derive(Default)]
struct Record {
    serial: u32,
    children: Vec<Region>,
    full: bool,
}

/// Records kept per stack position; 4 covers the request tuple and its fields.
const RECORDED: usize = 4;
/// Children kept for containers above the bottom (`args` and `kwds` are small; a large
/// container there is an item, whose children nobody asks for).
const RECORD_CAP: usize = 8;
/// How deeply copies of outside memo entries may nest inside one item.
const MAX_INLINE_DEPTH: usize = 64;

/// A scanned pickle: valid as far as CPython's unpickler can tell without running code.
pub(crate) struct Scan<'b> {
    bytes: &'b [u8],
    b: Buffers,
    sparse: HashMap<u32, u32>,
    /// `(index, position, previous binding)` for PUTs that rebound an index, sorted.
    rebinds: Vec<(u32, u32, u32)>,
    lookups: Vec<Lookup>,
    /// `(position, protocol)` of each PROTO opcode.
    protos: Vec<(u32, u8)>,
    /// `(position of the object's PUT, position of the mutation)` for mutations applied
    /// through a memo reference, by mutation position and by PUT position.
    mutations_by_pos: Vec<(u32, u32)>,
    mutations_by_put: Vec<(u32, u32)>,
    root: Region,
    /// Bytes extractions may still write: copies of shared entries are bounded by it.
    budget: std::cell::Cell<usize>,
    /// Bytes extractions may still walk (copies of outside entries are walked before
    /// they are written, and FRAMEs are walked but never written).
    work: std::cell::Cell<usize>,
}

/// An argument cut out of a request by `Scan::extract`: its opcodes, and what they name.
#[derive(Clone, Debug, PartialEq)]
pub struct Pickled {
    /// The opcodes, ready to be stored and spliced into replies.
    pub fragment: Fragment,
    /// The first class or function the item names, as `module.name` (for
    /// `--no-code-items`), or `None` for plain data.
    pub names: Option<String>,
}

impl<'b> Scan<'b> {
    /// Scans one whole pickle up to its STOP.
    ///
    /// # Errors
    /// [`Error::Protocol`] naming the opcode and offset for anything CPython's unpickler
    /// would refuse, and for the few opcodes distq cannot forward (see the module docs).
    pub fn new(bytes: &'b [u8]) -> Result<Scan<'b>> {
        if u32::try_from(bytes.len()).is_err() {
            return Err(Error::protocol("pickle: larger than 4 GiB"));
        }
        let mut s = Scanner::new(bytes, 0, None);
        let stop = s.run(None)?;
        let [root] = s.b.stack[..] else {
            return Err(Error::protocol(format!(
                "pickle: STOP with {} values on the stack, not 1",
                s.b.stack.len()
            )));
        };
        let mut scan = Scan {
            bytes,
            b: std::mem::take(&mut s.b),
            sparse: std::mem::take(&mut s.sparse),
            rebinds: std::mem::take(&mut s.rebinds),
            lookups: std::mem::take(&mut s.lookups),
            protos: std::mem::take(&mut s.protos),
            mutations_by_pos: Vec::new(),
            mutations_by_put: Vec::new(),
            root: Region {
                start: root.start,
                end: stop,
                kind: root.kind,
                serial: root.serial,
            },
            budget: std::cell::Cell::new(bytes.len().saturating_mul(4).saturating_add(1 << 20)),
            work: std::cell::Cell::new(bytes.len().saturating_mul(8).saturating_add(1 << 20)),
        };
        scan.rebinds.sort_unstable();
        let mutations: Vec<(u32, u32)> = s
            .alias_mutations
            .iter()
            .map(|&(def, m)| (scan.original(def).put_pos, m))
            .collect();
        scan.mutations_by_pos = mutations.iter().map(|&(put, m)| (m, put)).collect();
        scan.mutations_by_put = mutations;
        scan.mutations_by_put.sort_unstable();
        close_defs(&mut scan.b.defs, &root, stop);
        Ok(scan)
    }

    /// The whole pickle's value.
    pub fn root(&self) -> Region {
        self.root
    }

    /// The children of `r` if it is a tuple, list or dict (dicts: keys and values
    /// alternating) built directly by its own opcodes; `None` otherwise (a memo reference,
    /// an object built by a call).
    ///
    /// # Errors
    /// Only if `r` does not scan on its own (which the whole scan has ruled out).
    pub fn children(&self, r: &Region) -> Result<Option<Cow<'_, [Region]>>> {
        if let Some(rec) = self
            .b
            .records
            .iter()
            .find(|rec| rec.serial == r.serial && !rec.full)
        {
            return Ok(Some(Cow::Borrowed(&rec.children)));
        }
        let mut s = Scanner::new(self.bytes, r.start, Some(self));
        s.run(Some(r.end))?;
        match s.b.stack[..] {
            [only] if s.b.records[0].serial == only.serial && !s.b.records[0].full => Ok(Some(
                Cow::Owned(std::mem::take(&mut s.b.records[0].children)),
            )),
            _ => Ok(None),
        }
    }

    /// The UTF-8 of a str entry, if it is valid Rust UTF-8.
    pub fn str(&self, r: &Region) -> Option<&'b str> {
        match r.kind {
            Kind::Str {
                at,
                len,
                utf8: true,
            } => std::str::from_utf8(&self.bytes[at as usize..(at + len) as usize]).ok(),
            _ => None,
        }
    }

    /// The protocol CPython's unpickler has in effect at `pos`, as far as it matters:
    /// below 3 it maps Python 2 names (`fix_imports`), from 3 on it does not.
    fn proto_at(&self, pos: u32) -> u8 {
        let i = self.protos.partition_point(|&(p, _)| p < pos);
        let p = i.checked_sub(1).map_or(0, |i| self.protos[i].1);
        if p >= 3 {
            4
        } else {
            p
        }
    }

    /// The binding memo index `idx` had when the GET at `pos` ran.
    fn binding_at(&self, idx: u32, pos: u32) -> Option<u32> {
        // `rebinds` is sorted by (index, position): the first rebinding of `idx` after
        // `pos` holds the binding that was current at `pos`.
        let later = self
            .rebinds
            .partition_point(|&(i, p, _)| (i, p) <= (idx, pos));
        if let Some(&(i, _, old)) = self.rebinds.get(later) {
            if i == idx {
                return Some(old);
            }
        }
        let now = match self.b.memo.get(idx as usize) {
            Some(&d) => d,
            None => self.sparse.get(&idx).copied().unwrap_or(0),
        };
        (now != 0).then_some(now)
    }

    /// Follows memo references to the binding of the entry that was built.
    fn original(&self, mut def: u32) -> &Def {
        loop {
            let d = &self.b.defs[def as usize - 1];
            if d.alias == 0 {
                return d;
            }
            def = d.alias;
        }
    }

    /// Cuts `r` out as a standalone fragment.
    ///
    /// # Errors
    /// [`Error::Value`] for the shapes distq cannot cut out faithfully (see the module
    /// docs) and when copies of shared entries would exceed four times the request.
    pub fn extract(&self, r: &Region) -> Result<Pickled> {
        let mut out = Vec::with_capacity((r.end - r.start) as usize);
        let mut state = Emit {
            next_memo: 0,
            proto: 4,
            names: None,
        };
        self.emit(r.start, r.end, &mut out, &mut state, 0)?;
        if state.proto != 4 {
            out.extend_from_slice(&[PROTO, 4]);
        }
        let names = state.names.map(|l| self.lookup_name(&l));
        Ok(Pickled {
            fragment: Fragment::from_parts(out, state.next_memo > 0),
            names,
        })
    }

    fn lookup_name(&self, l: &Lookup) -> String {
        if let Some(code) = l.code {
            return format!("copyreg extension code {code}");
        }
        let text = |(at, len): (u32, u32)| {
            let raw = &self.bytes[at as usize..(at as usize + len as usize)];
            let cut = &raw[..raw.len().min(100)];
            String::from_utf8_lossy(cut).into_owned()
        };
        format!("{}.{}", text(l.module), text(l.name))
    }

    /// Writes the opcodes of `[start, end)` to `out`, renumbering memo indices from
    /// `state.next_memo` and copying outside entries in.
    fn emit(
        &self,
        start: u32,
        end: u32,
        out: &mut Vec<u8>,
        state: &mut Emit,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_INLINE_DEPTH {
            return Err(unforwardable(
                "an item shares memo entries nested more than 64 deep with the rest of its request",
            ));
        }
        let inside = |p: u32| (start..end).contains(&p);
        let in_range = |v: &[(u32, u32)]| {
            let from = v.partition_point(|&(k, _)| k < start);
            let to = v.partition_point(|&(k, _)| k < end);
            v[from..to].iter().any(|&(_, other)| !inside(other))
        };
        if in_range(&self.mutations_by_pos) || in_range(&self.mutations_by_put) {
            return Err(unforwardable(
                "the pickle changes a memoized object from outside the value that built it \
                 (Python's pickler never writes that); distq cannot cut the item out faithfully",
            ));
        }
        let walk = (end - start) as usize;
        if walk > self.work.get() {
            return Err(unforwardable(
                "the items of this request share so much that cutting them out would take more \
                 than eight passes over it; send them in separate requests",
            ));
        }
        self.work.set(self.work.get() - walk);
        let bytes = &self.bytes[..end as usize];
        // Pass 1: which PUTs are read inside, which outside entries are referenced, and
        // whether the bytes can be copied as they are.
        let mut needed: Vec<u32> = Vec::new();
        let mut outside: Vec<u32> = Vec::new();
        let mut verbatim = true;
        let mut height: usize = 0;
        let mut fences: Vec<usize> = Vec::new();
        let mut pos = start as usize;
        while pos < end as usize {
            let (op, arg, next) = read_op(bytes, pos)?;
            let p = pos as u32;
            match op {
                FRAME | PROTO | MEMOIZE | BINPUT | LONG_BINPUT => verbatim = false,
                BINGET | LONG_BINGET => {
                    verbatim = false;
                    let idx = memo_arg(op, &bytes[arg..next]);
                    let def = self
                        .binding_at(idx, p)
                        .ok_or_else(|| fail_at(op, pos, "memo value not found"))?;
                    let d = self.original(def);
                    if (start..end).contains(&d.put_pos) {
                        needed.push(d.put_pos);
                    } else {
                        if d.start <= start && d.end >= end {
                            return Err(unforwardable(
                                "an item refers to a container of the request it is in",
                            ));
                        }
                        outside.push(d.put_pos);
                    }
                }
                GLOBAL | STACK_GLOBAL | EXT1 | EXT2 | EXT4 if self.proto_at(p) != state.proto => {
                    verbatim = false
                }
                _ => {}
            }
            let fence = fences.last().copied().unwrap_or(0);
            let underflow = || {
                unforwardable(format!(
                    "{} at offset {pos} reaches outside the item it is part of (Python's pickler \
                     never writes that)",
                    OpName(op)
                ))
            };
            let (pops, pushes) = effect(op);
            match pops {
                Pops::Mark => {
                    let f = fences.pop().ok_or_else(underflow)?;
                    height = f;
                }
                Pops::MarkKeep => {
                    let f = fences.pop().ok_or_else(underflow)?;
                    if f < 1 + fences.last().copied().unwrap_or(0) {
                        return Err(underflow());
                    }
                    height = f;
                }
                Pops::PopOrMark => {
                    if height > fence {
                        height -= 1;
                    } else {
                        height = fences.pop().ok_or_else(underflow)?;
                    }
                }
                Pops::N(n) => {
                    if height < fence + n {
                        return Err(underflow());
                    }
                    height -= n;
                }
            }
            if op == MARK {
                fences.push(height);
            }
            height += pushes;
            pos = next;
        }
        if height != 1 || !fences.is_empty() {
            return Err(unforwardable(
                "an item's bytes do not build exactly one value",
            ));
        }
        if state.names.is_none() {
            let i = self.lookups.partition_point(|l| l.pos < start);
            if let Some(l) = self.lookups.get(i).filter(|l| l.pos < end) {
                state.names = Some(*l);
            }
        }
        if verbatim {
            return self.charge(out, &self.bytes[start as usize..end as usize]);
        }
        needed.sort_unstable();
        needed.dedup();
        // Each outside entry: its PUT position and how often the item refers to it, sorted.
        outside.sort_unstable();
        let mut refs: Vec<(u32, u32)> = Vec::new();
        for put in outside {
            match refs.last_mut() {
                Some((p, n)) if *p == put => *n += 1,
                _ => refs.push((put, 1)),
            }
        }
        // Pass 2: copy, renumbering.
        let mut renamed: Vec<(u32, u32)> = Vec::new(); // (put_pos, new index), by put_pos
                                                       // Per entry of `refs`: not copied yet, or copied (under this memo index if any).
        let mut copied: Vec<Option<Option<u32>>> = vec![None; refs.len()];
        let mut pos = start as usize;
        while pos < end as usize {
            let (op, arg, next) = read_op(bytes, pos)?;
            let p = pos as u32;
            match op {
                FRAME | PROTO => {}
                MEMOIZE | BINPUT | LONG_BINPUT => {
                    if needed.binary_search(&p).is_ok() {
                        let n = state.next_memo;
                        state.next_memo += 1;
                        renamed.push((p, n));
                        self.charge(out, &put_op(n))?;
                    }
                }
                BINGET | LONG_BINGET => {
                    let idx = memo_arg(op, &bytes[arg..next]);
                    let def = self
                        .binding_at(idx, p)
                        .ok_or_else(|| fail_at(op, pos, "memo value not found"))?;
                    let d = *self.original(def);
                    if (start..end).contains(&d.put_pos) {
                        let i = renamed
                            .binary_search_by_key(&d.put_pos, |&(pp, _)| pp)
                            .map_err(|_| fail_at(op, pos, "memo value not found"))?;
                        self.charge(out, &get_op(renamed[i].1))?;
                    } else {
                        let i = refs
                            .binary_search_by_key(&d.put_pos, |&(pp, _)| pp)
                            .map_err(|_| fail_at(op, pos, "memo value not found"))?;
                        match copied[i] {
                            Some(Some(n)) => self.charge(out, &get_op(n))?,
                            Some(None) => unreachable_copy()?,
                            None => {
                                self.emit(d.start, d.end, out, state, depth + 1)?;
                                let n = (refs[i].1 > 1).then(|| {
                                    let n = state.next_memo;
                                    state.next_memo += 1;
                                    n
                                });
                                if let Some(n) = n {
                                    self.charge(out, &put_op(n))?;
                                }
                                copied[i] = Some(n);
                            }
                        }
                    }
                }
                GLOBAL | STACK_GLOBAL | EXT1 | EXT2 | EXT4 => {
                    let want = self.proto_at(p);
                    if want != state.proto {
                        self.charge(out, &[PROTO, want])?;
                        state.proto = want;
                    }
                    self.charge(out, &bytes[pos..next])?;
                }
                _ => self.charge(out, &bytes[pos..next])?,
            }
            pos = next;
        }
        Ok(())
    }

    fn charge(&self, out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
        let left = self.budget.get();
        if bytes.len() > left {
            return Err(unforwardable(
                "the items of this request share so much that copying them would exceed four \
                 times the request's size; send them in separate requests",
            ));
        }
        self.budget.set(left - bytes.len());
        out.extend_from_slice(bytes);
        Ok(())
    }
}

/// A GET of an outside entry referenced once is copied where it occurs; a second GET
/// of it is counted in pass 1, so pass 2 always has an index for it.
fn unreachable_copy() -> Result<()> {
    Err(Error::protocol(
        "pickle: memo reference counted once but used twice",
    ))
}

/// A pickle CPython would load but distq cannot cut apart faithfully.
fn unforwardable(msg: impl Into<String>) -> Error {
    Error::Value(msg.into())
}

struct Emit {
    next_memo: u32,
    proto: u8,
    names: Option<Lookup>,
}

/// A memo opcode for index `n`: the one-byte form when it fits.
struct MemoOp {
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

fn put_op(n: u32) -> MemoOp {
    memo_op([BINPUT, LONG_BINPUT], n)
}

fn get_op(n: u32) -> MemoOp {
    memo_op([BINGET, LONG_BINGET], n)
}

fn memo_arg(op: u8, arg: &[u8]) -> u32 {
    match op {
        BINGET | BINPUT => u32::from(arg[0]),
        _ => u32::from_le_bytes([arg[0], arg[1], arg[2], arg[3]]),
    }
}

/// What an opcode takes off the stack.
#[derive(Clone, Copy)]
enum Pops {
    N(usize),
    /// Everything above the top mark, and the mark.
    Mark,
    /// Everything above the top mark and the mark, with a target left below it.
    MarkKeep,
    /// POP: the top value, or the top mark if there is no value above it.
    PopOrMark,
}

/// The stack effect of an opcode `read_op` accepted: what it pops, how many it pushes.
/// Targets that stay (APPEND's list) count as popped and pushed again.
fn effect(op: u8) -> (Pops, usize) {
    match op {
        MARK | PROTO | FRAME | MEMOIZE | BINPUT | LONG_BINPUT => (Pops::N(0), 0),
        DUP => (Pops::N(1), 2),
        POP => (Pops::PopOrMark, 0),
        POP_MARK => (Pops::Mark, 0),
        TUPLE | FROZENSET => (Pops::Mark, 1),
        APPENDS | SETITEMS | ADDITEMS => (Pops::MarkKeep, 0),
        TUPLE1 => (Pops::N(1), 1),
        TUPLE2 | REDUCE | NEWOBJ | STACK_GLOBAL | APPEND | BUILD => (Pops::N(2), 1),
        TUPLE3 | NEWOBJ_EX | SETITEM => (Pops::N(3), 1),
        _ => (Pops::N(0), 1),
    }
}

/// Reads the opcode at `pos`: `(opcode, start of its argument, start of the next opcode)`.
/// Every length is checked against the bytes present; refused opcodes are errors here.
#[inline]
fn read_op(b: &[u8], pos: usize) -> Result<(u8, usize, usize)> {
    let op = *b
        .get(pos)
        .ok_or_else(|| Error::protocol(format!("pickle: truncated at offset {pos}, no STOP")))?;
    let arg = pos + 1;
    let fixed = |n: usize| -> Result<usize> {
        if b.len() - arg < n {
            Err(fail_at(
                op,
                pos,
                format_args!("truncated: needs {n} bytes, {} left", b.len() - arg),
            ))
        } else {
            Ok(arg + n)
        }
    };
    let counted = |w: usize| -> Result<usize> {
        let head = fixed(w)?;
        let raw = &b[arg..head];
        let n: u64 = match w {
            1 => u64::from(raw[0]),
            4 if matches!(op, LONG4 | BINSTRING) => {
                let n = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                u64::try_from(n).map_err(|_| fail_at(op, pos, "negative byte count"))?
            }
            4 => u64::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]])),
            _ => u64::from_le_bytes(raw.try_into().unwrap_or_default()),
        };
        let left = (b.len() - head) as u64;
        if n > left {
            return Err(fail_at(
                op,
                pos,
                format_args!("truncated: needs {n} bytes, {left} left"),
            ));
        }
        Ok(head + n as usize)
    };
    let next = match op {
        MARK | STOP | POP | POP_MARK | DUP | EMPTY_TUPLE | TUPLE | TUPLE1 | TUPLE2 | TUPLE3
        | EMPTY_LIST | APPEND | APPENDS | EMPTY_DICT | SETITEM | SETITEMS | EMPTY_SET
        | ADDITEMS | FROZENSET | NONE | NEWTRUE | NEWFALSE | REDUCE | NEWOBJ | NEWOBJ_EX
        | BUILD | STACK_GLOBAL | MEMOIZE => arg,
        PROTO | BININT1 | BINGET | BINPUT | EXT1 => fixed(1)?,
        BININT2 | EXT2 => fixed(2)?,
        BININT | LONG_BINGET | LONG_BINPUT | EXT4 => fixed(4)?,
        BINFLOAT | FRAME => fixed(8)?,
        LONG1 | SHORT_BINUNICODE | SHORT_BINBYTES | SHORT_BINSTRING => counted(1)?,
        LONG4 | BINUNICODE | BINBYTES | BINSTRING => counted(4)?,
        BINUNICODE8 | BINBYTES8 | BYTEARRAY8 => counted(8)?,
        GLOBAL => {
            let first = line_end(b, arg).ok_or_else(|| fail_at(op, pos, "truncated line"))?;
            line_end(b, first + 1).ok_or_else(|| fail_at(op, pos, "truncated line"))? + 1
        }
        NEXT_BUFFER | READONLY_BUFFER => {
            return Err(fail_at(
                op,
                pos,
                "out-of-band buffers cannot travel over a manager connection (pickle them in band)",
            ))
        }
        PERSID | BINPERSID => return Err(fail_at(
            op,
            pos,
            "persistent ids need the sender's persistent_load, which a queue server does not have",
        )),
        _ if op_is_text(op) => {
            return Err(fail_at(
                op,
                pos,
                "protocol 0/1 text opcodes are not supported; pickle with protocol 2 or higher \
                 (every Python 3 manager client does)",
            ))
        }
        _ => return Err(fail_at(op, pos, "unknown opcode")),
    };
    Ok((op, arg, next))
}

fn op_is_text(op: u8) -> bool {
    matches!(
        op,
        b'I' | b'L' | b'F' | b'S' | b'V' | b'g' | b'p' | b'i' | b'o' | b'd' | b'l'
    )
}

fn line_end(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?
        .iter()
        .position(|&c| c == b'\n')
        .map(|i| from + i)
}

/// Python's `bytes.decode('utf-8', 'surrogatepass')` succeeds: UTF-8 where the three-byte
/// forms of U+D800..U+DFFF are allowed. Returns `(valid for Python, valid for Rust)`.
fn python_utf8(mut b: &[u8]) -> (bool, bool) {
    if b.is_ascii() {
        return (true, true);
    }
    let mut rust = true;
    loop {
        match std::str::from_utf8(b) {
            Ok(_) => return (true, rust),
            Err(e) => {
                let rest = &b[e.valid_up_to()..];
                match rest {
                    [0xed, 0xa0..=0xbf, 0x80..=0xbf, ..] => {
                        rust = false;
                        b = &rest[3..];
                    }
                    _ => return (false, false),
                }
            }
        }
    }
}

fn close_defs(defs: &mut [Def], e: &Entry, end: u32) {
    let mut d = e.def;
    while d != 0 {
        let def = &mut defs[d as usize - 1];
        def.end = end;
        d = def.prev;
    }
}

/// The vectors of a scan, kept per thread between requests (a connection's thread scans
/// one request after another), so that scanning a request allocates nothing.
#[derive(Default)]
struct Buffers {
    stack: Vec<Entry>,
    marks: Vec<(usize, u32)>,
    defs: Vec<Def>,
    memo: Vec<u32>,
    records: [Record; RECORDED],
}

thread_local! {
    static SPARE: std::cell::Cell<Option<Buffers>> = const { std::cell::Cell::new(None) };
}

/// Buffers larger than this many entries go back to the allocator instead of being kept.
const KEEP_UP_TO: usize = 4096;

impl Buffers {
    fn take() -> Buffers {
        SPARE.with(|s| s.take()).unwrap_or_else(|| Buffers {
            stack: Vec::with_capacity(16),
            marks: Vec::with_capacity(4),
            defs: Vec::with_capacity(8),
            memo: Vec::with_capacity(8),
            records: Default::default(),
        })
    }

    fn give_back(&mut self) {
        let small = self
            .stack
            .capacity()
            .max(self.defs.capacity())
            .max(self.memo.capacity())
            <= KEEP_UP_TO
            && self
                .records
                .iter()
                .all(|r| r.children.capacity() <= KEEP_UP_TO);
        if self.stack.capacity() == 0 || !small {
            return;
        }
        let mut b = std::mem::take(self);
        b.stack.clear();
        b.marks.clear();
        b.defs.clear();
        b.memo.clear();
        for r in &mut b.records {
            r.serial = 0;
            r.full = false;
            r.children.clear();
        }
        SPARE.with(|s| s.set(Some(b)));
    }
}

impl Drop for Scan<'_> {
    fn drop(&mut self) {
        self.b.give_back();
    }
}

impl Drop for Scanner<'_, '_> {
    fn drop(&mut self) {
        if self.outer.is_none() {
            self.b.give_back();
        }
    }
}

/// The stack machine over kinds.
struct Scanner<'b, 'o> {
    bytes: &'b [u8],
    pos: usize,
    op: u8,
    op_pos: usize,
    /// Set when re-scanning a region of an already scanned pickle: memo references are
    /// resolved there, and nothing is recorded but the region's own children.
    outer: Option<&'o Scan<'b>>,
    b: Buffers,
    carry: Option<u32>,
    serial: u32,
    sparse: HashMap<u32, u32>,
    memo_len: u32,
    rebinds: Vec<(u32, u32, u32)>,
    lookups: Vec<Lookup>,
    protos: Vec<(u32, u8)>,
    alias_mutations: Vec<(u32, u32)>,
}

impl<'b, 'o> Scanner<'b, 'o> {
    fn new(bytes: &'b [u8], pos: u32, outer: Option<&'o Scan<'b>>) -> Self {
        Scanner {
            bytes,
            pos: pos as usize,
            op: 0,
            op_pos: pos as usize,
            outer,
            b: if outer.is_some() {
                Buffers::default()
            } else {
                Buffers::take()
            },
            carry: None,
            // Regions from a re-scan must never match the whole scan's records.
            serial: if outer.is_some() { 1 << 31 } else { 0 },
            sparse: HashMap::new(),
            memo_len: 0,
            rebinds: Vec::new(),
            lookups: Vec::new(),
            protos: Vec::new(),
            alias_mutations: Vec::new(),
        }
    }

    fn fail(&self, what: impl std::fmt::Display) -> Error {
        fail_at(self.op, self.op_pos, what)
    }

    fn fence(&self) -> usize {
        self.b.marks.last().map_or(0, |m| m.0)
    }

    fn need(&self, n: usize) -> Result<usize> {
        let len = self.b.stack.len();
        if len < self.fence() + n {
            return Err(self.fail("stack underflow"));
        }
        Ok(len - n)
    }

    fn push(&mut self, kind: Kind) {
        let start = self.carry.take().unwrap_or(self.op_pos as u32);
        self.push_at(start, kind);
    }

    fn push_at(&mut self, start: u32, kind: Kind) {
        self.serial += 1;
        self.b.stack.push(Entry {
            start,
            kind,
            serial: self.serial,
            def: 0,
            alias: 0,
        });
    }

    fn kind(&self, i: usize) -> Kind {
        self.b.stack[i].kind
    }

    /// Pops `stack[from..]`, closing their regions; `into` names the record (stack
    /// index) that collects them as children.
    fn consume(&mut self, from: usize, into: Option<usize>) {
        self.carry = None;
        let end = self.op_pos as u32;
        for i in from..self.b.stack.len() {
            let e = self.b.stack[i];
            let e_end = self.b.stack.get(i + 1).map_or(end, |n| n.start);
            close_defs(&mut self.b.defs, &e, e_end);
            if let Some(r) = into {
                let cap = if r == 0 { usize::MAX } else { RECORD_CAP };
                let rec = &mut self.b.records[r];
                if rec.children.len() >= cap {
                    rec.full = true;
                    rec.children.clear();
                }
                if !rec.full {
                    rec.children.push(Region {
                        start: e.start,
                        end: e_end,
                        kind: e.kind,
                        serial: e.serial,
                    });
                }
            }
        }
        self.b.stack.truncate(from);
    }

    /// Whether the container at stack index `i` has a children record worth filling.
    fn recording(&self, i: usize) -> bool {
        i < RECORDED
            && self.b.records[i].serial == self.b.stack[i].serial
            && !self.b.records[i].full
    }

    /// Starts an empty children record at stack index `i` for the entry with `serial`.
    fn record_new(&mut self, i: usize, serial: u32) -> Option<usize> {
        let rec = self.b.records.get_mut(i)?;
        rec.serial = serial;
        rec.children.clear();
        rec.full = false;
        Some(i)
    }

    /// A mutation of the entry at `i`: through a memo reference it is noted, so that an
    /// extraction can refuse to split the object from its change.
    fn mutate(&mut self, i: usize) {
        let e = self.b.stack[i];
        if e.alias != 0 {
            self.alias_mutations.push((e.alias, self.op_pos as u32));
        }
    }

    fn bind(&mut self, idx: u32) -> Result<()> {
        let top = *self
            .b
            .stack
            .last()
            .filter(|_| self.b.stack.len() > self.fence())
            .ok_or_else(|| self.fail("stack underflow"))?;
        if self.outer.is_some() {
            return Ok(());
        }
        self.b.defs.push(Def {
            put_pos: self.op_pos as u32,
            start: top.start,
            end: u32::MAX,
            kind: top.kind,
            prev: top.def,
            alias: top.alias,
        });
        let id = self.b.defs.len() as u32;
        if let Some(t) = self.b.stack.last_mut() {
            t.def = id;
        }
        let len = self.b.memo.len();
        let old = if (idx as usize) < len {
            std::mem::replace(&mut self.b.memo[idx as usize], id)
        } else if (idx as usize) <= 2 * len + 64 {
            self.b.memo.resize(idx as usize + 1, 0);
            self.b.memo[idx as usize] = id;
            0
        } else {
            self.sparse.insert(idx, id).unwrap_or(0)
        };
        if old == 0 {
            self.memo_len += 1;
        } else {
            self.rebinds.push((idx, self.op_pos as u32, old));
        }
        Ok(())
    }

    fn get(&mut self, idx: u32) -> Result<()> {
        let (def, kind) = match self.outer {
            Some(outer) => {
                let def = outer
                    .binding_at(idx, self.op_pos as u32)
                    .ok_or_else(|| self.fail("memo value not found"))?;
                (def, outer.original(def).kind)
            }
            None => {
                let def = match self.b.memo.get(idx as usize) {
                    Some(&d) => d,
                    None => self.sparse.get(&idx).copied().unwrap_or(0),
                };
                if def == 0 {
                    return Err(self.fail(format_args!("memo value not found at index {idx}")));
                }
                let mut d = def;
                while self.b.defs[d as usize - 1].alias != 0 {
                    d = self.b.defs[d as usize - 1].alias;
                }
                (def, self.b.defs[d as usize - 1].kind)
            }
        };
        self.push(kind);
        if let Some(t) = self.b.stack.last_mut() {
            t.alias = def;
        }
        Ok(())
    }

    fn lookup(&mut self, module: (u32, u32), name: (u32, u32), code: Option<u32>) {
        if self.outer.is_none() {
            self.lookups.push(Lookup {
                pos: self.op_pos as u32,
                module,
                name,
                code,
            });
        }
    }

    fn str_kind(&self, at: usize, len: usize) -> Result<Kind> {
        let (python, rust) = python_utf8(&self.bytes[at..at + len]);
        if !python {
            return Err(self.fail("str is not valid UTF-8 (even with surrogates)"));
        }
        Ok(Kind::Str {
            at: at as u32,
            len: len as u32,
            utf8: rust,
        })
    }

    /// Runs to STOP (`until` is `None`; returns STOP's offset) or to `until`.
    fn run(&mut self, until: Option<u32>) -> Result<u32> {
        loop {
            if let Some(u) = until {
                if self.pos >= u as usize {
                    return Ok(u);
                }
            }
            let (op, arg, next) = read_op(self.bytes, self.pos)?;
            self.op = op;
            self.op_pos = self.pos;
            self.pos = next;
            let a = &self.bytes[arg..next];
            match op {
                STOP => {
                    if until.is_some() {
                        return Err(self.fail("STOP inside a value"));
                    }
                    if !self.b.marks.is_empty() {
                        return Err(self.fail("MARK without its closing opcode"));
                    }
                    return Ok(self.op_pos as u32);
                }
                PROTO => {
                    if a[0] > 5 {
                        return Err(self.fail(format_args!("unsupported protocol {}", a[0])));
                    }
                    if self.outer.is_none() {
                        self.protos.push((self.op_pos as u32, a[0]));
                    }
                }
                FRAME => {}
                MEMOIZE => self.bind(self.memo_len)?,
                BINPUT | LONG_BINPUT => self.bind(memo_arg(op, a))?,
                BINGET | LONG_BINGET => self.get(memo_arg(op, a))?,
                MARK => {
                    let start = self.carry.take().unwrap_or(self.op_pos as u32);
                    self.b.marks.push((self.b.stack.len(), start));
                }
                POP => {
                    let above_fence = self.b.stack.len() > self.fence();
                    if let Some(e) = above_fence.then(|| self.b.stack.pop()).flatten() {
                        close_defs(&mut self.b.defs, &e, self.op_pos as u32);
                        self.carry = Some(self.carry.map_or(e.start, |c| c.min(e.start)));
                    } else {
                        let (_, start) = self
                            .b
                            .marks
                            .pop()
                            .ok_or_else(|| self.fail("stack underflow"))?;
                        self.carry = Some(self.carry.map_or(start, |c| c.min(start)));
                    }
                }
                POP_MARK => {
                    let (at, start) = self.b.marks.pop().ok_or_else(|| self.fail("no MARK"))?;
                    self.consume(at, None);
                    self.carry = Some(start);
                }
                DUP => {
                    let i = self.need(1)?;
                    let e = self.b.stack[i];
                    self.push(e.kind);
                    if let Some(t) = self.b.stack.last_mut() {
                        // The copy is the same object: mutating it is mutating the original.
                        t.alias = e.alias;
                        t.def = 0;
                    }
                }
                NONE => self.push(Kind::None),
                NEWTRUE => self.push(Kind::Bool(true)),
                NEWFALSE => self.push(Kind::Bool(false)),
                BININT1 => self.push(Kind::Int(i64::from(a[0]))),
                BININT2 => self.push(Kind::Int(i64::from(u16::from_le_bytes([a[0], a[1]])))),
                BININT => self.push(Kind::Int(i64::from(i32::from_le_bytes([
                    a[0], a[1], a[2], a[3],
                ])))),
                LONG1 | LONG4 => {
                    let w = if op == LONG1 { 1 } else { 4 };
                    let payload = &a[w..];
                    let kind = if payload.len() <= 8 {
                        let fill = if payload.last().is_some_and(|&x| x >= 0x80) {
                            0xff
                        } else {
                            0
                        };
                        let mut buf = [fill; 8];
                        buf[..payload.len()].copy_from_slice(payload);
                        Kind::Int(i64::from_le_bytes(buf))
                    } else {
                        Kind::BigInt
                    };
                    self.push(kind);
                }
                BINFLOAT => {
                    let raw: [u8; 8] = a.try_into().unwrap_or_default();
                    self.push(Kind::Float(f64::from_be_bytes(raw)));
                }
                SHORT_BINUNICODE => self.push_str(arg + 1, a.len() - 1)?,
                BINUNICODE => self.push_str(arg + 4, a.len() - 4)?,
                BINUNICODE8 => self.push_str(arg + 8, a.len() - 8)?,
                SHORT_BINSTRING => self.push(Kind::OldStr {
                    at: (arg + 1) as u32,
                    len: (a.len() - 1) as u32,
                }),
                BINSTRING => self.push(Kind::OldStr {
                    at: (arg + 4) as u32,
                    len: (a.len() - 4) as u32,
                }),
                SHORT_BINBYTES | BINBYTES | BINBYTES8 => self.push(Kind::Bytes),
                BYTEARRAY8 => self.push(Kind::ByteArray),
                EMPTY_TUPLE | EMPTY_LIST | EMPTY_DICT => {
                    self.push(match op {
                        EMPTY_TUPLE => Kind::Tuple { hashable: true },
                        EMPTY_LIST => Kind::List,
                        _ => Kind::Dict,
                    });
                    let i = self.b.stack.len() - 1;
                    self.record_new(i, self.serial);
                }
                EMPTY_SET => self.push(Kind::Set),
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1 + 1);
                    let from = self.need(n)?;
                    self.tuple(from, None);
                }
                TUPLE => {
                    let (at, start) = self.b.marks.pop().ok_or_else(|| self.fail("no MARK"))?;
                    self.tuple(at, Some(start));
                }
                FROZENSET => {
                    let (at, start) = self.b.marks.pop().ok_or_else(|| self.fail("no MARK"))?;
                    if let Some(i) = (at..self.b.stack.len()).find(|&i| self.kind(i).unhashable()) {
                        return Err(self.fail(format_args!(
                            "frozenset element is {} (unhashable)",
                            self.kind(i).name()
                        )));
                    }
                    self.consume(at, None);
                    self.push_at(start, Kind::FrozenSet);
                }
                APPEND => {
                    let from = self.need(2)?;
                    self.check_target(from, &[Kind::List, Kind::Object], "list")?;
                    self.fill(from, 1, true);
                }
                APPENDS | SETITEMS | ADDITEMS => {
                    let (at, _) = self.b.marks.pop().ok_or_else(|| self.fail("no MARK"))?;
                    if at == 0 || at <= self.fence() {
                        return Err(self.fail("no target below the MARK"));
                    }
                    let t = at - 1;
                    match op {
                        APPENDS => self.check_target(t, &[Kind::List, Kind::Object], "list")?,
                        SETITEMS => self.setitems(t, at)?,
                        _ => {
                            self.check_target(t, &[Kind::Set, Kind::Object], "set")?;
                            if let Some(i) =
                                (at..self.b.stack.len()).find(|&i| self.kind(i).unhashable())
                            {
                                return Err(self.fail(format_args!(
                                    "set element is {} (unhashable)",
                                    self.kind(i).name()
                                )));
                            }
                        }
                    }
                    self.fill(t, at - t, op != ADDITEMS);
                }
                SETITEM => {
                    let from = self.need(3)?;
                    self.setitems(from, from + 1)?;
                    self.fill(from, 1, true);
                }
                GLOBAL => {
                    let m_end = line_end(self.bytes, arg).unwrap_or(arg);
                    let n_end = next - 1;
                    let module = (arg as u32, (m_end - arg) as u32);
                    let name = ((m_end + 1) as u32, (n_end - m_end - 1) as u32);
                    for (at, len) in [module, name] {
                        let raw = &self.bytes[at as usize..(at + len) as usize];
                        if std::str::from_utf8(raw).is_err() {
                            return Err(self.fail("global name is not valid UTF-8"));
                        }
                    }
                    self.lookup(module, name, None);
                    self.push(Kind::Object);
                }
                STACK_GLOBAL => {
                    let from = self.need(2)?;
                    let (m, n) = (self.kind(from), self.kind(from + 1));
                    if !m.str_like() || !n.str_like() {
                        return Err(self.fail("STACK_GLOBAL requires str"));
                    }
                    let span = |k: Kind| match k {
                        Kind::Str { at, len, .. } | Kind::OldStr { at, len } => (at, len),
                        _ => (0, 0),
                    };
                    self.lookup(span(m), span(n), None);
                    self.call(from, Kind::Object);
                }
                EXT1 | EXT2 | EXT4 => {
                    let mut buf = [0u8; 4];
                    buf[..a.len()].copy_from_slice(a);
                    let code = u32::from_le_bytes(buf);
                    if code == 0 {
                        return Err(self.fail("EXT specifies code <= 0"));
                    }
                    self.lookup((0, 0), (0, 0), Some(code));
                    self.push(Kind::Object);
                }
                REDUCE => {
                    let from = self.need(2)?;
                    self.operand(from, &[Kind::Object], "callable")?;
                    self.operand(
                        from + 1,
                        &[Kind::Tuple { hashable: true }, Kind::Object],
                        "argument tuple",
                    )?;
                    self.call(from, Kind::Object);
                }
                NEWOBJ | NEWOBJ_EX => {
                    let n = if op == NEWOBJ { 2 } else { 3 };
                    let from = self.need(n)?;
                    self.operand(from, &[Kind::Object], "class")?;
                    self.operand(
                        from + 1,
                        &[Kind::Tuple { hashable: true }, Kind::Object],
                        "argument tuple",
                    )?;
                    if op == NEWOBJ_EX {
                        self.operand(from + 2, &[Kind::Dict, Kind::Object], "keyword arguments")?;
                    }
                    self.call(from, Kind::Object);
                }
                BUILD => {
                    let from = self.need(2)?;
                    self.check_target(from, &[Kind::Object], "object")?;
                    self.fill(from, 1, false);
                }
                _ => return Err(self.fail("unexpected opcode")),
            }
        }
    }

    fn push_str(&mut self, at: usize, len: usize) -> Result<()> {
        let kind = self.str_kind(at, len)?;
        self.push(kind);
        Ok(())
    }

    fn tuple(&mut self, from: usize, mark_start: Option<u32>) {
        let hashable = (from..self.b.stack.len()).all(|i| !self.kind(i).unhashable());
        let start = mark_start.unwrap_or_else(|| {
            self.b
                .stack
                .get(from)
                .map_or(self.op_pos as u32, |e| e.start)
        });
        // The tuple takes the next serial: its record is keyed by it.
        let into = self.record_new(from, self.serial + 1);
        self.consume(from, into);
        self.push_at(start, Kind::Tuple { hashable });
    }

    /// Replaces `stack[from..]` (a callable and its arguments) with the call's result.
    fn call(&mut self, from: usize, kind: Kind) {
        let start = self.b.stack[from].start;
        self.consume(from, None);
        self.push_at(start, kind);
    }

    /// Consumes the values above the target at `t` (`skip` entries between are the
    /// target itself), recording them as its children if it is recorded.
    fn fill(&mut self, t: usize, skip: usize, may_record: bool) {
        self.mutate(t);
        let into = (may_record && self.recording(t)).then_some(t);
        self.consume(t + skip, into);
    }

    fn check_target(&self, t: usize, ok: &[Kind], what: &str) -> Result<()> {
        let k = self.kind(t);
        if ok.contains(&k) {
            return Ok(());
        }
        Err(self.fail(format_args!("target is {}, not a {what}", k.name())))
    }

    fn operand(&self, i: usize, ok: &[Kind], what: &str) -> Result<()> {
        let k = self.kind(i);
        let fits = ok.iter().any(|o| match (o, k) {
            (Kind::Tuple { .. }, Kind::Tuple { .. }) => true,
            _ => *o == k,
        });
        if fits {
            return Ok(());
        }
        Err(self.fail(format_args!("the {what} is {}", k.name())))
    }

    fn setitems(&self, t: usize, from: usize) -> Result<()> {
        let target = self.kind(t);
        if !matches!(
            target,
            Kind::Dict | Kind::List | Kind::ByteArray | Kind::Object
        ) {
            return Err(self.fail(format_args!(
                "target is {}, which does not support item assignment",
                target.name()
            )));
        }
        if (self.b.stack.len() - from) % 2 != 0 {
            return Err(self.fail("odd number of items for SETITEMS"));
        }
        if target == Kind::Dict {
            if let Some(i) = (from..self.b.stack.len())
                .step_by(2)
                .find(|&i| self.kind(i).unhashable())
            {
                return Err(self.fail(format_args!(
                    "dict key is {} (unhashable)",
                    self.kind(i).name()
                )));
            }
        }
        Ok(())
    }
}

/// Appends `frag` to `out` as if the memo already held `offset` entries, and returns
/// how many entries it adds. Fragments number their memo entries densely from 0, so
/// shifting every index by `offset` is all splicing several of them into one pickle
/// takes.
pub(crate) fn splice(frag: &Fragment, offset: u32, out: &mut Vec<u8>) -> Result<u32> {
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
                let idx = if op == MEMOIZE {
                    added
                } else {
                    memo_arg(op, &bytes[arg..next])
                };
                out.extend_from_slice(&put_op(idx + offset));
                added += 1;
            }
            BINGET | LONG_BINGET => {
                out.extend_from_slice(&get_op(shifted(memo_arg(op, &bytes[arg..next]), offset)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebound_memo_index_is_read_as_it_was_at_each_get() {
        // L = []; PUT 0; MARK; GET 0 (L itself); 1; PUT 0 (now the int); GET 0 (the int);
        // APPENDS: L == [L, 1, 1].
        let e = item_of(b"\x80\x04]q\x00(h\x00K\x01q\x00h\x00e.").unwrap();
        assert_eq!(e.fragment.bytes(), b"]q\x00(h\x00K\x01q\x01h\x01e");
    }

    #[test]
    fn an_object_changed_through_a_memo_reference_outside_it_is_refused() {
        // (L, L) where the second element is GET 0 followed by APPEND: cutting out the
        // first element alone would lose the append.
        let pickle = b"\x80\x04(]q\x00h\x00K\x01at.";
        let scan = Scan::new(pickle).unwrap();
        let children = scan.children(&scan.root()).unwrap().unwrap();
        let err = scan.extract(&children[0]).unwrap_err().to_string();
        assert!(err.contains("changes a memoized object"), "{err}");
        let err = scan.extract(&children[1]).unwrap_err().to_string();
        assert!(err.contains("changes a memoized object"), "{err}");
        assert!(scan.extract(&scan.root()).is_ok());
    }

    fn item_of(pickle: &[u8]) -> Result<Pickled> {
        let scan = Scan::new(pickle)?;
        let root = scan.root();
        scan.extract(&root)
    }

    #[test]
    fn a_lone_int_is_copied_as_is() {
        let e = item_of(b"\x80\x04K\x05.").unwrap();
        assert_eq!(e.fragment.bytes(), b"K\x05");
        assert!(!e.fragment.uses_memo() && e.names.is_none());
    }

    #[test]
    fn unread_memo_writes_are_dropped_and_read_ones_renumbered() {
        // [s, s] with s memoized at index 7.
        let e = item_of(b"\x80\x02]q\x01(U\x01xq\x07h\x07e.").unwrap();
        assert_eq!(e.fragment.bytes(), b"](U\x01xq\x00h\x00e");
        assert!(e.fragment.uses_memo());
    }

    #[test]
    fn a_list_that_contains_itself_is_carried() {
        let e = item_of(b"\x80\x04]\x94h\x00a.").unwrap();
        assert_eq!(e.fragment.bytes(), b"]q\x00h\x00a");
    }

    #[test]
    fn refused_shapes_name_the_problem() {
        for (pickle, says) in [
            (&b"\x80\x05\x97."[..], "out-of-band"),
            (b"\x80\x04K\x01K\x02.", "STOP with 2"),
            (b"\x80\x04(K\x01.", "MARK without"),
            (b"\x80\x04h\x03.", "memo value not found"),
            (b"\x80\x04K\x01K\x02a.", "not a list"),
            (b"\x80\x04}]K\x01s.", "unhashable"),
            (b"\x80\x04I1\n.", "text opcodes"),
            (b"\x80\x04\x8c\x02\xff\xfe.", "not valid UTF-8"),
        ] {
            let err = item_of(pickle).unwrap_err().to_string();
            assert!(err.contains(says), "{pickle:?}: {err}");
        }
    }

    #[test]
    fn lone_surrogates_are_python_strs() {
        assert_eq!(python_utf8(b"a\xed\xa0\x80b"), (true, false));
        assert_eq!(python_utf8("é".as_bytes()), (true, true));
        assert_eq!(python_utf8(b"\xc0\x80"), (false, false));
    }

    #[test]
    fn splicing_shifts_memo_indices() {
        let f = Fragment::from_parts(b"]\x94h\x00a".to_vec(), true);
        let mut out = Vec::new();
        assert_eq!(splice(&f, 300, &mut out).unwrap(), 1);
        assert_eq!(out, b"]r\x2c\x01\x00\x00j\x2c\x01\x00\x00a");
    }
}
