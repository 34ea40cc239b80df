//! The worker loop: take a task, do it, put its result back, until the rounds run out,
//! the job ends or a stop is asked for. `distq-worker` is this loop with two handlers
//! (squaring, and a shell command per task); a Rust program becomes a worker with its own.
//!
//! What the loop guarantees, so that a handler need not: on a server with leases (distq's)
//! each task is reserved, and its result goes in with `ack_put`, so a worker that dies or
//! loses its server mid-task loses nothing and never hands a new run an old run's result;
//! a slow task's lease is renewed while it runs; a stopping worker gives its tasks back.
//! Against Python's own server (no leases) it falls back to `get`, `put` and `task_done`.
//! The loop prints nothing: it reports what happens as [`Event`]s.
//!
//! ```
//! use distq::worker::{self, Done, Handler, Stop, WorkerConfig};
//! use distq::{AuthKey, Manager, Server, ServerConfig, Value};
//! use std::time::Duration;
//!
//! struct Double;
//! impl Handler for Double {
//!     fn run(&self, task: &Value, _attempt: u32, _stop: &Stop) -> Done {
//!         let n = task.as_int().unwrap_or(0);
//!         Done::Result { value: Value::Int(2 * n), succeeded: true, summary: String::new() }
//!     }
//!     fn instant(&self) -> bool {
//!         true
//!     }
//! }
//!
//! let running = Server::bind("127.0.0.1:0", ServerConfig::new(AuthKey::new("k")))?.spawn()?;
//! let manager = Manager::connect(running.local_addr(), AuthKey::new("k"))?;
//! let tasks = manager.queue("get_task_queue")?;
//! tasks.put(21)?;
//! tasks.shutdown(false)?; // the job is over once the queue is drained
//! let config = WorkerConfig { rounds: None, ..WorkerConfig::default() };
//! worker::run(&manager, &config, &Double, &Stop::new(), &|_| {})?;
//! let results = manager.queue("get_result_queue")?;
//! assert_eq!(results.get(Duration::from_secs(1))?.as_int(), Some(42));
//! # drop((tasks, results));
//! running.shutdown()?;
//! # Ok::<(), distq::Error>(())
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::client::{Manager, QueueProxy};
use crate::error::{Error, Result};
use crate::pickle::Value;
use crate::text;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The queue tasks come from (a registered name, as Python's `register` gives it).
    pub task_queue: String,
    /// The queue results go to.
    pub result_queue: String,
    /// Rounds of "take a task" to run, whether or not a take finds one; `None`: until the
    /// job ends (the master shuts the task queue down) or a stop is asked for.
    pub rounds: Option<u64>,
    /// How long each take waits for a task. It is also how soon an idle worker notices a
    /// stop request, so keep it short.
    pub get_timeout: Duration,
    /// Take tasks under leases when the server has them (see the module docs).
    pub leases: bool,
    /// Tasks run at once, each on its own connections.
    pub concurrency: usize,
    /// How many more times a failed task is tried before its failed result is put.
    pub retries: u32,
    /// How long a task given back for a retry waits before it can be taken again.
    pub retry_delay: Duration,
}

