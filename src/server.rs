//! The server loop: a listener (TCP or Unix-domain), one thread per connection, and
//! shutdown.
//!
//! Each accepted socket gets its own thread, which authenticates the peer (with a
//! deadline), reads one request and either answers it and closes (a one-shot public
//! function such as `create`), or, for `accept_connection`, keeps serving method calls
//! until the peer hangs up. This is Python's `managers.Server` design; it keeps a blocked
//! `get` on one connection from delaying anyone else, at the price of one thread per
//! connection (cheap at the scale of a task queue: threads mostly sleep in `read` or on
//! a queue's condition variable).
//!
//! Shutdown follows "join your threads": set a flag, wake every waiter on every queue,
//! shut every live socket down, wake the blocking `accept` by connecting to ourselves,
//! then join every connection thread before [`Server::run`] returns.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::auth::{AuthKey, LegacyAuth};
use crate::conn::{Connection, Role};
use crate::dispatch::{self, Public};
use crate::frame::DEFAULT_MAX_FRAME;
use crate::journal::{Journal, JournalConfig};
use crate::log::log_at;
use crate::net::{self, Address, Listener, Stream};
use crate::protocol::{Reply, Request};
use crate::queues::{Policy, QueueMap, LIVENESS_SLICE};
use crate::{Error, Result, Value};

/// Settings of a [`Server`]. Start from [`ServerConfig::new`] and adjust fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The shared secret every client must prove it knows.
    pub authkey: AuthKey,
    /// Whether a client may prove it with HMAC-MD5, as Python 3.8–3.11 do (default `true`).
    /// `false` (`--no-legacy-auth`) admits only SHA-256 (Python 3.12+, distq), for
    /// deployments whose policy forbids MD5: an MD5 answer gets `#FAILURE#`, as a wrong key
    /// does, and a log line saying why. Without the `legacy-md5` feature MD5 is refused
    /// either way.
    pub legacy_auth: bool,
    /// The largest request frame accepted after authentication (Python has no limit).
    pub max_frame: usize,
    /// How long a new connection may take to authenticate.
    pub handshake_timeout: Duration,
    /// How long sending a reply may block on a client that does not read.
    pub write_timeout: Duration,
    /// The most connections served at once; more wait in the listen backlog (no permit,
    /// no `accept`) until one closes.
    pub max_connections: usize,
    /// The most connections still authenticating at once: a flood of silent peers can
    /// hold at most this many threads for at most `handshake_timeout`. Past it the
    /// *oldest* pending handshake is shed, so a new arrival is always heard.
    pub max_handshakes: usize,
    /// The most pending handshakes from one source address; past it that address's
    /// oldest is shed.
    pub max_handshakes_per_source: usize,
    /// Close method channels idle this long (`None`: never). A blocked `get` is not idle.
    pub idle_timeout: Option<Duration>,
    /// Default lease time for `reserve` (`None`: leases expire only with their connection).
    pub lease_timeout: Option<Duration>,
    /// Leased deliveries after which an item goes to `NAME.dead` (0: never).
    pub max_deliveries: u32,
    /// Refuse items that reference classes or functions (`--no-code-items`).
    pub no_code_items: bool,
    /// The most bytes of stored items, server-wide (`--max-memory`): past it, puts
    /// wait or fail with `queue.Full`; `None`: no limit.
    pub max_memory: Option<u64>,
    /// Keep named queues in an append-only journal so they survive restarts
    /// (`--journal DIR`); `None` keeps them in memory only.
    pub journal: Option<JournalConfig>,
}

impl ServerConfig {
    /// Defaults: 64 MiB frames, a 10 s handshake deadline, a 30 s write timeout, 1024
    /// connections of which 640 may be authenticating (256 from one address), no idle timeout, leases that
    /// expire only with their connection, no dead-lettering, any item accepted, MD5 (legacy
    /// clients) admitted.
    pub fn new(authkey: AuthKey) -> ServerConfig {
        ServerConfig {
            authkey,
            legacy_auth: true,
            max_frame: DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_handshakes: 640,
            max_handshakes_per_source: 256,
            idle_timeout: None,
            lease_timeout: None,
            max_deliveries: 0,
            no_code_items: false,
            max_memory: None,
            journal: None,
        }
    }
}

