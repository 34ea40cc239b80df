//! The everyday-tool surface of the binaries: `--exec` workers, the line-oriented
//! master, progress, `distq-stat`, exit codes, help and the authkey warning.

mod common;

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use distq::{AuthKey, Manager, Value};

/// Runs `cmd` with `input` on stdin, stdout and stderr captured, within `limit`.
fn run_with_input(mut cmd: Command, input: &str, limit: Duration) -> Output {
    let mut child: Child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    wait_with_deadline(child, limit)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("distq-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `"key":value` text of a JSON line, for checks without a JSON parser.
fn has(line: &str, field: &str) -> bool {
    line.contains(field)
}

#[test]
fn every_binary_has_help_with_examples_and_a_version() {
    for name in ["distq-server", "distq-master", "distq-worker", "distq-stat"] {
        let out = bin(name).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name}");
        let help = text(&out.stdout);
        assert!(help.contains("EXAMPLE"), "{name}: {help}");
        assert!(help.contains("--authkey-file"), "{name}: {help}");
        let out = bin(name).arg("-V").output().unwrap();
        assert_eq!(
            text(&out.stdout).trim(),
            format!("distq {}", env!("CARGO_PKG_VERSION"))
        );
        let out = bin(name).arg("--no-such-flag").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: bad usage");
    }
}

#[test]
fn contradictory_flags_are_bad_usage() {
    for args in [
        &["--output", "x"][..],
        &["--input", "-", "--tasks", "3"],
        &["--input", "-", "--retries", "2"],
        &["--input", "-", "--local-workers", "2"],
        &["--input", "-", "--local-workers", "0", "--", "true"],
        &["--input", "-", "--exec", "true", "--", "true"],
        &["--bind", "127.0.0.1:0", "--connect", "127.0.0.1:1"],
    ] {
        let out = bin("distq-master")
            .args(args)
            .env("DISTQ_AUTHKEY", KEY)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).starts_with("error: "), "{args:?}");
    }
    let out = bin("distq-worker")
        .args(["--task-timeout", "3", "--authkey", KEY])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("only applies with --exec"));
}

/// Issue 12: answers that were silently wrong. An empty key authenticates anyone; a
/// `--watch 0` report loop is a load generator; a results timeout is not a protocol
/// error; `-q` silences an idle worker's per-round line.
#[test]
fn empty_keys_busy_watches_and_chatty_quiet_workers_are_refused() {
    let empty = std::env::temp_dir().join(format!("distq-empty-key-{}", std::process::id()));
    std::fs::write(&empty, b"\n").unwrap();
    for name in ["distq-server", "distq-worker", "distq-stat", "distq-master"] {
        for key in [
            &["--authkey", ""][..],
            &["--authkey-file", empty.to_str().unwrap()],
        ] {
            let out = bin(name).args(key).output().unwrap();
            assert_eq!(
                out.status.code(),
                Some(2),
                "{name} {key:?}: {}",
                text(&out.stderr)
            );
            assert!(text(&out.stderr).contains("authkey is empty"), "{name}");
        }
    }
    let _ = std::fs::remove_file(&empty);

    let server = server();
    let addr = server.local_addr().to_string();
    let out = bin("distq-stat")
        .args([&addr, "--watch", "0", "--authkey", KEY])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--watch must be at least"));

    let out = bin("distq-master")
        .args([
            "--connect",
            &addr,
            "--tasks",
            "1",
            "--result-timeout",
            "0.2",
        ])
        .env("DISTQ_AUTHKEY", KEY)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("only 0 of 1 results arrived"), "{stderr}");
    assert!(!stderr.contains("protocol error"), "{stderr}");

    let out = bin("distq-worker")
        .args([
            "--connect",
            &addr,
            "--tasks",
            "3",
            "--get-timeout",
            "0.05",
            "-q",
        ])
        .env("DISTQ_AUTHKEY", KEY)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("Task queue is empty."),
        "{}",
        text(&out.stdout)
    );
    server.shutdown().unwrap();
}

