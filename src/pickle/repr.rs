//! Python-`repr()`-like rendering of values, for printing results.
//!
//! Plain data renders as Python would print it: `None`, `True`, `42`, `2.25`, `1e+16`,
//! `'text'`, `b'\x00'`, `bytearray(b'ab')`, `(1,)`, `[1, 2]`, `{'k': 1}`, `{1, 2}`,
//! `set()`, `frozenset({3})`. Two things have no Python repr and use a format of our own:
//!
//! * a global renders as its dotted name, `module.name` (e.g. `queue.Full`);
//! * an object renders as a call of its callable with its arguments spread out,
//!   `module.name(arg, ...)` (e.g. `queue.Full()`, `builtins.KeyError('missing')`), for
//!   REDUCE and NEWOBJ alike. State set by BUILD follows as `.__setstate__(state)`, e.g.
//!   `builtins.AttributeError('x').__setstate__({'args': ('x',)})`. Arguments that are not
//!   a tuple render as `callable(*args)`.
//!
//! Strs are escaped close to Python's rules: backslash, the quote, `\n`, `\r`, `\t`, and
//! control or invisible characters as `\xNN`, `\uNNNN` or `\UNNNNNNNN`; Python's exact
//! printability table (Unicode categories) is approximated. Nesting beyond
//! [`MAX_DEPTH`] renders as `...` rather than recursing further.

use super::{Value, MAX_DEPTH};
use std::fmt::{self, Write};

pub(crate) fn write_repr(v: &Value, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    repr(v, f, 0)
}

fn repr(v: &Value, f: &mut fmt::Formatter<'_>, depth: usize) -> fmt::Result {
    if depth > MAX_DEPTH {
        return f.write_str("...");
    }
    let inner = depth + 1;
    match v {
        Value::None => f.write_str("None"),
        Value::Bool(true) => f.write_str("True"),
        Value::Bool(false) => f.write_str("False"),
        Value::Int(n) => write!(f, "{n}"),
        Value::BigInt(b) => big_int(b, f),
        Value::Float(x) => float(*x, f),
        Value::Str(s) => str_repr(s, f),
        Value::Bytes(b) => bytes_repr(b, f),
        Value::ByteArray(b) => {
            f.write_str("bytearray(")?;
            bytes_repr(b, f)?;
            f.write_char(')')
        }
        Value::Tuple(items) => {
            f.write_char('(')?;
            seq(items, f, inner)?;
            if items.len() == 1 {
                f.write_char(',')?;
            }
            f.write_char(')')
        }
        Value::List(items) => {
            f.write_char('[')?;
            seq(items, f, inner)?;
            f.write_char(']')
        }
        Value::Dict(pairs) => {
            f.write_char('{')?;
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                repr(k, f, inner)?;
                f.write_str(": ")?;
                repr(v, f, inner)?;
            }
            f.write_char('}')
        }
        Value::Set(items) if items.is_empty() => f.write_str("set()"),
        Value::Set(items) => {
            f.write_char('{')?;
            seq(items, f, inner)?;
            f.write_char('}')
        }
        Value::FrozenSet(items) if items.is_empty() => f.write_str("frozenset()"),
        Value::FrozenSet(items) => {
            f.write_str("frozenset({")?;
            seq(items, f, inner)?;
            f.write_str("})")
        }
        Value::Global(g) => write!(f, "{}.{}", g.module, g.name),
        Value::Object(o) => {
            // REDUCE and NEWOBJ render alike: both read as "construct callable with args".
            repr(&o.callable, f, inner)?;
            f.write_char('(')?;
            match &o.args {
                Value::Tuple(args) => seq(args, f, inner)?,
                other => {
                    f.write_char('*')?;
                    repr(other, f, inner)?;
                }
            }
            f.write_char(')')?;
            if let Some(state) = &o.state {
                f.write_str(".__setstate__(")?;
                repr(state, f, inner)?;
                f.write_char(')')?;
            }
            Ok(())
        }
    }
}

fn seq(items: &[Value], f: &mut fmt::Formatter<'_>, depth: usize) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        repr(item, f, depth)?;
    }
    Ok(())
}

