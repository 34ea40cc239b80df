//! Flat pickles, read straight off their bytes: a tuple whose elements are scalars,
//! tuples of scalars and str-keyed dicts of scalars.
//!
//! Most pickles a peer sends are that simple, a few names and numbers, and for them the
//! scanner's bookkeeping (regions, memo bindings, children) costs more than the message.
//! So [`Flat`] reads exactly the opcodes CPython's pickler writes for such a value at
//! protocols 4 and 5: PROTO, an optional FRAME, MARK, the elements, TUPLE, STOP and
//! nothing after. A scalar is NONE, a bool, BININT1/BININT2/BININT, BINFLOAT, a str
//! (SHORT_BINUNICODE/BINUNICODE) or bytes (SHORT_BINBYTES/BINBYTES); a tuple is
//! EMPTY_TUPLE, one to three scalars and TUPLE1..3, or MARK, scalars and TUPLE; a dict
//! is EMPTY_DICT then SETITEM or SETITEMS of str keys and scalars. Any value may be
//! followed by its MEMOIZE, which is skipped: a flat pickle has no memo read to need
//! it, and a scalar's opcodes without it are a fragment that uses no memo. Anything
//! else, or anything unsure, is `None`, for the caller to give to the scanner
//! ([`super::Scan`]), which reads every pickle: the answer is the same either way, only
//! sooner here. A pickle read to its [`Flat::close`] is one CPython loads, up to the
//! UTF-8 of its strs ([`Scalar::Str`]).
//!
//! Nothing is allocated: what is read borrows the pickle, and the contents of a tuple
//! or dict are read again from their (already checked) opcodes as they are iterated.

use super::op::*;
use super::Fragment;

/// A scalar as pickled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scalar<'b> {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A str's UTF-8 as pickled, unchecked: a Python str may hold lone surrogates, which
    /// a Rust `str` cannot, so the caller decides (and a Rust caller checks anyway, when
    /// it makes a `&str`).
    Str(&'b [u8]),
    Bytes(&'b [u8]),
}

/// A scalar: the opcode that wrote it, with its argument (and without its MEMOIZE).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Atom<'b> {
    /// One of the opcodes [`Cursor::atom`] accepts, its argument all there: what
    /// [`Atom::scalar`] indexes without checking again.
    opcodes: &'b [u8],
}

impl<'b> Atom<'b> {
    /// The scalar. Read from the opcode when asked for, so that an atom is two words
    /// while it is checked and carried. (Always inlined: left out of line, as LLVM
    /// leaves it, it costs a request on the server's hot path ~60 instructions.)
    #[inline(always)]
    pub(crate) fn scalar(&self) -> Scalar<'b> {
        let b = self.opcodes;
        match b[0] {
            NONE => Scalar::None,
            NEWTRUE => Scalar::Bool(true),
            NEWFALSE => Scalar::Bool(false),
            BININT1 => Scalar::Int(i64::from(b[1])),
            BININT2 => Scalar::Int(i64::from(u16::from_le_bytes([b[1], b[2]]))),
            BININT => Scalar::Int(i64::from(i32::from_le_bytes([b[1], b[2], b[3], b[4]]))),
            BINFLOAT => Scalar::Float(f64::from_be_bytes([
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8],
            ])),
            SHORT_BINUNICODE => Scalar::Str(&b[2..]),
            BINUNICODE => Scalar::Str(&b[5..]),
            SHORT_BINBYTES => Scalar::Bytes(&b[2..]),
            _ => Scalar::Bytes(&b[5..]),
        }
    }

    /// The scalar as a fragment of its own, to be stored and spliced: its one opcode
    /// uses no memo.
    pub(crate) fn fragment(&self) -> Fragment {
        Fragment::from_parts(self.opcodes.to_vec(), false)
    }
}

/// The scalars of a tuple element.
#[derive(Clone, Debug)]
pub(crate) struct Atoms<'b> {
    c: Cursor<'b>,
    len: usize,
}

impl<'b> Iterator for Atoms<'b> {
    type Item = Atom<'b>;

    fn next(&mut self) -> Option<Atom<'b>> {
        self.len = self.len.checked_sub(1)?;
        self.c.atom()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len, Some(self.len))
    }
}

impl ExactSizeIterator for Atoms<'_> {}

/// The `(key, value)` entries of a dict element, the key a str's UTF-8 as pickled (see
/// [`Scalar::Str`]).
#[derive(Clone, Debug)]
pub(crate) struct Entries<'b> {
    c: Cursor<'b>,
}

