//! The queue map: named FIFO queues with Python `queue.Queue` semantics. No I/O here.
//!
//! Each queue owns its own `Mutex` and three `Condvar`s, exactly like CPython's
//! `queue.Queue` (`not_empty`, `not_full`, `all_tasks_done`). A getter blocked on one queue
//! therefore never contends with traffic on another queue, and the map's own lock is held
//! only for the hash lookup. No lock in this module is ever held while a socket is touched:
//! callers get a [`Value`] back and encode and send it after every guard is dropped.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::pickle::Fragment;
use crate::{Error, Result};

/// How long a blocking queue operation may wait.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Wait {
    /// Fail at once (`block=False`, `get_nowait`).
    No,
    /// Wait at most this long (`timeout=secs`).
    For(Duration),
    /// Wait until it succeeds or the server shuts down (`timeout=None`).
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

/// One named FIFO queue.
#[derive(Debug)]
pub struct Queue {
    name: String,
    ident: String,
    state: Mutex<State>,
    not_empty: Condvar,
    not_full: Condvar,
    all_done: Condvar,
}

#[derive(Debug)]
struct State {
    items: Packed,
    /// 0 means unbounded, as in `queue.Queue(maxsize=0)`.
    maxsize: usize,
    /// Items put but not yet marked done with `task_done` (for `join`).
    unfinished: u64,
    /// Set when the server shuts down: every waiter wakes up and fails.
    closed: bool,
}

/// Waits on `cv` until `ready` holds, the deadline passes, or the queue closes.
/// Returns the guard and whether `ready` holds. Recomputes the remaining time after each
/// wake-up, so spurious wake-ups never extend the wait.
fn wait_until<'a>(
    cv: &Condvar,
    mut guard: MutexGuard<'a, State>,
    deadline: Option<Instant>,
    ready: impl Fn(&State) -> bool,
) -> Result<(MutexGuard<'a, State>, bool)> {
    loop {
        if guard.closed {
            return Err(Error::Closed);
        }
        if ready(&guard) {
            return Ok((guard, true));
        }
        guard = match deadline {
            None => cv.wait(guard).map_err(|_| poisoned())?,
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Ok((guard, false));
                }
                cv.wait_timeout(guard, deadline - now)
                    .map_err(|_| poisoned())?
                    .0
            }
        };
    }
}

/// A poisoned lock means a thread panicked while holding it; the queue's invariants may
/// be broken, so report it instead of serving possibly corrupt state.
fn poisoned() -> Error {
    Error::Value("internal error: a queue lock was poisoned by a panicking thread".into())
}

