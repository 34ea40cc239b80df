//! `distq-worker`: the Rust twin of the classic `task_worker.py`, and with `--exec` a
//! worker that runs a shell command for each task.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use distq::exec::{self, ExecConfig};
use distq::worker::{self, Done, Event, Handler, Stop, WorkerConfig};
use distq::{text, Address, ClientConfig, Error, Manager, Value};
use lexopt::ValueExt;

/// Shared by the binaries; each uses a part of it.
#[path = "cli.rs"]
pub(crate) mod cli;
use cli::CommonFlags;

#[path = "signals.rs"]
pub(crate) mod signals;

/// Set on SIGINT/SIGTERM: slots take no new task, running commands are stopped (see
/// [`Stop`]) and their tasks given back.
static STOP: Stop = Stop::new();

const HELP: &str = "\
distq-worker: take tasks from a distq or Python manager and put results back

USAGE:
    distq-worker [OPTIONS]                  square int tasks (the classic demo)
    distq-worker --exec 'CMD' [OPTIONS]     run CMD for each task

OPTIONS:
    --connect HOST:PORT   server address, or a Unix socket PATH [default: 127.0.0.1:5000]
    --tasks N             rounds of get(timeout) to run [default: 10; with --exec: forever]
    --forever             keep taking tasks until the server goes away
    --get-timeout SECS    how long each get waits for a task [default: 1]
    --sleep SECS          pretend each task takes this long [default: 0]
    --reconnect-for SECS  wait this long for a server that is not up yet, and after
                          losing it keep retrying this long [default: 300]
    --no-leases           take tasks with plain get instead of reserve/ack
    --no-legacy-auth      refuse a server that uses HMAC-MD5 in the handshake (Python
                          <= 3.11's own manager), as if its key were wrong (exit 3)
    --authkey KEY         shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH   read the shared secret from a file (or set DISTQ_AUTHKEY)
    -v, -q                more / less logging on stderr
    -h, --help            this text;  -V, --version

COMMAND OPTIONS:
    --exec CMD            run `sh -c CMD` per task: the task is $1 (a str as is, other
                          values as JSON) and also on stdin; the result is a record
                          {id, task, status, exit_code, signal, stdout, stderr,
                          truncated, duration, attempts}
    --concurrency N       run up to N tasks at once [default: 1]
    --task-timeout SECS   stop a command after this long: SIGTERM to its process group,
                          then SIGKILL after --kill-after [default: no limit]
    --kill-after SECS     grace period between SIGTERM and SIGKILL [default: 5]
    --retries N           give a failed task back (release) up to N more times before
                          putting its failed record [default: 0]
    --retry-delay SECS    how long a given-back task waits before it is retried [default: 1]
    --max-output BYTES    keep this much of stdout and of stderr [default: 65536]

EXAMPLES:
    distq-worker --connect 192.168.1.10:5000 --authkey-file ~/.distq-key --forever
    distq-worker --connect 127.0.0.1:5000 --exec 'gzip -9 \"$1\"' --concurrency 4
    distq-worker --exec 'sendmail -t < \"$1\"' --retries 3 --task-timeout 60

By default each task is taken with a lease (reserve), its result is put, and only then is
the lease acked: a worker killed mid-task loses nothing, the task goes back to the queue.
A task can therefore run twice if a worker dies after putting its result but before the
ack. Against a server without leases (Python's BaseManager) the worker uses get/put and
retries a failed command in place.

A failing command is a failed result, never a dead worker. Each command runs in its own
process group (so a timeout stops everything it started).

Ctrl-C or SIGTERM stops the worker cleanly: it takes no new task, stops running commands
(SIGTERM to each group, SIGKILL after --kill-after; a second Ctrl-C kills at once), gives
their tasks back to the queue and exits 130 (SIGINT) or 143 (SIGTERM). Other exit
status: 0 done (the rounds ran out, or the master ended the job); 2 bad usage;
3 authentication failed; 4 the server could not be reached or was lost.
";

struct Flags {
    connect: String,
    /// `None`: forever; unset: the mode's default (10 rounds, or forever with --exec).
    rounds: Option<Option<u64>>,
    get_timeout: Duration,
    sleep: Duration,
    reconnect_for: Duration,
    leases: bool,
    /// `false` with `--no-legacy-auth`: no MD5 in our handshakes.
    legacy_auth: bool,
    exec: Option<ExecConfig>,
    concurrency: usize,
    retries: u32,
    retry_delay: Duration,
}

/// Also reached from `distq-master`, which runs its local workers as itself.
pub(crate) fn main() {
    signals::on_stop(|signal| {
        if !STOP.requested() {
            eprintln!(
                "distq-worker: {}: stopping; running tasks are stopped and given back",
                signals::name(signal)
            );
        }
        STOP.request();
    });
    let mut common = CommonFlags::default();
    let mut flags = Flags {
        connect: "127.0.0.1:5000".into(),
        rounds: None,
        get_timeout: Duration::from_secs(1),
        sleep: Duration::ZERO,
        reconnect_for: Duration::from_secs(300),
        leases: true,
        legacy_auth: true,
        exec: None,
        concurrency: 1,
        retries: 0,
        retry_delay: Duration::from_secs(1),
    };
    // Command options may come before --exec, so they are collected first.
    let mut exec = ExecConfig::new("");
    let mut command_flags: Vec<String> = Vec::new();
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            let name = flag.name();
            match name.as_str() {
                "--connect" => flags.connect = cli::address("--connect", parser.value()?)?,
                "--tasks" => flags.rounds = Some(Some(cli::count("--tasks", parser.value()?)?)),
                "--forever" => flags.rounds = Some(None),
                "--get-timeout" => flags.get_timeout = cli::seconds(parser.value()?)?,
                "--sleep" => flags.sleep = cli::seconds(parser.value()?)?,
                "--reconnect-for" => flags.reconnect_for = cli::seconds(parser.value()?)?,
                "--no-leases" => flags.leases = false,
                "--no-legacy-auth" => flags.legacy_auth = false,
                "--exec" => exec.command = parser.value()?.string()?,
                "--concurrency" | "--task-timeout" | "--kill-after" | "--retries"
                | "--retry-delay" | "--max-output" => {
                    let value = parser.value()?;
                    match name.as_str() {
                        "--concurrency" => flags.concurrency = value.parse()?,
                        "--task-timeout" => exec.timeout = Some(cli::seconds(value)?),
                        "--kill-after" => exec.grace = cli::seconds(value)?,
                        "--retries" => flags.retries = value.parse()?,
                        "--retry-delay" => flags.retry_delay = cli::seconds(value)?,
                        _ => exec.max_output = value.parse()?,
                    }
                    command_flags.push(name);
                }
                _ => return Err(flag.unexpected()),
            }
        }
        if exec.command.is_empty() {
            if let Some(first) = command_flags.first() {
                return Err(format!("{first} only applies with --exec CMD").into());
            }
        } else {
            flags.exec = Some(exec);
        }
        if flags.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        Ok(())
    })();
    if let Err(e) = parsed {
        cli::fail(format!("{e} (see --help)"), cli::exit::USAGE);
    }
    common.init_logging();
    let authkey = common
        .authkey()
        .unwrap_or_else(|e| cli::fail(e, cli::exit::USAGE));
    common.warn_if_key_exposed(&flags.connect);
    let chatty = common.verbosity() >= 0;
    let result = run(&flags, authkey, chatty);
    if let Some(signal) = signals::received() {
        if let Err(e) = &result {
            eprintln!("error: {e}");
        }
        println!("Worker stopped ({}).", signals::name(signal));
        std::process::exit(signals::exit_status(signal));
    }
    if let Err(e) = result {
        cli::fail(&e, cli::status_for(&e));
    }
    println!("Worker exit.");
}

