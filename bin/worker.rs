//! `distq-worker`: the Rust twin of the classic `task_worker.py`, and with `--exec` a
//! worker that runs a shell command for each task.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use distq::cli::{self, CommonFlags};
use distq::exec::{self, ExecConfig};
use distq::{text, Address, ClientConfig, Error, Manager, QueueProxy, Value};
use lexopt::ValueExt;

#[path = "signals.rs"]
pub(crate) mod signals;

/// Set on SIGINT/SIGTERM: slots take no new task, running commands are stopped (see
/// [`exec::Stop`]) and their tasks given back.
static STOP: exec::Stop = exec::Stop::new();

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

/// What every slot shares.
struct Shared<'a> {
    flags: &'a Flags,
    manager: Manager,
    leases: bool,
    /// Rounds of get left (`u64::MAX`: forever).
    rounds: AtomicU64,
    /// Set when a slot fails, so the others stop at their next round.
    stop: AtomicBool,
    /// Failed attempts per task this worker released for a retry, by task key. Only
    /// this worker's attempts are counted: with several workers a task may be tried up
    /// to (retries + 1) times by each.
    failures: Mutex<HashMap<String, u32>>,
    /// Print a line per task on stdout (not with -q).
    chatty: bool,
    /// Whether to call `task_done()` after each result of a task taken without a lease
    /// (the queue exposes it: Python's `queue.Queue` and `JoinableQueue` do).
    task_done: bool,
    /// Whether the server has `ack_put` (distq's): result and ack in one round trip.
    ack_put: bool,
    /// Instant tasks taken and completed in batches (see [`prefetch_loop`]).
    prefetch: bool,
}

const RESULT_QUEUE: &str = "get_result_queue";