impl Queue {
    fn new(name: &str, ident: String, maxsize: usize) -> Queue {
        Queue {
            name: name.to_string(),
            ident,
            state: Mutex::new(State {
                items: Packed::default(),
                maxsize,
                unfinished: 0,
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            all_done: Condvar::new(),
        }
    }

    /// The name clients use to find the queue (the typeid, e.g. `get_task_queue`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The opaque object id handed to clients in `create` replies.
    pub fn ident(&self) -> &str {
        &self.ident
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// Appends `item`, waiting for a free slot if the queue is bounded and full.
    ///
    /// # Errors
    /// [`Error::Full`] if no slot freed up in time; [`Error::Closed`] on shutdown.
    pub fn put(&self, item: Fragment, wait: Wait) -> Result<()> {
        self.put_many(vec![item], wait)
    }

    /// Appends all `items` at once, waiting until there is room for all of them: a batch
    /// is never split, so consumers see it contiguous and a `Full` error means none of it
    /// was queued.
    ///
    /// # Errors
    /// [`Error::Full`] if room did not free up in time; [`Error::Value`] if the batch is
    /// larger than the queue's bound and could never fit.
    pub fn put_many(&self, items: Vec<Fragment>, wait: Wait) -> Result<()> {
        let n = items.len();
        let guard = self.lock()?;
        if guard.maxsize > 0 && n > guard.maxsize {
            return Err(Error::Value(format!(
                "a batch of {n} items can never fit a queue bounded to {}",
                guard.maxsize
            )));
        }
        let (mut guard, ready) = wait_until(&self.not_full, guard, wait.deadline(), |s| {
            s.maxsize == 0 || s.items.len() + n <= s.maxsize
        })?;
        if !ready {
            return Err(Error::Full);
        }
        for item in &items {
            guard.items.push_back(item);
        }
        guard.unfinished += n as u64;
        drop(guard);
        if n == 1 {
            self.not_empty.notify_one();
        } else {
            self.not_empty.notify_all();
        }
        Ok(())
    }

    /// Removes and returns the oldest item, waiting for one if the queue is empty.
    ///
    /// # Errors
    /// [`Error::Empty`] if nothing arrived in time; [`Error::Closed`] on shutdown.
    pub fn get(&self, wait: Wait) -> Result<Fragment> {
        let mut items = self.get_many(1, wait)?;
        items.pop().ok_or(Error::Empty)
    }

    /// Waits like [`Queue::get`] for at least one item, then takes up to `max` of those
    /// waiting (never waiting for more).
    ///
    /// # Errors
    /// [`Error::Empty`] if nothing arrived in time; [`Error::Closed`] on shutdown.
    pub fn get_many(&self, max: usize, wait: Wait) -> Result<Vec<Fragment>> {
        let guard = self.lock()?;
        let (mut guard, ready) = wait_until(&self.not_empty, guard, wait.deadline(), |s| {
            !s.items.is_empty()
        })?;
        if !ready {
            return Err(Error::Empty);
        }
        let take = max.min(guard.items.len());
        let items: Vec<Fragment> = (0..take).filter_map(|_| guard.items.pop_front()).collect();
        guard.items.shrink_if_sparse();
        drop(guard);
        if items.len() == 1 {
            self.not_full.notify_one();
        } else {
            self.not_full.notify_all();
        }
        Ok(items)
    }

    /// Puts `item` back at the head of the queue, ignoring `maxsize`: used when an item
    /// was taken but could not be delivered, so that it is not lost and keeps its place.
    pub fn unget(&self, item: Fragment) -> Result<()> {
        let mut guard = self.lock()?;
        guard.items.push_front(&item);
        drop(guard);
        self.not_empty.notify_one();
        Ok(())
    }

    /// The number of items waiting (`qsize()`).
    pub fn len(&self) -> Result<usize> {
        Ok(self.lock()?.items.len())
    }

    /// Whether no item is waiting (`empty()`).
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Whether a bounded queue has no free slot (`full()`).
    pub fn is_full(&self) -> Result<bool> {
        let s = self.lock()?;
        Ok(s.maxsize > 0 && s.items.len() >= s.maxsize)
    }

    /// The bound (0 = unbounded).
    pub fn maxsize(&self) -> Result<usize> {
        Ok(self.lock()?.maxsize)
    }

    /// Marks one earlier-fetched item as processed (`task_done()`).
    ///
    /// # Errors
    /// Python's `ValueError` condition: called more times than items were put.
    pub fn task_done(&self) -> Result<()> {
        let mut s = self.lock()?;
        if s.unfinished == 0 {
            return Err(Error::Value("task_done() called too many times".into()));
        }
        s.unfinished -= 1;
        if s.unfinished == 0 {
            self.all_done.notify_all();
        }
        Ok(())
    }

    /// Waits until every item put has been marked done (`join()`).
    ///
    /// # Errors
    /// [`Error::Timeout`] if `wait` ran out first; [`Error::Closed`] on shutdown.
    pub fn join(&self, wait: Wait) -> Result<()> {
        let guard = self.lock()?;
        let (_guard, ready) = wait_until(&self.all_done, guard, wait.deadline(), |s| {
            s.unfinished == 0
        })?;
        if ready {
            Ok(())
        } else {
            Err(Error::Timeout("waiting for join()"))
        }
    }

    /// Wakes every waiter with [`Error::Closed`]; later blocking calls fail at once.
    fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.not_empty.notify_all();
        self.not_full.notify_all();
        self.all_done.notify_all();
    }
}

/// Queued items packed back to back in one ring buffer: each is a LEB128 header
/// (`len << 1 | uses_memo`) followed by its pickle fragment. A queued small int costs
/// about 3 bytes (1 header + 2 opcode bytes) plus the ring's spare capacity, against
/// ~40 for a boxed item per slot (pointer, length, allocator overhead); see the README's
/// memory figures.
#[derive(Debug, Default)]
struct Packed {
    bytes: VecDeque<u8>,
    count: usize,
}

impl Packed {
    fn len(&self) -> usize {
        self.count
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn header(item: &Fragment) -> ([u8; 10], usize) {
        let mut v = ((item.bytes().len() as u64) << 1) | u64::from(item.uses_memo());
        let mut buf = [0u8; 10];
        let mut n = 0;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                buf[n] = byte;
                return (buf, n + 1);
            }
            buf[n] = byte | 0x80;
            n += 1;
        }
    }

    fn push_back(&mut self, item: &Fragment) {
        let (header, n) = Packed::header(item);
        self.bytes.extend(&header[..n]);
        self.bytes.extend(item.bytes());
        self.count += 1;
    }

    fn push_front(&mut self, item: &Fragment) {
        let (header, n) = Packed::header(item);
        for &b in item.bytes().iter().rev().chain(header[..n].iter().rev()) {
            self.bytes.push_front(b);
        }
        self.count += 1;
    }

    fn pop_front(&mut self) -> Option<Fragment> {
        let mut v: u64 = 0;
        let mut n = 0;
        loop {
            let byte = *self.bytes.get(n)?;
            v |= u64::from(byte & 0x7f) << (7 * n);
            n += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        // Only this module writes the ring, so the header always matches what follows.
        let len = usize::try_from(v >> 1).ok()?;
        self.bytes.drain(..n);
        let bytes: Vec<u8> = self.bytes.drain(..len).collect();
        self.count -= 1;
        Some(Fragment::from_parts(bytes, v & 1 == 1))
    }

    /// Returns memory after a burst: keep at most 4x what is in use (and 64 KiB).
    fn shrink_if_sparse(&mut self) {
        let cap = self.bytes.capacity();
        if cap > 64 * 1024 && self.bytes.len() < cap / 4 {
            self.bytes.shrink_to((self.bytes.len() * 2).max(64 * 1024));
        }
    }
}

/// The most queues one server holds; creating a new name beyond it fails, so a client
/// cannot grow the server without bound by inventing names.
pub const MAX_QUEUES: usize = 4096;

/// A queue and the number of client references Python's refcounting protocol holds on it.
#[derive(Debug)]
struct Entry {
    queue: Arc<Queue>,
    refcount: u64,
}

#[derive(Debug, Default)]
struct Registry {
    by_name: HashMap<String, String>,
    by_ident: HashMap<String, Entry>,
}

/// All queues of one server, by name and by ident.
///
/// Named queues live as long as the server: Python forgets an object when its refcount
/// drops to zero, but a distq queue may still hold items nobody has fetched yet, and
/// losing them silently is exactly what distq exists to avoid. So refcounts are tracked
/// (clients and `number_of_objects` see Python's numbers) but never free a named queue.
///
/// # Example
/// ```
/// use distq::pickle::Fragment;
/// use distq::queues::{QueueMap, Wait};
/// use distq::Value;
/// let map = QueueMap::new();
/// let q = map.create("get_task_queue")?;
/// q.put(Fragment::encode(&Value::from(7))?, Wait::No)?;
/// assert_eq!(q.get(Wait::No)?.decode()?, Value::from(7));
/// # Ok::<(), distq::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct QueueMap {
    registry: Mutex<Registry>,
    next_ident: AtomicU64,
}

impl QueueMap {
    /// An empty map.
    pub fn new() -> QueueMap {
        QueueMap::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Registry>> {
        self.registry.lock().map_err(|_| poisoned())
    }

    /// Declares a queue with a bound before any client asks for it (`--queue NAME:MAXSIZE`).
    /// Changes the bound if the queue already exists.
    pub fn declare(&self, name: &str, maxsize: usize) -> Result<Arc<Queue>> {
        let queue = self.lookup_or_insert(name, maxsize)?;
        queue.lock()?.maxsize = maxsize;
        Ok(queue)
    }

    fn lookup_or_insert(&self, name: &str, maxsize: usize) -> Result<Arc<Queue>> {
        let mut reg = self.lock()?;
        if let Some(ident) = reg.by_name.get(name) {
            if let Some(entry) = reg.by_ident.get(ident) {
                return Ok(entry.queue.clone());
            }
        }
        if reg.by_ident.len() >= MAX_QUEUES {
            return Err(Error::Value(format!(
                "too many queues (limit {MAX_QUEUES}); reuse existing queue names"
            )));
        }
        // Idents look like Python's `'%x' % id(obj)` (12 lowercase hex digits) so that
        // tools printing them see the familiar shape; they are opaque to clients.
        let n = self.next_ident.fetch_add(1, Ordering::Relaxed);
        let ident = format!("{:x}", 0xd157_0000_0000u64 + n * 0x10);
        let queue = Arc::new(Queue::new(name, ident.clone(), maxsize));
        reg.by_name.insert(name.to_string(), ident.clone());
        reg.by_ident.insert(
            ident,
            Entry {
                queue: queue.clone(),
                refcount: 0,
            },
        );
        Ok(queue)
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
        match reg.by_ident.get_mut(ident) {
            Some(entry) if entry.refcount > 0 => {
                entry.refcount -= 1;
                Ok(())
            }
            _ => Err(Error::Value(format!("KeyError: {ident:?}"))),
        }
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

    /// Wakes every blocked caller on every queue with [`Error::Closed`] (server shutdown).
    pub fn close_all(&self) {
        if let Ok(all) = self.queues() {
            for q in all {
                q.close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;
    use std::thread;

    fn item(v: impl Into<Value>) -> Fragment {
        Fragment::encode(&v.into()).unwrap()
    }

    #[test]
    fn fifo_order() {
        let map = QueueMap::new();
        let q = map.create("q").unwrap();
        for i in 0..5 {
            q.put(item(i), Wait::No).unwrap();
        }
        let got: Vec<_> = (0..5).map(|_| q.get(Wait::No).unwrap()).collect();
        assert_eq!(got, (0..5).map(item).collect::<Vec<_>>());
        assert!(matches!(q.get(Wait::No), Err(Error::Empty)));
    }

    #[test]
    fn get_times_out_after_roughly_the_timeout() {
        let q = QueueMap::new().create("q").unwrap();
        let start = Instant::now();
        assert!(matches!(
            q.get(Wait::For(Duration::from_millis(150))),
            Err(Error::Empty)
        ));
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
        let t = thread::spawn(move || q2.get(Wait::Forever));
        thread::sleep(Duration::from_millis(50));
        q.put(item("x"), Wait::No).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), item("x"));
    }

    #[test]
    fn bounded_queue_reports_full_and_unblocks() {
        let map = QueueMap::new();
        let q = map.declare("b", 1).unwrap();
        q.put(item(1), Wait::No).unwrap();
        assert!(q.is_full().unwrap());
        assert!(matches!(q.put(item(2), Wait::No), Err(Error::Full)));
        let q2 = q.clone();
        let t = thread::spawn(move || q2.put(item(2), Wait::Forever));
        thread::sleep(Duration::from_millis(50));
        assert_eq!(q.get(Wait::No).unwrap(), item(1));
        t.join().unwrap().unwrap();
        assert_eq!(q.get(Wait::No).unwrap(), item(2));
    }

    #[test]
    fn unget_goes_to_the_head_even_when_full() {
        let q = QueueMap::new().declare("b", 1).unwrap();
        q.put(item(2), Wait::No).unwrap();
        q.unget(item(1)).unwrap();
        assert_eq!(q.get(Wait::No).unwrap(), item(1));
        assert_eq!(q.get(Wait::No).unwrap(), item(2));
    }

    #[test]
    fn task_done_and_join() {
        let q = QueueMap::new().create("j").unwrap();
        q.put(item(Value::None), Wait::No).unwrap();
        q.put(item(Value::None), Wait::No).unwrap();
        assert!(matches!(
            q.join(Wait::For(Duration::from_millis(20))),
            Err(Error::Timeout(_))
        ));
        q.task_done().unwrap();
        q.task_done().unwrap();
        q.join(Wait::No).unwrap();
        assert!(q.task_done().is_err());
    }

    #[test]
    fn close_wakes_waiters() {
        let map = QueueMap::new();
        let q = map.create("c").unwrap();
        let q2 = q.clone();
        let t = thread::spawn(move || q2.get(Wait::Forever));
        thread::sleep(Duration::from_millis(50));
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
}

#[cfg(test)]
mod packed_tests {
    use super::*;
    use crate::Value;

    #[test]
    fn packed_ring_keeps_order_sizes_and_memo_flags() {
        let shared = Value::list(vec![Value::from(1)]);
        let items: Vec<Fragment> = [
            Value::from(1),
            Value::from("x".repeat(300)),
            Value::tuple(vec![shared.clone(), shared]),
            Value::from(vec![0u8; 70_000]),
        ]
        .iter()
        .map(|v| Fragment::encode(v).unwrap())
        .collect();
        let mut p = Packed::default();
        for it in &items[1..] {
            p.push_back(it);
        }
        p.push_front(&items[0]);
        assert_eq!(p.len(), 4);
        for it in &items {
            assert_eq!(p.pop_front().as_ref(), Some(it));
        }
        assert!(p.is_empty() && p.pop_front().is_none());
    }

    #[test]
    fn a_queued_small_int_costs_a_few_bytes() {
        let mut p = Packed::default();
        let one = Fragment::encode(&Value::from(200)).unwrap();
        for _ in 0..100_000 {
            p.push_back(&one);
        }
        assert_eq!(p.bytes.len(), 300_000);
    }
}
