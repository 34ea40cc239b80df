//! One authenticated TCP connection: frames of pickles in and out, with deadlines.
//!
//! Both the server and the client talk through a [`Connection`]. It owns the socket and
//! two reusable buffers, so a steady request/reply loop allocates nothing per frame
//! beyond the decoded values themselves. Every reply goes out as a single `write`
//! (header and payload together) on a `TCP_NODELAY` socket: Python's managers write
//! large frames in two pieces without `TCP_NODELAY` and stall ~40–90 ms on Nagle's
//! algorithm meeting delayed ACKs; distq never does.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::auth::{self, AuthKey};
use crate::frame;
use crate::pickle::{self, Value};
use crate::protocol::{encode_frame, encode_reply_frame, Reply};
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
    stream: TcpStream,
    peer: SocketAddr,
    max_frame: usize,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
}

impl Connection {
    /// Wraps a connected socket and authenticates it within `deadline`.
    ///
    /// # Errors
    /// [`Error::AuthFailed`] for a wrong authkey, [`Error::Timeout`] if the peer did not
    /// finish the handshake in time, [`Error::Protocol`] for a malformed handshake.
    pub fn handshake(
        stream: TcpStream,
        role: Role,
        key: &AuthKey,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Connection> {
        let peer = stream
            .peer_addr()
            .map_err(|e| Error::io("reading the peer address", e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("setting TCP_NODELAY", e))?;
        let mut timed = Deadline {
            stream: &stream,
            deadline: Instant::now() + timeout,
        };
        match role {
            Role::Server => auth::server_handshake(&mut timed, key)?,
            Role::Client => auth::client_handshake(&mut timed, key)?,
        }
        Ok(Connection {
            stream,
            peer,
            max_frame,
            read_buf: Vec::new(),
            write_buf: Vec::new(),
        })
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The underlying socket (e.g. to shut it down from another thread).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Limits how long [`Connection::read_value`] waits (`None`: wait for ever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream
            .set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
            .map_err(|e| Error::io("setting a read timeout", e))
    }

    /// Limits how long a send may block on a peer that does not read.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<()> {
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
        frame::read_frame(&mut self.stream, self.max_frame, &mut self.read_buf)?;
        if self.read_buf.is_empty() {
            // Python treats an empty frame as end of stream (pickle.loads(b'') raises EOFError).
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Decodes the pickle in the frame last read by [`Connection::read_frame`].
    pub fn decode_frame(&self) -> Result<Value> {
        pickle::decode(&self.read_buf)
    }

    /// Encodes `reply` and sends it as one frame. A reply whose result cannot be pickled
    /// goes out as `#UNSERIALIZABLE` instead, as Python's server does.
    pub fn write_reply(&mut self, reply: &Reply) -> Result<()> {
        match encode_reply_frame(reply, &mut self.write_buf) {
            Ok(()) => {}
            Err(Error::Value(msg)) => {
                encode_reply_frame(&Reply::Unserializable(msg), &mut self.write_buf)?
            }
            Err(e) => return Err(e),
        }
        frame::finish_and_write(&mut self.stream, &mut self.write_buf)
    }

    /// Encodes `value` and sends it as one frame.
    pub fn write_value(&mut self, value: &Value) -> Result<()> {
        encode_frame(value, &mut self.write_buf)?;
        frame::finish_and_write(&mut self.stream, &mut self.write_buf)
    }
}

/// Whether the peer still has the connection open, without blocking: a peek that sees
/// end-of-stream or an error means it is gone. Pending request bytes (a client that
/// pipelines, against the protocol) count as alive. Takes a clone of the connection's
/// socket, so a blocked call can ask while the connection itself is borrowed elsewhere.
pub fn peer_alive(stream: &TcpStream) -> bool {
    // MSG_PEEK on a non-blocking socket; the flag is shared by all clones of the socket,
    // which is safe here because the connection's own thread is the one asking.
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let alive = match stream.peek(&mut [0u8; 1]) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_ok() && alive
}

/// Reads and writes that all share one deadline: each call gets only the time left, so a
/// peer trickling one byte at a time still cannot stretch the handshake past it.
struct Deadline<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Deadline<'_> {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
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

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