/// A queue server bound to a TCP address or a Unix socket.
///
/// # Example
/// ```
/// use distq::{AuthKey, Manager, Server, ServerConfig, Value};
/// use std::time::Duration;
///
/// let server = Server::bind("127.0.0.1:0", ServerConfig::new(AuthKey::new("abc")))?;
/// let addr = server.local_addr();
/// let running = server.spawn()?;
///
/// let manager = Manager::connect(addr, AuthKey::new("abc"))?;
/// let tasks = manager.queue("get_task_queue")?;
/// tasks.put(Value::from(3))?;
/// assert_eq!(tasks.get(Duration::from_secs(1))?, Value::from(3));
///
/// running.shutdown()?;
/// # Ok::<(), distq::Error>(())
/// ```
#[derive(Debug)]
pub struct Server {
    listener: Listener,
    shared: Arc<Shared>,
    /// The socket file this server created, removed when the server is dropped (after
    /// [`Server::run`] returns).
    socket_file: Option<SocketFile>,
}

#[derive(Debug)]
struct Shared {
    config: ServerConfig,
    queues: QueueMap,
    local_addr: SocketAddr,
    /// What the server listens on: `local_addr` as text, or the Unix socket's path.
    address: Address,
    stopping: AtomicBool,
    /// Every connection thread has been joined: the journal's last flush may run.
    drained: AtomicBool,
    next_conn: AtomicU64,
    /// Connections being served (for `stats`).
    connections: AtomicUsize,
    /// Connections accepted but not yet authenticated: id, source address (`None`: the
    /// Unix socket, whose peers count as one source) and a handle to shed it by (ids
    /// grow, so the smallest is the oldest).
    handshaking: Mutex<std::collections::BTreeMap<u64, (Source, Arc<Stream>)>>,
    /// A second handle on every live socket, so shutdown can unblock their threads.
    live: Mutex<HashMap<u64, Arc<Stream>>>,
    /// A second handle on a Unix listener: shutdown wakes `accept` through it, since the
    /// socket file may have been removed (or replaced) and cannot be connected to.
    unix_listener: Option<std::os::unix::net::UnixListener>,
}

/// Where a pending handshake comes from, for shedding: the peer's IP, or `None` for the
/// Unix socket, whose peers all count as one source.
type Source = Option<std::net::IpAddr>;

/// A cheap, cloneable handle that can stop a running server and reach its queues.
#[derive(Clone, Debug)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

/// A server running on a background thread (see [`Server::spawn`]).
#[derive(Debug)]
pub struct RunningServer {
    handle: ServerHandle,
    thread: JoinHandle<Result<()>>,
}

