//! Stopping and starting as operators do: signals to workers, masters and servers, and
//! workers that start before their server. Real processes, loopback, port 0.

mod common;

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use distq::{AuthKey, Manager, Value};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("distq-stop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn signal(child: &Child, name: &str) {
    let sent = std::process::Command::new("kill")
        .args(["-s", name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -s {name} failed");
}

/// Whether process `pid` is running (a zombie waiting for its reaper is not).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with('Z') && !state.starts_with('X')
    })
}

/// Waits until `pid` is no longer running, for up to `limit`.
fn gone_within(pid: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while running(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The pids a command wrote to `file`, one per line, once there are `n` of them.
fn wait_for_pids(file: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids: Vec<String> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if pids.len() >= n {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} commands started",
            pids.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn waiting_getters(client: &Manager, queue: &str) -> i64 {
    let stats = client.stats().unwrap();
    let field = |v: &Value, k: &str| distq::text::field(v, k).cloned();
    field(&stats, "queues")
        .and_then(|qs| field(&qs, queue))
        .and_then(|q| field(&q, "waiting_getters"))
        .and_then(|n| n.as_int())
        .unwrap_or(0)
}

#[test]
fn a_stopped_worker_stops_its_command_and_gives_the_task_back() {
    let server = server();
    let addr = server.local_addr().to_string();
    let client = Manager::connect(addr.as_str(), AuthKey::new(KEY)).unwrap();
    let tasks = client.queue("get_task_queue").unwrap();
    tasks.put(Value::from("the task")).unwrap();
    let dir = scratch("worker");
    let pids = dir.join("pids");
    let child = bin("distq-worker")
        .args(["--connect", &addr, "--authkey", KEY, "--exec"])
        .arg(format!("echo $$ >> {}; sleep 30", pids.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_for_pids(&pids, 1).remove(0);
    signal(&child, "TERM");
    let start = Instant::now();
    let out = wait_with_deadline(child, Duration::from_secs(20));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert!(err.contains("given back to the queue"), "{err}");
    assert!(
        gone_within(&pid, Duration::from_secs(3)),
        "the command {pid} outlived its worker"
    );
    // Back at once (released, not waiting for a lease timeout), with its place kept.
    assert_eq!(
        tasks.get(Duration::from_secs(2)).unwrap(),
        Value::from("the task")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_started_before_its_server_waits_for_it() {
    // A port that was free a moment ago, for a server that starts later: port 0 cannot
    // name an address before the server binds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = bin("distq-worker")
        .args(["--connect", &addr, "--authkey", KEY, "--tasks", "1"])
        .args(["--get-timeout", "10", "--reconnect-for", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(worker.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("waiting up to 30s"), "{line}");
    assert!(
        matches!(worker.try_wait(), Ok(None)),
        "the worker gave up at once"
    );
    let mut server = bin("distq-server")
        .args(["--bind", &addr, "--authkey", KEY, "-q"])
        .spawn()
        .unwrap();
    let client = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Manager::connect(addr.as_str(), AuthKey::new(KEY)) {
                Ok(m) => break m,
                Err(e) => assert!(Instant::now() < deadline, "server never came up: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    client
        .queue("get_task_queue")
        .unwrap()
        .put(Value::Int(7))
        .unwrap();
    let result = client
        .queue("get_result_queue")
        .unwrap()
        .get(Duration::from_secs(20))
        .unwrap();
    assert_eq!(result, Value::from("7 * 7 = 49"));
    let out = wait_with_deadline(worker, Duration::from_secs(20));
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert_eq!(out.status.code(), Some(0), "{rest}");
    assert_eq!(
        rest.matches("waiting up to").count(),
        0,
        "said more than once: {rest}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn ctrl_c_on_a_line_master_stops_the_commands_and_resume_finishes() {
    let dir = scratch("master");
    let (pids, flag) = (dir.join("pids"), dir.join("fast"));
    let journal = dir.join("journal");
    // Slow until the flag file exists: the first session is interrupted mid-command,
    // the resumed one finishes.
    let script = format!(
        "[ -e {} ] && exit 0; echo $$ >> {}; sleep 30",
        flag.display(),
        pids.display()
    );
    let master = |resume: bool| {
        let mut cmd = bin("distq-master");
        cmd.args(["--input", "-", "--local-workers", "2", "-q"])
            .arg("--journal")
            .arg(&journal)
            .args(["--exec", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if resume {
            cmd.arg("--resume");
        }
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"one\ntwo\n")
            .unwrap();
        child
    };
    let first = master(false);
    let running_pids = wait_for_pids(&pids, 2);
    // Only the master: its workers must hear it from the master, as they would from
    // a SIGTERM sent by a service manager.
    signal(&first, "INT");
    let out = wait_with_deadline(first, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    for pid in &running_pids {
        assert!(
            gone_within(pid, Duration::from_secs(3)),
            "command {pid} outlived the master: {err}"
        );
    }
    std::fs::write(&flag, "").unwrap();
    let second = master(true);
    let out = wait_with_deadline(second, Duration::from_secs(60));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        text(&out.stdout).lines().count(),
        2,
        "{}",
        text(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_expired_deadline_stops_the_running_command() {
    let dir = scratch("deadline");
    let pids = dir.join("pids");
    let mut cmd = bin("distq-master");
    cmd.args(["--input", "-", "--deadline", "1", "--local-workers", "1"])
        .arg("--exec")
        .arg(format!("echo $$ >> {}; sleep 30", pids.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"slow\n").unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let pid = wait_for_pids(&pids, 1).remove(0);
    assert!(
        gone_within(&pid, Duration::from_secs(3)),
        "the command {pid} outlived the master"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_stops_distq_server_and_it_says_what_survives() {
    let dir = scratch("server");
    let journal = dir.join("journal");
    let journal_arg = journal.to_str().unwrap();
    for (extra, says) in [
        (
            vec!["--journal", journal_arg],
            "3 item(s) queued and 0 reserved but not acked are kept in the journal",
        ),
        (
            vec![],
            "3 item(s) queued and 0 reserved but not acked are lost: the server keeps no journal",
        ),
    ] {
        let (server, addr, mut err) = server_process(&extra);
        let client = Manager::connect(addr.as_str(), AuthKey::new(KEY)).unwrap();
        let q = client.queue("jobs").unwrap();
        for i in 0..3 {
            q.put(Value::Int(i)).unwrap();
        }
        // A caller blocked in a get is woken, not left hanging.
        let blocked = std::thread::spawn(move || {
            let other = Manager::connect(addr.as_str(), AuthKey::new(KEY)).unwrap();
            other.queue("empty").unwrap().get(Duration::from_secs(60))
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiting_getters(&client, "empty") < 1 {
            assert!(Instant::now() < deadline, "the get never blocked");
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(&server, "TERM");
        let out = wait_with_deadline(server, Duration::from_secs(20));
        let mut log = String::new();
        err.read_to_string(&mut log).unwrap();
        assert_eq!(out.status.code(), Some(0), "{log}");
        assert!(log.contains("SIGTERM: stopping"), "{log}");
        assert!(log.contains(says), "{log}");
        assert!(blocked.join().unwrap().is_err());
    }
    // The journaled run's items are there after a restart.
    let (mut server, addr, _err) = server_process(&["--journal", journal_arg]);
    let client = Manager::connect(addr.as_str(), AuthKey::new(KEY)).unwrap();
    let q = client.queue("jobs").unwrap();
    for i in 0..3 {
        assert_eq!(q.get(Duration::from_secs(2)).unwrap(), Value::Int(i));
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
