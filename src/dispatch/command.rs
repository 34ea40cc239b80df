//! A queue method call as a typed value: [`QueueCall::bind`] reads a request's arguments
//! once, against the method's Python signature, and what is left to do
//! ([`QueueCall::apply`], in `apply.rs`) sees only bound parameters, never argument
//! positions or keyword names. Every way a call may wait is a [`Wait`] field here, so a
//! caller that must not block (the fuzz harness) can see and change it before applying.
//!
//! # Format
//! ```text
//! ('d15700000000', 'get', (), {'timeout': 1})      -> Get { wait: For(1s) }
//! ('d15700000000', 'put', (7,), {'block': False})  -> Put { item: 7, wait: No }
//! ```

use std::time::Duration;

use super::args::{truthy, Args, Signature};
use super::items::Item;
use crate::protocol::{Arg, Request};
use crate::queues::{Policy, Wait};
use crate::Value;

/// A queue method call, its arguments bound. `put_nowait` and `get_nowait` bind to
/// `Put` and `Get` with [`Wait::No`]: after binding they are the same call.
#[derive(Debug)]
pub enum QueueCall {
    /// `put(item, block=True, timeout=None)`, `put_nowait(item)`.
    Put {
        /// The item to store.
        item: Item,
        /// How long to wait for room.
        wait: Wait,
    },
    /// `put_many(items, block=True, timeout=None)`: all of them or none.
    PutMany {
        /// The items to store, in order.
        items: Vec<Item>,
        /// How long to wait for room for all of them.
        wait: Wait,
    },
    /// `get(block=True, timeout=None)`, `get_nowait()`.
    Get {
        /// How long to wait for an item.
        wait: Wait,
    },
    /// `get_many(max_items=MAX_BATCH, block=True, timeout=None)`.
    GetMany {
        /// The most items to take.
        max: usize,
        /// How long to wait for the first item.
        wait: Wait,
    },
    /// `reserve(block=True, timeout=None, *, lease_timeout=None)`.
    Reserve {
        /// How long to wait for an item.
        wait: Wait,
        /// The lease's time (`None`: the server's default).
        lease_timeout: Option<Duration>,
    },
    /// `reserve_many(max_items=MAX_BATCH, block=True, timeout=None, *, lease_timeout=None)`.
    ReserveMany {
        /// The most items to lease.
        max: usize,
        /// How long to wait for the first item.
        wait: Wait,
        /// The leases' time (`None`: the server's default).
        lease_timeout: Option<Duration>,
    },
    /// `ack(lease)`.
    Ack {
        /// The lease to end.
        lease: u64,
    },
    /// `ack_put(lease, item, queue_name='get_result_queue')`: a result and its ack.
    AckPut {
        /// The lease to end.
        lease: u64,
        /// The result to store.
        item: Item,
        /// The queue the result goes to.
        queue_name: String,
        /// How long to wait for room there (Python has no parameter for it: forever).
        wait: Wait,
    },
    /// `ack_put_many(leases, items, queue_name='get_result_queue')`: one result per lease.
    AckPutMany {
        /// The leases to end.
        leases: Vec<u64>,
        /// Their results, in the same order.
        items: Vec<Item>,
        /// The queue the results go to.
        queue_name: String,
        /// How long to wait for room there (forever, as for `AckPut`).
        wait: Wait,
    },
    /// `release(lease, *, delay=None)`: the item goes back, after `delay` if given.
    Release {
        /// The lease to end.
        lease: u64,
        /// How long until the item may be delivered again.
        delay: Option<Duration>,
    },
    /// `touch(lease, *, lease_timeout=None)`: the lease runs from now again.
    Touch {
        /// The lease to extend.
        lease: u64,
        /// Its new time (`None`: the server's default).
        lease_timeout: Option<Duration>,
    },
    /// `shutdown(immediate=False)` (Python 3.13).
    Shutdown {
        /// Drop the queued items too.
        immediate: bool,
    },
    /// `join()`.
    Join {
        /// How long to wait for every item to be done (Python has no parameter for it:
        /// forever).
        wait: Wait,
    },
    /// `task_done()`.
    TaskDone,
    /// `qsize()`.
    Qsize,
    /// `empty()`.
    Empty,
    /// `full()`.
    Full,
    /// `stats()`: the whole server's.
    Stats,
    /// `__str__()`, `__repr__()`: Python's fallbacks for every proxied object.
    Describe,
}