fn run(flags: &Flags, authkey: distq::AuthKey, chatty: bool) -> distq::Result<()> {
    println!("Connecting to server {}...", flags.connect);
    let manager = first_connect(flags, authkey)?;
    let task_queue = manager.queue("get_task_queue")?;
    let leases = flags.leases && task_queue.exposes("reserve");
    let task_done = task_queue.exposes("task_done");
    let ack_put = task_queue.exposes("ack_put");
    let batches = task_queue.exposes("reserve_many") && task_queue.exposes("ack_put_many");
    drop(task_queue);
    if flags.leases && !leases {
        eprintln!(
            "note: the server has no leases (reserve/ack; e.g. Python's BaseManager): \
             using get/put, so a task this worker is running is lost if it dies"
        );
    }
    let default_rounds = if flags.exec.is_some() { None } else { Some(10) };
    let shared = Shared {
        flags,
        manager,
        leases,
        rounds: AtomicU64::new(flags.rounds.unwrap_or(default_rounds).unwrap_or(u64::MAX)),
        stop: AtomicBool::new(false),
        failures: Mutex::new(HashMap::new()),
        chatty,
        task_done,
        ack_put,
        prefetch: leases && batches && flags.exec.is_none() && flags.sleep.is_zero(),
    };
    std::thread::scope(|s| {
        let slots: Vec<_> = (0..flags.concurrency)
            .map(|_| s.spawn(|| slot(&shared)))
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

/// Connects, waiting up to `--reconnect-for` for a server that is not up yet (workers
/// often start before their master: a cluster script, a systemd unit), saying so once.
fn first_connect(flags: &Flags, authkey: distq::AuthKey) -> distq::Result<Manager> {
    let mut config = ClientConfig::default();
    config.reconnect_for = flags.reconnect_for;
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

/// One task at a time, on its own connections: leases belong to the connection that
/// took them, and a blocked reserve must not hold up another slot's ack.
fn slot(shared: &Shared) -> distq::Result<()> {
    let result = slot_loop(shared);
    if result.is_err() {
        shared.stop.store(true, Ordering::SeqCst);
    }
    result
}

fn slot_loop(shared: &Shared) -> distq::Result<()> {
    let tasks = shared.manager.queue("get_task_queue")?;
    let results = shared.manager.queue(RESULT_QUEUE)?;
    if shared.prefetch {
        return prefetch_loop(shared, &tasks, &results);
    }
    let take_round = || take_rounds(shared, 1) == 1;
    while !shared.stop.load(Ordering::SeqCst) && !STOP.requested() && take_round() {
        let flags = shared.flags;
        let taken = if shared.leases {
            tasks
                .reserve(flags.get_timeout)
                .map(|(lease, task)| (Some(lease), task))
        } else {
            tasks.get(flags.get_timeout).map(|task| (None, task))
        };
        match taken {
            Ok((lease, task)) if STOP.requested() => give_back(shared, &tasks, lease, &task)?,
            Ok((lease, task)) => {
                let done = match &flags.exec {
                    None => {
                        println!("Running task {task} * {task}...");
                        // Slow (`--sleep`) tasks keep their lease like commands do;
                        // an instant one needs no toucher thread.
                        let keep = lease.filter(|_| !flags.sleep.is_zero());
                        Some(run_keeping_lease(&tasks, keep, || {
                            std::thread::sleep(flags.sleep);
                            square(&task)
                        }))
                    }
                    Some(exec) => {
                        std::thread::sleep(flags.sleep);
                        run_command(shared, exec, &tasks, lease, &task)?
                    }
                };
                if let Some(result) = done {
                    deliver(shared, &tasks, &results, lease, &task, result)?;
                }
            }
            // The master ended the job (it shut the task queue down): nothing more to take.
            Err(Error::ShutDown) => break,
            Err(Error::Empty) if flags.exec.is_none() && shared.chatty => {
                println!("Task queue is empty.")
            }
            Err(Error::Empty) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Takes up to `want` rounds of the worker's budget (`--tasks`); returns how many.
fn take_rounds(shared: &Shared, want: u64) -> u64 {
    let mut got = 0;
    let _ = shared
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
fn return_rounds(shared: &Shared, unused: u64) {
    let _ = shared
        .rounds
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            u64::MAX => None,
            n => Some(n.saturating_add(unused)),
        });
}

/// How many instant (squaring) tasks a slot takes per round trip when the server can
/// lease several at once: the server gives at most half of what waits, so a short
/// queue still feeds every worker.
const PREFETCH: u64 = 16;

/// The classic worker on a distq server: tasks are instant, so they are taken
/// [`PREFETCH`] at a time under leases (`reserve_many`) and their results put and
/// acked in one round trip (`ack_put_many`): 2 round trips per batch instead of 2 per
/// task. Each task still counts as one round of `--tasks`, and a worker killed with
/// prefetched leases loses nothing: its connection closes and they are requeued.
fn prefetch_loop(shared: &Shared, tasks: &QueueProxy, results: &QueueProxy) -> distq::Result<()> {
    let flags = shared.flags;
    while !shared.stop.load(Ordering::SeqCst) && !STOP.requested() {
        let rounds = take_rounds(shared, PREFETCH);
        if rounds == 0 {
            break;
        }
        let batch = match tasks.reserve_many(rounds as usize, flags.get_timeout) {
            Ok(batch) => batch,
            Err(Error::ShutDown) => break,
            Err(Error::Empty) => {
                return_rounds(shared, rounds - 1);
                if shared.chatty {
                    println!("Task queue is empty.");
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        return_rounds(shared, rounds - batch.len() as u64);
        if STOP.requested() {
            for (lease, task) in &batch {
                give_back(shared, tasks, Some(*lease), task)?;
            }
            break;
        }
        // One write per batch: stdout is line-buffered even into a file.
        let mut lines = String::new();
        let squares: Vec<Value> = batch
            .iter()
            .map(|(_, task)| {
                let _ = writeln!(lines, "Running task {task} * {task}...");
                square(task)
            })
            .collect();
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(lines.as_bytes()).and_then(|()| out.flush());
        }
        let leases: Vec<u64> = batch.iter().map(|(lease, _)| *lease).collect();
        match tasks.ack_put_many(&leases, squares.clone(), RESULT_QUEUE) {
            // One lease was gone (expired, say): nothing was stored; each result then
            // goes on its own, so only that one is dropped.
            Err(Error::Remote { class, .. }) if class.ends_with("ValueError") => {
                for ((lease, task), result) in batch.iter().zip(squares) {
                    deliver(shared, tasks, results, Some(*lease), task, result)?;
                }
            }
            other => other?,
        }
    }
    Ok(())
}

/// Puts a task's result and completes the task. A leased task on a distq server goes in
/// one `ack_put`, which stores nothing if the lease is gone: a worker that lost its
/// server mid-task (killed master, restart) and reconnected to a new one never hands
/// the new run a result of the old one. Elsewhere: `put`, then `ack` or `task_done`.
fn deliver(
    shared: &Shared,
    tasks: &QueueProxy,
    results: &QueueProxy,
    lease: Option<u64>,
    task: &Value,
    result: Value,
) -> distq::Result<()> {
    match lease {
        Some(lease) if shared.ack_put => match tasks.ack_put(lease, result, RESULT_QUEUE) {
            Err(Error::Remote { class, message }) if class.ends_with("ValueError") => {
                let task = shorten(&text::text_form(task));
                if message.starts_with("unknown lease") {
                    eprintln!(
                        "warning: dropped the result of task {task}: {message}; the task goes to \
                         another worker (if this call reached the server before the connection \
                         broke, the result was stored once)"
                    );
                } else {
                    eprintln!("warning: task {task}: {message}");
                }
                Ok(())
            }
            other => other,
        },
        Some(lease) => {
            results.put(result)?;
            if let Err(e) = tasks.ack(lease) {
                // The connection was lost and the task requeued: another worker may run
                // it again (at-least-once), which is safe to continue from.
                eprintln!("warning: could not ack task {task}: {e}");
            }
            Ok(())
        }
        None => {
            results.put(result)?;
            if shared.task_done {
                // A master waiting in `task_queue.join()` counts these (an ack does the
                // same for a leased task).
                tasks.task_done()?;
            }
            Ok(())
        }
    }
}

/// Runs the command for `item`. Returns the record to put, or `None` if the task was
/// released for a retry.
fn run_command(
    shared: &Shared,
    exec: &ExecConfig,
    tasks: &QueueProxy,
    lease: Option<u64>,
    item: &Value,
) -> distq::Result<Option<Value>> {
    let flags = shared.flags;
    let envelope = text::open_envelope(item);
    let arg = text::arg_form(envelope.task);
    let mut stdin = arg.clone();
    stdin.push(b'\n');
    let shown = shorten(&String::from_utf8_lossy(&arg));
    let key = envelope
        .id
        .map_or_else(|| item.to_string(), |id| format!("#{id}"));
    let failures = || shared.failures.lock().unwrap_or_else(|p| p.into_inner());
    let mut attempts = failures().get(&key).copied().unwrap_or(0) + 1;
    loop {
        let outcome = run_keeping_lease(tasks, lease, || exec::run(exec, &arg, &stdin, &STOP));
        if outcome.status == exec::Status::Stopped {
            give_back(shared, tasks, lease, item)?;
            return Ok(None);
        }
        let retry = !outcome.succeeded() && attempts <= flags.retries;
        if shared.chatty {
            let then = if retry { "; will retry" } else { "" };
            println!("Task {shown}: {}{then}", outcome.summary());
        }
        if !retry {
            failures().remove(&key);
            return Ok(Some(outcome.record(&envelope, attempts)));
        }
        match lease {
            // Given back to the queue, so that another worker (or this one, later)
            // retries it after the delay; the lease is ended either way.
            Some(lease) => {
                failures().insert(key, attempts);
                tasks.release(lease, Some(flags.retry_delay))?;
                return Ok(None);
            }
            // Without leases, giving it back would mean a new put at the tail and no
            // memory of the attempts: retry here instead.
            None => {
                std::thread::sleep(flags.retry_delay);
                attempts += 1;
            }
        }
    }
}

/// Returns a task this worker will not finish (it is stopping) to the queue: a leased
/// one by ending its lease, so it keeps its place and delivery count; one taken with a
/// plain `get` by putting it again, at the tail (the only way back without leases).
fn give_back(
    shared: &Shared,
    tasks: &QueueProxy,
    lease: Option<u64>,
    task: &Value,
) -> distq::Result<()> {
    match lease {
        Some(lease) => tasks.release(lease, None)?,
        None => {
            tasks.put(task.clone())?;
            if shared.task_done {
                // The put counted a new unfinished task: the one we took is done.
                tasks.task_done()?;
            }
        }
    }
    eprintln!(
        "Task {}: stopped; given back to the queue",
        shorten(&text::text_form(text::open_envelope(task).task))
    );
    Ok(())
}

/// How often a running command's lease is extended: inside any `--lease-timeout` of two
/// seconds or more, for one tiny call per second per running command.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// Runs `work` while another thread `touch`es the task's lease every [`TOUCH_EVERY`], so
/// a command that runs longer than the server's `--lease-timeout` is not requeued (and
/// run twice) while it is still making progress.
fn run_keeping_lease<T>(tasks: &QueueProxy, lease: Option<u64>, work: impl FnOnce() -> T) -> T {
    let Some(lease) = lease else { return work() };
    let done = std::sync::Mutex::new(false);
    let wake = std::sync::Condvar::new();
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
