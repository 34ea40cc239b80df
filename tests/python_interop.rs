//! distq against real Python: the classic scripts in both directions, values, queue
//! semantics, both handshakes, and distq's client against Python's own server.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use distq::{AuthKey, ClientConfig, Error, Manager, Value};

const WORKER: &str = include_str!("python/task_worker.py");
const MASTER: &str = include_str!("python/task_master.py");
const VALUES: &str = include_str!("python/values.py");
const SEMANTICS: &str = include_str!("python/semantics.py");
const PY_SERVER: &str = include_str!("python/manager_server.py");
const JOIN_MASTER: &str = include_str!("python/join_master.py");
const RAW_ITEMS: &str = concat!(
    include_str!("python/one_queue.py"),
    include_str!("python/raw_items.py")
);
const PICKLE_SUITE: &str = include_str!("python/pickle_suite.py");
const CORPUS: &str = include_str!("python/corpus.py");
const REPLY_QUEUE: &str = include_str!("python/reply_queue.py");
const OVERSIZED: &str = concat!(
    include_str!("python/one_queue.py"),
    include_str!("python/oversized.py")
);
const MEMORY: &str = concat!(
    include_str!("python/one_queue.py"),
    include_str!("python/memory.py")
);

/// distq-master (hosting its server) with the classic Python worker, on every version.
#[test]
fn rust_master_with_classic_python_worker() {
    for py in require_pythons() {
        let mut master = bin("distq-master")
            .args(["--bind", "127.0.0.1:0", "--tasks", "10", "--authkey", KEY])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start distq-master");
        let addr = read_line_starting(&mut master, "Listening on ");
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let worker = py.spawn(WORKER, &[host, port, KEY, "10"]);
        let wout = wait_with_deadline(worker, Duration::from_secs(60));
        let mout = wait_with_deadline(master, Duration::from_secs(60));
        let (wtext, mtext) = (text(&wout.stdout), text(&mout.stdout));
        assert!(
            wout.status.success(),
            "python {:?} worker failed: {}",
            py.version,
            text(&wout.stderr)
        );
        assert!(
            mout.status.success(),
            "master failed: {}{}",
            mtext,
            text(&mout.stderr)
        );
        assert_eq!(
            wtext.matches("run task").count(),
            10,
            "worker output:\n{wtext}"
        );
        let results: Vec<_> = mtext
            .lines()
            .filter(|l| l.starts_with("Result: "))
            .collect();
        assert_eq!(results.len(), 10, "master output:\n{mtext}");
        for line in results {
            let (lhs, rhs) = line["Result: ".len()..]
                .split_once(" = ")
                .expect("n * n = m");
            let n: i64 = lhs.split(" * ").next().unwrap().parse().unwrap();
            assert_eq!(rhs.parse::<i64>().unwrap(), n * n, "{line}");
        }
        assert!(mtext.trim_end().ends_with("Master exit."), "{mtext}");
    }
}

/// The classic Python master (manager.start()) with distq-worker.
#[test]
fn python_master_with_rust_worker() {
    for py in require_pythons() {
        let mut master = py.spawn(MASTER, &[KEY, "10"]);
        let addr = read_line_starting(&mut master, "ADDRESS ");
        let addr = addr.replace(' ', ":");
        let worker = bin("distq-worker")
            .args(["--connect", &addr, "--tasks", "10", "--authkey", KEY])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start distq-worker");
        let wout = wait_with_deadline(worker, Duration::from_secs(60));
        let mout = wait_with_deadline(master, Duration::from_secs(60));
        let (wtext, mtext) = (text(&wout.stdout), text(&mout.stdout));
        assert!(
            wout.status.success(),
            "worker failed against {:?}: {wtext}{}",
            py.version,
            text(&wout.stderr)
        );
        assert!(
            mout.status.success(),
            "python {:?} master failed: {mtext}{}",
            py.version,
            text(&mout.stderr)
        );
        assert_eq!(wtext.matches("Running task").count(), 10, "{wtext}");
        assert!(wtext.trim_end().ends_with("Worker exit."), "{wtext}");
        // The master read every result (the first line is consumed by read_line_starting).
        assert_eq!(mtext.matches("Result: ").count(), 10, "{mtext}");
        assert!(mtext.contains("master exit."), "{mtext}");
    }
}