/// Issue 12: malformed addresses and counts are bad usage naming the flag; a master that
/// cannot listen exits 1 as README's table says (not the connection status, 4).
#[test]
fn malformed_addresses_and_counts_are_usage_errors_and_cannot_listen_is_1() {
    for (name, args) in [
        ("distq-master", &["--bind", "nonsense"][..]),
        ("distq-master", &["--connect", "127.0.0.1"]),
        ("distq-master", &["--tasks", "-3"]),
        ("distq-server", &["--bind", "nonsense"]),
        ("distq-worker", &["--connect", "127.0.0.1"]),
        ("distq-stat", &["127.0.0.1"]),
    ] {
        let out = bin(name)
            .args(args)
            .env("DISTQ_AUTHKEY", KEY)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {stderr}");
        let flag = if name == "distq-stat" {
            "HOST:PORT"
        } else {
            args[0]
        };
        assert!(stderr.contains(flag), "{name} {args:?}: {stderr}");
        assert!(!stderr.contains("WARN"), "{name} {args:?}: {stderr}");
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = bin("distq-master")
        .args(["--bind", &addr])
        .env("DISTQ_AUTHKEY", KEY)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // The library says what happened; the binary adds the flag that changes it.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot listen") && stderr.contains("pick another with --bind"),
        "{stderr}"
    );
}

