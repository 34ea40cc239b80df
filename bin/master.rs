//! `distq-master`: the Rust twin of the classic `task_master.py`, and with `--input` a
//! line-oriented master that feeds one task per line and writes one result per line.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::hash::{Hash, Hasher};
use std::io::{BufWriter, Read, Write};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distq::cli::{self, exit, CommonFlags, Progress};
use distq::journal::{Fsync, JournalConfig};
use distq::Value;
use distq::{text, AuthKey, Error, Manager, QueueProxy, RunningServer, Server, ServerConfig};
use lexopt::ValueExt;
use rand::Rng;

/// The worker, compiled into the master too so that local workers need no second binary.
#[path = "worker.rs"]
mod worker;

#[path = "run_state.rs"]
mod run_state;
use run_state::RunState;
use worker::signals;

const HELP: &str = "\
distq-master: put tasks on a queue, collect the workers' results

USAGE:
    distq-master [OPTIONS]                               random int tasks (the demo)
    distq-master --input FILE|- [OPTIONS] [-- PROG ARGS...]  one task per line

By default the master hosts the server itself (like Python's manager.start()).

OPTIONS:
    --bind ADDR             where the hosted server listens [default: 0.0.0.0:5000;
                            127.0.0.1:0 when it only serves its own local workers]
    --connect HOST:PORT     use an existing server (distq or Python) instead of hosting one
    --tasks N               how many random int tasks to put [default: 10]
    --result-timeout SECS   give up when no result arrives for this long
                            [default: 10; with --input: never]
    --local-workers K       also run K distq-worker processes against this master
    --journal DIR           keep the hosted server's queues in a journal in DIR (see
                            distq-server --help), so a restarted master picks up where
                            it left off
    --fsync POLICY          the journal's sync policy: always | every=MS | never
                            [default: every=50ms]
    --resume                continue the run the journal holds (without it, a journal
                            that still holds tasks or results is refused)
    --authkey KEY           shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH     read the shared secret from a file (or set DISTQ_AUTHKEY)
    -v, -q                  more / less logging on stderr (-q also hides the progress)
    -h, --help              this text;  -V, --version

LINE MODE:
    --input FILE|-          one task (a str) per line; `-` is stdin; blank lines skipped
    --output FILE|-         one result per line [default: -, stdout]: command records as
                            JSON Lines, other values as text (str as is, others as JSON)
    --ordered               write results in input order (default: as they complete)
    --deadline SECS         stop waiting after this long in total [default: never]
    --exec CMD              run `sh -c CMD` for each line on local workers; the line is $1
    -- PROG ARGS...         the same without a shell: PROG ARGS... LINE, or with the line
                            wherever an argument contains {}
    --concurrency N, --task-timeout SECS, --kill-after SECS, --retries N,
    --retry-delay SECS, --max-output BYTES
                            passed to the local workers (see distq-worker --help)
    --progress-every SECS   when stderr is not a terminal, print progress this often
                            [default: 5]; on a terminal it is one line updated in place

    With a command and no --local-workers, one local worker per CPU runs it. Without an
    authkey, a master serving only its own local workers (no --bind, no --connect) makes
    up a random one.

EXIT STATUS:
    0 every task succeeded; 1 other failure; 2 bad usage; 3 authentication failed;
    4 server unreachable or lost; 5 some tasks have no result; 6 some tasks failed;
    130/143 stopped by Ctrl-C (SIGINT) / SIGTERM: local workers stopped their commands
    first (with --journal, --resume continues the run)

EXAMPLES:
    distq-master --local-workers 2 --authkey abc        # the whole demo, one command
    distq-master --bind 0.0.0.0:5000 --authkey abc      # then run workers elsewhere
    distq-master --connect 127.0.0.1:5000 --authkey abc # a server that is already running
    find /var/log -name '*.log' | distq-master --input - -- gzip -9
    ls *.csv | distq-master --input - --ordered --output counts.jsonl --exec 'wc -l < \"$1\"'
    distq-master --bind 0.0.0.0:5000 --input jobs.txt --deadline 3600 > results.jsonl
";

/// Flags passed through to local `--exec` workers.
const WORKER_FLAGS: [&str; 6] = [
    "--concurrency",
    "--task-timeout",
    "--kill-after",
    "--retries",
    "--retry-delay",
    "--max-output",
];

struct Flags {
    bind: Option<String>,
    connect: Option<String>,
    tasks: Option<u64>,
    result_timeout: Option<Duration>,
    local_workers: Option<u32>,
    input: Option<String>,
    output: Option<String>,
    ordered: bool,
    deadline: Option<Duration>,
    /// The `sh -c` script local workers run: `--exec`, or the words after `--` quoted.
    command: Option<String>,
    worker_flags: Vec<String>,
    progress_every: Duration,
    journal: Option<JournalConfig>,
    resume: bool,
}