/// Values round-trip through distq-server between two Python clients, judged by Python.
#[test]
fn values_round_trip_between_python_clients() {
    let pythons = require_pythons();
    let server = server();
    let port = server.local_addr().port().to_string();
    // Every producer version against every consumer version would be slow; pair each
    // version with the next so every version both sends and receives.
    for (i, producer) in pythons.iter().enumerate() {
        let consumer = &pythons[(i + 1) % pythons.len()];
        producer.run_ok(VALUES, &["127.0.0.1", &port, KEY, "put"]);
        let out = consumer.run_ok(VALUES, &["127.0.0.1", &port, KEY, "check"]);
        assert!(
            out.contains("checked"),
            "{:?} -> {:?}: {out}",
            producer.version,
            consumer.version
        );
    }
    server.shutdown().unwrap();
}

/// CPython's own `AbstractPickleTests`, every `loads` routed through distq-server as the
/// raw item of a put and fetched back with a get (`tests/python/pickle_suite.py`).
#[test]
fn cpython_pickle_tests_pass_through_the_server() {
    let pythons = require_pythons();
    let server = server();
    let port = server.local_addr().port().to_string();
    let script = format!("{RAW_ITEMS}\n{PICKLE_SUITE}");
    for py in &pythons {
        let out = py.run_ok(&script, &["127.0.0.1", &port, KEY, "get_suite_queue"]);
        let summary = out.lines().last().unwrap_or_default();
        assert!(
            summary.contains(" 0 failures, 0 errors"),
            "python {:?}: {out}",
            py.version
        );
        eprintln!("python {:?}: {summary}", py.version);
    }
    server.shutdown().unwrap();
}

/// Random object graphs (subclasses, collections, dataclasses, slots, `__reduce__` with
/// state and items, `__getnewargs_ex__`, sharing, cycles, lone surrogates) pickled at
/// protocols 2 to 5 by one Python version and checked by the next.
#[test]
fn generated_object_graphs_round_trip_between_versions() {
    let pythons = require_pythons();
    let server = server();
    let port = server.local_addr().port().to_string();
    let script = format!("{RAW_ITEMS}\n{CORPUS}");
    for (i, producer) in pythons.iter().enumerate() {
        let consumer = &pythons[(i + 1) % pythons.len()];
        let seed = i.to_string();
        let args = |mode| {
            [
                "127.0.0.1",
                &port,
                KEY,
                "get_corpus_queue",
                mode,
                &seed,
                "500",
                "2,3,4,5",
            ]
        };
        producer.run_ok(&script, &args("put"));
        let out = consumer.run_ok(&script, &args("check"));
        assert!(
            out.contains("checked 500 graphs x 4 protocols, 0 differ"),
            "{:?} -> {:?}: {out}",
            producer.version,
            consumer.version
        );
    }
    server.shutdown().unwrap();
}

/// numpy arrays (every dtype kind, 0-d and empty, Fortran order, strided views, read-only,
/// object arrays sharing and closing cycles) and numpy scalars inside the random graphs,
/// pickled at protocols 2 to 5, put through distq-server and checked by a second process
/// of the same Python (pickles of numpy 2 name `numpy._core`, which numpy 1 cannot load:
/// crossing numpy versions is numpy's matter, not the server's, which never imports it).
#[test]
fn numpy_arrays_round_trip() {
    let server = server();
    let port = server.local_addr().port().to_string();
    let script = format!("{RAW_ITEMS}\n{CORPUS}");
    for py in require_pythons() {
        let probe = wait_with_deadline(py.spawn("import numpy", &[]), Duration::from_secs(60));
        if !probe.status.success() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but python {:?} has no numpy (.ci/run installs it)",
                py.version
            );
            eprintln!("note: python {:?} has no numpy; skipping it", py.version);
            continue;
        }
        let seed = (200 + py.version.1).to_string();
        let args = |mode| {
            [
                "127.0.0.1",
                &port,
                KEY,
                "get_numpy_queue",
                mode,
                &seed,
                "300",
                "2,3,4,5",
            ]
        };
        py.run_ok(&script, &args("put+numpy"));
        let out = py.run_ok(&script, &args("check+numpy"));
        assert!(
            out.contains("checked 300 graphs x 4 protocols, 0 differ"),
            "python {:?}: {out}",
            py.version
        );
        eprintln!("python {:?}: {}", py.version, out.trim());
    }
    server.shutdown().unwrap();
}

