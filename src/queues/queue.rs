//! One queue: Python's `queue.Queue` semantics, plus leases.
//!
//! Like CPython's `queue.Queue`, a queue owns one `Mutex` and three `Condvar`s
//! (`not_empty`, `not_full`, `all_done`), so waiters on one queue never contend with
//! another queue. On top of that:
//!
//! - **Liveness while waiting.** A blocked `get` wakes up every [`LIVENESS_SLICE`] to ask
//!   its caller whether the peer is still connected (with the lock released: the check is
//!   a socket call). A worker killed while blocked therefore stops waiting promptly and
//!   never takes an item it cannot receive.
//! - **Leases.** `reserve` hands an item out under a lease id; `ack` completes it,
//!   `release` (optionally after a delay) puts it back at the head, and so do a closed
//!   connection and an expired lease. Each item counts its deliveries; past the limit it
//!   is handed back to the caller for dead-lettering instead of being requeued.
//! - **Shutdown.** Python 3.13's `Queue.shutdown()`: later puts fail with `ShutDown`,
//!   gets drain what is left and then fail the same way.
//! - **Events.** Each change to what a named queue holds goes to the server's sink (the
//!   journal) as one `Event`, from `Queue::emit` alone, under the queue lock; a put then
//!   waits, unlocked, for its events to be durable before it returns (`event.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::budget::Budget;
use super::event::{Event, QueueSink};
use super::packed::{Packed, Taken};
use super::{dead_letter_queue, poisoned, Policy, Wait};
use crate::pickle::Fragment;
use crate::{Error, Result};

/// How often a blocked waiter checks that its peer is still there.
pub const LIVENESS_SLICE: Duration = Duration::from_millis(100);

/// A new lease id. Ids are unique within the process, so a lease can never be confused
/// with one on another queue or from an earlier connection, and they start at a random
/// point in 2^40..2^52 so that a worker holding a lease of a server that has since
/// restarted cannot ack (or put a result for) a task of the new server that happens to
/// have the same number. (Below 2^53, so a JSON or float reader keeps them exact.)
fn next_lease() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| {
        use rand::Rng;
        AtomicU64::new(rand::rngs::OsRng.gen_range(1u64 << 40..1u64 << 52))
    })
    .fetch_add(1, Ordering::Relaxed)
}

/// One named FIFO queue.
#[derive(Debug)]
pub struct Queue {
    name: String,
    ident: String,
    policy: Policy,
    /// Where this queue's events go (named queues of a server with a journal).
    events: Option<QueueSink>,
    /// The server-wide budget for stored items' bytes, shared by every queue.
    budget: Arc<Budget>,
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
    /// Items put but not yet marked done with `task_done`/`ack` (for `join`).
    unfinished: u64,
    /// The server is stopping: every waiter wakes up and fails with `Closed`.
    closed: bool,
    /// `shutdown()` was called: puts fail, gets drain then fail with `ShutDown`.
    shut_down: bool,
    leases: HashMap<u64, Lease>,
    /// Released with a delay: back at the head when due.
    delayed: Vec<(Instant, Taken)>,
    /// Callers blocked in `get`/`get_many`/`reserve` right now.
    getters: usize,
    /// Bytes of the items this queue holds (waiting, reserved or delayed), counted in
    /// the budget.
    bytes: u64,
    counts: Counts,
}

/// Lifetime counters of one queue, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Items put.
    pub puts: u64,
    /// Items handed out by `get`, `get_many` and `reserve`.
    pub gets: u64,
    /// Leases acked.
    pub acks: u64,
    /// Items put back at the head: released, expired, or their connection closed.
    pub requeues: u64,
    /// Items moved to the dead-letter queue.
    pub dead_lettered: u64,
}

/// A snapshot of one queue, for `stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    /// Items waiting.
    pub size: usize,
    /// Items out under a lease.
    pub reserved: usize,
    /// Items released with a delay, not yet back in the queue.
    pub delayed: usize,
    /// Callers blocked waiting for an item.
    pub waiting_getters: usize,
    /// The lifetime counters.
    pub counts: Counts,
}

#[derive(Debug)]
struct Lease {
    taken: Taken,
    /// The connection holding it: its leases are released when it closes.
    owner: u64,
    expires: Option<Instant>,
}

