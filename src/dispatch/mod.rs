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
//!
//! Each request is handled in two steps, as mini-redis handles a command: *bind* it once
//! into a typed call (`public.rs` for public functions; `command.rs` for queue methods,
//! with `args.rs` binding parameters the Python way and `items.rs` admitting items), then
//! *apply* the typed call (`apply.rs`: blocking, and undoing a reply that was not sent).
//! Nothing after binding looks at argument positions or keyword names.

mod apply;
mod args;
mod command;
mod items;
mod public;

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub use apply::Outcome;
pub use command::QueueCall;

use crate::protocol::{Reply, Request};
use crate::queues::{Queue, QueueMap};
use crate::Value;

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

/// Handles a request whose `ident` is `None`; `connections` is the server's count of
/// open connections (for `stats`).
pub fn public(map: &QueueMap, req: &Request, connections: &AtomicUsize) -> Public {
    match public::PublicCall::bind(req) {
        Ok(call) => call.apply(map, connections),
        Err(reply) => Public::Reply(reply),
    }
}

/// The `stats()` dict: every queue's counters by name, the memory budget, the open
/// connections and the uptime in seconds.
fn stats(map: &QueueMap, connections: &AtomicUsize) -> crate::Result<Value> {
    let count = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
    let st = map.stats()?;
    let queues = st
        .queues
        .into_iter()
        .map(|(name, q)| {
            let c = q.counts;
            let fields = [
                ("size", count(q.size as u64)),
                ("reserved", count(q.reserved as u64)),
                ("delayed", count(q.delayed as u64)),
                ("waiting_getters", count(q.waiting_getters as u64)),
                ("puts", count(c.puts)),
                ("gets", count(c.gets)),
                ("acks", count(c.acks)),
                ("requeues", count(c.requeues)),
                ("dead_lettered", count(c.dead_lettered)),
            ];
            let dict = fields.map(|(k, v)| (Value::str(k), v));
            (Value::str(&name), Value::dict(dict.into()))
        })
        .collect();
    let memory = Value::dict(vec![
        (Value::str("used"), count(st.memory_used)),
        (
            Value::str("limit"),
            st.memory_limit.map_or(Value::None, count),
        ),
    ]);
    Ok(Value::dict(vec![
        (Value::str("queues"), Value::dict(queues)),
        (Value::str("memory"), memory),
        (
            Value::str("connections"),
            count(connections.load(Ordering::Relaxed) as u64),
        ),
        (Value::str("uptime"), Value::Float(st.uptime.as_secs_f64())),
    ]))
}

/// A name the client sent (a method, an ident, a keyword), as an error or a log line
/// shows it: its Python repr, cut off after about 60 bytes, since the peer decides how
/// long it is.
pub(crate) fn shown(name: &str) -> String {
    Value::str(name).brief(60)
}

fn exposed() -> Value {
    Value::tuple(QUEUE_METHODS.iter().map(|m| Value::str(m)).collect())
}

/// What a method call needs to know about the connection it arrived on.
pub struct Session<'a> {
    /// Identifies the connection as the owner of the leases it takes.
    pub id: u64,
    /// Whether the peer is still connected; a blocked call gives up when it is not.
    pub alive: &'a dyn Fn() -> bool,
    /// Set once the connection has reserved something, so that closing it releases its
    /// leases (and connections that never reserve skip that scan).
    pub has_leases: Cell<bool>,
    /// The server's count of open connections (for `stats`).
    pub connections: &'a AtomicUsize,
}

impl<'a> Session<'a> {
    /// A session for connection `id` of a server with `connections` open.
    pub fn new(id: u64, alive: &'a dyn Fn() -> bool, connections: &'a AtomicUsize) -> Session<'a> {
        Session {
            id,
            alive,
            has_leases: Cell::new(false),
            connections,
        }
    }
}

/// Handles a method call on the object `req.ident` (a method-channel request).
pub fn method(map: &QueueMap, req: &mut Request, session: &Session<'_>) -> Outcome {
    match bind(map, req) {
        Ok((queue, call)) => call.apply(map, &queue, session),
        Err(reply) => Outcome::reply(reply),
    }
}

