//! Manager messages: requests and replies as Rust types, and their pickled form.
//!
//! After the handshake every frame carries one pickle. A request is the 4-tuple
//! `(ident, methodname, args, kwds)`; a reply is the 2-tuple `(kind, result)` where kind
//! is one of the strings in [`Reply`]. Strictly one request then one reply: there are no
//! request ids, so a connection can never have two calls in flight.
//!
//! # Format
//! ```text
//! request  (None, 'create', ('get_task_queue',), {})
//!          ('d15700000000', 'get', (), {'timeout': 1})
//! reply    ('#RETURN', value) | ('#ERROR', exception) | ('#TRACEBACK', str)
//!          | ('#UNSERIALIZABLE', str) | ('#PROXY', (exposed, token))
//! ```

use crate::frame;
use crate::pickle::flat::{Atom, Flat, Scalar};
use crate::pickle::{self, Fragment, Kind, PairHead, Pickled, Region, Scan, Second, Value};
use crate::{Error, Result};

/// One call: a public function (`ident` is `None`) or a method on an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The object the method is called on; `None` for the manager's public functions.
    pub ident: Option<String>,
    /// The function or method name.
    pub method: String,
    /// Positional arguments.
    pub args: Vec<Arg>,
    /// Keyword arguments, in the order sent.
    pub kwargs: Vec<(String, Arg)>,
}

/// One argument of a [`Request`].
///
/// On the server, only scalars are read; everything else stays the opcodes the client
/// sent, because an argument that is not a scalar is almost always a queue item, and an
/// item is forwarded, not understood.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A scalar read from the request, or any value a Rust client passes.
    Value(Value),
    /// Anything else, as its own pickle.
    Pickled(Pickled),
    /// The elements of a list or tuple, each as its own pickle: the items of `put_many`
    /// and `ack_put_many`.
    Items(Vec<Pickled>),
}

impl Arg {
    /// The argument as a value, decoding it if it is still pickled.
    ///
    /// # Errors
    /// Whatever [`pickle::decode`] reports for values distq cannot represent.
    pub fn to_value(&self) -> Result<Value> {
        match self {
            Arg::Value(v) => Ok(v.clone()),
            Arg::Pickled(p) => p.fragment.decode(),
            Arg::Items(items) => Ok(Value::list(
                items
                    .iter()
                    .map(|p| p.fragment.decode())
                    .collect::<Result<_>>()?,
            )),
        }
    }

    /// A scalar argument, if it is one (for arguments like `timeout` and `block`).
    pub fn value(&self) -> Option<&Value> {
        match self {
            Arg::Value(v) => Some(v),
            _ => None,
        }
    }

    /// A short, bounded rendering for logs.
    pub fn brief(&self, max: usize) -> String {
        match self {
            Arg::Value(v) => v.brief(max),
            Arg::Pickled(p) => format!("<pickled, {} bytes>", p.fragment.bytes().len()),
            Arg::Items(items) => format!("<{} pickled items>", items.len()),
        }
    }
}

/// The pickle of a `#RETURN` reply up to its result (11 is `#RETURN`'s length plus 4,
/// checked when compiling).
const RETURN_HEAD: PairHead<11> = PairHead::new("#RETURN");

/// The longest str argument read as a value; longer ones stay pickled.
const SCALAR_STR_MAX: u32 = 256;

/// The methods with an argument that is a sequence of items, each stored on its own:
/// the method, the argument's position, its keyword name.
const ITEMS_ARGS: &[(&str, usize, &str)] =
    &[("put_many", 0, "items"), ("ack_put_many", 1, "items")];

/// Whether argument `position` (or keyword `name`) of `method` is a sequence of items.
fn is_items(method: &str, position: Option<usize>, name: Option<&str>) -> bool {
    ITEMS_ARGS
        .iter()
        .any(|&(m, i, k)| m == method && (position == Some(i) || name == Some(k)))
}

impl Request {
    /// A request with no keyword arguments.
    pub fn new(ident: Option<&str>, method: &str, args: Vec<Value>) -> Request {
        Request {
            ident: ident.map(str::to_string),
            method: method.to_string(),
            args: args.into_iter().map(Arg::Value).collect(),
            kwargs: Vec::new(),
        }
    }

