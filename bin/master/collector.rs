//! Line mode's results as they arrive: told apart from other runs', matched to their
//! lines, counted, written in completion or input order.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::{BufWriter, Write};
use std::time::Instant;

use distq::{text, Error, QueueProxy, Value};

use super::backend::{is_failure, FOREIGN_BACKOFF, STOP_CHECK};
use super::progress::Progress;
use super::run_state::RunState;
use super::signals;
use super::workers::Workers;
use super::Flags;

/// Results as they arrive: told apart from other runs' by their run id, matched to
/// their lines by id, counted, written out.
pub(super) struct Collector {
    pub(super) total: usize,
    pub(super) done: usize,
    pub(super) failed: usize,
    /// Of `done + failed`, how many the interrupted session wrote (`--resume`).
    pub(super) earlier: usize,
    /// Which ids have a result (a redelivered task can produce two).
    pub(super) seen: Vec<bool>,
    /// Lines whose result is a failure, in the order they came.
    pub(super) failed_ids: Vec<usize>,
    /// Results of other runs (or with no run), by a hash of their text: counted once
    /// however often they come back round.
    pub(super) foreign: HashSet<u64>,
    run: String,
    /// Results waiting for an earlier line's result (`--ordered`), by id.
    pending: BTreeMap<usize, String>,
    next: usize,
    ordered: bool,
    out: BufWriter<Box<dyn Write>>,
    pub(super) start: Instant,
}

impl Collector {
    pub(super) fn new(
        total: usize,
        ordered: bool,
        out: BufWriter<Box<dyn Write>>,
        run: &RunState,
    ) -> Collector {
        let mut seen = vec![false; total];
        let (mut done, mut failed, mut failed_ids) = (0, 0, Vec::new());
        for (&id, &ok) in &run.earlier {
            seen[id] = true;
            if ok {
                done += 1;
            } else {
                failed += 1;
                failed_ids.push(id);
            }
        }
        failed_ids.sort_unstable();
        Collector {
            total,
            done,
            failed,
            earlier: done + failed,
            seen,
            failed_ids,
            foreign: HashSet::new(),
            run: run.id.clone(),
            pending: BTreeMap::new(),
            // With --ordered, a resumed run writes from the first line without a result.
            next: 0,
            ordered,
            out,
            start: Instant::now(),
        }
    }

    /// Collects until every line has a result or a reason to stop (returned).
    pub(super) fn collect(
        &mut self,
        flags: &Flags,
        results: &QueueProxy,
        workers: &mut Workers,
        progress: &mut Progress,
        batches: bool,
        run: &mut RunState,
    ) -> distq::Result<Option<String>> {
        let mut last_result = Instant::now();
        while self.done + self.failed < self.total {
            progress.update(self.done, self.failed);
            if let Some(signal) = signals::received() {
                return Ok(Some(format!("stopped by {}", signals::name(signal))));
            }
            let mut wait = STOP_CHECK;
            if let Some(deadline) = flags.deadline {
                let left = deadline.saturating_sub(self.start.elapsed());
                if left.is_zero() {
                    return Ok(Some(format!("the --deadline of {deadline:?} passed")));
                }
                wait = wait.min(left);
            }
            if let Some(limit) = flags.result_timeout {
                if last_result.elapsed() >= limit {
                    return Ok(Some(format!("no result for --result-timeout {limit:?}")));
                }
            }
            if workers.all_exited() {
                return Ok(Some("every local worker exited".into()));
            }
            let taken = if batches {
                results.get_many(1000, wait)
            } else {
                results.get(wait).map(|item| vec![item])
            };
            match taken {
                Ok(items) => {
                    progress.clear();
                    if self.take_batch(items, results, batches, run)? {
                        last_result = Instant::now();
                    }
                }
                Err(Error::Empty) => {}
                Err(e) => return Err(e),
            }
        }
        progress.update(self.done, self.failed);
        Ok(None)
    }

    /// Takes a batch of results: ours are counted and written (then noted as done
    /// beside the journal), others' are put back for their master. Returns whether any
    /// was ours.
    pub(super) fn take_batch(
        &mut self,
        items: Vec<Value>,
        results: &QueueProxy,
        batches: bool,
        run: &mut RunState,
    ) -> distq::Result<bool> {
        let mut written = Vec::new();
        let mut theirs = Vec::new();
        for item in items {
            match self.take(&item) {
                Verdict::Ours(id) => written.extend(id),
                Verdict::Duplicate => {}
                Verdict::Theirs => theirs.push(item),
            }
        }
        self.out
            .flush()
            .map_err(|e| Error::io("writing results", e))?;
        run.record_done(&written)
            .map_err(|e| Error::io("noting written results beside the journal", e))?;
        let ours = !written.is_empty();
        if !theirs.is_empty() {
            if batches {
                results.put_many(theirs, None)?;
            } else {
                for item in theirs {
                    results.put(item)?;
                }
            }
            if !ours {
                std::thread::sleep(FOREIGN_BACKOFF);
            }
        }
        Ok(ours)
    }

    /// Counts and writes one result if it is ours (it carries our run id).
    fn take(&mut self, item: &Value) -> Verdict {
        if text::field(item, text::RUN).and_then(Value::as_str) != Some(self.run.as_str()) {
            let mut hash = std::collections::hash_map::DefaultHasher::new();
            text::text_form(item).hash(&mut hash);
            self.foreign.insert(hash.finish());
            return Verdict::Theirs;
        }
        let id = text::field(item, text::ID)
            .and_then(Value::as_int)
            .and_then(|id| usize::try_from(id).ok())
            .filter(|id| *id < self.total);
        if let Some(id) = id {
            if std::mem::replace(&mut self.seen[id], true) {
                return Verdict::Duplicate; // after a redelivery: the first result stands
            }
        }
        let failure = is_failure(item);
        if failure {
            self.failed += 1;
            self.failed_ids.extend(id);
        } else {
            self.done += 1;
        }
        let line = text::text_form(item);
        match id {
            Some(id) if self.ordered => {
                self.pending.insert(id, line);
                self.write_ready();
            }
            _ => self.write(&line),
        }
        Verdict::Ours(id.map(|id| (id, !failure)))
    }

    /// Writes `--ordered` results whose predecessors all have theirs (or had them in
    /// the interrupted session).
    fn write_ready(&mut self) {
        loop {
            if let Some(line) = self.pending.remove(&self.next) {
                self.write(&line);
            } else if !(self.next < self.total && self.seen[self.next]) {
                break;
            }
            self.next += 1;
        }
    }

    fn write(&mut self, line: &str) {
        // A closed stdout (`| head`) must not stop the collection: results still count.
        let _ = writeln!(self.out, "{line}");
    }

    /// Writes what `--ordered` still holds (their predecessors are missing), in order.
    pub(super) fn finish(&mut self) {
        for line in std::mem::take(&mut self.pending).into_values() {
            self.write(&line);
        }
        let _ = self.out.flush();
    }
}

/// What [`Collector::take`] made of a result.
enum Verdict {
    /// Ours, counted and written (with its line and whether it succeeded, if it has an id).
    Ours(Option<(usize, bool)>),
    /// Ours, but that line already has a result.
    Duplicate,
    /// Another run's, or without a run: not ours to count.
    Theirs,
}