fn run(flags: &Flags, authkey: distq::AuthKey, chatty: bool) -> distq::Result<()> {
    println!("Connecting to server {}...", flags.connect);
    let manager = first_connect(flags, authkey)?;
    let default_rounds = if flags.exec.is_some() { None } else { Some(10) };
    let config = WorkerConfig {
        rounds: flags.rounds.unwrap_or(default_rounds),
        get_timeout: flags.get_timeout,
        leases: flags.leases,
        concurrency: flags.concurrency,
        retries: flags.retries,
        retry_delay: flags.retry_delay,
        ..WorkerConfig::default()
    };
    let classic = flags.exec.is_none();
    let square = Square { sleep: flags.sleep };
    let shell;
    let handler: &dyn Handler = match &flags.exec {
        None => &square,
        Some(exec) => {
            shell = Shell {
                exec,
                sleep: flags.sleep,
            };
            &shell
        }
    };
    worker::run(&manager, &config, handler, &STOP, &|event| {
        report(&event, classic, chatty)
    })
}

/// The classic demo's work: `"n * n = n²"`, after `--sleep`.
struct Square {
    sleep: Duration,
}

impl Handler for Square {
    fn run(&self, task: &Value, _attempt: u32, _stop: &Stop) -> Done {
        std::thread::sleep(self.sleep);
        Done::Result {
            value: square(task),
            succeeded: true,
            summary: String::new(),
        }
    }

