//! The value model: what a pickled queue item is, once decoded.
//!
//! Heap-carrying variants hold an [`Arc`] so that a pickle which references one object many
//! times (memo gets) shares that object instead of copying it: a 10 KB hostile pickle that
//! mentions a 1 MB string a thousand times costs 1 MB, not 1 GB. The encoder notices the
//! sharing (pointer identity) and writes memo references back, so Python sees the same
//! object graph it sent.
//!
//! Objects distq does not understand (class instances, exceptions, dataclasses) are kept as
//! [`Value::Global`] and [`Value::Object`] trees: stored and re-emitted faithfully, never
//! resolved, imported or executed.

use std::fmt;
use std::sync::Arc;

/// A decoded Python value.
///
/// # Example
/// ```
/// use distq::Value;
/// let task = Value::from(42);
/// assert_eq!(task.as_int(), Some(42));
/// let line = Value::from("n * n");
/// assert_eq!(line.as_str(), Some("n * n"));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An int that fits in 64 bits.
    Int(i64),
    /// An int outside the `i64` range: little-endian two's complement, minimal length
    /// (the payload of pickle's `LONG1`/`LONG4`).
    BigInt(Arc<[u8]>),
    /// A float.
    Float(f64),
    /// A str.
    Str(Arc<str>),
    /// A bytes object.
    Bytes(Arc<[u8]>),
    /// A bytearray.
    ByteArray(Arc<[u8]>),
    /// A tuple.
    Tuple(Arc<[Value]>),
    /// A list.
    List(Arc<[Value]>),
    /// A dict, in insertion order.
    Dict(Arc<[(Value, Value)]>),
    /// A set.
    Set(Arc<[Value]>),
    /// A frozenset.
    FrozenSet(Arc<[Value]>),
    /// A reference to a class or function by name (`module.name`); never imported.
    Global(Arc<Global>),
    /// An object built by calling something (REDUCE / NEWOBJ) and optionally
    /// given state (BUILD); never executed.
    Object(Arc<Object>),
}

/// A named global, e.g. `queue.Full`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    /// Module, e.g. `builtins`.
    pub module: String,
    /// Qualified name inside the module, e.g. `KeyError`.
    pub name: String,
}

/// How an opaque object was constructed in the pickle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Construct {
    /// `callable(*args)` — pickle's REDUCE.
    Reduce,
    /// `cls.__new__(cls, *args)` — pickle's NEWOBJ.
    NewObj,
}

/// An opaque object: kept as data, re-emitted as the same opcodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// REDUCE or NEWOBJ.
    pub construct: Construct,
    /// The callable (REDUCE) or class (NEWOBJ); usually a [`Value::Global`].
    pub callable: Value,
    /// The argument tuple.
    pub args: Value,
    /// State applied by BUILD, if any.
    pub state: Option<Value>,
}

impl Value {
    /// Shorthand for a str value.
    pub fn str(s: &str) -> Value {
        Value::Str(Arc::from(s))
    }

    /// Shorthand for a tuple value.
    pub fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Arc::from(items))
    }

    /// Shorthand for a list value.
    pub fn list(items: Vec<Value>) -> Value {
        Value::List(Arc::from(items))
    }

    /// Shorthand for a dict value.
    pub fn dict(items: Vec<(Value, Value)>) -> Value {
        Value::Dict(Arc::from(items))
    }

    /// Shorthand for a global reference.
    pub fn global(module: &str, name: &str) -> Value {
        Value::Global(Arc::new(Global {
            module: module.to_string(),
            name: name.to_string(),
        }))
    }

    /// An exception instance as Python pickles one: `REDUCE(class, args)`.
    pub fn exception(module: &str, name: &str, args: Vec<Value>) -> Value {
        Value::Object(Arc::new(Object {
            construct: Construct::Reduce,
            callable: Value::global(module, name),
            args: Value::tuple(args),
            state: None,
        }))
    }

    /// The int, if this is an int that fits in `i64`.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    /// The str, if this is a str.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is a tuple.
    pub fn as_tuple(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(t) => Some(t),
            _ => None,
        }
    }

    /// The value's repr cut off after about `max` bytes (with `...`): for error messages
    /// and logs, where a hostile value (a long string, a widely shared graph) must not
    /// turn into megabytes of text. Writing stops as soon as the budget is spent.
    pub fn brief(&self, max: usize) -> String {
        struct Capped {
            out: String,
            max: usize,
        }
        impl fmt::Write for Capped {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let room = self.max.saturating_sub(self.out.len());
                if s.len() <= room {
                    self.out.push_str(s);
                    return Ok(());
                }
                let mut cut = room;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.out.push_str(&s[..cut]);
                Err(fmt::Error)
            }
        }
        let mut capped = Capped {
            out: String::new(),
            max,
        };
        if fmt::Write::write_fmt(&mut capped, format_args!("{self}")).is_err() {
            capped.out.push_str("...");
        }
        capped.out
    }

    /// `(module, name)` of the class or callable that built this object, if it is one.
    pub fn class_name(&self) -> Option<(&str, &str)> {
        match self {
            Value::Object(o) => match &o.callable {
                Value::Global(g) => Some((&g.module, &g.name)),
                _ => None,
            },
            _ => None,
        }
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Int(n)
    }
}

impl From<i32> for Value {
    fn from(n: i32) -> Value {
        Value::Int(n.into())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Value {
        Value::Float(x)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::str(s)
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(Arc::from(s))
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Value {
        Value::Bytes(Arc::from(b))
    }
}

/// Renders a value the way Python's `repr()` would for the common types, so that
/// binaries can print results; opaque objects render as `module.name(args...)` (the
/// exact format is documented in `pickle/repr.rs`).
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::pickle::repr::write_repr(self, f)
    }
}
