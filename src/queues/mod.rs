//! The queue map: named FIFO queues with Python `queue.Queue` semantics. No I/O here.
//!
//! [`QueueMap`] finds queues by name and by ident and keeps Python's reference counts;
//! [`Queue`] (in `queue.rs`) holds the items and the blocking semantics; `packed.rs` is
//! the compact item store; `event.rs` is all that queues tell durability (the journal,
//! through the [`EventSink`] trait). No lock in this module is ever held while a socket is
//! touched: callers get items back and encode and send them after every guard is dropped;
//! the liveness callback a blocked waiter calls runs with the queue lock released.

mod budget;
mod event;
mod holds;
mod packed;
mod queue;

pub use event::{Event, EventSink};
pub use packed::Taken;
/// What the queue's methods return, named for the crate's own tests and benches.
#[cfg(feature = "internals")]
pub use queue::{Counts, Reserved};
pub use queue::{Queue, QueueStats, LIVENESS_SLICE};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::journal::{Journal, Recovered, RecoveredQueue};
use crate::log::log_at;
use crate::{Error, Result};

/// How long a blocking queue operation may wait.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Wait {
    /// Fail at once (`block=False`, `get_nowait`).
    No,
    /// Wait at most this long (`timeout=secs`).
    For(Duration),
    /// Wait until it succeeds, the server shuts down or the peer leaves (`timeout=None`).
    Forever,
}

impl Wait {
    fn deadline(self) -> Option<Instant> {
        match self {
            Wait::No => Some(Instant::now()),
            // A timeout too large to add to `now` is as good as forever.
            Wait::For(d) => Instant::now().checked_add(d),
            Wait::Forever => None,
        }
    }
}

/// A liveness callback for callers with no peer to lose (tests, benches).
#[cfg(any(test, feature = "internals"))]
pub fn always_alive() -> bool {
    true
}

/// Delivery rules shared by every queue of a server.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Policy {
    /// Default lease time for `reserve` (`None`: leases never expire on their own).
    pub lease_timeout: Option<Duration>,
    /// After this many leased deliveries an item that comes back goes to `NAME.dead`
    /// instead of its queue (0: never).
    pub max_deliveries: u32,
    /// Refuse items whose pickle references any global (`--no-code-items`).
    pub no_code_items: bool,
    /// The most bytes of stored items, server-wide (`--max-memory`; `None`: no limit).
    pub max_memory: Option<u64>,
}

/// A poisoned lock means a thread panicked while holding it; the queue's invariants may
/// be broken, so report it instead of serving possibly corrupt state.
fn poisoned() -> Error {
    Error::Internal("a queue lock was poisoned by a panicking thread".into())
}

/// The most named queues one server holds; creating a new name beyond it fails, so a
/// client cannot grow the server without bound by inventing names.
pub const MAX_QUEUES: usize = 4096;

/// The most anonymous (`SyncManager().Queue()`) queues alive at once, counted apart from
/// named ones: filling this table never stops `create('get_task_queue')`.
pub const MAX_ANONYMOUS_QUEUES: usize = 1024;

/// The queue that items of `queue` go to once they have used up their deliveries.
fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// A queue and the number of client references Python's refcounting protocol holds on it.
#[derive(Debug)]
struct Entry {
    queue: Arc<Queue>,
    refcount: u64,
    /// Made by a `Queue()` factory call: no name, freed when its refcount reaches zero.
    anonymous: bool,
}

#[derive(Debug, Default)]
struct Registry {
    by_name: HashMap<String, String>,
    by_ident: HashMap<String, Entry>,
    /// How many of `by_ident` are anonymous.
    anonymous: usize,
}

/// All queues of one server, by name and by ident.
///
/// Two kinds of queue live here. **Named** queues (the classic
/// `register('get_task_queue')` style) live as long as the server: Python forgets an
/// object when its refcount drops to zero, but a named queue may still hold items nobody
/// has fetched yet, and losing them silently is exactly what distq exists to avoid. So
/// their refcounts are tracked (clients and `number_of_objects` see Python's numbers) but
/// never free them. **Anonymous** queues (`SyncManager().Queue()`) follow Python exactly:
/// each `create` makes a new one, and it is freed when its refcount reaches zero.
///
/// # Example
/// ```
/// use distq::pickle::Fragment;
/// use distq::queues::{always_alive, QueueMap, Wait};
/// use distq::Value;
/// let map = QueueMap::new();
/// let q = map.create("get_task_queue")?;
/// q.put(Fragment::encode(&Value::from(7))?, Wait::No, &always_alive)?;
/// assert_eq!(q.get(Wait::No, &always_alive)?.item.decode()?, Value::from(7));
/// # Ok::<(), distq::Error>(())
/// ```
/// What [`QueueMap::stats`] reports (`dispatch` renders it as the `stats()` dict).
#[derive(Debug)]
pub struct MapStats {
    /// Each queue's statistics, by name.
    pub queues: Vec<(String, QueueStats)>,
    /// The bytes stored items hold, against `memory_limit`.
    pub memory_used: u64,
    /// `--max-memory`, if set.
    pub memory_limit: Option<u64>,
    /// Since the map was created.
    pub uptime: Duration,
}