    /// Reads a request from its pickle without decoding its arguments into values:
    /// scalars are read, everything else is cut out as its own pickle (see
    /// `pickle/scan.rs`).
    ///
    /// # Errors
    /// [`Error::Protocol`] naming what was wrong, for a malformed pickle or anything but
    /// `(None|str, str, tuple, dict[str, ...])`; [`Error::Value`] for the few pickles
    /// distq cannot forward faithfully.
    pub fn parse(bytes: &[u8]) -> Result<Request> {
        if let Some(req) = parse_flat(bytes) {
            return Ok(req);
        }
        Scan::with(bytes, parse_scanned)
    }

    /// The request as the 4-tuple Python expects.
    ///
    /// # Errors
    /// Only for pickled arguments distq cannot decode (a Rust client never has any).
    pub fn to_value(&self) -> Result<Value> {
        Ok(Value::tuple(vec![
            self.ident.as_deref().map_or(Value::None, Value::str),
            Value::str(&self.method),
            Value::tuple(self.args.iter().map(Arg::to_value).collect::<Result<_>>()?),
            Value::dict(
                self.kwargs
                    .iter()
                    .map(|(k, v)| Ok((Value::str(k), v.to_value()?)))
                    .collect::<Result<_>>()?,
            ),
        ]))
    }
}

/// The requests Python's manager clients send most, read straight off their bytes.
///
/// A queue call from Python is a flat pickle (`pickle/flat.rs`): the ident `None` or a
/// str, the method a str, args a tuple of scalars, strs or bytes, kwds a dict of them
/// with str keys. This maps it as [`parse_scanned`] maps the scan (`tests` compares the
/// two on generated and mutated requests); anything else, or anything unsure (a str
/// that is not Rust UTF-8), is `None` and goes to the scanner.
fn parse_flat(bytes: &[u8]) -> Option<Request> {
    let mut flat = Flat::open(bytes)?;
    let (ident, method, args, kwds) = (flat.atom()?, flat.atom()?, flat.tuple()?, flat.dict()?);
    flat.close()?;
    let ident = match ident.scalar() {
        Scalar::None => None,
        Scalar::Str(s) => Some(std::str::from_utf8(s).ok()?.to_string()),
        _ => return None,
    };
    let Scalar::Str(method) = method.scalar() else {
        return None;
    };
    let method = std::str::from_utf8(method).ok()?.to_string();
    // Loops rather than `collect::<Option<Vec<_>>>()`, which costs a request on this
    // path a tenth more.
    let mut request_args = Vec::new();
    for (i, a) in args.enumerate() {
        request_args.push(flat_arg(&a, is_items(&method, Some(i), None))?);
    }
    let mut kwargs = Vec::new();
    for (name, a) in kwds {
        let name = std::str::from_utf8(name).ok()?;
        let items = is_items(&method, None, Some(name));
        kwargs.push((name.to_string(), flat_arg(&a, items)?));
    }
    Some(Request {
        ident,
        method,
        args: request_args,
        kwargs,
    })
}

/// One argument of a flat request, as [`arg`] makes it from the scan.
fn flat_arg(a: &Atom<'_>, items: bool) -> Option<Arg> {
    let pickled = || {
        Arg::Pickled(Pickled {
            fragment: a.fragment(),
            names: None,
        })
    };
    Some(match a.scalar() {
        Scalar::None => Arg::Value(Value::None),
        Scalar::Bool(b) => Arg::Value(Value::Bool(b)),
        Scalar::Int(n) => Arg::Value(Value::Int(n)),
        Scalar::Float(f) => Arg::Value(Value::Float(f)),
        Scalar::Str(s) => {
            let s = std::str::from_utf8(s).ok()?;
            if items || s.len() > SCALAR_STR_MAX as usize {
                pickled()
            } else {
                Arg::Value(Value::str(s))
            }
        }
        Scalar::Bytes(_) => pickled(),
    })
}

