//! The manager protocol: what each request *means*. Turns a [`Request`] into a [`Reply`]
//! using the [`QueueMap`]; no sockets here, so every rule is testable without a network.
//!
//! Two kinds of call exist, as in Python's `multiprocessing.managers.Server`:
//! public functions (`ident` is `None`: `create`, `incref`, `accept_connection`, ...) on
//! one-shot connections, and methods on a queue (`get`, `put`, ...) on a method channel
//! opened by `accept_connection`. Python semantics are kept to the letter where a client
//! could observe them: argument binding (`block`/`timeout` positional or keyword), the
//! `ValueError` for a negative timeout, and which faults are `#ERROR` (an exception the
//! method raised, re-raised by the client) versus `#TRACEBACK` (a fault around the call).

use std::time::Duration;

use std::collections::HashSet;
use std::sync::Arc;

use crate::pickle::{Fragment, Pickled};
use crate::protocol::{exceptions, Arg, Reply, Request};
use crate::queues::{Queue, QueueMap, Taken, Wait};
use crate::{Error, Value};

/// The methods of a queue proxy: Python 3.8–3.12's `queue.Queue` list, in its order, then
/// 3.13's `shutdown`, then distq's extensions: batching and leases.
/// `get_many`/`put_many` move many items per round trip; `reserve`/`ack`/`release`/`touch`
/// give at-least-once delivery, and `ack_put(lease, item, queue_name='get_result_queue')`
/// is a worker's result and ack in one round trip (nothing stored if the lease is gone).
/// Python clients get them too, since AutoProxy builds a
/// method for every exposed name.
pub const QUEUE_METHODS: &[&str] = &[
    "empty",
    "full",
    "get",
    "get_many",
    "get_nowait",
    "join",
    "put",
    "put_many",
    "put_nowait",
    "qsize",
    "task_done",
    "shutdown",
    "reserve",
    "ack",
    "release",
    "touch",
    "stats",
    "ack_put",
    "reserve_many",
    "ack_put_many",
];

/// Where `ack_put` puts its item unless told otherwise: the classic result queue.
const RESULT_QUEUE: &str = "get_result_queue";

/// The most items one `get_many` returns, whatever the caller asks for: it bounds the
/// reply frame (and the time the queue lock is held taking them).
pub const MAX_BATCH: usize = 10_000;

/// What the connection loop must do after a public function.
#[derive(Debug, PartialEq)]
pub enum Public {
    /// Send this reply and close the connection (a one-shot call).
    Reply(Reply),
    /// Send `#RETURN None` and keep serving method calls on this connection.
    AcceptConnection,
    /// Send `#RETURN None` (twice, as Python does) and stop the whole server.
    Shutdown,
}

/// Handles a request whose `ident` is `None`.
pub fn public(map: &QueueMap, req: &Request) -> Public {
    let reply = match req.method.as_str() {
        "dummy" => Reply::Return(Value::None),
        "accept_connection" => return Public::AcceptConnection,
        "shutdown" => return Public::Shutdown,
        "create" => create(map, req),
        "incref" | "decref" => match req
            .args
            .first()
            .and_then(Arg::value)
            .and_then(Value::as_str)
        {
            Some(ident) => {
                let done = if req.method == "incref" {
                    map.incref(ident)
                } else {
                    map.decref(ident)
                };
                match done {
                    Ok(()) => Reply::Return(Value::None),
                    Err(_) => Reply::traceback("KeyError", &format!("{ident:?}")),
                }
            }
            None => Reply::traceback(
                "TypeError",
                &format!("{}() takes one str argument (an ident)", req.method),
            ),
        },
        "get_methods" => Reply::Return(exposed()),
        "debug_info" => match map.debug_info() {
            Ok(text) => Reply::Return(Value::str(&text)),
            Err(e) => Reply::traceback("RuntimeError", &e.to_string()),
        },
        "stats" => match map.stats() {
            Ok(v) => Reply::Return(v),
            Err(e) => Reply::traceback("RuntimeError", &e.to_string()),
        },
        "number_of_objects" => match map.number_of_objects() {
            Ok(n) => Reply::Return(Value::Int(n as i64)),
            Err(e) => Reply::traceback("RuntimeError", &e.to_string()),
        },
        other => Reply::traceback("AssertionError", &format!("{other:?} unrecognized")),
    };
    Public::Reply(reply)
}

fn exposed() -> Value {
    Value::tuple(QUEUE_METHODS.iter().map(|m| Value::str(m)).collect())
}

/// The typeids `SyncManager` registers for things that are not queues. distq refuses
/// them by name rather than quietly handing out a queue that would behave nothing like a
/// dict or a lock.
const NOT_QUEUES: &[&str] = &[
    "dict",
    "list",
    "Namespace",
    "Value",
    "Array",
    "Lock",
    "RLock",
    "Semaphore",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "Barrier",
    "Pool",
];

