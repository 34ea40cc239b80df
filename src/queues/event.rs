//! The queue layer's whole contract with durability: every change to what a named queue
//! holds is one [`Event`], handed to the server's [`EventSink`] (the journal) from one
//! place, `Queue::emit`. Queues know nothing else about the journal: not its records,
//! not its file, not when it writes. The journal turns events into records
//! (`journal/mod.rs`); unit tests put a recorder in its place and check the exact events
//! of every operation, undo paths included, and that replaying them rebuilds the queues.
//!
//! # When an event must be durable
//! Two events are waited for ([`Durability::BeforeReply`]). [`Event::Put`]: a put is
//! acknowledged once its events are in the file (and on the disk, with `--fsync
//! always`), so no acknowledged item is lost to a crash. [`Event::Unget`]: it undoes a
//! take that may already be in the file, so until it is written too a crash would lose
//! the item. Every other event is group-committed: written with the next put's batch or
//! by the flusher within one interval, and a crash that loses one of them can only bring
//! back an item that had left (delivery is at least once).
//!
//! # What is not an event
//! A delayed item coming due (its [`Event::Requeue`] was emitted at its release: the
//! sink keeps no clocks, so after a restart it is ready at once); lease owners, expiry
//! times and `touch`; `task_done`/`join` counts; `maxsize`; a non-immediate `shutdown`;
//! and anything on an anonymous queue (it dies with its proxies, so it has no sink).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::pickle::Fragment;
use crate::Result;

/// One change to what a queue holds, in the queue's terms. `id` is the item's id from
/// [`EventSink::item_id`] (0 for an item that entered without one, such as a dead letter
/// of an anonymous queue). Items are borrowed on the hot path; a sink that keeps events
/// (the tests' recorder) owns them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Event<'a> {
    /// A put appended `item` at the tail. The one event a reply waits for.
    Put { id: u64, item: Cow<'a, Fragment> },
    /// A taken item went back to the head because its reply could not be delivered.
    /// Waited for like a put: its [`Event::Take`] may already be in the file.
    Unget {
        id: u64,
        deliveries: u32,
        item: Cow<'a, Fragment>,
    },
    /// A plain `get` handed the item out.
    Take { id: u64 },
    /// A put whose write failed was taken back out before anyone got it ("not stored").
    /// It goes into the failed put's retried batch, so both reach the file together.
    Withdraw { id: u64 },
    /// A `reserve` handed the item out under a lease (one more delivery).
    Reserve { id: u64 },
    /// A lease was acked: the item is done.
    Ack { id: u64 },
    /// A leased item is waiting again: released (at the head now, or after a delay),
    /// expired, its connection closed, or recovered from a reserve before a restart.
    Requeue { id: u64 },
    /// A leased item used up its deliveries and moved to the tail of the queue `to`.
    DeadLetter { id: u64, to: Cow<'a, str> },
    /// `shutdown(immediate=True)` dropped the `count` waiting (and delayed) items.
    Clear { count: u64 },
}

/// When an event must have reached stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Before the operation's reply: what a producer was told is stored must be.
    BeforeReply,
    /// With whatever is written next (what losing one means is in the module docs).
    GroupCommit,
}

impl Event<'_> {
    /// The rule of the module docs, as code: the queue waits on exactly these.
    pub fn durability(&self) -> Durability {
        match self {
            Event::Put { .. } | Event::Unget { .. } => Durability::BeforeReply,
            _ => Durability::GroupCommit,
        }
    }

    /// The same event owning its item, for sinks that keep events.
    #[cfg(test)]
    pub(super) fn into_owned(self) -> Event<'static> {
        match self {
            Event::Put { id, item } => Event::Put {
                id,
                item: Cow::Owned(item.into_owned()),
            },
            Event::Unget {
                id,
                deliveries,
                item,
            } => Event::Unget {
                id,
                deliveries,
                item: Cow::Owned(item.into_owned()),
            },
            Event::Take { id } => Event::Take { id },
            Event::Withdraw { id } => Event::Withdraw { id },
            Event::Reserve { id } => Event::Reserve { id },
            Event::Ack { id } => Event::Ack { id },
            Event::Requeue { id } => Event::Requeue { id },
            Event::DeadLetter { id, to } => Event::DeadLetter {
                id,
                to: Cow::Owned(to.into_owned()),
            },
            Event::Clear { count } => Event::Clear { count },
        }
    }
}

