//! Python-style argument binding for queue methods shaped like
//! `f(item, block=True, timeout=None)`: each parameter may come by position or by keyword,
//! never both, and nothing may be left over. Violations are raised as `TypeError`, as
//! Python would raise them inside the method; each kind of parameter (`block`/`timeout`,
//! a lease id, a duration, a batch size, a queue name) is read by one function here, so
//! two methods taking the same parameter bind it the same way.

use std::time::Duration;

use super::items::Item;
use super::MAX_BATCH;
use crate::protocol::{exceptions, Arg, Request};
use crate::queues::{Policy, Wait};
use crate::Value;

/// Where `ack_put` puts its item unless told otherwise: the classic result queue.
const RESULT_QUEUE: &str = "get_result_queue";

/// A queue method's Python signature: positional-or-keyword parameters (`self` left
/// out), how many of them are required, and the keyword-only ones.
pub(super) struct Signature {
    pub(super) params: &'static [&'static str],
    pub(super) required: usize,
    pub(super) keyword_only: &'static [&'static str],
}

/// The parameters of one request, checked against the method's signature as CPython's
/// call machinery checks them, then bound one at a time.
pub(super) struct Args<'a> {
    method: &'a str,
    req: &'a mut Request,
}

impl<'a> Args<'a> {
    /// Refuses what CPython refuses before the method runs, in its words (3.10 and
    /// later) and its order: an unknown keyword or a parameter given twice (keywords in
    /// the order sent), then too many positional arguments, then missing ones.
    pub(super) fn bind(
        method: &'a str,
        req: &'a mut Request,
        sig: &Signature,
    ) -> Result<Args<'a>, Value> {
        let args = Args { method, req };
        let req = &*args.req;
        let given = req.args.len();
        for (name, _) in &req.kwargs {
            match sig.params.iter().position(|p| p == name) {
                Some(at) if at < given => {
                    return Err(
                        args.type_error(&format!("got multiple values for argument '{name}'"))
                    )
                }
                Some(_) => {}
                None if sig.keyword_only.contains(&name.as_str()) => {}
                None => {
                    return Err(args.type_error(&format!(
                        "got an unexpected keyword argument {}",
                        super::shown(name)
                    )))
                }
            }
        }
        if given > sig.params.len() {
            let (least, most) = (sig.required + 1, sig.params.len() + 1);
            let takes = if least == most {
                format!("{most} positional argument{}", plural(most))
            } else {
                format!("from {least} to {most} positional arguments")
            };
            return Err(args.type_error(&format!("takes {takes} but {} were given", given + 1)));
        }
        let missing: Vec<String> = sig.params[..sig.required]
            .iter()
            .enumerate()
            .filter(|&(at, name)| at >= given && !req.kwargs.iter().any(|(k, _)| k == name))
            .map(|(_, name)| format!("'{name}'"))
            .collect();
        if let Some((last, init)) = missing.split_last() {
            let names = if init.is_empty() {
                last.clone()
            } else {
                format!("{} and {last}", init.join(", "))
            };
            return Err(args.type_error(&format!(
                "missing {} required positional argument{}: {names}",
                missing.len(),
                plural(missing.len())
            )));
        }
        Ok(args)
    }

    /// `class` raised with the method's name in front, as CPython words its binding
    /// errors (`Queue.get() ...`).
    fn error(&self, class: &str, msg: &str) -> Value {
        exceptions::builtin(class, &format!("Queue.{}() {msg}", self.method))
    }

    pub(super) fn type_error(&self, msg: &str) -> Value {
        self.error("TypeError", msg)
    }

    /// The argument for the parameter at `pos` (`usize::MAX`: keyword-only), if given;
    /// [`Args::bind`] has made sure it was not given twice.
    fn optional_arg(&self, pos: usize, name: &str) -> Option<&Arg> {
        self.req.args.get(pos).or_else(|| {
            self.req
                .kwargs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v)
        })
    }

    /// A required parameter's argument, moved out of the request (items are large:
    /// they are not copied); [`Args::bind`] has made sure it was given.
    pub(super) fn take_required(&mut self, pos: usize, name: &str) -> Result<Arg, Value> {
        let placeholder = || Arg::Value(Value::None);
        let req = &mut *self.req;
        let arg = match req.args.get_mut(pos) {
            Some(arg) => Some(std::mem::replace(arg, placeholder())),
            None => req
                .kwargs
                .iter_mut()
                .find(|(k, _)| k == name)
                .map(|(_, v)| std::mem::replace(v, placeholder())),
        };
        arg.ok_or_else(|| self.type_error(&format!("missing required argument '{name}'")))
    }

    /// A parameter that is a plain value (a flag, a number), decoded if it was sent as
    /// something other than a scalar.
    pub(super) fn optional(&self, pos: usize, name: &str) -> Result<Option<Value>, Value> {
        match self.optional_arg(pos, name) {
            None => Ok(None),
            Some(arg) => arg
                .to_value()
                .map(Some)
                .map_err(|e| self.type_error(&format!("cannot read argument '{name}': {e}"))),
        }
    }

    fn required(&self, pos: usize, name: &str) -> Result<Value, Value> {
        self.optional(pos, name)?
            .ok_or_else(|| self.type_error(&format!("missing required argument '{name}'")))
    }

    /// The `item` parameter at `pos`, admitted for storage.
    pub(super) fn item(&mut self, pos: usize, policy: &Policy) -> Result<Item, Value> {
        Item::admit(policy, self.take_required(pos, "item")?)
    }

    /// Binds `block` at `pos` and `timeout` at `pos + 1` the way `queue.Queue` reads them.
    pub(super) fn wait(&self, pos: usize) -> Result<Wait, Value> {
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
                return Err(self.type_error(&format!(
                    "timeout must be a number, not {}",
                    other.brief(60)
                )))
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
    pub(super) fn lease(&self) -> Result<u64, Value> {
        match self.required(0, "lease")? {
            Value::Int(n) => {
                u64::try_from(n).map_err(|_| self.type_error("lease must be a lease id"))
            }
            other => {
                Err(self.type_error(&format!("lease must be an int, not {}", other.brief(60))))
            }
        }
    }

    /// Binds `leases`, the first positional argument: a list or tuple of lease ids.
    pub(super) fn leases(&self) -> Result<Vec<u64>, Value> {
        match self.required(0, "leases")? {
            Value::List(ids) | Value::Tuple(ids) => ids
                .iter()
                .map(|id| match id {
                    Value::Int(n) => u64::try_from(*n).ok(),
                    _ => None,
                })
                .collect::<Option<Vec<u64>>>(),
            _ => None,
        }
        .ok_or_else(|| self.type_error("leases must be a list of lease ids"))
    }

    /// Binds an optional keyword-only duration in seconds (`delay=`, `lease_timeout=`).
    pub(super) fn seconds(&self, name: &str) -> Result<Option<Duration>, Value> {
        let secs = match self.optional(usize::MAX, name)? {
            None | Some(Value::None) => return Ok(None),
            Some(Value::Int(n)) => n as f64,
            Some(Value::Float(x)) => x,
            Some(other) => {
                return Err(
                    self.type_error(&format!("{name} must be a number, not {}", other.brief(60)))
                )
            }
        };
        if secs.is_nan() || secs < 0.0 {
            return Err(exceptions::builtin(
                "ValueError",
                &format!("'{name}' must be a non-negative number"),
            ));
        }
        Ok(Duration::try_from_secs_f64(secs).ok())
    }

    /// Binds `max_items`, the first positional argument of the batch methods: at most
    /// [`MAX_BATCH`] whatever the caller asks for.
    pub(super) fn max_items(&self) -> Result<usize, Value> {
        match self.optional(0, "max_items")? {
            None => Ok(MAX_BATCH),
            Some(Value::Int(n)) if n > 0 => {
                Ok(usize::try_from(n).map_or(MAX_BATCH, |n| n.min(MAX_BATCH)))
            }
            Some(other) => Err(self.error(
                "ValueError",
                &format!("max_items must be a positive int, not {}", other.brief(60)),
            )),
        }
    }

    /// Binds `queue_name` at `pos`: where an `ack_put` stores its result.
    pub(super) fn queue_name(&self, pos: usize) -> Result<String, Value> {
        match self.optional(pos, "queue_name")? {
            None => Ok(RESULT_QUEUE.to_string()),
            Some(Value::Str(name)) => Ok(name.to_string()),
            Some(other) => Err(self.type_error(&format!(
                "queue_name must be a str, not {}",
                other.brief(60)
            ))),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Python truthiness for the values a `block` flag can plausibly be.
pub(super) fn truthy(v: &Value) -> bool {
    match v {
        Value::None => false,
        Value::Bool(b) => *b,
        Value::Int(n) => *n != 0,
        Value::Float(x) => *x != 0.0,
        Value::Str(s) => !s.is_empty(),
        _ => true,
    }
}