/// `create(typeid, *args, **kwds)`.
///
/// - `Queue` and `JoinableQueue` are factories, as in `SyncManager`: each call makes a
///   fresh anonymous queue bounded by `maxsize` (positional or keyword; 0 or negative
///   means unbounded), freed when its refcount reaches zero.
/// - `SyncManager`'s other typeids (`dict`, `Lock`, ...) are refused.
/// - Every other typeid names a shared queue, created unbounded on first use, which is
///   what the classic `register('get_task_queue', callable=lambda: q)` scripts mean.
fn create(map: &QueueMap, req: &Request) -> Reply {
    let Some(typeid) = req
        .args
        .first()
        .and_then(Arg::value)
        .and_then(Value::as_str)
    else {
        return Reply::traceback("TypeError", "create() needs a typeid (str) argument");
    };
    let created = match typeid {
        "Queue" | "JoinableQueue" => {
            let by_kw = req
                .kwargs
                .iter()
                .find(|(k, _)| k == "maxsize")
                .map(|(_, v)| v);
            let maxsize = match (req.args.get(1), by_kw, req.args.len() + req.kwargs.len()) {
                (None, None, 1) => Ok(0),
                (Some(v), None, 2) | (None, Some(v), 2) => match v.value() {
                    Some(Value::Int(n)) => Ok(usize::try_from(*n).unwrap_or(0)),
                    _ => Err(format!("maxsize must be an int, not {}", v.brief(60))),
                },
                _ => Err(format!("{typeid}() takes at most one argument, maxsize")),
            };
            match maxsize {
                Ok(maxsize) => map.create_anonymous(typeid, maxsize),
                Err(msg) => return Reply::traceback("TypeError", &msg),
            }
        }
        t if NOT_QUEUES.contains(&t) => {
            return Reply::traceback(
                "TypeError",
                &format!(
                    "distq serves queues only: typeid {t:?} (a SyncManager {t}) is not supported; \
                     use Queue() / JoinableQueue() or a registered queue name"
                ),
            )
        }
        name => map.create(name),
    };
    match created {
        Ok(q) => Reply::Return(Value::tuple(vec![Value::str(q.ident()), exposed()])),
        Err(e) => Reply::traceback("RuntimeError", &e.to_string()),
    }
}

/// What a method call needs to know about the connection it arrived on.
pub struct Session<'a> {
    /// Identifies the connection as the owner of the leases it takes.
    pub id: u64,
    /// Whether the peer is still connected; a blocked call gives up when it is not.
    pub alive: &'a dyn Fn() -> bool,
    /// Set once the connection has reserved something, so that closing it releases its
    /// leases (and connections that never reserve skip that scan).
    pub has_leases: std::cell::Cell<bool>,
}

impl<'a> Session<'a> {
    /// A session for connection `id`.
    pub fn new(id: u64, alive: &'a dyn Fn() -> bool) -> Session<'a> {
        Session {
            id,
            alive,
            has_leases: std::cell::Cell::new(false),
        }
    }
}

/// A reply, and how to take it back if it cannot be delivered.
#[derive(Debug)]
pub struct Outcome {
    /// What to send.
    pub reply: Reply,
    /// Set when the reply carries items taken off a queue by `get`/`get_many`: if the
    /// reply cannot be sent, [`Outcome::undo`] puts them back at the head of `queue`.
    pub taken_from: Option<Arc<Queue>>,
    /// Delivery count and journal id of each item carried, to restore them on undo.
    meta: Vec<(u32, u64)>,
    /// Send nothing and close the connection (the server is stopping or the peer left).
    pub hang_up: bool,
}

impl Outcome {
    fn reply(reply: Reply) -> Outcome {
        Outcome {
            reply,
            taken_from: None,
            meta: Vec::new(),
            hang_up: false,
        }
    }

    fn taken(queue: &Arc<Queue>, items: Vec<Taken>) -> Outcome {
        let meta = items.iter().map(|t| (t.deliveries, t.id)).collect();
        let mut fragments: Vec<Fragment> = items.into_iter().map(|t| t.item).collect();
        let reply = if fragments.len() == 1 {
            Reply::Item(fragments.remove(0))
        } else {
            Reply::Items(fragments)
        };
        Outcome {
            reply,
            taken_from: Some(queue.clone()),
            meta,
            hang_up: false,
        }
    }

    /// The reply reached the peer: the items it carries are gone for good (see
    /// [`QueueMap::delivered`]).
    pub fn delivered(&self, map: &QueueMap) {
        match &self.reply {
            Reply::Item(f) => map.delivered(f),
            Reply::Items(fs) => fs.iter().for_each(|f| map.delivered(f)),
            _ => {}
        }
    }

