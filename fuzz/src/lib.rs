//! The fuzz harnesses: one function per fuzz target, each taking the raw input bytes.
//!
//! This file is shared. The cargo-fuzz targets in `fuzz/fuzz_targets/` are one-line
//! wrappers around these functions, and the root crate's `tests/fuzz_regressions.rs`
//! includes this file with `#[path]` and replays every committed input in
//! `fuzz/regressions/<target>/` through the same function. So a regression input always
//! exercises exactly the calls the fuzzer ran, and this file may depend on `distq` and
//! `std` only (no libFuzzer types), so that it also builds on the stable toolchain.
//!
//! Every harness feeds hostile bytes to the public API the server and client use on
//! network data and checks properties beyond "does not panic":
//!
//! * [`frame`]: `frame::read_frame` over a reader that splits and interrupts reads; a frame
//!   read is the input's bytes, never longer than the limit; refusal allocates nothing.
//! * [`handshake_server`], [`handshake_client`]: the two handshake roles against a peer
//!   whose every byte is the input; our challenge can never be answered (it is random),
//!   and every frame we send fits Python's 256-byte handshake limit.
//! * [`pickle`]: `pickle::decode`; a decoded value re-encodes and decodes to itself;
//!   a decoded value interpreted as a request or a reply (as the server and client do)
//!   gives a bounded error message.
//! * [`dispatch`]: a sequence of request frames through `Request::parse` and the
//!   dispatcher with a fresh `QueueMap`, each reply encoded and decoded back as a
//!   client would. Calls that could block are made non-blocking once bound (see [`tame`]).
//!
//! Sizes are checked against the input's size: a reply or an error message much larger
//! than the input that caused it is an amplification bug, reported as a panic.

#![allow(clippy::missing_panics_doc)]

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use distq::auth::{self, AuthKey, LegacyAuth};
use distq::dispatch::{self, Public, QueueCall};
use distq::frame::{self, DEFAULT_MAX_FRAME, HANDSHAKE_MAX_FRAME};
use distq::pickle::{self, Value};
use distq::protocol::{self, Reply, Request};
use distq::queues::{QueueMap, Wait};
use distq::Error;

/// A harness: runs one input, panics on a failure.
pub type Harness = fn(&[u8]);

/// The fuzz targets, by name: the names of the `fuzz/fuzz_targets/*.rs` files and of the
/// `fuzz/regressions/` subdirectories.
pub const TARGETS: &[(&str, Harness)] = &[
    ("frame", frame),
    ("handshake_server", handshake_server),
    ("handshake_client", handshake_client),
    ("pickle", pickle),
    ("dispatch", dispatch),
];

/// How much larger than its input a rendered message or a reply may be before it counts as
/// amplification. Legitimate expansion is small: a 2-byte memo reference to a float
/// re-encodes as 9 bytes, a 4-byte empty frame earns a ~150-byte traceback.
const EXPANSION: usize = 16;
/// Constant slack for the fixed text of replies and messages.
const SLACK: usize = 4096;

/// The authkey every harness uses (the one in Python's manager examples).
fn key() -> AuthKey {
    AuthKey::new("abc")
}

/// An in-memory peer: reads come from the input, writes are recorded.
///
/// The first input byte shapes the reads, so the fuzzer explores partial reads and
/// interruptions too: bits 0–5 are the most bytes one `read` returns (0: no limit), bit 6
/// makes every third `read` fail with `Interrupted` first (which callers must retry),
/// bit 7 is left to the harness.
pub struct Peer<'a> {
    input: &'a [u8],
    pos: usize,
    chunk: usize,
    interrupt: bool,
    reads: usize,
    /// Everything written to the peer.
    pub sent: Vec<u8>,
}

impl<'a> Peer<'a> {
    /// A peer configured by `data[0]` that sends `data[1..]`; `None` for empty input.
    pub fn new(data: &'a [u8]) -> Option<(Peer<'a>, u8)> {
        let (&shape, input) = data.split_first()?;
        let peer = Peer {
            input,
            pos: 0,
            chunk: usize::from(shape & 0x3f),
            interrupt: shape & 0x40 != 0,
            reads: 0,
            sent: Vec::new(),
        };
        Some((peer, shape))
    }

