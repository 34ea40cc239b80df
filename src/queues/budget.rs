//! The server-wide memory budget for stored items (`--max-memory`).
//!
//! Without one, a client that puts faster than anyone gets grows the server until the
//! kernel's OOM killer ends it, and every queue with it. With one, a put that would
//! take the items' bytes over the budget waits (a blocking put) or fails with
//! `queue.Full` naming the limit; gets, acks and everything that frees memory keep
//! working. Counted: the pickled bytes of every item a queue holds, waiting, reserved
//! or delayed; not the server's own bookkeeping around them (a few bytes per item).
//! Items that come back (an undelivered reply, a requeue, a dead letter, a journal
//! replay) are counted but never refused: refusing them would lose them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of items stored, and the most allowed (0: no limit).
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    /// A budget of `limit` bytes (`None`: unlimited, only counted).
    pub fn new(limit: Option<u64>) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit: limit.unwrap_or(0),
        }
    }

    /// The limit, if there is one.
    pub fn limit(&self) -> Option<u64> {
        (self.limit > 0).then_some(self.limit)
    }

    /// Bytes of items stored now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Whether `n` more bytes would fit now (a hint for waiting; [`Budget::try_take`]
    /// decides).
    pub fn fits(&self, n: u64) -> bool {
        self.limit == 0 || self.used().saturating_add(n) <= self.limit
    }

    /// Takes `n` bytes if they fit (always, without a limit: they are still counted).
    pub fn try_take(&self, n: u64) -> bool {
        if self.limit == 0 {
            self.add(n);
            return true;
        }
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Counts `n` bytes that must be stored whatever the limit (items coming back).
    pub fn add(&self, n: u64) {
        self.used.fetch_add(n, Ordering::SeqCst);
    }

    /// Returns `n` bytes (items gone).
    pub fn give_back(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                Some(used.saturating_sub(n))
            });
    }
}
