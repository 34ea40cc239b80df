//! Running a shell command for one task: `distq-worker --exec`.
//!
//! The command runs as `sh -c CMD distq TASK`, so the task's text form
//! ([`crate::text::arg_form`]: bytes as they are) is `$1`; the same followed by a
//! newline is written to its stdin. What comes back is an [`Execution`], turned into the
//! result record ([`Execution::record`]) that is put on the result queue.
//!
//! Choices, and why:
//!
//! * **Its own process group.** `sh -c 'a; b'` forks children; signalling only the
//!   shell would leave them running and holding the output pipes open. Each command
//!   is started as the leader of a new process group and a timeout signals the whole
//!   group. So Ctrl-C on the worker's terminal does not reach a running command (it is
//!   in another group): the worker, told to stop, stops its commands through [`Stop`]
//!   the way a timeout does, so none keeps running after the worker has gone.
//! * **Escalation without `libc`.** A timeout sends SIGTERM to the group, waits the
//!   grace period, then sends SIGKILL. std can only SIGKILL its direct child, so group
//!   signals go through the shell's `kill` builtin (`sh` is needed anyway). The group is
//!   only signalled while its leader is unreaped, so its id cannot have been reused.
//! * **Bounded output.** stdout and stderr are read concurrently (a command that fills
//!   one pipe while we read the other would deadlock) and kept up to `max_output` bytes
//!   each; the rest is read and dropped, so the command never blocks on a full pipe.
//!   Bytes that are not UTF-8 are replaced by U+FFFD in the record.
//! * **Leftovers are stopped.** If the command exits but something it started in the
//!   background keeps the output pipes open, that group is killed after a short wait:
//!   a worker must not accumulate stray processes.
//! * **Failure is data.** A nonzero exit, a signal, a timeout, even a shell that cannot
//!   be started: each is an [`Execution`] with a status, never an error for the worker.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::text;
use crate::worker::Stop;
use crate::Value;

/// How commands are run. Start from [`ExecConfig::new`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExecConfig {
    /// The `sh -c` script; the task is `$1`.
    pub command: String,
    /// Stop the command after this long (SIGTERM, then SIGKILL after `grace`).
    pub timeout: Option<Duration>,
    /// How long a command may take to exit after SIGTERM before SIGKILL.
    pub grace: Duration,
    /// The most bytes of stdout, and separately of stderr, kept for the record.
    pub max_output: usize,
}

/// The default `max_output`: 64 KiB per stream, small enough for thousands of results
/// in memory, large enough for a typical error message or a short report.
pub const DEFAULT_MAX_OUTPUT: usize = 64 * 1024;

impl ExecConfig {
    /// A command with no timeout, a 5 s grace period and 64 KiB of output per stream.
    pub fn new(command: impl Into<String>) -> ExecConfig {
        ExecConfig {
            command: command.into(),
            timeout: None,
            grace: Duration::from_secs(5),
            max_output: DEFAULT_MAX_OUTPUT,
        }
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Exit status 0.
    Ok,
    /// A nonzero exit status, or killed by a signal we did not send.
    Failed,
    /// Stopped by us at the timeout.
    Timeout,
    /// The shell could not be started; the message says why.
    Error(String),
    /// Stopped by us because the worker is stopping ([`Stop`]): no verdict on the task.
    Stopped,
}

impl Status {
    /// The record's `status` string: `ok`, `failed`, `timeout` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
            Status::Error(_) => "error",
            Status::Stopped => "stopped",
        }
    }
}

/// What one run of a command produced.
#[derive(Clone, Debug)]
pub struct Execution {
    /// How it ended.
    pub status: Status,
    /// The exit code, if it exited (rather than being killed by a signal).
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The first `max_output` bytes of stdout.
    pub stdout: Vec<u8>,
    /// The first `max_output` bytes of stderr.
    pub stderr: Vec<u8>,
    /// Whether either stream was longer than `max_output`.
    pub truncated: bool,
    /// Wall time from start to exit.
    pub duration: Duration,
}

impl Execution {
    /// Whether the command succeeded (exit status 0).
    pub fn succeeded(&self) -> bool {
        self.status == Status::Ok
    }