/// Each queue method's Python signature (`self` left out), as `queue.Queue` declares
/// it, and distq's extensions declared the same way.
fn signature(method: &str) -> Option<Signature> {
    const WAIT: &[&str] = &["block", "timeout"];
    let (params, required, keyword_only): (
        &'static [&'static str],
        usize,
        &'static [&'static str],
    ) = match method {
        "put" => (&["item", "block", "timeout"], 1, &[]),
        "put_nowait" => (&["item"], 1, &[]),
        "put_many" => (&["items", "block", "timeout"], 1, &[]),
        "get" => (WAIT, 0, &[]),
        "get_many" => (&["max_items", "block", "timeout"], 0, &[]),
        "reserve" => (WAIT, 0, &["lease_timeout"]),
        "reserve_many" => (&["max_items", "block", "timeout"], 0, &["lease_timeout"]),
        "ack" => (&["lease"], 1, &[]),
        "ack_put" => (&["lease", "item", "queue_name"], 2, &[]),
        "ack_put_many" => (&["leases", "items", "queue_name"], 2, &[]),
        "release" => (&["lease"], 1, &["delay"]),
        "touch" => (&["lease"], 1, &["lease_timeout"]),
        "shutdown" => (&["immediate"], 0, &[]),
        "get_nowait" | "join" | "task_done" | "qsize" | "empty" | "full" | "stats" => (&[], 0, &[]),
        _ => return None,
    };
    Some(Signature {
        params,
        required,
        keyword_only,
    })
}

impl QueueCall {
    /// Binds the arguments of `req` to `method`, taking its items out of it (they are
    /// stored as they are, not copied); the caller has taken the method's name out of
    /// `req` to keep it for its own replies. The arguments are first checked against the
    /// method's signature as CPython checks a call (too many, unknown, twice, missing),
    /// then each parameter is read, left to right, its fault reported before the next.
    ///
    /// `Ok(None)` means `method` is no method of a queue (nor `__str__`/`__repr__`),
    /// which is not the method's fault but the caller's: Python answers it with a
    /// `#TRACEBACK`, not an exception.
    ///
    /// # Errors
    /// The exception the method raises for its arguments (`TypeError`, `ValueError`);
    /// for the signature checks, in CPython's words.
    pub fn bind(
        method: &str,
        req: &mut Request,
        policy: &Policy,
    ) -> Result<Option<QueueCall>, Value> {
        if matches!(method, "__str__" | "__repr__") {
            // Python's fallbacks take whatever arguments come and ignore them.
            return Ok(Some(QueueCall::Describe));
        }
        let Some(sig) = signature(method) else {
            return Ok(None);
        };
        let mut args = Args::bind(method, req, &sig)?;
        let call = match method {
            "put" => QueueCall::Put {
                item: args.item(0, policy)?,
                wait: args.wait(1)?,
            },
            "put_nowait" => QueueCall::Put {
                item: args.item(0, policy)?,
                wait: Wait::No,
            },
            "put_many" => QueueCall::PutMany {
                items: match args.take_required(0, "items")? {
                    Arg::Items(items) => Item::admit_each(policy, items)?,
                    Arg::Value(Value::List(items) | Value::Tuple(items)) => items
                        .iter()
                        .map(|v| Item::admit(policy, Arg::Value(v.clone())))
                        .collect::<Result<_, _>>()?,
                    other => {
                        return Err(args.type_error(&format!(
                            "takes a list or tuple of items, not {}",
                            other.brief(60)
                        )))
                    }
                },
                wait: args.wait(1)?,
            },
            "get" => QueueCall::Get {
                wait: args.wait(0)?,
            },
            "get_nowait" => QueueCall::Get { wait: Wait::No },
            "get_many" => QueueCall::GetMany {
                max: args.max_items()?,
                wait: args.wait(1)?,
            },
            "reserve" => QueueCall::Reserve {
                wait: args.wait(0)?,
                lease_timeout: args.seconds("lease_timeout")?,
            },
            "reserve_many" => QueueCall::ReserveMany {
                max: args.max_items()?,
                wait: args.wait(1)?,
                lease_timeout: args.seconds("lease_timeout")?,
            },
            "ack" => QueueCall::Ack {
                lease: args.lease()?,
            },
            "ack_put" => QueueCall::AckPut {
                lease: args.lease()?,
                item: args.item(1, policy)?,
                queue_name: args.queue_name(2)?,
                wait: Wait::Forever,
            },
            "ack_put_many" => {
                let leases = args.leases()?;
                let items = match args.take_required(1, "items")? {
                    Arg::Items(items) => Item::admit_each(policy, items)?,
                    _ => return Err(args.type_error("items must be a list of results")),
                };
                if leases.len() != items.len() {
                    return Err(crate::protocol::exceptions::builtin(
                        "ValueError",
                        &format!(
                            "Queue.ack_put_many() got {} leases and {} items: one result per lease",
                            leases.len(),
                            items.len()
                        ),
                    ));
                }
                QueueCall::AckPutMany {
                    leases,
                    items,
                    queue_name: args.queue_name(2)?,
                    wait: Wait::Forever,
                }
            }
            "release" => QueueCall::Release {
                lease: args.lease()?,
                delay: args.seconds("delay")?,
            },
            "touch" => QueueCall::Touch {
                lease: args.lease()?,
                lease_timeout: args.seconds("lease_timeout")?,
            },
            "shutdown" => QueueCall::Shutdown {
                immediate: args.optional(0, "immediate")?.is_some_and(|v| truthy(&v)),
            },
            "join" => QueueCall::Join {
                wait: Wait::Forever,
            },
            "task_done" => QueueCall::TaskDone,
            "qsize" => QueueCall::Qsize,
            "empty" => QueueCall::Empty,
            "full" => QueueCall::Full,
            "stats" => QueueCall::Stats,
            // `signature` knows one more method than this match: a test catches that.
            _ => return Ok(None),
        };
        Ok(Some(call))
    }

