//! The classic master, the Rust twin of `task_master.py`: random int tasks, one
//! `Result: ...` line per result.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use distq::{text, AuthKey, Error, QueueProxy, Value};
use rand::Rng;

use super::backend::{
    end_of_job, is_failure, Backend, FOREIGN_BACKOFF, RESULTS, STOP_CHECK, TASKS,
};
use super::cli::{self, exit};
use super::signals;
use super::workers::Workers;
use super::Flags;

/// Runs the classic master; returns its exit status.
pub(super) fn run(flags: &Flags, authkey: AuthKey) -> i32 {
    let result = (|| {
        let backend = Backend::open(flags, &authkey, true).map_err(failed)?;
        let (left_tasks, left_results) = backend.check_leftovers(flags);
        let tasks = backend.manager.queue(TASKS).map_err(failed)?;
        let results = backend.manager.queue(RESULTS).map_err(failed)?;
        let workers = Workers::spawn(
            flags.local_workers.unwrap_or(0),
            &backend.addr,
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
        if finished && backend.hosted.is_some() {
            end_of_job(&backend.manager, &tasks);
        }
        drop((workers, tasks, results));
        backend.close().map_err(failed)?;
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

/// Tasks per `put_many` and results per `get_many` of the classic master.
const CLASSIC_BATCH: usize = 1000;
