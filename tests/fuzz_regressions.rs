//! Replays the committed fuzz corpus: every file in `fuzz/regressions/<target>/` goes
//! through the same harness function the cargo-fuzz target `<target>` runs (the harnesses
//! live in `fuzz/src/lib.rs`, included here), so these inputs stay covered by `cargo test`
//! on the stable toolchain, without libFuzzer.
//!
//! Each input must return without panicking (a harness panics on a crash and on any
//! property it checks: bounded sizes, round trips, no authentication without the key) and
//! within [`BOUND`]. See `docs/fuzzing.md` for how the corpus was made and how to fuzz again.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use distq::dispatch::QueueCall;
use distq::protocol::{Arg, Request};
use distq::queues::{Policy, Wait};
use distq::Value;

/// How long one input may take. Every committed input takes well under 100 ms even in a
/// debug build; the margin is for a loaded machine.
const BOUND: Duration = Duration::from_secs(10);

/// Stack for the replay thread: the main thread's default, since libFuzzer runs the
/// targets on a main thread too (a test thread's default is 2 MiB).
const STACK: usize = 8 << 20;

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = regressions().join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `run` on every input of `target` in a worker thread, failing with the names of the
/// inputs that panicked or took longer than [`BOUND`] (all of them, not just the first).
fn replay(target: &str) {
    let run = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .expect("a harness for every target");
    let files = inputs(target);
    assert!(!files.is_empty(), "no regression inputs for {target}");
    let (tx, rx) = mpsc::channel();
    let worker = {
        let files = files.clone();
        thread::Builder::new()
            .name(format!("replay-{target}"))
            .stack_size(STACK)
            .spawn(move || {
                for file in files {
                    let data = fs::read(&file).expect("readable input");
                    let started = Instant::now();
                    let outcome = panic::catch_unwind(|| run(&data)).is_ok();
                    if tx.send((file, outcome, started.elapsed())).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the replay thread")
    };
    let mut failures = Vec::new();
    for expected in &files {
        match rx.recv_timeout(BOUND) {
            Ok((file, ok, took)) => {
                assert_eq!(&file, expected);
                if !ok {
                    failures.push(format!("{} panicked (message above)", file.display()));
                } else if took > BOUND {
                    failures.push(format!("{} took {took:?}", file.display()));
                }
            }
            Err(_) => {
                // The worker is stuck in the harness; it cannot be stopped, only reported.
                failures.push(format!(
                    "{} did not return within {BOUND:?}",
                    expected.display()
                ));
                panic!(
                    "{target}: {} input(s) failed:\n{}",
                    failures.len(),
                    failures.join("\n")
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{target}: {} of {} input(s) failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    worker.join().expect("replay thread");
}

#[test]
fn frame() {
    replay("frame");
}

#[test]
fn handshake_server() {
    replay("handshake_server");
}

#[test]
fn handshake_client() {
    replay("handshake_client");
}

#[test]
fn pickle() {
    replay("pickle");
}

#[test]
fn dispatch() {
    replay("dispatch");
}

/// Every target has a directory, and every directory a target: a renamed target cannot
/// silently stop being replayed.
#[test]
fn every_target_is_replayed() {
    let mut dirs: Vec<String> = fs::read_dir(regressions())
        .expect("fuzz/regressions")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut targets: Vec<String> = harness::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    targets.sort();
    assert_eq!(dirs, targets);
}

/// A request as the server sees it: pickled, then parsed (so item lists are `Arg::Items`).
fn request(method: &str, args: Vec<Value>, kwargs: Vec<(&str, Value)>) -> Request {
    let mut req = Request::new(Some(harness::IDENTS[0]), method, args);
    req.kwargs = kwargs
        .into_iter()
        .map(|(k, v)| (k.into(), Arg::Value(v)))
        .collect();
    Request::parse(&distq::pickle::encode(&req.to_value().unwrap()).unwrap()).unwrap()
}

/// Once bound, every call that could wait waits for nothing, whichever argument (or
/// none) asked it to wait; a call that must not wait keeps `Wait::No`.
#[test]
fn blocking_calls_are_tamed() {
    let tamed = |method: &str, args: Vec<Value>, kwargs: Vec<(&str, Value)>| {
        let mut req = request(method, args, kwargs);
        let mut call = QueueCall::bind(method, &mut req, &Policy::default())
            .unwrap_or_else(|e| panic!("{method}: {e:?}"))
            .unwrap_or_else(|| panic!("{method} is a queue method"));
        harness::tame(&mut call);
        call.wait_mut().copied()
    };
    let zero = Some(Wait::For(Duration::ZERO));
    let item = || Value::from(1);
    let items = || Value::list(vec![Value::from(1)]);
    assert_eq!(tamed("get", vec![], vec![]), zero);
    assert_eq!(
        tamed("get", vec![Value::Bool(true), Value::None], vec![]),
        zero
    );
    assert_eq!(
        tamed("get", vec![Value::Bool(false)], vec![]),
        Some(Wait::No)
    );
    assert_eq!(tamed("get_nowait", vec![], vec![]), Some(Wait::No));
    let long = ("timeout", Value::Float(1e300));
    assert_eq!(tamed("put", vec![item()], vec![long.clone()]), zero);
    assert_eq!(tamed("put_many", vec![items()], vec![]), zero);
    assert_eq!(tamed("get_many", vec![Value::from(2)], vec![long]), zero);
    assert_eq!(tamed("reserve", vec![], vec![]), zero);
    assert_eq!(tamed("reserve_many", vec![], vec![]), zero);
    assert_eq!(tamed("join", vec![], vec![]), zero);
    assert_eq!(tamed("ack_put", vec![Value::from(1), item()], vec![]), zero);
    let one = || Value::list(vec![Value::from(1)]);
    assert_eq!(tamed("ack_put_many", vec![one(), one()], vec![]), zero);
    assert_eq!(tamed("qsize", vec![], vec![]), None);
    assert_eq!(tamed("ack", vec![Value::from(1)], vec![]), None);
}

/// Through the whole harness, each call that would wait forever (on an empty queue, a
/// full one, unfinished items) answers at once.
#[test]
fn blocking_calls_return_at_once() {
    let on = |ident: &str, method: &str, args: Vec<Value>| {
        let req = Request::new(Some(ident), method, args);
        distq::pickle::encode(&req.to_value().unwrap()).unwrap()
    };
    let (q, bounded) = (harness::IDENTS[0], harness::IDENTS[1]);
    let mut frames = Vec::new();
    for req in [
        on(q, "get", vec![]),
        on(q, "get_many", vec![]),
        on(q, "reserve", vec![]),
        on(q, "reserve_many", vec![]),
        on(q, "put", vec![Value::from(1)]),
        on(q, "join", vec![]),
        on(bounded, "put", vec![Value::from(1)]),
        on(bounded, "put", vec![Value::from(2)]),
        on(bounded, "put", vec![Value::from(3)]),
        on(bounded, "put_many", vec![Value::list(vec![Value::from(4)])]),
    ] {
        distq::frame::write_frame(&mut frames, &req).unwrap();
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        harness::dispatch(&frames);
        let _ = tx.send(());
    });
    rx.recv_timeout(BOUND)
        .expect("the dispatch harness returns without blocking");
}