    /// How long the call may wait, if it can wait at all: the one place a caller that
    /// must not block has to look.
    #[cfg(feature = "internals")]
    pub fn wait_mut(&mut self) -> Option<&mut Wait> {
        match self {
            QueueCall::Put { wait, .. }
            | QueueCall::PutMany { wait, .. }
            | QueueCall::Get { wait }
            | QueueCall::GetMany { wait, .. }
            | QueueCall::Reserve { wait, .. }
            | QueueCall::ReserveMany { wait, .. }
            | QueueCall::AckPut { wait, .. }
            | QueueCall::AckPutMany { wait, .. }
            | QueueCall::Join { wait } => Some(wait),
            QueueCall::Ack { .. }
            | QueueCall::Release { .. }
            | QueueCall::Touch { .. }
            | QueueCall::Shutdown { .. }
            | QueueCall::TaskDone
            | QueueCall::Qsize
            | QueueCall::Empty
            | QueueCall::Full
            | QueueCall::Stats
            | QueueCall::Describe => None,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each method's forms, bound as Python would bind them. The exception classes are
    //! the ones CPython's `queue.Queue` raises for the same call, and so are the texts of
    //! the signature checks (CPython 3.10 and later; `tests/python/semantics.py` compares
    //! them with a local `queue.Queue` on every Python); the comments quote CPython where
    //! distq words an argument's own fault differently.

    use std::time::Duration;

    use super::QueueCall;
    use crate::dispatch::{MAX_BATCH, QUEUE_METHODS};
    use crate::protocol::{exceptions, Arg, Request};
    use crate::queues::{Policy, Wait};
    use crate::Value;

    /// A request as the server sees it: pickled, then parsed (item lists arrive as
    /// `Arg::Items`, long strs as pickled items).
    fn req(method: &str, args: Vec<Value>, kwargs: Vec<(&str, Value)>) -> Request {
        let mut r = Request::new(Some("d15700000000"), method, args);
        r.kwargs = kwargs
            .into_iter()
            .map(|(k, v)| (k.into(), Arg::Value(v)))
            .collect();
        Request::parse(&crate::pickle::encode(&r.to_value().unwrap()).unwrap()).unwrap()
    }

    fn bind_with(
        policy: &Policy,
        method: &str,
        args: Vec<Value>,
        kwargs: Vec<(&str, Value)>,
    ) -> Result<Option<QueueCall>, Value> {
        let mut req = req(method, args, kwargs);
        let method = std::mem::take(&mut req.method);
        QueueCall::bind(&method, &mut req, policy)
    }

    fn bound(method: &str, args: Vec<Value>, kwargs: Vec<(&str, Value)>) -> QueueCall {
        match bind_with(&Policy::default(), method, args, kwargs) {
            Ok(Some(call)) => call,
            other => panic!("{method}: {other:?}"),
        }
    }

    /// The exception binding raises.
    fn raised(method: &str, args: Vec<Value>, kwargs: Vec<(&str, Value)>) -> Value {
        match bind_with(&Policy::default(), method, args, kwargs) {
            Err(exc) => exc,
            other => panic!("{method} bound: {other:?}"),
        }
    }

    fn type_error(msg: &str) -> Value {
        exceptions::builtin("TypeError", msg)
    }

    fn value_error(msg: &str) -> Value {
        exceptions::builtin("ValueError", msg)
    }

    fn secs(s: f64) -> Wait {
        Wait::For(Duration::from_secs_f64(s))
    }

    fn int(n: i64) -> Value {
        Value::from(n)
    }

    fn list(items: &[i64]) -> Value {
        Value::list(items.iter().map(|&n| Value::from(n)).collect())
    }

    /// The stored items' values.
    fn values(items: Vec<super::Item>) -> Vec<Value> {
        items
            .into_iter()
            .map(|i| i.into_stored().0.decode().unwrap())
            .collect()
    }

    fn wait_of(call: QueueCall) -> Wait {
        let mut call = call;
        *call.wait_mut().expect("a call that can wait")
    }

    #[test]
    fn get_binds_block_and_timeout_by_position_keyword_and_default() {
        let get = |args, kwargs| wait_of(bound("get", args, kwargs));
        assert_eq!(get(vec![], vec![]), Wait::Forever);
        assert_eq!(get(vec![Value::Bool(false)], vec![]), Wait::No);
        assert_eq!(
            get(vec![Value::Bool(true), Value::Float(0.5)], vec![]),
            secs(0.5)
        );
        assert_eq!(
            get(vec![Value::Bool(true), Value::None], vec![]),
            Wait::Forever
        );
        assert_eq!(get(vec![], vec![("timeout", int(1))]), secs(1.0));
        assert_eq!(
            get(vec![Value::Bool(true)], vec![("timeout", int(2))]),
            secs(2.0)
        );
        // block=False wins over any timeout, as in `queue.Queue.get`.
        let no = vec![("block", Value::Bool(false)), ("timeout", int(5))];
        assert_eq!(get(vec![], no), Wait::No);
        assert_eq!(get(vec![int(0)], vec![]), Wait::No);
        // A timeout too long for a Duration, or for a float, waits forever.
        assert_eq!(
            get(vec![], vec![("timeout", Value::Float(1e300))]),
            Wait::Forever
        );
        let two_pow_70 = Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40].into());
        assert_eq!(get(vec![], vec![("timeout", two_pow_70)]), Wait::Forever);
        assert_eq!(wait_of(bound("get_nowait", vec![], vec![])), Wait::No);
    }

