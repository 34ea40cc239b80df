//! The server's view of a pickle: its structure, without building a single object.
//!
//! A queue server never needs to know what an item *is*, only where it is. So a request
//! is not decoded into a tree: [`Scan`] runs the pickle's stack machine over *shapes*
//! (a stack of one-byte kinds and the byte offset where each entry began; a scalar's
//! value is read back from its opcode when asked for, as a [`Kind`]), checks every
//! opcode the way CPython's unpickler would, and remembers three things: the region of
//! bytes that built each stack entry, what each memo index was bound to, and the children
//! of the few containers near the bottom of the stack (the request's 4-tuple, its
//! `args` and `kwds`). An item is then cut out of the request as its own opcodes
//! ([`Scan::extract`]): memo indices renumbered from 0, writes nobody reads dropped,
//! references to memo entries outside the item (a memoized method name that the item
//! happens to share) replaced by a copy of what they refer to: a fragment as
//! `splice.rs` requires them.
//!
//! Forwarding Python's own opcodes is what makes the server faithful: a list subclass
//! that was APPENDed to, a dict that contains itself, a `__getnewargs_ex__` class, a
//! protocol-2 pickle with Python 2 names all come back exactly as they were sent,
//! because the server never had to represent them.
//!
//! # Memory
//! A request's scan holds at most [`SCAN_MEMORY_FACTOR`] times its pickle (plus
//! [`SCAN_MEMORY_SLACK`]): every buffer grows through one function that checks the
//! limit before allocating, and never past what the rest of the pickle could fill. A
//! stack entry is 12 bytes and a memo binding 16 (plus 4 for its memo slot once indices
//! come out of order, and 8 while its value is on the stack), so the pickles CPython
//! writes stay within 20 bytes per byte.
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
use super::splice::{get_op, memo_arg, put_op};
use super::Fragment;
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::HashMap;

/// What the scanner knows about a value, decoded (see [`Scan::kind`]): enough to read the
/// request's own scalars. Positions are byte offsets into the pickle.
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

/// A value's kind while scanning: one byte. A scalar's value is not kept but read again
/// from its opcode when asked for ([`Scan::kind`]), so a stack entry or a memo binding
/// stays a few `u32`s whatever it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    None,
    True,
    False,
    /// An int of any size; its opcode tells which.
    Int,
    Float,
    Str,
    /// A str with lone surrogates (valid for Python, not for Rust).
    StrSurrogates,
    OldStr,
    Bytes,
    ByteArray,
    Tuple,
    TupleUnhashable,
    List,
    Dict,
    Set,
    FrozenSet,
    Object,
}

impl Tag {
    fn unhashable(self) -> bool {
        matches!(
            self,
            Tag::List | Tag::Dict | Tag::Set | Tag::ByteArray | Tag::TupleUnhashable
        )
    }

    /// A str, as Python's `str` would be for STACK_GLOBAL's operands.
    fn str_like(self) -> bool {
        matches!(
            self,
            Tag::Str | Tag::StrSurrogates | Tag::OldStr | Tag::Object
        )
    }

    /// Whether the value is read from its opcode (so the opcode's position is kept).
    fn scalar(self) -> bool {
        matches!(
            self,
            Tag::Int | Tag::Float | Tag::Str | Tag::StrSurrogates | Tag::OldStr
        )
    }

    fn name(self) -> &'static str {
        match self {
            Tag::None => "None",
            Tag::True | Tag::False => "a bool",
            Tag::Int => "an int",
            Tag::Float => "a float",
            Tag::Str | Tag::StrSurrogates | Tag::OldStr => "a str",
            Tag::Bytes => "bytes",
            Tag::ByteArray => "a bytearray",
            Tag::Tuple | Tag::TupleUnhashable => "a tuple",
            Tag::List => "a list",
            Tag::Dict => "a dict",
            Tag::Set => "a set",
            Tag::FrozenSet => "a frozenset",
            Tag::Object => "an object",
        }
    }
}

/// One value in the pickle: the bytes that build it, `[start, end)`, and its kind
/// ([`Scan::kind`] decodes it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Region {
    pub start: u32,
    pub end: u32,
    tag: Tag,
    /// Where a scalar's opcode is.
    at: u32,
    /// Which children record belongs to it (0: none).
    serial: u32,
}

/// A stack entry while scanning (12 bytes: a pickle of N one-byte values on the stack
/// takes 12N here).
#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u32,
    /// For a memo reference (`alias`), the binding it refers to (1-based into `defs`);
    /// otherwise where its opcode is.
    aux: u32,
    tag: Tag,
    alias: bool,
}

