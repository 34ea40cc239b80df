//! The blocking client: a [`Manager`] for one server and [`QueueProxy`] handles on its
//! queues.
//!
//! The client follows the exact connection sequence of Python's `BaseManager` clients,
//! so it works against `distq-server` and against a real Python manager alike:
//! every public function (`dummy`, `create`, `decref`, `shutdown`) is a one-shot
//! connection with its own handshake, and method calls go over a long-lived channel
//! opened with `accept_connection`. Each [`QueueProxy`] owns its channel, so a thread
//! blocked in `get` on one queue never holds up a `put` on another.
//!
//! Reference counting matters against a Python server: it forgets an object when its
//! count reaches zero. A proxy keeps the reference `create` gave it and returns it with
//! one `decref` when dropped, never more.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{AuthKey, LegacyAuth};
use crate::conn::{Connection, Role};
use crate::frame::DEFAULT_MAX_FRAME;
use crate::log::log_at;
use crate::net::{self, Address};
use crate::protocol::{Arg, Reply, Request};
use crate::{Error, Result, Value};

/// Deadlines and limits of a client. Start from [`ClientConfig::default`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// How long establishing the TCP connection may take (a Unix socket connects at
    /// once, or waits while the server's listen backlog is full).
    pub connect_timeout: Duration,
    /// How long the authentication handshake may take.
    pub handshake_timeout: Duration,
    /// Whether to speak HMAC-MD5 with a server that asks for it or answers with it, as
    /// Python 3.8–3.11 do (default `true`). `false` refuses such a server with
    /// [`Error::AuthFailed`] saying why. Without the `legacy-md5` feature MD5 is refused
    /// either way.
    pub legacy_auth: bool,
    /// How long to wait for a reply, on top of any time the call itself may block
    /// (a `get` with a 10 s timeout waits up to 10 s + this).
    pub call_timeout: Duration,
    /// The largest reply frame accepted.
    pub max_frame: usize,
    /// After losing the connection, keep trying to reconnect (with capped exponential
    /// backoff) for this long before giving up; zero means fail at once. A call that was
    /// in flight is sent again after reconnecting, so with a nonzero value a `put` can be
    /// duplicated and a plain `get` can lose the item it was being sent: use leases
    /// (`reserve`/`ack`) for at-least-once delivery.
    pub reconnect_for: Duration,
    /// Asked before each reconnect attempt: `false` gives up at once with the error
    /// that lost the connection (a worker that is stopping stops reconnecting).
    pub keep_reconnecting: fn() -> bool,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            legacy_auth: true,
            call_timeout: Duration::from_secs(30),
            max_frame: DEFAULT_MAX_FRAME,
            reconnect_for: Duration::ZERO,
            keep_reconnecting: || true,
        }
    }
}

/// Where a [`Manager`] connects: the addresses a `HOST:PORT` resolved to, or a Unix
/// socket.
#[derive(Debug)]
enum Target {
    Tcp(Vec<SocketAddr>),
    Unix(PathBuf),
}

/// A client of one manager server (distq's or Python's).
///
/// Cheap to clone; clones share the address, key and settings.
///
/// # Example
/// ```no_run
/// use distq::{AuthKey, Manager};
/// use std::time::Duration;
///
/// let manager = Manager::connect("127.0.0.1:5000", AuthKey::new("abc"))?;
/// let tasks = manager.queue("get_task_queue")?;
/// let results = manager.queue("get_result_queue")?;
/// loop {
///     match tasks.get(Duration::from_secs(1)) {
///         Ok(task) => results.put(format!("done: {task}"))?,
///         Err(distq::Error::Empty) => break,
///         Err(e) => return Err(e),
///     }
/// }
/// # Ok::<(), distq::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Manager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    authkey: AuthKey,
    config: ClientConfig,
    /// After `shutdown` the server is gone: proxies skip their final decref, as Python's do.
    shut_down: AtomicBool,
}

impl Manager {
    /// Connects to a server with default settings and checks the authkey (Python's
    /// `BaseManager.connect()`, which calls `dummy`).
    ///
    /// # Errors
    /// [`Error::Io`] if the server cannot be reached, [`Error::AuthFailed`] for a wrong
    /// key, [`Error::Timeout`] if it does not answer in time.
    pub fn connect(addr: impl ToSocketAddrs, authkey: AuthKey) -> Result<Manager> {
        Manager::connect_with(addr, authkey, ClientConfig::default())
    }

