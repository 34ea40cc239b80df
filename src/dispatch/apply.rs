//! Running a bound [`QueueCall`] against its queue, and the [`Outcome`] it leaves: the
//! reply, and for replies that carry items taken off the queue, how to put them back.
//!
//! Blocking and undo read here in one place. A call waits only as its `Wait` says (bound
//! from `block`/`timeout`, or forever for `join` and the put half of `ack_put`), and gives
//! up when the server stops or the peer leaves ([`Fault::HangUp`]: no reply at all). Items
//! a `get`/`get_many` took are final only once their reply was sent (`Outcome::delivered`);
//! until then the connection loop may [`Outcome::undo`] the take.

use std::sync::Arc;

use super::command::QueueCall;
use super::items::hold;
use super::Session;
use crate::pickle::Fragment;
use crate::protocol::{exceptions, Reply};
use crate::queues::{Queue, QueueMap, Taken};
use crate::{Error, Value};

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
    pub(super) fn reply(reply: Reply) -> Outcome {
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

/// Why a queue method did not produce a reply.
enum Fault {
    /// It raised this exception: send it in an `#ERROR` reply.
    Raise(Value),
    /// The server is stopping or the peer left while the call waited: send nothing and
    /// close the connection (a Python client then sees `EOFError`, a distq client a lost
    /// connection it may reconnect from).
    HangUp,
}

impl From<Error> for Fault {
    fn from(e: Error) -> Fault {
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
}

impl QueueCall {
    /// Runs the call on `queue` for the connection `session`.
    pub fn apply(self, map: &QueueMap, queue: &Arc<Queue>, session: &Session<'_>) -> Outcome {
        match self.run(map, queue, session) {
            Ok(outcome) => outcome,
            Err(Fault::Raise(exc)) => Outcome::reply(Reply::Error(exc)),
            Err(Fault::HangUp) => Outcome {
                hang_up: true,
                ..Outcome::reply(Reply::Return(Value::None))
            },
        }
    }

    fn run(
        self,
        map: &QueueMap,
        queue: &Arc<Queue>,
        session: &Session<'_>,
    ) -> Result<Outcome, Fault> {
        let alive = session.alive;
        let none = || Outcome::reply(Reply::Return(Value::None));
        let value = |v: Value| Outcome::reply(Reply::Return(v));
        Ok(match self {
            QueueCall::Put { item, wait } => {
                let (item, held) = item.into_stored();
                queue.put(item, wait, alive)?;
                hold(map, [held]);
                none()
            }
            QueueCall::PutMany { items, wait } => {
                let (items, held): (Vec<_>, Vec<_>) =
                    items.into_iter().map(|i| i.into_stored()).unzip();
                queue.put_many(items, wait, alive)?;
                hold(map, held);
                none()
            }
            QueueCall::Get { wait } => Outcome::taken(queue, vec![queue.get(wait, alive)?]),
            QueueCall::GetMany { max, wait } => {
                let mut outcome = Outcome::taken(queue, queue.get_many(max, wait, alive)?);
                // Always a list, even of one, so callers need not special-case it.
                if let Reply::Item(f) = outcome.reply {
                    outcome.reply = Reply::Items(vec![f]);
                }
                outcome
            }
            QueueCall::Reserve {
                wait,
                lease_timeout,
            } => {
                let r = queue.reserve(session.id, lease_timeout, wait, alive)?;
                session.has_leases.set(true);
                Outcome::reply(Reply::Lease(r.lease, r.item))
            }
            QueueCall::ReserveMany {
                max,
                wait,
                lease_timeout,
            } => {
                let reserved = queue.reserve_many(session.id, max, lease_timeout, wait, alive)?;
                session.has_leases.set(true);
                let pairs = reserved
                    .iter()
                    .map(|r| Fragment::paired(r.lease as i64, &r.item))
                    .collect::<crate::Result<Vec<_>>>()?;
                Outcome::reply(Reply::Items(pairs))
            }
            QueueCall::Ack { lease } => {
                map.delivered(&queue.ack(lease)?.item);
                none()
            }
            QueueCall::AckPut {
                lease,
                item,
                queue_name,
                wait,
            } => {
                let (item, held) = item.into_stored();
                map.ack_put(queue, lease, &queue_name, item, wait, alive)?;
                hold(map, [held]);
                none()
            }
            QueueCall::AckPutMany {
                leases,
                items,
                queue_name,
                wait,
            } => {
                let (items, held): (Vec<_>, Vec<_>) =
                    items.into_iter().map(|i| i.into_stored()).unzip();
                map.ack_put_many(queue, &leases, &queue_name, items, wait, alive)?;
                hold(map, held);
                none()
            }
            QueueCall::Release { lease, delay } => {
                map.release(queue, lease, delay)?;
                none()
            }
            QueueCall::Touch {
                lease,
                lease_timeout,
            } => {
                queue.touch(lease, lease_timeout)?;
                none()
            }
            QueueCall::Shutdown { immediate } => {
                queue.shutdown(immediate)?;
                none()
            }
            QueueCall::Join { wait } => {
                queue.join(wait, alive)?;
                none()
            }
            QueueCall::TaskDone => {
                queue.task_done()?;
                none()
            }
            QueueCall::Qsize => value(Value::Int(queue.len()? as i64)),
            QueueCall::Empty => value(Value::Bool(queue.is_empty()?)),
            QueueCall::Full => value(Value::Bool(queue.is_full()?)),
            QueueCall::Stats => value(super::stats(map, session.connections)?),
            QueueCall::Describe => {
                let len = queue.len().unwrap_or(0);
                value(Value::str(&format!(
                    "<distq queue {:?} with {len} items>",
                    queue.name()
                )))
            }
        })
    }
}
