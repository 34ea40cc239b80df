//! Durable queues: `distq-server --journal DIR` killed with SIGKILL and restarted.
//!
//! `DISTQ_LONG=1` repeats the crash test 20 times.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use distq::{AuthKey, Error, Manager, Value};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distq-jtest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Starts `distq-server --journal dir` on `bind` and returns it with its address.
fn start(dir: &Path, bind: &str, extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = bin("distq-server")
        .args(["--bind", bind, "--authkey", KEY, "--journal"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8];
    while !(text(&line).contains("listening on ") && line.ends_with(b"\n")) {
        if err.read(&mut b).unwrap_or(0) == 0 {
            panic!("server exited: {}", text(&line));
        }
        line.push(b[0]);
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let text = text(&line);
    let last = text.lines().last().unwrap();
    let addr = last.trim_end().rsplit(' ').next().unwrap().parse().unwrap();
    (child, addr)
}

fn restart(dir: &Path, addr: SocketAddr, extra: &[&str]) -> (Child, SocketAddr) {
    start(dir, &addr.to_string(), extra)
}

fn kill9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn connect(addr: SocketAddr) -> Manager {
    Manager::connect(addr, AuthKey::new(KEY)).unwrap()
}

/// Several producers put numbered items; the server is killed mid-stream; after a
/// restart every acknowledged item is there exactly once, in order per producer.
#[test]
fn acknowledged_puts_survive_kill_9() {
    let rounds = if std::env::var_os("DISTQ_LONG").is_some() {
        20
    } else {
        2
    };
    for round in 0..rounds {
        let dir = tmpdir(&format!("kill{round}"));
        let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let q = connect(addr).queue("durable").unwrap();
                    let mut acked = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        match q.put(Value::tuple(vec![Value::from(p), Value::from(n)])) {
                            Ok(()) => acked.push(n),
                            Err(_) => break, // the server died under us: not acknowledged
                        }
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        kill9(server);
        stop.store(true, Ordering::SeqCst);
        let acked: Vec<Vec<i64>> = producers.into_iter().map(|p| p.join().unwrap()).collect();
        assert!(
            acked.iter().all(|a| !a.is_empty()),
            "every producer got some puts in"
        );

        let (server, addr) = restart(&dir, addr, &[]);
        let q = connect(addr).queue("durable").unwrap();
        let mut seen: HashMap<i64, Vec<i64>> = HashMap::new();
        loop {
            match q.get_many(10_000, Duration::from_millis(200)) {
                Ok(batch) => {
                    for v in batch {
                        let t = v.as_tuple().unwrap();
                        seen.entry(t[0].as_int().unwrap())
                            .or_default()
                            .push(t[1].as_int().unwrap());
                    }
                }
                Err(Error::Empty) => break,
                Err(e) => panic!("{e}"),
            }
        }
        for (p, acked) in acked.iter().enumerate() {
            let got = seen.remove(&(p as i64)).unwrap_or_default();
            // Items put but not yet acknowledged when the server died may or may not be
            // there; the acknowledged ones must be, once each, in order.
            assert!(
                got.len() >= acked.len(),
                "producer {p}: {} of {} acked items",
                got.len(),
                acked.len()
            );
            assert_eq!(
                &got[..acked.len()],
                &acked[..],
                "producer {p}: order or duplicates"
            );
            assert!(
                got.len() <= acked.len() + 1,
                "at most the one in flight extra"
            );
        }
        kill9(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Reserved-but-unacked items come back after a restart, at the head; acked ones do not.
#[test]
fn reserved_items_come_back_acked_ones_do_not() {
    let dir = tmpdir("leases");
    let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
    let q = connect(addr).queue("jobs").unwrap();
    for i in 0..5 {
        q.put(i).unwrap();
    }
    let (a, _) = q.reserve(Duration::from_secs(1)).unwrap(); // 0
    let (_b, _) = q.reserve(Duration::from_secs(1)).unwrap(); // 1: never acked
    q.ack(a).unwrap();
    assert_eq!(q.get(Duration::from_secs(1)).unwrap(), Value::from(2)); // plain get: gone
    std::thread::sleep(Duration::from_millis(200)); // let the flusher write the acks
    kill9(server);
    let (server, addr) = restart(&dir, addr, &[]);
    let q = connect(addr).queue("jobs").unwrap();
    let got = q.get_many(100, Duration::from_secs(1)).unwrap();
    assert_eq!(got, vec![Value::from(1), Value::from(3), Value::from(4)]);
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Compaction while producers and consumers run loses nothing.
#[test]
fn compaction_under_load_loses_nothing() {
    let dir = tmpdir("compact");
    let (server, addr) = start(
        &dir,
        "127.0.0.1:0",
        &["--fsync", "never", "--compact-min", "100000"],
    );
    let m = connect(addr);
    let q = m.queue("churn").unwrap();
    // 20,000 puts, 19,000 gets: the journal is mostly dead records, so it compacts.
    let payload = "p".repeat(200);
    let mut kept = Vec::new();
    for i in 0..20_000i64 {
        q.put(Value::tuple(vec![
            Value::from(i),
            Value::from(payload.as_str()),
        ]))
        .unwrap();
        if i % 20 != 0 {
            q.get(Duration::from_secs(1)).unwrap();
        } else {
            kept.push(i);
        }
    }
    std::thread::sleep(Duration::from_millis(300)); // the last gets' records reach the file
    let len = std::fs::metadata(dir.join("distq.journal")).unwrap().len();
    assert!(
        len < 20_000 * 200,
        "the journal was compacted ({len} bytes)"
    );
    kill9(server);
    let (server, addr) = restart(&dir, addr, &[]);
    let q = connect(addr).queue("churn").unwrap();
    let all = q.get_many(100_000, Duration::from_secs(1)).unwrap();
    let ids: Vec<i64> = all
        .iter()
        .map(|v| v.as_tuple().unwrap()[0].as_int().unwrap())
        .collect();
    // FIFO gets took the oldest 19,000: exactly the newest 1,000 are left, in order.
    assert!(
        ids == (19_000..20_000).collect::<Vec<i64>>(),
        "{} items, first {:?}",
        ids.len(),
        ids.first()
    );
    eprintln!("journal was {len} bytes before the restart");
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A full disk: the put that cannot be journaled gets an error, gets keep working, and
/// puts work again once space returns. Uses a 1 MiB tmpfs (needs root, as CI has).
#[test]
fn a_full_disk_refuses_puts_and_recovers() {
    let mnt = tmpdir("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but mounting a tmpfs failed (needs root)"
        );
        eprintln!("note: cannot mount a tmpfs (not root?); skipping the disk-full test");
        return;
    }
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 700 * 1024]).unwrap();
    let dir = mnt.join("journal");
    let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
    let q = connect(addr).queue("big").unwrap();
    let item = Value::from(vec![7u8; 20_000]);
    let mut acked = 0;
    let err = loop {
        match q.put(item.clone()) {
            Ok(()) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 100, "the disk never filled");
    };
    assert!(err.to_string().contains("journal"), "{err}");
    assert!(acked > 0);
    // Gets still work.
    assert_eq!(q.get(Duration::from_secs(1)).unwrap(), item);
    std::fs::remove_file(&filler).unwrap();
    q.put(item.clone()).unwrap();
    kill9(server);
    let (server, addr) = restart(&dir, addr, &[]);
    let q = connect(addr).queue("big").unwrap();
    let back = q.get_many(1000, Duration::from_secs(1)).unwrap();
    // Everything acknowledged minus the one taken (plus possibly the refused one, which
    // was queued in memory but never acknowledged).
    assert!(back.len() >= acked, "{} < {acked}", back.len());
    kill9(server);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir_all(&mnt);
}

/// Corruption in the middle refuses to start, with a message naming --journal-repair.
#[test]
fn a_corrupt_journal_refuses_to_start_unless_repaired() {
    let dir = tmpdir("corrupt");
    let (server, addr) = start(&dir, "127.0.0.1:0", &["--fsync", "always"]);
    let q = connect(addr).queue("c").unwrap();
    for i in 0..50 {
        q.put(i).unwrap();
    }
    kill9(server);
    let path = dir.join("distq.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let out = bin("distq-server")
        .args(["--bind", "127.0.0.1:0", "--authkey", KEY, "--journal"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--journal-repair"),
        "{}",
        text(&out.stderr)
    );
    let (server, addr) = start(&dir, "127.0.0.1:0", &["--journal-repair"]);
    let left = connect(addr).queue("c").unwrap().qsize().unwrap();
    assert!((40..50).contains(&left), "{left} items survive the repair");
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A master hosting its server with `--journal` leaves unfinished tasks in the journal,
/// and a server started on the same directory serves them.
#[test]
fn a_hosting_master_keeps_its_tasks_in_the_journal() {
    let dir = tmpdir("master");
    let out = bin("distq-master")
        .args([
            "--bind",
            "127.0.0.1:0",
            "--tasks",
            "3",
            "--result-timeout",
            "0.3",
        ])
        .args(["--authkey", KEY, "--journal"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
    let tasks = connect(addr).queue("get_task_queue").unwrap();
    assert_eq!(
        tasks.qsize().unwrap(),
        3,
        "the unworked tasks survived the master"
    );
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}