#[derive(Debug, Default)]
pub struct QueueMap {
    registry: Mutex<Registry>,
    next_ident: AtomicU64,
    policy: Policy,
    started: Option<Instant>,
    /// The server's journal, if it keeps one (for its flusher and shutdown).
    journal: Option<Arc<Journal>>,
    /// Where named queues send their events: the journal, or a test's recorder.
    sink: Option<Arc<dyn EventSink>>,
    /// Anonymous queues kept alive by stored items that carry their proxies.
    holds: holds::ProxyHolds,
    /// The bytes of every queue's items, against `policy.max_memory`.
    budget: Arc<budget::Budget>,
}

impl QueueMap {
    /// An empty map with the default policy (no lease expiry, no dead-lettering).
    #[cfg(any(test, feature = "internals"))]
    pub fn new() -> QueueMap {
        QueueMap::with_policy(Policy::default())
    }

    /// The delivery rules of this map's queues.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// An empty map whose queues follow `policy`.
    pub fn with_policy(policy: Policy) -> QueueMap {
        QueueMap {
            policy,
            started: Some(Instant::now()),
            budget: Arc::new(budget::Budget::new(policy.max_memory)),
            ..QueueMap::default()
        }
    }

    /// An empty map whose named queues record every mutation in `journal`, loaded with
    /// the queues recovered from it.
    pub fn with_journal(
        policy: Policy,
        journal: Arc<Journal>,
        recovered: Vec<RecoveredQueue>,
    ) -> Result<QueueMap> {
        Ok(QueueMap {
            journal: Some(journal.clone()),
            ..QueueMap::with_sink(policy, journal, recovered)?
        })
    }

    /// An empty map whose named queues send their events to `sink`, loaded with
    /// `recovered` (which `sink` is told are waiting again, see `Queue::restore`).
    pub fn with_sink(
        policy: Policy,
        sink: Arc<dyn EventSink>,
        recovered: Vec<RecoveredQueue>,
    ) -> Result<QueueMap> {
        let map = QueueMap {
            sink: Some(sink),
            ..QueueMap::with_policy(policy)
        };
        let restore = |r: Vec<Recovered>| -> Vec<Taken> {
            r.into_iter()
                .map(|r| Taken {
                    item: r.item,
                    deliveries: r.deliveries,
                    id: r.id,
                })
                .collect()
        };
        for q in recovered {
            let (reserved, ready) = (q.reserved.len(), q.ready.len());
            if reserved + ready > 0 {
                log_at!(
                    Info,
                    "journal: queue {:?} recovered with {ready} waiting item(s) and {reserved} formerly reserved",
                    q.name
                );
            }
            map.lookup_or_insert(&q.name, 0)?
                .restore(restore(q.reserved), restore(q.ready))?;
        }
        Ok(map)
    }