impl Default for WorkerConfig {
    /// The classic demo's queues, one task at a time, forever, under leases, no retries.
    fn default() -> WorkerConfig {
        WorkerConfig {
            task_queue: "get_task_queue".into(),
            result_queue: "get_result_queue".into(),
            rounds: None,
            get_timeout: Duration::from_secs(1),
            leases: true,
            concurrency: 1,
            retries: 0,
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// What a [`Handler`] made of one attempt at a task.
#[derive(Debug)]
pub enum Done {
    /// The result to put. A failed one (`succeeded: false`) is retried while
    /// [`WorkerConfig::retries`] allow, and put only after the last attempt.
    Result {
        /// What goes to the result queue.
        value: Value,
        /// Whether the attempt worked.
        succeeded: bool,
        /// One line about the attempt for the caller's log (may be empty).
        summary: String,
    },
    /// The stop request ended the attempt: the task goes back to the queue.
    Stopped,
}

/// The work itself. Called from [`WorkerConfig::concurrency`] threads at once.
pub trait Handler: Sync {
    /// Does `task`; `attempt` counts from 1 (this worker's attempts at it). A long
    /// handler should watch `stop` and return [`Done::Stopped`] when it is requested.
    fn run(&self, task: &Value, attempt: u32, stop: &Stop) -> Done;

    /// Whether [`Handler::run`] returns at once (no I/O, no sleep). Instant tasks are
    /// leased [`PREFETCH`] at a time and need no lease renewal.
    fn instant(&self) -> bool {
        false
    }
}

/// What the loop reports as it goes; the caller decides what to print.
#[derive(Debug)]
pub enum Event<'a> {
    /// Leases were asked for but the server has none (e.g. Python's `BaseManager`): a
    /// task a worker is running is lost if it dies.
    NoLeases,
    /// A take found no task within [`WorkerConfig::get_timeout`].
    Empty,
    /// These tasks are about to run (a batch of instant ones, or one).
    Running(&'a [Value]),
    /// An attempt ended; `will_retry`: it failed and the task will be tried again.
    Attempted {
        /// The task.
        task: &'a Value,
        /// The handler's line about it.
        summary: &'a str,
        /// Whether the task will be tried again.
        will_retry: bool,
    },
    /// The server refused to store a result (`ack_put`: its lease is gone, so the task
    /// goes to another worker, or the result queue refused it).
    ResultRefused {
        /// The task whose result was dropped.
        task: &'a Value,
        /// The server's reason.
        message: &'a str,
    },
    /// A result was put but its task could not be acked (the connection was lost and the
    /// task requeued: another worker may run it again, at least once delivery).
    AckFailed {
        /// The task.
        task: &'a Value,
        /// Why.
        error: &'a Error,
    },
    /// A task this worker will not finish (it is stopping) went back to the queue.
    GaveBack(&'a Value),
}

/// A request to stop, shared by the loop and whatever runs tasks (a signal handler sets
/// it): the loop takes nothing new and gives back what it holds; the first
/// [`Stop::request`] ends running commands as a timeout would (see [`crate::exec::run`]),
/// a second one kills them at once.
#[derive(Debug, Default)]
pub struct Stop(AtomicU8);

impl Stop {
    /// Not stopping.
    pub const fn new() -> Stop {
        Stop(AtomicU8::new(0))
    }

    /// Asks once more (see the type's docs).
    pub fn request(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some((n + 1).min(2)));
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }

    /// Whether it was requested twice.
    pub(crate) fn urgent(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 1
    }
}

/// How many instant tasks a slot leases per round trip when the server can lease
/// several at once (`reserve_many`, `ack_put_many`): the server gives at most half of
/// what waits, so a short queue still feeds every worker.
pub const PREFETCH: u64 = 16;

/// How often a running task's lease is extended: inside any `--lease-timeout` of two
/// seconds or more, for one tiny call per second per running task.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// Runs the worker on `manager` until its rounds run out, the master ends the job (shuts
/// the task queue down) or `stop` is requested.
///
/// # Errors
/// The first error of any slot (the others stop at their next round): the server lost
/// for longer than the manager's reconnect window ([`Error::Io`]), a refused
/// authentication, a queue the server does not have.
pub fn run(
    manager: &Manager,
    config: &WorkerConfig,
    handler: &dyn Handler,
    stop: &Stop,
    events: &(dyn Fn(Event) + Sync),
) -> Result<()> {
    let tasks = manager.queue(&config.task_queue)?;
    let leases = config.leases && tasks.exposes("reserve");
    let batches = tasks.exposes("reserve_many") && tasks.exposes("ack_put_many");
    let shared = Slots {
        config,
        handler,
        stop,
        events,
        manager,
        leases,
        task_done: tasks.exposes("task_done"),
        ack_put: tasks.exposes("ack_put"),
        prefetch: leases && batches && handler.instant(),
        rounds: AtomicU64::new(config.rounds.unwrap_or(u64::MAX)),
        failed: AtomicBool::new(false),
        failures: Mutex::new(HashMap::new()),
    };
    drop(tasks);
    if config.leases && !leases {
        events(Event::NoLeases);
    }
    std::thread::scope(|s| {
        let slots: Vec<_> = (0..config.concurrency.max(1))
            .map(|_| s.spawn(|| shared.slot()))
            .collect();
        slots
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a worker slot panicked".into())))
            })
            .fold(Ok(()), Result::and)
    })
}

/// The worker's slots and what they share.
struct Slots<'a> {
    config: &'a WorkerConfig,
    handler: &'a dyn Handler,
    stop: &'a Stop,
    events: &'a (dyn Fn(Event) + Sync),
    manager: &'a Manager,
    leases: bool,
    /// Whether to call `task_done()` after each result of a task taken without a lease
    /// (the queue exposes it: Python's `queue.Queue` and `JoinableQueue` do).
    task_done: bool,
    /// Whether the server has `ack_put` (distq's): result and ack in one round trip.
    ack_put: bool,
    /// Instant tasks taken and completed in batches (see [`Slots::prefetch_loop`]).
    prefetch: bool,
    /// Rounds of take left (`u64::MAX`: no limit).
    rounds: AtomicU64,
    /// Set when a slot fails, so the others stop at their next round.
    failed: AtomicBool,
    /// Failed attempts per task this worker gave back for a retry, by task key. Only this
    /// worker's attempts are counted: with several workers a task may be tried up to
    /// (retries + 1) times by each.
    failures: Mutex<HashMap<String, u32>>,
}