impl<'b> Iterator for Entries<'b> {
    type Item = (&'b [u8], Atom<'b>);

    fn next(&mut self) -> Option<(&'b [u8], Atom<'b>)> {
        while matches!(self.c.peek()?, MARK | SETITEM | SETITEMS) {
            self.c.pos += 1;
        }
        self.c.entry()
    }
}

/// A flat pickle being read, element by element, the caller saying what each must be:
/// a pickle that is not what the caller wants fails at the first opcode that differs.
///
/// Its methods are `#[inline]`: a request is a handful of calls of a few instructions
/// each, and without the hints a request costs up to ~80 instructions more.
pub(crate) struct Flat<'b> {
    c: Cursor<'b>,
}

impl<'b> Flat<'b> {
    /// Starts reading `pickle`: PROTO 4 or 5, an optional FRAME, the tuple's MARK.
    #[inline]
    pub(crate) fn open(pickle: &'b [u8]) -> Option<Flat<'b>> {
        let mut c = Cursor::over(pickle);
        if c.byte()? != PROTO || !matches!(c.byte()?, 4 | 5) {
            return None;
        }
        if c.peek()? == FRAME {
            c.take(1 + 8)?;
        }
        (c.byte()? == MARK).then_some(Flat { c })
    }

    /// The next element, a scalar.
    #[inline]
    pub(crate) fn atom(&mut self) -> Option<Atom<'b>> {
        self.c.atom()
    }

    /// The next element, a tuple of scalars.
    #[inline]
    pub(crate) fn tuple(&mut self) -> Option<Atoms<'b>> {
        let c = &mut self.c;
        let (from, len, to) = match c.peek()? {
            EMPTY_TUPLE => {
                c.pos += 1;
                (c.pos, 0, c.pos)
            }
            MARK => {
                c.pos += 1;
                let from = c.pos;
                let mut len = 0;
                while c.peek()? != TUPLE {
                    c.atom()?;
                    len += 1;
                }
                c.pos += 1;
                (from, len, c.pos - 1)
            }
            _ => {
                let from = c.pos;
                let mut len: usize = 0;
                while !matches!(c.peek()?, TUPLE1 | TUPLE2 | TUPLE3) {
                    if len == 3 {
                        return None;
                    }
                    c.atom()?;
                    len += 1;
                }
                if c.byte()? != *[TUPLE1, TUPLE2, TUPLE3].get(len.checked_sub(1)?)? {
                    return None;
                }
                (from, len, c.pos - 1)
            }
        };
        c.memoize();
        Some(Atoms {
            c: Cursor::over(c.b.get(from..to)?),
            len,
        })
    }

    /// The next element, a dict of str keys and scalars.
    #[inline]
    pub(crate) fn dict(&mut self) -> Option<Entries<'b>> {
        let c = &mut self.c;
        if c.byte()? != EMPTY_DICT {
            return None;
        }
        c.memoize();
        let from = c.pos;
        // A group that does not read as one (a str without its value and SETITEM) is
        // the next element, not the dict's.
        while matches!(c.peek(), Some(MARK | SHORT_BINUNICODE | BINUNICODE)) {
            let group = c.pos;
            if c.setitems().is_none() {
                c.pos = group;
                break;
            }
        }
        Some(Entries {
            c: Cursor::over(c.b.get(from..c.pos)?),
        })
    }

    /// The end of the tuple: TUPLE, its MEMOIZE, STOP and nothing after. Only a pickle
    /// that ends here is one CPython loads to the elements read.
    #[inline]
    pub(crate) fn close(mut self) -> Option<()> {
        let c = &mut self.c;
        if c.byte()? != TUPLE {
            return None;
        }
        c.memoize();
        (c.byte()? == STOP && c.pos == c.b.len()).then_some(())
    }
}

/// A position in opcodes being read.
#[derive(Clone, Debug)]
struct Cursor<'b> {
    b: &'b [u8],
    pos: usize,
}