/// Finds the queue a method call is for and binds the call's arguments: everything
/// decided before the call runs.
///
/// # Errors
/// The reply itself, when binding alone decides it: a `#TRACEBACK` for a missing or
/// unknown ident or a method the queue does not expose, `#UNSERIALIZABLE` for
/// `#GETVALUE`, an `#ERROR` for the `TypeError`/`ValueError` the method raises for its
/// arguments.
pub fn bind(map: &QueueMap, req: &mut Request) -> Result<(Arc<Queue>, QueueCall), Reply> {
    let Some(ident) = req.ident.as_deref() else {
        return Err(Reply::traceback(
            "TypeError",
            "method call without an ident",
        ));
    };
    let Some(queue) = map.by_ident(ident) else {
        return Err(Reply::traceback("KeyError", &shown(ident)));
    };
    let method = std::mem::take(&mut req.method);
    match QueueCall::bind(&method, req, &map.policy()) {
        Ok(Some(call)) => Ok((queue, call)),
        Err(exc) => Err(Reply::Error(exc)),
        Ok(None) if method == "#GETVALUE" => Err(Reply::Unserializable(
            "TypeError: a distq queue cannot be pickled; call its methods instead\n".into(),
        )),
        Ok(None) => Err(Reply::traceback(
            "AttributeError",
            &format!(
                "method {} of queue {:?} is not in exposed={QUEUE_METHODS:?}",
                shown(&method),
                queue.name(),
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{exceptions, Arg};

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
        method(
            map,
            &mut r.clone(),
            &Session::new(1, &alive, &AtomicUsize::new(1)),
        )
        .reply
    }

    fn setup() -> (QueueMap, String) {
        let map = QueueMap::new();
        let ident = create_q(&map);
        (map, ident)
    }

    /// `create('q')` as a client sends it; returns the queue's ident.
    fn create_q(map: &QueueMap) -> String {
        let Public::Reply(Reply::Return(v)) = public(
            map,
            &Request::new(None, "create", vec![Value::str("q")]),
            &AtomicUsize::new(1),
        ) else {
            panic!("create failed")
        };
        v.as_tuple().unwrap()[0].as_str().unwrap().to_string()
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

    /// Names a client sends come back in errors cut short: the peer decides their size.
    #[test]
    fn errors_show_client_names_bounded() {
        let (map, id) = setup();
        let long = "n".repeat(100_000);
        let replies = [
            call(&map, &req(&id, "get", vec![], vec![(&long, Value::None)])),
            call(&map, &req(&id, &long, vec![], vec![])),
            call(&map, &req(&long, "get", vec![], vec![])),
            public::PublicCall::bind(&Request::new(None, "decref", vec![Value::str(&long)]))
                .map_or_else(|r| r, |c| match c.apply(&map, &AtomicUsize::new(1)) {
                    Public::Reply(r) => r,
                    other => panic!("{other:?}"),
                }),
        ];
        for reply in replies {
            let text = format!("{reply:?}");
            assert!(text.len() < 1_000, "{} bytes: {}", text.len(), &text[..200]);
        }
    }

    #[test]
    fn put_many_and_get_many_batch_items() {
        let (map, id) = setup();
        let items = Value::list((0..10).map(Value::from).collect());
        let put = call(&map, &req(&id, "put_many", vec![items], vec![]));
        assert_eq!(put, Reply::Return(Value::None));
        let get_many = |args, kwargs| call(&map, &req(&id, "get_many", args, kwargs));
        let ints = |r: std::ops::Range<i64>| Value::list(r.map(Value::from).collect());
        let got = get_many(vec![Value::from(4)], vec![]);
        assert_eq!(got.into_result().unwrap(), ints(0..4));
        let got = get_many(vec![], vec![("timeout", Value::Float(0.1))]);
        assert_eq!(got.into_result().unwrap(), ints(4..10));
        let got = get_many(vec![Value::from(5), Value::Bool(false)], vec![]);
        assert_eq!(got, Reply::Error(exceptions::empty()));
        let bad = get_many(vec![Value::from(0)], vec![]);
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
        let id = create_q(&map);
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
            public(
                &map,
                &Request::new(None, "bogus", vec![]),
                &AtomicUsize::new(1)
            ),
            Public::Reply(Reply::Traceback(_))
        ));
        assert!(matches!(
            public(
                &map,
                &Request::new(None, "decref", vec![Value::from(1)]),
                &AtomicUsize::new(1)
            ),
            Public::Reply(Reply::Traceback(_))
        ));
    }

    #[test]
    fn create_returns_the_same_ident_and_counts_references() {
        let (map, id) = setup();
        let Public::Reply(Reply::Return(v)) = public(
            &map,
            &Request::new(None, "create", vec![Value::str("q")]),
            &AtomicUsize::new(1),
        ) else {
            panic!()
        };
        assert_eq!(v.as_tuple().unwrap()[0].as_str(), Some(id.as_str()));
        assert_eq!(
            public(
                &map,
                &Request::new(None, "number_of_objects", vec![]),
                &AtomicUsize::new(1)
            ),
            Public::Reply(Reply::Return(Value::Int(1)))
        );
    }
}