/// The name under which this executable runs as a worker, busybox-style: the master
/// starts its local workers from its own executable with this `argv[0]`.
const WORKER_NAME: &str = "distq-worker";

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name() == Some(OsStr::new(WORKER_NAME)) {
        worker::main();
        return;
    }
    signals::on_stop(|signal| {
        if signals::received() == Some(signal) {
            eprintln!(
                "distq-master: {}: stopping (local workers stop their commands and give their tasks back)",
                signals::name(signal)
            );
        }
    });
    let mut common = CommonFlags::default();
    let mut flags = Flags {
        bind: None,
        connect: None,
        tasks: None,
        result_timeout: None,
        local_workers: None,
        input: None,
        output: None,
        ordered: false,
        deadline: None,
        command: None,
        worker_flags: Vec::new(),
        progress_every: Duration::from_secs(5),
        journal: None,
        resume: false,
    };
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        let mut words: Vec<OsString> = Vec::new();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            let name = flag.name();
            match name.as_str() {
                "--bind" => flags.bind = Some(cli::address("--bind", parser.value()?)?),
                "--connect" => flags.connect = Some(cli::address("--connect", parser.value()?)?),
                "--tasks" => flags.tasks = Some(cli::count("--tasks", parser.value()?)?),
                "--result-timeout" => flags.result_timeout = Some(cli::seconds(parser.value()?)?),
                "--local-workers" => {
                    flags.local_workers = Some(cli::count("--local-workers", parser.value()?)?)
                }
                "--input" => flags.input = Some(parser.value()?.string()?),
                "--output" => flags.output = Some(parser.value()?.string()?),
                "--ordered" => flags.ordered = true,
                "--resume" => flags.resume = true,
                "--deadline" => flags.deadline = Some(cli::seconds(parser.value()?)?),
                "--exec" => flags.command = Some(parser.value()?.string()?),
                "--progress-every" => flags.progress_every = cli::seconds(parser.value()?)?,
                "--journal" => {
                    let dir: std::path::PathBuf = parser.value()?.into();
                    let fsync = flags.journal.take().map(|j| j.fsync);
                    let mut jc = JournalConfig::new(dir);
                    jc.fsync = fsync.unwrap_or(jc.fsync);
                    flags.journal = Some(jc);
                }
                "--fsync" => {
                    let fsync = Fsync::parse(&parser.value()?.string()?)?;
                    let mut jc = flags
                        .journal
                        .take()
                        .unwrap_or_else(|| JournalConfig::new(""));
                    jc.fsync = fsync;
                    flags.journal = Some(jc);
                }
                n if WORKER_FLAGS.contains(&n) => {
                    let value = parser.value()?.string()?;
                    flags.worker_flags.extend([name, value]);
                }
                "" => match flag {
                    cli::Flag::Value(word) => words.push(word),
                    other => return Err(other.unexpected()),
                },
                _ => return Err(flag.unexpected()),
            }
        }
        if !words.is_empty() {
            if flags.command.is_some() {
                return Err("give the command either as --exec CMD or after --, not both".into());
            }
            flags.command = Some(shell_command(&words)?);
        }
        check(&flags)
    })();
    if let Err(e) = parsed {
        cli::fail(format!("{e} (see --help)"), exit::USAGE);
    }
    common.init_logging();
    let status = if flags.input.is_some() {
        // Stdout carries the results and stderr the progress: the hosted server's
        // connection chatter (info) only with -v, every request (debug) with -vv.
        match common.verbosity() {
            0 => distq::log::set_level(distq::log::Level::Warn),
            1 => distq::log::set_level(distq::log::Level::Info),
            _ => {}
        }
        let authkey = match common.authkey() {
            Ok(key) => key,
            Err(_) if serves_only_itself(&flags) => random_key(),
            Err(e) => cli::fail(e, exit::USAGE),
        };
        warn_if_key_exposed(&common, &flags);
        run_lines(&flags, authkey, common.verbosity())
    } else {
        let authkey = common
            .authkey()
            .unwrap_or_else(|e| cli::fail(e, exit::USAGE));
        warn_if_key_exposed(&common, &flags);
        run_classic(&flags, authkey)
    };
    std::process::exit(status)
}