    #[test]
    fn get_refuses_what_python_refuses() {
        // Python: ValueError("'timeout' must be a non-negative number")
        let negative = value_error("'timeout' must be a non-negative number");
        assert_eq!(raised("get", vec![], vec![("timeout", int(-1))]), negative);
        let nan = Value::Float(f64::NAN);
        assert_eq!(
            raised("get", vec![Value::Bool(true), nan], vec![]),
            negative
        );
        // Python: TypeError("'<' not supported between instances of 'str' and 'int'")
        assert_eq!(
            raised("get", vec![], vec![("timeout", Value::str("x"))]),
            type_error("Queue.get() timeout must be a number, not 'x'")
        );
        // Python: TypeError("Queue.get() takes from 1 to 3 positional arguments but 4 were given")
        assert_eq!(
            raised("get", vec![Value::Bool(true), int(1), int(2)], vec![]),
            type_error("Queue.get() takes from 1 to 3 positional arguments but 4 were given")
        );
        // Python: TypeError("Queue.get() got multiple values for argument 'block'")
        assert_eq!(
            raised(
                "get",
                vec![Value::Bool(false)],
                vec![("block", Value::Bool(false))]
            ),
            type_error("Queue.get() got multiple values for argument 'block'")
        );
        // Python: TypeError("Queue.get() got an unexpected keyword argument 'bogus'")
        assert_eq!(
            raised("get", vec![], vec![("bogus", Value::None)]),
            type_error("Queue.get() got an unexpected keyword argument 'bogus'")
        );
        // Python: TypeError("Queue.get_nowait() takes 1 positional argument but 2 were given")
        assert_eq!(
            raised("get_nowait", vec![Value::Bool(false)], vec![]),
            type_error("Queue.get_nowait() takes 1 positional argument but 2 were given")
        );
    }

