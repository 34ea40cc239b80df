//! The manager's public functions (`ident` is `None`), bound into a [`PublicCall`] and
//! applied to the queue map. Every fault here is a `#TRACEBACK`, as in Python, where these
//! run around the objects rather than inside one of their methods.

use std::sync::atomic::AtomicUsize;

use super::{exposed, Public};
use crate::protocol::{Arg, Reply, Request};
use crate::queues::QueueMap;
use crate::Value;

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

/// A public function call, its arguments bound.
#[derive(Debug, PartialEq)]
pub(super) enum PublicCall {
    /// `dummy()`, sent by `BaseManager.connect()`.
    Dummy,
    /// `accept_connection(name)`: the connection becomes a method channel.
    AcceptConnection,
    /// `shutdown()`: the whole server stops.
    Shutdown,
    /// `create(typeid, *args, **kwds)`.
    Create(Create),
    /// `incref(ident)`.
    Incref(String),
    /// `decref(ident)`.
    Decref(String),
    /// `get_methods(token)`.
    GetMethods,
    /// `debug_info()`.
    DebugInfo,
    /// `stats()`.
    Stats,
    /// `number_of_objects()`.
    NumberOfObjects,
}

/// What a `create` makes.
#[derive(Debug, PartialEq)]
pub(super) enum Create {
    /// `Queue(maxsize=0)` or `JoinableQueue(maxsize=0)`: as in `SyncManager`, each call
    /// makes a fresh queue (0 means unbounded), freed when its refcount reaches zero.
    Anonymous { typeid: String, maxsize: usize },
    /// Any other typeid names a shared queue, created unbounded on first use, which is
    /// what the classic `register('get_task_queue', callable=lambda: q)` scripts mean.
    Named(String),
}

impl PublicCall {
    /// Binds a request whose `ident` is `None`.
    ///
    /// # Errors
    /// The `#TRACEBACK` to send for an unknown function or arguments it cannot take.
    pub(super) fn bind(req: &Request) -> Result<PublicCall, Reply> {
        Ok(match req.method.as_str() {
            "dummy" => PublicCall::Dummy,
            "accept_connection" => PublicCall::AcceptConnection,
            "shutdown" => PublicCall::Shutdown,
            "create" => PublicCall::Create(bind_create(req)?),
            "incref" | "decref" => {
                let ident = first_str(req).ok_or_else(|| {
                    Reply::traceback(
                        "TypeError",
                        &format!("{}() takes one str argument (an ident)", req.method),
                    )
                })?;
                if req.method == "incref" {
                    PublicCall::Incref(ident)
                } else {
                    PublicCall::Decref(ident)
                }
            }
            "get_methods" => PublicCall::GetMethods,
            "debug_info" => PublicCall::DebugInfo,
            "stats" => PublicCall::Stats,
            "number_of_objects" => PublicCall::NumberOfObjects,
            other => {
                return Err(Reply::traceback(
                    "AssertionError",
                    &format!("{other:?} unrecognized"),
                ))
            }
        })
    }

    /// Runs the call.
    pub(super) fn apply(self, map: &QueueMap, connections: &AtomicUsize) -> Public {
        let runtime_error = |e: crate::Error| Reply::traceback("RuntimeError", &e.to_string());
        let refcounted = |done: crate::Result<()>, ident: &str| match done {
            Ok(()) => Reply::Return(Value::None),
            Err(_) => Reply::traceback("KeyError", &super::shown(ident)),
        };
        Public::Reply(match self {
            PublicCall::AcceptConnection => return Public::AcceptConnection,
            PublicCall::Shutdown => return Public::Shutdown,
            PublicCall::Dummy => Reply::Return(Value::None),
            PublicCall::Create(what) => {
                let created = match &what {
                    Create::Anonymous { typeid, maxsize } => map.create_anonymous(typeid, *maxsize),
                    Create::Named(name) => map.create(name),
                };
                match created {
                    Ok(q) => Reply::Return(Value::tuple(vec![Value::str(q.ident()), exposed()])),
                    Err(e) => runtime_error(e),
                }
            }
            PublicCall::Incref(ident) => refcounted(map.incref(&ident), &ident),
            PublicCall::Decref(ident) => refcounted(map.decref(&ident), &ident),
            PublicCall::GetMethods => Reply::Return(exposed()),
            PublicCall::DebugInfo => map
                .debug_info()
                .map_or_else(runtime_error, |text| Reply::Return(Value::str(&text))),
            PublicCall::Stats => {
                super::stats(map, connections).map_or_else(runtime_error, Reply::Return)
            }
            PublicCall::NumberOfObjects => map
                .number_of_objects()
                .map_or_else(runtime_error, |n| Reply::Return(Value::Int(n as i64))),
        })
    }
}

/// The first positional argument, if it is a str (a typeid or an ident).
fn first_str(req: &Request) -> Option<String> {
    req.args
        .first()
        .and_then(Arg::value)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// `create(typeid, *args, **kwds)`: `Queue` and `JoinableQueue` take `maxsize`
/// (positional or keyword; 0 or negative means unbounded), `SyncManager`'s other typeids
/// (`dict`, `Lock`, ...) are refused, and any other typeid is a queue's name.
fn bind_create(req: &Request) -> Result<Create, Reply> {
    let typeid = first_str(req)
        .ok_or_else(|| Reply::traceback("TypeError", "create() needs a typeid (str) argument"))?;
    match typeid.as_str() {
        "Queue" | "JoinableQueue" => {
            let by_kw = req
                .kwargs
                .iter()
                .find(|(k, _)| k == "maxsize")
                .map(|(_, v)| v);
            let maxsize = match (req.args.get(1), by_kw, req.args.len() + req.kwargs.len()) {
                (None, None, 1) => 0,
                (Some(v), None, 2) | (None, Some(v), 2) => match v.value() {
                    Some(Value::Int(n)) => usize::try_from(*n).unwrap_or(0),
                    _ => {
                        return Err(Reply::traceback(
                            "TypeError",
                            &format!("maxsize must be an int, not {}", v.brief(60)),
                        ))
                    }
                },
                _ => {
                    return Err(Reply::traceback(
                        "TypeError",
                        &format!("{typeid}() takes at most one argument, maxsize"),
                    ))
                }
            };
            Ok(Create::Anonymous { typeid, maxsize })
        }
        t if NOT_QUEUES.contains(&t) => Err(Reply::traceback(
            "TypeError",
            &format!(
                "distq serves queues only: typeid {t:?} (a SyncManager {t}) is not supported; \
                 use Queue() / JoinableQueue() or a registered queue name"
            ),
        )),
        _ => Ok(Create::Named(typeid)),
    }
}
