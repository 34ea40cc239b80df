//! One authenticated connection (TCP or Unix-domain, see `net.rs`): frames of pickles
//! (or, for a peer that uses `serializer='xmlrpclib'`, XML-RPC documents) in and out,
//! with deadlines.
//!
//! Both the server and the client talk through a [`Connection`]. It owns the socket and
//! two reusable buffers, so a steady request/reply loop allocates nothing per frame
//! beyond the decoded values themselves. Every reply goes out as a single `write`
//! (header and payload together) on a `TCP_NODELAY` socket: Python's managers write
//! large frames in two pieces without `TCP_NODELAY` and stall ~40–90 ms on Nagle's
//! algorithm meeting delayed ACKs; distq never does.
//!
//! The peer's Nagle stall is ours to remove too. A Python client writes without
//! `TCP_NODELAY`, and twice in a row before it reads: its `#WELCOME#` verdict then its
//! first request, and a large frame's header then its payload. Its second write waits
//! for our ACK of the first, which Linux delays by ~40 ms. So the server sets
//! `TCP_QUICKACK` (which also flushes an ACK already pending) exactly where a peer may
//! be waiting like that: before each handshake read, before the first request, and
//! before reading the rest of a frame too large for one write (Python splits frames
//! above 16 KiB). One `setsockopt` each; small frames on a method channel, the hot path,
//! never pay it.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::auth::{self, AuthKey, LegacyAuth};
use crate::frame;
use crate::net::{Peer, Stream};
use crate::pickle::{self, Value};
use crate::protocol::{encode_frame, encode_reply_frame, Reply, Request};
use crate::xmlrpc;
use crate::{Error, Result};

/// Which side of the handshake this end plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Challenges first, then answers (Python's managers `Server`).
    Server,
    /// Answers first, then challenges (Python's `Client`).
    Client,
}

/// A socket plus the limits and buffers needed to speak the manager protocol on it.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    peer: Peer,
    max_frame: usize,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
    inbox: Inbox,
    /// What the caller asked [`Connection::set_read_timeout`] for.
    read_timeout: Cell<Option<Duration>>,
    /// The socket's `SO_RCVTIMEO` as last set by this connection (`None`: not known,
    /// e.g. right after the handshake, which sets its own deadlines).
    socket_timeout: Cell<Option<Option<Duration>>>,
    /// Acknowledge at once before the next frame's first read (see the module docs).
    quickack_next: bool,
    /// The serializer the peer speaks, once its first request has told.
    serializer: Cell<Option<Serializer>>,
    /// What the caller asked [`Connection::set_write_timeout`] for: on the server's
    /// side, the most a whole frame may take to send, however many `send` calls it
    /// needs (a client's large put over a slow link is bounded per `send` only).
    write_timeout: Cell<Option<Duration>>,
    server: bool,
}

/// How a peer's requests are encoded: Python's default pickles, or XML-RPC documents
/// from a manager made with `serializer='xmlrpclib'` (see `xmlrpc.rs`). A Python
/// manager uses one for every connection, so the first request decides and every reply
/// on the connection answers in the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serializer {
    Pickle,
    Xml,
}

/// Frames above this size are written under one deadline for the whole frame (on the
/// server), and a stored item above it is written from where it is, not copied.
const LARGE_FRAME: usize = 64 * 1024;

/// How many times the frame limit an oversized frame may be and still be read and
/// dropped to keep its connection (see [`Connection::discard_payload`]); a larger one
/// closes it at once.
pub const DISCARD_FACTOR: u64 = 16;

/// How long discarding an oversized frame may take in all.
pub const DISCARD_TIME: Duration = Duration::from_secs(60);

/// The longest pause in an oversized frame's bytes before its connection is closed.
pub const DISCARD_STALL: Duration = Duration::from_secs(10);

