//! The pickle codec: Python's serialisation format, restricted to data.
//!
//! [`decode`] runs a small stack machine over the opcodes CPython 3.8–3.14 emit at
//! protocols 2–5 (see `python-wire.md` §4.4) and builds a [`Value`]. It never imports,
//! resolves or calls anything: globals stay names, REDUCE/NEWOBJ/BUILD stay data.
//! [`encode`] writes a [`Value`] back as protocol-4 opcodes that any Python ≥ 3.4 reads
//! as the same value, including shared references.

mod decode;
mod encode;
mod fragment;
pub mod op;
mod repr;
mod value;

pub use decode::decode;
pub use encode::{encode, encode_fragment, encode_into};
pub use fragment::{write_list, Fragment};
pub use value::{Construct, Global, Object, Value};

/// The deepest nesting of containers the codec accepts. Python's own pickler gives up
/// near 1000 (its recursion limit); a lower bound keeps recursive drop, compare and
/// encode well inside a thread's stack.
pub const MAX_DEPTH: usize = 500;