    /// The result record: a dict with `id` and `run` (only if the task came in an
    /// envelope that had them), `task`, `status`, `exit_code`, `signal`, `stdout`, `stderr`, `truncated`,
    /// `duration` (seconds, float) and `attempts`. Python reads it as a dict;
    /// `distq-master` writes it as one JSON line.
    pub fn record(&self, task: &text::Envelope<'_>, attempts: u32) -> Value {
        let opt = |n: Option<i32>| n.map_or(Value::None, |n| Value::Int(n.into()));
        let lossy = |b: &[u8]| Value::from(String::from_utf8_lossy(b).into_owned());
        let mut stderr = self.stderr.clone();
        if let Status::Error(why) = &self.status {
            stderr.extend_from_slice(why.as_bytes());
        }
        let mut fields = Vec::with_capacity(11);
        if let Some(id) = task.id {
            fields.push((Value::str(text::ID), Value::Int(id as i64)));
        }
        if let Some(run) = task.run {
            fields.push((Value::str(text::RUN), run.clone()));
        }
        fields.extend([
            (Value::str(text::TASK), task.task.clone()),
            (Value::str("status"), Value::str(self.status.as_str())),
            (Value::str("exit_code"), opt(self.exit_code)),
            (Value::str("signal"), opt(self.signal)),
            (Value::str("stdout"), lossy(&self.stdout)),
            (Value::str("stderr"), lossy(&stderr)),
            (Value::str("truncated"), Value::Bool(self.truncated)),
            (
                Value::str("duration"),
                Value::Float(self.duration.as_secs_f64()),
            ),
            (Value::str("attempts"), Value::Int(attempts.into())),
        ]);
        Value::dict(fields)
    }

    /// One line for a terminal: `ok in 0.21s`, `failed (exit 3) in 1.0s`, ...
    pub fn summary(&self) -> String {
        let how = match (&self.status, self.exit_code, self.signal) {
            (Status::Ok, _, _) => "ok".to_string(),
            (Status::Error(why), _, _) => format!("error ({why})"),
            (Status::Timeout, _, Some(sig)) => format!("timed out (stopped by signal {sig})"),
            (Status::Timeout, _, None) => "timed out".to_string(),
            (Status::Stopped, _, _) => "stopped (the worker is stopping)".to_string(),
            (Status::Failed, Some(code), _) => format!("failed (exit {code})"),
            (Status::Failed, None, Some(sig)) => format!("failed (killed by signal {sig})"),
            (Status::Failed, None, None) => "failed".to_string(),
        };
        format!("{how} in {:.2}s", self.duration.as_secs_f64())
    }
}

/// A stream's bytes as they are read; shared so that output read so far survives a
/// reader thread that has to be abandoned (see [`run`]).
#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    truncated: bool,
}