/// Combinations that cannot mean anything, refused before anything starts.
fn check(flags: &Flags) -> Result<(), lexopt::Error> {
    let line_only = [
        ("--output", flags.output.is_some()),
        ("--ordered", flags.ordered),
        ("--deadline", flags.deadline.is_some()),
        ("a command (--exec or --)", flags.command.is_some()),
    ];
    if flags.input.is_none() {
        if let Some((name, _)) = line_only.iter().find(|(_, set)| *set) {
            return Err(format!("{name} only applies with --input").into());
        }
    } else if flags.tasks.is_some() {
        return Err("--tasks and --input exclude each other: the input decides the tasks".into());
    }
    if flags.bind.is_some() && flags.connect.is_some() {
        return Err(
            "--bind and --connect exclude each other: --bind is where a hosted server listens, \
             --connect uses a server that already runs"
                .into(),
        );
    }
    if flags.resume && flags.journal.is_none() {
        return Err(
            "--resume continues the run a --journal DIR holds: give the same --journal".into(),
        );
    }
    match &flags.journal {
        Some(_) if flags.connect.is_some() => {
            return Err("--journal applies to a hosted server, not with --connect".into())
        }
        Some(j) if j.dir.as_os_str().is_empty() => return Err("--fsync needs --journal DIR".into()),
        _ => {}
    }
    if flags.command.is_none() && !flags.worker_flags.is_empty() {
        return Err(format!("{} only applies with a command", flags.worker_flags[0]).into());
    }
    if flags.input.is_some()
        && flags.local_workers.is_some_and(|k| k > 0)
        && flags.command.is_none()
    {
        return Err(
            "--local-workers with --input needs a command to run (--exec CMD or -- PROG ARGS)"
                .into(),
        );
    }
    if flags.command.is_some() && flags.local_workers == Some(0) {
        return Err("a command runs on local workers; --local-workers 0 leaves none (remote workers take --exec themselves)".into());
    }
    Ok(())
}

/// `-- gzip -9 {}` as a script for `sh -c`: every word single-quoted, `{}` (inside any
/// word) replaced by `"$1"`, or `"$1"` appended if no word has one.
fn shell_command(words: &[OsString]) -> Result<String, lexopt::Error> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut placed = false;
    let mut script = Vec::new();
    for word in words {
        let word = word
            .to_str()
            .ok_or_else(|| format!("the command word {word:?} is not UTF-8"))?;
        let pieces: Vec<String> = word.split("{}").map(quote).collect();
        placed |= pieces.len() > 1;
        script.push(pieces.join("\"$1\""));
    }
    if !placed {
        script.push("\"$1\"".into());
    }
    Ok(script.join(" "))
}

/// A hosted server on the default loopback address, reached only by our own workers.
fn serves_only_itself(flags: &Flags) -> bool {
    flags.command.is_some() && flags.bind.is_none() && flags.connect.is_none()
}

fn random_key() -> AuthKey {
    let bytes: [u8; 16] = rand::rngs::OsRng.gen();
    AuthKey::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn warn_if_key_exposed(common: &CommonFlags, flags: &Flags) {
    match &flags.connect {
        Some(addr) => common.warn_if_key_exposed(addr),
        None => common.warn_if_key_exposed(&bind_addr(flags)),
    }
}

/// Without `--bind`, a master that runs local workers serves only them: it listens on
/// loopback (port 0), so the demo neither exposes the key to the network nor clashes with
/// another master on port 5000.
fn bind_addr(flags: &Flags) -> String {
    match &flags.bind {
        Some(bind) => bind.clone(),
        None if flags.command.is_some() || flags.local_workers.is_some_and(|k| k > 0) => {
            "127.0.0.1:0".into()
        }
        None => "0.0.0.0:5000".into(),
    }
}

/// The server the master talks to: hosted (and shut down at the end) or `--connect`ed.
struct Session {
    hosted: Option<RunningServer>,
    addr: String,
    manager: Manager,
}

impl Session {
    fn open(flags: &Flags, authkey: &AuthKey, announce: bool) -> distq::Result<Session> {
        let (hosted, addr) = match &flags.connect {
            Some(addr) => (None, addr.clone()),
            None => {
                let mut config = ServerConfig::new(authkey.clone());
                config.journal = flags.journal.clone();
                // Nothing has started yet: "cannot listen" ends the master with README's
                // status for it (1), not the connection status a later failure gets.
                let server = Server::bind(bind_addr(flags).as_str(), config)
                    .unwrap_or_else(|e| cli::fail(&e, exit::FAILURE));
                if announce {
                    println!("Listening on {}", server.local_addr());
                }
                let addr = loopback(server.local_addr());
                (Some(server.spawn()?), addr.to_string())
            }
        };
        let manager = Manager::connect(addr.as_str(), authkey.clone())?;
        Ok(Session {
            hosted,
            addr,
            manager,
        })
    }

    /// Refuses to mix a new run into a hosted journal that still holds an earlier one
    /// (its tasks would run and its results would be taken for this run's). Returns
    /// what the journal holds: tasks (waiting, delayed or formerly reserved), results.
    fn check_leftovers(&self, flags: &Flags) -> (i64, i64) {
        let Some(journal) = flags.journal.as_ref().filter(|_| self.hosted.is_some()) else {
            return (0, 0);
        };
        let n = |queue: &str, field: &str| queue_stat(&self.manager, queue, field).unwrap_or(0);
        let tasks = n(TASKS, "size") + n(TASKS, "reserved") + n(TASKS, "delayed");
        let results = n(RESULTS, "size");
        if tasks + results > 0 && !flags.resume {
            cli::fail(
                format!(
                    "the journal in {} holds {tasks} task(s) and {results} result(s) of an earlier run: \
                     --resume continues that run; for a new run, use another directory",
                    journal.dir.display()
                ),
                exit::USAGE,
            );
        }
        (tasks, results)
    }

    /// Shuts a hosted server down (after the queue proxies are dropped).
    fn close(self) -> distq::Result<()> {
        if let Some(running) = self.hosted {
            self.manager.shutdown()?;
            running.join()?;
        }
        Ok(())
    }
}

fn run_classic(flags: &Flags, authkey: AuthKey) -> i32 {
    let result = (|| {
        let session = Session::open(flags, &authkey, true).map_err(failed)?;
        let (left_tasks, left_results) = session.check_leftovers(flags);
        let tasks = session.manager.queue(TASKS).map_err(failed)?;
        let results = session.manager.queue(RESULTS).map_err(failed)?;
        let workers = Workers::spawn(
            flags.local_workers.unwrap_or(0),
            &session.addr,
            &authkey,
            &[],
        )
        .map_err(failed)?;
        let resumed = flags.resume.then(|| {
            println!(
                "Resuming: {left_tasks} task(s) and {left_results} result(s) in the journal..."
            );
            (left_tasks + left_results) as u64
        });
        let outcome = classic(flags, &tasks, &results, resumed);
        let finished = match &outcome {
            Ok(()) => true,
            Err((_, status)) => *status == exit::TASKS_FAILED,
        };
        if finished && session.hosted.is_some() {
            end_of_job(&session.manager, &tasks);
        }
        drop((workers, tasks, results));
        session.close().map_err(failed)?;
        outcome
    })();
    match result {
        Ok(()) => {
            println!("Master exit.");
            exit::OK
        }
        Err((e, status)) => {
            eprintln!("error: {e}");
            status
        }
    }
}

/// How long a hosting master waits, after the last result, for workers to ack it.
const ACK_GRACE: Duration = Duration::from_secs(5);

/// Ends the job for the workers before the hosted server goes: the task queue is shut
/// down (Python 3.13's `Queue.shutdown`: a worker's next take fails with `ShutDown`, so it
/// exits at once instead of reconnecting for minutes or taking the next master's tasks),
/// then the master waits, bounded, until no task is still reserved, so that a worker that
/// put its result is not cut off before its ack.
fn end_of_job(manager: &Manager, tasks: &QueueProxy) {
    if let Err(e) = tasks.shutdown(false) {
        eprintln!("note: could not tell the workers the job is over: {e}");
        return;
    }
    let deadline = Instant::now() + ACK_GRACE;
    let mut poll = Duration::from_millis(1);
    while reserved_tasks(manager).is_some_and(|n| n > 0) && Instant::now() < deadline {
        std::thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_millis(20));
    }
}