/// Where a server's named queues send their events: the journal, or a test's recorder.
/// A queue is named to it once, by [`EventSink::declare`], before its first event.
///
/// [`EventSink::emit`] is called with the emitting queue's lock held, so the sink sees
/// each queue's events in the order they happened, and must not wait there (buffering
/// is a memcpy). Everything that may wait on I/O is in [`EventSink::commit`], which
/// queues call with no lock held.
pub trait EventSink: Send + Sync + fmt::Debug {
    /// The number the events of queue `name` carry, the same every time for one name
    /// (across restarts too, for a journal).
    ///
    /// # Errors
    /// The sink's own failure (a poisoned lock): the queue is not created.
    fn declare(&self, name: &str) -> Result<u32>;

    /// A fresh id for a new item, never 0 (items of queues without a sink have id 0).
    fn item_id(&self) -> u64;

    /// Whether the sink can keep `items`, asked before any of them is stored.
    ///
    /// # Errors
    /// Why not (an item too large for the journal, a backlog of failed writes): the
    /// put is refused and nothing is emitted.
    fn admit(&self, items: &[Fragment]) -> Result<()>;

    /// Takes one event of queue number `queue` (no I/O) and returns a ticket for
    /// [`EventSink::commit`].
    fn emit(&self, queue: u32, event: &Event<'_>) -> u64;

    /// Waits until every event up to `ticket` is durable.
    ///
    /// # Errors
    /// The write failed: the caller must not acknowledge what it emitted.
    fn commit(&self, ticket: u64) -> Result<()>;
}

/// One queue's line to the sink: the sink and the number the queue's events carry.
#[derive(Clone, Debug)]
pub(super) struct QueueSink {
    sink: Arc<dyn EventSink>,
    queue: u32,
}

impl QueueSink {
    /// Declares queue `name` to `sink`.
    pub(super) fn declare(sink: &Arc<dyn EventSink>, name: &str) -> Result<QueueSink> {
        Ok(QueueSink {
            sink: sink.clone(),
            queue: sink.declare(name)?,
        })
    }

    /// Hands `event` to the sink. Returns the ticket to commit before the reply, if the
    /// event is one a reply waits for.
    pub(super) fn emit(&self, event: Event<'_>) -> Option<u64> {
        let ticket = self.sink.emit(self.queue, &event);
        (event.durability() == Durability::BeforeReply).then_some(ticket)
    }

    pub(super) fn item_id(&self) -> u64 {
        self.sink.item_id()
    }

    pub(super) fn admit(&self, items: &[Fragment]) -> Result<()> {
        self.sink.admit(items)
    }