/// [`Request::parse`] on the scanned pickle.
fn parse_scanned(scan: &Scan<'_>) -> Result<Request> {
    let root = scan.root();
    let parts = match scan.kind(&root) {
        Kind::Tuple { .. } => scan.children(&root)?.filter(|c| c.len() == 4),
        _ => None,
    }
    .ok_or_else(|| Error::protocol("a request must be a 4-tuple (ident, method, args, kwds)"))?;
    let ident = match scan.kind(&parts[0]) {
        Kind::None => None,
        _ => Some(
            scan.str(&parts[0])
                .ok_or_else(|| Error::protocol("request ident must be None or a str"))?
                .to_string(),
        ),
    };
    let method = scan
        .str(&parts[1])
        .ok_or_else(|| Error::protocol("request method name must be a str"))?
        .to_string();
    let args = match scan.kind(&parts[2]) {
        Kind::Tuple { .. } => scan.children(&parts[2])?,
        _ => None,
    }
    .ok_or_else(|| Error::protocol("request args must be a tuple"))?;
    let args = args
        .iter()
        .enumerate()
        .map(|(i, r)| arg(scan, r, is_items(&method, Some(i), None)))
        .collect::<Result<Vec<_>>>()?;
    let kwds = match scan.kind(&parts[3]) {
        Kind::Dict => scan.children(&parts[3])?,
        _ => None,
    }
    .ok_or_else(|| Error::protocol("request kwds must be a dict"))?;
    let kwargs = kwds
        .chunks_exact(2)
        .map(|pair| {
            let name = scan
                .str(&pair[0])
                .ok_or_else(|| Error::protocol("keyword argument names must be str"))?;
            let items = is_items(&method, None, Some(name));
            Ok((name.to_string(), arg(scan, &pair[1], items)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Request {
        ident,
        method,
        args,
        kwargs,
    })
}

/// One argument: a scalar as a value, anything else cut out of the request.
fn arg(scan: &Scan<'_>, r: &Region, items: bool) -> Result<Arg> {
    Ok(match scan.kind(r) {
        Kind::None => Arg::Value(Value::None),
        Kind::Bool(b) => Arg::Value(Value::Bool(b)),
        Kind::Int(n) => Arg::Value(Value::Int(n)),
        Kind::Float(f) => Arg::Value(Value::Float(f)),
        // Names (typeids, idents) are short; a long str is an item, kept as sent.
        Kind::Str { len, .. } if !items && len <= SCALAR_STR_MAX => match scan.str(r) {
            Some(s) => Arg::Value(Value::str(s)),
            None => Arg::Pickled(scan.extract(r)?),
        },
        Kind::List | Kind::Tuple { .. } if items => match scan.children(r)? {
            Some(elements) => Arg::Items(
                elements
                    .iter()
                    .map(|e| scan.extract(e))
                    .collect::<Result<_>>()?,
            ),
            None => Arg::Pickled(scan.extract(r)?),
        },
        _ => Arg::Pickled(scan.extract(r)?),
    })
}

/// A reply, by kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `#RETURN`: the call succeeded with this value.
    Return(Value),
    /// `#ERROR`: the method raised this exception instance (a Python client re-raises it).
    Error(Value),
    /// `#TRACEBACK`: a fault outside the method (unknown ident, bad request), as text.
    Traceback(String),
    /// `#UNSERIALIZABLE`: the result could not be pickled, as text.
    Unserializable(String),
    /// `#PROXY`: `(exposed, token)` for a method that returns a new shared object.
    Proxy(Value),
    /// `#RETURN` of one queue item, already encoded: sent without re-encoding.
    Item(Fragment),
    /// `#RETURN` of a list of queue items, already encoded (`get_many`).
    Items(Vec<Fragment>),
    /// `#RETURN` of `(lease, item)` for `reserve`, the item already encoded.
    Lease(u64, Fragment),
}

impl Reply {
    /// A `#TRACEBACK` reply shaped like Python's `format_exc()` output, so that a Python
    /// client's `RemoteError` prints something familiar.
    pub fn traceback(exc_type: &str, msg: &str) -> Reply {
        Reply::Traceback(format!(
            "Traceback (most recent call last):\n  File \"distq\", in server\n{exc_type}: {msg}\n"
        ))
    }

    fn kind(&self) -> &'static str {
        match self {
            Reply::Return(_) | Reply::Item(_) | Reply::Items(_) | Reply::Lease(..) => "#RETURN",
            Reply::Error(_) => "#ERROR",
            Reply::Traceback(_) => "#TRACEBACK",
            Reply::Unserializable(_) => "#UNSERIALIZABLE",
            Reply::Proxy(_) => "#PROXY",
        }
    }

    /// For a `#RETURN` of one stored item, the reply's pickle as the opcodes before the
    /// item, the item, and the opcodes after it: a large item is then written from where
    /// it is instead of copied into the frame ([`frame::write_parts`]).
    pub fn item_parts(&self) -> Option<[&[u8]; 3]> {
        match self {
            Reply::Item(item) => Some(RETURN_HEAD.parts(item)),
            _ => None,
        }
    }

    /// Appends the reply's pickle, the 2-tuple `(kind, result)`, to `out`.
    ///
    /// Written around the result rather than by building a tuple `Value`, so a stored
    /// item goes in as the opcodes it is (see `pickle/splice.rs`).
    ///
    /// # Errors
    /// [`Error::Value`] if the result cannot be pickled, [`Error::Internal`] for a stored
    /// item that breaks the memo rule; `out` may then hold a partial pickle and must be
    /// discarded.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let result = match self {
            Reply::Return(v) | Reply::Error(v) | Reply::Proxy(v) => Second::Value(v),
            Reply::Traceback(text) | Reply::Unserializable(text) => Second::Str(text),
            Reply::Item(item) => Second::Fragment(item),
            Reply::Items(items) => Second::List(items),
            Reply::Lease(lease, item) => Second::Paired(*lease as i64, item),
        };
        pickle::write_pair(self.kind(), result, out)
    }

    /// Reads a reply from a decoded pickle.
    ///
    /// # Errors
    /// [`Error::Protocol`] for anything but a `(kind, result)` pair with a known kind.
    pub fn from_value(v: &Value) -> Result<Reply> {
        let (kind, result) = match v.as_tuple() {
            Some([Value::Str(kind), result]) => (kind, result),
            _ => return Err(Error::protocol("a reply must be a 2-tuple (kind, result)")),
        };
        let text = || match result {
            Value::Str(s) => Ok(s.to_string()),
            _ => Err(Error::protocol(format!("{kind} reply must carry a str"))),
        };
        Ok(match &**kind {
            "#RETURN" => Reply::Return(result.clone()),
            "#ERROR" => Reply::Error(result.clone()),
            "#TRACEBACK" => Reply::Traceback(text()?),
            "#UNSERIALIZABLE" => Reply::Unserializable(text()?),
            "#PROXY" => Reply::Proxy(result.clone()),
            other => return Err(Error::protocol(format!("unknown reply kind {other:?}"))),
        })
    }

    /// Turns the reply into the caller's result: `#RETURN` is `Ok`, everything else an
    /// [`Error`] a caller can match (`Empty`, `Full`, `Remote`, `Traceback`).
    pub fn into_result(self) -> Result<Value> {
        match self {
            Reply::Return(v) => Ok(v),
            Reply::Error(exc) => Err(exception_to_error(&exc)),
            Reply::Traceback(text) => Err(Error::Traceback(text)),
            Reply::Unserializable(text) => {
                Err(Error::Traceback(format!("unserializable message: {text}")))
            }
            Reply::Proxy(_) => Err(Error::protocol(
                "unexpected #PROXY reply (distq clients do not build proxies)",
            )),
            Reply::Item(item) => item.decode(),
            Reply::Items(items) => Ok(Value::list(
                items.iter().map(Fragment::decode).collect::<Result<_>>()?,
            )),
            Reply::Lease(lease, item) => {
                Ok(Value::tuple(vec![Value::Int(lease as i64), item.decode()?]))
            }
        }
    }
}

