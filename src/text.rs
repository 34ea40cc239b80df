//! Values as text: what a shell command sees of a task, what `distq-master --output`
//! writes, and the small envelope that gives line tasks an id.
//!
//! Queue items are Python values, but shells and files deal in lines. The rules:
//!
//! * **Text form** ([`text_form`]): a str is itself; every other value is its JSON
//!   rendering ([`to_json`]), so a command can feed it to `jq` or a JSON parser.
//!   A command's argument ([`arg_form`]) is the same except that bytes and bytearray
//!   are their own bytes: how `distq-master --input` passes a line that is not UTF-8
//!   (a file name, say) through unchanged.
//! * **JSON** follows the value: `None` → `null`, bools, ints (any size), floats
//!   (`nan`/`inf`, which JSON lacks, → `null`), str → string, bytes and bytearray →
//!   string (UTF-8, invalid bytes replaced by U+FFFD), tuple/list/set/frozenset → array,
//!   dict → object (non-str keys use their text form). Classes and opaque objects, which
//!   have no JSON counterpart, become the string of their `repr`.
//! * **Envelope**: `distq-master --input` puts each line as the dict
//!   `{'id': N, 'task': LINE, 'run': RUN}`, N counting from 0 in input order and RUN the
//!   master's run id. A worker answers with a dict carrying the same `id` and `run` (see
//!   [`crate::exec`]), which is how the master matches results to lines (for `--ordered`,
//!   and to ignore a duplicate after a redelivery) and tells its own results from those
//!   of another master on the same server.
//!   Any other item is a plain task: the classic mode's ints stay ints, so Python's
//!   classic workers keep working.

use std::fmt::Write;

use crate::Value;

/// The key of the task id in envelopes and result records.
pub const ID: &str = "id";
/// The key of the task in envelopes and result records.
pub const TASK: &str = "task";
/// The key of the run id in envelopes and result records.
pub const RUN: &str = "run";

/// A str as itself, anything else as JSON.
pub fn text_form(v: &Value) -> String {
    match v {
        Value::Str(s) => s.to_string(),
        other => to_json(other),
    }
}

/// What a command gets as `$1` for `v`: the text form, but bytes as they are.
pub fn arg_form(v: &Value) -> Vec<u8> {
    match v {
        Value::Bytes(b) | Value::ByteArray(b) => b.to_vec(),
        other => text_form(other).into_bytes(),
    }
}

/// The JSON rendering of a value (see the module docs for the mapping).
pub fn to_json(v: &Value) -> String {
    let mut out = String::new();
    write_json(v, &mut out);
    out
}

fn write_json(v: &Value, out: &mut String) {
    match v {
        Value::None => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // Display is Python's repr: plain decimal digits for ints of any size.
        Value::Int(_) | Value::BigInt(_) => {
            let _ = write!(out, "{v}");
        }
        Value::Float(x) if x.is_finite() => {
            // Python's repr (`1e+16`, `0.5`) is valid JSON for every finite float.
            let _ = write!(out, "{v}");
        }
        Value::Float(_) => out.push_str("null"),
        Value::Str(s) => json_string(s, out),
        Value::Bytes(b) | Value::ByteArray(b) => json_string(&String::from_utf8_lossy(b), out),
        Value::Tuple(items) | Value::List(items) | Value::Set(items) | Value::FrozenSet(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Dict(pairs) => {
            out.push('{');
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_string(&text_form(k), out);
                out.push(':');
                write_json(v, out);
            }
            out.push('}');
        }
        Value::Global(_) | Value::Object(_) => json_string(&v.to_string(), out),
    }
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The envelope for line `id` of run `run` (see the module docs).
pub fn envelope(id: u64, run: &str, task: Value) -> Value {
    Value::dict(vec![
        (
            Value::str(ID),
            Value::Int(i64::try_from(id).unwrap_or(i64::MAX)),
        ),
        (Value::str(TASK), task),
        (Value::str(RUN), Value::str(run)),
    ])
}

/// What a worker reads from a task: its id and run if it came in an envelope.
#[derive(Debug, PartialEq)]
pub struct Envelope<'a> {
    /// The line number, from `distq-master --input`.
    pub id: Option<u64>,
    /// The run the task belongs to, echoed into the result so that the master can tell
    /// its own results from those of another run.
    pub run: Option<&'a Value>,
    /// The task itself: the whole item if it is not an envelope.
    pub task: &'a Value,
}

/// Opens an envelope (`{'id': N, 'task': T}`, with or without `'run'`); any other item
/// is a task without an id.
pub fn open_envelope(item: &Value) -> Envelope<'_> {
    let plain = Envelope {
        id: None,
        run: None,
        task: item,
    };
    let Value::Dict(pairs) = item else {
        return plain;
    };
    let (id, task, run) = match &pairs[..] {
        [(k1, id), (k2, task)] if k1.as_str() == Some(ID) && k2.as_str() == Some(TASK) => {
            (id, task, None)
        }
        [(k1, id), (k2, task), (k3, run)]
            if k1.as_str() == Some(ID) && k2.as_str() == Some(TASK) && k3.as_str() == Some(RUN) =>
        {
            (id, task, Some(run))
        }
        _ => return plain,
    };
    match id {
        Value::Int(id) if *id >= 0 => Envelope {
            id: Some(*id as u64),
            run,
            task,
        },
        _ => plain,
    }
}

/// The value under str key `key` of a dict, if `v` is a dict that has it.
pub fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Dict(pairs) => pairs
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strs_are_themselves_everything_else_is_json() {
        assert_eq!(text_form(&Value::from("a b\n")), "a b\n");
        assert_eq!(text_form(&Value::from(42)), "42");
        assert_eq!(text_form(&Value::None), "null");
        assert_eq!(text_form(&Value::Float(f64::NAN)), "null");
        assert_eq!(text_form(&Value::Float(0.5)), "0.5");
        assert_eq!(
            text_form(&Value::tuple(vec![Value::from(1), Value::from("x\"\u{1}")])),
            r#"[1,"x\"\u0001"]"#
        );
        assert_eq!(
            text_form(&Value::dict(vec![(Value::from(1), Value::Bool(true))])),
            r#"{"1":true}"#
        );
        assert_eq!(
            text_form(&Value::from(vec![0xff, b'a'])),
            "\"\u{fffd}a\"",
            "bytes are lossy UTF-8"
        );
        assert_eq!(
            text_form(&Value::exception("builtins", "KeyError", vec![])),
            r#""builtins.KeyError()""#
        );
    }

    #[test]
    fn envelopes_round_trip_and_plain_items_have_no_id() {
        let e = envelope(7, "r1", Value::from("line"));
        let opened = open_envelope(&e);
        assert_eq!(opened.id, Some(7));
        assert_eq!(opened.run, Some(&Value::from("r1")));
        assert_eq!(opened.task, &Value::from("line"));
        assert_eq!(field(&e, TASK), Some(&Value::from("line")));
        let older = Value::dict(vec![
            (Value::from("id"), Value::from(3)),
            (Value::from("task"), Value::from("t")),
        ]);
        assert_eq!(
            (open_envelope(&older).id, open_envelope(&older).run),
            (Some(3), None)
        );
        let plain = Value::from(5);
        assert_eq!(open_envelope(&plain).task, &plain);
        assert_eq!(open_envelope(&plain).id, None);
        let other = Value::dict(vec![(Value::from("id"), Value::from("x"))]);
        assert_eq!(open_envelope(&other).id, None);
    }
}
