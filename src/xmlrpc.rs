//! XML-RPC: the other serializer of Python's managers (`serializer='xmlrpclib'`).
//!
//! `BaseManager(address, authkey, serializer='xmlrpclib')` keeps the frames and the
//! handshake and replaces each pickle by `xmlrpc.client.dumps((obj,), None, None, None,
//! 1)` (`multiprocessing.connection._xml_dumps`): a `<params>` document holding one
//! value, with no XML declaration and no `<methodCall>` wrapper. Requests `(ident,
//! method, args, kwds)` and replies `(kind, result)` travel as arrays, and the receiver
//! takes `xmlrpc.client.loads(frame.decode('utf-8'))[0][0]`.
//!
//! # Format
//! ```text
//! <params>
//! <param>
//! <value><array><data>
//! <value><string>#RETURN</string></value>
//! <value><nil/></value></data></array></value>
//! </param>
//! </params>
//! ```
//!
//! The reader ([`decode`]) is not an XML parser: it reads the documents `xmlrpc.client`
//! writes and refuses the rest of XML with an error. There is no DTD (so no entity can be
//! declared, let alone expand), no entity but the five predefined ones and character
//! references, no processing instruction but a leading `<?xml ...?>` declaration, no
//! comment, CDATA section or attribute. It works in one forward pass with an explicit
//! stack (no recursion), every character looked at a bounded number of times, so its
//! time is linear in the document and its memory is a small multiple of it; nesting
//! is capped at [`MAX_DEPTH`] plus the request's own envelope. Within that subset it
//! gives what CPython's `Unmarshaller` gives, down to XML's line-end normalization
//! (a raw `\r` in text reads as `\n`, `&#13;` as `\r`).
//!
//! The writer ([`encode`]) is `xmlrpc.client.Marshaller` byte for byte (the same in
//! Python 3.8 to 3.13), including its quirks: only `&`, `<` and `>` are escaped, `<nil/>`
//! has no newline after it, and a value Python refuses to marshal is refused with
//! Python's message, so the server can answer `#UNSERIALIZABLE` where Python would.
//!
//! # Mapping to [`Value`]
//! | XML-RPC | `Value` | |
//! |---|---|---|
//! | `<int>`, `<i4>`, `<i8>` | `Int` | read in the `i64` range; written only in XML-RPC's 32-bit range (Python: `OverflowError`) |
//! | `<boolean>` | `Bool` | exactly `0` or `1`, as Python checks |
//! | `<string>`, bare text | `Str` | |
//! | `<double>` | `Float` | written as Python's `repr` |
//! | `<base64>` | `Bytes` | `ByteArray` is written as base64 too, as Python does |
//! | `<dateTime.iso8601>` | an `xmlrpc.client.DateTime` object | see below |
//! | `<array>` | `List` | `Tuple` is written as an array, as Python does |
//! | `<struct>` | `Dict` with `Str` keys | a repeated name keeps its first place and its last value, like a Python dict |
//! | `<nil/>` | `None` | managers marshal with `allow_none` |
//!
//! A `<dateTime.iso8601>` becomes what Python's own xmlrpclib server holds for it (managers
//! call `loads` without `use_datetime`): an `xmlrpc.client.DateTime` instance whose
//! `value` is the text, stripped. Kept as that object (`NEWOBJ` with state
//! `{'value': text}`, exactly the pickle Python writes for one), it goes back to an XML
//! client as the same `<dateTime.iso8601>` text and to a pickle client as the same
//! `DateTime` object; a `str` would lose the type and a `datetime` would lose text that
//! is not a valid date, which Python keeps.
//!
//! A pickle client's `datetime.datetime` is written as Python writes one, a
//! `<dateTime.iso8601>` of its naive part to the second. Other objects (class instances)
//! are written the way Python's marshaller writes an instance, as a struct of its
//! attributes: the pickled state when it is a dict, nothing when a `NEWOBJ` instance has
//! none. Any other object pickled without a state dict (built by `__reduce__` from
//! arguments: `date`, `Decimal`, ...) is refused, as Python refuses most of them, rather
//! than sent as an empty struct that would silently drop its value.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use crate::frame;
use crate::pickle::{Construct, Fragment, Object, MAX_DEPTH};
use crate::protocol::{Arg, Reply, Request};
use crate::{Error, Result, Value};

/// How many containers a document may nest around a [`MAX_DEPTH`]-deep item: a request
/// tuple, its argument list and `put_many`'s list of items; a reply needs two (its
/// `(kind, result)` pair and `get_many`'s list).
const ENVELOPE_DEPTH: usize = 3;

/// The most containers a document read or written may nest.
const DEPTH_LIMIT: usize = MAX_DEPTH + ENVELOPE_DEPTH;

/// Whether a frame is an XML-RPC document rather than a pickle: Python's `_xml_dumps`
/// output starts with `<params>`, a document with a declaration with `<?xml`, and a
/// manager's pickle with the PROTO opcode (`0x80`).
pub(crate) fn is_document(frame: &[u8]) -> bool {
    frame.starts_with(b"<params>") || frame.starts_with(b"<?xml")
}

/// Reads the one value of a `<params>` document, as Python's `_xml_loads` does.
///
/// # Errors
/// [`Error::Protocol`] naming the problem and its byte offset: bytes that are not UTF-8,
/// XML outside the subset described in the module docs, anything but exactly one
/// `<param>`, a malformed number, boolean or base64, an int beyond 64 bits, or nesting
/// deeper than the limit.
///
/// # Example
/// ```
/// use distq::{xmlrpc, Value};
/// let doc = b"<params>\n<param>\n<value><int>7</int></value>\n</param>\n</params>\n";
/// assert_eq!(xmlrpc::decode(doc)?, Value::from(7));
/// # Ok::<(), distq::Error>(())
/// ```
pub fn decode(doc: &[u8]) -> Result<Value> {
    let doc = std::str::from_utf8(doc)
        .map_err(|e| Error::protocol(format!("XML-RPC: the document is not UTF-8 ({e})")))?;
    let mut r = Reader {
        doc,
        pos: 0,
        pending_end: None,
    };
    r.declaration()?;
    r.expect_start("params")?;
    r.expect_start("param")?;
    r.expect_start("value")?;
    let value = r.value()?;
    r.expect_end("param")?;
    r.expect_end("params")?;
    match r.tag()? {
        Token::Eof => Ok(value),
        other => Err(r.unexpected(&other, "the end of the document after </params>")),
    }
}

