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

/// The dispatch harness's filter makes every call that could wait return at once.
#[test]
fn blocking_calls_are_tamed() {
    use distq::protocol::{Arg, Request};
    use distq::Value;
    let tamed = |method: &str, args: Vec<Value>, kwargs: Vec<(&str, Value)>| {
        let mut req = Request::new(Some(harness::IDENTS[0]), method, args);
        req.kwargs = kwargs
            .into_iter()
            .map(|(k, v)| (k.into(), Arg::Value(v)))
            .collect();
        harness::tame_request(req)
    };
    let kw = |v: Value| [("timeout".to_string(), Arg::Value(v))];
    assert_eq!(tamed("join", vec![], vec![]), None);
    let get = tamed("get", vec![], vec![]).unwrap();
    assert_eq!(get.kwargs, kw(Value::Int(0)));
    let get = tamed("get", vec![Value::Bool(true), Value::None], vec![]).unwrap();
    assert_eq!(
        get.args,
        [Arg::Value(Value::Bool(true)), Arg::Value(Value::Int(0))]
    );
    let put = tamed(
        "put",
        vec![Value::Int(1)],
        vec![("timeout", Value::Float(1e300))],
    )
    .unwrap();
    assert_eq!(put.kwargs, kw(Value::Int(0)));
    let bad = tamed("get", vec![], vec![("timeout", Value::Float(-1.0))]).unwrap();
    assert_eq!(bad.kwargs, kw(Value::Float(-1.0)));
    // An empty queue with timeout 0 answers Empty at once instead of blocking.
    let started = Instant::now();
    let mut frames = Vec::new();
    let req = Request::new(Some(harness::IDENTS[0]), "get", vec![]);
    distq::frame::write_frame(
        &mut frames,
        &distq::pickle::encode(&req.to_value().unwrap()).unwrap(),
    )
    .unwrap();
    harness::dispatch(&frames);
    assert!(started.elapsed() < BOUND);
}