/// The differential check: random byte mutations of those pickles, each put as an item.
/// Every mutated request CPython reads as a put of one item must come back through
/// distq as the same graph; the rest must be refused without ending the connection.
#[test]
fn mutated_pickles_are_carried_exactly_when_cpython_loads_them() {
    let pythons = require_pythons();
    let server = server();
    let port = server.local_addr().port().to_string();
    let script = format!("{RAW_ITEMS}\n{CORPUS}");
    for (i, py) in pythons.iter().enumerate() {
        let seed = (100 + i).to_string();
        let out = py.run_ok(
            &script,
            &[
                "127.0.0.1",
                &port,
                KEY,
                "get_mutant_queue",
                "mutate",
                &seed,
                "60",
                "2,3,4,5",
            ],
        );
        let summary = out.lines().last().unwrap_or_default();
        assert!(
            summary.ends_with(", 0 differ"),
            "python {:?}: {out}",
            py.version
        );
        eprintln!("python {:?}: {summary}", py.version);
    }
    server.shutdown().unwrap();
}

#[test]
fn queue_semantics_seen_from_python() {
    for py in require_pythons() {
        let server = server();
        server.handle().queues().declare("bounded", 2).unwrap();
        let port = server.local_addr().port().to_string();
        let out = py.run_ok(SEMANTICS, &["127.0.0.1", &port, KEY]);
        assert!(out.contains("semantics ok"), "{out}");
        server.shutdown().unwrap();
    }
}

/// `BaseManager.connect()` to 127.0.0.1:PORT with KEY: prints `CONNECTED`, or `AUTHFAIL`,
/// the seconds it took and the error.
const CONNECT: &str = "import sys, time, multiprocessing\n\
    from multiprocessing.managers import BaseManager\n\
    m = BaseManager(address=('127.0.0.1', int(sys.argv[1])), authkey=sys.argv[2].encode())\n\
    t = time.monotonic()\n\
    try:\n    m.connect()\n    print('CONNECTED')\n\
    except multiprocessing.AuthenticationError as e:\n    print('AUTHFAIL %.3f %s' % (time.monotonic() - t, e))\n";

/// Wrong key from Python: an AuthenticationError within a second; the server keeps serving.
#[test]
fn wrong_authkey_from_python_is_refused_quickly() {
    let (legacy, modern) = legacy_and_modern();
    let server = server();
    let port = server.local_addr().port().to_string();
    for py in legacy.iter().chain(modern.iter()) {
        let out = py.run_ok(CONNECT, &[&port, "wrong"]);
        let secs: f64 = out
            .strip_prefix("AUTHFAIL ")
            .unwrap_or_else(|| panic!("{:?}: {out}", py.version))
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs < 1.0, "took {secs} s");
        assert_eq!(py.run_ok(CONNECT, &[&port, KEY]).trim(), "CONNECTED");
    }
    server.shutdown().unwrap();
}