    /// Puts the items this reply carries back at the head of their queue, in order.
    pub fn undo(self) -> Result<(), Error> {
        let Some(queue) = self.taken_from else {
            return Ok(());
        };
        let items = match self.reply {
            Reply::Item(f) => vec![f],
            Reply::Items(fs) => fs,
            _ => Vec::new(),
        };
        let taken = items
            .into_iter()
            .zip(self.meta)
            .map(|(item, (deliveries, id))| Taken {
                item,
                deliveries,
                id,
            })
            .collect();
        queue.unget(taken)
    }
}

/// Handles a method call on the object `req.ident` (a method-channel request).
pub fn method(map: &QueueMap, req: &Request, session: &Session<'_>) -> Outcome {
    let Some(ident) = req.ident.as_deref() else {
        return Outcome::reply(Reply::traceback(
            "TypeError",
            "method call without an ident",
        ));
    };
    let Some(queue) = map.by_ident(ident) else {
        return Outcome::reply(Reply::traceback("KeyError", &format!("{ident:?}")));
    };
    let reply = match req.method.as_str() {
        // Python's fallbacks for every proxied object.
        "__str__" | "__repr__" => {
            let len = queue.len().unwrap_or(0);
            Reply::Return(Value::str(&format!(
                "<distq queue {:?} with {len} items>",
                queue.name()
            )))
        }
        "#GETVALUE" => Reply::Unserializable(
            "TypeError: a distq queue cannot be pickled; call its methods instead\n".into(),
        ),
        name if QUEUE_METHODS.contains(&name) => match call(map, &queue, req, session) {
            Ok(outcome) => return outcome,
            Err(Fault::Raise(exc)) => Reply::Error(exc),
            Err(Fault::HangUp) => {
                return Outcome {
                    hang_up: true,
                    ..Outcome::reply(Reply::Return(Value::None))
                }
            }
        },
        other => Reply::traceback(
            "AttributeError",
            &format!(
                "method {other:?} of queue {:?} is not in exposed={:?}",
                queue.name(),
                QUEUE_METHODS
            ),
        ),
    };
    Outcome::reply(reply)
}

/// Why a queue method did not produce a reply.
enum Fault {
    /// It raised this exception: send it in an `#ERROR` reply.
    Raise(Value),
    /// The server is stopping or the peer left while the call waited: send nothing and
    /// close the connection (a Python client then sees `EOFError`, a distq client a lost
    /// connection it may reconnect from).
    HangUp,
}

impl From<Value> for Fault {
    fn from(exc: Value) -> Fault {
        Fault::Raise(exc)
    }
}

/// Calls a queue method.
fn call(
    map: &QueueMap,
    queue: &Arc<Queue>,
    req: &Request,
    session: &Session<'_>,
) -> Result<Outcome, Fault> {
    let mut args = Args::new(req);
    let alive = session.alive;
    let done = |r: crate::Result<()>| {
        r.map(|()| Outcome::reply(Reply::Return(Value::None)))
            .map_err(to_exception)
    };
    let value = |r: crate::Result<Value>| {
        r.map(|v| Outcome::reply(Reply::Return(v)))
            .map_err(to_exception)
    };
    match req.method.as_str() {
        "put" => {
            let arg = args.required_arg(0, "item")?;
            let item = fragment(map, arg)?;
            let wait = args.wait(1)?;
            args.finish()?;
            let held = names_code(arg).then(|| item.clone());
            done(queue.put(item, wait, alive).map(|()| hold(map, held)))
        }
        "put_nowait" => {
            let arg = args.required_arg(0, "item")?;
            let item = fragment(map, arg)?;
            args.finish()?;
            let held = names_code(arg).then(|| item.clone());
            done(queue.put(item, Wait::No, alive).map(|()| hold(map, held)))
        }
        "put_many" => {
            let mut held = Vec::new();
            let items = match args.required_arg(0, "items")? {
                Arg::Items(items) => items
                    .iter()
                    .map(|p| {
                        let item = pickled(map, p)?;
                        if p.names.is_some() {
                            held.push(item.clone());
                        }
                        Ok(item)
                    })
                    .collect::<Result<Vec<_>, Value>>()?,
                Arg::Value(Value::List(items) | Value::Tuple(items)) => items
                    .iter()
                    .map(|v| {
                        let arg = Arg::Value(v.clone());
                        let item = fragment(map, &arg)?;
                        if names_code(&arg) {
                            held.push(item.clone());
                        }
                        Ok(item)
                    })
                    .collect::<Result<Vec<_>, Value>>()?,
                other => {
                    return Err(Fault::from(exceptions::builtin(
                        "TypeError",
                        &format!(
                            "put_many() takes a list or tuple of items, not {}",
                            other.brief(60)
                        ),
                    )))
                }
            };
            let wait = args.wait(1)?;
            args.finish()?;
            done(queue.put_many(items, wait, alive).map(|()| {
                for item in &held {
                    map.hold_proxies(item);
                }
            }))
        }
        "get" => {
            let wait = args.wait(0)?;
            args.finish()?;
            let taken = queue.get(wait, alive).map_err(to_exception)?;
            Ok(Outcome::taken(queue, vec![taken]))
        }
        "get_nowait" => {
            args.finish()?;
            let taken = queue.get(Wait::No, alive).map_err(to_exception)?;
            Ok(Outcome::taken(queue, vec![taken]))
        }
        "get_many" => {
            let max = match args.optional(0, "max_items")? {
                None => MAX_BATCH,
                Some(Value::Int(n)) if n > 0 => {
                    usize::try_from(n).map_or(MAX_BATCH, |n| n.min(MAX_BATCH))
                }
                Some(other) => {
                    return Err(Fault::from(exceptions::builtin(
                        "ValueError",
                        &format!(
                            "get_many() max_items must be a positive int, not {}",
                            other.brief(60)
                        ),
                    )))
                }
            };
            let wait = args.wait(1)?;
            args.finish()?;
            let taken = queue.get_many(max, wait, alive).map_err(to_exception)?;
            // Always a list, even of one, so callers need not special-case it.
            let mut outcome = Outcome::taken(queue, taken);
            if let Reply::Item(f) = outcome.reply {
                outcome.reply = Reply::Items(vec![f]);
            }
            Ok(outcome)
        }
        "reserve" => {
            let wait = args.wait(0)?;
            let lease_time = args.seconds("lease_timeout")?;
            args.finish()?;
            let r = queue
                .reserve(session.id, lease_time, wait, alive)
                .map_err(to_exception)?;
            session.has_leases.set(true);
            Ok(Outcome::reply(Reply::Lease(r.lease, r.item)))
        }
        "reserve_many" => {
            let max = match args.optional(0, "max_items")? {
                None => MAX_BATCH,
                Some(Value::Int(n)) if n > 0 => {
                    usize::try_from(n).map_or(MAX_BATCH, |n| n.min(MAX_BATCH))
                }
                Some(other) => {
                    return Err(Fault::from(exceptions::builtin(
                        "ValueError",
                        &format!(
                            "reserve_many() max_items must be a positive int, not {}",
                            other.brief(60)
                        ),
                    )))
                }
            };
            let wait = args.wait(1)?;
            let lease_time = args.seconds("lease_timeout")?;
            args.finish()?;
            let reserved = queue
                .reserve_many(session.id, max, lease_time, wait, alive)
                .map_err(to_exception)?;
            session.has_leases.set(true);
            let pairs = reserved
                .iter()
                .map(|r| Fragment::paired(r.lease as i64, &r.item))
                .collect::<crate::Result<Vec<_>>>()
                .map_err(to_exception)?;
            Ok(Outcome::reply(Reply::Items(pairs)))
        }
        "ack_put_many" => {
            let leases = match args.required(0, "leases")? {
                Value::List(ids) | Value::Tuple(ids) => ids
                    .iter()
                    .map(|id| match id {
                        Value::Int(n) => u64::try_from(*n).ok(),
                        _ => None,
                    })
                    .collect::<Option<Vec<u64>>>(),
                _ => None,
            }
            .ok_or_else(|| {
                Fault::from(exceptions::builtin(
                    "TypeError",
                    "ack_put_many() leases must be a list of lease ids",
                ))
            })?;
            let (items, held) = match args.required_arg(1, "items")? {
                Arg::Items(items) => {
                    let mut held = Vec::new();
                    let items = items
                        .iter()
                        .map(|p| {
                            let item = pickled(map, p)?;
                            if p.names.is_some() {
                                held.push(item.clone());
                            }
                            Ok(item)
                        })
                        .collect::<Result<Vec<_>, Value>>()?;
                    (items, held)
                }
                _ => {
                    return Err(Fault::from(exceptions::builtin(
                        "TypeError",
                        "ack_put_many() items must be a list of results",
                    )))
                }
            };
            if leases.len() != items.len() {
                return Err(Fault::from(exceptions::builtin(
                    "ValueError",
                    &format!(
                        "ack_put_many() got {} leases and {} items: one result per lease",
                        leases.len(),
                        items.len()
                    ),
                )));
            }
            let target = match args.optional(2, "queue_name")? {
                None => RESULT_QUEUE.to_string(),
                Some(Value::Str(name)) => name.to_string(),
                Some(other) => {
                    return Err(Fault::from(exceptions::builtin(
                        "TypeError",
                        &format!(
                            "ack_put_many() queue_name must be a str, not {}",
                            other.brief(60)
                        ),
                    )))
                }
            };
            args.finish()?;
            done(
                map.ack_put_many(queue, &leases, &target, items, Wait::Forever, alive)
                    .map(|()| held.iter().for_each(|item| map.hold_proxies(item))),
            )
        }
        "ack" => {
            let lease = args.lease()?;
            args.finish()?;
            done(queue.ack(lease).map(|taken| map.delivered(&taken.item)))
        }
        "ack_put" => {
            let lease = args.lease()?;
            let arg = args.required_arg(1, "item")?;
            let item = fragment(map, arg)?;
            let held = names_code(arg).then(|| item.clone());
            let target = match args.optional(2, "queue_name")? {
                None => RESULT_QUEUE.to_string(),
                Some(Value::Str(name)) => name.to_string(),
                Some(other) => {
                    return Err(Fault::from(exceptions::builtin(
                        "TypeError",
                        &format!(
                            "ack_put() queue_name must be a str, not {}",
                            other.brief(60)
                        ),
                    )))
                }
            };
            args.finish()?;
            done(
                map.ack_put(queue, lease, &target, item, Wait::Forever, alive)
                    .map(|()| hold(map, held)),
            )
        }
        "release" => {
            let lease = args.lease()?;
            let delay = args.seconds("delay")?;
            args.finish()?;
            done(map.release(queue, lease, delay))
        }
        "touch" => {
            let lease = args.lease()?;
            let by = args.seconds("lease_timeout")?;
            args.finish()?;
            done(queue.touch(lease, by))
        }
        "shutdown" => {
            let immediate = args.optional(0, "immediate")?.is_some_and(|v| truthy(&v));
            args.finish()?;
            done(queue.shutdown(immediate))
        }
        "stats" => {
            args.finish()?;
            value(map.stats())
        }
        "qsize" => {
            args.finish()?;
            value(queue.len().map(|n| Value::Int(n as i64)))
        }
        "empty" => {
            args.finish()?;
            value(queue.is_empty().map(Value::Bool))
        }
        "full" => {
            args.finish()?;
            value(queue.is_full().map(Value::Bool))
        }
        "task_done" => {
            args.finish()?;
            done(queue.task_done())
        }
        "join" => {
            args.finish()?;
            done(queue.join(Wait::Forever, alive))
        }
        other => Err(Fault::from(exceptions::builtin(
            "AttributeError",
            &format!("queue has no method {other:?}"),
        ))),
    }
}

/// The stored form of an item. With `no_code_items`, items that name any global (a
/// class or function a Python worker would import when unpickling) are refused.
fn fragment(map: &QueueMap, item: &Arg) -> Result<Fragment, Value> {
    let value = match item {
        Arg::Pickled(p) => return pickled(map, p),
        Arg::Value(v) => v,
        Arg::Items(_) => {
            return Err(exceptions::builtin(
                "TypeError",
                "a list of items is an argument of put_many() only",
            ))
        }
    };
    if map.policy().no_code_items {
        if let Some(g) = first_global(value, 0, &mut HashSet::new()) {
            return Err(refused_code(&format!("{}.{}", g.module, g.name)));
        }
    }
    Fragment::encode(value).map_err(|e| exceptions::builtin("ValueError", &e.to_string()))
}

/// Whether an item argument names a class or function: only such an item can carry a
/// manager proxy (see `queues/holds.rs`).
fn names_code(item: &Arg) -> bool {
    match item {
        Arg::Pickled(p) => p.names.is_some(),
        Arg::Value(v) => first_global(v, 0, &mut HashSet::new()).is_some(),
        Arg::Items(_) => false,
    }
}

/// Records the holds of a stored item that may carry proxies.
fn hold(map: &QueueMap, item: Option<Fragment>) {
    if let Some(item) = item {
        map.hold_proxies(&item);
    }
}

/// An item as the client pickled it, checked against `no_code_items`.
fn pickled(map: &QueueMap, item: &Pickled) -> Result<Fragment, Value> {
    match &item.names {
        Some(name) if map.policy().no_code_items => Err(refused_code(name)),
        _ => Ok(item.fragment.clone()),
    }
}

fn refused_code(name: &str) -> Value {
    exceptions::builtin(
        "TypeError",
        &format!(
            "this server refuses items that reference classes or functions (--no-code-items); \
             the item references {name}"
        ),
    )
}

/// The first global a value references, if any (depth-bounded like the codec).
///
/// Shared containers are visited once (`seen` holds their addresses): a widely shared
/// graph is checked in time linear in its size, not in its size as a tree.
fn first_global<'v>(
    v: &'v Value,
    depth: usize,
    seen: &mut HashSet<usize>,
) -> Option<&'v crate::pickle::Global> {
    if depth > crate::pickle::MAX_DEPTH {
        return None;
    }
    let mut first_visit = |ptr: *const u8| seen.insert(ptr as usize);
    match v {
        Value::Global(g) => Some(g),
        Value::Object(o) if first_visit(Arc::as_ptr(o).cast()) => {
            [Some(&o.callable), Some(&o.args), o.state.as_ref()]
                .into_iter()
                .flatten()
                .find_map(|c| first_global(c, depth + 1, seen))
        }
        Value::Tuple(items) | Value::List(items) | Value::Set(items) | Value::FrozenSet(items)
            if first_visit(items.as_ptr().cast()) =>
        {
            items.iter().find_map(|i| first_global(i, depth + 1, seen))
        }
        Value::Dict(pairs) if first_visit(pairs.as_ptr().cast()) => {
            pairs.iter().find_map(|(k, v)| {
                first_global(k, depth + 1, seen).or_else(|| first_global(v, depth + 1, seen))
            })
        }
        _ => None,
    }
}