/// Tasks taken under a lease and not yet acked, from the server's `stats()`.
fn reserved_tasks(manager: &Manager) -> Option<i64> {
    queue_stat(manager, TASKS, "reserved")
}

/// One number of one queue from a distq server's `stats()`.
fn queue_stat(manager: &Manager, queue: &str, name: &str) -> Option<i64> {
    let stats = manager.stats().ok()?;
    let queue = text::field(text::field(&stats, "queues")?, queue)?;
    text::field(queue, name)?.as_int()
}

const TASKS: &str = "get_task_queue";
const RESULTS: &str = "get_result_queue";

/// An error and the exit status it calls for.
type Failure = (String, i32);

fn failed(e: Error) -> Failure {
    let status = cli::status_for(&e);
    (e.to_string(), status)
}

/// The classic master: `total` random int tasks (or, resuming, the results the journal's
/// tasks and results will give), one result each. A result that is a line-mode record
/// (it carries a `run`) belongs to another master on the same server: it is put back
/// for that master, and not counted.
fn classic(
    flags: &Flags,
    tasks: &QueueProxy,
    results: &QueueProxy,
    resumed: Option<u64>,
) -> Result<(), Failure> {
    let total = resumed.unwrap_or(flags.tasks.unwrap_or(10));
    let result_timeout = flags.result_timeout.unwrap_or(Duration::from_secs(10));
    // A distq server takes and gives many items per round trip: the output is the
    // same, line for line, with a fraction of the round trips.
    let batches = tasks.exposes("put_many") && results.exposes("get_many");
    // Lines go out a batch at a time (one write per batch, not per line); a closed
    // stdout does not stop the job.
    let mut out = BufWriter::new(std::io::stdout());
    if resumed.is_none() {
        let mut batch = Vec::with_capacity(CLASSIC_BATCH);
        for i in 0..total {
            let n: i64 = rand::rngs::OsRng.gen_range(0..=10_000);
            let _ = writeln!(out, "Put task {n}...");
            if !batches {
                let _ = out.flush();
                tasks.put(Value::from(n)).map_err(failed)?;
                continue;
            }
            batch.push(Value::from(n));
            if batch.len() == CLASSIC_BATCH || i + 1 == total {
                let _ = out.flush();
                tasks
                    .put_many(std::mem::take(&mut batch), None)
                    .map_err(failed)?;
            }
        }
    }
    let _ = writeln!(out, "Try getting results...");
    let _ = out.flush();
    let (mut received, mut failures, mut foreign) = (0, 0, 0u64);
    let mut last_result = Instant::now();
    while received < total {
        if let Some(signal) = signals::received() {
            let e = format!(
                "stopped by {} with {received} of {total} results",
                signals::name(signal)
            );
            return Err((e, signals::exit_status(signal)));
        }
        // In slices, so that a stop signal is noticed within one.
        let left = result_timeout.saturating_sub(last_result.elapsed());
        let wait = left.min(STOP_CHECK);
        let taken = if batches {
            let want =
                usize::try_from(total - received).map_or(CLASSIC_BATCH, |n| n.min(CLASSIC_BATCH));
            results.get_many(want, wait)
        } else {
            results.get(wait).map(|r| vec![r])
        };
        let items = match taken {
            Ok(items) => items,
            Err(Error::Empty) if !left.is_zero() => continue,
            Err(Error::Empty) => {
                let e = format!(
                    "only {received} of {total} results arrived; none came for {result_timeout:?} (are workers running? see --result-timeout)"
                );
                return Err((e, exit::MISSING));
            }
            Err(e) => return Err(failed(e)),
        };
        let mut theirs = Vec::new();
        let before = received;
        for r in items {
            if text::field(&r, text::RUN).is_some() {
                theirs.push(r);
                continue;
            }
            last_result = Instant::now();
            received += 1;
            failures += u64::from(is_failure(&r));
            let _ = match r.as_str() {
                Some(text) => writeln!(out, "Result: {text}"),
                None => writeln!(out, "Result: {r}"),
            };
        }
        let _ = out.flush();
        if !theirs.is_empty() {
            foreign += theirs.len() as u64;
            for r in theirs {
                results.put(r).map_err(failed)?;
            }
            if received == before {
                std::thread::sleep(FOREIGN_BACKOFF);
            }
        }
    }
    if foreign > 0 {
        eprintln!("note: put back {foreign} result(s) of line-mode runs for their master");
    }
    if failures > 0 {
        return Err((
            format!(
                "{failures} of {total} results are failures (records whose status is not \"ok\")"
            ),
            exit::TASKS_FAILED,
        ));
    }
    Ok(())
}