/// Bytes received ahead of the frame being read.
///
/// Reading a frame straight from the socket takes two `recv` calls (the 4-byte header,
/// then the payload); reading through this buffer takes one for any frame that fits.
/// On the put+get round trip that is one syscall fewer per message on each end (checked
/// with strace: one `recvfrom` per frame, as the bench's echo floor does). The gain in
/// calls/s was below the noise of the shared 2-vCPU machine it was measured on.
/// Frames larger than the buffer are read into their destination directly.
#[derive(Debug, Default)]
struct Inbox {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// Capacity of [`Inbox`]: a request or reply for a small item is well under 100 bytes,
/// and 4 KiB keeps an idle connection small (allocated on the first read).
const INBOX_CAPACITY: usize = 4096;

impl Connection {
    /// Wraps a connected socket (a `TcpStream`, a `UnixStream` or a [`Stream`]) and
    /// authenticates it within `deadline`.
    ///
    /// # Errors
    /// [`Error::AuthFailed`] for a wrong authkey or an HMAC-MD5 peer that `legacy` refuses,
    /// [`Error::Timeout`] if the peer did not finish the handshake in time,
    /// [`Error::Protocol`] for a malformed handshake.
    pub fn handshake(
        stream: impl Into<Stream>,
        role: Role,
        key: &AuthKey,
        legacy: LegacyAuth,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Connection> {
        let stream = stream.into();
        let peer = stream
            .peer()
            .map_err(|e| Error::io("reading the peer address", e))?;
        if let Some(tcp) = stream.as_tcp() {
            tcp.set_nodelay(true)
                .map_err(|e| Error::io("setting TCP_NODELAY", e))?;
        }
        let mut timed = Deadline {
            stream: &stream,
            deadline: Instant::now() + timeout,
            quickack: role == Role::Server,
        };
        match role {
            Role::Server => auth::server_handshake(&mut timed, key, legacy)?,
            Role::Client => auth::client_handshake(&mut timed, key, legacy)?,
        }
        Ok(Connection {
            stream,
            peer,
            max_frame,
            read_buf: Vec::new(),
            write_buf: Vec::new(),
            inbox: Inbox::default(),
            read_timeout: Cell::new(None),
            socket_timeout: Cell::new(None),
            quickack_next: role == Role::Server,
            serializer: Cell::new(None),
            write_timeout: Cell::new(None),
            server: role == Role::Server,
        })
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// Limits how long [`Connection::read_value`] waits (`None`: wait for ever).
    ///
    /// The `setsockopt` is skipped when the socket already has the right timeout, and
    /// for `None` when it has any known timeout: reads then retry after the socket's
    /// timeout expires, which is the same as waiting for ever. A client alternating
    /// `put` (no limit) and `get` (a limit) thus makes no syscall here per call instead
    /// of one (checked with strace; the gain in calls/s is within the bench's noise).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.read_timeout.set(timeout);
        let current = self.socket_timeout.get();
        let needed = match (timeout, current) {
            (None, Some(_)) => false,
            (wanted, Some(have)) => wanted != have,
            (_, None) => true,
        };
        if needed {
            self.stream
                .set_read_timeout(timeout)
                .map_err(|e| Error::io("setting a read timeout", e))?;
            self.socket_timeout.set(Some(timeout));
        }
        Ok(())
    }

    /// Limits how long a send may block on a peer that does not read.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.write_timeout.set(timeout);
        self.stream
            .set_write_timeout(timeout)
            .map_err(|e| Error::io("setting a write timeout", e))
    }

    /// Reads one frame and decodes its pickle.
    ///
    /// # Errors
    /// [`Error::Closed`] on a clean end of stream; [`Error::Timeout`] when the read timeout
    /// passes; [`Error::FrameTooLarge`] / [`Error::Protocol`] for hostile input.
    pub fn read_value(&mut self) -> Result<Value> {
        self.read_frame()?;
        self.decode_frame()
    }