fn to_exception(e: Error) -> Fault {
    Fault::Raise(match e {
        Error::Empty => exceptions::empty(),
        Error::Full => exceptions::full(),
        e @ Error::MemoryFull { .. } => exceptions::full_because(&e.to_string()),
        Error::ShutDown => exceptions::shut_down(),
        Error::Value(msg) => exceptions::builtin("ValueError", &msg),
        Error::Closed => return Fault::HangUp,
        other => exceptions::builtin("RuntimeError", &other.to_string()),
    })
}

/// Python-style argument binding for `f(item, block=True, timeout=None)`-shaped methods:
/// each parameter may come by position or by keyword, never both, and nothing may be left
/// over. Violations are `TypeError`, as Python would raise inside the method.
struct Args<'a> {
    req: &'a Request,
    used_pos: usize,
    used_kw: usize,
}

impl<'a> Args<'a> {
    fn new(req: &'a Request) -> Args<'a> {
        Args {
            req,
            used_pos: 0,
            used_kw: 0,
        }
    }

    fn type_error(&self, msg: String) -> Value {
        exceptions::builtin("TypeError", &format!("{}() {msg}", self.req.method))
    }

    fn optional_arg(&mut self, pos: usize, name: &str) -> Result<Option<&'a Arg>, Value> {
        let by_pos = self.req.args.get(pos);
        let by_kw = self
            .req
            .kwargs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v);
        if by_pos.is_some() {
            self.used_pos = self.used_pos.max(pos + 1);
        }
        if by_kw.is_some() {
            self.used_kw += 1;
        }
        match (by_pos, by_kw) {
            (Some(_), Some(_)) => {
                Err(self.type_error(format!("got multiple values for argument {name:?}")))
            }
            (v, None) | (None, v) => Ok(v),
        }
    }

    fn required_arg(&mut self, pos: usize, name: &str) -> Result<&'a Arg, Value> {
        self.optional_arg(pos, name)?
            .ok_or_else(|| self.type_error(format!("missing required argument {name:?}")))
    }

    /// A parameter that is a plain value (a flag, a number), decoded if it was sent as
    /// something other than a scalar.
    fn optional(&mut self, pos: usize, name: &str) -> Result<Option<Value>, Value> {
        match self.optional_arg(pos, name)? {
            None => Ok(None),
            Some(arg) => arg
                .to_value()
                .map(Some)
                .map_err(|e| self.type_error(format!("cannot read argument {name:?}: {e}"))),
        }
    }

    fn required(&mut self, pos: usize, name: &str) -> Result<Value, Value> {
        self.optional(pos, name)?
            .ok_or_else(|| self.type_error(format!("missing required argument {name:?}")))
    }

    /// Binds `block` at `pos` and `timeout` at `pos + 1` the way `queue.Queue` reads them.
    fn wait(&mut self, pos: usize) -> Result<Wait, Value> {
        let block = self.optional(pos, "block")?.map_or(true, |b| truthy(&b));
        let timeout = self.optional(pos + 1, "timeout")?;
        if !block {
            return Ok(Wait::No);
        }
        let secs = match timeout {
            None | Some(Value::None) => return Ok(Wait::Forever),
            Some(Value::Int(n)) => n as f64,
            Some(Value::Float(x)) => x,
            Some(Value::Bool(b)) => f64::from(u8::from(b)),
            // Too big for a float's integer range either way: negative is still an error.
            Some(Value::BigInt(b)) if b.last().is_some_and(|&top| top >= 0x80) => -1.0,
            Some(Value::BigInt(_)) => return Ok(Wait::Forever),
            Some(other) => {
                return Err(
                    self.type_error(format!("timeout must be a number, not {}", other.brief(60)))
                )
            }
        };
        if secs.is_nan() || secs < 0.0 {
            return Err(exceptions::builtin(
                "ValueError",
                "'timeout' must be a non-negative number",
            ));
        }
        // Infinite or absurdly long timeouts do not fit a Duration: they mean "forever".
        Ok(Duration::try_from_secs_f64(secs).map_or(Wait::Forever, Wait::For))
    }

    /// Binds the lease id, the first positional argument or `lease=`.
    fn lease(&mut self) -> Result<u64, Value> {
        match self.required(0, "lease")? {
            Value::Int(n) => {
                u64::try_from(n).map_err(|_| self.type_error("lease must be a lease id".into()))
            }
            other => Err(self.type_error(format!("lease must be an int, not {}", other.brief(60)))),
        }
    }

    /// Binds an optional keyword-only duration in seconds (`delay=`, `lease_timeout=`).
    fn seconds(&mut self, name: &str) -> Result<Option<Duration>, Value> {
        let secs = match self.optional(usize::MAX, name)? {
            None | Some(Value::None) => return Ok(None),
            Some(Value::Int(n)) => n as f64,
            Some(Value::Float(x)) => x,
            Some(other) => {
                return Err(
                    self.type_error(format!("{name} must be a number, not {}", other.brief(60)))
                )
            }
        };
        if secs.is_nan() || secs < 0.0 {
            return Err(exceptions::builtin(
                "ValueError",
                &format!("{name:?} must be a non-negative number"),
            ));
        }
        Ok(Duration::try_from_secs_f64(secs).ok())
    }

    fn finish(&self) -> Result<(), Value> {
        if self.req.args.len() > self.used_pos {
            return Err(self.type_error(format!(
                "takes at most {} positional arguments ({} given)",
                self.used_pos,
                self.req.args.len()
            )));
        }
        if self.req.kwargs.len() > self.used_kw {
            return Err(self.type_error("got an unexpected keyword argument".into()));
        }
        Ok(())
    }
}