/// Maps a pickled exception instance to an [`Error`]. Both `_queue.Empty` (what CPython
/// sends) and `queue.Empty` (what distq sends) mean [`Error::Empty`].
pub fn exception_to_error(exc: &Value) -> Error {
    match exc.class_name() {
        Some(("_queue" | "queue", "Empty")) => Error::Empty,
        Some(("queue", "Full")) => Error::Full,
        Some(("queue", "ShutDown")) => Error::ShutDown,
        Some((module, name)) => {
            let message = match exc {
                Value::Object(o) => match o.args.as_tuple() {
                    Some([Value::Str(s)]) => s.to_string(),
                    Some(args) => Value::tuple(args.to_vec()).brief(1000),
                    None => o.args.brief(1000),
                },
                _ => String::new(),
            };
            Error::Remote {
                class: format!("{module}.{name}"),
                message,
            }
        }
        None => Error::Remote {
            class: "unknown".into(),
            message: exc.brief(1000),
        },
    }
}

/// The exception instances a server sends in `#ERROR` replies. Class names are the
/// importable ones (`queue.Empty`, not the C module's `_queue.Empty`) so they resolve on
/// every Python that has a `queue` module.
pub mod exceptions {
    use crate::Value;

    /// `queue.Empty()`: `except queue.Empty:` catches it in a Python client.
    pub fn empty() -> Value {
        Value::exception("queue", "Empty", vec![])
    }