/// Python's float repr: shortest round-trip digits, positional notation for decimal
/// exponents -4 ≤ e < 16 (always with a `.0` if integral), scientific otherwise with a
/// signed exponent of at least two digits (`1e+16`, `1.5e-07`).
fn float(x: f64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if x.is_nan() {
        return f.write_str("nan");
    }
    if x.is_infinite() {
        return f.write_str(if x < 0.0 { "-inf" } else { "inf" });
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e16", "0e0".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    f.write_str(sign)?;
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        f.write_str(first)?;
        if !rest.is_empty() {
            write!(f, ".{rest}")?;
        }
        let esign = if exp < 0 { '-' } else { '+' };
        return write!(f, "e{esign}{:02}", exp.unsigned_abs());
    }
    // The decimal point goes after `exp + 1` digits (0 < n <= 16 here, or before them).
    let point = exp + 1;
    if point <= 0 {
        f.write_str("0.")?;
        for _ in 0..point.unsigned_abs() {
            f.write_char('0')?;
        }
        return f.write_str(&digits);
    }
    let point = point.unsigned_abs() as usize;
    if digits.len() <= point {
        f.write_str(&digits)?;
        for _ in digits.len()..point {
            f.write_char('0')?;
        }
        f.write_str(".0")
    } else {
        let (int, frac) = digits.split_at(point);
        write!(f, "{int}.{frac}")
    }
}

/// Python picks single quotes unless the text has a `'` and no `"`.
fn quote_for(has_single: bool, has_double: bool) -> char {
    if has_single && !has_double {
        '"'
    } else {
        '\''
    }
}

fn str_repr(s: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let quote = quote_for(s.contains('\''), s.contains('"'));
    f.write_char(quote)?;
    for c in s.chars() {
        match c {
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c == quote => write!(f, "\\{c}")?,
            c if printable(c) => f.write_char(c)?,
            c => match u32::from(c) {
                n @ 0..=0xff => write!(f, "\\x{n:02x}")?,
                n @ 0x100..=0xffff => write!(f, "\\u{n:04x}")?,
                n => write!(f, "\\U{n:08x}")?,
            },
        }
    }
    f.write_char(quote)
}

/// An approximation of Python's `str.isprintable()` for one char: not a control char,
/// and not one of the common separators/format chars (no-break space, soft hyphen,
/// zero-width and bidi marks, line/paragraph separators, BOM, private use).
fn printable(c: char) -> bool {
    !c.is_control()
        && !matches!(
            u32::from(c),
            0xa0 | 0xad
                | 0x1680
                | 0x2000..=0x200f
                | 0x2028..=0x202f
                | 0x205f..=0x206f
                | 0x3000
                | 0xfeff
                | 0xe000..=0xf8ff
                | 0xfff9..=0xfffb
                | 0xf0000..
        )
}

fn bytes_repr(b: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let quote = quote_for(b.contains(&b'\''), b.contains(&b'"'));
    f.write_char('b')?;
    f.write_char(quote)?;
    for &byte in b {
        match byte {
            b'\\' => f.write_str("\\\\")?,
            b'\n' => f.write_str("\\n")?,
            b'\r' => f.write_str("\\r")?,
            b'\t' => f.write_str("\\t")?,
            _ if char::from(byte) == quote => write!(f, "\\{quote}")?,
            0x20..=0x7e => f.write_char(char::from(byte))?,
            _ => write!(f, "\\x{byte:02x}")?,
        }
    }
    f.write_char(quote)
}