/// A result is a failure if it is a record whose status is not "ok".
fn is_failure(result: &Value) -> bool {
    text::field(result, "status").is_some_and(|status| status.as_str() != Some("ok"))
}

/// Tasks per `put_many` and results per `get_many` of the classic master.
const CLASSIC_BATCH: usize = 1000;

/// How often a master waiting for results looks for a stop signal.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// How long a master waits after a batch of nothing but other runs' results, put back
/// for their master, before it looks again: without it two masters would pass the same
/// results back and forth as fast as the server answers.
const FOREIGN_BACKOFF: Duration = Duration::from_millis(100);

fn run_lines(flags: &Flags, authkey: AuthKey, verbosity: i8) -> i32 {
    let input = flags.input.as_deref().unwrap_or("-");
    let lines = match read_lines(input) {
        Ok(lines) => lines,
        Err(e) => cli::fail(format!("cannot read {input}: {e}"), exit::FAILURE),
    };
    let result = (|| {
        let session = Session::open(flags, &authkey, false)?;
        session.check_leftovers(flags);
        let tasks = session.manager.queue(TASKS)?;
        let results = session.manager.queue(RESULTS)?;
        let journal_dir = flags.journal.as_ref().map(|j| j.dir.as_path());
        let mut run = match journal_dir.filter(|_| flags.resume) {
            Some(dir) => {
                RunState::resume(dir, &lines).unwrap_or_else(|e| cli::fail(e, exit::USAGE))
            }
            None => RunState::fresh(journal_dir, &lines)
                .map_err(|e| Error::io("writing the run file beside the journal", e))?,
        };
        // Opened only now: a run refused above must not truncate the output of the
        // run it protects.
        let output: Box<dyn Write> = match flags.output.as_deref().unwrap_or("-") {
            "-" => Box::new(std::io::stdout().lock()),
            // A resumed run adds to what the interrupted one wrote.
            path => match std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .append(flags.resume)
                .truncate(!flags.resume)
                .open(path)
            {
                Ok(f) => Box::new(f),
                Err(e) => cli::fail(format!("cannot write {path}: {e}"), exit::FAILURE),
            },
        };
        // Resuming: the journal already holds the tasks still to do and the results not
        // yet written; only the tasks of results lost in the crash are put again.
        let (mut to_put, waiting) = if flags.resume {
            resumable(&tasks, &results, &run, lines.len())?
        } else {
            ((0..lines.len()).collect(), Vec::new())
        };
        let mut workers = match &flags.command {
            Some(command) => {
                let k = flags.local_workers.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
                });
                let mut args = vec!["--exec".to_string(), command.clone()];
                args.extend(flags.worker_flags.iter().cloned());
                Workers::spawn(k, &session.addr, &authkey, &args)?
            }
            None => Workers::spawn(0, &session.addr, &authkey, &[])?,
        };
        // Batches keep the round trips few; put_many on an unbounded queue never blocks.
        // Python's own server has no batch methods: one task (and result) per round trip.
        let batches = tasks.exposes("put_many") && results.exposes("get_many");
        if !batches {
            eprintln!(
                "note: the server has no put_many/get_many (e.g. Python's BaseManager): \
                 one round trip per task"
            );
        }
        to_put.sort_unstable();
        for chunk in to_put.chunks(1000) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|&id| text::envelope(id as u64, &run.id, line_task(&lines[id])))
                .collect();
            if batches {
                tasks.put_many(batch, None)?;
            } else {
                for task in batch {
                    tasks.put(task)?;
                }
            }
        }
        let mut collector =
            Collector::new(lines.len(), flags.ordered, BufWriter::new(output), &run);
        collector.take_batch(waiting, &results, batches, &mut run)?;
        let mut progress = Progress::new(lines.len(), flags.progress_every, verbosity >= 0);
        let stopped = collector.collect(
            flags,
            &results,
            &mut workers,
            &mut progress,
            batches,
            &mut run,
        );
        progress.finish();
        collector.finish();
        if matches!(stopped, Ok(None)) && session.hosted.is_some() {
            end_of_job(&session.manager, &tasks);
        }
        drop((workers, tasks, results));
        session.close()?;
        stopped.map(|why| (collector, why))
    })();
    let (collector, why) = match result {
        Ok(done) => done,
        Err(e) => cli::fail(&e, cli::status_for(&e)),
    };
    let Collector {
        total,
        done,
        failed,
        earlier,
        seen,
        failed_ids,
        foreign,
        start,
        ..
    } = collector;
    let missing = total - done - failed;
    if verbosity > -2 {
        let secs = start.elapsed().as_secs_f64();
        let earlier = match earlier {
            0 => String::new(),
            n => format!(" ({n} of them by the interrupted session)"),
        };
        eprintln!(
            "{total} tasks: {done} done, {failed} failed{earlier}, {missing} missing in {secs:.1}s ({:.1} tasks/s)",
            (done + failed) as f64 / secs.max(1e-9)
        );
        if let Some(why) = why {
            eprintln!("stopped waiting: {why}");
        }
        if !foreign.is_empty() {
            eprintln!(
                "ignored {} result(s) of other runs, put back for their master (a result counts only if it carries its task's 'run')",
                foreign.len()
            );
        }
        for id in failed_ids.iter().take(10) {
            eprintln!("failed: {}", String::from_utf8_lossy(&lines[*id]));
        }
        let unseen = seen.iter().enumerate().filter(|(_, s)| !**s);
        for (id, _) in unseen.take(if missing > 0 { 10 } else { 0 }) {
            eprintln!("missing: {}", String::from_utf8_lossy(&lines[id]));
        }
    }
    if let Some(signal) = signals::received() {
        signals::exit_status(signal)
    } else if missing > 0 {
        exit::MISSING
    } else if failed > 0 {
        exit::TASKS_FAILED
    } else {
        exit::OK
    }
}

