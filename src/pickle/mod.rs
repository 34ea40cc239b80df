//! The pickle codec: Python's serialisation format, restricted to data.
//!
//! [`decode`] runs a small stack machine over the opcodes CPython 3.8–3.14 emit at
//! protocols 2–5 (see `../shared/python-wire.md` §4.4, beside the repository) and
//! builds a [`Value`]. It never imports, resolves or calls anything: globals stay names, REDUCE/NEWOBJ/BUILD stay data.
//! [`encode`] writes a [`Value`] back as protocol-4 opcodes that any Python ≥ 3.4 reads
//! as the same value, including shared references.

mod decode;
mod encode;
pub(crate) mod flat;
mod fragment;
pub mod op;
mod repr;
mod scan;
mod splice;
mod value;

pub use decode::decode;
pub use encode::{encode, encode_fragment, encode_into};
pub use fragment::Fragment;
pub(crate) use scan::{Kind, Region, Scan};
pub use scan::{Pickled, SCAN_MEMORY_FACTOR, SCAN_MEMORY_SLACK};
pub(crate) use splice::{write_pair, PairHead, Second};
pub use value::{Construct, Global, Object, Value};

/// The deepest nesting of containers the codec accepts. Python's own pickler gives up
/// near 1000 (its recursion limit); a lower bound keeps recursive drop, compare and
/// encode well inside a thread's stack.
pub const MAX_DEPTH: usize = 500;

/// The most values a decoded pickle may contain counting every shared reference as a
/// copy (its size as a tree). Sharing keeps memory linear in the input, but a tree walk
/// of a doubly-shared chain ("billion laughs": 60 levels, 2^60 leaves) would never end.
/// 2^26 is far above any real item: a 64 MiB frame holds at most ~2^26 unshared values.
pub const MAX_EXPANDED: u64 = 1 << 26;