/// Runs `config.command` with `arg` as `$1` and `stdin` on its standard input, until it
/// exits, times out, or `stop` asks.
pub fn run(config: &ExecConfig, arg: &[u8], stdin: &[u8], stop: &Stop) -> Execution {
    let start = Instant::now();
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(&config.command)
        .arg("distq")
        .arg(std::ffi::OsStr::from_bytes(arg))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return Execution {
                status: Status::Error(format!("cannot run sh: {e}")),
                exit_code: None,
                signal: None,
                stdout: Vec::new(),
                stderr: Vec::new(),
                truncated: false,
                duration: start.elapsed(),
            }
        }
    };
    // Written from a thread: a command that never reads stdin must not block us, and
    // one that exits early just makes this write fail (EPIPE), which is fine.
    if let Some(mut pipe) = child.stdin.take() {
        let input = stdin.to_vec();
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let (eof_tx, eof_rx) = mpsc::channel();
    let out = capture(child.stdout.take(), config.max_output, eof_tx.clone());
    let err = capture(child.stderr.take(), config.max_output, eof_tx);

    let (exit, ended_by) = wait(&mut child, config, stop);
    let exited = Instant::now();
    // Both readers reach EOF at once unless a background process kept a pipe open.
    let mut open = 2;
    while open > 0 {
        let left = Duration::from_millis(500).saturating_sub(exited.elapsed());
        match eof_rx.recv_timeout(left) {
            Ok(()) => open -= 1,
            Err(_) => break,
        }
    }
    if open > 0 {
        // Something the command started still holds its output: stop it. That
        // something is normally in the command's group, which therefore still exists,
        // so the id is not a reused one (a process that left the group with `setsid`
        // is out of reach; we stop waiting for it below).
        signal_group(child.id(), "KILL");
        let late = Instant::now();
        while open > 0 {
            let left = Duration::from_secs(1).saturating_sub(late.elapsed());
            match eof_rx.recv_timeout(left) {
                Ok(()) => open -= 1,
                Err(_) => break, // in a group of its own: give up on the rest
            }
        }
    }
    let take = |c: &Arc<Mutex<Capture>>| {
        let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut c.kept), c.truncated)
    };
    let (stdout, t1) = take(&out);
    let (stderr, t2) = take(&err);
    let (status, exit_code, signal) = match exit {
        Some(exit) if ended_by == Some(Ending::Stop) => {
            (Status::Stopped, exit.code(), exit.signal())
        }
        Some(exit) if ended_by == Some(Ending::Timeout) => {
            (Status::Timeout, exit.code(), exit.signal())
        }
        Some(exit) if exit.success() => (Status::Ok, Some(0), None),
        Some(exit) => (Status::Failed, exit.code(), exit.signal()),
        None => (
            Status::Error("lost track of the command (wait failed)".into()),
            None,
            None,
        ),
    };
    Execution {
        status,
        exit_code,
        signal,
        stdout,
        stderr,
        truncated: t1 || t2,
        duration: exited - start,
    }
}

/// Why we stopped a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Timeout,
    Stop,
}

/// Waits for the command, escalating at the timeout or when asked to stop. Returns its
/// exit status (`None` if waiting itself failed) and why we ended it, if we did.
fn wait(
    child: &mut Child,
    config: &ExecConfig,
    stop: &Stop,
) -> (Option<std::process::ExitStatus>, Option<Ending>) {
    let start = Instant::now();
    let mut termed: Option<(Instant, Ending)> = None;
    let ending = |t: Option<(Instant, Ending)>| t.map(|(_, why)| why);
    // Short polls first so quick commands return quickly, then at most every 20 ms.
    let mut poll = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(exit)) => return (Some(exit), ending(termed)),
            Ok(None) => {}
            Err(_) => {
                let _ = child.kill();
                return (child.wait().ok(), ending(termed));
            }
        }
        // The leader is not reaped yet, so its group id is still ours to signal.
        let timed_out = config.timeout.is_some_and(|limit| start.elapsed() >= limit);
        match termed {
            None if stop.requested() || timed_out => {
                signal_group(child.id(), "TERM");
                let why = if timed_out {
                    Ending::Timeout
                } else {
                    Ending::Stop
                };
                termed = Some((Instant::now(), why));
            }
            Some((at, _)) if at.elapsed() >= config.grace || stop.urgent() => {
                signal_group(child.id(), "KILL");
                let _ = child.kill();
                return (child.wait().ok(), ending(termed));
            }
            _ => {}
        }
        thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_millis(20));
    }
}

/// Sends `signal` (a name such as `TERM`) to process group `pgid`, through the shell's
/// `kill` builtin since std has no way to signal a group.
fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("sh")
        .args(["-c", "kill -s \"$1\" -- \"-$2\" 2>/dev/null", "sh", signal])
        .arg(pgid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Reads `pipe` to EOF on a thread, keeping the first `max` bytes; signals `eof`.
fn capture(
    pipe: Option<impl Read + Send + 'static>,
    max: usize,
    eof: mpsc::Sender<()>,
) -> Arc<Mutex<Capture>> {
    let shared = Arc::new(Mutex::new(Capture::default()));
    let Some(mut pipe) = pipe else {
        let _ = eof.send(());
        return shared;
    };
    let sink = Arc::clone(&shared);
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut c = sink.lock().unwrap_or_else(|p| p.into_inner());
                    let room = max.saturating_sub(c.kept.len());
                    c.kept.extend_from_slice(&buf[..n.min(room)]);
                    c.truncated |= n > room;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = eof.send(());
    });
    shared
}