    #[test]
    fn put_binds_item_block_and_timeout() {
        let put = |args, kwargs| match bound("put", args, kwargs) {
            QueueCall::Put { item, wait } => (values(vec![item]), wait),
            other => panic!("{other:?}"),
        };
        assert_eq!(put(vec![int(5)], vec![]), (vec![int(5)], Wait::Forever));
        assert_eq!(
            put(vec![int(5), Value::Bool(false)], vec![]),
            (vec![int(5)], Wait::No)
        );
        let kw = vec![("item", int(6)), ("timeout", Value::Float(0.25))];
        assert_eq!(put(vec![], kw), (vec![int(6)], secs(0.25)));
        let kw = vec![("block", Value::Bool(false))];
        assert_eq!(put(vec![int(7)], kw), (vec![int(7)], Wait::No));
        let positional = vec![int(8), Value::Bool(true), int(3)];
        assert_eq!(put(positional, vec![]), (vec![int(8)], secs(3.0)));
        match bound("put_nowait", vec![int(9)], vec![]) {
            QueueCall::Put { item, wait } => {
                assert_eq!((values(vec![item]), wait), (vec![int(9)], Wait::No));
            }
            other => panic!("{other:?}"),
        }
        // Python: TypeError("Queue.put() missing 1 required positional argument: 'item'")
        assert_eq!(
            raised("put", vec![], vec![]),
            type_error("Queue.put() missing 1 required positional argument: 'item'")
        );
        // Python: TypeError("Queue.put() takes from 2 to 4 positional arguments but 5 were given")
        assert_eq!(
            raised(
                "put",
                vec![int(1), Value::Bool(true), int(1), int(4)],
                vec![]
            ),
            type_error("Queue.put() takes from 2 to 4 positional arguments but 5 were given")
        );
        // Python: TypeError("Queue.put() got multiple values for argument 'item'")
        assert_eq!(
            raised("put", vec![int(1)], vec![("item", int(2))]),
            type_error("Queue.put() got multiple values for argument 'item'")
        );
        // Python: TypeError("Queue.put_nowait() takes 2 positional arguments but 3 were given")
        assert_eq!(
            raised("put_nowait", vec![int(1), Value::Bool(true)], vec![]),
            type_error("Queue.put_nowait() takes 2 positional arguments but 3 were given")
        );
    }

    #[test]
    fn an_item_is_refused_before_later_arguments_are_read() {
        let policy = Policy {
            no_code_items: true,
            ..Policy::default()
        };
        let code = Value::global("os", "system");
        let refused = bind_with(&policy, "put", vec![code], vec![("timeout", int(-1))]);
        assert_eq!(
            refused.unwrap_err(),
            type_error(
                "this server refuses items that reference classes or functions \
                 (--no-code-items); the item references os.system"
            )
        );
    }

    #[test]
    fn batches_bind_max_items_the_same_way() {
        for method in ["get_many", "reserve_many"] {
            let max = |args, kwargs| match bound(method, args, kwargs) {
                QueueCall::GetMany { max, wait } | QueueCall::ReserveMany { max, wait, .. } => {
                    (max, wait)
                }
                other => panic!("{other:?}"),
            };
            assert_eq!(max(vec![], vec![]), (MAX_BATCH, Wait::Forever));
            assert_eq!(max(vec![int(4)], vec![]), (4, Wait::Forever));
            assert_eq!(max(vec![], vec![("max_items", int(3))]), (3, Wait::Forever));
            assert_eq!(max(vec![int(1 << 40)], vec![]), (MAX_BATCH, Wait::Forever));
            assert_eq!(max(vec![int(4), Value::Bool(false)], vec![]), (4, Wait::No));
            let positional = vec![int(4), Value::Bool(true), Value::Float(0.1)];
            assert_eq!(max(positional, vec![]), (4, secs(0.1)));
            for bad in [int(0), int(-3), Value::str("x")] {
                let text = format!(
                    "Queue.{method}() max_items must be a positive int, not {}",
                    bad.brief(60)
                );
                assert_eq!(raised(method, vec![bad], vec![]), value_error(&text));
            }
        }
    }