/// The input's lines: `\n`-separated, a trailing `\r` dropped, blank lines skipped,
/// as bytes: a line that is not UTF-8 (a file name, say) goes out as it is (see
/// [`line_task`]).
fn read_lines(path: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let mut bytes = Vec::new();
    if path == "-" {
        std::io::stdin().lock().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(path)?;
    }
    Ok(bytes
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(<[u8]>::to_vec)
        .collect())
}

/// A line as a task: a str, or, if it is not UTF-8, bytes, which an `--exec` worker
/// passes to its command unchanged (a Python worker gets `bytes` and can do the same).
fn line_task(line: &[u8]) -> Value {
    match std::str::from_utf8(line) {
        Ok(text) => Value::from(text),
        Err(_) => Value::Bytes(line.to_vec().into()),
    }
}

/// Results as they arrive: told apart from other runs' by their run id, matched to
/// their lines by id, counted, written out.
struct Collector {
    total: usize,
    done: usize,
    failed: usize,
    /// Of `done + failed`, how many the interrupted session wrote (`--resume`).
    earlier: usize,
    /// Which ids have a result (a redelivered task can produce two).
    seen: Vec<bool>,
    /// Lines whose result is a failure, in the order they came.
    failed_ids: Vec<usize>,
    /// Results of other runs (or with no run), by a hash of their text: counted once
    /// however often they come back round.
    foreign: HashSet<u64>,
    run: String,
    /// Results waiting for an earlier line's result (`--ordered`), by id.
    pending: BTreeMap<usize, String>,
    next: usize,
    ordered: bool,
    out: BufWriter<Box<dyn Write>>,
    start: Instant,
}

