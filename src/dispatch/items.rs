//! Items as a queue stores them: an item argument becomes a [`Fragment`] here, checked
//! against `--no-code-items`, and remembered as possibly carrying a manager proxy (only an
//! item that names a class or function can), so that the put can record its holds (see
//! `queues/holds.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use crate::pickle::{Fragment, Global, Pickled, MAX_DEPTH};
use crate::protocol::{exceptions, Arg};
use crate::queues::{Policy, QueueMap};
use crate::Value;

/// One item argument, admitted: its stored form, and whether it may carry proxies.
#[derive(Debug)]
pub struct Item {
    fragment: Fragment,
    names_code: bool,
}

impl Item {
    /// An item argument as the queue will store it.
    ///
    /// # Errors
    /// The exception to raise: `TypeError` for an item `--no-code-items` refuses or a
    /// list where one item belongs, `ValueError` for a value that cannot be pickled.
    pub(super) fn admit(policy: &Policy, arg: Arg) -> Result<Item, Value> {
        let value = match arg {
            Arg::Pickled(p) => return Item::admit_pickled(policy, p),
            Arg::Value(v) => v,
            Arg::Items(_) => {
                return Err(exceptions::builtin(
                    "TypeError",
                    "a list of items is an argument of put_many() only",
                ))
            }
        };
        if policy.no_code_items {
            if let Some(g) = first_global(&value, 0, &mut HashSet::new()) {
                return Err(refused_code(&format!("{}.{}", g.module, g.name)));
            }
        }
        let fragment = Fragment::encode(&value)
            .map_err(|e| exceptions::builtin("ValueError", &e.to_string()))?;
        Ok(Item {
            fragment,
            names_code: first_global(&value, 0, &mut HashSet::new()).is_some(),
        })
    }

    /// An item as the client pickled it, its opcodes moved, not copied: a large put
    /// then costs the frame and the queue's copy, no third one.
    pub(super) fn admit_pickled(policy: &Policy, item: Pickled) -> Result<Item, Value> {
        match item.names {
            Some(name) if policy.no_code_items => Err(refused_code(&name)),
            names => Ok(Item {
                fragment: item.fragment,
                names_code: names.is_some(),
            }),
        }
    }

    /// Each element of a `put_many`-style list, admitted; the first refusal wins.
    pub(super) fn admit_each(policy: &Policy, items: Vec<Pickled>) -> Result<Vec<Item>, Value> {
        items
            .into_iter()
            .map(|p| Item::admit_pickled(policy, p))
            .collect()
    }

    /// What to store, and what to record holds from once it is stored. The copy exists
    /// only for items that may carry a proxy: the store consumes the fragment, and the
    /// holds may be recorded only after the put succeeded.
    pub(super) fn into_stored(self) -> (Fragment, Option<Fragment>) {
        let held = self.names_code.then(|| self.fragment.clone());
        (self.fragment, held)
    }
}

/// Records the holds of stored items that may carry proxies.
pub(super) fn hold(map: &QueueMap, held: impl IntoIterator<Item = Option<Fragment>>) {
    for item in held.into_iter().flatten() {
        map.hold_proxies(&item);
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
fn first_global<'v>(v: &'v Value, depth: usize, seen: &mut HashSet<usize>) -> Option<&'v Global> {
    if depth > MAX_DEPTH {
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