impl<'b> Cursor<'b> {
    fn over(b: &'b [u8]) -> Cursor<'b> {
        Cursor { b, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn byte(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        let end = self.pos.checked_add(n)?;
        let raw = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(raw)
    }

    fn memoize(&mut self) {
        if self.peek() == Some(MEMOIZE) {
            self.pos += 1;
        }
    }

    /// One scalar and its MEMOIZE.
    #[inline]
    fn atom(&mut self) -> Option<Atom<'b>> {
        let rest = self.b.get(self.pos..)?;
        let (&op, arg) = rest.split_first()?;
        let len = match op {
            NONE | NEWTRUE | NEWFALSE => 0,
            BININT1 => 1,
            BININT2 => 2,
            BININT => 4,
            BINFLOAT => 8,
            SHORT_BINUNICODE | SHORT_BINBYTES => 1 + usize::from(*arg.first()?),
            BINUNICODE | BINBYTES => {
                let n = u32::from_le_bytes(arg.get(..4)?.try_into().ok()?);
                usize::try_from(n).ok()?.checked_add(4)?
            }
            _ => return None,
        };
        let opcodes = rest.get(..len.checked_add(1)?)?;
        self.pos += opcodes.len();
        self.memoize();
        Some(Atom { opcodes })
    }

    /// A dict entry: a str key and a scalar.
    fn entry(&mut self) -> Option<(&'b [u8], Atom<'b>)> {
        let Scalar::Str(key) = self.atom()?.scalar() else {
            return None;
        };
        Some((key, self.atom()?))
    }

    /// One SETITEM or SETITEMS and the entries it sets.
    fn setitems(&mut self) -> Option<()> {
        if self.peek()? == MARK {
            self.pos += 1;
            while self.peek()? != SETITEMS {
                self.entry()?;
            }
            self.pos += 1;
        } else {
            self.entry()?;
            if self.byte()? != SETITEM {
                return None;
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// What was read, as plain data to compare.
    #[derive(Debug, PartialEq)]
    enum Read<'b> {
        Atom(Scalar<'b>, &'b [u8]),
        Tuple(Vec<(Scalar<'b>, &'b [u8])>),
        Dict(Vec<(&'b [u8], Scalar<'b>, &'b [u8])>),
    }

    /// Reads `pickle` as the elements `shape` names (`a` a scalar, `t` a tuple, `d` a
    /// dict), then its end.
    fn read<'b>(pickle: &'b [u8], shape: &str) -> Option<Vec<Read<'b>>> {
        let mut flat = Flat::open(pickle)?;
        let mut got = Vec::new();
        for want in shape.chars() {
            got.push(match want {
                'a' => {
                    let a = flat.atom()?;
                    Read::Atom(a.scalar(), a.opcodes)
                }
                't' => {
                    let t = flat.tuple()?;
                    assert_eq!(t.len(), t.clone().count());
                    Read::Tuple(t.map(|a| (a.scalar(), a.opcodes)).collect())
                }
                _ => Read::Dict(
                    flat.dict()?
                        .map(|(k, a)| (k, a.scalar(), a.opcodes))
                        .collect(),
                ),
            });
        }
        flat.close().map(|()| got)
    }

    #[test]
    fn python_pickles_are_read_with_their_memo_writes_skipped() {
        // Python 3.11: pickle.dumps(('7f2a3c4b5d60', 'get', (), {'timeout': 1.5}), 4).
        let p = hex("8004953000000000000000288c0c376632613363346235643630948c0367657494297d948c0774696d656f757494473ff80000000000007374942e");
        let float = b"G\x3f\xf8\0\0\0\0\0\0";
        assert_eq!(
            read(&p, "aatd").unwrap(),
            [
                Read::Atom(Scalar::Str(b"7f2a3c4b5d60"), b"\x8c\x0c7f2a3c4b5d60"),
                Read::Atom(Scalar::Str(b"get"), b"\x8c\x03get"),
                Read::Tuple(vec![]),
                Read::Dict(vec![(b"timeout", Scalar::Float(1.5), float)]),
            ]
        );
        // (None, (b'ab', 7, -1), {'k': None, 'l': True}, 'z', 2.5) at protocol 5: a str
        // after a dict is not the dict's.
        let p = b"\x80\x05(NC\x02ab\x94K\x07J\xff\xff\xff\xff\x87\x94}\x94(\x8c\x01k\x94N\x8c\x01l\x94\x88u\x8c\x01z\x94G\x40\x04\0\0\0\0\0\0t\x94.";
        assert_eq!(
            read(p, "atdaa").unwrap(),
            [
                Read::Atom(Scalar::None, b"N"),
                Read::Tuple(vec![
                    (Scalar::Bytes(b"ab"), b"C\x02ab"),
                    (Scalar::Int(7), b"K\x07"),
                    (Scalar::Int(-1), b"J\xff\xff\xff\xff"),
                ]),
                Read::Dict(vec![
                    (b"k", Scalar::None, b"N"),
                    (b"l", Scalar::Bool(true), b"\x88"),
                ]),
                Read::Atom(Scalar::Str(b"z"), b"\x8c\x01z"),
                Read::Atom(Scalar::Float(2.5), b"G\x40\x04\0\0\0\0\0\0"),
            ]
        );
    }

    #[test]
    fn tuples_and_dicts_in_every_form() {
        // ((1, 2, 3, 4), (5,), (6, 7), {'a': 1, 'b': 2, 'c': 3}, {}): a MARK tuple, TUPLE1,
        // TUPLE2, SETITEM, an empty SETITEMS and a full one.
        let p = b"\x80\x04((K\x01K\x02K\x03K\x04tK\x05\x85K\x06K\x07\x86}\x8c\x01aK\x01s(u(\x8c\x01bK\x02\x8c\x01cK\x03u}t.";
        let int = |n: i64, op: &'static [u8]| (Scalar::Int(n), op);
        let got = read(p, "tttdd").unwrap();
        let four = [(1, b"K\x01"), (2, b"K\x02"), (3, b"K\x03"), (4, b"K\x04")];
        let four = four.map(|(n, op)| int(n, op)).to_vec();
        assert_eq!(got[0], Read::Tuple(four));
        assert_eq!(got[1], Read::Tuple(vec![int(5, b"K\x05")]));
        assert_eq!(
            got[2],
            Read::Tuple(vec![int(6, b"K\x06"), int(7, b"K\x07")])
        );
        let Read::Dict(d) = &got[3] else {
            panic!("{got:?}")
        };
        let keys: Vec<&[u8]> = d.iter().map(|e| e.0).collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
        assert_eq!(got[4], Read::Dict(vec![]));
    }

    #[test]
    fn anything_else_is_left_to_the_scanner() {
        let ok = b"\x80\x04(NK\x01\x85}t.";
        assert!(read(ok, "atd").is_some());
        for (p, shape) in [
            (&b"\x80\x03(NK\x01\x85}t."[..], "atd"), // protocol 3
            (b"\x80\x04(NK\x01\x85}t.N", "atd"),     // bytes after STOP
            (b"\x80\x04(NK\x01\x85}t", "atd"),       // no STOP
            (b"\x80\x04(NK\x01\x85}t.", "atdd"),     // fewer elements than wanted
            (b"\x80\x04(NK\x01\x85}t.", "at"),       // more
            (b"\x80\x04(NK\x01\x85}t.", "aat"),      // a tuple where a scalar is wanted
            (b"\x80\x04(NK\x01\x85}t.", "ttd"),      // a scalar where a tuple is
            (b"\x80\x04(N\x94h\x00\x85}t.", "atd"),  // a memo read
            (b"\x80\x04(NK\x01K\x01\x85}t.", "atd"), // TUPLE1 after two scalars
            (b"\x80\x04(NK\x01K\x01K\x01K\x01\x87}t.", "atd"), // four before TUPLE3
            (b"\x80\x04(N\x85}t.", "atd"),           // TUPLE1 of nothing
            (b"\x80\x04(N]\x85}t.", "atd"),          // a list
            (b"\x80\x04(N(])}t.", "atd"),            // a list in a tuple
            (b"\x80\x04(N)}K\x01K\x01st.", "atd"),   // an int key
            (b"\x80\x04(N)}(\x8c\x01aK\x01t.", "atd"), // SETITEMS missing
            (b"\x80\x04(N)\x8c\x02a", "ata"),        // a str cut short
            (b"\x80\x04(NX\xff\xff\xff\xff)t.", "aat"), // a str longer than the pickle
        ] {
            assert!(read(p, shape).is_none(), "{p:02x?} as {shape}");
        }
    }

    #[test]
    fn a_scalar_is_a_fragment_of_its_own() {
        let mut flat = Flat::open(b"\x80\x04(\x8c\x01x\x94t.").unwrap();
        let f = flat.atom().unwrap().fragment();
        assert_eq!(f.bytes(), b"\x8c\x01x");
        assert!(!f.uses_memo());
        assert_eq!(f.decode().unwrap(), crate::Value::str("x"));
        assert!(flat.close().is_some());
    }
}
