//! The server the master talks to, hosted or `--connect`ed, and what both modes share
//! about it: the two queues' names, how a hosting master ends a job, how results are
//! waited for and told apart.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use distq::{
    text, Address, AuthKey, ClientConfig, Manager, QueueProxy, RunningServer, Server, ServerConfig,
    Value,
};

use super::cli::{self, exit};
use super::{bind_addr, Flags};

/// The server the master talks to: hosted (and shut down at the end) or `--connect`ed.
pub(super) struct Backend {
    pub(super) hosted: Option<RunningServer>,
    pub(super) addr: String,
    pub(super) manager: Manager,
}

impl Backend {
    pub(super) fn open(flags: &Flags, authkey: &AuthKey, announce: bool) -> distq::Result<Backend> {
        let (hosted, addr) = match &flags.connect {
            Some(addr) => (None, addr.clone()),
            None => {
                let mut config = ServerConfig::new(authkey.clone());
                config.journal = flags.journal.clone();
                config.legacy_auth = flags.legacy_auth;
                // Nothing has started yet: "cannot listen" ends the master with README's
                // status for it (1), not the connection status a later failure gets.
                let server = Server::bind_to(&Address::parse(&bind_addr(flags)), config)
                    .unwrap_or_else(|e| cli::fail(cli::with_flag_hint(&e), exit::FAILURE));
                if announce {
                    println!("Listening on {}", server.address());
                }
                // Local workers connect to wherever the server listens: its socket path,
                // or its TCP address (a wildcard reached through loopback).
                let addr = match server.address() {
                    Address::Unix(_) => server.address().to_arg(),
                    Address::Tcp(_) => loopback(server.local_addr()).to_string(),
                };
                (Some(server.spawn()?), addr)
            }
        };
        let mut client = ClientConfig::default();
        client.legacy_auth = flags.legacy_auth;
        let manager = Manager::connect_to(&Address::parse(&addr), authkey.clone(), client)?;
        Ok(Backend {
            hosted,
            addr,
            manager,
        })
    }

    /// Refuses to mix a new run into a hosted journal that still holds an earlier one
    /// (its tasks would run and its results would be taken for this run's). Returns
    /// what the journal holds: tasks (waiting, delayed or formerly reserved), results.
    pub(super) fn check_leftovers(&self, flags: &Flags) -> (i64, i64) {
        let Some(journal) = flags.journal.as_ref().filter(|_| self.hosted.is_some()) else {
            return (0, 0);
        };
        let n = |queue: &str, field: &str| queue_stat(&self.manager, queue, field).unwrap_or(0);
        let tasks = n(TASKS, "size") + n(TASKS, "reserved") + n(TASKS, "delayed");
        let results = n(RESULTS, "size");
        if tasks + results > 0 && !flags.resume {
            cli::fail(
                format!(
                    "the journal in {} holds {tasks} task(s) and {results} result(s) of an earlier run: \
                     --resume continues that run; for a new run, use another directory",
                    journal.dir.display()
                ),
                exit::USAGE,
            );
        }
        (tasks, results)
    }

    /// Shuts a hosted server down through its handle and waits for it (after the queue
    /// proxies are dropped).
    pub(super) fn close(self) -> distq::Result<()> {
        match self.hosted {
            Some(running) => running.shutdown(),
            None => Ok(()),
        }
    }
}

/// How long a hosting master waits, after the last result, for workers to ack it.
const ACK_GRACE: Duration = Duration::from_secs(5);

/// Ends the job for the workers before the hosted server goes: the task queue is shut
/// down (Python 3.13's `Queue.shutdown`: a worker's next take fails with `ShutDown`, so it
/// exits at once instead of reconnecting for minutes or taking the next master's tasks),
/// then the master waits, bounded, until no task is still reserved, so that a worker that
/// put its result is not cut off before its ack.
pub(super) fn end_of_job(manager: &Manager, tasks: &QueueProxy) {
    if let Err(e) = tasks.shutdown(false) {
        eprintln!("note: could not tell the workers the job is over: {e}");
        return;
    }
    let deadline = Instant::now() + ACK_GRACE;
    let mut poll = Duration::from_millis(1);
    while reserved_tasks(manager).is_some_and(|n| n > 0) && Instant::now() < deadline {
        std::thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_millis(20));
    }
}

/// Tasks taken under a lease and not yet acked, from the server's `stats()`.
fn reserved_tasks(manager: &Manager) -> Option<i64> {
    queue_stat(manager, TASKS, "reserved")
}

/// One number of one queue from a distq server's `stats()`.
fn queue_stat(manager: &Manager, queue: &str, name: &str) -> Option<i64> {
    let stats = manager.stats().ok()?;
    let queue = text::field(text::field(&stats, "queues")?, queue)?;
    text::field(queue, name)?.as_int()
}

pub(super) const TASKS: &str = "get_task_queue";
pub(super) const RESULTS: &str = "get_result_queue";

/// A result is a failure if it is a record whose status is not "ok".
pub(super) fn is_failure(result: &Value) -> bool {
    text::field(result, "status").is_some_and(|status| status.as_str() != Some("ok"))
}

/// How often a master waiting for results looks for a stop signal.
pub(super) const STOP_CHECK: Duration = Duration::from_millis(200);

/// How long a master waits after a batch of nothing but other runs' results, put back
/// for their master, before it looks again: without it two masters would pass the same
/// results back and forth as fast as the server answers.
pub(super) const FOREIGN_BACKOFF: Duration = Duration::from_millis(100);

/// The address our own clients and workers use for a hosted server: a wildcard bind
/// (`0.0.0.0`) is reached through loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => [127, 0, 0, 1].into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}
