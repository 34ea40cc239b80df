//! Reply queues: a stored item that carries a proxy of one of this server's anonymous
//! queues keeps that queue alive.
//!
//! The Python habit is `tasks.put(('job', manager.Queue()))` and then dropping the
//! producer's own proxy: "answer on this queue". The producer's `decref` brings the
//! queue's refcount to zero while the only remaining reference is inside a stored item,
//! which the server does not see as a reference; freeing the queue then would make the
//! consumer's unpickling fail (`KeyError`) after its `get` took the task off the queue,
//! losing the task. So an item whose pickle rebuilds a proxy (`RebuildProxy` of a
//! `Token` naming one of our anonymous queues) holds a reference on that queue from its
//! `put` until it leaves for good: delivered by `get`/`get_many` (the reply was sent), or
//! acked after `reserve`. The reference is returned [`GRACE`] later, so that the receiver,
//! which increfs the queue as it unpickles the proxy, has done so by then. An item that
//! is requeued, released, dead-lettered or redelivered keeps its hold.
//!
//! Cost: items are looked at only when they can hold one. At `put`, only items that
//! name a class or function at all (the scan already knows); at delivery, only while
//! some hold exists.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pickle::{Fragment, Value};

/// How long a delivered item's hold outlives its delivery.
pub const GRACE: Duration = Duration::from_secs(60);

/// The holds stored items have on anonymous queues, by ident.
#[derive(Debug, Default)]
pub(super) struct ProxyHolds {
    /// How many holds exist (held or due): the fast path reads only this.
    count: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Holds of stored items, by ident.
    held: HashMap<String, usize>,
    /// Holds of delivered items, returned when due.
    due: Vec<(Instant, String)>,
}

impl ProxyHolds {
    /// Records a hold on each ident `incref` accepts (an anonymous queue of ours).
    pub(super) fn hold(&self, item: &Fragment, incref: impl Fn(&str) -> bool) {
        let idents = proxy_idents(item);
        if idents.is_empty() {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        for ident in idents {
            if incref(&ident) {
                *state.held.entry(ident).or_insert(0) += 1;
                self.count.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// The item left the server for good: its holds become due after [`GRACE`].
    pub(super) fn delivered(&self, item: &Fragment) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let idents = proxy_idents(item);
        if idents.is_empty() {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let due = Instant::now() + GRACE;
        for ident in idents {
            if let Some(n) = state.held.get_mut(&ident) {
                *n -= 1;
                if *n == 0 {
                    state.held.remove(&ident);
                }
                state.due.push((due, ident));
            }
        }
    }

    /// Takes the holds that are due at `now`: the caller decrefs each ident.
    pub(super) fn take_due(&self, now: Instant) -> Vec<String> {
        if self.count.load(Ordering::SeqCst) == 0 {
            return Vec::new();
        }
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        let (due, later): (Vec<_>, Vec<_>) = state.due.drain(..).partition(|(at, _)| *at <= now);
        state.due = later;
        self.count.fetch_sub(due.len(), Ordering::SeqCst);
        due.into_iter().map(|(_, ident)| ident).collect()
    }
}

/// The idents of the manager proxies an item's pickle rebuilds (`RebuildProxy(func,
/// Token(typeid, address, ident), serializer, kwds)`, as Python's `BaseProxy.__reduce__`
/// writes it). Only items whose bytes name `RebuildProxy` are decoded; one that cannot
/// be (a cycle, say) holds nothing.
fn proxy_idents(item: &Fragment) -> Vec<String> {
    const NAME: &[u8] = b"RebuildProxy";
    if !item.bytes().windows(NAME.len()).any(|w| w == NAME) {
        return Vec::new();
    }
    let Ok(value) = item.decode() else {
        return Vec::new();
    };
    let mut idents = Vec::new();
    let mut stack = vec![(&value, 0usize)];
    // Bounded like the codec: a shared subgraph may be visited more than once, but the
    // walk never runs longer than a budget proportional to the item's bytes.
    let mut budget = item.bytes().len().saturating_mul(4).max(1024);
    while let Some((v, depth)) = stack.pop() {
        budget = match budget.checked_sub(1) {
            Some(b) if depth < crate::pickle::MAX_DEPTH => b,
            _ => break,
        };
        match v {
            Value::Object(o) => {
                if let Some(ident) = rebuilt_ident(o) {
                    idents.push(ident);
                }
                stack.push((&o.callable, depth + 1));
                stack.push((&o.args, depth + 1));
                if let Some(state) = &o.state {
                    stack.push((state, depth + 1));
                }
            }
            Value::Tuple(items)
            | Value::List(items)
            | Value::Set(items)
            | Value::FrozenSet(items) => stack.extend(items.iter().map(|i| (i, depth + 1))),
            Value::Dict(pairs) => {
                for (k, v) in pairs.iter() {
                    stack.push((k, depth + 1));
                    stack.push((v, depth + 1));
                }
            }
            _ => {}
        }
    }
    idents
}

/// The ident of the token `RebuildProxy(func, token, ...)` rebuilds, if `o` is that call.
fn rebuilt_ident(o: &crate::pickle::Object) -> Option<String> {
    let is = |v: &Value, name: &str| matches!(v, Value::Global(g) if g.module == "multiprocessing.managers" && g.name == name);
    if !is(&o.callable, "RebuildProxy") {
        return None;
    }
    let Value::Tuple(args) = &o.args else {
        return None;
    };
    let Some(Value::Object(token)) = args.get(1) else {
        return None;
    };
    if !is(&token.callable, "Token") {
        return None;
    }
    // Token's state is (typeid, address, id).
    match token.state.as_ref()? {
        Value::Tuple(state) => state.get(2)?.as_str().map(str::to_string),
        _ => None,
    }
}