impl Collector {
    fn new(
        total: usize,
        ordered: bool,
        out: BufWriter<Box<dyn Write>>,
        run: &RunState,
    ) -> Collector {
        let mut seen = vec![false; total];
        let (mut done, mut failed, mut failed_ids) = (0, 0, Vec::new());
        for (&id, &ok) in &run.earlier {
            seen[id] = true;
            if ok {
                done += 1;
            } else {
                failed += 1;
                failed_ids.push(id);
            }
        }
        failed_ids.sort_unstable();
        Collector {
            total,
            done,
            failed,
            earlier: done + failed,
            seen,
            failed_ids,
            foreign: HashSet::new(),
            run: run.id.clone(),
            pending: BTreeMap::new(),
            // With --ordered, a resumed run writes from the first line without a result.
            next: 0,
            ordered,
            out,
            start: Instant::now(),
        }
    }

    /// Collects until every line has a result or a reason to stop (returned).
    fn collect(
        &mut self,
        flags: &Flags,
        results: &QueueProxy,
        workers: &mut Workers,
        progress: &mut Progress,
        batches: bool,
        run: &mut RunState,
    ) -> distq::Result<Option<String>> {
        let mut last_result = Instant::now();
        while self.done + self.failed < self.total {
            progress.update(self.done, self.failed);
            if let Some(signal) = signals::received() {
                return Ok(Some(format!("stopped by {}", signals::name(signal))));
            }
            let mut wait = STOP_CHECK;
            if let Some(deadline) = flags.deadline {
                let left = deadline.saturating_sub(self.start.elapsed());
                if left.is_zero() {
                    return Ok(Some(format!("the --deadline of {deadline:?} passed")));
                }
                wait = wait.min(left);
            }
            if let Some(limit) = flags.result_timeout {
                if last_result.elapsed() >= limit {
                    return Ok(Some(format!("no result for --result-timeout {limit:?}")));
                }
            }
            if workers.all_exited() {
                return Ok(Some("every local worker exited".into()));
            }
            let taken = if batches {
                results.get_many(1000, wait)
            } else {
                results.get(wait).map(|item| vec![item])
            };
            match taken {
                Ok(items) => {
                    progress.clear();
                    if self.take_batch(items, results, batches, run)? {
                        last_result = Instant::now();
                    }
                }
                Err(Error::Empty) => {}
                Err(e) => return Err(e),
            }
        }
        progress.update(self.done, self.failed);
        Ok(None)
    }

    /// Takes a batch of results: ours are counted and written (then noted as done
    /// beside the journal), others' are put back for their master. Returns whether any
    /// was ours.
    fn take_batch(
        &mut self,
        items: Vec<Value>,
        results: &QueueProxy,
        batches: bool,
        run: &mut RunState,
    ) -> distq::Result<bool> {
        let mut written = Vec::new();
        let mut theirs = Vec::new();
        for item in items {
            match self.take(&item) {
                Taken::Ours(id) => written.extend(id),
                Taken::Duplicate => {}
                Taken::Theirs => theirs.push(item),
            }
        }
        self.out
            .flush()
            .map_err(|e| Error::io("writing results", e))?;
        run.record_done(&written)
            .map_err(|e| Error::io("noting written results beside the journal", e))?;
        let ours = !written.is_empty();
        if !theirs.is_empty() {
            if batches {
                results.put_many(theirs, None)?;
            } else {
                for item in theirs {
                    results.put(item)?;
                }
            }
            if !ours {
                std::thread::sleep(FOREIGN_BACKOFF);
            }
        }
        Ok(ours)
    }

    /// Counts and writes one result if it is ours (it carries our run id).
    fn take(&mut self, item: &Value) -> Taken {
        if text::field(item, text::RUN).and_then(Value::as_str) != Some(self.run.as_str()) {
            let mut hash = std::collections::hash_map::DefaultHasher::new();
            text::text_form(item).hash(&mut hash);
            self.foreign.insert(hash.finish());
            return Taken::Theirs;
        }
        let id = text::field(item, text::ID)
            .and_then(Value::as_int)
            .and_then(|id| usize::try_from(id).ok())
            .filter(|id| *id < self.total);
        if let Some(id) = id {
            if std::mem::replace(&mut self.seen[id], true) {
                return Taken::Duplicate; // after a redelivery: the first result stands
            }
        }
        let failure = is_failure(item);
        if failure {
            self.failed += 1;
            self.failed_ids.extend(id);
        } else {
            self.done += 1;
        }
        let line = text::text_form(item);
        match id {
            Some(id) if self.ordered => {
                self.pending.insert(id, line);
                self.write_ready();
            }
            _ => self.write(&line),
        }
        Taken::Ours(id.map(|id| (id, !failure)))
    }

    /// Writes `--ordered` results whose predecessors all have theirs (or had them in
    /// the interrupted session).
    fn write_ready(&mut self) {
        loop {
            if let Some(line) = self.pending.remove(&self.next) {
                self.write(&line);
            } else if !(self.next < self.total && self.seen[self.next]) {
                break;
            }
            self.next += 1;
        }
    }

    fn write(&mut self, line: &str) {
        // A closed stdout (`| head`) must not stop the collection: results still count.
        let _ = writeln!(self.out, "{line}");
    }