/// Python truthiness for the values a `block` flag can plausibly be.
fn truthy(v: &Value) -> bool {
    match v {
        Value::None => false,
        Value::Bool(b) => *b,
        Value::Int(n) => *n != 0,
        Value::Float(x) => *x != 0.0,
        Value::Str(s) => !s.is_empty(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as the server sees it: pickled, then parsed.
    fn req(ident: &str, method: &str, args: Vec<Value>, kwargs: Vec<(&str, Value)>) -> Request {
        let mut r = Request::new(Some(ident), method, args);
        r.kwargs = kwargs
            .into_iter()
            .map(|(k, v)| (k.into(), Arg::Value(v)))
            .collect();
        let bytes = crate::pickle::encode(&r.to_value().unwrap()).unwrap();
        Request::parse(&bytes).unwrap()
    }

    fn call(map: &QueueMap, r: &Request) -> Reply {
        let alive = || true;
        method(map, r, &Session::new(1, &alive)).reply
    }

    fn setup() -> (QueueMap, String) {
        let map = QueueMap::new();
        let Public::Reply(Reply::Return(v)) =
            public(&map, &Request::new(None, "create", vec![Value::str("q")]))
        else {
            panic!("create failed")
        };
        let ident = v.as_tuple().unwrap()[0].as_str().unwrap().to_string();
        (map, ident)
    }

    #[test]
    fn put_and_get_with_keyword_and_positional_arguments() {
        let (map, id) = setup();
        let put = call(&map, &req(&id, "put", vec![Value::from(5)], vec![]));
        assert_eq!(put, Reply::Return(Value::None));
        let put = call(
            &map,
            &req(
                &id,
                "put",
                vec![],
                vec![("item", Value::from(6)), ("block", Value::Bool(false))],
            ),
        );
        assert_eq!(put, Reply::Return(Value::None));
        let get = call(
            &map,
            &req(&id, "get", vec![], vec![("timeout", Value::from(1))]),
        );
        assert_eq!(get.into_result().unwrap(), Value::from(5));
        let get = call(
            &map,
            &req(
                &id,
                "get",
                vec![Value::Bool(true), Value::Float(0.5)],
                vec![],
            ),
        );
        assert_eq!(get.into_result().unwrap(), Value::from(6));
        let get = call(&map, &req(&id, "get", vec![Value::Bool(false)], vec![]));
        assert_eq!(get, Reply::Error(exceptions::empty()));
        assert_eq!(
            call(&map, &req(&id, "qsize", vec![], vec![])),
            Reply::Return(Value::Int(0))
        );
    }

    #[test]
    fn put_many_and_get_many_batch_items() {
        let (map, id) = setup();
        let items = Value::list((0..10).map(Value::from).collect());
        let put = call(&map, &req(&id, "put_many", vec![items], vec![]));
        assert_eq!(put, Reply::Return(Value::None));
        let get = call(&map, &req(&id, "get_many", vec![Value::from(4)], vec![]));
        assert_eq!(
            get.into_result().unwrap(),
            Value::list((0..4).map(Value::from).collect())
        );
        let get = call(
            &map,
            &req(
                &id,
                "get_many",
                vec![],
                vec![("timeout", Value::Float(0.1))],
            ),
        );
        assert_eq!(
            get.into_result().unwrap(),
            Value::list((4..10).map(Value::from).collect())
        );
        let get = call(
            &map,
            &req(
                &id,
                "get_many",
                vec![Value::from(5), Value::Bool(false)],
                vec![],
            ),
        );
        assert_eq!(get, Reply::Error(exceptions::empty()));
        let bad = call(&map, &req(&id, "get_many", vec![Value::from(0)], vec![]));
        assert!(
            matches!(bad, Reply::Error(e) if e.class_name() == Some(("builtins", "ValueError")))
        );
    }

    #[test]
    fn no_code_items_checks_shared_graphs_in_linear_time() {
        let map = QueueMap::with_policy(crate::queues::Policy {
            no_code_items: true,
            ..Default::default()
        });
        let Public::Reply(Reply::Return(v)) =
            public(&map, &Request::new(None, "create", vec![Value::str("q")]))
        else {
            panic!("create failed")
        };
        let id = v.as_tuple().unwrap()[0].as_str().unwrap().to_string();
        // 2**40 leaves as a tree: a tree walk would never finish.
        let chain = |leaf: Value| {
            (0..40).fold(Value::list(vec![leaf]), |v, _| {
                Value::list(vec![v.clone(), v])
            })
        };
        let plain = call(&map, &req(&id, "put", vec![chain(Value::from(1))], vec![]));
        assert_eq!(plain, Reply::Return(Value::None));
        let code = chain(Value::exception("os", "system", vec![Value::from("x")]));
        match call(&map, &req(&id, "put", vec![code], vec![])) {
            Reply::Error(e) => assert_eq!(e.class_name(), Some(("builtins", "TypeError"))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn negative_timeout_is_value_error() {
        let (map, id) = setup();
        let minus_2_pow_70 =
            Value::BigInt(std::sync::Arc::from(vec![0, 0, 0, 0, 0, 0, 0, 0, 0xc0]));
        let r = call(
            &map,
            &req(&id, "get", vec![], vec![("timeout", minus_2_pow_70)]),
        );
        assert!(
            matches!(&r, Reply::Error(e) if e.class_name() == Some(("builtins", "ValueError"))),
            "{r:?}"
        );
        let r = call(
            &map,
            &req(&id, "get", vec![], vec![("timeout", Value::Float(-1.0))]),
        );
        assert_eq!(
            r,
            Reply::Error(exceptions::builtin(
                "ValueError",
                "'timeout' must be a non-negative number"
            ))
        );
    }

    #[test]
    fn binding_errors_are_type_errors() {
        let (map, id) = setup();
        for r in [
            req(&id, "put", vec![], vec![]),
            req(&id, "get", vec![], vec![("bogus", Value::None)]),
            req(&id, "qsize", vec![Value::None], vec![]),
            req(
                &id,
                "get",
                vec![Value::Bool(false)],
                vec![("block", Value::Bool(false))],
            ),
        ] {
            match call(&map, &r) {
                Reply::Error(e) => {
                    assert_eq!(e.class_name(), Some(("builtins", "TypeError")), "{r:?}")
                }
                other => panic!("{r:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_ident_method_and_function_are_tracebacks() {
        let (map, id) = setup();
        assert!(matches!(
            call(&map, &req("nope", "get", vec![], vec![])),
            Reply::Traceback(_)
        ));
        assert!(matches!(
            call(&map, &req(&id, "bogus", vec![], vec![])),
            Reply::Traceback(_)
        ));
        assert!(matches!(
            public(&map, &Request::new(None, "bogus", vec![])),
            Public::Reply(Reply::Traceback(_))
        ));
        assert!(matches!(
            public(&map, &Request::new(None, "decref", vec![Value::from(1)])),
            Public::Reply(Reply::Traceback(_))
        ));
    }

    #[test]
    fn create_returns_the_same_ident_and_counts_references() {
        let (map, id) = setup();
        let Public::Reply(Reply::Return(v)) =
            public(&map, &Request::new(None, "create", vec![Value::str("q")]))
        else {
            panic!()
        };
        assert_eq!(v.as_tuple().unwrap()[0].as_str(), Some(id.as_str()));
        assert_eq!(
            public(&map, &Request::new(None, "number_of_objects", vec![])),
            Public::Reply(Reply::Return(Value::Int(1)))
        );
    }
}