#[test]
fn auth_and_connection_failures_have_their_own_exit_codes() {
    let server = server();
    let addr = server.local_addr().to_string();
    for name in ["distq-worker", "distq-stat"] {
        let out = bin(name)
            .args(["--connect", &addr, "--authkey", "wrong"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{name}: {}", text(&out.stderr));
    }
    server.shutdown().unwrap();
    for name in ["distq-worker", "distq-stat", "distq-master"] {
        let mut cmd = bin(name);
        cmd.args(["--connect", &addr, "--authkey", KEY]);
        if name == "distq-worker" {
            // Without it, the worker waits (300 s by default) for a server to come up.
            cmd.args(["--reconnect-for", "0"]);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(4), "{name}: {}", text(&out.stderr));
    }
}

#[test]
fn authkey_on_the_command_line_warns_only_off_loopback() {
    let warning = "--authkey is visible";
    let run = |bind: &str, key_flag: bool| {
        let mut cmd = bin("distq-master");
        cmd.args(["--bind", bind, "--tasks", "0"]);
        if key_flag {
            cmd.args(["--authkey", KEY]);
        } else {
            cmd.env("DISTQ_AUTHKEY", KEY);
        }
        let out = wait_with_deadline(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            Duration::from_secs(20),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let err = run("0.0.0.0:0", true);
    assert!(err.contains(warning), "{err}");
    assert!(err.contains("DISTQ_AUTHKEY") && err.contains("--authkey-file"));
    assert!(
        !err.contains(KEY.repeat(2).as_str()) && !err.contains(" abc"),
        "{err}"
    );
    assert!(!run("127.0.0.1:0", true).contains(warning));
    assert!(!run("0.0.0.0:0", false).contains(warning));
}

/// The README's one-liner, with no authkey at all: the master serves only its own
/// local workers on loopback, so it makes one up.
#[test]
fn the_one_liner_compresses_every_file() {
    let dir = scratch("gzip");
    let mut names = String::new();
    for i in 0..5 {
        std::fs::write(dir.join(format!("f{i}.log")), "hello\n".repeat(100)).unwrap();
        names.push_str(&format!("f{i}.log\n"));
    }
    let mut cmd = bin("distq-master");
    cmd.current_dir(&dir)
        .args(["--input", "-", "--local-workers", "2", "--", "gzip", "-9"]);
    let out = run_with_input(cmd, &names, Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    assert!(
        stdout.lines().all(|l| has(l, r#""status":"ok""#)),
        "{stdout}"
    );
    for i in 0..5 {
        assert!(dir.join(format!("f{i}.log.gz")).exists());
        assert!(!dir.join(format!("f{i}.log")).exists());
    }
    let err = text(&out.stderr);
    assert!(
        err.contains("5 tasks: 5 done, 0 failed, 0 missing"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `{}` puts the line inside a word; `--ordered` restores input order even though later
/// lines finish first; a failing line makes the exit status 6.
#[test]
fn ordered_output_placeholders_and_failed_tasks() {
    let dir = scratch("ordered");
    let mut cmd = bin("distq-master");
    cmd.current_dir(&dir).args([
        "--input",
        "-",
        "--ordered",
        "--local-workers",
        "1",
        "--concurrency",
        "4",
        "--",
        "sh",
        "-c",
        r#"sleep "0.$((5 - $0))"; test "$0" != 3 && echo "line $0""#,
        "{}",
    ]);
    let out = run_with_input(cmd, "1\n2\n\n3\n4\n", Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "blank lines are skipped: {stdout}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!(r#"{{"id":{i},"#)), "{stdout}");
    }
    assert!(has(lines[0], r#""stdout":"line 1\n""#), "{stdout}");
    assert!(
        has(lines[2], r#""status":"failed","exit_code":1"#),
        "{stdout}"
    );
    assert!(text(&out.stderr).contains("3 done, 1 failed, 0 missing"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Output to a file, a deadline that passes, the missing lines named, exit status 5.
#[test]
fn missing_results_at_the_deadline() {
    let dir = scratch("deadline");
    let out_file = dir.join("results.jsonl");
    let mut cmd = bin("distq-master");
    cmd.args(["--input", "-", "--deadline", "1.5", "--task-timeout", "20"])
        .arg("--output")
        .arg(&out_file)
        .args([
            "--local-workers",
            "1",
            "--exec",
            r#"[ "$1" = fast ] || sleep 10"#,
        ]);
    let start = Instant::now();
    let out = run_with_input(cmd, "fast\nslow\n", Duration::from_secs(30));
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("1 done, 0 failed, 1 missing"), "{err}");
    assert!(
        err.contains("missing: slow") && err.contains("--deadline"),
        "{err}"
    );
    let written = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(written.lines().count(), 1);
    assert!(has(&written, r#""task":"fast""#), "{written}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Not on a terminal, progress is a plain line every --progress-every; -q hides it.
#[test]
fn progress_lines_unless_quiet() {
    let run = |quiet: bool| {
        let mut cmd = bin("distq-master");
        cmd.args([
            "--input",
            "-",
            "--progress-every",
            "0.1",
            "--local-workers",
            "2",
            "--exec",
            "sleep 0.2",
        ]);
        if quiet {
            cmd.arg("-q");
        }
        let out = run_with_input(cmd, &"x\n".repeat(6), Duration::from_secs(30));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let err = run(false);
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("progress: "))
        .collect();
    assert!(progress.len() >= 3, "{err}");
    assert!(progress.iter().any(|l| l.contains("/6 done")), "{err}");
    assert!(
        !err.contains('\r'),
        "no carriage returns outside a terminal"
    );
    let quiet = run(true);
    assert!(!quiet.contains("progress: "), "{quiet}");
    assert!(
        quiet.contains("6 tasks: 6 done"),
        "the summary stays: {quiet}"
    );
}

fn worker(addr: &str, args: &[&str]) -> Output {
    let child = bin("distq-worker")
        .args(["--connect", addr, "--authkey", KEY, "--get-timeout", "0.3"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_with_deadline(child, Duration::from_secs(30))
}

fn field(record: &Value, key: &str) -> Value {
    distq::text::field(record, key)
        .unwrap_or_else(|| panic!("no {key} in {record}"))
        .clone()
}

/// A retried task is released (the server counts requeues), tried again after the
/// delay, and its record says how many attempts it took.
#[test]
fn retries_go_through_release() {
    let server = server();
    let addr = server.local_addr().to_string();
    let dir = scratch("retries");
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    let tasks = m.queue("get_task_queue").unwrap();
    let results = m.queue("get_result_queue").unwrap();
    tasks.put("always").unwrap();
    tasks.put("flaky").unwrap();
    let flaky = format!(
        r#"[ "$1" = flaky ] && {{ [ -e {0}/m ] && exit 0; touch {0}/m; }}; exit 1"#,
        dir.display()
    );
    let out = worker(
        &addr,
        &[
            "--exec",
            &flaky,
            "--retries",
            "2",
            "--retry-delay",
            "0.1",
            "--tasks",
            "8",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut records: Vec<Value> = (0..2)
        .map(|_| results.get(Duration::from_secs(5)).unwrap())
        .collect();
    records.sort_by_key(|r| field(r, "task").to_string());
    assert_eq!(field(&records[0], "status"), Value::from("failed"));
    assert_eq!(field(&records[0], "attempts"), Value::from(3));
    assert_eq!(field(&records[1], "status"), Value::from("ok"));
    assert_eq!(field(&records[1], "attempts"), Value::from(2));
    let stats = m.stats().unwrap();
    let q = distq::text::field(&stats, "queues")
        .and_then(|q| distq::text::field(q, "get_task_queue"))
        .cloned()
        .unwrap();
    assert_eq!(field(&q, "requeues"), Value::from(3), "{stats}");
    assert_eq!(field(&q, "acks"), Value::from(2), "{stats}");
    assert_eq!(field(&q, "size"), Value::from(0), "{stats}");
    assert_eq!(field(&q, "reserved"), Value::from(0), "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
    server.shutdown().unwrap();
}

/// A command running longer than the server's lease timeout keeps its lease (the worker
/// touches it), so it is not requeued and run a second time.
#[test]
fn long_commands_keep_their_lease() {
    let server = server_with(|c| c.lease_timeout = Some(Duration::from_millis(1500)));
    let addr = server.local_addr().to_string();
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    m.queue("get_task_queue").unwrap().put("slow").unwrap();
    let out = worker(&addr, &["--exec", "sleep 3.5", "--tasks", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let results = m.queue("get_result_queue").unwrap();
    assert_eq!(
        field(&results.get(Duration::from_secs(5)).unwrap(), "status"),
        Value::from("ok")
    );
    assert!(
        matches!(results.get_nowait(), Err(distq::Error::Empty)),
        "ran once"
    );
    let stats = m.stats().unwrap().to_string();
    assert!(
        stats.contains("'requeues': 0") && stats.contains("'acks': 1"),
        "{stats}"
    );
    server.shutdown().unwrap();
}

/// The classic (squaring) worker renews its lease too: a slow healthy task is not
/// requeued under `--lease-timeout` and run twice.
#[test]
fn slow_classic_tasks_keep_their_lease() {
    let server = server_with(|c| c.lease_timeout = Some(Duration::from_millis(1500)));
    let addr = server.local_addr().to_string();
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    m.queue("get_task_queue").unwrap().put(7).unwrap();
    let out = worker(&addr, &["--sleep", "3.5", "--tasks", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let results = m.queue("get_result_queue").unwrap();
    assert_eq!(
        results.get(Duration::from_secs(5)).unwrap(),
        Value::from("7 * 7 = 49")
    );
    let stats = m.stats().unwrap().to_string();
    assert!(
        stats.contains("'requeues': 0") && stats.contains("'acks': 1"),
        "{stats}"
    );
    server.shutdown().unwrap();
}

/// Four slow tasks with --concurrency 4 run at once; a timed-out one is a result too.
#[test]
fn concurrency_and_timeouts_in_the_worker() {
    let server = server();
    let addr = server.local_addr().to_string();
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    let tasks = m.queue("get_task_queue").unwrap();
    let results = m.queue("get_result_queue").unwrap();
    tasks
        .put_many(
            vec![
                Value::from(1),
                Value::from(1),
                Value::from(1),
                Value::from(30),
            ],
            None,
        )
        .unwrap();
    let start = Instant::now();
    let out = worker(
        &addr,
        &[
            "--exec",
            r#"sleep "$1""#,
            "--concurrency",
            "4",
            "--task-timeout",
            "1.5",
            "--kill-after",
            "0.2",
            "--tasks",
            "8",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    let records = results.get_many(10, Duration::from_secs(1)).unwrap();
    assert_eq!(records.len(), 4);
    let statuses: Vec<String> = records
        .iter()
        .map(|r| field(r, "status").to_string())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| *s == "'ok'").count(),
        3,
        "{statuses:?}"
    );
    let slow = records
        .iter()
        .find(|r| field(r, "task") == Value::from(30))
        .unwrap();
    assert_eq!(field(slow, "status"), Value::from("timeout"));
    assert_eq!(field(slow, "signal"), Value::from(15));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Task 30: timed out"), "{stdout}");
    assert!(stdout.trim_end().ends_with("Worker exit."));
    server.shutdown().unwrap();
}

/// A Python master sees each record as a dict; the int task arrives as `$1` = "7".
#[test]
fn python_reads_command_records_as_dicts() {
    let pythons = require_pythons();
    let Some(python) = pythons.last() else { return };
    let server = server();
    let addr = server.local_addr();
    let script = "\
import sys\n\
from multiprocessing.managers import BaseManager\n\
class M(BaseManager): pass\n\
M.register('get_task_queue'); M.register('get_result_queue')\n\
m = M(address=('127.0.0.1', int(sys.argv[1])), authkey=b'abc'); m.connect()\n\
t, r = m.get_task_queue(), m.get_result_queue()\n\
t.put(7); t.put('bad')\n\
recs = sorted((r.get(timeout=20) for _ in range(2)), key=lambda d: str(d['task']))\n\
for d in recs: print(repr(d['task']), d['status'], d['exit_code'], repr(d['stdout']), type(d['duration']).__name__)\n\
print(sorted(t.stats()['queues']['get_task_queue'].keys()))\n";
    let py = python.spawn(script, &[&addr.port().to_string()]);
    let out = worker(
        &addr.to_string(),
        &[
            "--exec",
            r#"expr "$1" \* 6"#,
            "--tasks",
            "6",
            "--get-timeout",
            "0.5",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let py = wait_with_deadline(py, Duration::from_secs(30));
    let stdout = text(&py.stdout);
    assert!(py.status.success(), "{stdout}{}", text(&py.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "7 ok 0 '42\\n' float", "{stdout}");
    assert!(lines[1].starts_with("'bad' failed 2 ''"), "{stdout}");
    assert!(lines[2].contains("'dead_lettered'") && lines[2].contains("'requeues'"));
    server.shutdown().unwrap();
}

#[test]
fn stat_shows_queues_as_a_table_or_json() {
    let server = server();
    let addr = server.local_addr().to_string();
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    let jobs = m.queue("jobs").unwrap();
    jobs.put_many(vec![Value::None; 3], None).unwrap();
    let out = bin("distq-stat")
        .args([&addr, "--authkey", KEY])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let header = table.lines().nth(1).unwrap();
    assert!(header
        .split_whitespace()
        .eq(["queue", "size", "reserved", "waiting", "puts", "gets", "acks", "requeues", "dead"]));
    let row = table.lines().find(|l| l.starts_with("jobs ")).unwrap();
    assert!(
        row.split_whitespace()
            .eq(["jobs", "3", "0", "0", "3", "0", "0", "0", "0"]),
        "{table}"
    );
    let out = bin("distq-stat")
        .args([
            "--connect",
            &addr,
            "--json",
            "--watch",
            "0.05",
            "--count",
            "3",
        ])
        .env("DISTQ_AUTHKEY", KEY)
        .output()
        .unwrap();
    let json = text(&out.stdout);
    assert_eq!(json.lines().count(), 3, "{json}");
    assert!(
        json.lines().all(|l| l.contains(r#""jobs":{"size":3,"#)),
        "{json}"
    );
    server.shutdown().unwrap();
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), progress is one line
/// rewritten in place, ended by a newline before the summary.
#[test]
fn progress_is_one_line_updated_in_place_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("note: no `script` (util-linux) to make a terminal; skipping");
        return;
    }
    let dir = scratch("tty");
    std::fs::write(dir.join("in.txt"), "a\nb\nc\nd\n").unwrap();
    let master = env!("CARGO_BIN_EXE_distq-master");
    let inner = format!("{master} --input in.txt --local-workers 2 --exec 'sleep 0.3' > /dev/null");
    let child = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(30));
    let tty = text(&out.stdout);
    assert!(out.status.success(), "{tty}{}", text(&out.stderr));
    assert!(tty.contains("\r0/4 done, 0 failed"), "{tty:?}");
    assert!(tty.contains("\x1b[K"), "{tty:?}");
    assert!(!tty.contains("progress: "), "{tty:?}");
    assert!(
        tty.contains("4 tasks: 4 done, 0 failed, 0 missing"),
        "{tty:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `task` of every JSON record in `output`.
fn tasks_of(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(r#""task":""#)? + 8..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// Issue 12.2: two line-mode masters on one standalone server, with their workers
/// taking each other's tasks, each count only their own results (they used to swap
/// them, both "done").
#[test]
fn two_line_masters_on_one_server_keep_their_results() {
    let (mut server, addr, _err) = server_process(&[]);
    let master = |prefix: &'static str| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut cmd = bin("distq-master");
            cmd.args(["--connect", &addr, "--authkey", KEY, "--input", "-"])
                .args(["--local-workers", "2", "--exec", r#"sleep 0.02; echo "$1""#]);
            let input: String = (0..30).map(|i| format!("{prefix}-{i}\n")).collect();
            run_with_input(cmd, &input, Duration::from_secs(60))
        })
    };
    let (a, b) = (master("A"), master("B"));
    for (prefix, out) in [("A", a.join().unwrap()), ("B", b.join().unwrap())] {
        let stdout = text(&out.stdout);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{prefix}: {err}");
        let mut tasks = tasks_of(&stdout);
        tasks.sort();
        let mut want: Vec<String> = (0..30).map(|i| format!("{prefix}-{i}")).collect();
        want.sort();
        assert_eq!(
            tasks, want,
            "{prefix} wrote another run's results:\n{stdout}"
        );
        assert!(
            err.contains("30 tasks: 30 done, 0 failed, 0 missing"),
            "{err}"
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// Issue 12.2: a journal that holds an earlier run is refused without `--resume`;
/// `--resume` needs the same input and finishes exactly that run, appending to its
/// output, without running again what the interrupted session finished.
#[test]
fn a_reused_journal_is_refused_and_resume_finishes_the_run() {
    let dir = scratch("resume");
    let journal = dir.join("journal");
    let out_file = dir.join("out.jsonl");
    let master = |input: &str, extra: &[&str]| {
        let mut cmd = bin("distq-master");
        cmd.args(["--input", "-", "--authkey", KEY])
            .arg("--journal")
            .arg(&journal)
            .arg("--output")
            .arg(&out_file)
            .args(extra);
        run_with_input(cmd, input, Duration::from_secs(60))
    };
    // The first session finishes a and b; c is still running at the deadline.
    let first = master(
        "a\nb\nc\n",
        &[
            "--local-workers",
            "1",
            "--deadline",
            "3",
            "--exec",
            r#"[ "$1" = c ] && sleep 5; echo "$1""#,
        ],
    );
    assert_eq!(first.status.code(), Some(5), "{}", text(&first.stderr));
    assert_eq!(
        tasks_of(&std::fs::read_to_string(&out_file).unwrap()),
        ["a", "b"]
    );

    let other = master(
        "x\ny\nz\n",
        &["--local-workers", "1", "--exec", r#"echo "$1""#],
    );
    let err = text(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{err}");
    assert!(
        err.contains("1 task(s) and 0 result(s) of an earlier run") && err.contains("--resume"),
        "{err}"
    );

    let differs = master(
        "x\ny\nz\n",
        &["--resume", "--local-workers", "1", "--exec", r#"echo "$1""#],
    );
    let err = text(&differs.stderr);
    assert_eq!(differs.status.code(), Some(2), "{err}");
    assert!(err.contains("input differs"), "{err}");

    let resumed = master(
        "a\nb\nc\n",
        &["--resume", "--local-workers", "1", "--exec", r#"echo "$1""#],
    );
    let err = text(&resumed.stderr);
    assert_eq!(resumed.status.code(), Some(0), "{err}");
    assert!(
        err.contains("3 tasks: 3 done, 0 failed (2 of them by the interrupted session), 0 missing"),
        "{err}"
    );
    assert_eq!(
        tasks_of(&std::fs::read_to_string(&out_file).unwrap()),
        ["a", "b", "c"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A line that is not UTF-8 (a Latin-1 file name) reaches the command byte for byte,
/// as `$1` and on stdin.
#[test]
fn input_lines_that_are_not_utf8_pass_through_unchanged() {
    let mut cmd = bin("distq-master");
    cmd.args(["--input", "-", "-q", "--exec"])
        .arg(r#"want=$(printf 'caf\351'); [ "$1" = "$want" ] && [ "$(cat)" = "$want" ]"#);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"caf\xe9\n").unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(has(&text(&out.stdout), r#""status":"ok""#));
}
