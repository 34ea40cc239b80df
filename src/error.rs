//! The one error type of the library.
//!
//! Every fallible function in distq returns [`Result<T>`](Result). The variants are the
//! situations a caller may want to tell apart: a queue that was empty or full (ordinary
//! flow control, mirroring Python's `queue.Empty` / `queue.Full`), a deadline that passed,
//! a wrong authkey, a peer that broke the protocol, an I/O failure, or an exception raised
//! on the remote side.

use std::fmt;
use std::io;

/// A `Result` whose error defaults to distq's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in distq.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The queue had no item before the timeout (Python's `queue.Empty`).
    Empty,
    /// The bounded queue had no free slot before the timeout (Python's `queue.Full`).
    Full,
    /// The queue was shut down (Python 3.13's `queue.ShutDown`): no more puts, and gets
    /// fail once it is drained.
    ShutDown,
    /// The server's memory budget for stored items is used up (`--max-memory`): a put
    /// that does not wait fails with it (Python's `queue.Full`, naming the limit).
    MemoryFull {
        /// The budget, in bytes.
        limit: u64,
    },
    /// A network deadline passed: connecting, the handshake, or waiting for a reply.
    Timeout(&'static str),
    /// The peer's authkey differs from ours (one side sent or received `#FAILURE#`), or
    /// its handshake uses a digest we refuse (MD5, with legacy authentication off).
    AuthFailed(String),
    /// The peer sent bytes that do not follow Python's wire protocol.
    Protocol(String),
    /// A frame announced a length above the configured maximum; nothing was allocated.
    FrameTooLarge {
        /// The length the peer announced.
        len: u64,
        /// The maximum this side accepts.
        max: usize,
    },
    /// The remote side raised an exception (`#ERROR`) other than `Empty`/`Full`.
    Remote {
        /// Dotted class name as pickled, e.g. `builtins.KeyError`.
        class: String,
        /// The exception's arguments rendered as text.
        message: String,
    },
    /// The remote side reported a fault as text (`#TRACEBACK` or `#UNSERIALIZABLE`).
    Traceback(String),
    /// The peer closed the connection.
    Closed,
    /// A value or request that cannot be taken: a pickle nesting deeper than the limit,
    /// an item over a size limit, a lease the server does not hold (Python's `ValueError`).
    Value(String),
    /// The journal on disk cannot be replayed as it is: damage with valid records after
    /// it, or a record of a queue no record declared. Opening it with
    /// [`JournalConfig::repair`](crate::journal::JournalConfig::repair) set skips what is
    /// damaged (the items in it are lost).
    Journal(String),
    /// A bug in distq rather than anything the caller did: a lock poisoned by a panicking
    /// thread, a thread that panicked. Reaches a Python client as `RuntimeError`.
    Internal(String),
    /// An operating-system I/O error, with what distq was doing at the time.
    Io {
        /// What distq was doing, e.g. `connecting to 10.0.0.5:5000`.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with a short description of what was being attempted.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Error {
        Error::Protocol(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Empty => write!(f, "queue is empty"),
            Error::Full => write!(f, "queue is full"),
            Error::ShutDown => write!(f, "queue was shut down"),
            Error::MemoryFull { limit } => write!(
                f,
                "the server's memory for items is full ({limit} bytes, --max-memory): try again once consumers catch up"
            ),
            Error::Timeout(what) => write!(f, "timed out while {what}"),
            Error::AuthFailed(why) => write!(f, "authentication failed: {why}"),
            Error::Protocol(msg) => write!(f, "protocol error: {msg}"),
            Error::FrameTooLarge { len, max } => write!(
                f,
                "frame of {len} bytes exceeds the limit of {max} bytes (raise --max-frame if this is expected)"
            ),
            Error::Remote { class, message } => write!(f, "remote exception {class}: {message}"),
            Error::Traceback(text) => write!(f, "remote error: {}", text.trim_end()),
            Error::Closed => write!(f, "connection closed by peer"),
            Error::Value(msg) => write!(f, "{msg}"),
            Error::Journal(msg) => write!(f, "{msg}"),
            Error::Internal(msg) => write!(f, "internal error: {msg} (a bug in distq; please report it)"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