/// Decimal rendering of a little-endian two's complement int of any size: the magnitude
/// is divided by 10^9 repeatedly (O(n²), fine for printing).
fn big_int(b: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    // Python itself refuses to print ints over 4300 digits (CVE-2020-10735): the
    // quadratic conversion is a denial of service. 1786 bytes is about 4300 digits.
    if b.len() > 1786 {
        return write!(f, "<int of {} bits>", b.len() * 8);
    }
    let negative = b.last().is_some_and(|&top| top >= 0x80);
    // Magnitude as big-endian bytes: two's complement negation if negative.
    let mut mag: Vec<u8> = b.iter().rev().copied().collect();
    if negative {
        mag.iter_mut().for_each(|d| *d = !*d);
        for d in mag.iter_mut().rev() {
            let (sum, carry) = d.overflowing_add(1);
            *d = sum;
            if !carry {
                break;
            }
        }
    }
    // Groups of 9 decimal digits, least significant first.
    let mut groups = Vec::new();
    while mag.iter().any(|&d| d != 0) {
        let mut rem: u64 = 0;
        for d in mag.iter_mut() {
            let cur = (rem << 8) | u64::from(*d);
            *d = u8::try_from(cur / 1_000_000_000).unwrap_or(u8::MAX);
            rem = cur % 1_000_000_000;
        }
        groups.push(rem);
    }
    if negative {
        f.write_char('-')?;
    }
    match groups.split_last() {
        None => f.write_char('0'),
        Some((most, rest)) => {
            write!(f, "{most}")?;
            rest.iter().rev().try_for_each(|g| write!(f, "{g:09}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::{Construct, Object};
    use std::sync::Arc;

    fn r(v: &Value) -> String {
        v.to_string()
    }

    #[test]
    fn floats_like_python() {
        let cases = [
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-0.0, "-0.0"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (2.25, "2.25"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (1.0 / 3.0, "0.3333333333333333"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (-12.5, "-12.5"),
        ];
        for (x, want) in cases {
            assert_eq!(r(&Value::Float(x)), want, "{x:e}");
        }
    }

    #[test]
    fn scalars_and_strings() {
        assert_eq!(r(&Value::None), "None");
        assert_eq!(r(&Value::Bool(true)), "True");
        assert_eq!(r(&Value::Int(-5)), "-5");
        assert_eq!(
            r(&Value::str("a\x7f\u{a0}\u{ad}\u{2028}é😀\0\"'\\\n")),
            r#"'a\x7f\xa0\xad\u2028é😀\x00"\'\\\n'"#
        );
        assert_eq!(r(&Value::str("it's")), r#""it's""#);
        assert_eq!(r(&Value::from(b"a\x7f\"'".to_vec())), r#"b'a\x7f"\''"#);
        assert_eq!(
            r(&Value::ByteArray(Arc::from(&b"ab\xff"[..]))),
            r"bytearray(b'ab\xff')"
        );
    }

    #[test]
    fn brief_stops_early_on_huge_and_shared_values() {
        // 2**40 leaves as a tree: a full repr would never finish.
        let dag = (0..40).fold(Value::list(vec![Value::from(1)]), |v, _| {
            Value::list(vec![v.clone(), v])
        });
        let short = dag.brief(50);
        assert!(short.len() <= 53 && short.ends_with("..."), "{short}");
        assert_eq!(Value::from("ok").brief(50), "'ok'");
        let huge = Value::BigInt(std::sync::Arc::from(vec![1u8; 1 << 20]));
        assert_eq!(huge.brief(100), "<int of 8388608 bits>");
    }

    #[test]
    fn big_ints() {
        // 2**70, -2**70, -2**100, 2**63, -(2**63) - 1
        let two70 = [0, 0, 0, 0, 0, 0, 0, 0, 0x40];
        let neg70 = [0, 0, 0, 0, 0, 0, 0, 0, 0xc0];
        let mut neg100 = vec![0u8; 12];
        neg100.push(0xf0);
        let cases: [(&[u8], &str); 5] = [
            (&two70, "1180591620717411303424"),
            (&neg70, "-1180591620717411303424"),
            (&neg100, "-1267650600228229401496703205376"),
            (&[0, 0, 0, 0, 0, 0, 0, 0x80, 0], "9223372036854775808"),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff],
                "-9223372036854775809",
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(r(&Value::BigInt(Arc::from(bytes))), want);
        }
    }

    #[test]
    fn containers_and_objects() {
        let one = Value::Int(1);
        assert_eq!(r(&Value::tuple(vec![])), "()");
        assert_eq!(r(&Value::tuple(vec![one.clone()])), "(1,)");
        assert_eq!(
            r(&Value::list(vec![one.clone(), Value::str("x")])),
            "[1, 'x']"
        );
        assert_eq!(
            r(&Value::dict(vec![(Value::str("k"), one.clone())])),
            "{'k': 1}"
        );
        assert_eq!(r(&Value::Set(Arc::from(vec![]))), "set()");
        assert_eq!(
            r(&Value::Set(Arc::from(vec![one.clone(), Value::Int(2)]))),
            "{1, 2}"
        );
        assert_eq!(r(&Value::FrozenSet(Arc::from(vec![]))), "frozenset()");
        assert_eq!(
            r(&Value::FrozenSet(Arc::from(vec![Value::Int(3)]))),
            "frozenset({3})"
        );
        assert_eq!(r(&Value::global("queue", "Full")), "queue.Full");
        assert_eq!(
            r(&Value::exception("queue", "Full", vec![])),
            "queue.Full()"
        );
        assert_eq!(
            r(&Value::exception(
                "builtins",
                "KeyError",
                vec![Value::str("missing")]
            )),
            "builtins.KeyError('missing')"
        );
        let with_state = Value::Object(Arc::new(Object {
            construct: Construct::Reduce,
            callable: Value::global("builtins", "AttributeError"),
            args: Value::tuple(vec![Value::str("x")]),
            state: Some(Value::dict(vec![(Value::str("name"), Value::str("x"))])),
        }));
        assert_eq!(
            r(&with_state),
            "builtins.AttributeError('x').__setstate__({'name': 'x'})"
        );
    }
}