/// Appends `xmlrpc.client.dumps((value,), None, None, None, 1)` to `out`, as long as the
/// whole stays within `limit` bytes.
///
/// The limit exists because XML can be much larger than the value it comes from: a
/// shared string or list is written once per reference (XML-RPC has no references).
///
/// # Errors
/// [`Error::Value`] for what Python's marshaller refuses, with its exception and message
/// (`OverflowError: int exceeds XML-RPC limits`, `TypeError: cannot marshal <class 'set'>
/// objects`, `TypeError: dictionary key must be string`), for nesting beyond the limit,
/// and when the output would pass `limit`. `out` may then hold a partial document.
///
/// # Example
/// ```
/// use distq::{xmlrpc, Value};
/// let mut out = Vec::new();
/// xmlrpc::encode(&Value::from("a<b"), &mut out, 1 << 20)?;
/// assert_eq!(out, b"<params>\n<param>\n<value><string>a&lt;b</string></value>\n</param>\n</params>\n");
/// # Ok::<(), distq::Error>(())
/// ```
pub fn encode(value: &Value, out: &mut Vec<u8>, limit: usize) -> Result<()> {
    let mut w = Writer { out, limit };
    w.put("<params>\n<param>\n")?;
    w.value(value)?;
    w.put("</param>\n</params>\n")
}

/// Reads a request document into the same [`Request`] a pickled one gives. Every argument
/// is a decoded value ([`Arg::Value`]); the dispatcher pickles the items among them when
/// it stores them, so pickle clients can read what XML clients put, and vice versa.
///
/// # Errors
/// As [`decode`], and [`Error::Protocol`] for anything but `[None|str, str, list, struct]`.
pub(crate) fn parse_request(doc: &[u8]) -> Result<Request> {
    let shape = || Error::protocol("a request must be a 4-tuple (ident, method, args, kwds)");
    let request = decode(doc)?;
    let Value::List(parts) = &request else {
        return Err(shape());
    };
    let [ident, method, Value::List(args), Value::Dict(kwds)] = &parts[..] else {
        return Err(shape());
    };
    let ident = match ident {
        Value::None => None,
        Value::Str(s) => Some(s.to_string()),
        _ => return Err(Error::protocol("request ident must be None or a str")),
    };
    let Value::Str(method) = method else {
        return Err(Error::protocol("request method name must be a str"));
    };
    Ok(Request {
        ident,
        method: method.to_string(),
        args: args.iter().cloned().map(Arg::Value).collect(),
        // A struct's names are always strs (the reader makes them so).
        kwargs: kwds
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap_or_default().to_string(),
                    Arg::Value(v.clone()),
                )
            })
            .collect(),
    })
}

/// Writes `reply` as Python's xmlrpclib server would send it, leaving room for the frame
/// header in front (see [`frame::finish_and_write`]).
///
/// An `#ERROR` carries `{}`: Python's marshaller writes an object it has no rule for as
/// the struct of its `__dict__`, and an exception's is empty (its message lives in
/// `args`, which is not in `__dict__`), so a Python client gets an empty dict where it
/// expects an exception and raises `TypeError: exceptions must derive from
/// BaseException`, as it does against Python's own server. Stored items are decoded
/// with the Rust decoder and written as XML.
///
/// # Errors
/// [`Error::Value`] as for [`encode`], and for a stored item the Rust decoder cannot
/// read (e.g. a cycle, which Python's marshaller refuses too); the caller sends
/// `#UNSERIALIZABLE` instead, as Python's server does.
pub(crate) fn encode_reply_frame(reply: &Reply, buf: &mut Vec<u8>, limit: usize) -> Result<()> {
    let item = |f: &Fragment| {
        f.decode()
            .map_err(|e| Error::Value(format!("TypeError: cannot marshal this item: {e}")))
    };
    let (kind, result) = match reply {
        Reply::Return(v) => ("#RETURN", v.clone()),
        Reply::Proxy(v) => ("#PROXY", v.clone()),
        Reply::Error(_) => ("#ERROR", Value::dict(Vec::new())),
        Reply::Traceback(text) => ("#TRACEBACK", Value::str(text)),
        Reply::Unserializable(text) => ("#UNSERIALIZABLE", Value::str(text)),
        Reply::Item(f) => ("#RETURN", item(f)?),
        Reply::Items(fs) => (
            "#RETURN",
            Value::list(fs.iter().map(item).collect::<Result<_>>()?),
        ),
        Reply::Lease(lease, f) => (
            "#RETURN",
            Value::tuple(vec![Value::Int(*lease as i64), item(f)?]),
        ),
    };
    buf.clear();
    buf.resize(frame::HEADER_RESERVE, 0);
    encode(&Value::tuple(vec![Value::str(kind), result]), buf, limit)
}

// ---------------------------------------------------------------------------------------
// Reading

/// A cursor over a document, yielding the few kinds of token the subset has.
struct Reader<'a> {
    doc: &'a str,
    pos: usize,
    /// The end tag an empty-element tag (`<nil/>`) implies, reported next.
    pending_end: Option<&'a str>,
}

