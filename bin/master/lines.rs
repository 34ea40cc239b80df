//! Line mode (`--input`): one task per input line, one result per output line; the run
//! beside a `--journal` and `--resume`; the summary on stderr.

use std::io::{BufWriter, Read, Write};
use std::time::Duration;

use distq::{text, AuthKey, Error, QueueProxy, Value};

use super::backend::{end_of_job, Backend, RESULTS, TASKS};
use super::cli::{self, exit};
use super::collector::Collector;
use super::progress::Progress;
use super::run_state::RunState;
use super::signals;
use super::workers::Workers;
use super::Flags;

/// Runs a line-mode master; returns its exit status.
pub(super) fn run(flags: &Flags, authkey: AuthKey, verbosity: i8) -> i32 {
    let input = flags.input.as_deref().unwrap_or("-");
    let lines = match read_lines(input) {
        Ok(lines) => lines,
        Err(e) => cli::fail(format!("cannot read {input}: {e}"), exit::FAILURE),
    };
    let result = (|| {
        let backend = Backend::open(flags, &authkey, false)?;
        backend.check_leftovers(flags);
        let tasks = backend.manager.queue(TASKS)?;
        let results = backend.manager.queue(RESULTS)?;
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
                Workers::spawn(k, &backend.addr, &authkey, &args)?
            }
            None => Workers::spawn(0, &backend.addr, &authkey, &[])?,
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
        if matches!(stopped, Ok(None)) && backend.hosted.is_some() {
            end_of_job(&backend.manager, &tasks);
        }
        drop((workers, tasks, results));
        backend.close()?;
        stopped.map(|why| (collector, why))
    })();
    let (collector, why) = match result {
        Ok(done) => done,
        Err(e) => cli::fail(&e, cli::status_for(&e)),
    };
    summary(collector, why, &lines, verbosity)
}

/// Prints what became of the run's tasks on stderr (not with `-qq`): the counts, why
/// the master stopped waiting, results of other runs, the first failed and missing
/// lines. Returns the exit status they call for.
fn summary(collector: Collector, why: Option<String>, lines: &[Vec<u8>], verbosity: i8) -> i32 {
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
