//! The master's local workers: this executable run as `distq-worker`, started with
//! the key in their environment, stopped with SIGTERM and, late, SIGKILL.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distq::{AuthKey, Error};

use super::WORKER_NAME;

/// Local `distq-worker` processes, stopped when dropped (on every path out of the
/// master, errors and signals included): each is sent SIGTERM, so that it stops its
/// commands and gives their tasks back, and is killed only if it has not exited after
/// its commands' grace period.
pub(super) struct Workers {
    children: Vec<Child>,
    /// How long a worker may take to stop: its commands' `--kill-after`, and a margin.
    grace: Duration,
}

impl Workers {
    /// Starts `k` workers with `extra` flags, handing them the key through the
    /// environment so it never shows in `ps`. The workers are this very executable run
    /// under the name `distq-worker` (see [`main`](super::main)), so a master works without a
    /// `distq-worker` beside it: `cargo run --bin distq-master` builds only the master.
    /// Command workers write nothing to stdout (it carries the results) and give up at
    /// once if the master goes away.
    pub(super) fn spawn(
        k: u32,
        addr: &str,
        authkey: &AuthKey,
        extra: &[String],
    ) -> distq::Result<Workers> {
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding distq-master's own path", e))?;
        let kill_after = extra
            .iter()
            .position(|f| f == "--kill-after")
            .and_then(|i| extra.get(i + 1))
            .and_then(|secs| secs.parse::<f64>().ok())
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .unwrap_or(Duration::from_secs(5));
        let mut workers = Workers {
            children: Vec::new(),
            grace: kill_after + Duration::from_secs(3),
        };
        for _ in 0..k {
            let mut cmd = Command::new(&exe);
            cmd.arg0(WORKER_NAME)
                .args(["--connect", addr, "--forever", "-q"])
                .args(extra)
                .env(
                    "DISTQ_AUTHKEY",
                    std::ffi::OsStr::from_bytes(authkey.as_bytes()),
                );
            if !extra.is_empty() {
                cmd.args(["--reconnect-for", "0"]).stdout(Stdio::null());
            }
            let child = cmd
                .spawn()
                .map_err(|e| Error::io(format!("starting {}", exe.display()), e))?;
            workers.children.push(child);
        }
        Ok(workers)
    }

    /// Whether there were local workers and none is left (they cannot finish the job).
    pub(super) fn all_exited(&mut self) -> bool {
        !self.children.is_empty()
            && self
                .children
                .iter_mut()
                .all(|c| !matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let running = |c: &mut Child| matches!(c.try_wait(), Ok(None));
        for child in &mut self.children {
            if running(child) {
                terminate(child);
            }
        }
        let deadline = Instant::now() + self.grace;
        while self.children.iter_mut().any(running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for child in &mut self.children {
            if running(child) {
                eprintln!(
                    "warning: local worker {} did not stop within {:?}: killing it",
                    child.id(),
                    self.grace
                );
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Sends SIGTERM to a local worker that has not been reaped yet (std can only SIGKILL).
fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill touches no memory; the pid is our unreaped child's, so not reused.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}
