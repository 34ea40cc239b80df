//! The library's worker loop (`distq::worker`) around handlers of a test's own, on an
//! embedded server: retries, a clean stop, batches, and Python's server (no leases).

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use distq::worker::{self, Done, Event, Handler, Stop, WorkerConfig};
use distq::{AuthKey, Error, Manager, Server, ServerConfig, Value};

const KEY: &str = "worker-loop";
const PY_SERVER: &str = include_str!("python/manager_server.py");

/// Polls `ready` until it holds; panics after 10 s.
fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn embedded() -> (distq::RunningServer, Manager) {
    let server = Server::bind("127.0.0.1:0", ServerConfig::new(AuthKey::new(KEY)))
        .unwrap()
        .spawn()
        .unwrap();
    let manager = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    (server, manager)
}

/// Asks the worker to stop when dropped, so that a failing assertion in a scope that
/// runs the worker ends the test instead of waiting for the worker for ever.
struct StopOnDrop<'a>(&'a Stop);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.request();
    }
}

/// What a run of the loop reported, in order, as text a test can match.
#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

impl Seen {
    fn record(&self, event: &Event) {
        let line = match event {
            Event::NoLeases => "no leases".to_string(),
            Event::Empty => return,
            Event::Running(tasks) => format!("running {}", tasks.len()),
            Event::Attempted {
                task,
                summary,
                will_retry,
            } => format!("attempted {task} {summary} retry={will_retry}"),
            Event::ResultRefused { task, message } => format!("refused {task} {message}"),
            Event::AckFailed { task, error } => format!("ack failed {task} {error}"),
            Event::GaveBack(task) => format!("gave back {task}"),
        };
        self.0.lock().unwrap().push(line);
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Runs the loop to its end on this thread; returns what it reported.
fn run_to_end(manager: &Manager, config: &WorkerConfig, handler: &dyn Handler) -> Vec<String> {
    let seen = Seen::default();
    worker::run(manager, config, handler, &Stop::new(), &|e| seen.record(&e)).unwrap();
    seen.lines()
}

/// Ints, sorted: results arrive in any order.
fn sorted_ints(values: impl IntoIterator<Item = Value>) -> Vec<i64> {
    let mut ints: Vec<i64> = values.into_iter().map(|v| v.as_int().unwrap()).collect();
    ints.sort_unstable();
    ints
}

/// Fails a task's first attempt, succeeds at the second.
struct Flaky;

impl Handler for Flaky {
    fn run(&self, task: &Value, attempt: u32, _stop: &Stop) -> Done {
        Done::Result {
            value: Value::from(format!("{task} at attempt {attempt}")),
            succeeded: attempt > 1,
            summary: format!("#{attempt}"),
        }
    }
}

#[test]
fn a_failed_attempt_is_retried_and_only_the_last_result_is_put() {
    let (server, manager) = embedded();
    let tasks = manager.queue("get_task_queue").unwrap();
    let results = manager.queue("get_result_queue").unwrap();
    tasks.put("t").unwrap();
    let config = WorkerConfig {
        retries: 1,
        retry_delay: Duration::from_millis(20),
        get_timeout: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    let stop = Stop::new();
    let seen = Seen::default();
    std::thread::scope(|s| {
        let worker =
            s.spawn(|| worker::run(&manager, &config, &Flaky, &stop, &|e| seen.record(&e)));
        let _stop = StopOnDrop(&stop);
        let result = results.get(Duration::from_secs(10)).unwrap();
        assert_eq!(result.as_str(), Some("'t' at attempt 2"));
        stop.request();
        worker.join().unwrap().unwrap();
    });
    assert!(matches!(results.get(Duration::ZERO), Err(Error::Empty)));
    assert!(matches!(tasks.get(Duration::ZERO), Err(Error::Empty)));
    assert_eq!(
        seen.lines(),
        [
            "running 1",
            "attempted 't' #1 retry=true",
            "running 1",
            "attempted 't' #2 retry=false"
        ]
    );
    drop((tasks, results));
    server.shutdown().unwrap();
}

/// Runs the loop with [`UntilStopped`] on another thread, asks it to stop once a task is
/// running, and returns what it reported.
fn stopped_while_running(manager: &Manager, config: &WorkerConfig) -> Vec<String> {
    let stop = Stop::new();
    let seen = Seen::default();
    std::thread::scope(|s| {
        let worker =
            s.spawn(|| worker::run(manager, config, &UntilStopped, &stop, &|e| seen.record(&e)));
        let _stop = StopOnDrop(&stop);
        wait_for("a task to be running", || {
            seen.lines()
                .last()
                .is_some_and(|l| l.starts_with("running"))
        });
        stop.request();
        worker.join().unwrap().unwrap();
    });
    seen.lines()
}

/// Runs until asked to stop, then says so.
struct UntilStopped;

impl Handler for UntilStopped {
    fn run(&self, _task: &Value, _attempt: u32, stop: &Stop) -> Done {
        while !stop.requested() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Done::Stopped
    }
}

#[test]
fn a_stopped_worker_gives_its_running_task_back() {
    let (server, manager) = embedded();
    let tasks = manager.queue("get_task_queue").unwrap();
    tasks.put(7).unwrap();
    let config = WorkerConfig {
        get_timeout: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    assert_eq!(
        stopped_while_running(&manager, &config),
        ["running 1", "gave back 7"]
    );
    // Back at the head of the queue, no longer leased.
    assert_eq!(tasks.get(Duration::from_secs(1)).unwrap().as_int(), Some(7));
    drop(tasks);
    server.shutdown().unwrap();
}

/// Doubles ints, at once.
struct Double;

impl Handler for Double {
    fn run(&self, task: &Value, _attempt: u32, _stop: &Stop) -> Done {
        Done::Result {
            value: Value::Int(2 * task.as_int().unwrap()),
            succeeded: true,
            summary: String::new(),
        }
    }

    fn instant(&self) -> bool {
        true
    }
}

/// Instant handlers are leased in batches (at most half of what waits, so a short
/// queue feeds everyone), every task counts as one round, and the job ends when the
/// master shuts the task queue down.
#[test]
fn instant_tasks_go_in_batches_and_each_counts_as_a_round() {
    let (server, manager) = embedded();
    let tasks = manager.queue("get_task_queue").unwrap();
    let results = manager.queue("get_result_queue").unwrap();
    for n in 0..40 {
        tasks.put(n).unwrap();
    }
    let config = WorkerConfig {
        rounds: Some(30),
        get_timeout: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    let batches = run_to_end(&manager, &config, &Double);
    let got = sorted_ints(results.get_many(100, Duration::from_secs(1)).unwrap());
    assert_eq!(got, (0..30).map(|n| 2 * n).collect::<Vec<_>>());
    assert!(batches.len() < 30, "one task per round trip: {batches:?}");
    assert_eq!(batches[0], "running 16", "{batches:?}");
    // Ten tasks left, none leased: the rest of the job for others.
    tasks.shutdown(false).unwrap();
    let config = WorkerConfig::default();
    worker::run(&manager, &config, &Double, &Stop::new(), &|_| {}).unwrap();
    assert_eq!(
        results.get_many(100, Duration::from_secs(1)).unwrap().len(),
        10
    );
    drop((tasks, results));
    server.shutdown().unwrap();
}

/// Against Python's own server the loop has no leases: it says so once, each result is
/// put and its task marked done (so a master in `task_queue.join()` returns), and a
/// stopping worker puts its running task back.
#[test]
fn on_pythons_server_the_loop_uses_get_put_and_task_done() {
    let Some(py) = require_pythons().into_iter().last() else {
        return;
    };
    let mut child = py.spawn(PY_SERVER, &[KEY]);
    let addr = read_line_starting(&mut child, "ADDRESS ").replace(' ', ":");
    let manager = Manager::connect(addr.as_str(), AuthKey::new(KEY)).unwrap();
    let tasks = manager.queue("get_task_queue").unwrap();
    let results = manager.queue("get_result_queue").unwrap();
    for n in 1..=3 {
        tasks.put(n).unwrap();
    }
    let config = WorkerConfig {
        rounds: Some(4),
        get_timeout: Duration::from_millis(100),
        ..WorkerConfig::default()
    };
    assert_eq!(run_to_end(&manager, &config, &Double)[0], "no leases");
    let got = sorted_ints((0..3).map(|_| results.get(Duration::from_secs(5)).unwrap()));
    assert_eq!(got, [2, 4, 6]);
    // Every task was marked done: join() returns at once.
    let start = Instant::now();
    tasks.call("join", vec![], vec![], None).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    // Without leases, a stopping worker puts its running task back itself: nothing else
    // would.
    tasks.put(9).unwrap();
    assert_eq!(
        stopped_while_running(&manager, &config),
        ["no leases", "running 1", "gave back 9"]
    );
    assert_eq!(tasks.get(Duration::from_secs(1)).unwrap().as_int(), Some(9));
    drop((tasks, results, manager));
    let _ = child.kill();
    let _ = child.wait();
}