    /// `queue.Full()`.
    pub fn full() -> Value {
        Value::exception("queue", "Full", vec![])
    }

    /// `queue.Full(msg)`: full for a reason a plain `Full` would hide (the server's
    /// memory budget).
    pub fn full_because(msg: &str) -> Value {
        Value::exception("queue", "Full", vec![Value::str(msg)])
    }

    /// `queue.ShutDown()` (Python 3.13+; older Pythons cannot unpickle it and report a
    /// missing `queue.ShutDown`, which still names the cause).
    pub fn shut_down() -> Value {
        Value::exception("queue", "ShutDown", vec![])
    }

    /// `builtins.<name>(msg)`, e.g. `ValueError`, `TypeError`, `KeyError`.
    pub fn builtin(name: &str, msg: &str) -> Value {
        Value::exception("builtins", name, vec![Value::str(msg)])
    }
}

/// Encodes `value` as a pickle into `buf`, leaving room for the frame header in front so
/// the frame goes out in one write (see [`frame::finish_and_write`]).
pub fn encode_frame(value: &Value, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    buf.resize(frame::HEADER_RESERVE, 0);
    pickle::encode_into(value, buf)
}

/// Like [`encode_frame`], for a reply.
pub fn encode_reply_frame(reply: &Reply, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    buf.resize(frame::HEADER_RESERVE, 0);
    reply.encode_into(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::op::*;

    #[test]
    fn request_round_trip() {
        let mut r = Request::new(Some("abc"), "get", vec![]);
        r.kwargs
            .push(("timeout".into(), Arg::Value(Value::from(1))));
        let bytes = pickle::encode(&r.to_value().unwrap()).unwrap();
        assert_eq!(Request::parse(&bytes).unwrap(), r);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn item_pickle(p: &Pickled) -> Vec<u8> {
        let mut out = Vec::new();
        Reply::Item(p.fragment.clone())
            .encode_into(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn python_recursive_tuple_idiom_is_one_item() {
        // Python 3.11: pickle.dumps(('i', 'put', (t,), {}), 4) with t = ([],); t[0].append(t),
        // which ends in "... APPEND POP BINGET": the item's bytes include what was popped.
        let req = Request::parse(&hex(
            "8004951c00000000000000288c0169948c03707574945d94680285946130680385947d9474942e",
        ))
        .unwrap();
        let Arg::Pickled(item) = &req.args[0] else {
            panic!("{:?}", req.args)
        };
        assert_eq!(item.fragment.bytes(), b"]q\x00h\x00\x85q\x01a0h\x01");
        let reply = item_pickle(item);
        let err = pickle::decode(&reply).unwrap_err().to_string();
        assert!(err.contains("recursive"), "{err}");
    }

    #[test]
    fn put_many_items_shared_with_each_other_and_the_envelope_are_copied_in() {
        // ('i', 'put_many', ([a, a, 'put_many'],), {}) with a = [1]: the second item is a
        // BINGET of the first, the third a BINGET of the memoized method name.
        let req = Request::parse(&hex(
            "8004952400000000000000288c0169948c087075745f6d616e79945d94285d944b0161680368016585947d9474942e",
        ))
        .unwrap();
        let Arg::Items(items) = &req.args[0] else {
            panic!("{:?}", req.args)
        };
        let got: Vec<Value> = items
            .iter()
            .map(
                |p| match pickle::decode(&item_pickle(p)).unwrap().as_tuple() {
                    Some([_, v]) => v.clone(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        let one = Value::list(vec![Value::from(1)]);
        assert_eq!(got, [one.clone(), one, Value::str("put_many")]);
        assert!(items.iter().all(|p| !p.fragment.uses_memo()));
    }

    #[test]
    fn malformed_requests_are_protocol_errors() {
        for v in [
            Value::None,
            Value::tuple(vec![Value::None, Value::str("x"), Value::tuple(vec![])]),
            Value::tuple(vec![
                Value::from(1),
                Value::str("x"),
                Value::tuple(vec![]),
                Value::dict(vec![]),
            ]),
            Value::tuple(vec![
                Value::None,
                Value::str("x"),
                Value::list(vec![]),
                Value::dict(vec![]),
            ]),
            Value::tuple(vec![
                Value::None,
                Value::str("x"),
                Value::tuple(vec![]),
                Value::dict(vec![(Value::from(1), Value::None)]),
            ]),
        ] {
            let bytes = pickle::encode(&v).unwrap();
            assert!(
                matches!(Request::parse(&bytes), Err(Error::Protocol(_))),
                "{v:?}"
            );
        }
    }

    #[test]
    fn replies_map_to_errors() {
        let empty_from_cpython = Value::exception("_queue", "Empty", vec![]);
        assert!(matches!(
            Reply::Error(empty_from_cpython).into_result(),
            Err(Error::Empty)
        ));
        assert!(matches!(
            Reply::Error(exceptions::full()).into_result(),
            Err(Error::Full)
        ));
        match Reply::Error(exceptions::builtin("KeyError", "missing")).into_result() {
            Err(Error::Remote { class, message }) => {
                assert_eq!(class, "builtins.KeyError");
                assert_eq!(message, "missing");
            }
            other => panic!("{other:?}"),
        }
        let tb = Reply::traceback("KeyError", "'x'");
        let mut out = Vec::new();
        tb.encode_into(&mut out).unwrap();
        assert_eq!(
            Reply::from_value(&pickle::decode(&out).unwrap()).unwrap(),
            tb
        );
    }

    #[test]
    fn an_item_reply_in_parts_is_the_reply() {
        let item = Fragment::encode(&Value::list(vec![Value::from(1), Value::str("x")])).unwrap();
        let reply = Reply::Item(item);
        let mut whole = Vec::new();
        reply.encode_into(&mut whole).unwrap();
        assert_eq!(reply.item_parts().unwrap().concat(), whole);
        assert!(Reply::Return(Value::None).item_parts().is_none());
    }

    #[test]
    fn stored_items_are_spliced_into_replies() {
        let shared = Value::list(vec![Value::from(1)]);
        let items = vec![
            Fragment::encode(&Value::from(5)).unwrap(),
            Fragment::encode(&Value::tuple(vec![shared.clone(), shared])).unwrap(),
        ];
        for (reply, want) in [
            (Reply::Item(items[0].clone()), items[0].decode().unwrap()),
            (Reply::Item(items[1].clone()), items[1].decode().unwrap()),
            (
                Reply::Items(items.clone()),
                Value::list(items.iter().map(|f| f.decode().unwrap()).collect()),
            ),
        ] {
            let mut out = Vec::new();
            reply.encode_into(&mut out).unwrap();
            let decoded = Reply::from_value(&pickle::decode(&out).unwrap()).unwrap();
            assert_eq!(decoded, Reply::Return(want));
        }
    }

    /// A small deterministic generator for the differential test below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A request in the shapes Python writes (and some it does not), as bytes.
    fn generated(rng: &mut Rng) -> Vec<u8> {
        let strs: [&[u8]; 6] = [
            b"",
            b"put",
            b"put_many",
            b"items",
            b"timeout",
            b"\xed\xa0\x80",
        ];
        let mut p = vec![PROTO, [2, 4, 5][rng.below(3)]];
        if rng.below(4) > 0 {
            p.extend_from_slice(&[FRAME, 30, 0, 0, 0, 0, 0, 0, 0]);
        }
        p.push(MARK);
        let short = |p: &mut Vec<u8>, s: &[u8]| {
            p.extend_from_slice(&[SHORT_BINUNICODE, s.len() as u8]);
            p.extend_from_slice(s);
        };
        let memo = |p: &mut Vec<u8>, rng: &mut Rng| {
            if rng.below(3) > 0 {
                p.push(MEMOIZE);
            }
        };
        let value = |p: &mut Vec<u8>, rng: &mut Rng| {
            match rng.below(9) {
                0 => p.push(NONE),
                1 => p.push([NEWTRUE, NEWFALSE][rng.below(2)]),
                2 => p.extend_from_slice(&[BININT1, rng.below(256) as u8]),
                3 => p.extend_from_slice(&[BININT2, 1, 0x80]),
                4 => p.extend_from_slice(&[BININT, 0xff, 0xff, 0xff, 0xff]),
                5 => {
                    p.push(BINFLOAT);
                    p.extend_from_slice(&1.5f64.to_be_bytes());
                }
                6 => short(p, strs[rng.below(strs.len())]),
                7 => {
                    let n = [3usize, 300][rng.below(2)];
                    p.push(BINUNICODE);
                    p.extend_from_slice(&(n as u32).to_le_bytes());
                    p.extend(std::iter::repeat(b'x').take(n));
                }
                _ => p.extend_from_slice(&[SHORT_BINBYTES, 2, 0, 1]),
            }
            memo(p, rng);
        };
        match rng.below(3) {
            0 => p.push(NONE),
            _ => {
                short(&mut p, b"7f2a3c4b5d60");
                memo(&mut p, rng);
            }
        }
        short(&mut p, strs[rng.below(4)]);
        memo(&mut p, rng);
        match rng.below(5) {
            0 => p.push(EMPTY_TUPLE),
            4 => {
                p.push(MARK);
                (0..4).for_each(|_| value(&mut p, rng));
                p.push(TUPLE);
            }
            n => {
                (0..n).for_each(|_| value(&mut p, rng));
                p.push(TUPLE1 + n as u8 - 1);
            }
        }
        memo(&mut p, rng);
        p.push(EMPTY_DICT);
        memo(&mut p, rng);
        match rng.below(3) {
            0 => {}
            1 => {
                short(&mut p, strs[rng.below(strs.len())]);
                memo(&mut p, rng);
                value(&mut p, rng);
                p.push(SETITEM);
            }
            _ => {
                p.push(MARK);
                for _ in 0..rng.below(4) {
                    short(&mut p, strs[rng.below(strs.len())]);
                    memo(&mut p, rng);
                    value(&mut p, rng);
                }
                p.push(SETITEMS);
            }
        }
        p.push(TUPLE);
        memo(&mut p, rng);
        p.push(STOP);
        p
    }

    #[test]
    fn the_common_shapes_read_directly_are_what_the_scanner_reads() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut direct = 0;
        for round in 0..20_000 {
            let mut p = generated(&mut rng);
            if round % 2 == 1 {
                // A mutation: a byte changed, dropped or added, or the end cut off.
                let i = rng.below(p.len());
                match rng.below(4) {
                    0 => p[i] = rng.next() as u8,
                    1 => drop(p.remove(i)),
                    2 => p.insert(i, rng.next() as u8),
                    _ => p.truncate(i),
                }
            }
            if let Some(fast) = parse_flat(&p) {
                direct += 1;
                let scanned = Scan::with(&p, parse_scanned);
                assert_eq!(scanned.as_ref().ok(), Some(&fast), "{p:02x?}: {scanned:?}");
            }
        }
        assert!(direct > 5_000, "only {direct} requests read directly");
    }

    #[test]
    fn python_requests_are_read_directly() {
        // Python 3.11's ForkingPickler: put(7), get(), create('cpu'), get(timeout=1.5).
        for pickle in [
            "8004951f00000000000000288c0c376632613363346235643630948c03707574944b0785947d9474942e",
            "8004951c00000000000000288c0c376632613363346235643630948c0367657494297d9474942e",
            "8004951800000000000000284e8c06637265617465948c036370759485947d9474942e",
            "8004953000000000000000288c0c376632613363346235643630948c0367657494297d948c0774696d656f757494473ff80000000000007374942e",
        ] {
            let bytes = hex(pickle);
            let fast = parse_flat(&bytes).unwrap_or_else(|| panic!("{pickle}"));
            assert_eq!(Scan::with(&bytes, parse_scanned).unwrap(), fast);
        }
    }
}