impl Slots<'_> {
    /// One task at a time, on its own connections: leases belong to the connection that
    /// took them, and a blocked reserve must not hold up another slot's ack.
    fn slot(&self) -> Result<()> {
        let result = self.slot_loop();
        if result.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        result
    }

    fn going(&self) -> bool {
        !self.failed.load(Ordering::SeqCst) && !self.stop.requested()
    }

    fn slot_loop(&self) -> Result<()> {
        let tasks = self.manager.queue(&self.config.task_queue)?;
        let results = self.manager.queue(&self.config.result_queue)?;
        if self.prefetch {
            return self.prefetch_loop(&tasks, &results);
        }
        while self.going() && self.take_rounds(1) == 1 {
            let timeout = self.config.get_timeout;
            let taken = if self.leases {
                tasks
                    .reserve(timeout)
                    .map(|(lease, task)| (Some(lease), task))
            } else {
                tasks.get(timeout).map(|task| (None, task))
            };
            match taken {
                Ok((lease, task)) if self.stop.requested() => {
                    self.give_back(&tasks, lease, &task)?
                }
                Ok((lease, task)) => {
                    (self.events)(Event::Running(std::slice::from_ref(&task)));
                    if let Some(result) = self.attempts(&tasks, lease, &task)? {
                        self.deliver(&tasks, &results, lease, &task, result)?;
                    }
                }
                // The master ended the job (it shut the task queue down): nothing more to take.
                Err(Error::ShutDown) => break,
                Err(Error::Empty) => (self.events)(Event::Empty),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes up to `want` rounds of the budget; returns how many.
    fn take_rounds(&self, want: u64) -> u64 {
        let mut got = 0;
        let _ = self
            .rounds
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u64::MAX => {
                    got = want;
                    Some(u64::MAX)
                }
                n => {
                    got = want.min(n);
                    Some(n - got)
                }
            });
        got
    }

    /// Returns rounds taken but not used (a prefetch that got fewer tasks than it asked for).
    fn return_rounds(&self, unused: u64) {
        let _ = self
            .rounds
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                u64::MAX => None,
                n => Some(n.saturating_add(unused)),
            });
    }

    /// Instant tasks on a distq server: [`PREFETCH`] at a time under leases
    /// (`reserve_many`), their results put and acked in one round trip (`ack_put_many`):
    /// 2 round trips per batch instead of 2 per task. Each task still counts as one
    /// round, and a worker killed with prefetched leases loses nothing: its connection
    /// closes and they are requeued.
    fn prefetch_loop(&self, tasks: &QueueProxy, results: &QueueProxy) -> Result<()> {
        while self.going() {
            let rounds = self.take_rounds(PREFETCH);
            if rounds == 0 {
                break;
            }
            let batch = match tasks.reserve_many(rounds as usize, self.config.get_timeout) {
                Ok(batch) => batch,
                Err(Error::ShutDown) => break,
                Err(Error::Empty) => {
                    self.return_rounds(rounds - 1);
                    (self.events)(Event::Empty);
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.return_rounds(rounds - batch.len() as u64);
            let (leases, batch): (Vec<u64>, Vec<Value>) = batch.into_iter().unzip();
            if self.stop.requested() {
                for (lease, task) in leases.iter().zip(&batch) {
                    self.give_back(tasks, Some(*lease), task)?;
                }
                break;
            }
            (self.events)(Event::Running(&batch));
            let mut values = Vec::with_capacity(batch.len());
            for task in &batch {
                match self.handler.run(task, 1, self.stop) {
                    Done::Result { value, .. } => values.push(value),
                    // An instant handler that stops anyway: this batch is not ours to finish.
                    Done::Stopped => {
                        for (lease, task) in leases.iter().zip(&batch) {
                            self.give_back(tasks, Some(*lease), task)?;
                        }
                        return Ok(());
                    }
                }
            }
            match tasks.ack_put_many(&leases, values.clone(), &self.config.result_queue) {
                // One lease was gone (expired, say): nothing was stored; each result then
                // goes on its own, so only that one is dropped.
                Err(Error::Remote { class, .. }) if class.ends_with("ValueError") => {
                    for ((lease, task), value) in leases.iter().zip(&batch).zip(values) {
                        self.deliver(tasks, results, Some(*lease), task, value)?;
                    }
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Runs `task` until an attempt succeeds, retries run out or the worker stops.
    /// Returns the result to put, or `None` if the task went back to the queue (for a
    /// retry, or because the worker is stopping).
    fn attempts(
        &self,
        tasks: &QueueProxy,
        lease: Option<u64>,
        task: &Value,
    ) -> Result<Option<Value>> {
        // Attempts are remembered only when there can be more than one.
        let key = (self.config.retries > 0).then(|| {
            text::open_envelope(task)
                .id
                .map_or_else(|| task.to_string(), |id| format!("#{id}"))
        });
        let failures = || self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempt = key
            .as_ref()
            .map_or(0, |key| failures().get(key).copied().unwrap_or(0))
            + 1;
        loop {
            // An instant task needs no toucher thread.
            let keep = lease.filter(|_| !self.handler.instant());
            let done = keep_lease(tasks, keep, || self.handler.run(task, attempt, self.stop));
            let Done::Result {
                value,
                succeeded,
                summary,
            } = done
            else {
                self.give_back(tasks, lease, task)?;
                return Ok(None);
            };
            let will_retry = !succeeded && attempt <= self.config.retries;
            if !summary.is_empty() {
                (self.events)(Event::Attempted {
                    task,
                    summary: &summary,
                    will_retry,
                });
            }
            let Some(key) = key.as_ref().filter(|_| will_retry) else {
                if let Some(key) = &key {
                    failures().remove(key);
                }
                return Ok(Some(value));
            };
            match lease {
                // Given back to the queue, so that another worker (or this one, later)
                // retries it after the delay; the lease is ended either way.
                Some(lease) => {
                    failures().insert(key.clone(), attempt);
                    tasks.release(lease, Some(self.config.retry_delay))?;
                    return Ok(None);
                }
                // Without leases, giving it back would mean a new put at the tail and no
                // memory of the attempts: retry here instead.
                None => {
                    std::thread::sleep(self.config.retry_delay);
                    attempt += 1;
                }
            }
        }
    }

    /// Puts a task's result and completes the task. A leased task on a distq server goes
    /// in one `ack_put`, which stores nothing if the lease is gone: a worker that lost its
    /// server mid-task (killed master, restart) and reconnected to a new one never hands
    /// the new run a result of the old one. Elsewhere: `put`, then `ack` or `task_done`.
    fn deliver(
        &self,
        tasks: &QueueProxy,
        results: &QueueProxy,
        lease: Option<u64>,
        task: &Value,
        result: Value,
    ) -> Result<()> {
        match lease {
            Some(lease) if self.ack_put => {
                match tasks.ack_put(lease, result, &self.config.result_queue) {
                    Err(Error::Remote { class, message }) if class.ends_with("ValueError") => {
                        (self.events)(Event::ResultRefused {
                            task,
                            message: &message,
                        });
                        Ok(())
                    }
                    other => other,
                }
            }
            Some(lease) => {
                results.put(result)?;
                if let Err(error) = tasks.ack(lease) {
                    (self.events)(Event::AckFailed {
                        task,
                        error: &error,
                    });
                }
                Ok(())
            }
            None => {
                results.put(result)?;
                if self.task_done {
                    // A master waiting in `task_queue.join()` counts these (an ack does
                    // the same for a leased task).
                    tasks.task_done()?;
                }
                Ok(())
            }
        }
    }

    /// Returns a task this worker will not finish to the queue: a leased one by ending
    /// its lease, so it keeps its place and delivery count; one taken with a plain `get`
    /// by putting it again, at the tail (the only way back without leases).
    fn give_back(&self, tasks: &QueueProxy, lease: Option<u64>, task: &Value) -> Result<()> {
        match lease {
            Some(lease) => tasks.release(lease, None)?,
            None => {
                tasks.put(task.clone())?;
                if self.task_done {
                    // The put counted a new unfinished task: the one we took is done.
                    tasks.task_done()?;
                }
            }
        }
        (self.events)(Event::GaveBack(task));
        Ok(())
    }
}

/// Runs `work` while another thread `touch`es the task's lease every [`TOUCH_EVERY`], so
/// a task that runs longer than the server's `--lease-timeout` is not requeued (and run
/// twice) while it is still making progress.
fn keep_lease<T>(tasks: &QueueProxy, lease: Option<u64>, work: impl FnOnce() -> T) -> T {
    let Some(lease) = lease else { return work() };
    let done = Mutex::new(false);
    let wake = Condvar::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut finished = done.lock().unwrap_or_else(|p| p.into_inner());
            while !*finished {
                let (guard, timeout) = wake
                    .wait_timeout(finished, TOUCH_EVERY)
                    .unwrap_or_else(|p| p.into_inner());
                finished = guard;
                if timeout.timed_out() && !*finished {
                    // A failed touch means the lease is already gone (the connection
                    // dropped): the ack will say so; nothing to do here.
                    let _ = tasks.touch(lease, None);
                }
            }
        });
        let result = work();
        *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
        result
    })
}
