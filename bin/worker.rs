//! `distq-worker`: the Rust twin of the classic `task_worker.py`.

use std::time::Duration;

use distq::cli::{self, CommonFlags};
use distq::{ClientConfig, Error, Manager, Value};
use lexopt::ValueExt;

const HELP: &str = "\
distq-worker: take tasks from a distq or Python manager, square them, put results back

USAGE:
    distq-worker [OPTIONS]

OPTIONS:
    --connect HOST:PORT   server address [default: 127.0.0.1:5000]
    --tasks N             rounds of get(timeout) to run [default: 10]
    --forever             keep taking tasks until the server goes away
    --get-timeout SECS    how long each get waits for a task [default: 1]
    --sleep SECS          pretend each task takes this long [default: 0]
    --reconnect-for SECS  after losing the server, keep retrying this long [default: 300]
    --no-leases           take tasks with plain get instead of reserve/ack
    --authkey KEY         shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH   read the shared secret from a file (or set DISTQ_AUTHKEY)
    -v, -q                more / less logging on stderr
    -h, --help            this text;  -V, --version

EXAMPLE:
    distq-worker --connect 192.168.1.10:5000 --authkey abc --forever

By default each task is taken with a lease (reserve), its result is put, and only then is
the lease acked: a worker killed mid-task loses nothing, the task goes back to the queue.
A task can therefore run twice if a worker dies after putting its result but before the
ack. Against a server without leases (Python's BaseManager) the worker uses get/put.
";

struct Flags {
    connect: String,
    rounds: Option<u64>,
    get_timeout: Duration,
    sleep: Duration,
    reconnect_for: Duration,
    leases: bool,
}

fn main() {
    let mut common = CommonFlags::default();
    let mut flags = Flags {
        connect: "127.0.0.1:5000".into(),
        rounds: Some(10),
        get_timeout: Duration::from_secs(1),
        sleep: Duration::ZERO,
        reconnect_for: Duration::from_secs(300),
        leases: true,
    };
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            match flag.name().as_str() {
                "--connect" => flags.connect = parser.value()?.string()?,
                "--tasks" => flags.rounds = Some(parser.value()?.parse()?),
                "--forever" => flags.rounds = None,
                "--get-timeout" => flags.get_timeout = cli::seconds(parser.value()?)?,
                "--sleep" => flags.sleep = cli::seconds(parser.value()?)?,
                "--reconnect-for" => flags.reconnect_for = cli::seconds(parser.value()?)?,
                "--no-leases" => flags.leases = false,
                _ => return Err(flag.unexpected()),
            }
        }
        Ok(())
    })();
    if let Err(e) = parsed {
        cli::fail(format!("{e} (see --help)"), 2);
    }
    common.init_logging();
    let authkey = common.authkey().unwrap_or_else(|e| cli::fail(e, 2));
    if let Err(e) = run(&flags, authkey) {
        cli::fail(e, 1);
    }
    println!("Worker exit.");
}

fn run(flags: &Flags, authkey: distq::AuthKey) -> distq::Result<()> {
    println!("Connecting to server {}...", flags.connect);
    let mut config = ClientConfig::default();
    config.reconnect_for = flags.reconnect_for;
    let manager = Manager::connect_with(flags.connect.as_str(), authkey, config)?;
    let tasks = manager.queue("get_task_queue")?;
    let results = manager.queue("get_result_queue")?;
    let leases = flags.leases && tasks.exposes("reserve");
    if flags.leases && !leases {
        eprintln!(
            "note: the server has no leases (reserve/ack; e.g. Python's BaseManager): \
             using get/put, so a task this worker is running is lost if it dies"
        );
    }
    let mut round = 0;
    while flags.rounds.map_or(true, |n| round < n) {
        round += 1;
        let taken = if leases {
            tasks
                .reserve(flags.get_timeout)
                .map(|(lease, task)| (Some(lease), task))
        } else {
            tasks.get(flags.get_timeout).map(|task| (None, task))
        };
        match taken {
            Ok((lease, task)) => {
                println!("Running task {task} * {task}...");
                std::thread::sleep(flags.sleep);
                results.put(square(&task))?;
                if let Some(lease) = lease {
                    if let Err(e) = tasks.ack(lease) {
                        // The connection was lost and the task requeued: another worker
                        // may run it again (at-least-once), which is safe to continue from.
                        eprintln!("warning: could not ack task {task}: {e}");
                    }
                }
            }
            Err(Error::Empty) => println!("Task queue is empty."),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `"n * n = n²"`, computed in 128 bits so no 64-bit task can overflow.
fn square(task: &Value) -> Value {
    match task {
        Value::Int(n) => {
            let n = i128::from(*n);
            Value::from(format!("{n} * {n} = {}", n * n))
        }
        other => Value::from(format!("{other} is not an int; cannot square it")),
    }
}