    /// Reads one frame into the connection's buffer without decoding it. Errors here
    /// leave the stream out of step (a frame was not fully read), so the caller must
    /// close the connection; an error from [`Connection::decode_frame`] does not.
    pub fn read_frame(&mut self) -> Result<()> {
        if std::mem::take(&mut self.quickack_next) {
            quickack(&self.stream);
        }
        let mut reader = Buffered {
            stream: &self.stream,
            inbox: &mut self.inbox,
            forever: self.read_timeout.get().is_none(),
            quickacked: false,
        };
        frame::read_frame(&mut reader, self.max_frame, &mut self.read_buf)?;
        if self.read_buf.is_empty() {
            // Python treats an empty frame as end of stream (pickle.loads(b'') raises EOFError).
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Reads and drops the `len`-byte payload of a frame [`Connection::read_frame`]
    /// refused as too large, so that the connection stays in step and the peer can be
    /// answered: a Python client caches one connection per thread, and every later call
    /// of that thread would fail if this one were closed. Bounded: at most
    /// [`DISCARD_FACTOR`] times the frame limit (and 4 GiB), within [`DISCARD_TIME`] and
    /// with no pause over [`DISCARD_STALL`], through a 64 KiB buffer; beyond any of
    /// these the connection must be closed.
    ///
    /// # Errors
    /// [`Error::FrameTooLarge`] if `len` is beyond the bound, [`Error::Timeout`] if the
    /// bytes do not arrive in time, I/O errors as for a read.
    pub fn discard_payload(&mut self, len: u64) -> Result<()> {
        let bound = (self.max_frame as u64)
            .saturating_mul(DISCARD_FACTOR)
            .min(4 << 30);
        if len > bound {
            return Err(Error::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        let deadline = Instant::now() + DISCARD_TIME;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = len;
        let result = (|| {
            while left > 0 {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::Timeout("discarding an oversized frame"));
                }
                let wait = (deadline - now).min(DISCARD_STALL);
                self.stream
                    .set_read_timeout(Some(wait))
                    .map_err(|e| Error::io("setting a read timeout", e))?;
                self.socket_timeout.set(Some(Some(wait)));
                let mut reader = Buffered {
                    stream: &self.stream,
                    inbox: &mut self.inbox,
                    forever: false,
                    quickacked: false,
                };
                let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                match reader.read(&mut chunk[..want]) {
                    Ok(0) => return Err(Error::Closed),
                    Ok(n) => left -= n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Err(Error::Timeout("discarding an oversized frame"))
                    }
                    Err(e) => return Err(Error::io("discarding an oversized frame", e)),
                }
            }
            Ok(())
        })();
        // Back to the caller's read timeout for the next frame.
        self.set_read_timeout(self.read_timeout.get())?;
        result
    }

    /// Parses the request in the frame last read by [`Connection::read_frame`], as a
    /// pickle or as XML-RPC: the first request fixes which for the whole connection.
    ///
    /// A large frame is freed once parsed: its items have been copied out of it, and
    /// kept it would stay alive beside the copies the queue makes of them (a 30 MB put
    /// peaked at four times its frame, now three).
    pub fn parse_request(&mut self) -> Result<Request> {
        let parsed = match self.serializer() {
            Serializer::Pickle => Request::parse(&self.read_buf),
            Serializer::Xml => xmlrpc::parse_request(&self.read_buf),
        };
        if self.read_buf.capacity() > frame::KEEP_CAPACITY {
            self.read_buf = Vec::new();
        }
        parsed
    }

    /// The exception class a Python server speaking this peer's serializer would name
    /// for a request it cannot read, for the `#TRACEBACK` reply.
    pub fn bad_request_class(&self) -> &'static str {
        match self.serializer() {
            Serializer::Pickle => "UnpicklingError",
            Serializer::Xml => "xml.parsers.expat.ExpatError",
        }
    }

    fn serializer(&self) -> Serializer {
        if let Some(known) = self.serializer.get() {
            return known;
        }
        let detected = if xmlrpc::is_document(&self.read_buf) {
            Serializer::Xml
        } else {
            Serializer::Pickle
        };
        self.serializer.set(Some(detected));
        detected
    }

    /// Decodes the pickle in the frame last read by [`Connection::read_frame`].
    pub fn decode_frame(&self) -> Result<Value> {
        pickle::decode(&self.read_buf)
    }