    fn instant(&self) -> bool {
        self.sleep.is_zero()
    }
}

/// `--exec`: the command, with the task as `$1` and on stdin; the result is its record.
struct Shell<'a> {
    exec: &'a ExecConfig,
    sleep: Duration,
}

impl Handler for Shell<'_> {
    fn run(&self, item: &Value, attempt: u32, stop: &Stop) -> Done {
        std::thread::sleep(self.sleep);
        let envelope = text::open_envelope(item);
        let arg = text::arg_form(envelope.task);
        let mut stdin = arg.clone();
        stdin.push(b'\n');
        let outcome = exec::run(self.exec, &arg, &stdin, stop);
        if outcome.status == exec::Status::Stopped {
            return Done::Stopped;
        }
        Done::Result {
            value: outcome.record(&envelope, attempt),
            succeeded: outcome.succeeded(),
            summary: outcome.summary(),
        }
    }
}

/// The worker's lines: what the loop reports, as the classic `task_worker.py` and the
/// command worker say it.
fn report(event: &Event, classic: bool, chatty: bool) {
    match event {
        Event::NoLeases => eprintln!(
            "note: the server has no leases (reserve/ack; e.g. Python's BaseManager): \
             using get/put, so a task this worker is running is lost if it dies"
        ),
        Event::Empty if classic && chatty => println!("Task queue is empty."),
        Event::Running(tasks) if classic => {
            // One write per batch: stdout is line-buffered even into a file.
            let mut lines = String::new();
            for task in tasks.iter() {
                let _ = writeln!(lines, "Running task {task} * {task}...");
            }
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(lines.as_bytes()).and_then(|()| out.flush());
        }
        Event::Attempted {
            task,
            summary,
            will_retry,
        } if chatty => {
            let arg = text::arg_form(text::open_envelope(task).task);
            let then = if *will_retry { "; will retry" } else { "" };
            println!(
                "Task {}: {summary}{then}",
                shorten(&String::from_utf8_lossy(&arg))
            );
        }
        Event::ResultRefused { task, message } if message.starts_with("unknown lease") => {
            eprintln!(
                "warning: dropped the result of task {}: {message}; the task goes to \
                 another worker (if this call reached the server before the connection \
                 broke, the result was stored once)",
                shorten(&text::text_form(task))
            )
        }
        Event::ResultRefused { task, message } => {
            eprintln!(
                "warning: task {}: {message}",
                shorten(&text::text_form(task))
            )
        }
        // The connection was lost and the task requeued: another worker may run it
        // again (at-least-once), which is safe to continue from.
        Event::AckFailed { task, error } => {
            eprintln!("warning: could not ack task {task}: {error}")
        }
        Event::GaveBack(task) => eprintln!(
            "Task {}: stopped; given back to the queue",
            shorten(&text::text_form(text::open_envelope(task).task))
        ),
        _ => {}
    }
}

/// Connects, waiting up to `--reconnect-for` for a server that is not up yet (workers
/// often start before their master: a cluster script, a systemd unit), saying so once.
fn first_connect(flags: &Flags, authkey: distq::AuthKey) -> distq::Result<Manager> {
    let mut config = ClientConfig::default();
    config.reconnect_for = flags.reconnect_for;
    config.legacy_auth = flags.legacy_auth;
    config.keep_reconnecting = || !STOP.requested();
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match Manager::connect_to(
            &Address::parse(&flags.connect),
            authkey.clone(),
            config.clone(),
        ) {
            Err(e @ Error::Io { .. })
                if start.elapsed() < flags.reconnect_for && !STOP.requested() =>
            {
                if pause == Duration::from_millis(50) {
                    eprintln!(
                        "note: cannot reach {} yet ({e}); waiting up to {:?} for it (--reconnect-for)",
                        flags.connect, flags.reconnect_for
                    );
                }
                std::thread::sleep(pause.min(flags.reconnect_for.saturating_sub(start.elapsed())));
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// A task for a one-line log: at most 60 characters, on one line.
fn shorten(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    let mut short: String = line.chars().take(60).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
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
