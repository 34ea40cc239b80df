//! # distq
//!
//! Distributed task queues that speak Python's own `multiprocessing.managers` protocol.
//!
//! A server exposes named queues over TCP, protected by a shared authkey; clients
//! (Rust's [`Manager`] or Python's `BaseManager`) connect, `put` tasks and `get` them with
//! timeouts. Every byte on the wire is Python's, so distq and Python programs mix freely:
//! a Rust server with Python workers, a Python master with Rust workers.
//!
//! ## A tour, bottom up
//! - [`frame`]: Python's length-prefixed frames, with size limits.
//! - [`auth`]: the HMAC challenge-response handshake, legacy (MD5) and modern (SHA-256).
//! - [`pickle`]: the value model and a data-only pickle codec.
//! - [`protocol`]: requests and replies.
//! - [`xmlrpc`]: the same messages for peers that use `serializer='xmlrpclib'`.
//! - [`queues`]: the queue map with `queue.Queue`'s blocking semantics, and leases.
//! - [`journal`]: the append-only file that makes queues survive restarts.
//! - [`dispatch`]: what each request does to the queues.
//! - [`conn`]: one authenticated socket.
//! - [`server`] and [`client`]: the two ends.
//! - For the binaries: [`cli`] (flags, exit codes, progress), [`exec`] (a shell command
//!   per task) and [`text`] (values as text and JSON), plus [`log`].
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

#![deny(unsafe_code)] // one audited exception: `conn::quickack` (a setsockopt std lacks)
#![warn(missing_docs)]

pub mod auth;
pub mod cli;
pub mod client;
pub mod conn;
pub mod dispatch;
pub mod error;
pub mod exec;
pub mod frame;
pub mod journal;
mod leb128;
pub mod log;
pub mod pickle;
pub mod protocol;
pub mod queues;
pub mod server;
pub mod text;
pub mod xmlrpc;

pub use auth::AuthKey;
pub use client::{ClientConfig, Manager, QueueProxy};
pub use error::{Error, Result};
pub use pickle::Value;
pub use server::{RunningServer, Server, ServerConfig, ServerHandle};