    /// [`Manager::connect`] with explicit settings.
    pub fn connect_with(
        addr: impl ToSocketAddrs,
        authkey: AuthKey,
        config: ClientConfig,
    ) -> Result<Manager> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::io("resolving the server address", e))?
            .collect();
        if addrs.is_empty() {
            return Err(Error::io(
                "resolving the server address",
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address found"),
            ));
        }
        Manager::start(Target::Tcp(addrs), authkey, config)
    }

    /// Connects to a server on a Unix-domain socket (Python's
    /// `BaseManager(address='/run/app/queue.sock')`), or a Linux abstract name when
    /// `path` starts with a NUL byte.
    ///
    /// # Errors
    /// As [`Manager::connect`].
    pub fn connect_unix(path: impl AsRef<Path>, authkey: AuthKey) -> Result<Manager> {
        Manager::connect_unix_with(path, authkey, ClientConfig::default())
    }

    /// [`Manager::connect_unix`] with explicit settings.
    pub fn connect_unix_with(
        path: impl AsRef<Path>,
        authkey: AuthKey,
        config: ClientConfig,
    ) -> Result<Manager> {
        let target = Target::Unix(path.as_ref().to_path_buf());
        Manager::start(target, authkey, config)
    }

    /// Connects to `addr`: [`Manager::connect_with`] for `HOST:PORT`,
    /// [`Manager::connect_unix_with`] for a path.
    ///
    /// # Errors
    /// As [`Manager::connect`].
    pub fn connect_to(addr: &Address, authkey: AuthKey, config: ClientConfig) -> Result<Manager> {
        match addr {
            Address::Tcp(a) => Manager::connect_with(a.as_str(), authkey, config),
            Address::Unix(path) => Manager::connect_unix_with(path, authkey, config),
        }
    }

    fn start(target: Target, authkey: AuthKey, config: ClientConfig) -> Result<Manager> {
        let manager = Manager {
            inner: Arc::new(Inner {
                target,
                authkey,
                config,
                shut_down: AtomicBool::new(false),
            }),
        };
        manager.call_public("dummy", vec![])?;
        Ok(manager)
    }

    /// The server's address (the first one the name resolved to; `0.0.0.0:0` for a
    /// Unix socket, see [`Manager::address`]).
    pub fn addr(&self) -> SocketAddr {
        match &self.inner.target {
            Target::Tcp(addrs) => addrs[0],
            Target::Unix(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    /// The server's address: the first one the name resolved to, or the socket's path.
    pub fn address(&self) -> Address {
        match &self.inner.target {
            Target::Tcp(addrs) => Address::from(addrs[0]),
            Target::Unix(path) => Address::Unix(path.clone()),
        }
    }

    /// Opens and authenticates a new connection.
    ///
    /// A server that closes the connection before its challenge is shedding load (it is
    /// at its limit of connections authenticating at once): the attempt is repeated with
    /// a short, growing pause until `connect_timeout` has passed.
    fn open(&self) -> Result<Connection> {
        self.open_within(&self.inner.config)
    }

    /// [`Manager::open`] with the deadlines of `cfg`.
    fn open_within(&self, cfg: &ClientConfig) -> Result<Connection> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            match self.open_once(cfg) {
                Err(Error::Closed) if start.elapsed() + pause < cfg.connect_timeout => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    fn open_once(&self, cfg: &ClientConfig) -> Result<Connection> {
        let addrs = match &self.inner.target {
            Target::Tcp(addrs) => addrs,
            Target::Unix(path) => return self.open_unix(path, cfg),
        };
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(addr, cfg.connect_timeout) {
                Ok(stream) => {
                    return Connection::handshake(
                        stream,
                        Role::Client,
                        &self.inner.authkey,
                        LegacyAuth::from_flag(cfg.legacy_auth),
                        cfg.max_frame,
                        cfg.handshake_timeout,
                    )
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        let (addr, e) = last.expect("addrs is never empty");
        let hint = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => " (is the server running on that port?)",
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                return Err(Error::Timeout("connecting to the server"))
            }
            _ => "",
        };
        Err(Error::io(format!("cannot connect to {addr}{hint}"), e))
    }

    fn open_unix(&self, path: &Path, cfg: &ClientConfig) -> Result<Connection> {
        match net::connect_unix(path) {
            Ok(stream) => Connection::handshake(
                stream,
                Role::Client,
                &self.inner.authkey,
                LegacyAuth::from_flag(cfg.legacy_auth),
                cfg.max_frame,
                cfg.handshake_timeout,
            ),
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => " (no server listens on it)",
                    std::io::ErrorKind::NotFound => " (no such socket: is the server running?)",
                    std::io::ErrorKind::PermissionDenied => {
                        " (the socket file's mode or its directory's does not let this user in)"
                    }
                    _ => "",
                };
                Err(Error::io(
                    format!("cannot connect to {}{hint}", Address::Unix(path.into())),
                    e,
                ))
            }
        }
    }

    /// Calls a public function on a fresh one-shot connection, as Python's `dispatch` does.
    pub fn call_public(&self, method: &str, args: Vec<Value>) -> Result<Value> {
        self.call_public_within(&self.inner.config, method, args)
    }

    fn call_public_within(
        &self,
        cfg: &ClientConfig,
        method: &str,
        args: Vec<Value>,
    ) -> Result<Value> {
        let mut conn = self.open_within(cfg)?;
        conn.set_read_timeout(Some(cfg.call_timeout))?;
        conn.set_write_timeout(Some(cfg.call_timeout))?;
        conn.write_value(&Request::new(None, method, args).to_value()?)?;
        Reply::from_value(&conn.read_value()?)?.into_result()
    }

    /// A handle on the queue the server registers under `typeid` (e.g. `get_task_queue`).
    ///
    /// # Errors
    /// [`Error::Traceback`] if the server does not know the typeid.
    pub fn queue(&self, typeid: &str) -> Result<QueueProxy> {
        let (ident, exposed) = self.create(typeid)?;
        Ok(QueueProxy {
            manager: self.clone(),
            typeid: typeid.to_string(),
            exposed,
            state: Mutex::new(ProxyState {
                ident,
                channel: None,
                released: false,
            }),
        })
    }

    /// `create(typeid)`: the ident and the exposed method names.
    fn create(&self, typeid: &str) -> Result<(String, Vec<String>)> {
        let reply = self.call_public("create", vec![Value::str(typeid)])?;
        match reply.as_tuple() {
            Some([Value::Str(ident), exposed]) => {
                let names = match exposed {
                    Value::Tuple(n) | Value::List(n) => n
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect(),
                    _ => Vec::new(),
                };
                Ok((ident.to_string(), names))
            }
            _ => Err(Error::protocol(
                "create must return (ident, exposed); is this a manager server?",
            )),
        }
    }

    /// Asks the server to stop (only the owner should). Proxies of this manager will not
    /// send their final `decref`, since the server is gone.
    pub fn shutdown(&self) -> Result<()> {
        self.call_public("shutdown", vec![])?;
        self.inner.shut_down.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Server statistics (a distq extension): a dict with `queues` (per queue: `size`,
    /// `reserved`, `waiting_getters`, `puts`, `gets`, `acks`, `requeues`,
    /// `dead_lettered`), `connections` and `uptime` in seconds.
    pub fn stats(&self) -> Result<Value> {
        self.call_public("stats", vec![])
    }

    /// The number of objects clients hold references to (`number_of_objects()`).
    pub fn number_of_objects(&self) -> Result<i64> {
        self.call_public("number_of_objects", vec![])?
            .as_int()
            .ok_or_else(|| Error::protocol("number_of_objects did not return an int"))
    }
}

/// A handle on one remote queue; Python's `AutoProxy` for a `queue.Queue`.
///
/// Thread-safe: concurrent calls on one proxy take turns on its channel (the protocol has
/// no request ids). Use one proxy per thread for concurrent blocking calls.
#[derive(Debug)]
pub struct QueueProxy {
    manager: Manager,
    typeid: String,
    exposed: Vec<String>,
    state: Mutex<ProxyState>,
}

#[derive(Debug)]
struct ProxyState {
    /// The server's ident for the queue; for a named queue renewed by `create` after a
    /// reconnect, since a restarted server hands out new idents.
    ident: String,
    channel: Option<Connection>,
    /// The reference `create` gave us was returned ([`QueueProxy::close`]).
    released: bool,
}

/// Errors after which the connection is unusable but a new one may work.
fn is_connection_loss(e: &Error) -> bool {
    matches!(e, Error::Io { .. } | Error::Closed | Error::Timeout(_))
}

impl QueueProxy {
    /// The typeid this proxy was created from.
    pub fn typeid(&self) -> &str {
        &self.typeid
    }

    /// The server's ident for the queue.
    pub fn ident(&self) -> String {
        self.state
            .lock()
            .map(|s| s.ident.clone())
            .unwrap_or_default()
    }

    /// Whether this is an anonymous queue (`Queue()`, `JoinableQueue()`), which the
    /// server knows only by its ident.
    fn is_made_by_factory(&self) -> bool {
        matches!(self.typeid.as_str(), "Queue" | "JoinableQueue")
    }

    /// After a reconnect, an anonymous queue's "no such ident" reply (a `KeyError`
    /// traceback, from distq's server as from Python's) as a clear error.
    fn still_there(&self, reply: Reply, ident: &str) -> Result<Reply> {
        match reply {
            Reply::Traceback(text) if text.contains("KeyError") => Err(Error::Value(format!(
                "the {}() queue {ident} is gone: after the connection was lost the server no \
                 longer had it (it restarted?); anonymous queues do not outlive their server, \
                 named ones do with --journal",
                self.typeid
            ))),
            other => Ok(other),
        }
    }

    /// Returns the reference this proxy holds on the server, as dropping it does, but
    /// with the full deadlines and the error reported. A `Queue()` is freed when its last
    /// reference goes.
    pub fn close(self) -> Result<()> {
        let ident = {
            let mut state = self.state.lock().map_err(|_| {
                Error::Internal("a proxy lock was poisoned by a panicking thread".into())
            })?;
            state.channel = None;
            state.released = true;
            state.ident.clone()
        };
        self.manager
            .call_public("decref", vec![Value::str(&ident)])
            .map(drop)
    }

    /// Whether the server offers `method` on this queue (e.g. `reserve`: distq does,
    /// Python's `BaseManager` does not).
    pub fn exposes(&self, method: &str) -> bool {
        self.exposed.iter().any(|m| m == method)
    }

    /// Calls `method` on the queue over this proxy's channel. `blocks_for` is how long
    /// the server may legitimately take (a `get` timeout); `None` means no limit.
    ///
    /// With [`ClientConfig::reconnect_for`] set, a lost connection is re-established
    /// (capped exponential backoff, one log line per outage) and the call sent again.
    pub fn call(
        &self,
        method: &str,
        args: Vec<Value>,
        kwargs: Vec<(String, Value)>,
        blocks_for: Option<Duration>,
    ) -> Result<Value> {
        let mut state = self.state.lock().map_err(|_| {
            Error::Internal("a proxy lock was poisoned by a panicking thread".into())
        })?;
        let mut request = Request {
            ident: Some(state.ident.clone()),
            method: method.to_string(),
            args: args.into_iter().map(Arg::Value).collect(),
            kwargs: kwargs
                .into_iter()
                .map(|(k, v)| (k, Arg::Value(v)))
                .collect(),
        };
        let first = self.try_call(&mut state, &request, blocks_for);
        let reconnect_for = self.manager.inner.config.reconnect_for;
        let lost = match first {
            Err(e) if is_connection_loss(&e) && !reconnect_for.is_zero() => e,
            other => return other.and_then(Reply::into_result),
        };
        // First one immediate, silent attempt: a channel can be stale only because the
        // server restarted while this proxy was idle, and another proxy may have already
        // waited out the outage (and said so). Only if that fails is this an outage.
        let addr = self.manager.address();
        let start = Instant::now();
        let mut backoff = Duration::ZERO;
        let mut announced = false;
        let keep_reconnecting = self.manager.inner.config.keep_reconnecting;
        loop {
            std::thread::sleep(backoff);
            if !keep_reconnecting() {
                return Err(lost);
            }
            // A named queue is looked up again by name (a restarted server has new
            // idents). A `Queue()` made by a factory has no name: `create` would make a
            // new, empty queue, so the proxy keeps its ident and fails clearly below if
            // the server no longer has it.
            let attempt = if self.is_made_by_factory() {
                self.try_call(&mut state, &request, blocks_for)
                    .and_then(|reply| self.still_there(reply, &state.ident))
            } else {
                self.manager.create(&self.typeid).and_then(|(ident, _)| {
                    state.ident = ident.clone();
                    request.ident = Some(ident);
                    self.try_call(&mut state, &request, blocks_for)
                })
            };
            match attempt {
                Ok(reply) => {
                    if announced {
                        log_at!(Warn, "reconnected to {addr} after {:.1?}", start.elapsed());
                    }
                    return reply.into_result();
                }
                Err(e) if is_connection_loss(&e) && start.elapsed() < reconnect_for => {
                    if !announced {
                        log_at!(
                            Warn,
                            "lost the connection to {addr} ({lost}); reconnecting for up to {reconnect_for:?}"
                        );
                        announced = true;
                    }
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: (re)open the channel if needed, send, read the reply. On failure the
    /// channel is dropped, since it may be out of step (a late reply could still arrive).
    fn try_call(
        &self,
        state: &mut ProxyState,
        request: &Request,
        blocks_for: Option<Duration>,
    ) -> Result<Reply> {
        if state.channel.is_none() {
            state.channel = Some(self.open_channel()?);
        }
        let conn = state.channel.as_mut().expect("channel was just opened");
        let call_timeout = self.manager.inner.config.call_timeout;
        let result = conn
            .set_read_timeout(blocks_for.map(|b| b + call_timeout))
            .and_then(|()| conn.write_value(&request.to_value()?))
            .and_then(|()| conn.read_value())
            .and_then(|v| Reply::from_value(&v));
        if result.is_err() {
            state.channel = None;
        }
        result
    }

    fn open_channel(&self) -> Result<Connection> {
        let mut conn = self.manager.open()?;
        let timeout = self.manager.inner.config.call_timeout;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        let name = format!("distq-{}", std::process::id());
        conn.write_value(
            &Request::new(None, "accept_connection", vec![Value::str(&name)]).to_value()?,
        )?;
        Reply::from_value(&conn.read_value()?)?.into_result()?;
        Ok(conn)
    }

    /// Appends an item, waiting as long as it takes for room in a bounded queue.
    pub fn put(&self, item: impl Into<Value>) -> Result<()> {
        self.call("put", vec![item.into()], vec![], None).map(drop)
    }

    /// Appends an item, waiting at most `timeout` for room.
    ///
    /// # Errors
    /// [`Error::Full`] if the queue stayed full.
    pub fn put_timeout(&self, item: impl Into<Value>, timeout: Duration) -> Result<()> {
        let kwargs = vec![("timeout".to_string(), Value::Float(timeout.as_secs_f64()))];
        self.call("put", vec![item.into()], kwargs, Some(timeout))
            .map(drop)
    }

    /// Appends an item if there is room right now.
    ///
    /// # Errors
    /// [`Error::Full`] if the queue is full.
    pub fn put_nowait(&self, item: impl Into<Value>) -> Result<()> {
        self.call(
            "put_nowait",
            vec![item.into()],
            vec![],
            Some(Duration::ZERO),
        )
        .map(drop)
    }

    /// Takes the oldest item, waiting at most `timeout` (Python's `get(timeout=...)`).
    ///
    /// # Errors
    /// [`Error::Empty`] if nothing arrived in time.
    pub fn get(&self, timeout: Duration) -> Result<Value> {
        let kwargs = vec![("timeout".to_string(), Value::Float(timeout.as_secs_f64()))];
        self.call("get", vec![], kwargs, Some(timeout))
    }

    /// Takes the oldest item, waiting as long as it takes (Python's `get()`).
    pub fn get_blocking(&self) -> Result<Value> {
        self.call("get", vec![], vec![], None)
    }

    /// Appends all `items` in one round trip; they are queued together or not at all.
    ///
    /// # Errors
    /// [`Error::Full`] if a bounded queue had no room for the whole batch within `timeout`
    /// (`None`: wait as long as it takes).
    pub fn put_many(&self, items: Vec<Value>, timeout: Option<Duration>) -> Result<()> {
        let kwargs = timeout
            .map(|t| vec![("timeout".to_string(), Value::Float(t.as_secs_f64()))])
            .unwrap_or_default();
        self.call("put_many", vec![Value::list(items)], kwargs, timeout)
            .map(drop)
    }

    /// Waits at most `timeout` for an item, then takes up to `max` of those waiting, in
    /// one round trip (a distq extension; Python's own server does not have it).
    ///
    /// # Errors
    /// [`Error::Empty`] if nothing arrived in time.
    pub fn get_many(&self, max: usize, timeout: Duration) -> Result<Vec<Value>> {
        let args = vec![Value::Int(i64::try_from(max).unwrap_or(i64::MAX))];
        let kwargs = vec![("timeout".to_string(), Value::Float(timeout.as_secs_f64()))];
        match self.call("get_many", args, kwargs, Some(timeout))? {
            Value::List(items) => Ok(items.to_vec()),
            other => Err(Error::protocol(format!(
                "get_many returned {}, not a list",
                other.brief(60)
            ))),
        }
    }

    /// Takes the oldest item if there is one.
    ///
    /// # Errors
    /// [`Error::Empty`] if the queue is empty.
    pub fn get_nowait(&self) -> Result<Value> {
        self.call("get_nowait", vec![], vec![], Some(Duration::ZERO))
    }

    /// Takes the oldest item under a lease, waiting at most `timeout`. The item stays
    /// owned by this connection until [`QueueProxy::ack`]: if the connection closes (the
    /// worker died) or the lease expires first, it goes back to the head of the queue.
    ///
    /// # Errors
    /// [`Error::Empty`] if nothing arrived in time; [`Error::Traceback`] against a server
    /// without leases (check [`QueueProxy::exposes`]).
    pub fn reserve(&self, timeout: Duration) -> Result<(u64, Value)> {
        let kwargs = vec![("timeout".to_string(), Value::Float(timeout.as_secs_f64()))];
        match self.call("reserve", vec![], kwargs, Some(timeout))? {
            Value::Tuple(t) => match &t[..] {
                [Value::Int(lease), item] if *lease >= 0 => Ok((*lease as u64, item.clone())),
                _ => Err(Error::protocol("reserve must return (lease, item)")),
            },
            other => Err(Error::protocol(format!(
                "reserve returned {}, not (lease, item)",
                other.brief(60)
            ))),
        }
    }

    /// Takes up to `max` items, each under its own lease, in one round trip (a distq
    /// extension: check [`QueueProxy::exposes`]`("reserve_many")`): a worker's prefetch.
    /// The server hands out at most half the waiting items (rounded up), so other
    /// workers still find work; waits up to `timeout` for the first.
    ///
    /// # Errors
    /// As [`QueueProxy::reserve`].
    pub fn reserve_many(&self, max: usize, timeout: Duration) -> Result<Vec<(u64, Value)>> {
        let kwargs = vec![("timeout".to_string(), Value::Float(timeout.as_secs_f64()))];
        let max = Value::Int(i64::try_from(max).unwrap_or(i64::MAX));
        let bad = || Error::protocol("reserve_many must return a list of (lease, item)");
        match self.call("reserve_many", vec![max], kwargs, Some(timeout))? {
            Value::List(pairs) => pairs
                .iter()
                .map(|pair| match pair.as_tuple() {
                    Some([Value::Int(lease), item]) if *lease >= 0 => {
                        Ok((*lease as u64, item.clone()))
                    }
                    _ => Err(bad()),
                })
                .collect(),
            _ => Err(bad()),
        }
    }

    /// [`QueueProxy::ack_put`] for a batch, in one round trip: `results[i]` completes
    /// `leases[i]`. Every lease is checked before anything is put: if one is no longer
    /// held, nothing is stored (and the error names it); a caller can then fall back to
    /// one `ack_put` per lease to save the others.
    pub fn ack_put_many(
        &self,
        leases: &[u64],
        results: Vec<Value>,
        queue_name: &str,
    ) -> Result<()> {
        let leases = leases
            .iter()
            .map(|&l| i64::try_from(l).map(Value::Int))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::Value("lease id out of range".into()))?;
        self.call(
            "ack_put_many",
            vec![
                Value::list(leases),
                Value::list(results),
                Value::str(queue_name),
            ],
            vec![],
            None,
        )
        .map(drop)
    }

    /// Completes a lease: the item is done for good.
    ///
    /// # Errors
    /// [`Error::Remote`] (`ValueError`) if the lease is no longer held: it expired, or
    /// the connection that took it was lost, and the item was requeued.
    pub fn ack(&self, lease: u64) -> Result<()> {
        self.lease_call("ack", lease, vec![])
    }

    /// Puts `item` on the queue named `queue_name` and acks `lease`, in one round trip
    /// (a distq extension: check [`QueueProxy::exposes`]`("ack_put")`). The server checks
    /// the lease first, so a result for a task whose lease is gone (the connection was
    /// lost, the lease expired, the server restarted) is never stored.
    ///
    /// # Errors
    /// [`Error::Remote`] (`ValueError`) if the lease is no longer held: nothing was put.
    /// If the lease ended while the put waited for room in a bounded queue, the item
    /// was put and the error says so.
    pub fn ack_put(&self, lease: u64, item: impl Into<Value>, queue_name: &str) -> Result<()> {
        let lease = Value::Int(
            i64::try_from(lease).map_err(|_| Error::Value("lease id out of range".into()))?,
        );
        self.call(
            "ack_put",
            vec![lease, item.into(), Value::str(queue_name)],
            vec![],
            None,
        )
        .map(drop)
    }

    /// Gives a leased item back to the head of the queue, now or after `delay`.
    pub fn release(&self, lease: u64, delay: Option<Duration>) -> Result<()> {
        let kwargs = delay
            .map(|d| vec![("delay".to_string(), Value::Float(d.as_secs_f64()))])
            .unwrap_or_default();
        self.lease_call("release", lease, kwargs)
    }

    /// Extends a lease by `lease_time` (or the server's default) from now.
    pub fn touch(&self, lease: u64, lease_time: Option<Duration>) -> Result<()> {
        let kwargs = lease_time
            .map(|d| vec![("lease_timeout".to_string(), Value::Float(d.as_secs_f64()))])
            .unwrap_or_default();
        self.lease_call("touch", lease, kwargs)
    }

    fn lease_call(&self, method: &str, lease: u64, kwargs: Vec<(String, Value)>) -> Result<()> {
        let lease = Value::Int(
            i64::try_from(lease).map_err(|_| Error::Value("lease id out of range".into()))?,
        );
        self.call(method, vec![lease], kwargs, Some(Duration::ZERO))
            .map(drop)
    }

    /// Python 3.13's `Queue.shutdown(immediate)`: later puts fail with
    /// [`Error::ShutDown`]; gets drain the remaining items (none if `immediate`) and
    /// then fail the same way.
    pub fn shutdown(&self, immediate: bool) -> Result<()> {
        self.call(
            "shutdown",
            vec![Value::Bool(immediate)],
            vec![],
            Some(Duration::ZERO),
        )
        .map(drop)
    }

    /// The number of waiting items (`qsize()`).
    pub fn qsize(&self) -> Result<usize> {
        let n = self.call("qsize", vec![], vec![], Some(Duration::ZERO))?;
        n.as_int()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::protocol("qsize did not return a non-negative int"))
    }

    /// Whether no item is waiting (`empty()`).
    pub fn empty(&self) -> Result<bool> {
        self.bool_call("empty")
    }

    /// Whether a bounded queue has no room (`full()`).
    pub fn full(&self) -> Result<bool> {
        self.bool_call("full")
    }

    fn bool_call(&self, method: &str) -> Result<bool> {
        match self.call(method, vec![], vec![], Some(Duration::ZERO))? {
            Value::Bool(b) => Ok(b),
            other => Err(Error::protocol(format!(
                "{method} returned {}, not a bool",
                other.brief(60)
            ))),
        }
    }

    /// Marks one fetched item as processed (`task_done()`).
    pub fn task_done(&self) -> Result<()> {
        self.call("task_done", vec![], vec![], Some(Duration::ZERO))
            .map(drop)
    }

    /// Waits until every item put has been marked done (`join()`).
    pub fn join(&self) -> Result<()> {
        self.call("join", vec![], vec![], None).map(drop)
    }
}

impl Drop for QueueProxy {
    /// Returns the reference `create` gave this proxy. Errors are ignored, as in Python:
    /// the server may already be gone. Bounded by `DROP_DEADLINE` (2 s) per step, since a
    /// destructor must not block for the minute the full deadlines allow; use
    /// [`QueueProxy::close`] to wait longer and see the error.
    fn drop(&mut self) {
        let ident = match self.state.get_mut() {
            Ok(state) if !state.released => {
                state.channel = None;
                state.ident.clone()
            }
            _ => return,
        };
        if !self.manager.inner.shut_down.load(Ordering::SeqCst) {
            let mut quick = self.manager.inner.config.clone();
            quick.connect_timeout = quick.connect_timeout.min(DROP_DEADLINE);
            quick.handshake_timeout = quick.handshake_timeout.min(DROP_DEADLINE);
            quick.call_timeout = quick.call_timeout.min(DROP_DEADLINE);
            let _ = self
                .manager
                .call_public_within(&quick, "decref", vec![Value::str(&ident)]);
        }
    }
}

/// How long each step of a dropped proxy's `decref` (connect, handshake, reply) may take.
const DROP_DEADLINE: Duration = Duration::from_secs(2);