    /// Encodes `reply` in the peer's serializer and sends it as one frame. A reply whose
    /// result cannot be pickled (or marshalled) goes out as `#UNSERIALIZABLE` instead, as
    /// Python's server does.
    pub fn write_reply(&mut self, reply: &Reply) -> Result<()> {
        // XML replies are bounded because a shared value is written once per reference;
        // twice the request limit leaves room for base64 and escaping to grow any item
        // a request could carry.
        let xml_limit = self.max_frame.saturating_mul(2);
        let xml = self.serializer.get() == Some(Serializer::Xml);
        if let Some(parts) = reply
            .item_parts()
            .filter(|p| !xml && p[1].len() > LARGE_FRAME)
        {
            let limit = self.write_timeout.get().filter(|_| self.server);
            return send_within(&self.stream, limit, |mut w| {
                frame::write_parts(&mut w, parts)
            });
        }
        let encode = |reply: &Reply, buf: &mut Vec<u8>| {
            if xml {
                xmlrpc::encode_reply_frame(reply, buf, xml_limit)
            } else {
                encode_reply_frame(reply, buf)
            }
        };
        match encode(reply, &mut self.write_buf) {
            Ok(()) => {}
            Err(Error::Value(msg)) => encode(&Reply::Unserializable(msg), &mut self.write_buf)?,
            Err(e) => return Err(e),
        }
        self.send_frame()
    }

    /// Sends the frame in `write_buf`. A large one may take many `send` calls: each gets
    /// only what is left of the write timeout, so a peer that reads a trickle cannot
    /// hold a reply (and the item in it) for longer than the timeout in all. A small one
    /// is one `send`, bounded by the socket's own timeout, with no extra syscall.
    fn send_frame(&mut self) -> Result<()> {
        if self.write_buf.len() > LARGE_FRAME {
            let buf = &mut self.write_buf;
            let limit = self.write_timeout.get().filter(|_| self.server);
            return send_within(&self.stream, limit, |mut w| {
                frame::finish_and_write(&mut w, buf)
            });
        }
        frame::finish_and_write(&mut self.stream, &mut self.write_buf)
    }

    /// Encodes `value` and sends it as one frame.
    pub fn write_value(&mut self, value: &Value) -> Result<()> {
        encode_frame(value, &mut self.write_buf)?;
        self.send_frame()
    }
}

/// Sends a large frame with `write`, within `limit` in all if there is one (the server's
/// write timeout; a client's large put is bounded per `send` only).
fn send_within(
    stream: &Stream,
    limit: Option<Duration>,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let Some(limit) = limit else {
        return write(&mut &*stream);
    };
    let mut out = Deadline {
        stream,
        deadline: Instant::now() + limit,
        quickack: false,
    };
    let sent = write(&mut out);
    // The next small frame relies on the socket's timeout again.
    let _ = stream.set_write_timeout(Some(limit));
    sent
}

/// Whether the peer still has the connection open, without blocking: a peek that sees
/// end-of-stream or an error means it is gone. Pending request bytes (a client that
/// pipelines, against the protocol) count as alive. Takes a clone of the connection's
/// socket, so a blocked call can ask while the connection itself is borrowed elsewhere.
pub fn peer_alive(stream: &Stream) -> bool {
    stream.peer_alive()
}

/// Asks the kernel to acknowledge received data at once rather than after its delayed-ACK
/// timer, and to send an ACK it is holding now (Linux's `TCP_QUICKACK`; the flag lapses by
/// itself, hence one call per place a peer may be waiting). Elsewhere this does nothing.
/// A failure only costs the delay it was meant to save, so it is ignored. A Unix socket
/// has no delayed ACKs: nothing to do.
fn quickack(stream: &Stream) {
    if let Some(tcp) = stream.as_tcp() {
        tcp_quickack(tcp);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn tcp_quickack(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its exact size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn tcp_quickack(_stream: &std::net::TcpStream) {}

/// The socket read through the connection's [`Inbox`].
struct Buffered<'a> {
    stream: &'a Stream,
    inbox: &'a mut Inbox,
    /// The caller asked for no read timeout, but the socket may still have one (see
    /// [`Connection::set_read_timeout`]): a timed-out read is retried.
    forever: bool,
    /// Whether this frame has already asked for an immediate ACK.
    quickacked: bool,
}

impl Buffered<'_> {
    fn recv(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let mut stream = self.stream;
        loop {
            match stream.read(dst) {
                Err(e)
                    if self.forever
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                other => return other,
            }
        }
    }
}

impl Read for Buffered<'_> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if self.inbox.pos == self.inbox.end {
            if dst.len() >= INBOX_CAPACITY {
                // The rest of a large frame: a Python peer may be holding it back until
                // we acknowledge the part already received.
                if !std::mem::replace(&mut self.quickacked, true) {
                    quickack(self.stream);
                }
                return self.recv(dst);
            }
            if self.inbox.buf.is_empty() {
                self.inbox.buf = vec![0; INBOX_CAPACITY];
            }
            let mut buf = std::mem::take(&mut self.inbox.buf);
            let got = self.recv(&mut buf);
            self.inbox.buf = buf;
            self.inbox.pos = 0;
            self.inbox.end = got?;
        }
        let n = dst.len().min(self.inbox.end - self.inbox.pos);
        dst[..n].copy_from_slice(&self.inbox.buf[self.inbox.pos..self.inbox.pos + n]);
        self.inbox.pos += n;
        Ok(n)
    }
}