    pub(super) fn commit(&self, ticket: u64) -> Result<()> {
        self.sink.commit(ticket)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::journal::{Recovered, RecoveredQueue};
    use crate::queues::{always_alive, Policy, QueueMap, Wait};
    use crate::{Error, Value};

    /// A sink that keeps every event in memory, with its queue's name.
    #[derive(Debug, Default)]
    struct Recorder {
        /// Queue names, by number.
        names: Mutex<Vec<String>>,
        events: Mutex<Vec<(String, Event<'static>)>>,
        last_id: AtomicU64,
        /// `admit` refuses every put.
        refuse: AtomicBool,
        /// `commit` fails, as a journal write does on a full disk.
        fail_commits: AtomicBool,
    }

    impl EventSink for Recorder {
        fn declare(&self, name: &str) -> Result<u32> {
            let mut names = self.names.lock().unwrap();
            let n = match names.iter().position(|n| n == name) {
                Some(n) => n,
                None => {
                    names.push(name.to_string());
                    names.len() - 1
                }
            };
            Ok(n as u32)
        }

        fn item_id(&self) -> u64 {
            self.last_id.fetch_add(1, Ordering::SeqCst) + 1
        }

        fn admit(&self, _items: &[Fragment]) -> Result<()> {
            match self.refuse.load(Ordering::SeqCst) {
                true => Err(Error::Value("refused by the sink".into())),
                false => Ok(()),
            }
        }

        fn emit(&self, queue: u32, event: &Event<'_>) -> u64 {
            let name = self.names.lock().unwrap()[queue as usize].clone();
            let mut events = self.events.lock().unwrap();
            events.push((name, event.clone().into_owned()));
            events.len() as u64
        }

        fn commit(&self, _ticket: u64) -> Result<()> {
            match self.fail_commits.load(Ordering::SeqCst) {
                true => Err(Error::io("writing", std::io::Error::other("disk full"))),
                false => Ok(()),
            }
        }
    }

    impl Recorder {
        /// The events emitted since the last call.
        fn take(&self) -> Vec<(String, Event<'static>)> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    const ALIVE: &dyn Fn() -> bool = &always_alive;

    fn item(v: i64) -> Fragment {
        Fragment::encode(&Value::from(v)).unwrap()
    }

    fn int(f: &Fragment) -> i64 {
        f.decode().unwrap().as_int().unwrap()
    }

    fn put(id: u64, v: i64) -> Event<'static> {
        Event::Put {
            id,
            item: Cow::Owned(item(v)),
        }
    }

    fn unget(id: u64, deliveries: u32, v: i64) -> Event<'static> {
        Event::Unget {
            id,
            deliveries,
            item: Cow::Owned(item(v)),
        }
    }

    /// `events`, all of queue `q`.
    fn on(q: &str, events: Vec<Event<'static>>) -> Vec<(String, Event<'static>)> {
        events.into_iter().map(|e| (q.to_string(), e)).collect()
    }

    fn recorded(policy: Policy) -> (Arc<Recorder>, QueueMap) {
        let rec = Arc::new(Recorder::default());
        let map = QueueMap::with_sink(policy, rec.clone(), Vec::new()).unwrap();
        (rec, map)
    }

    #[test]
    fn puts_gets_and_leases_emit_one_event_per_item() {
        let (rec, map) = recorded(Policy::default());
        let q = map.create("q").unwrap();
        q.put(item(7), Wait::No, ALIVE).unwrap();
        q.put_many(vec![item(8), item(9)], Wait::No, ALIVE).unwrap();
        assert_eq!(rec.take(), on("q", vec![put(1, 7), put(2, 8), put(3, 9)]));
        q.get(Wait::No, ALIVE).unwrap();
        q.get_many(5, Wait::No, ALIVE).unwrap();
        let taken = (1..=3).map(|id| Event::Take { id }).collect();
        assert_eq!(rec.take(), on("q", taken));
        q.put_many(vec![item(10), item(11)], Wait::No, ALIVE)
            .unwrap();
        let r = q.reserve_many(1, 2, None, Wait::No, ALIVE).unwrap();
        q.touch(r[0].lease, Some(Duration::from_secs(60))).unwrap();
        q.ack(r[0].lease).unwrap();
        q.task_done().unwrap();
        q.set_maxsize(3).unwrap();
        let want = vec![
            put(4, 10),
            put(5, 11),
            // Half the waiting items, rounded up: one.
            Event::Reserve { id: 4 },
            Event::Ack { id: 4 },
        ];
        assert_eq!(rec.take(), on("q", want));
        // Anonymous queues have no sink.
        let anon = map.create_anonymous("Queue", 0).unwrap();
        anon.put(item(1), Wait::No, ALIVE).unwrap();
        anon.get(Wait::No, ALIVE).unwrap();
        assert_eq!(rec.take(), vec![]);
        assert_eq!(*rec.names.lock().unwrap(), vec!["q".to_string()]);
    }

    #[test]
    fn an_undelivered_reply_ungets_in_order_and_a_dead_waiter_takes_nothing() {
        let (rec, map) = recorded(Policy::default());
        let q = map.create("q").unwrap();
        let r = q.get(Wait::Forever, &|| false);
        assert!(matches!(r, Err(Error::Closed)), "{r:?}");
        assert_eq!(rec.take(), vec![], "a waiter whose peer left emits nothing");
        q.put_many(vec![item(1), item(2), item(3)], Wait::No, ALIVE)
            .unwrap();
        let taken = q.get_many(2, Wait::No, ALIVE).unwrap();
        q.unget(taken).unwrap();
        let want = vec![
            put(1, 1),
            put(2, 2),
            put(3, 3),
            Event::Take { id: 1 },
            Event::Take { id: 2 },
            // Back at the head, the first taken in front: pushed last.
            unget(2, 0, 2),
            unget(1, 0, 1),
        ];
        assert_eq!(rec.take(), on("q", want));
        // A reserved item carries its deliveries through an unget.
        let lease = q.reserve(9, None, Wait::No, ALIVE).unwrap().lease;
        map.release(&q, lease, None).unwrap();
        let t = q.get(Wait::No, ALIVE).unwrap();
        q.unget(vec![t]).unwrap();
        let want = vec![
            Event::Reserve { id: 1 },
            Event::Requeue { id: 1 },
            Event::Take { id: 1 },
            unget(1, 1, 1),
        ];
        assert_eq!(rec.take(), on("q", want));
    }

    #[test]
    fn a_put_the_sink_cannot_keep_is_refused_or_withdrawn() {
        let (rec, map) = recorded(Policy::default());
        let q = map.create("q").unwrap();
        rec.refuse.store(true, Ordering::SeqCst);
        assert!(q.put(item(1), Wait::No, ALIVE).is_err());
        assert_eq!(rec.take(), vec![], "refused before anything is stored");
        rec.refuse.store(false, Ordering::SeqCst);
        rec.fail_commits.store(true, Ordering::SeqCst);
        let err = q
            .put_many(vec![item(2), item(3)], Wait::No, ALIVE)
            .unwrap_err();
        assert!(err.to_string().contains("not stored"), "{err}");
        let want = vec![
            put(1, 2),
            put(2, 3),
            Event::Withdraw { id: 1 },
            Event::Withdraw { id: 2 },
        ];
        assert_eq!(rec.take(), on("q", want));
        assert!(q.is_empty().unwrap());
        // An unget waits for its event too (and reports a failed write, its item back
        // in the queue all the same); the rest never commit.
        assert!(q.unget(vec![crate::queues::Taken::new(item(4))]).is_err());
        q.get(Wait::No, ALIVE).unwrap();
        assert_eq!(
            rec.take(),
            on("q", vec![unget(0, 0, 4), Event::Take { id: 0 }])
        );
    }

    #[test]
    fn every_way_a_lease_ends_emits_its_event() {
        let (rec, map) = recorded(Policy::default());
        let q = map.create("q").unwrap();
        q.put_many((1..=4).map(item).collect(), Wait::No, ALIVE)
            .unwrap();
        rec.take();
        // Released now, and released with a delay: both requeued at once for the sink,
        // and nothing more when the delay is over.
        let a = q.reserve(1, None, Wait::No, ALIVE).unwrap().lease;
        map.release(&q, a, None).unwrap();
        let a = q.reserve(1, None, Wait::No, ALIVE).unwrap().lease;
        map.release(&q, a, Some(Duration::from_millis(1))).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        map.expire().unwrap();
        assert_eq!(q.stats().unwrap().delayed, 0);
        let want = vec![
            Event::Reserve { id: 1 },
            Event::Requeue { id: 1 },
            Event::Reserve { id: 1 },
            Event::Requeue { id: 1 },
        ];
        assert_eq!(rec.take(), on("q", want));
        // An expired lease, then an owner's connection closing: the newest lease goes
        // back first, so the oldest ends up in front.
        q.reserve(2, Some(Duration::from_millis(1)), Wait::No, ALIVE)
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(map.expire().unwrap(), 1);
        q.reserve(3, None, Wait::No, ALIVE).unwrap();
        q.reserve(3, None, Wait::No, ALIVE).unwrap();
        assert_eq!(map.release_owner(3).unwrap(), 2);
        let want = vec![
            Event::Reserve { id: 1 },
            Event::Requeue { id: 1 },
            Event::Reserve { id: 1 },
            Event::Reserve { id: 2 },
            Event::Requeue { id: 2 },
            Event::Requeue { id: 1 },
        ];
        assert_eq!(rec.take(), on("q", want));
    }

    #[test]
    fn max_deliveries_dead_letters_once_and_the_dead_queue_adds_nothing() {
        let (rec, map) = recorded(Policy {
            max_deliveries: 2,
            ..Policy::default()
        });
        let q = map.create("d").unwrap();
        q.put_many(vec![item(1), item(2)], Wait::No, ALIVE).unwrap();
        rec.take();
        let a = q.reserve(1, None, Wait::No, ALIVE).unwrap().lease;
        map.release(&q, a, None).unwrap();
        let a = q.reserve(1, None, Wait::No, ALIVE).unwrap().lease;
        // A delay does not save an item that used up its deliveries.
        map.release(&q, a, Some(Duration::from_secs(60))).unwrap();
        let dead = map.create("d.dead").unwrap();
        assert_eq!(int(&dead.get(Wait::No, ALIVE).unwrap().item), 1);
        let dead_letter = Event::DeadLetter {
            id: 1,
            to: Cow::Borrowed("d.dead"),
        };
        let mut want = on(
            "d",
            vec![
                Event::Reserve { id: 1 },
                Event::Requeue { id: 1 },
                Event::Reserve { id: 1 },
                dead_letter,
            ],
        );
        want.extend(on("d.dead", vec![Event::Take { id: 1 }]));
        assert_eq!(rec.take(), want);
        // An owner's loss dead-letters the same way.
        for _ in 0..2 {
            q.reserve(5, None, Wait::No, ALIVE).unwrap();
            map.release_owner(5).unwrap();
        }
        let want = vec![
            Event::Reserve { id: 2 },
            Event::Requeue { id: 2 },
            Event::Reserve { id: 2 },
            Event::DeadLetter {
                id: 2,
                to: Cow::Borrowed("d.dead"),
            },
        ];
        assert_eq!(rec.take(), on("d", want));
    }

    #[test]
    fn an_immediate_shutdown_clears_waiting_and_delayed_items_but_not_leases() {
        let (rec, map) = recorded(Policy::default());
        let q = map.create("s").unwrap();
        q.put_many((1..=3).map(item).collect(), Wait::No, ALIVE)
            .unwrap();
        let delayed = q.reserve(1, None, Wait::No, ALIVE).unwrap().lease;
        map.release(&q, delayed, Some(Duration::from_secs(60)))
            .unwrap();
        let kept = q.reserve(1, None, Wait::No, ALIVE).unwrap().lease;
        q.shutdown(false).unwrap();
        assert_eq!(rec.take().len(), 3 + 3, "a plain shutdown is no event");
        q.shutdown(true).unwrap();
        // Item 1 (delayed) and item 3 (waiting); item 2 stays leased.
        assert_eq!(rec.take(), on("s", vec![Event::Clear { count: 2 }]));
        q.ack(kept).unwrap();
        assert_eq!(rec.take(), on("s", vec![Event::Ack { id: 2 }]));
    }

    #[test]
    fn recovered_leases_are_requeued_newest_first() {
        let rec = Arc::new(Recorder::default());
        let recovered = |id: u64| Recovered {
            id,
            deliveries: 1,
            item: item(id as i64),
        };
        let queue = RecoveredQueue {
            name: "r".into(),
            ready: vec![recovered(5)],
            reserved: vec![recovered(3), recovered(4)],
        };
        let map = QueueMap::with_sink(Policy::default(), rec.clone(), vec![queue]).unwrap();
        let want = vec![Event::Requeue { id: 4 }, Event::Requeue { id: 3 }];
        assert_eq!(rec.take(), on("r", want));
        let q = map.create("r").unwrap();
        let got: Vec<i64> = q
            .get_many(3, Wait::No, ALIVE)
            .unwrap()
            .iter()
            .map(|t| int(&t.item))
            .collect();
        assert_eq!(got, vec![3, 4, 5]);
    }

    #[test]
    fn ack_put_stores_then_acks_and_an_unknown_lease_emits_nothing() {
        let (rec, map) = recorded(Policy::default());
        let tasks = map.create("tasks").unwrap();
        tasks.put(item(1), Wait::No, ALIVE).unwrap();
        let lease = tasks.reserve(1, None, Wait::No, ALIVE).unwrap().lease;
        rec.take();
        map.ack_put(&tasks, lease, "results", item(10), Wait::No, ALIVE)
            .unwrap();
        let mut want = on("results", vec![put(2, 10)]);
        want.extend(on("tasks", vec![Event::Ack { id: 1 }]));
        assert_eq!(rec.take(), want);
        assert!(map
            .ack_put(&tasks, lease, "results", item(11), Wait::No, ALIVE)
            .is_err());
        assert_eq!(rec.take(), vec![]);
    }

    /// What a sink knows after taking a run of events: each queue's waiting items in
    /// order and its reserved ones, rebuilt from the events alone.
    #[derive(Debug, Default)]
    struct Model {
        /// Waiting (head first) and reserved item ids, by queue name.
        queues: HashMap<String, (Vec<u64>, Vec<u64>)>,
        items: HashMap<u64, i64>,
        /// The kinds of event applied, so a run can tell what it tested.
        seen: HashSet<std::mem::Discriminant<Event<'static>>>,
    }

    impl Model {
        fn apply(&mut self, queue: &str, event: &Event<'static>) {
            self.seen.insert(std::mem::discriminant(event));
            let (ready, reserved) = self.queues.entry(queue.to_string()).or_default();
            let remove = |from: &mut Vec<u64>, id: u64| {
                let at = from.iter().position(|&x| x == id);
                from.remove(at.unwrap_or_else(|| panic!("{queue}: {event:?} of no such item")));
            };
            match event {
                Event::Put { id, item } => {
                    ready.push(*id);
                    self.items.insert(*id, int(item));
                }
                Event::Unget { id, item, .. } => {
                    ready.insert(0, *id);
                    self.items.insert(*id, int(item));
                }
                Event::Take { id } | Event::Withdraw { id } => remove(ready, *id),
                Event::Reserve { id } => {
                    remove(ready, *id);
                    reserved.push(*id);
                }
                Event::Ack { id } => remove(reserved, *id),
                Event::Requeue { id } => {
                    remove(reserved, *id);
                    ready.insert(0, *id);
                }
                Event::DeadLetter { id, to } => {
                    remove(reserved, *id);
                    self.queues.entry(to.to_string()).or_default().0.push(*id);
                }
                Event::Clear { .. } => ready.clear(),
            }
        }

        fn values(&self, ids: impl IntoIterator<Item = u64>) -> Vec<i64> {
            ids.into_iter().map(|id| self.items[&id]).collect()
        }
    }

    /// Random operations (every undo path included) against a map recording its events;
    /// every 50 steps the events so far are replayed into a [`Model`], which must hold
    /// exactly what the queues hold. Returns the kinds of event seen.
    fn replay_run(seed: u64, steps: usize) -> HashSet<std::mem::Discriminant<Event<'static>>> {
        let (rec, map) = recorded(Policy {
            max_deliveries: 2,
            ..Policy::default()
        });
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut next = move |n: u64| rng.gen_range(0..n);
        let names = ["a", "b"];
        let queues = names.map(|name| map.create(name).unwrap());
        let mut model = Model::default();
        // (queue, lease, value) of the leases held, and (queue, value) of the items
        // released with a delay: waiting for the sink, not yet for getters.
        let mut leases: Vec<(usize, u64, i64)> = Vec::new();
        let mut delayed: Vec<(usize, i64)> = Vec::new();
        let mut value = 0;
        let mut fresh = |n: u64| -> Vec<Fragment> {
            (0..n)
                .map(|_| {
                    value += 1;
                    item(value)
                })
                .collect()
        };
        for step in 0..steps {
            let which = next(2) as usize;
            let q = &queues[which];
            match next(100) {
                0..=24 => {
                    let _ = q.put_many(fresh(1 + next(3)), Wait::No, ALIVE);
                }
                25..=29 => {
                    rec.fail_commits.store(true, Ordering::SeqCst);
                    let _ = q.put_many(fresh(1 + next(2)), Wait::No, ALIVE);
                    rec.fail_commits.store(false, Ordering::SeqCst);
                }
                30..=39 => {
                    let _ = q.get_many(1 + next(3) as usize, Wait::No, ALIVE);
                }
                40..=44 => {
                    // A reply that could not be delivered.
                    if let Ok(taken) = q.get_many(1 + next(3) as usize, Wait::No, ALIVE) {
                        q.unget(taken).unwrap();
                    }
                }
                45..=59 => {
                    let owner = next(3);
                    let expiry = (next(4) == 0).then_some(Duration::from_nanos(1));
                    let max = 1 + next(2) as usize;
                    if let Ok(got) = q.reserve_many(owner, max, expiry, Wait::No, ALIVE) {
                        leases.extend(got.iter().map(|r| (which, r.lease, int(&r.item))));
                    }
                }
                60..=84 if !leases.is_empty() => {
                    let (qi, lease, v) = leases.swap_remove(next(leases.len() as u64) as usize);
                    let q = &queues[qi];
                    match next(3) {
                        0 => q.ack(lease).map(drop).unwrap(),
                        1 => map.release(q, lease, None).unwrap(),
                        _ => {
                            let before = q.stats().unwrap().delayed;
                            map.release(q, lease, Some(Duration::from_secs(600)))
                                .unwrap();
                            if q.stats().unwrap().delayed > before {
                                delayed.push((qi, v));
                            }
                        }
                    }
                }
                85..=92 => {
                    map.release_owner(next(3)).unwrap();
                }
                93..=98 => {
                    map.expire().unwrap();
                }
                99 if next(4) == 0 => {
                    q.shutdown(true).unwrap();
                    delayed.retain(|&(qi, _)| qi != which);
                }
                _ => {}
            }
            // Leases that expired or whose owner left are no longer held.
            leases.retain(|&(qi, lease, _)| queues[qi].check_lease(lease).is_ok());
            if step % 50 == 49 || step + 1 == steps {
                check(&map, &rec, &mut model, &leases, &delayed, names);
            }
        }
        model.seen
    }

    /// Replays the events recorded so far into `model` and compares it with every
    /// queue of `map`: waiting items (less those released with a delay) in order, and
    /// reserved items against the leases held.
    fn check(
        map: &QueueMap,
        rec: &Recorder,
        model: &mut Model,
        leases: &[(usize, u64, i64)],
        delayed: &[(usize, i64)],
        names: [&str; 2],
    ) {
        for (name, event) in rec.take() {
            model.apply(&name, &event);
        }
        for q in map.queues().unwrap() {
            let (ready, reserved) = model.queues.get(q.name()).cloned().unwrap_or_default();
            let mut want = model.values(ready);
            want.retain(|v| !delayed.iter().any(|d| d.1 == *v));
            let taken = q.get_many(usize::MAX, Wait::No, ALIVE).unwrap_or_default();
            let got: Vec<i64> = taken.iter().map(|t| int(&t.item)).collect();
            assert_eq!(got, want, "waiting in {}", q.name());
            q.unget(taken).unwrap();
            let mut want = model.values(reserved);
            want.sort_unstable();
            let mut held: Vec<i64> = leases
                .iter()
                .filter(|l| names[l.0] == q.name())
                .map(|l| l.2)
                .collect();
            held.sort_unstable();
            assert_eq!(held, want, "leased in {}", q.name());
        }
        // The gets and ungets of the comparison are events too.
        for (name, event) in rec.take() {
            model.apply(&name, &event);
        }
    }

    #[test]
    fn replaying_the_events_rebuilds_every_queue() {
        let mut seen = HashSet::new();
        for seed in 1..=40 {
            match std::panic::catch_unwind(|| replay_run(seed, 600)) {
                Ok(kinds) => seen.extend(kinds),
                Err(e) => {
                    eprintln!("replaying the events failed with seed {seed}");
                    std::panic::resume_unwind(e);
                }
            }
        }
        assert_eq!(seen.len(), 9, "every kind of event was replayed");
    }
}