#[derive(Debug)]
enum Token<'a> {
    Start(&'a str),
    End(&'a str),
    /// Raw character data, references not yet replaced.
    Text(&'a str),
    Eof,
}

/// What a `<value>` holds, as far as its first element tells.
enum Content {
    /// A complete value; its `</value>` has been read.
    Scalar(Value),
    /// A container whose start (`<array><data>` or `<struct>`) has been read.
    Open(Open),
}

/// A container being read.
enum Open {
    Array(Vec<Value>),
    Struct(Members),
}

/// A struct's members so far, with an index so that a repeated name (which Python's dict
/// collapses) costs a lookup, not a scan.
struct Members {
    pairs: Vec<(Value, Value)>,
    index: HashMap<Arc<str>, usize>,
    /// The name of the member whose value is being read.
    name: Arc<str>,
}

// By hand: `Arc<str>: Default` is newer than the crate's `rust-version`.
impl Default for Members {
    fn default() -> Members {
        Members {
            pairs: Vec::new(),
            index: HashMap::new(),
            name: Arc::from(""),
        }
    }
}

impl Open {
    fn push(&mut self, v: Value) {
        match self {
            Open::Array(items) => items.push(v),
            Open::Struct(m) => match m.index.entry(m.name.clone()) {
                Entry::Occupied(e) => m.pairs[*e.get()].1 = v,
                Entry::Vacant(e) => {
                    e.insert(m.pairs.len());
                    m.pairs.push((Value::Str(m.name.clone()), v));
                }
            },
        }
    }

    fn close(self) -> Value {
        match self {
            Open::Array(items) => Value::list(items),
            Open::Struct(m) => Value::dict(m.pairs),
        }
    }
}

fn is_space(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// A name as it may appear in an error message: bounded, because it is the peer's.
fn shown(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

impl<'a> Reader<'a> {
    fn fail(&self, what: impl std::fmt::Display) -> Error {
        Error::protocol(format!("XML-RPC: {what} at byte {}", self.pos))
    }

    fn unexpected(&self, got: &Token<'_>, wanted: &str) -> Error {
        let got = match got {
            Token::Start(name) => format!("<{}>", shown(name)),
            Token::End(name) => format!("</{}>", shown(name)),
            Token::Text(_) => "text".to_string(),
            Token::Eof => "the end of the document".to_string(),
        };
        self.fail(format!("expected {wanted}, found {got}"))
    }

    /// Skips a leading `<?xml ...?>` declaration. Its encoding, if it names one, does not
    /// matter: Python decodes the frame as UTF-8 before the parser sees it.
    fn declaration(&mut self) -> Result<()> {
        let rest = self.doc;
        let is_decl =
            rest.starts_with("<?xml") && rest[5..].starts_with([' ', '\t', '\n', '\r', '?']);
        if is_decl {
            match rest.find("?>") {
                Some(end) => self.pos = end + 2,
                None => return Err(self.fail("unterminated XML declaration")),
            }
        }
        Ok(())
    }

    /// The next token. Markup XML-RPC does not use is refused here, so nothing after
    /// this needs to know it exists.
    fn token(&mut self) -> Result<Token<'a>> {
        if let Some(name) = self.pending_end.take() {
            return Ok(Token::End(name));
        }
        let rest = &self.doc[self.pos..];
        if rest.is_empty() {
            return Ok(Token::Eof);
        }
        if !rest.starts_with('<') {
            let len = rest.find('<').unwrap_or(rest.len());
            self.pos += len;
            return Ok(Token::Text(&rest[..len]));
        }
        let (end, after) = match rest.as_bytes().get(1) {
            Some(b'!') => {
                let what = if rest.starts_with("<!DOCTYPE") {
                    "a DTD (<!DOCTYPE) is not accepted"
                } else if rest.starts_with("<!--") {
                    "comments are not part of XML-RPC"
                } else if rest.starts_with("<![CDATA[") {
                    "CDATA sections are not part of XML-RPC"
                } else {
                    "markup declarations are not accepted"
                };
                return Err(self.fail(what));
            }
            Some(b'?') => {
                return Err(self
                    .fail("processing instructions are not accepted (only a leading <?xml ...?>)"))
            }
            Some(b'/') => (true, &rest[2..]),
            _ => (false, &rest[1..]),
        };
        let name_len = after
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        if name.is_empty() {
            return Err(self.fail("malformed tag"));
        }
        let tail = &after[name_len..];
        let spaces = tail.len() - tail.trim_start_matches([' ', '\t', '\n', '\r']).len();
        let tail = &tail[spaces..];
        let (close_len, empty) = if tail.starts_with('>') {
            (1, false)
        } else if tail.starts_with("/>") && !end {
            (2, true)
        } else if tail.is_empty() {
            return Err(self.fail("unterminated tag"));
        } else {
            return Err(self.fail(format!(
                "tag <{}> has attributes or stray characters, which XML-RPC does not use",
                shown(name)
            )));
        };
        self.pos += rest.len() - tail.len() + close_len;
        if end {
            return Ok(Token::End(name));
        }
        if empty {
            self.pending_end = Some(name);
        }
        Ok(Token::Start(name))
    }

    /// The next token that is not whitespace between elements.
    fn tag(&mut self) -> Result<Token<'a>> {
        loop {
            match self.token()? {
                Token::Text(t) if is_space(t) => {}
                Token::Text(_) => return Err(self.fail("unexpected text between elements")),
                other => return Ok(other),
            }
        }
    }

    fn expect_start(&mut self, name: &str) -> Result<()> {
        match self.tag()? {
            Token::Start(n) if n == name => Ok(()),
            other => Err(self.unexpected(&other, &format!("<{name}>"))),
        }
    }

    fn expect_end(&mut self, name: &str) -> Result<()> {
        match self.tag()? {
            Token::End(n) if n == name => Ok(()),
            other => Err(self.unexpected(&other, &format!("</{name}>"))),
        }
    }

    /// The raw text of an element whose start tag was just read, through its end tag.
    fn content(&mut self, name: &str) -> Result<&'a str> {
        let (raw, next) = match self.token()? {
            Token::Text(raw) => (raw, self.token()?),
            other => ("", other),
        };
        match next {
            Token::End(n) if n == name => Ok(raw),
            other => Err(self.unexpected(&other, &format!("text and </{name}>"))),
        }
    }

    /// Reads the value whose `<value>` start tag was just read, through its end tag.
    ///
    /// Containers are kept on an explicit stack, so depth costs heap, not thread stack.
    fn value(&mut self) -> Result<Value> {
        let mut open: Vec<Open> = Vec::new();
        loop {
            let mut done = match self.value_content()? {
                Content::Scalar(v) => v,
                Content::Open(mut c) => {
                    if open.len() >= DEPTH_LIMIT {
                        return Err(
                            self.fail(format!("containers nest deeper than {DEPTH_LIMIT} levels"))
                        );
                    }
                    if self.more(&mut c)? {
                        open.push(c);
                        continue;
                    }
                    c.close()
                }
            };
            // A finished value: give it to its container, and close every container it
            // completes, until one has another value to read.
            loop {
                let Some(mut top) = open.pop() else {
                    return Ok(done);
                };
                if let Open::Struct(_) = top {
                    self.expect_end("member")?;
                }
                top.push(done);
                if self.more(&mut top)? {
                    open.push(top);
                    break;
                }
                done = top.close();
            }
        }
    }

    /// After a container's start or one of its values: reads the start of its next
    /// value (`true`) or its end through `</value>` (`false`).
    fn more(&mut self, open: &mut Open) -> Result<bool> {
        match open {
            Open::Array(_) => match self.tag()? {
                Token::Start("value") => Ok(true),
                Token::End("data") => {
                    self.expect_end("array")?;
                    self.expect_end("value")?;
                    Ok(false)
                }
                other => Err(self.unexpected(&other, "<value> or </data>")),
            },
            Open::Struct(m) => match self.tag()? {
                Token::Start("member") => {
                    self.expect_start("name")?;
                    let raw = self.content("name")?;
                    m.name = Arc::from(self.text(raw)?);
                    self.expect_start("value")?;
                    Ok(true)
                }
                Token::End("struct") => {
                    self.expect_end("value")?;
                    Ok(false)
                }
                other => Err(self.unexpected(&other, "<member> or </struct>")),
            },
        }
    }

    /// What the `<value>` just opened holds. Bare text is a string, as in Python; text
    /// beside an element must be whitespace.
    fn value_content(&mut self) -> Result<Content> {
        let mut token = self.token()?;
        if let Token::Text(raw) = token {
            let next = self.token()?;
            if let Token::End("value") = next {
                return Ok(Content::Scalar(Value::from(self.text(raw)?)));
            }
            if !is_space(raw) {
                return Err(self.fail("text mixed with an element inside <value>"));
            }
            token = next;
        }
        let name = match token {
            Token::End("value") => return Ok(Content::Scalar(Value::str(""))),
            Token::Start(name) => name,
            other => return Err(self.unexpected(&other, "a value")),
        };
        let value = match name {
            "array" => {
                self.expect_start("data")?;
                return Ok(Content::Open(Open::Array(Vec::new())));
            }
            "struct" => return Ok(Content::Open(Open::Struct(Members::default()))),
            "nil" => {
                self.expect_end("nil")?;
                Value::None
            }
            _ => {
                let raw = self.content(name)?;
                self.scalar(name, raw)?
            }
        };
        self.expect_end("value")?;
        Ok(Content::Scalar(value))
    }

    /// The value of a scalar element, read as Python's `Unmarshaller` reads it.
    fn scalar(&self, name: &str, raw: &str) -> Result<Value> {
        let text = self.text(raw)?;
        Ok(match name {
            "string" => Value::from(text),
            "int" | "i4" | "i8" => {
                let digits = text.trim_matches([' ', '\t', '\n', '\r']);
                let valid = digits
                    .strip_prefix(['+', '-'])
                    .unwrap_or(digits)
                    .bytes()
                    .all(|b| b.is_ascii_digit());
                match digits.parse::<i64>() {
                    Ok(n) if valid => Value::Int(n),
                    _ if valid && digits.len() > 1 => {
                        return Err(self.fail("int beyond 64 bits (distq keeps XML-RPC ints in 64)"))
                    }
                    _ => return Err(self.fail(format!("invalid int {:?}", shown(&text)))),
                }
            }
            "boolean" => match text.as_str() {
                "0" => Value::Bool(false),
                "1" => Value::Bool(true),
                _ => return Err(self.fail("bad boolean value")),
            },
            "double" => match text.trim_matches([' ', '\t', '\n', '\r']).parse::<f64>() {
                Ok(x) => Value::Float(x),
                Err(_) => return Err(self.fail(format!("invalid double {:?}", shown(&text)))),
            },
            "base64" => {
                Value::from(base64_decode(&text).ok_or_else(|| self.fail("invalid base64"))?)
            }
            "dateTime.iso8601" => date_time(text.trim()),
            other => return Err(self.fail(format!("unknown tag <{}> in a value", shown(other)))),
        })
    }

    /// The character data `raw` stands for: references replaced, line ends normalized as
    /// XML prescribes (`\r\n` and a lone `\r` read as `\n`), and characters XML forbids
    /// refused, as expat refuses them.
    fn text(&self, raw: &str) -> Result<String> {
        if raw.contains("]]>") {
            return Err(self.fail("']]>' in text"));
        }
        let mut out = String::with_capacity(raw.len());
        let bytes = raw.as_bytes();
        let mut i = 0;
        while let Some(c) = raw[i..].chars().next() {
            i += c.len_utf8();
            match c {
                '&' => {
                    // The longest reference XML-RPC text needs is `&#x10FFFF;`; looking
                    // no further keeps a run of bare `&`s linear.
                    let semi = bytes[i..]
                        .iter()
                        .take(10)
                        .position(|&b| b == b';')
                        .ok_or_else(|| self.fail("'&' that starts no reference"))?;
                    out.push(self.reference(&raw[i..i + semi])?);
                    i += semi + 1;
                }
                '\r' => {
                    out.push('\n');
                    if bytes.get(i) == Some(&b'\n') {
                        i += 1;
                    }
                }
                c if xml_char(c) => out.push(c),
                c => {
                    return Err(self.fail(format!(
                        "character U+{:04X} is not allowed in XML",
                        u32::from(c)
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The character a reference (between `&` and `;`) names.
    fn reference(&self, name: &str) -> Result<char> {
        let code = match name {
            "lt" => return Ok('<'),
            "gt" => return Ok('>'),
            "amp" => return Ok('&'),
            "quot" => return Ok('"'),
            "apos" => return Ok('\''),
            _ => match name.strip_prefix('#') {
                Some(hex) if hex.starts_with('x') => u32::from_str_radix(&hex[1..], 16).ok(),
                Some(dec) => dec.parse::<u32>().ok(),
                None => {
                    return Err(self.fail(format!(
                        "entity &{};: only the five predefined entities and character references are accepted",
                        shown(name)
                    )))
                }
            },
        };
        code.and_then(char::from_u32)
            .filter(|&c| xml_char(c))
            .ok_or_else(|| self.fail(format!("bad character reference &{};", shown(name))))
    }
}

/// XML 1.0's `Char` production (Rust's `char` already excludes surrogates).
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// An `xmlrpc.client.DateTime` with `text` as its `value`, as Python pickles one.
fn date_time(text: &str) -> Value {
    Value::Object(Arc::new(Object {
        construct: Construct::NewObj,
        callable: Value::global("xmlrpc.client", "DateTime"),
        args: Value::tuple(Vec::new()),
        state: Some(Value::dict(vec![(Value::str("value"), Value::str(text))])),
    }))
}

/// The `<dateTime.iso8601>` text Python's marshaller writes for `o`, if `o` is an
/// `xmlrpc.client.DateTime` (see [`date_time`]: its `value`, as it is) or a
/// `datetime.datetime` (its naive part to the second, read from the state it pickles as,
/// `(10 bytes[, tzinfo])`: year as two bytes, the month byte carrying `fold` in its top
/// bit, then day, hour, minute and second).
fn date_time_text(o: &Object) -> Option<Cow<'_, str>> {
    let Value::Global(g) = &o.callable else {
        return None;
    };
    match (g.module.as_str(), g.name.as_str(), &o.state) {
        ("xmlrpc.client", "DateTime", Some(Value::Dict(pairs))) => match &pairs[..] {
            [(Value::Str(k), Value::Str(v))] if &**k == "value" => Some(Cow::Borrowed(v)),
            _ => None,
        },
        ("datetime", "datetime", None) if o.construct == Construct::Reduce => {
            let Some([Value::Bytes(b), ..]) = o.args.as_tuple() else {
                return None;
            };
            let &[y1, y0, month, day, hour, minute, second, _, _, _] = &b[..] else {
                return None;
            };
            Some(Cow::Owned(format!(
                "{:04}{:02}{:02}T{:02}:{:02}:{:02}",
                u16::from_be_bytes([y1, y0]),
                month & 0x7f,
                day,
                hour,
                minute,
                second
            )))
        }
        _ => None,
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 as `base64.encodebytes` writes it: whitespace anywhere is ignored,
/// padding is required, nothing but whitespace may follow it. (Python also skips other
/// stray characters; `xmlrpc.client` never writes any.)
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut n, mut pad) = (0u32, 0usize, 0usize);
    for b in text.bytes() {
        let sextet = match b {
            b' ' | b'\t' | b'\n' | b'\r' => continue,
            b'=' if n % 4 >= 2 || pad > 0 => {
                pad += 1;
                continue;
            }
            _ if pad > 0 => return None,
            _ => BASE64.iter().position(|&c| c == b)? as u32,
        };
        acc = acc << 6 | sextet;
        n += 1;
        if n % 4 == 0 {
            out.extend_from_slice(&acc.to_be_bytes()[1..]);
            acc = 0;
        }
    }
    match (n % 4, pad) {
        (0, 0) => {}
        (2, 2) => out.push((acc >> 4) as u8),
        (3, 1) => out.extend_from_slice(&((acc >> 2) as u16).to_be_bytes()),
        _ => return None,
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// Writing

/// `out` with a size limit every write is checked against.
struct Writer<'o> {
    out: &'o mut Vec<u8>,
    limit: usize,
}

/// A container being written: what is left of it.
enum Level<'v> {
    Array(std::slice::Iter<'v, Value>),
    /// Members left, and whether a member's value has just been written (so its
    /// `</member>` is due).
    Struct(std::slice::Iter<'v, (Value, Value)>, bool),
}

fn cannot(what: &str) -> Error {
    Error::Value(format!("TypeError: cannot marshal {what} objects"))
}

impl Writer<'_> {
    fn put(&mut self, s: &str) -> Result<()> {
        self.put_bytes(s.as_bytes())
    }

    fn put_bytes(&mut self, s: &[u8]) -> Result<()> {
        if self.out.len() + s.len() > self.limit {
            return Err(Error::Value(format!(
                "MemoryError: the reply would exceed {} bytes as XML-RPC",
                self.limit
            )));
        }
        self.out.extend_from_slice(s);
        Ok(())
    }

    /// `xmlrpc.client.escape`: `&`, `<` and `>` only.
    fn escaped(&mut self, s: &str) -> Result<()> {
        let mut rest = s;
        while let Some(i) = rest.find(['&', '<', '>']) {
            self.put(&rest[..i])?;
            self.put(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                _ => "&gt;",
            })?;
            rest = &rest[i + 1..];
        }
        self.put(rest)
    }

    /// Writes `v` as `Marshaller.__dump` does. Containers go on an explicit stack, so
    /// depth costs heap, not thread stack.
    fn value(&mut self, v: &Value) -> Result<()> {
        let mut open: Vec<Level<'_>> = Vec::new();
        let mut next = Some(v);
        loop {
            if let Some(v) = next.take() {
                if let Some(level) = self.start(v)? {
                    if open.len() >= DEPTH_LIMIT {
                        return Err(Error::Value(format!(
                            "ValueError: the value nests containers deeper than {DEPTH_LIMIT} levels"
                        )));
                    }
                    open.push(level);
                }
            }
            let Some(top) = open.last_mut() else {
                return Ok(());
            };
            match top {
                Level::Array(items) => match items.next() {
                    Some(v) => next = Some(v),
                    None => {
                        open.pop();
                        self.put("</data></array></value>\n")?;
                    }
                },
                Level::Struct(pairs, in_member) => {
                    if *in_member {
                        self.put("</member>\n")?;
                    }
                    match pairs.next() {
                        Some((Value::Str(name), v)) => {
                            *in_member = true;
                            self.put("<member>\n<name>")?;
                            self.escaped(name)?;
                            self.put("</name>\n")?;
                            next = Some(v);
                        }
                        Some(_) => {
                            return Err(Error::Value(
                                "TypeError: dictionary key must be string".into(),
                            ))
                        }
                        None => {
                            open.pop();
                            self.put("</struct></value>\n")?;
                        }
                    }
                }
            }
        }
    }

    /// Writes a scalar whole, or a container's start tags and returns what is left of it.
    fn start<'v>(&mut self, v: &'v Value) -> Result<Option<Level<'v>>> {
        let struct_of = |pairs: &'v [(Value, Value)]| Some(Level::Struct(pairs.iter(), false));
        let level = match v {
            Value::Tuple(items) | Value::List(items) => {
                self.put("<value><array><data>\n")?;
                return Ok(Some(Level::Array(items.iter())));
            }
            Value::Dict(pairs) => struct_of(pairs),
            Value::Object(o) => match (date_time_text(o), &o.state) {
                (Some(text), _) => {
                    // `DateTime.encode` writes its value unescaped.
                    self.put("<value><dateTime.iso8601>")?;
                    self.put(&text)?;
                    return self.put("</dateTime.iso8601></value>\n").map(|()| None);
                }
                (None, Some(Value::Dict(pairs))) => struct_of(pairs),
                (None, None) if o.construct == Construct::NewObj => struct_of(&[]),
                _ => return Err(cannot(&format!("<class '{}'>", object_class(o)))),
            },
            Value::None => return self.put("<value><nil/></value>").map(|()| None),
            Value::Bool(b) => {
                self.put(if *b {
                    "<value><boolean>1</boolean></value>\n"
                } else {
                    "<value><boolean>0</boolean></value>\n"
                })?;
                return Ok(None);
            }
            Value::Int(n) => match i32::try_from(*n) {
                Ok(n) => {
                    return self
                        .put(&format!("<value><int>{n}</int></value>\n"))
                        .map(|()| None)
                }
                Err(_) => return Err(overflow()),
            },
            Value::BigInt(_) => return Err(overflow()),
            Value::Float(x) => {
                let repr = Value::Float(*x).to_string();
                return self
                    .put(&format!("<value><double>{repr}</double></value>\n"))
                    .map(|()| None);
            }
            Value::Str(s) => {
                self.put("<value><string>")?;
                self.escaped(s)?;
                return self.put("</string></value>\n").map(|()| None);
            }
            Value::Bytes(b) | Value::ByteArray(b) => {
                self.put("<value><base64>\n")?;
                self.base64(b)?;
                return self.put("</base64></value>\n").map(|()| None);
            }
            Value::Set(_) => return Err(cannot("<class 'set'>")),
            Value::FrozenSet(_) => return Err(cannot("<class 'frozenset'>")),
            Value::Global(g) => {
                return Err(Error::Value(format!(
                    "TypeError: cannot marshal the class or function {}.{}",
                    g.module, g.name
                )))
            }
        };
        self.put("<value><struct>\n")?;
        Ok(level)
    }

    /// `base64.encodebytes`: lines of 76 characters (57 bytes), each ending in `\n`.
    fn base64(&mut self, bytes: &[u8]) -> Result<()> {
        let mut line = [0u8; 77];
        for chunk in bytes.chunks(57) {
            let mut len = 0;
            for group in chunk.chunks(3) {
                let mut b = [0u8; 3];
                b[..group.len()].copy_from_slice(group);
                let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
                for k in 0..4 {
                    line[len + k] = if k <= group.len() {
                        BASE64[(n >> (18 - 6 * k) & 63) as usize]
                    } else {
                        b'='
                    };
                }
                len += 4;
            }
            line[len] = b'\n';
            self.put_bytes(&line[..=len])?;
        }
        Ok(())
    }
}

fn overflow() -> Error {
    Error::Value("OverflowError: int exceeds XML-RPC limits".into())
}

/// `module.name` of the class that built `o`, as far as the pickle names it.
fn object_class(o: &Object) -> String {
    match &o.callable {
        Value::Global(g) => format!("{}.{}", g.module, g.name),
        _ => "object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 24;

    fn xml(v: &Value) -> String {
        let mut out = Vec::new();
        encode(v, &mut out, LIMIT).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The body Python's `dumps((v,), None, None, None, 1)` wraps around one value.
    fn doc(value: &str) -> String {
        format!("<params>\n<param>\n{value}</param>\n</params>\n")
    }

    fn refused(doc: &[u8]) -> String {
        match decode(doc) {
            Err(Error::Protocol(msg)) => msg,
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(doc)),
        }
    }

    #[test]
    fn writes_what_python_writes() {
        // Each expected string is Python 3.13's `xmlrpc.client.dumps((v,), None, None,
        // None, 1)` for the value on its left (3.8-3.12 write the same).
        let bytes: Vec<u8> = (0..60).collect();
        let cases = [
            (Value::None, "<value><nil/></value>"),
            (Value::Bool(true), "<value><boolean>1</boolean></value>\n"),
            (Value::Bool(false), "<value><boolean>0</boolean></value>\n"),
            (Value::Int(-(1 << 31)), "<value><int>-2147483648</int></value>\n"),
            (Value::Int((1 << 31) - 1), "<value><int>2147483647</int></value>\n"),
            (Value::Float(1e16), "<value><double>1e+16</double></value>\n"),
            (Value::Float(-0.0), "<value><double>-0.0</double></value>\n"),
            (Value::Float(f64::INFINITY), "<value><double>inf</double></value>\n"),
            (Value::Float(f64::NAN), "<value><double>nan</double></value>\n"),
            (Value::Float(0.1), "<value><double>0.1</double></value>\n"),
            (
                Value::str("a<&>\"'é\r"),
                "<value><string>a&lt;&amp;&gt;\"'é\r</string></value>\n",
            ),
            (Value::str(""), "<value><string></string></value>\n"),
            (Value::from(Vec::new()), "<value><base64>\n</base64></value>\n"),
            (Value::from(b"xy".to_vec()), "<value><base64>\neHk=\n</base64></value>\n"),
            (
                Value::from(bytes),
                "<value><base64>\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4\nOTo7\n</base64></value>\n",
            ),
            (
                Value::tuple(vec![Value::from(1), Value::str("s")]),
                "<value><array><data>\n<value><int>1</int></value>\n<value><string>s</string></value>\n</data></array></value>\n",
            ),
            (Value::list(vec![]), "<value><array><data>\n</data></array></value>\n"),
            (Value::dict(vec![]), "<value><struct>\n</struct></value>\n"),
            (
                Value::dict(vec![(
                    Value::str("k"),
                    Value::list(vec![
                        Value::from(1),
                        Value::dict(vec![(Value::str("n"), Value::None)]),
                    ]),
                )]),
                "<value><struct>\n<member>\n<name>k</name>\n<value><array><data>\n<value><int>1</int></value>\n<value><struct>\n<member>\n<name>n</name>\n<value><nil/></value></member>\n</struct></value>\n</data></array></value>\n</member>\n</struct></value>\n",
            ),
            (
                date_time("20240102T03:04:05"),
                "<value><dateTime.iso8601>20240102T03:04:05</dateTime.iso8601></value>\n",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(xml(&v), doc(want), "{v:?}");
        }
    }

    #[test]
    fn reads_back_what_it_writes() {
        let nested = Value::dict(vec![
            (Value::str("name & <tag>"), Value::str("naïve ☃ 𝄞")),
            (
                Value::str("items"),
                Value::list(vec![
                    Value::Int(-5),
                    Value::Float(2.5),
                    Value::Bool(true),
                    Value::None,
                    Value::from(vec![0u8, 255, 10]),
                    Value::list(vec![]),
                    Value::dict(vec![]),
                    date_time("20240102T03:04:05"),
                ]),
            ),
        ]);
        for v in [Value::from(7), Value::str("plain"), nested] {
            assert_eq!(decode(xml(&v).as_bytes()).unwrap(), v);
        }
        // Tuples come back as lists, bytearrays as bytes, as from Python's loads.
        let t = Value::tuple(vec![Value::ByteArray(Arc::from(&b"ab"[..]))]);
        assert_eq!(
            decode(xml(&t).as_bytes()).unwrap(),
            Value::list(vec![Value::from(b"ab".to_vec())])
        );
    }

    #[test]
    fn reads_what_python_reads() {
        let one = |value: &str| decode(doc(value).as_bytes()).unwrap();
        // Bare text is a string, whitespace and all; references and line ends are
        // resolved as expat resolves them.
        assert_eq!(
            one("<value>  bare &#13;\r\nx\ry </value>\n"),
            Value::str("  bare \r\nx\ny ")
        );
        assert_eq!(one("<value></value>"), Value::str(""));
        assert_eq!(one("<value/>"), Value::str(""));
        assert_eq!(one("<value><string/></value>"), Value::str(""));
        assert_eq!(
            one("<value>&lt;&gt;&amp;&quot;&apos;&#x263A;&#9731;</value>"),
            Value::str("<>&\"'☺☃")
        );
        assert_eq!(one("<value> <i4> 12 </i4> </value>"), Value::Int(12));
        assert_eq!(
            one("<value><i8>-9223372036854775808</i8></value>"),
            Value::Int(i64::MIN)
        );
        assert_eq!(one("<value><int>+5</int></value>"), Value::Int(5));
        assert_eq!(
            one("<value><double> 1e400 </double></value>"),
            Value::Float(f64::INFINITY)
        );
        assert_eq!(one("<value><nil></nil></value>"), Value::None);
        assert_eq!(
            one("<value><base64>e Hk\n=</base64></value>"),
            Value::from(b"xy".to_vec())
        );
        assert_eq!(
            one("<value><dateTime.iso8601> 2024 </dateTime.iso8601></value>"),
            date_time("2024")
        );
        assert_eq!(
            one("<value><array><data/></array></value>"),
            Value::list(vec![])
        );
        // A repeated name keeps its first place and its last value.
        assert_eq!(
            one("<value><struct><member><name>a</name><value>1</value></member><member><name>b</name><value>2</value></member><member><name>a</name><value>3</value></member></struct></value>"),
            Value::dict(vec![(Value::str("a"), Value::str("3")), (Value::str("b"), Value::str("2"))])
        );
        // A declaration is allowed, with any encoding: the frame is UTF-8 regardless.
        let with_decl = format!(
            "<?xml version='1.0'?>\n{}",
            doc("<value><int>1</int></value>\n")
        );
        assert_eq!(decode(with_decl.as_bytes()).unwrap(), Value::Int(1));
    }

    #[test]
    fn hostile_documents_are_refused_cleanly() {
        let value = |v: &str| doc(v).into_bytes();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"<?xml version='1.0'?><!DOCTYPE lol [<!ENTITY a 'aaaa'>]><params/>".to_vec(),
                "DTD",
            ),
            (
                b"<!DOCTYPE params SYSTEM 'file:///etc/passwd'><params/>".to_vec(),
                "DTD",
            ),
            (value("<value>&a;</value>"), "entity"),
            (value("<value>&ent;</value>"), "entity"),
            (value("<value>&#0;</value>"), "reference"),
            (value("<value>&#xD800;</value>"), "reference"),
            (value("<value>&#x110000;</value>"), "reference"),
            (value("<value>&#99999999999999;</value>"), "reference"),
            (value("<value>a & b</value>"), "'&'"),
            (value("<value>\u{1}</value>"), "not allowed"),
            (value("<value>]]></value>"), "]]>"),
            (value("<!-- hi --><value>1</value>"), "comments"),
            (value("<value><![CDATA[x]]></value>"), "CDATA"),
            (value("<?php x?><value>1</value>"), "processing"),
            (value("<value type='int'>1</value>"), "attributes"),
            (value("<value><int>1</int>x</value>"), "unexpected text"),
            (value("<value>x<int>1</int></value>"), "mixed"),
            (
                value("<value><int>99999999999999999999999</int></value>"),
                "64 bits",
            ),
            (value("<value><int>1.5</int></value>"), "invalid int"),
            (value("<value><int></int></value>"), "invalid int"),
            (value("<value><int>-</int></value>"), "invalid int"),
            (value("<value><double>x</double></value>"), "invalid double"),
            (value("<value><boolean>true</boolean></value>"), "boolean"),
            (value("<value><base64>eHk</base64></value>"), "base64"),
            (value("<value><base64>e*Hk=</base64></value>"), "base64"),
            (value("<value><base64>eHk=eHk=</base64></value>"), "base64"),
            (
                value("<value><bigdecimal>1</bigdecimal></value>"),
                "unknown tag",
            ),
            (
                value("<value><int><i4>1</i4></int></value>"),
                "expected text",
            ),
            (
                value("<value><array><value>1</value></array></value>"),
                "expected <data>",
            ),
            (
                value("<value><struct><value>1</value></struct></value>"),
                "<member>",
            ),
            (value("<value>1</value><value>2</value>"), "</param>"),
            (b"<params></params>".to_vec(), "<param>"),
            (
                b"<params><param><value>1</value></param></params>junk".to_vec(),
                "unexpected text",
            ),
            (
                b"<params><param><value>1</value></param></params><params>".to_vec(),
                "end of the document",
            ),
            (b"<methodCall><params/></methodCall>".to_vec(), "<params>"),
            (b"<params\x80>".to_vec(), "not UTF-8"),
            (b"<params/>".to_vec(), "<param>"),
            (b"<?xml version='1.0'".to_vec(), "unterminated"),
            (b"".to_vec(), "<params>"),
        ];
        for (bytes, want) in cases {
            let msg = refused(&bytes);
            assert!(
                msg.contains(want),
                "{:?}: {msg}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let v = Value::dict(vec![
            (
                Value::str("k"),
                Value::list(vec![Value::from(1), Value::str("a&b"), Value::None]),
            ),
            (Value::str("d"), date_time("x")),
            (Value::str("b"), Value::from(b"bytes".to_vec())),
        ]);
        let whole = xml(&v);
        assert_eq!(decode(whole.as_bytes()).unwrap(), v);
        // Cut anywhere but inside the final whitespace, the document is incomplete.
        let end = whole.trim_end().len();
        for cut in 0..end {
            assert!(decode(&whole.as_bytes()[..cut]).is_err(), "{cut}");
        }
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let nest = |n: usize| {
            format!(
                "{}{}",
                "<value><array><data>".repeat(n),
                "</data></array></value>".repeat(n)
            )
        };
        assert!(decode(doc(&nest(DEPTH_LIMIT)).as_bytes()).is_ok());
        let msg = refused(doc(&nest(DEPTH_LIMIT + 1)).as_bytes());
        assert!(msg.contains("deeper"), "{msg}");
        // Far past the limit, and unterminated: refused at the limit, not at the end.
        let deep = doc(&"<value><struct><member><name>k</name>".repeat(10_000));
        assert!(refused(deep.as_bytes()).contains("deeper"));

        let mut v = Value::None;
        for _ in 0..DEPTH_LIMIT {
            v = Value::list(vec![v]);
        }
        assert!(encode(&v, &mut Vec::new(), LIMIT).is_ok());
        let err = encode(&Value::list(vec![v]), &mut Vec::new(), LIMIT).unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
    }

    #[test]
    fn work_is_linear_in_the_input() {
        // Many bare '&'s, many members with one name, a long flat array: each would be
        // quadratic with a naive reader. Together they finish at once.
        let ampersands = doc(&format!("<value>{}</value>", "&amp".repeat(200_000)));
        assert!(refused(ampersands.as_bytes()).contains("'&'"));
        let member = "<member><name>k</name><value><int>1</int></value></member>";
        let repeated = doc(&format!(
            "<value><struct>{}</struct></value>",
            member.repeat(200_000)
        ));
        assert_eq!(
            decode(repeated.as_bytes()).unwrap(),
            Value::dict(vec![(Value::str("k"), Value::Int(1))])
        );
        let flat = doc(&format!(
            "<value><array><data>{}</data></array></value>",
            "<value><i4>1</i4></value>".repeat(200_000)
        ));
        let Value::List(items) = decode(flat.as_bytes()).unwrap() else {
            panic!("not a list")
        };
        assert_eq!(items.len(), 200_000);
    }

    #[test]
    fn values_python_cannot_marshal_are_refused_with_its_message() {
        let instance = |construct, state| {
            Value::Object(Arc::new(Object {
                construct,
                callable: Value::global("m", "C"),
                args: Value::tuple(vec![]),
                state,
            }))
        };
        let cases = [
            (
                Value::Int(1 << 31),
                "OverflowError: int exceeds XML-RPC limits",
            ),
            (
                Value::BigInt(Arc::from(&[0u8, 0, 0, 0, 0, 0, 0, 0, 1][..])),
                "OverflowError",
            ),
            (
                Value::Set(Arc::from(vec![])),
                "cannot marshal <class 'set'> objects",
            ),
            (Value::FrozenSet(Arc::from(vec![])), "<class 'frozenset'>"),
            (
                Value::dict(vec![(Value::from(1), Value::None)]),
                "TypeError: dictionary key must be string",
            ),
            (Value::global("m", "f"), "class or function m.f"),
            (
                instance(Construct::Reduce, None),
                "cannot marshal <class 'm.C'> objects",
            ),
            (
                instance(Construct::NewObj, Some(Value::tuple(vec![]))),
                "<class 'm.C'>",
            ),
        ];
        for (v, want) in cases {
            let err = encode(&v, &mut Vec::new(), LIMIT).unwrap_err();
            assert!(
                matches!(&err, Error::Value(m) if m.contains(want)),
                "{v:?}: {err}"
            );
        }
        // datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=...) with fold=1, as pickled:
        // Python writes the naive part to the second.
        let dt = Value::Object(Arc::new(Object {
            construct: Construct::Reduce,
            callable: Value::global("datetime", "datetime"),
            args: Value::tuple(vec![
                Value::from(vec![7, 232, 0x81, 2, 3, 4, 5, 0, 0, 6]),
                Value::None,
            ]),
            state: None,
        }));
        assert_eq!(xml(&dt), xml(&date_time("20240102T03:04:05")));
        // Instances go as the struct of their attributes, as Python's marshaller sends
        // an instance's __dict__.
        let attrs = Value::dict(vec![(Value::str("a"), Value::from(1))]);
        assert_eq!(
            xml(&instance(Construct::Reduce, Some(attrs.clone()))),
            xml(&attrs)
        );
        assert_eq!(
            xml(&instance(Construct::NewObj, None)),
            xml(&Value::dict(vec![]))
        );
    }

    #[test]
    fn output_is_bounded() {
        // A string shared a thousand times is written a thousand times: the limit stops it.
        let s = Value::str(&"x".repeat(1 << 16));
        let shared = Value::list(vec![s; 1000]);
        let mut out = Vec::new();
        let err = encode(&shared, &mut out, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("exceed"), "{err}");
        assert!(out.len() <= 1 << 20);
    }

    #[test]
    fn requests_and_replies() {
        let request = doc("<value><array><data>\n<value><string>7f</string></value>\n<value><string>get</string></value>\n<value><array><data>\n<value><boolean>1</boolean></value>\n</data></array></value>\n<value><struct>\n<member>\n<name>timeout</name>\n<value><double>0.1</double></value>\n</member>\n</struct></value>\n</data></array></value>\n");
        let req = parse_request(request.as_bytes()).unwrap();
        assert_eq!(req.ident.as_deref(), Some("7f"));
        assert_eq!(req.method, "get");
        assert_eq!(req.args, [Arg::Value(Value::Bool(true))]);
        assert_eq!(
            req.kwargs,
            [("timeout".to_string(), Arg::Value(Value::Float(0.1)))]
        );
        let public = doc("<value><array><data>\n<value><nil/></value><value><string>dummy</string></value>\n<value><array><data>\n</data></array></value>\n<value><struct>\n</struct></value>\n</data></array></value>\n");
        assert_eq!(
            parse_request(public.as_bytes()).unwrap(),
            Request::new(None, "dummy", vec![])
        );
        for bad in ["<value><int>1</int></value>\n", "<value><array><data>\n<value><int>1</int></value>\n<value><string>m</string></value>\n<value><array><data>\n</data></array></value>\n<value><struct>\n</struct></value>\n</data></array></value>\n"] {
            assert!(matches!(parse_request(doc(bad).as_bytes()), Err(Error::Protocol(_))), "{bad}");
        }

        let reply = |r: &Reply| {
            let mut buf = Vec::new();
            encode_reply_frame(r, &mut buf, LIMIT)
                .map(|()| String::from_utf8(buf[frame::HEADER_RESERVE..].to_vec()).unwrap())
        };
        // Bytes captured from Python 3.13's own xmlrpclib server.
        assert_eq!(
            reply(&Reply::Return(Value::None)).unwrap(),
            "<params>\n<param>\n<value><array><data>\n<value><string>#RETURN</string></value>\n<value><nil/></value></data></array></value>\n</param>\n</params>\n"
        );
        assert_eq!(
            reply(&Reply::Error(crate::protocol::exceptions::empty())).unwrap(),
            "<params>\n<param>\n<value><array><data>\n<value><string>#ERROR</string></value>\n<value><struct>\n</struct></value>\n</data></array></value>\n</param>\n</params>\n"
        );
        let item = Fragment::encode(&Value::str("a<&>é")).unwrap();
        assert_eq!(
            reply(&Reply::Item(item.clone())).unwrap(),
            "<params>\n<param>\n<value><array><data>\n<value><string>#RETURN</string></value>\n<value><string>a&lt;&amp;&gt;é</string></value>\n</data></array></value>\n</param>\n</params>\n"
        );
        assert_eq!(
            decode(
                reply(&Reply::Items(vec![item.clone(), item.clone()]))
                    .unwrap()
                    .as_bytes()
            )
            .unwrap(),
            Value::list(vec![
                Value::str("#RETURN"),
                Value::list(vec![Value::str("a<&>é"); 2])
            ])
        );
        // Lease ids are far above XML-RPC's 32-bit ints: Python would refuse them too.
        assert!(
            matches!(reply(&Reply::Lease(1 << 40, item)), Err(Error::Value(m)) if m.contains("OverflowError"))
        );
    }
}
