//! A line-mode run's identity, and what `--resume` needs to continue one.
//!
//! Every run gets a random id that travels in each task's envelope and comes back in
//! each result (`'run'`), so a master never counts a result of another master on the
//! same server, nor one left over from an earlier run. When the hosted server keeps a
//! journal, the run is also written down beside it, so that `--resume` can continue
//! exactly that run and a reused directory is never mistaken for one:
//!
//! * `distq-run`: the run id, the number of lines and a SHA-256 of the input, written
//!   when a run starts (a resumed run must be given the same input);
//! * `distq-done`: one `ID ok|failed` line per result the master has written to its
//!   output, appended after the output is flushed. A master killed between taking a
//!   result and writing it has no line for it, so `--resume` puts that task again: a
//!   task can run twice across a crash, but no result is lost.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

const RUN_FILE: &str = "distq-run";
const DONE_FILE: &str = "distq-done";

pub struct RunState {
    pub id: String,
    /// Results written by the interrupted session, by line: whether each succeeded.
    pub earlier: HashMap<usize, bool>,
    done_log: Option<File>,
}

/// A random run id: 16 hex digits.
fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rngs::OsRng.gen();
    format!("{n:016x}")
}

fn describe(lines: &[Vec<u8>]) -> String {
    let mut hash = Sha256::new();
    for line in lines {
        hash.update(line);
        hash.update(b"\n");
    }
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("lines {}\ninput {digest}\n", lines.len())
}

impl RunState {
    /// A new run; with a journal directory, written down there for a later `--resume`.
    pub fn fresh(dir: Option<&Path>, lines: &[Vec<u8>]) -> io::Result<RunState> {
        let id = new_id();
        let done_log = match dir {
            None => None,
            Some(dir) => {
                std::fs::write(dir.join(RUN_FILE), format!("run {id}\n{}", describe(lines)))?;
                Some(File::create(dir.join(DONE_FILE))?)
            }
        };
        Ok(RunState {
            id,
            earlier: HashMap::new(),
            done_log,
        })
    }

    /// The run recorded in `dir`, which must have been started with these same lines.
    pub fn resume(dir: &Path, lines: &[Vec<u8>]) -> Result<RunState, String> {
        let path = dir.join(RUN_FILE);
        let recorded = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "--resume: no run to resume in {} ({e}); start without --resume",
                dir.display()
            )
        })?;
        let (first, rest) = recorded.split_once('\n').unwrap_or((&recorded, ""));
        let id = first
            .strip_prefix("run ")
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| format!("--resume: {} is not a run file", path.display()))?
            .to_string();
        if rest != describe(lines) {
            return Err(format!(
                "--resume: the input differs from the run recorded in {} (give the same input, or start a new run in a new directory)",
                path.display()
            ));
        }
        let done_path = dir.join(DONE_FILE);
        let mut earlier = HashMap::new();
        if let Ok(done) = std::fs::read_to_string(&done_path) {
            // A torn last line (killed mid-write) is ignored: that task runs again.
            for line in done.lines() {
                let parsed = line.split_once(' ').and_then(|(id, status)| {
                    let id: usize = id.parse().ok().filter(|id| *id < lines.len())?;
                    match status {
                        "ok" => Some((id, true)),
                        "failed" => Some((id, false)),
                        _ => None,
                    }
                });
                if let Some((id, ok)) = parsed {
                    earlier.insert(id, ok);
                }
            }
        }
        let done_log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&done_path)
            .map_err(|e| format!("cannot append to {}: {e}", done_path.display()))?;
        Ok(RunState {
            id,
            earlier,
            done_log: Some(done_log),
        })
    }

    /// Notes results that are now in the output (call after flushing it).
    pub fn record_done(&mut self, written: &[(usize, bool)]) -> io::Result<()> {
        let Some(log) = &mut self.done_log else {
            return Ok(());
        };
        let mut text = String::new();
        for (id, ok) in written {
            text.push_str(&format!("{id} {}\n", if *ok { "ok" } else { "failed" }));
        }
        log.write_all(text.as_bytes())
    }
}