/// One memo binding: a PUT/MEMOIZE opcode and the value it memoized (16 bytes). A PUT of
/// a memo reference adds no binding: its index is bound to the referenced one.
#[derive(Clone, Copy, Debug)]
struct Def {
    put_pos: u32,
    start: u32,
    /// `u32::MAX` until the value is consumed.
    end: u32,
    tag: Tag,
    /// A scalar whose opcode is not at `start` (bytes popped before it were handed to
    /// it): its opcode's position is in `Buffers::carried`.
    carried: bool,
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
/// Children kept for a container in the first scan (a request's tuple has 4, `args` and
/// `kwds` are small; a large container there is an item, whose children are asked for
/// only by `put_many`, which re-scans it).
const RECORD_CAP: usize = 8;
/// How deeply copies of outside memo entries may nest inside one item.
const MAX_INLINE_DEPTH: usize = 64;

/// The most working memory a scan may allocate, per byte of its pickle, on top of
/// [`SCAN_MEMORY_SLACK`]. The shapes CPython's pickler writes need at most 20 (a tuple of
/// memoized empty lists: 2 bytes each for a 12-byte stack entry, a 16-byte binding, its
/// 4-byte memo slot and its 8-byte open binding; buffers never grow past what the rest
/// of the pickle could fill); the worst a hand-written pickle could ask for is about 28
/// (one value memoized at every byte).
pub const SCAN_MEMORY_FACTOR: usize = 24;
/// Working memory every scan may allocate whatever the pickle's size.
pub const SCAN_MEMORY_SLACK: usize = 1 << 20;

/// A scanned pickle: valid as far as CPython's unpickler can tell without running code.
pub(crate) struct Scan<'b> {
    bytes: &'b [u8],
    b: &'b Buffers,
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
    /// Scans one whole pickle up to its STOP and hands the scan to `f`.
    ///
    /// The scan's buffers are kept per thread between calls (a connection's thread scans
    /// one request after another), so that scanning a request allocates nothing.
    ///
    /// # Errors
    /// [`Error::Protocol`] naming the opcode and offset for anything CPython's unpickler
    /// would refuse, and for the few opcodes distq cannot forward (see the module docs);
    /// [`Error::Value`] for a pickle whose scan would need more working memory than
    /// [`SCAN_MEMORY_FACTOR`] times its size (plus [`SCAN_MEMORY_SLACK`]); whatever `f`
    /// returns.
    pub fn with<T>(bytes: &[u8], f: impl FnOnce(&Scan<'_>) -> Result<T>) -> Result<T> {
        let mut b = SPARE.with(|s| s.take()).unwrap_or_default();
        let result = Scan::new(bytes, &mut b).and_then(|scan| f(&scan));
        if b.recycle() {
            SPARE.with(|s| s.set(Some(b)));
        }
        result
    }

    fn new(bytes: &'b [u8], b: &'b mut Buffers) -> Result<Scan<'b>> {
        if u32::try_from(bytes.len()).is_err() {
            return Err(Error::protocol("pickle: larger than 4 GiB"));
        }
        b.mem.limit = memory_limit(bytes.len());
        b.identity = true;
        let mut s = Scanner::new(bytes, 0, None, b);
        let stop = s.run(None)?;
        let [root] = s.b.stack[..] else {
            return Err(Error::protocol(format!(
                "pickle: STOP with {} values on the stack, not 1",
                s.b.stack.len()
            )));
        };
        s.close_open(0, stop);
        let root = s.region(root, stop, s.bottom[0]);
        let b = s.b;
        b.rebinds.sort_unstable();
        let n = b.alias_mutations.len();
        room(&mut b.mutations_by_pos, n, 0, &mut b.mem)?;
        room(&mut b.mutations_by_put, n, 0, &mut b.mem)?;
        for &(def, m) in &b.alias_mutations {
            let put = b.defs[def as usize - 1].put_pos;
            b.mutations_by_pos.push((m, put));
            b.mutations_by_put.push((put, m));
        }
        b.mutations_by_put.sort_unstable();
        Ok(Scan {
            bytes,
            b,
            root,
            budget: std::cell::Cell::new(bytes.len().saturating_mul(4).saturating_add(1 << 20)),
            work: std::cell::Cell::new(bytes.len().saturating_mul(8).saturating_add(1 << 20)),
        })
    }

    /// The whole pickle's value.
    pub fn root(&self) -> Region {
        self.root
    }

    /// What `r` is, its scalar value read from its opcode.
    pub fn kind(&self, r: &Region) -> Kind {
        decode_kind(self.bytes, r.tag, r.at)
    }