    #[test]
    fn put_many_takes_a_list_or_tuple() {
        let items = |args, kwargs| match bound("put_many", args, kwargs) {
            QueueCall::PutMany { items, wait } => (values(items), wait),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            items(vec![list(&[1, 2])], vec![]),
            (vec![int(1), int(2)], Wait::Forever)
        );
        let kw = vec![("items", list(&[3])), ("block", Value::Bool(false))];
        assert_eq!(items(vec![], kw), (vec![int(3)], Wait::No));
        let tuple = Value::tuple(vec![int(4)]);
        assert_eq!(items(vec![tuple], vec![]), (vec![int(4)], Wait::Forever));
        assert_eq!(
            raised("put_many", vec![int(5)], vec![]),
            type_error("Queue.put_many() takes a list or tuple of items, not 5")
        );
    }

    #[test]
    fn reserve_binds_a_keyword_only_lease_timeout() {
        let reserve = |args, kwargs| match bound("reserve", args, kwargs) {
            QueueCall::Reserve {
                wait,
                lease_timeout,
            } => (wait, lease_timeout),
            other => panic!("{other:?}"),
        };
        assert_eq!(reserve(vec![], vec![]), (Wait::Forever, None));
        assert_eq!(reserve(vec![Value::Bool(false)], vec![]), (Wait::No, None));
        let kw = vec![("timeout", int(1)), ("lease_timeout", Value::Float(1.5))];
        assert_eq!(
            reserve(vec![], kw),
            (secs(1.0), Some(Duration::from_millis(1500)))
        );
        let kw = vec![("lease_timeout", Value::None)];
        assert_eq!(reserve(vec![], kw), (Wait::Forever, None));
        assert_eq!(
            raised("reserve", vec![], vec![("lease_timeout", Value::str("x"))]),
            type_error("Queue.reserve() lease_timeout must be a number, not 'x'")
        );
        assert_eq!(
            raised("reserve", vec![], vec![("lease_timeout", int(-1))]),
            value_error("'lease_timeout' must be a non-negative number")
        );
        // Keyword-only: a third positional argument is one too many.
        assert_eq!(
            raised("reserve", vec![Value::Bool(true), int(1), int(2)], vec![]),
            type_error("Queue.reserve() takes from 1 to 3 positional arguments but 4 were given")
        );
        match bound("reserve_many", vec![], vec![("lease_timeout", int(2))]) {
            QueueCall::ReserveMany { lease_timeout, .. } => {
                assert_eq!(lease_timeout, Some(Duration::from_secs(2)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lease_methods_bind_the_lease_id() {
        assert!(matches!(
            bound("ack", vec![int(7)], vec![]),
            QueueCall::Ack { lease: 7 }
        ));
        assert!(matches!(
            bound("ack", vec![], vec![("lease", int(8))]),
            QueueCall::Ack { lease: 8 }
        ));
        assert_eq!(
            raised("ack", vec![], vec![]),
            type_error("Queue.ack() missing 1 required positional argument: 'lease'")
        );
        assert_eq!(
            raised("ack", vec![int(-1)], vec![]),
            type_error("Queue.ack() lease must be a lease id")
        );
        assert_eq!(
            raised("touch", vec![Value::str("x")], vec![]),
            type_error("Queue.touch() lease must be an int, not 'x'")
        );
        match bound("release", vec![int(7)], vec![("delay", int(2))]) {
            QueueCall::Release { lease, delay } => {
                assert_eq!((lease, delay), (7, Some(Duration::from_secs(2))));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            bound("release", vec![int(7)], vec![]),
            QueueCall::Release {
                lease: 7,
                delay: None
            }
        ));
        assert_eq!(
            raised("release", vec![int(7), int(2)], vec![]),
            type_error("Queue.release() takes 2 positional arguments but 3 were given")
        );
        match bound("touch", vec![int(7)], vec![("lease_timeout", int(3))]) {
            QueueCall::Touch {
                lease,
                lease_timeout,
            } => assert_eq!((lease, lease_timeout), (7, Some(Duration::from_secs(3)))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ack_put_binds_its_queue_name_like_ack_put_many() {
        let ack_put = |args, kwargs| match bound("ack_put", args, kwargs) {
            QueueCall::AckPut {
                lease,
                item,
                queue_name,
                wait,
            } => (lease, values(vec![item]), queue_name, wait),
            other => panic!("{other:?}"),
        };
        let results = "get_result_queue".to_string();
        assert_eq!(
            ack_put(vec![int(7), int(1)], vec![]),
            (7, vec![int(1)], results.clone(), Wait::Forever)
        );
        assert_eq!(
            ack_put(vec![int(7), int(1), Value::str("r")], vec![]),
            (7, vec![int(1)], "r".to_string(), Wait::Forever)
        );
        let kw = vec![
            ("lease", int(7)),
            ("item", int(1)),
            ("queue_name", Value::str("r")),
        ];
        assert_eq!(
            ack_put(vec![], kw),
            (7, vec![int(1)], "r".to_string(), Wait::Forever)
        );
        assert_eq!(
            raised("ack_put", vec![int(7)], vec![]),
            type_error("Queue.ack_put() missing 1 required positional argument: 'item'")
        );
        let ack_put_many = |args, kwargs| match bound("ack_put_many", args, kwargs) {
            QueueCall::AckPutMany {
                leases,
                items,
                queue_name,
                wait,
            } => (leases, values(items), queue_name, wait),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            ack_put_many(vec![list(&[1, 2]), list(&[3, 4])], vec![]),
            (vec![1, 2], vec![int(3), int(4)], results, Wait::Forever)
        );
        let kw = vec![("queue_name", Value::str("r"))];
        assert_eq!(
            ack_put_many(vec![list(&[1]), list(&[3])], kw),
            (vec![1], vec![int(3)], "r".to_string(), Wait::Forever)
        );
        for method in ["ack_put", "ack_put_many"] {
            let args = if method == "ack_put" {
                vec![int(1), int(3), int(5)]
            } else {
                vec![list(&[1]), list(&[3]), int(5)]
            };
            assert_eq!(
                raised(method, args, vec![]),
                type_error(&format!("Queue.{method}() queue_name must be a str, not 5"))
            );
        }
        assert_eq!(
            raised("ack_put_many", vec![list(&[1]), list(&[3, 4])], vec![]),
            value_error("Queue.ack_put_many() got 1 leases and 2 items: one result per lease")
        );
        assert_eq!(
            raised("ack_put_many", vec![int(5), list(&[3])], vec![]),
            type_error("Queue.ack_put_many() leases must be a list of lease ids")
        );
        assert_eq!(
            raised("ack_put_many", vec![list(&[1]), int(5)], vec![]),
            type_error("Queue.ack_put_many() items must be a list of results")
        );
    }

    #[test]
    fn methods_without_parameters_take_no_arguments() {
        for method in ["qsize", "empty", "full", "task_done", "stats", "join"] {
            bound(method, vec![], vec![]);
            // Python: TypeError("Queue.qsize() takes 1 positional argument but 2 were given")
            assert_eq!(
                raised(method, vec![Value::None], vec![]),
                type_error(&format!(
                    "Queue.{method}() takes 1 positional argument but 2 were given"
                ))
            );
        }
        assert_eq!(wait_of(bound("join", vec![], vec![])), Wait::Forever);
        let shutdown = |args, kwargs| match bound("shutdown", args, kwargs) {
            QueueCall::Shutdown { immediate } => immediate,
            other => panic!("{other:?}"),
        };
        assert!(!shutdown(vec![], vec![]));
        assert!(shutdown(vec![Value::Bool(true)], vec![]));
        assert!(shutdown(vec![], vec![("immediate", int(1))]));
        assert!(!shutdown(vec![], vec![("immediate", int(0))]));
    }

    #[test]
    fn every_exposed_method_binds_and_nothing_else_does() {
        for &method in QUEUE_METHODS {
            let bound = bind_with(&Policy::default(), method, vec![], vec![]);
            assert!(
                !matches!(bound, Ok(None)),
                "{method} is exposed but unbound"
            );
        }
        for fallback in ["__str__", "__repr__"] {
            assert!(matches!(
                bind_with(&Policy::default(), fallback, vec![int(1)], vec![]),
                Ok(Some(QueueCall::Describe))
            ));
        }
        for other in ["#GETVALUE", "bogus", "__init__", ""] {
            assert!(
                matches!(
                    bind_with(&Policy::default(), other, vec![], vec![]),
                    Ok(None)
                ),
                "{other:?}"
            );
        }
    }
}
