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

use distq::{AuthKey, Error, Manager, Server, ServerConfig};

const KEY: &str = "embedded-example";
const TASKS: &str = "get_task_queue";
const RESULTS: &str = "get_result_queue";

fn main() -> distq::Result<()> {
    let server = Server::bind("127.0.0.1:0", ServerConfig::new(AuthKey::new(KEY)))?;
    let addr = server.local_addr();
    let running = server.spawn()?;
    println!("serving on {addr}");

    // The worker: squares each task until the master shuts the task queue down. One
    // `Manager` (and so one set of connections) per thread.
    let worker = thread::spawn(move || -> distq::Result<u32> {
        let manager = Manager::connect(addr, AuthKey::new(KEY))?;
        let (tasks, results) = (manager.queue(TASKS)?, manager.queue(RESULTS)?);
        let mut done = 0;
        loop {
            match tasks.get(Duration::from_secs(10)) {
                Ok(task) => {
                    let n = task
                        .as_int()
                        .ok_or_else(|| Error::Value(format!("{task} is not an int")))?;
                    results.put(n * n)?;
                    done += 1;
                }
                // A shut-down queue still hands out what it holds, then says so.
                Err(Error::ShutDown) => return Ok(done),
                Err(e) => return Err(e),
            }
        }
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
    let done = worker.join().expect("the worker thread panicked")?;
    println!("the worker did {done} tasks");
    drop((tasks, results));
    running.shutdown()
}

#[test]
fn runs() {
    main().unwrap();
}
