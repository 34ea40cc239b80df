//! A server embedded in a Rust program, with a worker thread and a master on it: the
//! classic demo in one process, through the library alone.
//!
//! ```sh
//! cargo run --example embedded
//! ```
//!
//! The server listens on a port the kernel picks; Python's `BaseManager` clients could
//! connect to it as well (with the same authkey and the queue names below). `cargo test`
//! runs this example too (`test = true` in Cargo.toml).

use std::thread;
use std::time::Duration;

use distq::worker::{self, Done, Handler, Stop, WorkerConfig};
use distq::{AuthKey, Error, Manager, Server, ServerConfig, Value};

const KEY: &str = "embedded-example";
const TASKS: &str = "get_task_queue";
const RESULTS: &str = "get_result_queue";

fn main() -> distq::Result<()> {
    let server = Server::bind("127.0.0.1:0", ServerConfig::new(AuthKey::new(KEY)))?;
    let addr = server.local_addr();
    let running = server.spawn()?;
    println!("serving on {addr}");

    // The worker: the library's worker loop squares each task until the master shuts the
    // task queue down (leases, batches and a clean stop come with it). One `Manager`
    // (and so one set of connections) per thread.
    let worker = thread::spawn(move || -> distq::Result<()> {
        let manager = Manager::connect(addr, AuthKey::new(KEY))?;
        let config = WorkerConfig::default();
        worker::run(&manager, &config, &Square, &Stop::new(), &|_| {})
    });

    // The master: puts the tasks, collects one result per task, ends the job.
    let manager = Manager::connect(addr, AuthKey::new(KEY))?;
    let (tasks, results) = (manager.queue(TASKS)?, manager.queue(RESULTS)?);
    let numbers = [3, 4, 5, 6, 7];
    for n in numbers {
        tasks.put(n)?;
    }
    let mut squares = Vec::new();
    for _ in numbers {
        let result = results.get(Duration::from_secs(10))?;
        squares.push(
            result
                .as_int()
                .ok_or_else(|| Error::Value(format!("{result} is not an int")))?,
        );
    }
    squares.sort_unstable();
    println!("results: {squares:?}");
    assert_eq!(squares, [9, 16, 25, 36, 49]);
    assert!(matches!(results.get(Duration::ZERO), Err(Error::Empty)));

    tasks.shutdown(false)?;
    worker.join().expect("the worker thread panicked")?;
    println!("the worker saw the job end");
    drop((tasks, results));
    running.shutdown()
}

/// The work: each task's square, at once.
struct Square;

impl Handler for Square {
    fn run(&self, task: &Value, _attempt: u32, _stop: &Stop) -> Done {
        let (value, succeeded) = match task.as_int().and_then(|n| n.checked_mul(n)) {
            Some(square) => (Value::Int(square), true),
            None => (Value::from(format!("cannot square {task}")), false),
        };
        Done::Result {
            value,
            succeeded,
            summary: String::new(),
        }
    }

    fn instant(&self) -> bool {
        true
    }
}

#[test]
fn runs() {
    main().unwrap();
}