    /// The bytes of the input read so far.
    pub fn consumed(&self) -> &'a [u8] {
        &self.input[..self.pos]
    }

    /// The frames written to the peer. Panics if the output is not a sequence of whole
    /// frames of at most `max` bytes each.
    pub fn sent_frames(&self, max: usize) -> Vec<Vec<u8>> {
        let mut cur = io::Cursor::new(&self.sent[..]);
        let mut frames = Vec::new();
        loop {
            let mut buf = Vec::new();
            match frame::read_frame(&mut cur, max, &mut buf) {
                Ok(()) => frames.push(buf),
                Err(Error::Closed) => return frames,
                Err(e) => panic!("we sent a malformed or oversized frame: {e}"),
            }
        }
    }
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Counts reads modulo 3: every third one is interrupted when asked for.
        self.reads = (self.reads + 1) % 3;
        if self.interrupt && self.reads == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let left = &self.input[self.pos..];
        let mut n = buf.len().min(left.len());
        if self.chunk > 0 {
            n = n.min(self.chunk);
        }
        buf[..n].copy_from_slice(&left[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sent.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Frame reader: reads frames from the input until an error.
///
/// `data[0]` shapes the reads (see [`Peer`]) and its bit 7 with the low bit of `data[1]`
/// picks the limit: the handshake's 256 bytes, 4 KiB, 1 byte or the server default 64 MiB
/// (the last one shows that an announced length costs an allocation of that size).
pub fn frame(data: &[u8]) {
    let Some((mut peer, shape)) = Peer::new(data) else {
        return;
    };
    let pick = usize::from(shape >> 7) | (usize::from(data.get(1).copied().unwrap_or(0) & 1) << 1);
    let max = [HANDSHAKE_MAX_FRAME, 4096, 1, DEFAULT_MAX_FRAME][pick];
    let mut buf = Vec::new();
    loop {
        let before = peer.pos;
        let capacity = buf.capacity();
        match frame::read_frame(&mut peer, max, &mut buf) {
            Ok(()) => {
                assert!(
                    buf.len() <= max,
                    "frame of {} bytes over max {max}",
                    buf.len()
                );
                let got = &peer.consumed()[before..];
                assert!(
                    got.len() >= 4 + buf.len(),
                    "frame longer than what was read"
                );
                assert_eq!(
                    &got[got.len() - buf.len()..],
                    &buf[..],
                    "payload is not the input"
                );
                // What we read, we can write back and read again.
                let mut out = Vec::new();
                frame::write_frame(&mut out, &buf).expect("writing to a Vec");
                let mut again = Vec::new();
                frame::read_frame(&mut io::Cursor::new(&out), max, &mut again)
                    .expect("re-reading a frame we wrote");
                assert_eq!(again, buf);
            }
            Err(Error::FrameTooLarge { len, max: m }) => {
                assert_eq!(m, max);
                assert!(
                    len > max as u64,
                    "refused a frame of {len} bytes under max {max}"
                );
                assert!(
                    buf.capacity() <= capacity,
                    "refused frame allocated its buffer"
                );
                return;
            }
            Err(Error::Closed | Error::Protocol(_)) => return,
            Err(e) => panic!("unexpected error from an in-memory reader: {e:?}"),
        }
    }
}

/// Server role: `deliver_challenge` then `answer_challenge`, as `auth::server_handshake`,
/// with the peer's bytes as input.
///
/// The peer cannot answer our random challenge, so `deliver_challenge` must fail; the
/// server role's second half then still runs on the rest of the input (after a complete but
/// wrong answer) so that it is fuzzed too. Also runs `server_handshake` itself.
pub fn handshake_server(data: &[u8]) {
    let Some((mut peer, _)) = Peer::new(data) else {
        return;
    };
    let delivered = auth::deliver_challenge(&mut peer, &key(), LegacyAuth::Allowed);
    assert!(
        delivered.is_err(),
        "a peer answered a random challenge without the key"
    );
    if let Err(Error::AuthFailed(_)) = delivered {
        let _ = auth::answer_challenge(&mut peer, &key(), LegacyAuth::Allowed);
    }
    peer.sent_frames(HANDSHAKE_MAX_FRAME);

    let (mut peer, _) = Peer::new(data).expect("not empty");
    let whole = auth::server_handshake(&mut peer, &key(), LegacyAuth::Allowed);
    assert!(whole.is_err(), "server handshake succeeded without the key");
    peer.sent_frames(HANDSHAKE_MAX_FRAME);
}

/// Client role: `auth::client_handshake` (answer the peer's challenge, read its verdict,
/// then challenge it) with the peer's bytes as input. The peer cannot answer our random
/// challenge, so the handshake must fail.
pub fn handshake_client(data: &[u8]) {
    let Some((mut peer, _)) = Peer::new(data) else {
        return;
    };
    let result = auth::client_handshake(&mut peer, &key(), LegacyAuth::Allowed);
    assert!(
        result.is_err(),
        "client handshake succeeded against a peer without the key"
    );
    let sent = peer.sent_frames(HANDSHAKE_MAX_FRAME);
    // At most: our answer, our challenge, our verdict.
    assert!(sent.len() <= 3, "sent {} handshake frames", sent.len());
}

/// Pickle decoder: `pickle::decode` on the input, then properties of what it returns.
pub fn pickle(data: &[u8]) {
    as_request(data, data.len());
    let Ok(value) = pickle::decode(data) else {
        return;
    };
    round_trip(&value);
    as_reply(&value, data.len());
}

/// A decoded value encodes, and the encoding decodes to an equal value.
fn round_trip(value: &Value) {
    let bytes = match pickle::encode(value) {
        Ok(bytes) => bytes,
        Err(Error::Value(msg)) if msg.contains("deeper") => return,
        Err(e) => panic!("a decoded value does not encode: {e}"),
    };
    let back =
        pickle::decode(&bytes).unwrap_or_else(|e| panic!("our own encoding does not decode: {e}"));
    assert!(
        same(value, &back, &mut HashSet::new()),
        "round trip changed the value"
    );
    let fragment = pickle::Fragment::encode(value).expect("encode worked, so must a fragment");
    let back = fragment.decode().expect("a fragment decodes");
    assert!(
        same(value, &back, &mut HashSet::new()),
        "fragment changed the value"
    );
}

/// The server's view of the bytes: a request, scanned and cut into items. Its error
/// must be short, and every item it cuts out must be a pickle our own decoder reads the
/// same way whole (when it reads it at all).
fn as_request(data: &[u8], input_len: usize) {
    match Request::parse(data) {
        Err(e) => bounded_text(&e.to_string(), input_len, "request error"),
        Ok(req) => {
            for arg in req.args.iter().chain(req.kwargs.iter().map(|(_, a)| a)) {
                if let distq::protocol::Arg::Pickled(p) = arg {
                    let mut reply = Vec::new();
                    Reply::Item(p.fragment.clone())
                        .encode_into(&mut reply)
                        .expect("an item splices into a reply");
                    let _ = pickle::decode(&reply);
                }
            }
        }
    }
}

/// The client's view of a value: a reply turned into a result, as `Manager` and
/// `QueueProxy` do. An `#ERROR` reply renders the exception into the error message, so
/// that message must stay proportional to the input.
fn as_reply(value: &Value, input_len: usize) {
    match Reply::from_value(value).and_then(Reply::into_result) {
        Ok(_) => {}
        Err(e) => bounded_text(&e.to_string(), input_len, "reply error"),
    }
}

/// Panics if `text` is out of proportion to the `input_len` bytes that caused it.
fn bounded_text(text: &str, input_len: usize, what: &str) {
    let bound = EXPANSION * input_len + SLACK;
    assert!(
        text.len() <= bound,
        "{what} of {} bytes from {input_len} input bytes",
        text.len()
    );
}

/// Structural equality that treats NaN as equal to NaN (with the same bits) and visits
/// each pair of shared nodes once, so that a shared DAG compares in linear time.
pub fn same(a: &Value, b: &Value, seen: &mut HashSet<(usize, usize)>) -> bool {
    fn pair<T: ?Sized>(x: &Arc<T>, y: &Arc<T>, seen: &mut HashSet<(usize, usize)>) -> bool {
        // Returns true if this pair needs no comparison (identical or already being or
        // been compared: a true cycle cannot occur in a `Value`).
        Arc::ptr_eq(x, y)
            || !seen.insert((
                Arc::as_ptr(x).cast::<u8>() as usize,
                Arc::as_ptr(y).cast::<u8>() as usize,
            ))
    }
    fn all(x: &[Value], y: &[Value], seen: &mut HashSet<(usize, usize)>) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b, seen))
    }
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits() || x == y,
        (Value::Tuple(x), Value::Tuple(y))
        | (Value::List(x), Value::List(y))
        | (Value::Set(x), Value::Set(y))
        | (Value::FrozenSet(x), Value::FrozenSet(y)) => pair(x, y, seen) || all(x, y, seen),
        (Value::Dict(x), Value::Dict(y)) => {
            pair(x, y, seen)
                || (x.len() == y.len()
                    && x.iter()
                        .zip(y.iter())
                        .all(|((k1, v1), (k2, v2))| same(k1, k2, seen) && same(v1, v2, seen)))
        }
        (Value::Object(x), Value::Object(y)) => {
            pair(x, y, seen)
                || (x.construct == y.construct
                    && same(&x.callable, &y.callable, seen)
                    && same(&x.args, &y.args, seen)
                    && match (&x.state, &y.state) {
                        (None, None) => true,
                        (Some(s), Some(t)) => same(s, t, seen),
                        _ => false,
                    })
        }
        // Leaves (and mismatched variants): plain equality, which cannot recurse.
        (Value::Tuple(_) | Value::List(_) | Value::Set(_) | Value::FrozenSet(_), _)
        | (Value::Dict(_) | Value::Object(_), _) => false,
        _ => a == b,
    }
}