    /// The journal, if the server keeps one.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// Every queue's statistics, by name, the memory budget and the time since the map
    /// was created.
    pub fn stats(&self) -> Result<MapStats> {
        let queues = self
            .queues()?
            .into_iter()
            .map(|q| Ok((q.name().to_string(), q.stats()?)))
            .collect::<Result<_>>()?;
        Ok(MapStats {
            queues,
            memory_used: self.budget.used(),
            memory_limit: self.budget.limit(),
            uptime: self.started.map_or(Duration::ZERO, |t| t.elapsed()),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Registry>> {
        self.registry.lock().map_err(|_| poisoned())
    }

    /// Declares a queue with a bound before any client asks for it (`--queue NAME:MAXSIZE`).
    /// Changes the bound if the queue already exists.
    pub fn declare(&self, name: &str, maxsize: usize) -> Result<Arc<Queue>> {
        let queue = self.lookup_or_insert(name, maxsize)?;
        queue.set_maxsize(maxsize)?;
        Ok(queue)
    }

    fn lookup_or_insert(&self, name: &str, maxsize: usize) -> Result<Arc<Queue>> {
        self.lookup_or_insert_with(name, maxsize, true)
    }

    fn lookup_or_insert_with(
        &self,
        name: &str,
        maxsize: usize,
        bounded: bool,
    ) -> Result<Arc<Queue>> {
        let mut reg = self.lock()?;
        if let Some(ident) = reg.by_name.get(name) {
            if let Some(entry) = reg.by_ident.get(ident) {
                return Ok(entry.queue.clone());
            }
        }
        let queue = self.insert(&mut reg, name, maxsize, false, bounded)?;
        reg.by_name
            .insert(name.to_string(), queue.ident().to_string());
        Ok(queue)
    }

    fn insert(
        &self,
        reg: &mut Registry,
        name: &str,
        maxsize: usize,
        anonymous: bool,
        bounded: bool,
    ) -> Result<Arc<Queue>> {
        if bounded && anonymous && reg.anonymous >= MAX_ANONYMOUS_QUEUES {
            return Err(Error::Value(format!(
                "too many anonymous queues (limit {MAX_ANONYMOUS_QUEUES}); drop Queue() proxies you no longer use"
            )));
        }
        if bounded && !anonymous && reg.by_ident.len() - reg.anonymous >= MAX_QUEUES {
            return Err(Error::Value(format!(
                "too many named queues (limit {MAX_QUEUES}); reuse existing queues"
            )));
        }
        reg.anonymous += usize::from(anonymous);
        // Idents look like Python's `'%x' % id(obj)` (12 lowercase hex digits) so that
        // tools printing them see the familiar shape; they are opaque to clients.
        let n = self.next_ident.fetch_add(1, Ordering::Relaxed);
        let ident = format!("{:x}", 0xd157_0000_0000u64 + n * 0x10);
        // Anonymous queues (`SyncManager().Queue()`) die with their proxies anyway, so
        // only named queues have a sink.
        let events = match (&self.sink, anonymous) {
            (Some(sink), false) => Some(event::QueueSink::declare(sink, name)?),
            _ => None,
        };
        let queue = Arc::new(Queue::new(
            name,
            ident.clone(),
            maxsize,
            self.policy,
            events,
            self.budget.clone(),
        ));
        reg.by_ident.insert(
            ident,
            Entry {
                queue: queue.clone(),
                refcount: u64::from(anonymous),
                anonymous,
            },
        );
        Ok(queue)
    }

    /// A new anonymous queue with one reference, as `SyncManager().Queue(maxsize)`
    /// creates: reachable only by its ident, freed when its refcount reaches zero.
    pub fn create_anonymous(&self, typeid: &str, maxsize: usize) -> Result<Arc<Queue>> {
        let mut reg = self.lock()?;
        self.insert(&mut reg, &format!("<{typeid}>"), maxsize, true, true)
    }

    /// Python's `create(typeid)`: the queue named `name` (created unbounded on first use),
    /// with one more reference.
    pub fn create(&self, name: &str) -> Result<Arc<Queue>> {
        let queue = self.lookup_or_insert(name, 0)?;
        self.incref(queue.ident())?;
        Ok(queue)
    }

    /// The queue with this ident, if any.
    pub fn by_ident(&self, ident: &str) -> Option<Arc<Queue>> {
        let reg = self.lock().ok()?;
        reg.by_ident.get(ident).map(|e| e.queue.clone())
    }

    /// Python's `incref(ident)`.
    ///
    /// # Errors
    /// Unknown ident (Python answers `KeyError` in a `#TRACEBACK`).
    pub fn incref(&self, ident: &str) -> Result<()> {
        let mut reg = self.lock()?;
        let entry = reg
            .by_ident
            .get_mut(ident)
            .ok_or_else(|| Error::Value(format!("KeyError: {ident:?}")))?;
        entry.refcount += 1;
        Ok(())
    }

    /// Python's `decref(ident)`. The queue itself survives a count of zero (see the type docs).
    ///
    /// # Errors
    /// Unknown ident, or a decref below zero (Python raises `KeyError` for both).
    pub fn decref(&self, ident: &str) -> Result<()> {
        let mut reg = self.lock()?;
        let freed = match reg.by_ident.get_mut(ident) {
            Some(entry) if entry.refcount > 0 => {
                entry.refcount -= 1;
                entry.refcount == 0 && entry.anonymous
            }
            _ => return Err(Error::Value(format!("KeyError: {ident:?}"))),
        };
        if freed {
            // Its memory goes when the last in-flight call on it returns its `Arc`.
            reg.by_ident.remove(ident);
            reg.anonymous -= 1;
        }
        Ok(())
    }

    /// An item carrying proxies of our anonymous queues was stored: each such queue is
    /// kept alive until the item has left (see `holds.rs`). Call it after a successful
    /// put, before its reply, for items that name a class or function.
    pub fn hold_proxies(&self, item: &crate::pickle::Fragment) {
        self.holds.hold(item, |ident| {
            let Ok(mut reg) = self.lock() else {
                return false;
            };
            match reg.by_ident.get_mut(ident) {
                Some(entry) if entry.anonymous => {
                    entry.refcount += 1;
                    true
                }
                _ => false,
            }
        });
    }

    /// An item left the server for good (its `get` reply was sent, or its lease was
    /// acked): the queues it kept alive are let go after [`holds::GRACE`].
    pub fn delivered(&self, item: &crate::pickle::Fragment) {
        self.holds.delivered(item);
    }

    /// Python's `number_of_objects()`: idents that some client holds a reference to.
    pub fn number_of_objects(&self) -> Result<usize> {
        Ok(self
            .lock()?
            .by_ident
            .values()
            .filter(|e| e.refcount > 0)
            .count())
    }

    /// Python's `debug_info()`: one paragraph per referenced object.
    pub fn debug_info(&self) -> Result<String> {
        let reg = self.lock()?;
        let mut idents: Vec<_> = reg
            .by_ident
            .iter()
            .filter(|(_, e)| e.refcount > 0)
            .collect();
        idents.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = String::new();
        for (ident, e) in idents {
            let len = e.queue.len().unwrap_or(0);
            let _ = writeln!(
                out,
                "  {ident}:       refcount={}\n    <distq queue {:?}, {len} items>",
                e.refcount,
                e.queue.name()
            );
        }
        Ok(out)
    }

    /// Every queue, sorted by name (for logs and stats).
    pub fn queues(&self) -> Result<Vec<Arc<Queue>>> {
        let mut all: Vec<_> = self
            .lock()?
            .by_ident
            .values()
            .map(|e| e.queue.clone())
            .collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(all)
    }

    /// Moves items that used up their deliveries on `from` to the queue `NAME.dead`.
    fn dead_letter(&self, from: &Queue, items: Vec<Taken>) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let name = dead_letter_queue(from.name());
        log_at!(
            Warn,
            "{} item(s) on {:?} failed {} deliveries; moved to {name:?}",
            items.len(),
            from.name(),
            self.policy.max_deliveries
        );
        // Exempt from the queue limit: a lease's item must end up somewhere, and there is
        // at most one dead-letter queue per named queue.
        self.lookup_or_insert_with(&name, 0, false)?
            .push_dead(items)
    }

    /// Puts `item` on the queue named `target` and then acks `lease` on `queue`: a
    /// worker's "here is the result, the task is done" in one round trip. The lease is
    /// checked first, so a worker whose lease is gone (its connection dropped, the lease
    /// expired, or the server restarted since it took the task) stores nothing: a result
    /// is never delivered for a task this server has already given to someone else.
    ///
    /// # Errors
    /// [`Error::Value`] for an unknown lease (nothing stored), or if the lease ended while
    /// the put waited for room (then the item *was* stored and the task requeued, and the
    /// message says so).
    pub fn ack_put(
        &self,
        queue: &Queue,
        lease: u64,
        target: &str,
        item: crate::pickle::Fragment,
        wait: Wait,
        alive: &dyn Fn() -> bool,
    ) -> Result<()> {
        queue.check_lease(lease)?;
        self.lookup_or_insert(target, 0)?.put(item, wait, alive)?;
        let done = queue.ack(lease).map_err(|e| {
            Error::Value(format!(
                "the item was put on {target:?}, but the lease ended while the put waited for room, so the task was requeued and may run again ({e})"
            ))
        })?;
        self.delivered(&done.item);
        Ok(())
    }

    /// [`QueueMap::ack_put`] for a batch: every lease is checked first, so either every
    /// result is stored (then every lease acked) or, if one lease is not held, none is.
    ///
    /// # Errors
    /// [`Error::Value`] naming the first lease the queue does not hold (nothing stored),
    /// or one whose lease ended while the put waited (stored, task requeued).
    pub fn ack_put_many(
        &self,
        queue: &Queue,
        leases: &[u64],
        target: &str,
        items: Vec<crate::pickle::Fragment>,
        wait: Wait,
        alive: &dyn Fn() -> bool,
    ) -> Result<()> {
        for &lease in leases {
            queue.check_lease(lease)?;
        }
        self.lookup_or_insert(target, 0)?
            .put_many(items, wait, alive)?;
        let mut lost = None;
        for &lease in leases {
            match queue.ack(lease) {
                Ok(done) => self.delivered(&done.item),
                Err(e) => lost = lost.or(Some(e)),
            }
        }
        match lost {
            None => Ok(()),
            Some(e) => Err(Error::Value(format!(
                "the items were put on {target:?}, but a lease ended while the put waited for room, so its task was requeued and may run again ({e})"
            ))),
        }
    }

    /// Releases a lease on `queue` (see [`Queue::release`]), dead-lettering if due.
    pub fn release(&self, queue: &Queue, lease: u64, delay: Option<Duration>) -> Result<()> {
        let dead = queue.release(lease, delay)?;
        self.dead_letter(queue, dead.into_iter().collect())
    }

    /// Releases every lease held by connection `owner` on every queue (it closed).
    /// Returns how many items went back.
    ///
    /// # Errors
    /// The first error met; every queue is still visited, so one failure leaves no
    /// other lease of the owner held forever.
    pub fn release_owner(&self, owner: u64) -> Result<usize> {
        let mut released = 0;
        let mut first_error = None;
        for q in self.queues()? {
            let result = q
                .release_owner(owner)
                .and_then(|(dead, n)| self.dead_letter(&q, dead).map(|()| n));
            match result {
                Ok(n) => released += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(released), Err)
    }

    /// Requeues expired leases and due delayed releases on every queue. Returns how many
    /// leases expired.
    pub fn expire(&self) -> Result<usize> {
        let now = Instant::now();
        for ident in self.holds.take_due(now) {
            // Gone already only if a client decref'd more than it incref'd.
            let _ = self.decref(&ident);
        }
        let mut expired = 0;
        for q in self.queues()? {
            let (dead, n) = q.expire(now)?;
            if n > 0 {
                log_at!(
                    Info,
                    "{n} lease(s) on {:?} expired; items requeued",
                    q.name()
                );
            }
            expired += n;
            self.dead_letter(&q, dead)?;
        }
        Ok(expired)
    }

    /// Wakes every blocked caller on every queue with [`Error::Closed`] (server
    /// shutdown). Returns the number of items still out under a lease.
    pub fn close_all(&self) -> usize {
        self.queues()
            .map(|all| all.iter().map(|q| q.close()).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::Fragment;
    use crate::Value;
    use std::thread;

    fn item(v: impl Into<Value>) -> Fragment {
        Fragment::encode(&v.into()).unwrap()
    }

    const ALIVE: &dyn Fn() -> bool = &always_alive;

    fn put(q: &Queue, v: impl Into<Value>) {
        q.put(item(v), Wait::No, ALIVE).unwrap();
    }

    fn get(q: &Queue) -> Result<Fragment> {
        q.get(Wait::No, ALIVE).map(|t| t.item)
    }

    /// Waits (with a deadline) until `n` callers are blocked in a get on `q`.
    fn wait_getters(q: &Queue, n: usize) {
        let start = Instant::now();
        while q.stats().unwrap().waiting_getters != n {
            assert!(start.elapsed() < Duration::from_secs(10), "no waiter");
            thread::yield_now();
        }
    }

    #[test]
    fn fifo_order() {
        let q = QueueMap::new().create("q").unwrap();
        for i in 0..5 {
            put(&q, i);
        }
        let got: Vec<_> = (0..5).map(|_| get(&q).unwrap()).collect();
        assert_eq!(got, (0..5).map(item).collect::<Vec<_>>());
        assert!(matches!(get(&q), Err(Error::Empty)));
    }

    #[test]
    fn get_times_out_after_roughly_the_timeout() {
        let q = QueueMap::new().create("q").unwrap();
        let start = Instant::now();
        let r = q.get(Wait::For(Duration::from_millis(150)), ALIVE);
        assert!(matches!(r, Err(Error::Empty)));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(150),
            "returned early: {took:?}"
        );
    }

    #[test]
    fn blocked_get_is_woken_by_put() {
        let q = QueueMap::new().create("q").unwrap();
        let q2 = q.clone();
        let t = thread::spawn(move || q2.get(Wait::Forever, ALIVE).map(|t| t.item));
        wait_getters(&q, 1);
        put(&q, "x");
        assert_eq!(t.join().unwrap().unwrap(), item("x"));
    }

    #[test]
    fn a_waiter_whose_peer_left_stops_waiting_and_takes_nothing() {
        let q = QueueMap::new().create("q").unwrap();
        let gone = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (q2, gone2) = (q.clone(), gone.clone());
        let t = thread::spawn(move || {
            let alive = move || !gone2.load(std::sync::atomic::Ordering::SeqCst);
            q2.get(Wait::Forever, &alive)
        });
        wait_getters(&q, 1);
        gone.store(true, std::sync::atomic::Ordering::SeqCst);
        let start = Instant::now();
        assert!(matches!(t.join().unwrap(), Err(Error::Closed)));
        assert!(start.elapsed() < LIVENESS_SLICE * 3);
        put(&q, 1);
        assert_eq!(get(&q).unwrap(), item(1), "the item went to nobody");
    }

    #[test]
    fn bounded_queue_reports_full_and_unblocks() {
        let q = QueueMap::new().declare("b", 1).unwrap();
        put(&q, 1);
        assert!(q.is_full().unwrap());
        assert!(matches!(q.put(item(2), Wait::No, ALIVE), Err(Error::Full)));
        let q2 = q.clone();
        let t = thread::spawn(move || q2.put(item(2), Wait::Forever, ALIVE));
        thread::sleep(Duration::from_millis(50));
        assert_eq!(get(&q).unwrap(), item(1));
        t.join().unwrap().unwrap();
        assert_eq!(get(&q).unwrap(), item(2));
    }

    #[test]
    fn unget_goes_to_the_head_in_order_even_when_full() {
        let q = QueueMap::new().declare("b", 1).unwrap();
        put(&q, 3);
        let taken = |v: i64| Taken::new(item(v));
        q.unget(vec![taken(1), taken(2)]).unwrap();
        for v in 1..=3 {
            assert_eq!(get(&q).unwrap(), item(v));
        }
    }

    #[test]
    fn task_done_and_join() {
        let q = QueueMap::new().create("j").unwrap();
        put(&q, Value::None);
        put(&q, Value::None);
        let r = q.join(Wait::For(Duration::from_millis(20)), ALIVE);
        assert!(matches!(r, Err(Error::Timeout(_))));
        q.task_done().unwrap();
        q.task_done().unwrap();
        q.join(Wait::No, ALIVE).unwrap();
        assert!(q.task_done().is_err());
    }

    #[test]
    fn close_wakes_waiters() {
        let map = QueueMap::new();
        let q = map.create("c").unwrap();
        let q2 = q.clone();
        let t = thread::spawn(move || q2.get(Wait::Forever, ALIVE).map(drop));
        wait_getters(&q, 1);
        map.close_all();
        assert!(matches!(t.join().unwrap(), Err(Error::Closed)));
    }

    #[test]
    fn refcounts_follow_python() {
        let map = QueueMap::new();
        let q = map.create("r").unwrap();
        assert_eq!(map.number_of_objects().unwrap(), 1);
        map.incref(q.ident()).unwrap();
        map.decref(q.ident()).unwrap();
        map.decref(q.ident()).unwrap();
        assert_eq!(map.number_of_objects().unwrap(), 0);
        assert!(map.decref(q.ident()).is_err());
        assert!(map.incref("nope").is_err());
        // The queue itself survives and keeps its ident.
        assert_eq!(map.create("r").unwrap().ident(), q.ident());
    }

    fn memory_used(map: &QueueMap) -> i64 {
        map.stats().unwrap().memory_used as i64
    }

    #[test]
    fn the_memory_budget_refuses_puts_and_every_way_out_frees_it() {
        let map = QueueMap::with_policy(Policy {
            max_memory: Some(1000),
            ..Policy::default()
        });
        let a = map.create("a").unwrap();
        let b = map.create("b").unwrap();
        let blob = |n: usize| item(Value::Bytes(vec![7u8; n].into()));
        a.put(blob(600), Wait::No, ALIVE).unwrap();
        let used = memory_used(&map);
        assert!(used > 600 && used < 700, "{used}");
        match b.put(blob(600), Wait::No, ALIVE) {
            Err(Error::MemoryFull { limit: 1000 }) => {}
            other => panic!("over the budget: {other:?}"),
        }
        assert!(matches!(
            b.put(blob(2000), Wait::Forever, ALIVE),
            Err(Error::Value(msg)) if msg.contains("can never fit")
        ));
        // A blocked put on one queue goes in once a get on another frees the memory.
        thread::scope(|s| {
            let waiting = s.spawn(|| b.put(blob(600), Wait::For(Duration::from_secs(10)), ALIVE));
            a.get(Wait::No, ALIVE).unwrap();
            waiting.join().unwrap().unwrap();
        });
        // Reserved items still count; an ack frees them; an undelivered reply (unget)
        // counts again; a cleared queue frees its items.
        let r = b.reserve(1, None, Wait::No, ALIVE).unwrap();
        assert!(memory_used(&map) > 600);
        b.ack(r.lease).unwrap();
        assert_eq!(memory_used(&map), 0);
        a.put(blob(100), Wait::No, ALIVE).unwrap();
        let taken = a.get(Wait::No, ALIVE).unwrap();
        assert_eq!(memory_used(&map), 0);
        a.unget(vec![taken]).unwrap();
        assert!(memory_used(&map) > 100);
        a.shutdown(true).unwrap();
        assert_eq!(memory_used(&map), 0);
        // A freed anonymous queue gives its items' memory back.
        let anon = map.create_anonymous("Queue", 0).unwrap();
        anon.put(blob(300), Wait::No, ALIVE).unwrap();
        let ident = anon.ident().to_string();
        drop(anon);
        map.decref(&ident).unwrap();
        assert_eq!(memory_used(&map), 0);
    }

    /// What Python's `BaseProxy.__reduce__` pickles for a `Queue()` proxy with `ident`.
    fn proxy_of(ident: &str) -> Value {
        use crate::pickle::{Construct, Global, Object};
        let global = |name: &str| {
            Value::Global(Arc::new(Global {
                module: "multiprocessing.managers".into(),
                name: name.into(),
            }))
        };
        let token = Value::Object(Arc::new(Object {
            construct: Construct::NewObj,
            callable: global("Token"),
            args: Value::tuple(vec![]),
            state: Some(Value::tuple(vec![
                Value::str("Queue"),
                Value::tuple(vec![Value::str("127.0.0.1"), Value::Int(5000)]),
                Value::str(ident),
            ])),
        }));
        Value::Object(Arc::new(Object {
            construct: Construct::Reduce,
            callable: global("RebuildProxy"),
            args: Value::tuple(vec![
                global("AutoProxy"),
                token,
                Value::str("pickle"),
                Value::dict(vec![]),
            ]),
            state: None,
        }))
    }

    #[test]
    fn an_item_carrying_a_queue_proxy_keeps_the_queue_until_delivered_and_grace() {
        let map = QueueMap::new();
        let reply = map.create_anonymous("Queue", 0).unwrap();
        let ident = reply.ident().to_string();
        let task = item(Value::tuple(vec![Value::str("job"), proxy_of(&ident)]));
        map.hold_proxies(&task);
        map.decref(&ident).unwrap(); // the producer drops its proxy
        assert!(
            map.by_ident(&ident).is_some(),
            "freed while an item refers to it"
        );
        map.delivered(&task);
        map.expire().unwrap();
        assert!(
            map.by_ident(&ident).is_some(),
            "freed before the receiver could incref"
        );
        let later = Instant::now() + holds::GRACE + Duration::from_secs(1);
        for due in map.holds.take_due(later) {
            map.decref(&due).unwrap();
        }
        assert!(
            map.by_ident(&ident).is_none(),
            "kept after its last holder left"
        );
        // An item naming no queue of ours, or none at all, holds nothing.
        let other = item(Value::tuple(vec![proxy_of("nope"), Value::from(1)]));
        map.hold_proxies(&other);
        map.delivered(&other);
        assert!(map.holds.take_due(later).is_empty());
    }

    #[test]
    fn anonymous_queues_are_fresh_and_freed_at_zero() {
        let map = QueueMap::new();
        let a = map.create_anonymous("Queue", 2).unwrap();
        let b = map.create_anonymous("Queue", 0).unwrap();
        assert_ne!(a.ident(), b.ident());
        assert_eq!(map.number_of_objects().unwrap(), 2);
        put(&a, 1);
        put(&a, 2);
        assert!(matches!(a.put(item(3), Wait::No, ALIVE), Err(Error::Full)));
        map.incref(a.ident()).unwrap();
        map.decref(a.ident()).unwrap();
        assert!(map.by_ident(a.ident()).is_some());
        map.decref(a.ident()).unwrap();
        assert!(map.by_ident(a.ident()).is_none(), "freed at zero");
        assert!(map.incref(a.ident()).is_err());
        assert_eq!(map.number_of_objects().unwrap(), 1);
    }

    #[test]
    fn leases_ack_release_and_owner_loss() {
        let map = QueueMap::new();
        let q = map.create("l").unwrap();
        put(&q, 1);
        put(&q, 2);
        let a = q.reserve(7, None, Wait::No, ALIVE).unwrap();
        assert_eq!(a.item, item(1));
        assert_eq!((q.len().unwrap(), q.reserved().unwrap()), (1, 1));
        q.ack(a.lease).unwrap();
        assert!(q.ack(a.lease).is_err(), "a lease is acked once");
        let b = q.reserve(7, None, Wait::No, ALIVE).unwrap();
        map.release(&q, b.lease, None).unwrap();
        assert_eq!(
            get(&q).unwrap(),
            item(2),
            "released items go back to the head"
        );
        put(&q, 3);
        put(&q, 4);
        let c = q.reserve(8, None, Wait::No, ALIVE).unwrap();
        let _d = q.reserve(8, None, Wait::No, ALIVE).unwrap();
        assert_eq!(map.release_owner(8).unwrap(), 2);
        assert!(q.ack(c.lease).is_err());
        assert_eq!(
            get(&q).unwrap(),
            item(3),
            "owner loss keeps the original order"
        );
        assert_eq!(get(&q).unwrap(), item(4));
    }

    #[test]
    fn expired_and_delayed_items_come_back() {
        let map = QueueMap::with_policy(Policy {
            lease_timeout: Some(Duration::from_millis(50)),
            ..Policy::default()
        });
        let q = map.create("e").unwrap();
        put(&q, 1);
        let r = q.reserve(1, None, Wait::No, ALIVE).unwrap();
        assert_eq!(map.expire().unwrap(), 0);
        thread::sleep(Duration::from_millis(60));
        assert_eq!(map.expire().unwrap(), 1);
        assert!(q.ack(r.lease).is_err());
        let r = q.reserve(1, None, Wait::No, ALIVE).unwrap();
        q.touch(r.lease, Some(Duration::from_secs(60))).unwrap();
        thread::sleep(Duration::from_millis(60));
        assert_eq!(map.expire().unwrap(), 0, "touch extended the lease");
        map.release(&q, r.lease, Some(Duration::from_millis(50)))
            .unwrap();
        assert!(matches!(get(&q), Err(Error::Empty)), "delayed");
        thread::sleep(Duration::from_millis(60));
        map.expire().unwrap();
        assert_eq!(get(&q).unwrap(), item(1));
    }

    #[test]
    fn items_that_keep_failing_go_to_the_dead_letter_queue() {
        let map = QueueMap::with_policy(Policy {
            max_deliveries: 2,
            ..Policy::default()
        });
        let q = map.create("d").unwrap();
        put(&q, "poison");
        for _ in 0..2 {
            let r = q.reserve(1, None, Wait::No, ALIVE).unwrap();
            map.release(&q, r.lease, None).unwrap();
        }
        assert!(q.is_empty().unwrap());
        let dead = map.create("d.dead").unwrap();
        let t = dead.get(Wait::No, ALIVE).unwrap();
        assert_eq!((t.item, t.deliveries), (item("poison"), 2));
        q.join(Wait::No, ALIVE).unwrap();
        let c = q.stats().unwrap().counts;
        assert_eq!((c.puts, c.gets, c.requeues, c.dead_lettered), (1, 2, 1, 1));
    }

    #[test]
    fn a_delayed_release_still_dead_letters_and_shows_in_stats() {
        let map = QueueMap::with_policy(Policy {
            max_deliveries: 1,
            ..Policy::default()
        });
        let q = map.create("d").unwrap();
        put(&q, "once");
        put(&q, "later");
        let r = q.reserve(1, None, Wait::No, ALIVE).unwrap();
        map.release(&q, r.lease, Some(Duration::from_secs(60)))
            .unwrap();
        let dead = map.create("d.dead").unwrap();
        assert_eq!(
            get(&dead).unwrap(),
            item("once"),
            "max_deliveries=1 honoured"
        );
        // A delayed item that may still be retried is counted, and dropped by an
        // immediate shutdown.
        let map = QueueMap::new();
        let q = map.create("d").unwrap();
        put(&q, 1);
        let r = q.reserve(1, None, Wait::No, ALIVE).unwrap();
        map.release(&q, r.lease, Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(q.stats().unwrap().delayed, 1);
        q.shutdown(true).unwrap();
        assert_eq!(q.stats().unwrap().delayed, 0);
        q.join(Wait::No, ALIVE).unwrap();
    }

    #[test]
    fn anonymous_queues_cannot_crowd_out_named_ones() {
        let map = QueueMap::new();
        let mut anon = Vec::new();
        while let Ok(q) = map.create_anonymous("Queue", 0) {
            anon.push(q);
        }
        assert_eq!(anon.len(), MAX_ANONYMOUS_QUEUES);
        let q = map.create("get_task_queue").unwrap();
        put(&q, 1);
        map.decref(anon[0].ident()).unwrap();
        assert!(
            map.create_anonymous("Queue", 0).is_ok(),
            "room again once freed"
        );
    }

    #[test]
    fn dead_lettering_works_with_the_queue_table_full() {
        let map = QueueMap::with_policy(Policy {
            max_deliveries: 1,
            ..Policy::default()
        });
        let a = map.create("a").unwrap();
        let b = map.create("b").unwrap();
        put(&a, "x");
        put(&b, "y");
        a.reserve(9, None, Wait::No, ALIVE).unwrap();
        b.reserve(9, None, Wait::No, ALIVE).unwrap();
        let mut i = 0;
        while map.create(&format!("filler{i}")).is_ok() {
            i += 1;
        }
        assert_eq!(map.release_owner(9).unwrap(), 2);
        let got: Vec<Fragment> = ["a.dead", "b.dead"]
            .iter()
            .map(|n| get(&map.create(n).unwrap()).unwrap())
            .collect();
        assert_eq!(got, vec![item("x"), item("y")], "nothing vanished");
    }

    #[test]
    fn shutdown_drains_then_refuses() {
        let q = QueueMap::new().create("s").unwrap();
        put(&q, 1);
        let q2 = q.clone();
        q.shutdown(false).unwrap();
        assert!(matches!(
            q.put(item(2), Wait::No, ALIVE),
            Err(Error::ShutDown)
        ));
        assert_eq!(get(&q).unwrap(), item(1));
        let t = thread::spawn(move || q2.get(Wait::Forever, ALIVE).map(drop));
        assert!(matches!(t.join().unwrap(), Err(Error::ShutDown)));
        let q = QueueMap::new().create("s").unwrap();
        put(&q, 1);
        q.shutdown(true).unwrap();
        assert!(matches!(get(&q), Err(Error::ShutDown)));
        q.join(Wait::No, ALIVE).unwrap();
    }
}