    /// Writes what `--ordered` still holds (their predecessors are missing), in order.
    fn finish(&mut self) {
        for line in std::mem::take(&mut self.pending).into_values() {
            self.write(&line);
        }
        let _ = self.out.flush();
    }
}

/// What [`Collector::take`] made of a result.
enum Taken {
    /// Ours, counted and written (with its line and whether it succeeded, if it has an id).
    Ours(Option<(usize, bool)>),
    /// Ours, but that line already has a result.
    Duplicate,
    /// Another run's, or without a run: not ours to count.
    Theirs,
}

/// Resuming a run: what the journal still holds. Drains the task queue to learn which
/// lines are still queued (putting them straight back, in order) and takes the results
/// waiting; every line with neither, nor a result written by the interrupted session,
/// lost its result in the crash and is returned to be put again.
fn resumable(
    tasks: &QueueProxy,
    results: &QueueProxy,
    run: &RunState,
    total: usize,
) -> distq::Result<(Vec<usize>, Vec<Value>)> {
    let drain = |queue: &QueueProxy| -> distq::Result<Vec<Value>> {
        let mut all = Vec::new();
        loop {
            match queue.get_many(10_000, Duration::ZERO) {
                Ok(items) => all.extend(items),
                Err(Error::Empty) => return Ok(all),
                Err(e) => return Err(e),
            }
        }
    };
    let queued = drain(tasks)?;
    let waiting = drain(results)?;
    let mut accounted = vec![false; total];
    for id in run.earlier.keys() {
        accounted[*id] = true;
    }
    for item in queued.iter().chain(&waiting) {
        if text::field(item, text::RUN).and_then(Value::as_str) == Some(run.id.as_str()) {
            let id = text::field(item, text::ID).and_then(Value::as_int);
            if let Some(seen) = id
                .and_then(|id| usize::try_from(id).ok())
                .and_then(|id| accounted.get_mut(id))
            {
                *seen = true;
            }
        }
    }
    if !queued.is_empty() {
        tasks.put_many(queued, None)?;
    }
    let lost = (0..total).filter(|id| !accounted[*id]).collect();
    Ok((lost, waiting))
}

/// The address our own clients and workers use for a hosted server: a wildcard bind
/// (`0.0.0.0`) is reached through loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => [127, 0, 0, 1].into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Local `distq-worker` processes, stopped when dropped (on every path out of the
/// master, errors and signals included): each is sent SIGTERM, so that it stops its
/// commands and gives their tasks back, and is killed only if it has not exited after
/// its commands' grace period.
struct Workers {
    children: Vec<Child>,
    /// How long a worker may take to stop: its commands' `--kill-after`, and a margin.
    grace: Duration,
}

impl Workers {
    /// Starts `k` workers with `extra` flags, handing them the key through the
    /// environment so it never shows in `ps`. The workers are this very executable run
    /// under the name `distq-worker` (see [`main`]), so a master works without a
    /// `distq-worker` beside it: `cargo run --bin distq-master` builds only the master.
    /// Command workers write nothing to stdout (it carries the results) and give up at
    /// once if the master goes away.
    fn spawn(k: u32, addr: &str, authkey: &AuthKey, extra: &[String]) -> distq::Result<Workers> {
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding distq-master's own path", e))?;
        let kill_after = extra
            .iter()
            .position(|f| f == "--kill-after")
            .and_then(|i| extra.get(i + 1))
            .and_then(|secs| secs.parse::<f64>().ok())
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .unwrap_or(Duration::from_secs(5));
        let mut workers = Workers {
            children: Vec::new(),
            grace: kill_after + Duration::from_secs(3),
        };
        for _ in 0..k {
            let mut cmd = Command::new(&exe);
            cmd.arg0(WORKER_NAME)
                .args(["--connect", addr, "--forever", "-q"])
                .args(extra)
                .env(
                    "DISTQ_AUTHKEY",
                    std::ffi::OsStr::from_bytes(authkey.as_bytes()),
                );
            if !extra.is_empty() {
                cmd.args(["--reconnect-for", "0"]).stdout(Stdio::null());
            }
            let child = cmd
                .spawn()
                .map_err(|e| Error::io(format!("starting {}", exe.display()), e))?;
            workers.children.push(child);
        }
        Ok(workers)
    }

    /// Whether there were local workers and none is left (they cannot finish the job).
    fn all_exited(&mut self) -> bool {
        !self.children.is_empty()
            && self
                .children
                .iter_mut()
                .all(|c| !matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let running = |c: &mut Child| matches!(c.try_wait(), Ok(None));
        for child in &mut self.children {
            if running(child) {
                terminate(child);
            }
        }
        let deadline = Instant::now() + self.grace;
        while self.children.iter_mut().any(running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for child in &mut self.children {
            if running(child) {
                eprintln!(
                    "warning: local worker {} did not stop within {:?}: killing it",
                    child.id(),
                    self.grace
                );
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Sends SIGTERM to a local worker that has not been reaped yet (std can only SIGKILL).
fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill touches no memory; the pid is our unreaped child's, so not reused.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}