/// `distq-server --no-legacy-auth`, with every Python: one that proves the key with HMAC-MD5
/// (<= 3.11) gets the `AuthenticationError` a wrong key gets, and the server logs why;
/// one that uses SHA-256 (>= 3.12) is served.
#[test]
fn a_server_without_legacy_auth_refuses_md5_clients() {
    use std::io::Read;
    let _ = legacy_and_modern(); // with CI set, both kinds must be there
    let (mut server, addr, mut log) = server_process(&["--no-legacy-auth"]);
    let port = addr.rsplit_once(':').unwrap().1;
    let mut refused = 0;
    for py in require_pythons() {
        let out = py.run_ok(CONNECT, &[port, KEY]);
        if py.version <= (3, 11) {
            assert!(
                out.starts_with("AUTHFAIL "),
                "python {:?}: {out}",
                py.version
            );
            refused += 1;
        } else {
            assert_eq!(out.trim(), "CONNECTED", "python {:?}", py.version);
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let mut rest = String::new();
    log.read_to_string(&mut rest).unwrap();
    let why = "answered our challenge with HMAC-MD5 (Python <= 3.11), refused: legacy authentication is off";
    assert_eq!(rest.matches(why).count(), refused, "{rest}");
}

/// A Rust client with `legacy_auth: false`, against Python's own server on every version:
/// one whose challenge asks for HMAC-MD5 (<= 3.11) is refused with an authentication error
/// saying so; one that speaks SHA-256 (>= 3.12) is served.
#[test]
fn a_client_without_legacy_auth_refuses_md5_servers() {
    let _ = legacy_and_modern(); // with CI set, both kinds must be there
    let mut strict = ClientConfig::default();
    strict.legacy_auth = false;
    for py in require_pythons() {
        let mut server = py.spawn(PY_SERVER, &[KEY]);
        let addr = read_line_starting(&mut server, "ADDRESS ").replace(' ', ":");
        let connected = Manager::connect_with(addr.as_str(), AuthKey::new(KEY), strict.clone())
            .and_then(|manager| {
                let tasks = manager.queue("get_task_queue")?;
                tasks.put(7)?;
                tasks.get(Duration::from_secs(5))
            });
        let _ = (server.kill(), server.wait());
        match connected {
            Err(Error::AuthFailed(why)) if py.version <= (3, 11) => assert!(
                why.contains("asks for HMAC-MD5") && why.contains("legacy authentication is off"),
                "{why}"
            ),
            Ok(item) if py.version >= (3, 12) => assert_eq!(item, Value::from(7)),
            other => panic!("python {:?}: {other:?}", py.version),
        }
    }
}

/// `distq-master --no-legacy-auth` with a Python <= 3.11 (HMAC-MD5): the server it hosts
/// refuses that Python's client, and with `--connect` the master refuses that Python's
/// server (exit 3, saying why).
#[test]
fn a_master_without_legacy_auth_refuses_md5_peers() {
    let (Some(py), _) = legacy_and_modern() else {
        return;
    };
    let mut master = bin("distq-master")
        .args(["--bind", "127.0.0.1:0", "--tasks", "1", "--authkey", KEY])
        .arg("--no-legacy-auth")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = read_line_starting(&mut master, "Listening on ");
    let out = py.run_ok(CONNECT, &[addr.rsplit_once(':').unwrap().1, KEY]);
    let _ = (master.kill(), master.wait());
    assert!(out.starts_with("AUTHFAIL "), "{out}");

    let out = against_python_server(&py, "distq-master", &["--tasks", "1", "--no-legacy-auth"]);
    assert_refused_md5_server(&out);
}

/// `distq-worker --no-legacy-auth` against Python's own server: a Python <= 3.11 one, whose
/// challenge asks for HMAC-MD5, is refused (exit 3, saying why); a Python >= 3.12 one is
/// served, and so is the old one without the flag.
#[test]
fn a_worker_without_legacy_auth_refuses_md5_servers() {
    let (Some(legacy), Some(modern)) = legacy_and_modern() else {
        return;
    };
    let worker = |py: &Python, strict: bool| {
        let mut args = vec![
            "--tasks",
            "1",
            "--get-timeout",
            "0.1",
            "--reconnect-for",
            "0",
        ];
        args.extend(strict.then_some("--no-legacy-auth"));
        against_python_server(py, "distq-worker", &args)
    };
    let out = worker(&legacy, true);
    assert_refused_md5_server(&out);
    for (py, strict) in [(&modern, true), (&legacy, false)] {
        let out = worker(py, strict);
        assert!(
            out.status.success(),
            "python {:?}, strict {strict}: {}",
            py.version,
            text(&out.stderr)
        );
    }
}

/// `distq-stat --no-legacy-auth` against Python's own server: a Python <= 3.11 one is
/// refused in the handshake (exit 3, saying why); past the handshake, which a Python >= 3.12
/// one (or the old one without the flag) passes, stat finds no `stats` (exit 1).
#[test]
fn stat_without_legacy_auth_refuses_md5_servers() {
    let (Some(legacy), Some(modern)) = legacy_and_modern() else {
        return;
    };
    let stat = |py: &Python, strict: bool| {
        let args: &[&str] = if strict { &["--no-legacy-auth"] } else { &[] };
        against_python_server(py, "distq-stat", args)
    };
    let out = stat(&legacy, true);
    assert_refused_md5_server(&out);
    for (py, strict) in [(&modern, true), (&legacy, false)] {
        let out = stat(py, strict);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "python {:?}: {stderr}",
            py.version
        );
        assert!(stderr.contains("is not a distq server"), "{stderr}");
    }
}

/// That a binary refused a server whose challenge asks for HMAC-MD5: exit 3 (an
/// authentication failure), saying it was MD5, not the key.
fn assert_refused_md5_server(out: &std::process::Output) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("asks for HMAC-MD5") && stderr.contains("legacy authentication is off"),
        "{stderr}"
    );
}