impl Server {
    /// Binds `addr` (e.g. `"0.0.0.0:5000"`, or port 0 for any free port).
    ///
    /// # Errors
    /// [`Error::Io`] naming the address, e.g. when it is already in use.
    pub fn bind(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        config: ServerConfig,
    ) -> Result<Server> {
        let listener = TcpListener::bind(&addr).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => " (another server is using this port)",
                std::io::ErrorKind::AddrNotAvailable => " (this machine has no such address)",
                std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
                _ => "",
            };
            Error::io(format!("cannot listen on {addr:?}{hint}"), e)
        })?;
        Server::from_listener(listener, config)
    }

    /// Binds a Unix-domain socket at `path` (Python's `address='/run/app/queue.sock'`),
    /// or, for a path starting with a NUL byte, a Linux abstract name. Who may connect
    /// is decided by the socket file's mode and its directory's, in addition to the
    /// authkey. The file is removed when the server stops.
    ///
    /// A socket file left behind by a server that died is replaced; one that a running
    /// server answers on is not.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path: "address in use" when a server listens there, or
    /// when the path exists and is not a socket.
    ///
    /// # Example
    /// ```
    /// use distq::{AuthKey, Manager, Server, ServerConfig, Value};
    /// use std::time::Duration;
    ///
    /// let path = std::env::temp_dir().join(format!("distq-doc-{}.sock", std::process::id()));
    /// let running = Server::bind_unix(&path, ServerConfig::new(AuthKey::new("abc")))?.spawn()?;
    ///
    /// let manager = Manager::connect_unix(&path, AuthKey::new("abc"))?;
    /// let jobs = manager.queue("jobs")?;
    /// jobs.put(Value::from(1))?;
    /// assert_eq!(jobs.get(Duration::from_secs(1))?, Value::from(1));
    /// drop(jobs);
    ///
    /// running.shutdown()?;
    /// assert!(!path.exists(), "the socket file goes with its server");
    /// # Ok::<(), distq::Error>(())
    /// ```
    pub fn bind_unix(path: impl AsRef<Path>, config: ServerConfig) -> Result<Server> {
        let path = path.as_ref();
        let address = Address::Unix(path.to_path_buf());
        let listener = listen_unix(path).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    " (a server is listening on it, or the path is not a socket)"
                }
                std::io::ErrorKind::PermissionDenied => " (the directory is not writable)",
                _ => "",
            };
            Error::io(format!("cannot listen on {address}{hint}"), e)
        })?;
        let socket_file = SocketFile::new(path);
        let mut server = Server::from_parts(
            Listener::Unix(listener),
            SocketAddr::from(([0, 0, 0, 0], 0)),
            address,
            config,
        )?;
        server.socket_file = socket_file;
        Ok(server)
    }

    /// Binds `addr`: [`Server::bind`] for `HOST:PORT`, [`Server::bind_unix`] for a path.
    ///
    /// # Errors
    /// As those two.
    pub fn bind_to(addr: &Address, config: ServerConfig) -> Result<Server> {
        match addr {
            Address::Tcp(a) => Server::bind(a.as_str(), config),
            Address::Unix(path) => Server::bind_unix(path, config),
        }
    }

    /// Serves on an already-bound listener.
    pub fn from_listener(listener: TcpListener, config: ServerConfig) -> Result<Server> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the listener's address", e))?;
        Server::from_parts(
            Listener::Tcp(listener),
            local_addr,
            Address::from(local_addr),
            config,
        )
    }

    fn from_parts(
        listener: Listener,
        local_addr: SocketAddr,
        address: Address,
        config: ServerConfig,
    ) -> Result<Server> {
        let unix_listener = match &listener {
            Listener::Unix(l) => Some(
                l.try_clone()
                    .map_err(|e| Error::io("duplicating the listener", e))?,
            ),
            Listener::Tcp(_) => None,
        };
        let policy = Policy {
            lease_timeout: config.lease_timeout,
            max_deliveries: config.max_deliveries,
            no_code_items: config.no_code_items,
            max_memory: config.max_memory,
        };
        let queues = match &config.journal {
            Some(jc) => {
                let (journal, recovered) = Journal::open(jc.clone())?;
                QueueMap::with_journal(policy, Arc::new(journal), recovered)?
            }
            None => QueueMap::with_policy(policy),
        };
        Ok(Server {
            listener,
            socket_file: None,
            shared: Arc::new(Shared {
                config,
                queues,
                handshaking: Mutex::new(std::collections::BTreeMap::new()),
                local_addr,
                address,
                stopping: AtomicBool::new(false),
                drained: AtomicBool::new(false),
                next_conn: AtomicU64::new(0),
                connections: AtomicUsize::new(0),
                live: Mutex::new(HashMap::new()),
                unix_listener,
            }),
        })
    }

    /// The bound address (with the real port when bound to port 0); `0.0.0.0:0` for a
    /// Unix socket (see [`Server::address`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// What the server listens on: the bound `IP:PORT`, or the Unix socket's path.
    pub fn address(&self) -> &Address {
        &self.shared.address
    }

    /// Declares queue `name` with a bound (0: unbounded) before clients arrive, as
    /// `distq-server --queue NAME:MAXSIZE` does; an existing queue gets the new bound.
    ///
    /// # Errors
    /// [`Error::Value`] past the limit of named queues; [`Error::Io`] when the journal
    /// cannot record the new queue.
    pub fn declare(&self, name: &str, maxsize: usize) -> Result<()> {
        self.shared.queues.declare(name, maxsize).map(drop)
    }

    /// The server's queues, for the crate's own tests and benches.
    #[cfg(feature = "internals")]
    pub fn queues(&self) -> &QueueMap {
        &self.shared.queues
    }

    /// A handle that can shut the server down from another thread.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs [`Server::run`] on a background thread.
    pub fn spawn(self) -> Result<RunningServer> {
        let handle = self.handle();
        let thread = thread::Builder::new()
            .name("distq-accept".into())
            .spawn(move || self.run())
            .map_err(|e| Error::io("starting the server thread", e))?;
        Ok(RunningServer { handle, thread })
    }

    /// Accepts and serves connections until a client calls `shutdown` or
    /// [`ServerHandle::shutdown`] is called; then joins every connection thread.
    pub fn run(self) -> Result<()> {
        log_at!(Info, "listening on {}", self.shared.address);
        let janitor = {
            let shared = self.shared.clone();
            thread::Builder::new()
                .name("distq-janitor".into())
                .spawn(move || shared.expire_leases())
                .map_err(|e| Error::io("starting the lease janitor", e))?
        };
        let flusher = match self.shared.queues.journal() {
            Some(journal) => {
                let (shared, journal) = (self.shared.clone(), journal.clone());
                Some(
                    thread::Builder::new()
                        .name("distq-journal".into())
                        .spawn(move || shared.flush_journal(&journal))
                        .map_err(|e| Error::io("starting the journal flusher", e))?,
                )
            }
            None => None,
        };
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        loop {
            // Take a permit before `accept`: at the connection limit a new peer waits in
            // the listen backlog until a connection closes, instead of being accepted and
            // closed. Pending handshakes do not hold a permit for long: an arrival sheds
            // the oldest of them, so accepting stays open while any is pending.
            loop {
                threads.retain(|t| !t.is_finished());
                let pending = self.shared.handshaking.lock().map_or(0, |h| h.len());
                if threads.len() < self.shared.config.max_connections
                    || pending > 0
                    || self.shared.stopping.load(Ordering::SeqCst)
                {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            let incoming = self.listener.accept();
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match incoming {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    log_at!(Warn, "accept failed: {e}");
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            threads.retain(|t| !t.is_finished());
            // A second handle on the socket: shutdown uses it to wake the connection's
            // thread, and a blocked `get` to check that the peer is still there.
            let handle = match stream.try_clone() {
                Ok(h) => Arc::new(h),
                Err(e) => {
                    log_at!(
                        Warn,
                        "{}: refused, cannot duplicate its socket: {e}",
                        peer_name(&stream)
                    );
                    continue;
                }
            };
            let id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
            self.shared.admit_handshake(id, &stream, &handle);
            if let Ok(mut live) = self.shared.live.lock() {
                live.insert(id, handle.clone());
            }
            // A shutdown that ran between `accept` and the insert above did not see this
            // connection: it must not keep the server waiting for an idle peer.
            if self.shared.stopping.load(Ordering::SeqCst) {
                let _ = handle.shutdown(Shutdown::Read);
            }
            let shared = self.shared.clone();
            let spawned = thread::Builder::new()
                .name(format!("distq-conn-{id}"))
                .stack_size(512 * 1024)
                .spawn(move || {
                    shared.serve(stream, id, &handle);
                    if let Ok(mut live) = shared.live.lock() {
                        live.remove(&id);
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.shared.end_handshake(id);
                    if let Ok(mut live) = self.shared.live.lock() {
                        live.remove(&id);
                    }
                    log_at!(Warn, "cannot start a connection thread: {e}");
                }
            }
        }
        for t in threads {
            let _ = t.join();
        }
        // Woken rather than waited for: its sleep would add up to a slice to every stop.
        janitor.thread().unpark();
        let _ = janitor.join();
        // Only now: acks, takes and requeues appended while connections wound down are
        // buffered, and the flusher's last write must include them.
        self.shared.drained.store(true, Ordering::SeqCst);
        if let Some(flusher) = flusher {
            flusher.thread().unpark();
            let _ = flusher.join();
        }
        // A warning when items remain: they were kept or lost, and either is news.
        match self.shared.leftovers() {
            None => log_at!(
                Info,
                "server on {} stopped: no items queued or reserved",
                self.shared.address
            ),
            Some(left) => log_at!(Warn, "server on {} stopped: {left}", self.shared.address),
        }
        Ok(())
    }
}

/// Answers a request frame over the size limit without losing the connection: the
/// peer gets a `#TRACEBACK` naming the limit at once (a Python client raises it as
/// `RemoteError` once it has sent the rest), and the payload is read and dropped
/// (bounded, see [`Connection::discard_payload`]). If that is not possible in bounds,
/// the error ends the connection.
fn refuse_oversized(conn: &mut Connection, len: u64, max: usize) -> Result<()> {
    let e = Error::FrameTooLarge { len, max };
    log_at!(Warn, "{}: {e}", conn.peer());
    conn.write_reply(&Reply::traceback("OSError", &e.to_string()))?;
    conn.discard_payload(len)
}

fn peer_name(stream: &Stream) -> String {
    stream
        .peer()
        .map_or_else(|_| "unknown peer".to_string(), |a| a.to_string())
}

/// Binds a Unix socket at `path`, replacing a stale socket file: one that exists but
/// that nothing listens on (a server that died without removing it). Only a connect
/// tells a stale file from a live one, and only a socket file is ever removed.
fn listen_unix(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match net::bind_unix(path) {
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse && net::abstract_name(path).is_none() =>
        {
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket {
                return Err(e);
            }
            match net::connect_unix(path) {
                Err(c) if c.kind() == std::io::ErrorKind::ConnectionRefused => {
                    log_at!(
                        Info,
                        "{}: removing a stale socket file (nothing listens on it)",
                        path.display()
                    );
                    std::fs::remove_file(path)?;
                    net::bind_unix(path)
                }
                _ => Err(e),
            }
        }
        other => other,
    }
}

/// The socket file a Unix server created, removed on drop if it is still that file
/// (same device and inode): a later server that replaced it keeps its own.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    fn new(path: &Path) -> Option<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        if net::abstract_name(path).is_some() {
            return None; // an abstract name has no file, and goes with its socket
        }
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Shared {
    /// Records a pending handshake, shedding the oldest one from the same address past
    /// `max_handshakes_per_source`, and the oldest overall past `max_handshakes` (or at
    /// the connection limit): silent peers can delay a newcomer, never lock it out.
    fn admit_handshake(&self, id: u64, stream: &Stream, handle: &Arc<Stream>) {
        let ip = match stream {
            Stream::Tcp(s) => Some(
                s.peer_addr()
                    .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip()),
            ),
            Stream::Unix(_) => None,
        };
        let Ok(mut pending) = self.handshaking.lock() else {
            return;
        };
        let from_source = pending.values().filter(|(a, _)| *a == ip).count();
        let shed = if from_source >= self.config.max_handshakes_per_source {
            pending.iter().find(|(_, (a, _))| *a == ip).map(|(k, _)| *k)
        } else if pending.len() >= self.config.max_handshakes
            || self.live.lock().map_or(0, |l| l.len()) >= self.config.max_connections
        {
            pending.keys().next().copied()
        } else {
            None
        };
        let shed = shed.and_then(|k| pending.remove(&k));
        pending.insert(id, (ip, handle.clone()));
        let count = pending.len();
        drop(pending);
        if let Some((addr, old)) = shed {
            let _ = old.shutdown(Shutdown::Both);
            let addr = addr.map_or_else(|| "unix socket".to_string(), |ip| ip.to_string());
            log_at!(
                Warn,
                "{addr}: shed its oldest pending handshake ({count} pending; limits {} per address, {} in all)",
                self.config.max_handshakes_per_source,
                self.config.max_handshakes
            );
        }
    }

    /// What the server holds as it stops, and whether it survives: one clause for the
    /// journaled queues, one for the rest.
    fn leftovers(&self) -> Option<String> {
        let (mut kept, mut lost) = ((0, 0), (0, 0));
        for queue in self.queues.queues().unwrap_or_default() {
            let Ok(st) = queue.stats() else { continue };
            let tally = if queue.is_journaled() {
                &mut kept
            } else {
                &mut lost
            };
            tally.0 += st.size + st.delayed;
            tally.1 += st.reserved;
        }
        let items = |(queued, reserved): (usize, usize)| {
            format!("{queued} item(s) queued and {reserved} reserved but not acked")
        };
        Some(match (kept, lost) {
            ((0, 0), (0, 0)) => return None,
            ((0, 0), lost) if self.queues.journal().is_none() => {
                format!("{} are lost: the server keeps no journal", items(lost))
            }
            ((0, 0), lost) => format!("{} in anonymous queues are lost", items(lost)),
            (kept, (0, 0)) => format!(
                "{} are kept in the journal (reserved ones are delivered again after a restart)",
                items(kept)
            ),
            (kept, lost) => format!(
                "{} are kept in the journal (reserved ones are delivered again after a restart); \
                 {} in anonymous queues are lost",
                items(kept),
                items(lost)
            ),
        })
    }

    fn end_handshake(&self, id: u64) {
        if let Ok(mut pending) = self.handshaking.lock() {
            pending.remove(&id);
        }
    }

    /// Requeues expired leases and due delayed releases, ten times a second, until the
    /// server stops.
    fn expire_leases(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            thread::park_timeout(LIVENESS_SLICE);
            if let Err(e) = self.queues.expire() {
                log_at!(Error, "expiring leases: {e}");
            }
        }
    }

    /// Writes and syncs the journal every flush interval (see `journal.rs`), compacting
    /// when due, and once more after every connection thread has been joined so nothing
    /// buffered is left behind.
    fn flush_journal(&self, journal: &Journal) {
        loop {
            let stopping = self.drained.load(Ordering::SeqCst);
            if let Err(e) = journal.tick() {
                log_at!(Error, "journal: {e}");
            }
            if stopping {
                return;
            }
            thread::park_timeout(journal.flush_interval());
        }
    }

    fn serve(&self, stream: Stream, id: u64, handle: &Stream) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.serve_connection(stream, id, handle);
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn serve_connection(&self, stream: Stream, id: u64, handle: &Stream) {
        let peer = peer_name(&stream);
        let handshake = Connection::handshake(
            stream,
            Role::Server,
            &self.config.authkey,
            LegacyAuth::from_flag(self.config.legacy_auth),
            self.config.max_frame,
            self.config.handshake_timeout,
        );
        self.end_handshake(id);
        let mut conn = match handshake {
            Ok(conn) => conn,
            Err(e @ Error::AuthFailed(_)) => return log_at!(Warn, "{peer}: {e}"),
            Err(Error::Closed) => return log_at!(Debug, "{peer}: closed during the handshake"),
            Err(e) => return log_at!(Warn, "{peer}: handshake failed: {e}"),
        };
        // An authenticated peer that never sends its first request is idle too.
        let setup = conn
            .set_read_timeout(self.config.idle_timeout)
            .and_then(|()| conn.set_write_timeout(Some(self.config.write_timeout)));
        if let Err(e) = setup {
            return log_at!(Warn, "{peer}: {e}");
        }
        let req = match self.read_request(&mut conn) {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(Error::Timeout(_)) if self.config.idle_timeout.is_some() => {
                return log_at!(
                    Info,
                    "{peer}: sent no request for {:?} after authenticating; closed",
                    self.config.idle_timeout.unwrap_or_default()
                )
            }
            Err(e) => return log_at!(Warn, "{peer}: {e}"),
        };
        log_at!(
            Debug,
            "{peer}: {}({})",
            dispatch::shown(&req.method),
            req.args
                .iter()
                .map(|a| a.brief(60))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let result = match dispatch::public(&self.queues, &req, &self.connections) {
            Public::Reply(reply) => conn.write_reply(&reply),
            Public::AcceptConnection => {
                // Bounded: the argument is the client's, and a small shared graph can
                // render to gigabytes.
                let name = req.args.first().map(|v| v.brief(100)).unwrap_or_default();
                log_at!(Info, "{peer}: method channel opened by {name}");
                conn.write_reply(&Reply::Return(Value::None))
                    .and_then(|()| self.serve_methods(&mut conn, id, handle))
            }
            Public::Shutdown => {
                log_at!(Info, "{peer}: asked the server to shut down");
                // Python's server answers shutdown twice; Python clients read only one.
                let sent = conn
                    .write_reply(&Reply::Return(Value::None))
                    .and_then(|()| conn.write_reply(&Reply::Return(Value::None)));
                self.shutdown();
                sent
            }
        };
        match result {
            Ok(()) | Err(Error::Closed) => {}
            Err(e) => log_at!(Warn, "{peer}: {e}"),
        }
    }

    /// Reads and parses one request. `Ok(None)` means the peer hung up or the request was
    /// malformed and has been answered with a `#TRACEBACK`; framing errors are `Err` and
    /// end the connection, because the stream can no longer be trusted to be in step.
    fn read_request(&self, conn: &mut Connection) -> Result<Option<Request>> {
        match conn.read_frame() {
            Ok(()) => {}
            Err(Error::Closed) => return Ok(None),
            Err(Error::FrameTooLarge { len, max }) => {
                refuse_oversized(conn, len, max)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        match conn.parse_request() {
            Ok(req) => Ok(Some(req)),
            Err(e) => {
                log_at!(Warn, "{}: bad request: {e}", conn.peer());
                let class = conn.bad_request_class();
                conn.write_reply(&Reply::traceback(class, &e.to_string()))?;
                Ok(None)
            }
        }
    }

    /// The method channel: requests on queues until the peer hangs up. A malformed
    /// request is answered with a `#TRACEBACK` and the loop goes on, as in Python.
    /// However the channel ends, the leases it holds go back to their queues.
    fn serve_methods(&self, conn: &mut Connection, id: u64, handle: &Stream) -> Result<()> {
        conn.set_read_timeout(self.config.idle_timeout)?;
        let peer = conn.peer();
        let alive = || crate::conn::peer_alive(handle);
        let session = dispatch::Session::new(id, &alive, &self.connections);
        let result = self.method_loop(conn, &session);
        if session.has_leases.get() {
            match self.queues.release_owner(id) {
                Ok(0) => {}
                Ok(n) => log_at!(Info, "{peer}: closed holding {n} lease(s); items requeued"),
                Err(e) => log_at!(Error, "{peer}: releasing leases: {e}"),
            }
        }
        match result {
            Err(Error::Timeout(_)) if self.config.idle_timeout.is_some() => {
                log_at!(
                    Info,
                    "{peer}: idle for {:?}; closed",
                    self.config.idle_timeout.unwrap_or_default()
                );
                Ok(())
            }
            other => other,
        }
    }

    fn method_loop(&self, conn: &mut Connection, session: &dispatch::Session<'_>) -> Result<()> {
        loop {
            match conn.read_frame() {
                Ok(()) => {}
                Err(Error::Closed) => return Ok(()),
                Err(Error::FrameTooLarge { len, max }) => {
                    refuse_oversized(conn, len, max)?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let started = Instant::now();
            let outcome = match conn.parse_request() {
                Ok(mut req) => {
                    log_at!(
                        Debug,
                        "{}: {}.{}",
                        conn.peer(),
                        req.ident
                            .as_deref()
                            .map_or_else(|| "-".into(), dispatch::shown),
                        dispatch::shown(&req.method)
                    );
                    dispatch::method(&self.queues, &mut req, session)
                }
                Err(e) => {
                    log_at!(Warn, "{}: bad request: {e}", conn.peer());
                    let reply = Reply::traceback(conn.bad_request_class(), &e.to_string());
                    conn.write_reply(&reply)?;
                    continue;
                }
            };
            if outcome.hang_up {
                return Ok(());
            }
            // Items taken off a queue go back to its head unless the reply reaches the
            // peer: checked just before sending if the call waited at all (a worker killed
            // while its get waited is noticed here; a get answered at once comes from a
            // peer that has just written, so the three syscalls of the check are skipped
            // on that hot path), and always if the send itself fails.
            let waited = started.elapsed() >= Duration::from_millis(1);
            if outcome.taken_from.is_some() && waited && !(session.alive)() {
                outcome.undo()?;
                return Err(Error::Closed);
            }
            if let Err(e) = conn.write_reply(&outcome.reply) {
                outcome.undo()?;
                return Err(e);
            }
            if outcome.taken_from.is_some() {
                outcome.delivered(&self.queues);
            }
        }
    }

    fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.queues.close_all();
        // Shut down only the reading side: a thread blocked waiting for a request wakes
        // up with end-of-stream, while one that is just sending a reply (say, to the
        // `put` whose result made the master decide to stop) still gets it out.
        if let Ok(live) = self.live.lock() {
            for stream in live.values() {
                let _ = stream.shutdown(Shutdown::Read);
            }
        }
        // Wake the accept loop: it checks the flag after each accepted connection.
        if let Some(listener) = &self.unix_listener {
            if net::wake_listener(listener).is_err() {
                if let Address::Unix(path) = &self.address {
                    let _ = net::connect_unix(path);
                }
            }
            return;
        }
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => [127, 0, 0, 1].into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
    }
}

impl ServerHandle {
    /// Stops the server: wakes every blocked caller with an error, closes every
    /// connection, and makes [`Server::run`] return once its threads are joined.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }

    /// The server's queues, for the crate's own tests and benches.
    #[cfg(feature = "internals")]
    pub fn queues(&self) -> &QueueMap {
        &self.shared.queues
    }

    /// Connections being served now, for the crate's own tests.
    #[cfg(feature = "internals")]
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The bound address (`0.0.0.0:0` for a Unix socket).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// What the server listens on: the bound `IP:PORT`, or the Unix socket's path.
    pub fn address(&self) -> &Address {
        &self.shared.address
    }
}

impl RunningServer {
    /// A handle on the running server.
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// The bound address (`0.0.0.0:0` for a Unix socket).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// What the server listens on: the bound `IP:PORT`, or the Unix socket's path.
    pub fn address(&self) -> &Address {
        self.handle.address()
    }

    /// Shuts the server down and waits until every thread has finished.
    pub fn shutdown(self) -> Result<()> {
        self.handle.shutdown();
        self.join()
    }

    /// Waits until the server stops (a client called `shutdown`).
    pub fn join(self) -> Result<()> {
        self.thread
            .join()
            .map_err(|_| Error::Internal("the server thread panicked".into()))?
    }
}
