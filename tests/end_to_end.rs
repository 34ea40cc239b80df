//! The binaries and the Rust client against distq's server: the demo, several workers,
//! failures that must be reported clearly.

mod common;

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use distq::{AuthKey, Error, Manager, Value};

fn squares_in(out: &str) -> usize {
    out.lines()
        .filter_map(|l| l.strip_prefix("Result: "))
        .filter(|r| {
            let Some((lhs, rhs)) = r.split_once(" = ") else {
                return false;
            };
            let n: i128 = lhs
                .split(" * ")
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(-1);
            rhs.parse::<i128>().ok() == Some(n * n)
        })
        .count()
}

/// README's first command (issue 12): the master alone, with no `distq-worker` beside it
/// (what `cargo run --bin distq-master` builds on a fresh clone), runs its local workers,
/// listens on loopback, and prints no warning.
#[test]
fn readme_demo_needs_only_the_master_binary() {
    let dir = std::env::temp_dir().join(format!("distq-lonely-master-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let master = dir.join("distq-master");
    std::fs::copy(env!("CARGO_BIN_EXE_distq-master"), &master).unwrap();
    let child = std::process::Command::new(&master)
        .args(["--local-workers", "2", "--authkey", KEY])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(squares_in(&stdout), 10, "{stdout}");
    assert!(stdout.contains("Listening on 127.0.0.1:"), "{stdout}");
    assert!(
        !stderr.contains("WARN"),
        "the demo greets with a warning:\n{stderr}"
    );
}

/// The end of a run (issue 12): a slow remote worker whose last result is the master's
/// last one is neither cut off before its ack nor left reconnecting for minutes: the
/// master tells it the job is over and it exits 0 at once.
#[test]
fn a_forever_worker_exits_when_the_job_is_over() {
    let mut master = bin("distq-master")
        .args(["--bind", "127.0.0.1:0", "--tasks", "3", "--authkey", KEY])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = read_line_starting(&mut master, "Listening on ");
    let worker = bin("distq-worker")
        .args(["--connect", &addr, "--forever", "--sleep", "0.3"])
        .env("DISTQ_AUTHKEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let wout = wait_with_deadline(worker, Duration::from_secs(30));
    let mout = wait_with_deadline(master, Duration::from_secs(30));
    let (wtext, werr) = (text(&wout.stdout), text(&wout.stderr));
    assert!(wout.status.success(), "worker: {wtext}{werr}");
    assert!(wtext.ends_with("Worker exit.\n"), "{wtext}");
    assert!(
        !werr.contains("could not ack"),
        "the master left before the ack: {werr}"
    );
    assert!(mout.status.success(), "{}", text(&mout.stderr));
    assert_eq!(squares_in(&text(&mout.stdout)), 3);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn demo_with_local_workers_completes() {
    let child = bin("distq-master")
        .args([
            "--bind",
            "127.0.0.1:0",
            "--local-workers",
            "2",
            "--tasks",
            "10",
        ])
        .env("DISTQ_AUTHKEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.matches("Put task ").count(), 10, "{stdout}");
    assert_eq!(squares_in(&stdout), 10, "{stdout}");
    assert!(stdout.trim_end().ends_with("Master exit."), "{stdout}");
}

/// Three workers connect before any task exists; a master on the same server then puts
/// 30 tasks and gets all 30 results.
#[test]
fn several_workers_started_before_the_master() {
    let server = server();
    let addr = server.local_addr().to_string();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            bin("distq-worker")
                .args([
                    "--connect",
                    &addr,
                    "--tasks",
                    "40",
                    "--get-timeout",
                    "0.2",
                    "--authkey",
                    KEY,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let master = bin("distq-master")
        .args(["--connect", &addr, "--tasks", "30", "--authkey", KEY])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mout = wait_with_deadline(master, Duration::from_secs(30));
    let mtext = text(&mout.stdout);
    assert!(mout.status.success(), "{mtext}{}", text(&mout.stderr));
    assert_eq!(squares_in(&mtext), 30, "{mtext}");
    let mut ran = 0;
    for w in workers {
        let out = wait_with_deadline(w, Duration::from_secs(30));
        let t = text(&out.stdout);
        assert!(out.status.success(), "{t}{}", text(&out.stderr));
        ran += t.matches("Running task").count();
    }
    assert_eq!(ran, 30);
    // --connect does not own the server: it must still be up.
    Manager::connect(server.local_addr(), AuthKey::new(KEY)).expect("server still serving");
    server.shutdown().unwrap();
}

#[test]
fn master_without_workers_fails_clearly() {
    let child = bin("distq-master")
        .args([
            "--bind",
            "127.0.0.1:0",
            "--tasks",
            "3",
            "--result-timeout",
            "0.3",
            "--authkey",
            KEY,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(5), "missing results");
    let err = text(&out.stderr);
    assert!(err.contains("only 0 of 3 results"), "{err}");
}

#[test]
fn binaries_refuse_to_start_without_an_authkey() {
    for (name, args) in [
        ("distq-server", ["--bind", "127.0.0.1:0"]),
        ("distq-master", ["--bind", "127.0.0.1:0"]),
        ("distq-worker", ["--connect", "127.0.0.1:9"]),
    ] {
        let out = bin(name).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert!(
            text(&out.stderr).contains("no authkey given"),
            "{name}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn authkey_file_and_unknown_flags() {
    let dir = std::env::temp_dir().join(format!("distq-key-{}", std::process::id()));
    std::fs::write(&dir, "abc\n").unwrap();
    let server = server();
    let out = bin("distq-worker")
        .args([
            "--connect",
            &server.local_addr().to_string(),
            "--tasks",
            "1",
            "--get-timeout",
            "0.1",
        ])
        .arg("--authkey-file")
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Task queue is empty."));
    let out = bin("distq-server").arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--bogus"));
    server.shutdown().unwrap();
}

#[test]
fn port_in_use_and_unreachable_server_are_one_clear_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = bin("distq-server")
        .args(["--bind", &addr, "--authkey", KEY])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot listen") && err.contains("in use") && err.contains("--bind"),
        "{err}"
    );

    drop(taken); // nothing listens there now
                 // Told not to wait for the server to come up (it would, for 300 s by default).
    let out = bin("distq-worker")
        .args(["--connect", &addr, "--authkey", KEY, "--reconnect-for", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "connection failure");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot connect") && err.contains("refused"),
        "{err}"
    );
}

#[test]
fn wrong_authkey_is_refused_quickly_and_the_server_keeps_serving() {
    let server = server();
    let start = Instant::now();
    match Manager::connect(server.local_addr(), AuthKey::new("wrong")) {
        Err(Error::AuthFailed(msg)) => assert!(!msg.contains("wrong\""), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    m.queue("q").unwrap().put(1).unwrap();
    server.shutdown().unwrap();
}

#[test]
fn rust_client_queue_semantics() {
    let server = server();
    server.handle().queues().declare("bounded", 1).unwrap();
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    let q = m.queue("fifo").unwrap();
    for i in 0..100 {
        q.put(Value::from(i)).unwrap();
    }
    assert_eq!(q.qsize().unwrap(), 100);
    for i in 0..100 {
        assert_eq!(q.get(Duration::from_secs(1)).unwrap(), Value::from(i));
    }
    assert!(q.empty().unwrap());
    let t = Instant::now();
    assert!(matches!(
        q.get(Duration::from_millis(200)),
        Err(Error::Empty)
    ));
    assert!(t.elapsed() >= Duration::from_millis(195));
    q.put_many((0..50).map(Value::from).collect(), None)
        .unwrap();
    assert_eq!(q.get_many(20, Duration::from_secs(1)).unwrap().len(), 20);
    let rest = q.get_many(100, Duration::from_secs(1)).unwrap();
    assert_eq!(rest, (20..50).map(Value::from).collect::<Vec<_>>());
    let b = m.queue("bounded").unwrap();
    assert!(
        b.put_many(vec![Value::None, Value::None], None).is_err(),
        "can never fit"
    );
    b.put(1).unwrap();
    assert!(b.full().unwrap());
    assert!(matches!(
        b.put_timeout(2, Duration::from_millis(50)),
        Err(Error::Full)
    ));
    assert!(matches!(b.put_nowait(2), Err(Error::Full)));
    b.get_nowait().unwrap();
    b.task_done().unwrap();
    b.join().unwrap();
    assert!(
        matches!(b.task_done(), Err(Error::Remote { ref class, .. }) if class == "builtins.ValueError")
    );
    server.shutdown().unwrap();
}

/// A get blocked on one queue delays neither another queue nor another connection.
#[test]
fn a_blocked_get_does_not_delay_anyone_else() {
    let server = server();
    let addr = server.local_addr();
    let blocker = std::thread::spawn(move || {
        let m = Manager::connect(addr, AuthKey::new(KEY)).unwrap();
        let q = m.queue("idle").unwrap();
        q.get(Duration::from_secs(3))
    });
    std::thread::sleep(Duration::from_millis(100));
    let m = Manager::connect(addr, AuthKey::new(KEY)).unwrap();
    let busy = m.queue("busy").unwrap();
    let idle = m.queue("idle").unwrap();
    let start = Instant::now();
    for i in 0..50 {
        busy.put(i).unwrap();
        busy.get(Duration::from_secs(1)).unwrap();
    }
    idle.put("wake").unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "other traffic was held up"
    );
    assert_eq!(blocker.join().unwrap().unwrap(), Value::from("wake"));
    server.shutdown().unwrap();
}

/// Shutdown wakes a client blocked in get with an error instead of leaving it hanging.
#[test]
fn shutdown_wakes_blocked_clients() {
    let server = server();
    let addr = server.local_addr();
    let blocker = std::thread::spawn(move || -> distq::Result<Value> {
        let m = Manager::connect(addr, AuthKey::new(KEY))?;
        m.queue("q")?.get_blocking()
    });
    // Wait until the get is really blocked on the server.
    let waiting = || {
        let queues = server.handle().queues().queues().unwrap();
        queues
            .iter()
            .any(|q| q.stats().unwrap().waiting_getters == 1)
    };
    let start = Instant::now();
    while !waiting() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the get never blocked"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    server.shutdown().unwrap();
    assert!(blocker.join().unwrap().is_err());
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// Issue 13: a TLS client (a ClientHello where a frame length belongs) is named as such in
/// the log, not reported as a 369 MB frame, and the server keeps serving.
#[test]
fn a_tls_client_is_recognised() {
    use std::io::{BufRead, Write};
    let (mut server, addr, mut err) = server_process(&[]);
    let mut line = String::new();
    let mut tls = std::net::TcpStream::connect(&addr).unwrap();
    // The first bytes of a TLS 1.2/1.3 ClientHello record.
    tls.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .unwrap();
    let mut logged = String::new();
    while !logged.contains("TLS") && !logged.contains("handshake limit") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "server exited: {logged}"
        );
        logged.push_str(&line);
    }
    assert!(logged.contains("this peer speaks TLS"), "{logged}");
    assert!(!logged.contains("369295618"), "{logged}");
    let m = Manager::connect(addr.as_str(), AuthKey::new(KEY)).unwrap();
    m.queue("after_tls").unwrap().put(1).unwrap();
    let _ = server.kill();
    let _ = server.wait();
}