/// Runs one of the binaries with `args` against Python's own server on `py`, connecting
/// with the key, and returns what it did.
fn against_python_server(py: &Python, binary: &str, args: &[&str]) -> std::process::Output {
    let mut server = py.spawn(PY_SERVER, &[KEY]);
    let addr = read_line_starting(&mut server, "ADDRESS ").replace(' ', ":");
    let out = bin(binary)
        .args(["--connect", &addr, "--authkey", KEY])
        .args(args)
        .output()
        .unwrap();
    let _ = (server.kill(), server.wait());
    out
}

/// distq's client against Python's own BaseManager server, on every version: queue calls,
/// Empty and Full mapping, a wrong key, refcounts kept correct, and shutdown.
#[test]
fn rust_client_against_python_server() {
    for py in require_pythons() {
        let mut server = py.spawn(PY_SERVER, &[KEY]);
        let addr = read_line_starting(&mut server, "ADDRESS ").replace(' ', ":");
        let manager = Manager::connect(addr.as_str(), AuthKey::new(KEY)).expect("connect");
        let tasks = manager.queue("get_task_queue").unwrap();
        tasks.put(Value::from(2201)).unwrap();
        tasks.put("text").unwrap();
        assert_eq!(tasks.qsize().unwrap(), 2);
        assert_eq!(
            tasks.get(Duration::from_secs(1)).unwrap(),
            Value::from(2201)
        );
        assert_eq!(tasks.get_nowait().unwrap(), Value::from("text"));
        let start = Instant::now();
        assert!(matches!(
            tasks.get(Duration::from_millis(200)),
            Err(Error::Empty)
        ));
        assert!(start.elapsed() >= Duration::from_millis(190));
        let bounded = manager.queue("get_bounded_queue").unwrap();
        bounded.put_nowait(1).unwrap();
        assert!(matches!(bounded.put_nowait(2), Err(Error::Full)));
        assert_eq!(manager.number_of_objects().unwrap(), 2);
        drop(bounded);
        assert_eq!(manager.number_of_objects().unwrap(), 1, "decref on drop");
        match Manager::connect(addr.as_str(), AuthKey::new("wrong")) {
            Err(Error::AuthFailed(_)) => {}
            other => panic!("python {:?}: wrong key gave {other:?}", py.version),
        }
        // A second proxy on the same queue keeps working after the first is dropped.
        let again = manager.queue("get_task_queue").unwrap();
        drop(tasks);
        again.put(1).unwrap();
        manager.shutdown().unwrap();
        let out = wait_with_deadline(server, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "python {:?} server: {}",
            py.version,
            text(&out.stderr)
        );
    }
}