/// A lease on a reserved item, as returned by [`Queue::reserve`].
#[derive(Debug)]
pub struct Reserved {
    /// The id to pass to `ack`, `release` and `touch`.
    pub lease: u64,
    /// The item.
    pub item: Fragment,
}

impl Queue {
    pub(super) fn new(
        name: &str,
        ident: String,
        maxsize: usize,
        policy: Policy,
        events: Option<QueueSink>,
        budget: Arc<Budget>,
    ) -> Queue {
        Queue {
            name: name.to_string(),
            ident,
            policy,
            events,
            budget,
            state: Mutex::new(State {
                items: Packed::default(),
                maxsize,
                unfinished: 0,
                closed: false,
                shut_down: false,
                leases: HashMap::new(),
                delayed: Vec::new(),
                getters: 0,
                bytes: 0,
                counts: Counts::default(),
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

    /// Counts items that came back (or were recovered) into this queue: never refused.
    fn gain(&self, s: &mut State, bytes: u64) {
        s.bytes += bytes;
        self.budget.add(bytes);
    }

    /// Items left this queue for good.
    fn lose(&self, s: &mut State, bytes: u64) {
        s.bytes = s.bytes.saturating_sub(bytes);
        self.budget.give_back(bytes);
    }

    /// The one place where a change to this queue's contents leaves the queue layer
    /// (see `event.rs`): every mutation below calls it once per item, at the point it
    /// changes the state. The `&State` proves the lock is held, so the sink sees the
    /// queue's events in the order they happened. Returns the ticket to commit before
    /// replying, for the events a reply must wait for.
    fn emit(&self, _locked: &State, event: Event<'_>) -> Option<u64> {
        self.events.as_ref().and_then(|sink| sink.emit(event))
    }

    /// A new id for an item, 0 without a sink.
    fn new_id(&self) -> u64 {
        self.events.as_ref().map_or(0, QueueSink::item_id)
    }

    /// Waits on `cv` until `ready` holds, the deadline passes, the queue closes, or
    /// `alive` says the peer has gone. Returns the guard and whether `ready` holds.
    ///
    /// The remaining time is recomputed after every wake-up, so spurious wake-ups never
    /// extend the wait. `alive` is called only with the lock released.
    fn wait_until<'a>(
        &'a self,
        cv: &Condvar,
        mut guard: MutexGuard<'a, State>,
        wait: Wait,
        alive: &dyn Fn() -> bool,
        ready: impl Fn(&State) -> bool,
    ) -> Result<(MutexGuard<'a, State>, bool)> {
        let deadline = wait.deadline();
        loop {
            if guard.closed {
                return Err(Error::Closed);
            }
            if ready(&guard) {
                return Ok((guard, true));
            }
            let now = Instant::now();
            let slice = match deadline {
                Some(d) if now >= d => return Ok((guard, false)),
                Some(d) => (d - now).min(LIVENESS_SLICE),
                None => LIVENESS_SLICE,
            };
            let (g, timeout) = cv.wait_timeout(guard, slice).map_err(|_| poisoned())?;
            guard = g;
            if timeout.timed_out() && !ready(&guard) {
                drop(guard);
                if !alive() {
                    return Err(Error::Closed);
                }
                guard = self.lock()?;
            }
        }
    }

    /// Appends `item`, waiting for a free slot if the queue is bounded and full.
    ///
    /// # Errors
    /// [`Error::Full`] if no slot freed up in time; [`Error::ShutDown`] after
    /// [`Queue::shutdown`]; [`Error::Closed`] on server shutdown or if the peer left.
    pub fn put(&self, item: Fragment, wait: Wait, alive: &dyn Fn() -> bool) -> Result<()> {
        self.put_many(vec![item], wait, alive)
    }

    /// Appends all `items` at once, waiting until there is room for all of them: a batch
    /// is never split, so consumers see it contiguous and a `Full` error means none of it
    /// was queued.
    ///
    /// # Errors
    /// As [`Queue::put`], and [`Error::Value`] if the batch is larger than the queue's
    /// bound and could never fit.
    pub fn put_many(
        &self,
        items: Vec<Fragment>,
        wait: Wait,
        alive: &dyn Fn() -> bool,
    ) -> Result<()> {
        let n = items.len();
        if let Some(sink) = &self.events {
            sink.admit(&items)?;
        }
        let bytes: u64 = items.iter().map(|i| i.bytes().len() as u64).sum();
        if let Some(limit) = self.budget.limit().filter(|limit| bytes > *limit) {
            return Err(Error::Value(format!(
                "{bytes} bytes of items can never fit the server's memory budget of {limit} bytes"
            )));
        }
        let mut guard = self.lock()?;
        if guard.maxsize > 0 && n > guard.maxsize {
            return Err(Error::Value(format!(
                "a batch of {n} items can never fit a queue bounded to {}",
                guard.maxsize
            )));
        }
        // Room in the queue and in the server's budget. The budget is shared with other
        // queues, so it is taken only after the wait, and a put that loses the race to
        // another queue's waits again (memory freed elsewhere is noticed within a
        // liveness slice).
        let deadline = wait.deadline();
        let mut wait = wait;
        loop {
            let (g, ready) = self.wait_until(&self.not_full, guard, wait, alive, |s| {
                s.shut_down
                    || ((s.maxsize == 0 || s.items.len() + n <= s.maxsize)
                        && self.budget.fits(bytes))
            })?;
            guard = g;
            if guard.shut_down {
                return Err(Error::ShutDown);
            }
            if !ready {
                return Err(match (self.budget.limit(), self.budget.fits(bytes)) {
                    (Some(limit), false) => Error::MemoryFull { limit },
                    _ => Error::Full,
                });
            }
            if self.budget.try_take(bytes) {
                break;
            }
            wait = match deadline {
                Some(d) => Wait::For(d.saturating_duration_since(Instant::now())),
                None => Wait::Forever,
            };
        }
        guard.bytes += bytes;
        let mut durable = None;
        let mut ids = Vec::new();
        for item in items {
            let t = Taken {
                id: self.new_id(),
                ..Taken::new(item)
            };
            let put = Event::Put {
                id: t.id,
                item: Cow::Borrowed(&t.item),
            };
            durable = self.emit(&guard, put).or(durable);
            if t.id > 0 {
                ids.push(t.id);
            }
            guard.items.push_back(&t);
        }
        guard.unfinished += n as u64;
        guard.counts.puts += n as u64;
        drop(guard);
        if n == 1 {
            self.not_empty.notify_one();
        } else {
            self.not_empty.notify_all();
        }
        // Acknowledge only what is durable: the wait happens here, with no queue lock held.
        match (&self.events, durable) {
            (Some(sink), Some(ticket)) => sink.commit(ticket).map_err(|e| self.withdraw(&ids, e)),
            _ => Ok(()),
        }
    }

    /// Undoes a put whose journal write failed, so an item its producer was told "not
    /// stored" is never delivered: the items still waiting are taken back out (and
    /// withdrawn from the sink behind the retried put, so a restart does not revive them
    /// either). An item a consumer already got cannot be taken back; the error says so.
    fn withdraw(&self, ids: &[u64], err: Error) -> Error {
        let Ok(mut s) = self.lock() else {
            return err;
        };
        let mut kept = Vec::with_capacity(s.items.len());
        let mut withdrawn = 0u64;
        let mut withdrawn_bytes = 0u64;
        while let Some(t) = s.items.pop_front() {
            if ids.contains(&t.id) {
                self.emit(&s, Event::Withdraw { id: t.id });
                withdrawn += 1;
                withdrawn_bytes += t.item.bytes().len() as u64;
            } else {
                kept.push(t);
            }
        }
        for t in &kept {
            s.items.push_back(t);
        }
        s.items.shrink_if_sparse();
        self.lose(&mut s, withdrawn_bytes);
        s.unfinished = s.unfinished.saturating_sub(withdrawn);
        s.counts.puts = s.counts.puts.saturating_sub(withdrawn);
        if s.unfinished == 0 {
            self.all_done.notify_all();
        }
        drop(s);
        self.not_full.notify_all();
        let delivered = ids.len() as u64 - withdrawn;
        let cause = match &err {
            Error::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        let what = if delivered == 0 {
            format!(
                "{cause}; this put was not stored (free disk space: the server retries the write)"
            )
        } else {
            format!(
                "{cause}; {delivered} of the {} item(s) of this put had already been handed to a \
                 consumer before the write failed (delivered, but not journaled); the rest were not stored",
                ids.len()
            )
        };
        Error::io("writing the journal", std::io::Error::other(what))
    }

    /// Waits like Python's `get` for at least one item, then takes up to `max` of those
    /// waiting (never waiting for more). The caller must [`Queue::unget`] them if it
    /// cannot deliver them.
    ///
    /// # Errors
    /// [`Error::Empty`] if nothing arrived in time; [`Error::ShutDown`] once a shut-down
    /// queue is drained; [`Error::Closed`] on server shutdown or if the peer left.
    pub fn get_many(&self, max: usize, wait: Wait, alive: &dyn Fn() -> bool) -> Result<Vec<Taken>> {
        self.take(max, wait, alive, None).map(|(items, _)| items)
    }

    /// Waits for items and takes up to `max`: handed out plainly, or (with `lease`:
    /// owner and expiry) each under a new lease, whose ids are returned too. Leased
    /// takes of more than one get at most half the waiting items (rounded up), so that a
    /// worker prefetching from a short queue leaves work for the others: with 10 items,
    /// two workers asking for 16 get 5 and 3.
    fn take(
        &self,
        max: usize,
        wait: Wait,
        alive: &dyn Fn() -> bool,
        lease: Option<(u64, Option<Instant>)>,
    ) -> Result<(Vec<Taken>, Vec<u64>)> {
        let mut guard = self.lock()?;
        guard.getters += 1;
        let waited = self.wait_until(&self.not_empty, guard, wait, alive, |s| {
            !s.items.is_empty() || s.shut_down
        });
        let (mut guard, ready) = match waited {
            Ok(ok) => ok,
            Err(e) => {
                if let Ok(mut s) = self.lock() {
                    s.getters -= 1;
                }
                return Err(e);
            }
        };
        guard.getters -= 1;
        if guard.items.is_empty() {
            return Err(if guard.shut_down {
                Error::ShutDown
            } else {
                Error::Empty
            });
        }
        debug_assert!(ready);
        let waiting = guard.items.len();
        let take = match lease {
            Some(_) if max > 1 => max.min(waiting.div_ceil(2)),
            _ => max.min(waiting),
        };
        let mut items: Vec<Taken> = (0..take).filter_map(|_| guard.items.pop_front()).collect();
        guard.items.shrink_if_sparse();
        guard.counts.gets += items.len() as u64;
        let mut leases = Vec::new();
        match lease {
            Some((owner, expires)) => {
                for t in &mut items {
                    t.deliveries = t.deliveries.saturating_add(1);
                    self.emit(&guard, Event::Reserve { id: t.id });
                    let lease = next_lease();
                    guard.leases.insert(
                        lease,
                        Lease {
                            taken: t.clone(),
                            owner,
                            expires,
                        },
                    );
                    leases.push(lease);
                }
            }
            None => {
                for t in &items {
                    self.emit(&guard, Event::Take { id: t.id });
                }
                let bytes = items.iter().map(|t| t.item.bytes().len() as u64).sum();
                self.lose(&mut guard, bytes);
            }
        }
        drop(guard);
        // Every waiting put: one woken `put_many` that still does not fit would otherwise
        // swallow the wakeup while a single `put` that fits sleeps until its poll.
        self.not_full.notify_all();
        Ok((items, leases))
    }

    /// Takes one item (see [`Queue::get_many`]).
    pub fn get(&self, wait: Wait, alive: &dyn Fn() -> bool) -> Result<Taken> {
        let mut items = self.get_many(1, wait, alive)?;
        items.pop().ok_or(Error::Empty)
    }

    /// Puts taken items back at the head, in their original order, ignoring `maxsize`:
    /// used when a reply carrying them could not be delivered, so they are neither lost
    /// nor moved behind newer items.
    ///
    /// # Errors
    /// A poisoned lock, or the journal could not write the unget: the items are back in
    /// the queue either way, and the record is kept for the journal's next try.
    pub fn unget(&self, items: Vec<Taken>) -> Result<()> {
        let mut guard = self.lock()?;
        let mut durable = None;
        for t in items.iter().rev() {
            guard.items.push_front(t);
            let unget = Event::Unget {
                id: t.id,
                deliveries: t.deliveries,
                item: Cow::Borrowed(&t.item),
            };
            durable = self.emit(&guard, unget).or(durable);
        }
        let bytes = items.iter().map(|t| t.item.bytes().len() as u64).sum();
        self.gain(&mut guard, bytes);
        guard.counts.gets = guard.counts.gets.saturating_sub(items.len() as u64);
        drop(guard);
        self.not_empty.notify_all();
        // The take may be in the file already: until this is too, a crash loses the items.
        // A failed write keeps the record for a retry; the items are back either way.
        match (&self.events, durable) {
            (Some(sink), Some(ticket)) => sink.commit(ticket),
            _ => Ok(()),
        }
    }

    /// Takes one item under a lease owned by connection `owner`. The lease lasts
    /// `lease_time` (or the server's default; `None` and zero mean no expiry).
    ///
    /// # Errors
    /// As [`Queue::get_many`].
    pub fn reserve(
        &self,
        owner: u64,
        lease_time: Option<Duration>,
        wait: Wait,
        alive: &dyn Fn() -> bool,
    ) -> Result<Reserved> {
        let mut reserved = self.reserve_many(owner, 1, lease_time, wait, alive)?;
        reserved.pop().ok_or(Error::Empty)
    }

    /// Takes up to `max` items, each under its own lease owned by connection `owner`
    /// (a worker's prefetch): at most half the waiting items, rounded up, so other
    /// workers still find some. Waits like [`Queue::reserve`] for the first.
    ///
    /// # Errors
    /// As [`Queue::get_many`].
    pub fn reserve_many(
        &self,
        owner: u64,
        max: usize,
        lease_time: Option<Duration>,
        wait: Wait,
        alive: &dyn Fn() -> bool,
    ) -> Result<Vec<Reserved>> {
        let expires = lease_time
            .or(self.policy.lease_timeout)
            .filter(|t| !t.is_zero())
            .and_then(|t| Instant::now().checked_add(t));
        let (items, leases) = self.take(max.max(1), wait, alive, Some((owner, expires)))?;
        if items.is_empty() {
            return Err(Error::Empty);
        }
        Ok(leases
            .into_iter()
            .zip(items)
            .map(|(lease, t)| Reserved {
                lease,
                item: t.item,
            })
            .collect())
    }

    fn unknown_lease(&self, lease: u64) -> Error {
        Error::Value(format!(
            "unknown lease {lease} on queue {:?} (already acked or released, expired, or its connection closed)",
            self.name
        ))
    }

    /// Completes a lease: the item is done (this also counts as `task_done`). Returns
    /// it, now gone from the queue for good.
    ///
    /// # Errors
    /// [`Error::Value`] if the lease is unknown.
    pub fn ack(&self, lease: u64) -> Result<Taken> {
        let mut s = self.lock()?;
        let done = s
            .leases
            .remove(&lease)
            .ok_or_else(|| self.unknown_lease(lease))?;
        self.emit(&s, Event::Ack { id: done.taken.id });
        self.lose(&mut s, done.taken.item.bytes().len() as u64);
        s.unfinished = s.unfinished.saturating_sub(1);
        s.counts.acks += 1;
        if s.unfinished == 0 {
            self.all_done.notify_all();
        }
        Ok(done.taken)
    }

    /// Whether `lease` is held on this queue.
    ///
    /// # Errors
    /// [`Error::Value`] if the lease is unknown.
    pub fn check_lease(&self, lease: u64) -> Result<()> {
        let s = self.lock()?;
        match s.leases.contains_key(&lease) {
            true => Ok(()),
            false => Err(self.unknown_lease(lease)),
        }
    }

    /// Extends a lease by `by` (or the server's default lease time) from now.
    ///
    /// # Errors
    /// [`Error::Value`] if the lease is unknown.
    pub fn touch(&self, lease: u64, by: Option<Duration>) -> Result<()> {
        let mut s = self.lock()?;
        let l = s
            .leases
            .get_mut(&lease)
            .ok_or_else(|| self.unknown_lease(lease))?;
        l.expires = by
            .or(self.policy.lease_timeout)
            .filter(|t| !t.is_zero())
            .and_then(|t| Instant::now().checked_add(t));
        Ok(())
    }

    /// Gives a leased item back: at the head now, or after `delay`. Returns the item
    /// instead if it has used up its deliveries and must be dead-lettered.
    ///
    /// # Errors
    /// [`Error::Value`] if the lease is unknown.
    pub fn release(&self, lease: u64, delay: Option<Duration>) -> Result<Option<Taken>> {
        let mut s = self.lock()?;
        let l = s
            .leases
            .remove(&lease)
            .ok_or_else(|| self.unknown_lease(lease))?;
        let due = delay
            .filter(|d| !d.is_zero())
            .and_then(|d| Instant::now().checked_add(d));
        let max = self.policy.max_deliveries;
        let exhausted = max > 0 && l.taken.deliveries >= max;
        if let (Some(due), false) = (due, exhausted) {
            // Waiting again as far as the sink knows: it keeps no clocks (see `event.rs`).
            self.emit(&s, Event::Requeue { id: l.taken.id });
            s.delayed.push((due, l.taken));
            return Ok(None);
        }
        let dead = self.requeue(&mut s, l.taken);
        drop(s);
        self.not_empty.notify_one();
        Ok(dead)
    }

    /// Puts `t` back at the head, or returns it if it has had its deliveries (the caller
    /// dead-letters it; it no longer counts as unfinished here).
    fn requeue(&self, s: &mut State, t: Taken) -> Option<Taken> {
        let max = self.policy.max_deliveries;
        if max > 0 && t.deliveries >= max {
            let to = Cow::Owned(dead_letter_queue(&self.name));
            self.emit(s, Event::DeadLetter { id: t.id, to });
            s.counts.dead_lettered += 1;
            self.lose(s, t.item.bytes().len() as u64);
            s.unfinished = s.unfinished.saturating_sub(1);
            if s.unfinished == 0 {
                self.all_done.notify_all();
            }
            return Some(t);
        }
        self.emit(s, Event::Requeue { id: t.id });
        s.counts.requeues += 1;
        s.items.push_front(&t);
        None
    }

    /// Releases every lease held by connection `owner` (it closed). Returns the items
    /// to dead-letter and how many leases were released.
    pub fn release_owner(&self, owner: u64) -> Result<(Vec<Taken>, usize)> {
        self.release_where(|l, _| l.owner == owner)
    }

    /// Requeues expired leases and delayed items that are due. Returns the items to
    /// dead-letter and how many leases expired.
    pub fn expire(&self, now: Instant) -> Result<(Vec<Taken>, usize)> {
        let due = {
            let mut s = self.lock()?;
            let mut due = Vec::new();
            s.delayed.retain(|(at, t)| {
                if *at <= now {
                    due.push(t.clone());
                    false
                } else {
                    true
                }
            });
            for t in due.iter().rev() {
                s.items.push_front(t);
            }
            s.counts.requeues += due.len() as u64;
            !due.is_empty()
        };
        if due {
            self.not_empty.notify_all();
        }
        self.release_where(|l, now| l.expires.is_some_and(|e| e <= now))
    }

    fn release_where(&self, pick: impl Fn(&Lease, Instant) -> bool) -> Result<(Vec<Taken>, usize)> {
        let now = Instant::now();
        let mut s = self.lock()?;
        if s.leases.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let mut ids: Vec<u64> = s
            .leases
            .iter()
            .filter(|(_, l)| pick(l, now))
            .map(|(id, _)| *id)
            .collect();
        // Oldest lease first back at the head last, so the oldest ends up in front.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let mut dead = Vec::new();
        for id in &ids {
            if let Some(l) = s.leases.remove(id) {
                dead.extend(self.requeue(&mut s, l.taken));
            }
        }
        drop(s);
        if !ids.is_empty() {
            self.not_empty.notify_all();
        }
        Ok((dead, ids.len()))
    }

    /// Appends dead-lettered items (this is a `NAME.dead` queue), ignoring `maxsize`. No
    /// event: the source queue's [`Event::DeadLetter`] already moved them.
    pub(super) fn push_dead(&self, items: Vec<Taken>) -> Result<()> {
        let n = items.len();
        let mut s = self.lock()?;
        for t in &items {
            s.items.push_back(t);
        }
        let bytes = items.iter().map(|t| t.item.bytes().len() as u64).sum();
        self.gain(&mut s, bytes);
        s.unfinished += n as u64;
        drop(s);
        self.not_empty.notify_all();
        Ok(())
    }

    /// Loads items recovered from the journal: formerly reserved ones first (they come
    /// back ready, at the head), then the waiting ones in order. The sink learns that
    /// the formerly reserved ones are waiting again (a `Requeue` each, newest first so
    /// the oldest ends up in front): otherwise a later get of one would not match the
    /// journal, and a restart would find it both reserved and waiting.
    pub(super) fn restore(&self, reserved: Vec<Taken>, ready: Vec<Taken>) -> Result<()> {
        let mut s = self.lock()?;
        for t in reserved.iter().rev() {
            self.emit(&s, Event::Requeue { id: t.id });
        }
        let n = (reserved.len() + ready.len()) as u64;
        for t in reserved.iter().chain(&ready) {
            s.items.push_back(t);
        }
        let bytes = reserved
            .iter()
            .chain(&ready)
            .map(|t| t.item.bytes().len() as u64)
            .sum();
        self.gain(&mut s, bytes);
        s.unfinished += n;
        Ok(())
    }

    /// Python 3.13's `shutdown(immediate)`: later puts fail with `ShutDown`; gets drain
    /// the remaining items (none, if `immediate`) and then fail the same way.
    pub fn shutdown(&self, immediate: bool) -> Result<()> {
        let mut s = self.lock()?;
        s.shut_down = true;
        if immediate {
            // Delayed releases are waiting items too (the sink has them as requeued).
            let delayed = s.delayed.len() as u64;
            s.delayed.clear();
            let dropped = s.items.clear() as u64 + delayed;
            // What is left is what is reserved.
            let kept: u64 = s
                .leases
                .values()
                .map(|l| l.taken.item.bytes().len() as u64)
                .sum();
            let gone = s.bytes.saturating_sub(kept);
            self.lose(&mut s, gone);
            self.emit(&s, Event::Clear { count: dropped });
            s.unfinished = s.unfinished.saturating_sub(dropped);
            if s.unfinished == 0 {
                self.all_done.notify_all();
            }
        }
        drop(s);
        self.not_empty.notify_all();
        self.not_full.notify_all();
        Ok(())
    }

    /// The number of items waiting (`qsize()`); reserved items are not counted.
    pub fn len(&self) -> Result<usize> {
        Ok(self.lock()?.items.len())
    }

    /// Whether the queue's items are kept in the server's journal (named queues of a
    /// server with one).
    pub fn is_journaled(&self) -> bool {
        self.events.is_some()
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

    /// The number of items out under a lease.
    #[cfg(any(test, feature = "internals"))]
    pub fn reserved(&self) -> Result<usize> {
        Ok(self.lock()?.leases.len())
    }

    /// A snapshot of the queue's size, leases, waiters and counters.
    pub fn stats(&self) -> Result<QueueStats> {
        let s = self.lock()?;
        Ok(QueueStats {
            size: s.items.len(),
            reserved: s.leases.len(),
            delayed: s.delayed.len(),
            waiting_getters: s.getters,
            counts: s.counts,
        })
    }

    pub(super) fn set_maxsize(&self, maxsize: usize) -> Result<()> {
        self.lock()?.maxsize = maxsize;
        self.not_full.notify_all();
        Ok(())
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
    /// [`Error::Timeout`] if `wait` ran out first; [`Error::Closed`] on shutdown or if
    /// the peer left.
    pub fn join(&self, wait: Wait, alive: &dyn Fn() -> bool) -> Result<()> {
        let guard = self.lock()?;
        let (_guard, ready) =
            self.wait_until(&self.all_done, guard, wait, alive, |s| s.unfinished == 0)?;
        if ready {
            Ok(())
        } else {
            Err(Error::Timeout("waiting for join()"))
        }
    }

    /// Wakes every waiter with [`Error::Closed`]; later blocking calls fail at once.
    /// Returns the number of items still out under a lease (for the shutdown log).
    pub(super) fn close(&self) -> usize {
        let reserved = match self.state.lock() {
            Ok(mut s) => {
                s.closed = true;
                s.leases.len()
            }
            Err(_) => 0,
        };
        self.not_empty.notify_all();
        self.not_full.notify_all();
        self.all_done.notify_all();
        reserved
    }
}

impl Drop for Queue {
    /// A freed anonymous queue's items leave the budget with it.
    fn drop(&mut self) {
        let bytes = self.state.get_mut().map_or(0, |s| s.bytes);
        self.budget.give_back(bytes);
    }
}