/// Reads and writes that all share one deadline: each call gets only the time left, so a
/// peer trickling one byte at a time still cannot stretch the handshake past it.
struct Deadline<'a> {
    stream: &'a Stream,
    deadline: Instant,
    /// Acknowledge at once before each read (the server's side of the handshake).
    quickack: bool,
}

impl Deadline<'_> {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
        if self.quickack {
            quickack(self.stream);
        }
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.remaining()?))?;
        let mut stream = self.stream;
        stream.write(buf)
    }

    // Kept vectored: a frame's header and payload leave in one `writev`.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.remaining()?))?;
        let mut stream = self.stream;
        stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_large_frame_is_freed_once_its_request_is_parsed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(10);
        let client = std::thread::spawn(move || {
            let stream = TcpStream::connect(addr).unwrap();
            let mut c =
                Connection::handshake(stream, Role::Client, &AuthKey::new("k"), LegacyAuth::Allowed, 1 << 26, timeout)
                    .unwrap();
            let item = Value::list(vec![Value::None; 2_000_000]);
            let args = Value::tuple(vec![item]);
            let request = [
                Value::str("id"),
                Value::str("put"),
                args,
                Value::dict(vec![]),
            ];
            c.write_value(&Value::tuple(request.to_vec())).unwrap();
            c
        });
        let (stream, _) = listener.accept().unwrap();
        let mut conn =
            Connection::handshake(stream, Role::Server, &AuthKey::new("k"), LegacyAuth::Allowed, 1 << 26, timeout)
                .unwrap();
        conn.read_frame().unwrap();
        assert!(conn.read_buf.capacity() > frame::KEEP_CAPACITY);
        let req = conn.parse_request().unwrap();
        assert_eq!(req.method, "put");
        assert_eq!(conn.read_buf.capacity(), 0);
        drop(client.join().unwrap());
    }

    #[test]
    fn a_large_item_is_sent_from_where_it_is() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(10);
        let item = Value::list(vec![Value::str("x"); 100_000]);
        let want = item.clone();
        let client = std::thread::spawn(move || {
            let stream = TcpStream::connect(addr).unwrap();
            let mut c =
                Connection::handshake(stream, Role::Client, &AuthKey::new("k"), LegacyAuth::Allowed, 1 << 26, timeout)
                    .unwrap();
            Reply::from_value(&c.read_value().unwrap()).unwrap()
        });
        let (stream, _) = listener.accept().unwrap();
        let mut conn =
            Connection::handshake(stream, Role::Server, &AuthKey::new("k"), LegacyAuth::Allowed, 1 << 26, timeout)
                .unwrap();
        conn.set_write_timeout(Some(timeout)).unwrap();
        let reply = Reply::Item(crate::pickle::Fragment::encode(&item).unwrap());
        conn.write_reply(&reply).unwrap();
        assert_eq!(
            conn.write_buf.capacity(),
            0,
            "not copied into the frame buffer"
        );
        assert_eq!(client.join().unwrap(), Reply::Return(want));
    }
}