/// The modern (3.12+) SHA-256 handshake and the legacy MD5 one, each against a real Python.
#[test]
fn both_handshakes_against_real_python() {
    let (legacy, modern) = legacy_and_modern();
    let script = "import sys\n\
        from multiprocessing.connection import Client\n\
        c = Client(('127.0.0.1', int(sys.argv[1])), authkey=sys.argv[2].encode())\n\
        print('OK')\n";
    let server = server();
    let port = server.local_addr().port().to_string();
    for py in legacy.iter().chain(modern.iter()) {
        assert_eq!(
            py.run_ok(script, &[&port, KEY]).trim(),
            "OK",
            "{:?}",
            py.version
        );
    }
    server.shutdown().unwrap();
    // And the other direction: distq as the client of a Python listener.
    let listener = "import sys\n\
        from multiprocessing.connection import Listener\n\
        l = Listener(('127.0.0.1', 0), authkey=sys.argv[1].encode())\n\
        print('ADDRESS %s %d' % l.address, flush=True)\n\
        c = l.accept()\n\
        c.send(c.recv())\n";
    for py in legacy.iter().chain(modern.iter()) {
        let mut child = py.spawn(listener, &[KEY]);
        let addr = read_line_starting(&mut child, "ADDRESS ").replace(' ', ":");
        let stream = std::net::TcpStream::connect(addr).unwrap();
        let mut conn = distq::conn::Connection::handshake(
            stream,
            distq::conn::Role::Client,
            &AuthKey::new(KEY),
            distq::auth::LegacyAuth::Allowed,
            1 << 20,
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{:?}: {e}", py.version));
        let v = Value::tuple(vec![Value::from("echo"), Value::from(7)]);
        conn.write_value(&v).unwrap();
        assert_eq!(conn.read_value().unwrap(), v);
        wait_with_deadline(child, Duration::from_secs(10));
    }
}

/// `SyncManager().connect()` clients: fresh queues per `Queue()` call, refcounted
/// lifetimes, JoinableQueue across processes, forked children, non-queue typeids refused.
#[test]
fn sync_manager_clients() {
    let (legacy, modern) = legacy_and_modern();
    for py in legacy.iter().chain(modern.iter()) {
        let server = server();
        let port = server.local_addr().port().to_string();
        let out = py.run_ok(
            include_str!("python/sync_manager.py"),
            &["127.0.0.1", &port, KEY],
        );
        assert!(out.contains("sync manager ok"), "{:?}: {out}", py.version);
        server.shutdown().unwrap();
    }
}

/// Python clients do not wait out our delayed ACKs (TCP_QUICKACK, issue 14): a stall is
/// at least 40 ms on Linux and a cold client hit about six of them (264 ms), a 17 KB
/// put+get one (44 ms). The best of five must stay well under those (150 ms cold,
/// under one stall for the put+get), margins wide enough for a loaded CI machine. Numbers for the
/// record come from scripts/bench; this only catches the stall coming back.
#[test]
fn python_clients_are_not_held_by_delayed_acks() {
    const SCRIPT: &str = r#"
import sys, time
from multiprocessing.managers import BaseManager
class M(BaseManager): pass
M.register('get_task_queue')
cold = []; big = []
for i in range(5):
    t = time.perf_counter()
    m = M(address=(sys.argv[1], int(sys.argv[2])), authkey=sys.argv[3].encode()); m.connect()
    q = m.get_task_queue(); q.put(1); q.get()
    cold.append(time.perf_counter() - t)
    t = time.perf_counter(); q.put(b'x' * 17000); q.get(); big.append(time.perf_counter() - t)
print('%.1f %.1f' % (min(cold) * 1e3, min(big) * 1e3))
"#;
    let server = server();
    let port = server.local_addr().port().to_string();
    for py in require_pythons() {
        let out = py.run_ok(SCRIPT, &["127.0.0.1", &port, KEY]);
        let ms: Vec<f64> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
        eprintln!(
            "python {:?}: cold client {} ms, 17 KB put+get {} ms",
            py.version, ms[0], ms[1]
        );
        assert!(
            ms[0] < 150.0 && ms[1] < 40.0,
            "python {:?}: {out}",
            py.version
        );
    }
}

/// Issue 13: a Python master waiting with `task_queue.join()` on its own server returns
/// once distq-worker has done the tasks: the worker calls `task_done()` after each result
/// (Python's server has no leases, so there is no ack to count instead).
#[test]
fn python_join_returns_with_distq_worker() {
    for py in require_pythons() {
        let mut master = py.spawn(JOIN_MASTER, &[KEY, "3"]);
        let addr = read_line_starting(&mut master, "ADDRESS ").replace(' ', ":");
        let worker = bin("distq-worker")
            .args(["--connect", &addr, "--tasks", "3", "--authkey", KEY])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let wout = wait_with_deadline(worker, Duration::from_secs(30));
        assert!(wout.status.success(), "{}", text(&wout.stderr));
        let mout = wait_with_deadline(master, Duration::from_secs(40));
        let mtext = text(&mout.stdout);
        assert!(mtext.contains("joined"), "python {:?}: {mtext}", py.version);
        assert!(
            mtext.contains("results 3"),
            "python {:?}: {mtext}",
            py.version
        );
    }
}

/// Issue 13: a task carrying a `Queue()` proxy to answer on, whose producer dropped its
/// own proxy right after the put: the queue lives while the item refers to it, and the
/// task is not lost (before: the consumer's get took the task, then unpickling failed
/// with `KeyError`).
#[test]
fn a_reply_queue_inside_a_task_outlives_its_producers_proxy() {
    let server = server();
    let port = server.local_addr().port().to_string();
    for py in require_pythons() {
        let out = py.run_ok(REPLY_QUEUE, &["127.0.0.1", &port, KEY]);
        assert_eq!(
            out.matches("done: job").count(),
            3,
            "python {:?}: {out}",
            py.version
        );
        assert!(out.contains("answered"), "python {:?}: {out}", py.version);
    }
    server.shutdown().unwrap();
}

/// Issue 13: a put over `max_frame` gets a `RemoteError` naming the limit, and the
/// connection Python cached for the thread keeps working (before: `BrokenPipeError`, and
/// every later call of that thread failed).
#[test]
fn an_oversized_item_is_refused_and_the_connection_kept() {
    let limit = 1 << 20;
    let server = server_with(|c| c.max_frame = limit);
    let port = server.local_addr().port().to_string();
    for py in require_pythons() {
        let out = py.run_ok(
            OVERSIZED,
            &["127.0.0.1", &port, KEY, "get_big_queue", &limit.to_string()],
        );
        assert!(
            out.contains("refused and still connected"),
            "python {:?}: {out}",
            py.version
        );
    }
    server.shutdown().unwrap();
}

/// Issue 16: `--max-memory`: past the budget a Python put gets `queue.Full` naming the
/// limit (a blocking one after its timeout), `stats()` shows it, and a get frees room.
#[test]
fn the_memory_budget_is_queue_full_for_python() {
    let limit: u64 = 100_000;
    let server = server_with(|c| c.max_memory = Some(limit));
    let port = server.local_addr().port().to_string();
    for py in require_pythons() {
        let out = py.run_ok(
            MEMORY,
            &["127.0.0.1", &port, KEY, "get_mem_queue", &limit.to_string()],
        );
        assert!(
            out.contains("budget kept"),
            "python {:?}: {out}",
            py.version
        );
        // Leave the queue empty for the next version.
        let m = Manager::connect(server.local_addr(), distq::AuthKey::new(KEY)).unwrap();
        let q = m.queue("get_mem_queue").unwrap();
        while q.get_nowait().is_ok() {}
    }
    server.shutdown().unwrap();
}

/// Issue 13: distq-stat against Python's own server says what is wrong, not a traceback.
#[test]
fn distq_stat_names_a_python_server() {
    for py in require_pythons() {
        let mut server = py.spawn(PY_SERVER, &[KEY]);
        let addr = read_line_starting(&mut server, "ADDRESS ").replace(' ', ":");
        let out = bin("distq-stat")
            .args([&addr, "--authkey", KEY])
            .output()
            .unwrap();
        let _ = server.kill();
        let _ = server.wait();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("is not a distq server"),
            "python {:?}: {stderr}",
            py.version
        );
        assert!(!stderr.contains("Traceback"), "{stderr}");
    }
}

/// Issue 13: line mode against Python's own server, which has no put_many/get_many:
/// the master falls back to one put and one get per task, and says so once.
#[test]
fn line_mode_master_on_a_python_server() {
    use std::io::Write;
    for py in require_pythons() {
        let mut server = py.spawn(PY_SERVER, &[KEY]);
        let addr = read_line_starting(&mut server, "ADDRESS ").replace(' ', ":");
        let mut master = bin("distq-master")
            .args(["--connect", &addr, "--input", "-", "--local-workers", "2"])
            .args(["--exec", "printf '%s!' \"$1\""])
            .env("DISTQ_AUTHKEY", KEY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        master
            .stdin
            .take()
            .unwrap()
            .write_all(b"a\nb\nc\n")
            .unwrap();
        let out = wait_with_deadline(master, Duration::from_secs(60));
        let _ = server.kill();
        let _ = server.wait();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "python {:?}: {stdout}{stderr}",
            py.version
        );
        assert_eq!(
            stderr.matches("no put_many/get_many").count(),
            1,
            "{stderr}"
        );
        for line in ["a!", "b!", "c!"] {
            assert!(stdout.contains(line), "python {:?}: {stdout}", py.version);
        }
    }
}