    /// The children of `r` if it is a tuple, list or dict (dicts: keys and values
    /// alternating) built directly by its own opcodes; `None` otherwise (a memo reference,
    /// an object built by a call).
    ///
    /// # Errors
    /// Only if `r` does not scan on its own (which the whole scan has ruled out), or if
    /// re-scanning it would take more memory than a scan may.
    pub fn children(&self, r: &Region) -> Result<Option<Cow<'_, [Region]>>> {
        if r.serial != 0 {
            if let Some(rec) = self
                .b
                .records
                .iter()
                .find(|rec| rec.serial == r.serial && !rec.full)
            {
                return Ok(Some(Cow::Borrowed(&rec.children)));
            }
        }
        let mut local = Buffers::default();
        // The children found are the re-scan's result, one per byte at most.
        let len = (r.end - r.start) as usize;
        local.mem.limit =
            memory_limit(len).saturating_add(len.saturating_mul(std::mem::size_of::<Region>()));
        let mut s = Scanner::new(self.bytes, r.start, Some(self), &mut local);
        s.run(Some(r.end))?;
        let whole =
            s.b.stack.len() == 1 && s.b.records[0].serial == s.bottom[0] && !s.b.records[0].full;
        Ok(whole.then(|| Cow::Owned(std::mem::take(&mut local.records[0].children))))
    }

    /// The UTF-8 of a str entry, if it is valid Rust UTF-8.
    pub fn str(&self, r: &Region) -> Option<&'b str> {
        if r.tag != Tag::Str {
            return None;
        }
        let (at, len) = payload(self.bytes, r.at as usize);
        std::str::from_utf8(self.bytes.get(at as usize..(at + len) as usize)?).ok()
    }

    /// The protocol CPython's unpickler has in effect at `pos`, as far as it matters:
    /// below 3 it maps Python 2 names (`fix_imports`), from 3 on it does not.
    fn proto_at(&self, pos: u32) -> u8 {
        let protos = &self.b.protos;
        let i = protos.partition_point(|&(p, _)| p < pos);
        let p = i.checked_sub(1).map_or(0, |i| protos[i].1);
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
        let rebinds = &self.b.rebinds;
        let later = rebinds.partition_point(|&(i, p, _)| (i, p) <= (idx, pos));
        if let Some(&(i, _, old)) = rebinds.get(later) {
            if i == idx {
                return Some(old);
            }
        }
        let now = self.b.memo(idx);
        (now != 0).then_some(now)
    }

    /// The binding `def` (1-based).
    fn def(&self, def: u32) -> &Def {
        &self.b.defs[def as usize - 1]
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
        if in_range(&self.b.mutations_by_pos) || in_range(&self.b.mutations_by_put) {
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
                    let d = self.def(def);
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
            let lookups = &self.b.lookups;
            let i = lookups.partition_point(|l| l.pos < start);
            if let Some(l) = lookups.get(i).filter(|l| l.pos < end) {
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
                    let d = *self.def(def);
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

/// How each opcode's argument is laid out: `0..=8` a fixed number of bytes, else one of
/// the classes below. One table lookup replaces a `match` over 60 opcodes per opcode read.
static ARGS: [u8; 256] = arg_table();
/// A length of 1, 4 or 8 bytes (`COUNTED | width`), then that many bytes.
const COUNTED: u8 = 0x80;
/// Like `COUNTED`, the 4-byte length signed (LONG4, BINSTRING).
const SIGNED: u8 = 0x40;
/// Two lines (GLOBAL).
const LINES: u8 = 0x20;
/// Refused or unknown.
const BAD: u8 = 0xff;

const fn arg_table() -> [u8; 256] {
    let mut t = [BAD; 256];
    let none = [
        MARK,
        STOP,
        POP,
        POP_MARK,
        DUP,
        EMPTY_TUPLE,
        TUPLE,
        TUPLE1,
        TUPLE2,
        TUPLE3,
        EMPTY_LIST,
        APPEND,
        APPENDS,
        EMPTY_DICT,
        SETITEM,
        SETITEMS,
        EMPTY_SET,
        ADDITEMS,
        FROZENSET,
        NONE,
        NEWTRUE,
        NEWFALSE,
        REDUCE,
        NEWOBJ,
        NEWOBJ_EX,
        BUILD,
        STACK_GLOBAL,
        MEMOIZE,
    ];
    let mut i = 0;
    while i < none.len() {
        t[none[i] as usize] = 0;
        i += 1;
    }
    let fixed = [
        (PROTO, 1),
        (BININT1, 1),
        (BINGET, 1),
        (BINPUT, 1),
        (EXT1, 1),
        (BININT2, 2),
        (EXT2, 2),
        (BININT, 4),
        (LONG_BINGET, 4),
        (LONG_BINPUT, 4),
        (EXT4, 4),
        (BINFLOAT, 8),
        (FRAME, 8),
        (LONG1, COUNTED | 1),
        (SHORT_BINUNICODE, COUNTED | 1),
        (SHORT_BINBYTES, COUNTED | 1),
        (SHORT_BINSTRING, COUNTED | 1),
        (LONG4, COUNTED | SIGNED | 4),
        (BINSTRING, COUNTED | SIGNED | 4),
        (BINUNICODE, COUNTED | 4),
        (BINBYTES, COUNTED | 4),
        (BINUNICODE8, COUNTED | 8),
        (BINBYTES8, COUNTED | 8),
        (BYTEARRAY8, COUNTED | 8),
        (GLOBAL, LINES),
    ];
    let mut i = 0;
    while i < fixed.len() {
        t[fixed[i].0 as usize] = fixed[i].1;
        i += 1;
    }
    t
}

/// Reads the opcode at `pos`: `(opcode, start of its argument, start of the next opcode)`.
/// Every length is checked against the bytes present; refused opcodes are errors here.
#[inline]
pub(super) fn read_op(b: &[u8], pos: usize) -> Result<(u8, usize, usize)> {
    let Some(&op) = b.get(pos) else {
        return Err(Error::protocol(format!(
            "pickle: truncated at offset {pos}, no STOP"
        )));
    };
    let arg = pos + 1;
    let class = ARGS[usize::from(op)];
    let left = b.len() - arg;
    if class <= 8 && usize::from(class) <= left {
        return Ok((op, arg, arg + usize::from(class)));
    }
    if class == COUNTED | 1 && left >= 1 && usize::from(b[arg]) < left {
        return Ok((op, arg, arg + 1 + usize::from(b[arg])));
    }
    read_op_rest(b, op, pos, class)
}

/// The rest of [`read_op`]: long arguments and every error.
#[cold]
#[inline(never)]
fn read_op_rest(b: &[u8], op: u8, pos: usize, class: u8) -> Result<(u8, usize, usize)> {
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
    let next = match class {
        0..=8 => fixed(usize::from(class))?,
        LINES => {
            let first = line_end(b, arg).ok_or_else(|| fail_at(op, pos, "truncated line"))?;
            line_end(b, first + 1).ok_or_else(|| fail_at(op, pos, "truncated line"))? + 1
        }
        BAD => return Err(refused(op, pos)),
        _ => {
            let w = usize::from(class & 0x0f);
            let head = fixed(w)?;
            let n = le(b, arg, w);
            let n = if class & SIGNED != 0 {
                u64::try_from(n as u32 as i32)
                    .map_err(|_| fail_at(op, pos, "negative byte count"))?
            } else {
                n
            };
            let left = (b.len() - head) as u64;
            if n > left {
                return Err(fail_at(
                    op,
                    pos,
                    format_args!("truncated: needs {n} bytes, {left} left"),
                ));
            }
            head + n as usize
        }
    };
    Ok((op, arg, next))
}

fn refused(op: u8, pos: usize) -> Error {
    match op {
        NEXT_BUFFER | READONLY_BUFFER => fail_at(
            op,
            pos,
            "out-of-band buffers cannot travel over a manager connection (pickle them in band)",
        ),
        PERSID | BINPERSID => fail_at(
            op,
            pos,
            "persistent ids need the sender's persistent_load, which a queue server does not have",
        ),
        _ if op_is_text(op) => fail_at(
            op,
            pos,
            "protocol 0/1 text opcodes are not supported; pickle with protocol 2 or higher \
             (every Python 3 manager client does)",
        ),
        _ => fail_at(op, pos, "unknown opcode"),
    }
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

/// Reads a value's kind back from its opcode at `at` (which the scan has checked).
fn decode_kind(b: &[u8], tag: Tag, at: u32) -> Kind {
    match tag {
        Tag::None => Kind::None,
        Tag::True => Kind::Bool(true),
        Tag::False => Kind::Bool(false),
        Tag::Int => int_at(b, at as usize),
        Tag::Float => Kind::Float(f64::from_bits(le(b, at as usize + 1, 8).swap_bytes())),
        Tag::Str | Tag::StrSurrogates => {
            let (at, len) = payload(b, at as usize);
            Kind::Str {
                at,
                len,
                utf8: tag == Tag::Str,
            }
        }
        Tag::OldStr => {
            let (at, len) = payload(b, at as usize);
            Kind::OldStr { at, len }
        }
        Tag::Bytes => Kind::Bytes,
        Tag::ByteArray => Kind::ByteArray,
        Tag::Tuple => Kind::Tuple { hashable: true },
        Tag::TupleUnhashable => Kind::Tuple { hashable: false },
        Tag::List => Kind::List,
        Tag::Dict => Kind::Dict,
        Tag::Set => Kind::Set,
        Tag::FrozenSet => Kind::FrozenSet,
        Tag::Object => Kind::Object,
    }
}

/// `(start, length)` of the payload of the counted opcode at `at`.
fn payload(b: &[u8], at: usize) -> (u32, u32) {
    let op = b.get(at).copied().unwrap_or(0);
    let w = usize::from(ARGS[usize::from(op)] & 0x0f);
    ((at + 1 + w) as u32, le(b, at + 1, w) as u32)
}

/// The int pushed by the opcode at `at`.
fn int_at(b: &[u8], at: usize) -> Kind {
    match b.get(at).copied().unwrap_or(0) {
        BININT1 => Kind::Int(le(b, at + 1, 1) as i64),
        BININT2 => Kind::Int(le(b, at + 1, 2) as i64),
        BININT => Kind::Int(i64::from(le(b, at + 1, 4) as u32 as i32)),
        _ => {
            let (from, n) = payload(b, at);
            let bytes = b
                .get(from as usize..from as usize + n as usize)
                .unwrap_or_default();
            if bytes.len() > 8 {
                return Kind::BigInt;
            }
            let fill = if bytes.last().is_some_and(|&x| x >= 0x80) {
                0xff
            } else {
                0
            };
            let mut buf = [fill; 8];
            buf[..bytes.len()].copy_from_slice(bytes);
            Kind::Int(i64::from_le_bytes(buf))
        }
    }
}

/// The `w`-byte little-endian unsigned integer at `at` (0 past the end).
fn le(b: &[u8], at: usize, w: usize) -> u64 {
    let mut buf = [0u8; 8];
    if let Some(raw) = b.get(at..at + w) {
        buf[..w].copy_from_slice(raw);
    }
    u64::from_le_bytes(buf)
}

/// Where the opcode of binding `def`'s value is.
fn def_opcode(defs: &[Def], carried: &[(u32, u32)], def: u32) -> u32 {
    let d = &defs[def as usize - 1];
    if !d.carried {
        return d.start;
    }
    carried
        .binary_search_by_key(&def, |&(k, _)| k)
        .map_or(d.start, |i| carried[i].1)
}

fn memory_limit(len: usize) -> usize {
    len.saturating_mul(SCAN_MEMORY_FACTOR)
        .saturating_add(SCAN_MEMORY_SLACK)
}

/// What a scan's buffers hold, and the most they may.
#[derive(Default)]
struct Memory {
    allocated: usize,
    limit: usize,
}

/// Makes room for `extra` more elements in `v`: the one way scan buffers grow, so that
/// their memory is checked against the limit before it is allocated. `later` bounds how
/// many more elements the rest of the pickle can add (each needs a byte of it), so that
/// growing by doubling never reserves more than the pickle can fill.
#[inline]
fn room<T>(v: &mut Vec<T>, extra: usize, later: usize, mem: &mut Memory) -> Result<()> {
    if v.capacity() - v.len() >= extra {
        return Ok(());
    }
    grow(v, extra, later, mem)
}

#[cold]
#[inline(never)]
fn grow<T>(v: &mut Vec<T>, extra: usize, later: usize, mem: &mut Memory) -> Result<()> {
    let size = std::mem::size_of::<T>().max(1);
    let cap = v.capacity();
    let need = v.len().saturating_add(extra);
    let affordable = cap.saturating_add(mem.limit.saturating_sub(mem.allocated) / size);
    let useful = need.saturating_add(later);
    let target = need
        .max(cap.saturating_mul(2).max(8).min(useful))
        .min(affordable);
    if target < need {
        return Err(too_much_memory(mem.limit));
    }
    v.reserve_exact(target - v.len());
    mem.allocated += (v.capacity() - cap) * size;
    Ok(())
}

/// Like [`room`] for the map of sparse memo indices; a bucket is charged 16 bytes.
fn map_room(map: &mut HashMap<u32, u32>, mem: &mut Memory) -> Result<()> {
    if map.len() < map.capacity() {
        return Ok(());
    }
    let buckets = |cap: usize| (cap.max(3) * 8 / 7 + 1).next_power_of_two();
    let want = map.capacity().max(3) * 2;
    let extra = (buckets(want) - buckets(map.capacity())) * 16;
    if mem.allocated.saturating_add(extra) > mem.limit {
        return Err(too_much_memory(mem.limit));
    }
    map.reserve(want - map.len());
    mem.allocated += extra;
    Ok(())
}

fn too_much_memory(limit: usize) -> Error {
    unforwardable(format!(
        "scanning this pickle would take more than {limit} bytes of memory \
         ({SCAN_MEMORY_FACTOR} times its size and {SCAN_MEMORY_SLACK} more); \
         CPython's pickler never writes such a pickle"
    ))
}

/// The vectors of a scan, reused from one scan to the next on a thread.
#[derive(Default)]
struct Buffers {
    stack: Vec<Entry>,
    /// `(stack height, start)` of each open MARK.
    marks: Vec<(u32, u32)>,
    defs: Vec<Def>,
    /// While set, memo index n is bound to binding n + 1 and `memo` is empty: what
    /// Python's picklers write (each index bound once, in order), at no cost per binding.
    identity: bool,
    /// Memo index -> binding (1-based; 0 for none), for indices that are dense enough.
    memo: Vec<u32>,
    sparse: HashMap<u32, u32>,
    /// `(stack index, binding)` of bindings whose value is still on the stack, by stack
    /// index: consuming a stack entry closes its bindings' regions.
    open: Vec<(u32, u32)>,
    /// `(binding, opcode position)` for bindings whose `Def::carried` is set, by binding.
    carried: Vec<(u32, u32)>,
    /// `(index, position, previous binding)` for PUTs that rebound an index, sorted.
    rebinds: Vec<(u32, u32, u32)>,
    lookups: Vec<Lookup>,
    /// `(position, protocol)` of each PROTO opcode.
    protos: Vec<(u32, u8)>,
    /// `(binding, position)` of mutations applied through a memo reference.
    alias_mutations: Vec<(u32, u32)>,
    /// `(position of the object's PUT, position of the mutation)` for mutations applied
    /// through a memo reference, by mutation position and by PUT position.
    mutations_by_pos: Vec<(u32, u32)>,
    mutations_by_put: Vec<(u32, u32)>,
    records: [Record; RECORDED],
    mem: Memory,
}

thread_local! {
    static SPARE: std::cell::Cell<Option<Box<Buffers>>> = const { std::cell::Cell::new(None) };
}

/// Buffers holding more than this go back to the allocator instead of being kept.
const KEEP_UP_TO: usize = 64 * 1024;

impl Buffers {
    /// The binding memo index `idx` has now (0 for none).
    fn memo(&self, idx: u32) -> u32 {
        let i = idx as usize;
        if self.identity {
            return if i < self.defs.len() { idx + 1 } else { 0 };
        }
        match self.memo.get(i) {
            Some(&d) => d,
            None => self.sparse.get(&idx).copied().unwrap_or(0),
        }
    }

    /// Empties the buffers for the next scan; `false` if they are too large to keep.
    fn recycle(&mut self) -> bool {
        if self.mem.allocated > KEEP_UP_TO {
            return false;
        }
        self.stack.clear();
        self.marks.clear();
        self.defs.clear();
        self.memo.clear();
        self.sparse.clear();
        self.open.clear();
        self.carried.clear();
        self.rebinds.clear();
        self.lookups.clear();
        self.protos.clear();
        self.alias_mutations.clear();
        self.mutations_by_pos.clear();
        self.mutations_by_put.clear();
        for r in &mut self.records {
            r.serial = 0;
            r.full = false;
            r.children.clear();
        }
        true
    }
}

/// The stack machine over kinds.
struct Scanner<'b, 'o, 's> {
    bytes: &'b [u8],
    pos: usize,
    op: u8,
    op_pos: usize,
    /// Set when re-scanning a region of an already scanned pickle: memo references are
    /// resolved there, and nothing is recorded but the region's own children.
    outer: Option<&'o Scan<'b>>,
    b: &'s mut Buffers,
    carry: Option<u32>,
    serial: u32,
    /// The serial of the entry at each of the bottom stack positions, which are the
    /// only ones with children records.
    bottom: [u32; RECORDED],
    memo_len: u32,
}

impl<'b, 'o, 's> Scanner<'b, 'o, 's> {
    fn new(bytes: &'b [u8], pos: u32, outer: Option<&'o Scan<'b>>, b: &'s mut Buffers) -> Self {
        Scanner {
            bytes,
            pos: pos as usize,
            op: 0,
            op_pos: pos as usize,
            outer,
            b,
            carry: None,
            // Regions from a re-scan must never match the whole scan's records.
            serial: if outer.is_some() { 1 << 31 } else { 0 },
            bottom: [0; RECORDED],
            memo_len: 0,
        }
    }

    fn fail(&self, what: impl std::fmt::Display) -> Error {
        fail_at(self.op, self.op_pos, what)
    }

    fn fence(&self) -> usize {
        self.b.marks.last().map_or(0, |m| m.0 as usize)
    }

    fn need(&self, n: usize) -> Result<usize> {
        let len = self.b.stack.len();
        if len < self.fence() + n {
            return Err(self.fail("stack underflow"));
        }
        Ok(len - n)
    }

    /// Pushes a value built by the current opcode.
    fn push(&mut self, tag: Tag) -> Result<()> {
        let start = self.carry.take().unwrap_or(self.op_pos as u32);
        self.push_entry(Entry {
            start,
            aux: self.op_pos as u32,
            tag,
            alias: false,
        })
    }

    fn push_at(&mut self, start: u32, tag: Tag) -> Result<()> {
        self.push_entry(Entry {
            start,
            aux: self.op_pos as u32,
            tag,
            alias: false,
        })
    }

    fn push_entry(&mut self, e: Entry) -> Result<()> {
        let later = self.bytes.len() - self.pos;
        let b = &mut *self.b;
        let i = b.stack.len();
        if i < RECORDED {
            self.serial += 1;
            self.bottom[i] = self.serial;
        }
        room(&mut b.stack, 1, later, &mut b.mem)?;
        b.stack.push(e);
        Ok(())
    }

    fn tag(&self, i: usize) -> Tag {
        self.b.stack[i].tag
    }

    /// The region of entry `e`, ending at `end`.
    fn region(&self, e: Entry, end: u32, serial: u32) -> Region {
        let at = match (e.alias, self.outer) {
            (false, _) => e.aux,
            (true, Some(o)) => def_opcode(&o.b.defs, &o.b.carried, e.aux),
            (true, None) => def_opcode(&self.b.defs, &self.b.carried, e.aux),
        };
        Region {
            start: e.start,
            end,
            tag: e.tag,
            at,
            serial,
        }
    }

    /// Closes the regions of the bindings of `stack[from..]`; the top one ends at `end`.
    fn close_open(&mut self, from: usize, end: u32) {
        let b = &mut *self.b;
        while let Some(&(i, d)) = b.open.last() {
            let i = i as usize;
            if i < from {
                break;
            }
            b.defs[d as usize - 1].end = b.stack.get(i + 1).map_or(end, |n| n.start);
            b.open.pop();
        }
    }

    /// Pops `stack[from..]`, closing their regions; `into` names the record (stack
    /// index) that collects them as children.
    fn consume(&mut self, from: usize, into: Option<usize>) -> Result<()> {
        self.carry = None;
        let end = self.op_pos as u32;
        self.close_open(from, end);
        if let Some(r) = into {
            let cap = if r == 0 && self.outer.is_some() {
                usize::MAX
            } else {
                RECORD_CAP
            };
            for i in from..self.b.stack.len() {
                let rec = &self.b.records[r];
                if rec.full {
                    break;
                }
                if rec.children.len() >= cap {
                    let rec = &mut self.b.records[r];
                    rec.full = true;
                    rec.children.clear();
                    break;
                }
                let e = self.b.stack[i];
                let e_end = self.b.stack.get(i + 1).map_or(end, |n| n.start);
                let serial = if i < RECORDED { self.bottom[i] } else { 0 };
                let region = self.region(e, e_end, serial);
                let later = self.b.stack.len() - i - 1;
                let b = &mut *self.b;
                room(&mut b.records[r].children, 1, later, &mut b.mem)?;
                b.records[r].children.push(region);
            }
        }
        self.b.stack.truncate(from);
        Ok(())
    }

    /// Whether the container at stack index `i` has a children record worth filling.
    fn recording(&self, i: usize) -> bool {
        i < RECORDED && self.b.records[i].serial == self.bottom[i] && !self.b.records[i].full
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
    fn mutate(&mut self, i: usize) -> Result<()> {
        let e = self.b.stack[i];
        if e.alias && self.outer.is_none() {
            let later = self.bytes.len() - self.pos;
            let b = &mut *self.b;
            room(&mut b.alias_mutations, 1, later, &mut b.mem)?;
            b.alias_mutations.push((e.aux, self.op_pos as u32));
        }
        Ok(())
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
        let op_pos = self.op_pos as u32;
        let later = self.bytes.len() - self.pos;
        let b = &mut *self.b;
        // A memo reference memoized again names the same binding.
        let id = if top.alias {
            top.aux
        } else {
            room(&mut b.defs, 1, later, &mut b.mem)?;
            room(&mut b.open, 1, later, &mut b.mem)?;
            let carried = top.tag.scalar() && top.aux != top.start;
            b.defs.push(Def {
                put_pos: op_pos,
                start: top.start,
                end: u32::MAX,
                tag: top.tag,
                carried,
            });
            let id = b.defs.len() as u32;
            b.open.push((b.stack.len() as u32 - 1, id));
            if carried {
                room(&mut b.carried, 1, later, &mut b.mem)?;
                b.carried.push((id, top.aux));
            }
            id
        };
        let i = idx as usize;
        if b.identity {
            // The common case: index n bound to binding n + 1, nothing to store.
            if !top.alias && i + 1 == b.defs.len() {
                self.memo_len += 1;
                return Ok(());
            }
            b.identity = false;
            let n = b.defs.len() - usize::from(!top.alias);
            room(&mut b.memo, n, later, &mut b.mem)?;
            b.memo.extend(1..=n as u32);
        }
        let len = b.memo.len();
        let old = if i < len {
            std::mem::replace(&mut b.memo[i], id)
        } else if i <= 2 * len + 64 {
            room(&mut b.memo, i + 1 - len, later, &mut b.mem)?;
            b.memo.resize(i + 1, 0);
            b.memo[i] = id;
            0
        } else {
            map_room(&mut b.sparse, &mut b.mem)?;
            b.sparse.insert(idx, id).unwrap_or(0)
        };
        if old == 0 {
            self.memo_len += 1;
        } else {
            room(&mut b.rebinds, 1, later, &mut b.mem)?;
            b.rebinds.push((idx, op_pos, old));
        }
        Ok(())
    }

    fn get(&mut self, idx: u32) -> Result<()> {
        let (def, tag) = match self.outer {
            Some(outer) => {
                let def = outer
                    .binding_at(idx, self.op_pos as u32)
                    .ok_or_else(|| self.fail("memo value not found"))?;
                (def, outer.def(def).tag)
            }
            None => {
                let def = self.b.memo(idx);
                if def == 0 {
                    return Err(self.fail(format_args!("memo value not found at index {idx}")));
                }
                (def, self.b.defs[def as usize - 1].tag)
            }
        };
        let start = self.carry.take().unwrap_or(self.op_pos as u32);
        self.push_entry(Entry {
            start,
            aux: def,
            tag,
            alias: true,
        })
    }

    fn lookup(&mut self, module: (u32, u32), name: (u32, u32), code: Option<u32>) -> Result<()> {
        if self.outer.is_none() {
            let later = self.bytes.len() - self.pos;
            let b = &mut *self.b;
            room(&mut b.lookups, 1, later, &mut b.mem)?;
            b.lookups.push(Lookup {
                pos: self.op_pos as u32,
                module,
                name,
                code,
            });
        }
        Ok(())
    }

    fn push_str(&mut self, at: usize, len: usize) -> Result<()> {
        let tag = match python_utf8(&self.bytes[at..at + len]) {
            (true, true) => Tag::Str,
            (true, false) => Tag::StrSurrogates,
            _ => return Err(self.fail("str is not valid UTF-8 (even with surrogates)")),
        };
        self.push(tag)
    }

    /// Runs to STOP (`until` is `None`; returns STOP's offset) or to `until`.
    fn run(&mut self, until: Option<u32>) -> Result<u32> {
        let end = until.map_or(usize::MAX, |u| u as usize);
        loop {
            if self.pos >= end {
                return Ok(end as u32);
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
                        let later = self.bytes.len() - self.pos;
                        let b = &mut *self.b;
                        room(&mut b.protos, 1, later, &mut b.mem)?;
                        b.protos.push((self.op_pos as u32, a[0]));
                    }
                }
                FRAME => {}
                MEMOIZE => self.bind(self.memo_len)?,
                BINPUT | LONG_BINPUT => self.bind(memo_arg(op, a))?,
                BINGET | LONG_BINGET => self.get(memo_arg(op, a))?,
                MARK => {
                    let start = self.carry.take().unwrap_or(self.op_pos as u32);
                    let later = self.bytes.len() - self.pos;
                    let b = &mut *self.b;
                    room(&mut b.marks, 1, later, &mut b.mem)?;
                    b.marks.push((b.stack.len() as u32, start));
                }
                POP => {
                    let len = self.b.stack.len();
                    if len > self.fence() {
                        self.close_open(len - 1, self.op_pos as u32);
                        if let Some(e) = self.b.stack.pop() {
                            self.carry = Some(self.carry.map_or(e.start, |c| c.min(e.start)));
                        }
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
                    self.consume(at as usize, None)?;
                    self.carry = Some(start);
                }
                DUP => {
                    let i = self.need(1)?;
                    let e = self.b.stack[i];
                    // The copy is the same object: mutating it is mutating the original.
                    let start = self.carry.take().unwrap_or(self.op_pos as u32);
                    self.push_entry(Entry { start, ..e })?;
                }
                NONE => self.push(Tag::None)?,
                NEWTRUE => self.push(Tag::True)?,
                NEWFALSE => self.push(Tag::False)?,
                BININT1 | BININT2 | BININT | LONG1 | LONG4 => self.push(Tag::Int)?,
                BINFLOAT => self.push(Tag::Float)?,
                SHORT_BINUNICODE => self.push_str(arg + 1, a.len() - 1)?,
                BINUNICODE => self.push_str(arg + 4, a.len() - 4)?,
                BINUNICODE8 => self.push_str(arg + 8, a.len() - 8)?,
                SHORT_BINSTRING | BINSTRING => self.push(Tag::OldStr)?,
                SHORT_BINBYTES | BINBYTES | BINBYTES8 => self.push(Tag::Bytes)?,
                BYTEARRAY8 => self.push(Tag::ByteArray)?,
                EMPTY_TUPLE | EMPTY_LIST | EMPTY_DICT => {
                    self.push(match op {
                        EMPTY_TUPLE => Tag::Tuple,
                        EMPTY_LIST => Tag::List,
                        _ => Tag::Dict,
                    })?;
                    let i = self.b.stack.len() - 1;
                    self.record_new(i, self.serial);
                }
                EMPTY_SET => self.push(Tag::Set)?,
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1 + 1);
                    let from = self.need(n)?;
                    self.tuple(from, None)?;
                }
                TUPLE => {
                    let (at, start) = self.b.marks.pop().ok_or_else(|| self.fail("no MARK"))?;
                    self.tuple(at as usize, Some(start))?;
                }
                FROZENSET => {
                    let (at, start) = self.b.marks.pop().ok_or_else(|| self.fail("no MARK"))?;
                    let at = at as usize;
                    if let Some(i) = (at..self.b.stack.len()).find(|&i| self.tag(i).unhashable()) {
                        return Err(self.fail(format_args!(
                            "frozenset element is {} (unhashable)",
                            self.tag(i).name()
                        )));
                    }
                    self.consume(at, None)?;
                    self.push_at(start, Tag::FrozenSet)?;
                }
                APPEND => {
                    let from = self.need(2)?;
                    self.check_target(from, &[Tag::List, Tag::Object], "list")?;
                    self.fill(from, 1, true)?;
                }
                APPENDS | SETITEMS | ADDITEMS => {
                    let (at, _) = self.b.marks.pop().ok_or_else(|| self.fail("no MARK"))?;
                    let at = at as usize;
                    if at == 0 || at <= self.fence() {
                        return Err(self.fail("no target below the MARK"));
                    }
                    let t = at - 1;
                    match op {
                        APPENDS => self.check_target(t, &[Tag::List, Tag::Object], "list")?,
                        SETITEMS => self.setitems(t, at)?,
                        _ => {
                            self.check_target(t, &[Tag::Set, Tag::Object], "set")?;
                            if let Some(i) =
                                (at..self.b.stack.len()).find(|&i| self.tag(i).unhashable())
                            {
                                return Err(self.fail(format_args!(
                                    "set element is {} (unhashable)",
                                    self.tag(i).name()
                                )));
                            }
                        }
                    }
                    self.fill(t, at - t, op != ADDITEMS)?;
                }
                SETITEM => {
                    let from = self.need(3)?;
                    self.setitems(from, from + 1)?;
                    self.fill(from, 1, true)?;
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
                    self.lookup(module, name, None)?;
                    self.push(Tag::Object)?;
                }
                STACK_GLOBAL => {
                    let from = self.need(2)?;
                    let (m, n) = (self.tag(from), self.tag(from + 1));
                    if !m.str_like() || !n.str_like() {
                        return Err(self.fail("STACK_GLOBAL requires str"));
                    }
                    let span = |i: usize| {
                        let e = self.b.stack[i];
                        match self.kind_of(e) {
                            Kind::Str { at, len, .. } | Kind::OldStr { at, len } => (at, len),
                            _ => (0, 0),
                        }
                    };
                    let (module, name) = (span(from), span(from + 1));
                    self.lookup(module, name, None)?;
                    self.call(from, Tag::Object)?;
                }
                EXT1 | EXT2 | EXT4 => {
                    let mut buf = [0u8; 4];
                    buf[..a.len()].copy_from_slice(a);
                    let code = u32::from_le_bytes(buf);
                    if code == 0 {
                        return Err(self.fail("EXT specifies code <= 0"));
                    }
                    self.lookup((0, 0), (0, 0), Some(code))?;
                    self.push(Tag::Object)?;
                }
                REDUCE => {
                    let from = self.need(2)?;
                    self.operand(from, &[Tag::Object], "callable")?;
                    self.operand(from + 1, &[Tag::Tuple, Tag::Object], "argument tuple")?;
                    self.call(from, Tag::Object)?;
                }
                NEWOBJ | NEWOBJ_EX => {
                    let n = if op == NEWOBJ { 2 } else { 3 };
                    let from = self.need(n)?;
                    self.operand(from, &[Tag::Object], "class")?;
                    self.operand(from + 1, &[Tag::Tuple, Tag::Object], "argument tuple")?;
                    if op == NEWOBJ_EX {
                        self.operand(from + 2, &[Tag::Dict, Tag::Object], "keyword arguments")?;
                    }
                    self.call(from, Tag::Object)?;
                }
                BUILD => {
                    let from = self.need(2)?;
                    self.check_target(from, &[Tag::Object], "object")?;
                    self.fill(from, 1, false)?;
                }
                _ => return Err(self.fail("unexpected opcode")),
            }
        }
    }

    /// The decoded kind of a stack entry.
    fn kind_of(&self, e: Entry) -> Kind {
        let r = self.region(e, e.start, 0);
        decode_kind(self.bytes, r.tag, r.at)
    }

    fn tuple(&mut self, from: usize, mark_start: Option<u32>) -> Result<()> {
        let hashable = self.b.stack[from..].iter().all(|e| !e.tag.unhashable());
        let start = mark_start.unwrap_or_else(|| {
            self.b
                .stack
                .get(from)
                .map_or(self.op_pos as u32, |e| e.start)
        });
        // The tuple takes the next serial: its record is keyed by it.
        let into = self.record_new(from, self.serial + 1);
        self.consume(from, into)?;
        let tag = if hashable {
            Tag::Tuple
        } else {
            Tag::TupleUnhashable
        };
        self.push_at(start, tag)
    }

    /// Replaces `stack[from..]` (a callable and its arguments) with the call's result.
    fn call(&mut self, from: usize, tag: Tag) -> Result<()> {
        let start = self.b.stack[from].start;
        self.consume(from, None)?;
        self.push_at(start, tag)
    }

    /// Consumes the values above the target at `t` (`skip` entries between are the
    /// target itself), recording them as its children if it is recorded.
    fn fill(&mut self, t: usize, skip: usize, may_record: bool) -> Result<()> {
        self.mutate(t)?;
        let into = (may_record && self.recording(t)).then_some(t);
        self.consume(t + skip, into)
    }

    fn check_target(&self, t: usize, ok: &[Tag], what: &str) -> Result<()> {
        let k = self.tag(t);
        if ok.contains(&k) {
            return Ok(());
        }
        Err(self.fail(format_args!("target is {}, not a {what}", k.name())))
    }

    fn operand(&self, i: usize, ok: &[Tag], what: &str) -> Result<()> {
        let k = self.tag(i);
        let k = if k == Tag::TupleUnhashable {
            Tag::Tuple
        } else {
            k
        };
        if ok.contains(&k) {
            return Ok(());
        }
        Err(self.fail(format_args!("the {what} is {}", k.name())))
    }

    fn setitems(&self, t: usize, from: usize) -> Result<()> {
        let target = self.tag(t);
        if !matches!(target, Tag::Dict | Tag::List | Tag::ByteArray | Tag::Object) {
            return Err(self.fail(format_args!(
                "target is {}, which does not support item assignment",
                target.name()
            )));
        }
        if (self.b.stack.len() - from) % 2 != 0 {
            return Err(self.fail("odd number of items for SETITEMS"));
        }
        if target == Tag::Dict {
            if let Some(i) = (from..self.b.stack.len())
                .step_by(2)
                .find(|&i| self.tag(i).unhashable())
            {
                return Err(self.fail(format_args!(
                    "dict key is {} (unhashable)",
                    self.tag(i).name()
                )));
            }
        }
        Ok(())
    }
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
        Scan::with(pickle, |scan| {
            let children = scan.children(&scan.root()).unwrap().unwrap();
            let err = scan.extract(&children[0]).unwrap_err().to_string();
            assert!(err.contains("changes a memoized object"), "{err}");
            let err = scan.extract(&children[1]).unwrap_err().to_string();
            assert!(err.contains("changes a memoized object"), "{err}");
            assert!(scan.extract(&scan.root()).is_ok());
            Ok(())
        })
        .unwrap();
    }

    fn item_of(pickle: &[u8]) -> Result<Pickled> {
        Scan::with(pickle, |scan| scan.extract(&scan.root()))
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
}