/// The ident of the queue [`dispatch`] creates first (`d15700000000`), and of the bounded
/// one it declares second, as the seeds use them.
pub const IDENTS: [&str; 2] = ["d15700000000", "d15700000010"];

/// Largest request frame the dispatch harness reads (the input is small anyway; a larger
/// announced length just ends the connection).
const DISPATCH_MAX_FRAME: usize = 1 << 20;

/// Request dispatcher: the input is a sequence of frames, each holding a pickled request,
/// served as a connection of the server would serve them against a fresh [`QueueMap`]
/// holding queue `q` (unbounded, `IDENTS[0]`) and `bounded` (maxsize 2, `IDENTS[1]`).
///
/// For each frame: `Request::parse`; `dispatch::public` (ident `None`), or
/// `dispatch::bind`, [`tame`] and `QueueCall::apply` (what `dispatch::method` does, tamed);
/// encode the reply as the server does; decode it and turn it into a result as the client
/// does. A framing error ends the input, like a closed connection.
/// Each reply must stay proportional to the input read so far.
pub fn dispatch(data: &[u8]) {
    let map = QueueMap::new();
    map.create("q").expect("fresh map");
    map.declare("bounded", 2).expect("fresh map");
    let connections = std::sync::atomic::AtomicUsize::new(1);
    let mut cur = io::Cursor::new(data);
    let mut frame_buf = Vec::new();
    let mut out = Vec::new();
    while frame::read_frame(&mut cur, DISPATCH_MAX_FRAME, &mut frame_buf).is_ok() {
        let reply = match Request::parse(&frame_buf) {
            Err(e) => Reply::traceback("UnpicklingError", &e.to_string()),
            Ok(mut req) => match req.ident {
                None => match dispatch::public(&map, &req, &connections) {
                    Public::Reply(reply) => reply,
                    Public::AcceptConnection | Public::Shutdown => Reply::Return(Value::None),
                },
                Some(_) => match dispatch::bind(&map, &mut req) {
                    Ok((queue, mut call)) => {
                        tame(&mut call);
                        let alive = || true;
                        let session = dispatch::Session::new(1, &alive, &connections);
                        let outcome = call.apply(&map, &queue, &session);
                        if outcome.hang_up {
                            continue;
                        }
                        outcome.reply
                    }
                    Err(reply) => reply,
                },
            },
        };
        match protocol::encode_reply_frame(&reply, &mut out) {
            Ok(()) => {}
            // The server answers a reply it cannot encode with #UNSERIALIZABLE.
            Err(Error::Value(_)) => continue,
            Err(e) => panic!("encoding a reply failed: {e}"),
        }
        // A reply may reflect all the state built so far (queued items, queue names), so it
        // is bounded by everything the peer has sent up to now, not by this request alone.
        let sent_so_far = usize::try_from(cur.position()).expect("a slice position fits usize");
        bounded_text_len(out.len(), sent_so_far, "a reply");
        // The client's side of the same reply.
        let value = pickle::decode(&out[frame::HEADER_RESERVE..])
            .unwrap_or_else(|e| panic!("a reply we encoded does not decode: {e}"));
        let reply = Reply::from_value(&value).expect("a reply we encoded has a reply's shape");
        if let Err(e) = reply.into_result() {
            bounded_text(&e.to_string(), data.len(), "client error");
        }
    }
}

fn bounded_text_len(len: usize, input_len: usize, what: &str) {
    let bound = EXPANSION * input_len + SLACK;
    assert!(
        len <= bound,
        "{what} of {len} bytes from {input_len} input bytes"
    );
}

/// Makes a bound method call that could block return at once.
///
/// A fuzz run cannot wait: `get()` on an empty queue with no timeout blocks forever. So
/// every wait but [`Wait::No`] becomes a zero timeout, whichever argument asked for it
/// (`block`, `timeout`, or none: `join` and `ack_put` wait forever). Binding has already
/// run on the request as sent, so argument binding and validation (negative, NaN or
/// wrongly typed timeouts) are fuzzed in full; a zero wait still runs the blocking code
/// path up to its deadline.
pub fn tame(call: &mut QueueCall) {
    if let Some(wait) = call.wait_mut() {
        if *wait != Wait::No {
            *wait = Wait::For(Duration::ZERO);
        }
    }
}
