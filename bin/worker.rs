//! `distq-worker`: the Rust twin of the classic `task_worker.py`.

use std::time::Duration;

use distq::cli::{self, CommonFlags};
use distq::{Error, Manager, Value};
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
    --authkey KEY         shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH   read the shared secret from a file (or set DISTQ_AUTHKEY)
    -v, -q                more / less logging on stderr
    -h, --help            this text;  -V, --version

EXAMPLE:
    distq-worker --connect 192.168.1.10:5000 --authkey abc --forever
";

struct Flags {
    connect: String,
    rounds: Option<u64>,
    get_timeout: Duration,
    sleep: Duration,
}

fn main() {
    let mut common = CommonFlags::default();
    let mut flags = Flags {
        connect: "127.0.0.1:5000".into(),
        rounds: Some(10),
        get_timeout: Duration::from_secs(1),
        sleep: Duration::ZERO,
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
    let manager = Manager::connect(flags.connect.as_str(), authkey)?;
    let tasks = manager.queue("get_task_queue")?;
    let results = manager.queue("get_result_queue")?;
    let mut round = 0;
    while flags.rounds.map_or(true, |n| round < n) {
        round += 1;
        match tasks.get(flags.get_timeout) {
            Ok(task) => {
                let result = square(&task);
                println!("Running task {task} * {task}...");
                std::thread::sleep(flags.sleep);
                results.put(result)?;
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
