//! # distq
//!
//! Distributed task queues that speak Python's own `multiprocessing.managers` protocol.
//!
//! A server exposes named queues over TCP, protected by a shared authkey; clients
//! (Rust's [`Manager`] or Python's `BaseManager`) connect, `put` tasks and `get` them with
//! timeouts. Every byte on the wire is Python's, so distq and Python programs mix freely:
//! a Rust server with Python workers, a Python master with Rust workers.
//!
//! ## The library's face
//! - [`Server`], [`ServerConfig`], [`ServerHandle`], [`RunningServer`]: serve queues,
//!   embedded or standalone, with an optional [`journal`] ([`journal::JournalConfig`]).
//! - [`Manager`], [`QueueProxy`], [`ClientConfig`]: talk to a distq or Python server.
//! - [`Value`] (in [`pickle`]), [`AuthKey`], [`Error`].
//! - [`worker`]: the worker loop (leases, batches, retries, lease renewal, a clean stop)
//!   around a [`worker::Handler`] of your own.
//! - For workers and tools: [`exec`] (a shell command per task), [`text`] (values as
//!   text and JSON, the line-mode envelope) and [`log`] (silent until a level is set).
//!
//! ## Features
//! - `legacy-md5` (default): HMAC-MD5, the handshake of Python 3.8–3.11 peers. Without it
//!   the `md-5` crate and all MD5 code are left out and such peers are refused, as they
//!   are at run time with `legacy_auth: false` in [`ServerConfig`] or [`ClientConfig`].
//!
//! ## Internals
//! The layers beneath, bottom up, are private: `frame` (Python's length-prefixed
//! frames), `auth` (the HMAC handshake), the scan in `pickle` (how the server reads
//! requests without decoding items), `protocol` (requests and replies), `xmlrpc` (the
//! other serializer), `queues` (`queue.Queue` semantics, leases, holds, the memory
//! budget), `dispatch` (what each request does) and `conn` (one authenticated socket).
//! The `internals` feature makes them public, undocumented and unstable, for the crate's
//! own tests, benches and fuzz targets. ARCHITECTURE.md maps them. The binaries' flags,
//! exit codes and progress line are theirs (bin/cli.rs, bin/master/progress.rs): nothing
//! here parses a command line or exits the process.
//!
//! ```
//! use distq::{AuthKey, Manager, Server, ServerConfig};
//! use std::time::Duration;
//!
//! let running = Server::bind("127.0.0.1:0", ServerConfig::new(AuthKey::new("abc")))?.spawn()?;
//! let manager = Manager::connect(running.local_addr(), AuthKey::new("abc"))?;
//! let q = manager.queue("get_task_queue")?;
//! q.put(42)?;
//! assert_eq!(q.get(Duration::from_secs(1))?.as_int(), Some(42));
//! assert!(matches!(q.get(Duration::from_millis(10)), Err(distq::Error::Empty)));
//! running.shutdown()?;
//! # Ok::<(), distq::Error>(())
//! ```

#![deny(unsafe_code)]
// audited exceptions: `conn::tcp_quickack` (a setsockopt std lacks), `net::peek_unix`, `net::wake_listener`
#![warn(missing_docs)]

/// The layers beneath the face are private unless the `internals` feature is on: the
/// integration tests, benches and fuzz targets turn it on (through a dev-dependency of
/// the crate on itself, and the fuzz crate's own dependency) to drive them directly; a
/// program using distq sees only the face, and the binaries use nothing else.
macro_rules! internal_modules {
    ($($name:ident),*) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        mod $name;
    )*};
}

pub mod client;
internal_modules!(auth, conn, dispatch, frame, protocol, queues, xmlrpc);
pub mod error;
pub mod exec;
pub mod journal;
mod leb128;
pub mod log;
pub mod net;
pub mod pickle;
pub mod server;
pub mod text;
pub mod worker;

pub use auth::AuthKey;
pub use client::{ClientConfig, Manager, QueueProxy};
pub use error::{Error, Result};
pub use net::Address;
pub use pickle::Value;
pub use server::{RunningServer, Server, ServerConfig, ServerHandle};
