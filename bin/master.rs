//! `distq-master`: the Rust twin of the classic `task_master.py`, and with `--input` a
//! line-oriented master that feeds one task per line and writes one result per line.
//!
//! This file holds the flags and picks the mode; the rest is in bin/master/:
//! `classic.rs` and `lines.rs` (the two modes), `collector.rs` (line mode's results),
//! `progress.rs` (the progress line), `backend.rs` (the server, hosted or connected, and
//! the end of a job) and `workers.rs` (local workers and their stop).

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::time::Duration;

use distq::journal::JournalConfig;
use distq::AuthKey;
use lexopt::ValueExt;
use rand::Rng;

/// The worker, compiled into the master too so that local workers need no second binary.
#[path = "worker.rs"]
mod worker;
use cli::{exit, CommonFlags};
use worker::{cli, signals};

#[path = "run_state.rs"]
mod run_state;

#[path = "journal_flags.rs"]
mod journal_flags;
use journal_flags::JournalFlags;

#[path = "master/backend.rs"]
mod backend;
#[path = "master/classic.rs"]
mod classic;
#[path = "master/collector.rs"]
mod collector;
#[path = "master/lines.rs"]
mod lines;
#[path = "master/progress.rs"]
mod progress;
#[path = "master/workers.rs"]
mod workers;

const HELP: &str = "\
distq-master: put tasks on a queue, collect the workers' results

USAGE:
    distq-master [OPTIONS]                               random int tasks (the demo)
    distq-master --input FILE|- [OPTIONS] [-- PROG ARGS...]  one task per line

By default the master hosts the server itself (like Python's manager.start()).

OPTIONS:
    --bind ADDR             where the hosted server listens: HOST:PORT or a Unix socket
                            path [default: 0.0.0.0:5000; 127.0.0.1:0 when it only serves
                            its own local workers]
    --connect HOST:PORT     use an existing server (distq or Python) instead of hosting one
                            (or PATH: a Unix socket)
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
    --no-legacy-auth        refuse HMAC-MD5 (Python <= 3.11) in the handshake: clients of
                            the hosted server that use it fail as with a wrong key, and a
                            --connect server that uses it is refused
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
    /// `false` with `--no-legacy-auth`: no MD5 in the hosted server's or our handshakes.
    legacy_auth: bool,
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
        legacy_auth: true,
    };
    let mut journal = JournalFlags::default();
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        let mut words: Vec<OsString> = Vec::new();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            let name = flag.name();
            if journal.take(&name, &mut parser)? {
                continue;
            }
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
                "--no-legacy-auth" => flags.legacy_auth = false,
                "--deadline" => flags.deadline = Some(cli::seconds(parser.value()?)?),
                "--exec" => flags.command = Some(parser.value()?.string()?),
                "--progress-every" => flags.progress_every = cli::seconds(parser.value()?)?,
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
        check(&flags, &journal)?;
        flags.journal = journal.config();
        Ok(())
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
        lines::run(&flags, authkey, common.verbosity())
    } else {
        let authkey = common
            .authkey()
            .unwrap_or_else(|e| cli::fail(e, exit::USAGE));
        warn_if_key_exposed(&common, &flags);
        classic::run(&flags, authkey)
    };
    std::process::exit(status)
}

/// Combinations that cannot mean anything, refused before anything starts (the journal
/// flags are not in `flags.journal` yet).
fn check(flags: &Flags, journal: &JournalFlags) -> Result<(), lexopt::Error> {
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
    if flags.resume && !journal.given() {
        return Err(
            "--resume continues the run a --journal DIR holds: give the same --journal".into(),
        );
    }
    if journal.given() && flags.connect.is_some() {
        return Err("--journal applies to a hosted server, not with --connect".into());
    }
    // An empty DIR counts as none.
    if journal.lack_dir()
        || journal
            .dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
    {
        return Err("--fsync needs --journal DIR".into());
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
