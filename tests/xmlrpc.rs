//! Clients of Python's `BaseManager(..., serializer='xmlrpclib')`: raw XML-RPC frames
//! against the server, real Python clients on every version found, the same script
//! against Python's own xmlrpclib server (which must give identical results), items
//! crossing between pickle and XML-RPC clients, and shutdown.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use distq::auth::{self, AuthKey, LegacyAuth};
use distq::{frame, xmlrpc, Manager, RunningServer, Value};

const CLIENT: &str = include_str!("python/xmlrpc_client.py");

/// An authenticated raw connection.
fn raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    auth::client_handshake(&mut s, &AuthKey::new(KEY), LegacyAuth::Allowed).unwrap();
    s
}

/// `xmlrpc.client.dumps((value,), None, None, None, 1)`, as `_xml_dumps` sends it.
fn document(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    xmlrpc::encode(value, &mut out, 1 << 20).unwrap();
    out
}

fn request(ident: Option<&str>, method: &str, args: Vec<Value>) -> Vec<u8> {
    document(&Value::list(vec![
        ident.map_or(Value::None, Value::str),
        Value::str(method),
        Value::list(args),
        Value::dict(vec![]),
    ]))
}

/// Sends one frame and reads the reply frame as bytes.
fn call(s: &mut TcpStream, frame_bytes: &[u8]) -> Vec<u8> {
    frame::write_frame(s, frame_bytes).unwrap();
    let mut reply = Vec::new();
    frame::read_frame(s, 1 << 20, &mut reply).unwrap();
    reply
}

/// The `(kind, result)` of a reply document.
fn reply(bytes: &[u8]) -> (String, Value) {
    match xmlrpc::decode(bytes).unwrap() {
        Value::List(pair) => match &pair[..] {
            [Value::Str(kind), result] => (kind.to_string(), result.clone()),
            other => panic!("not a reply: {other:?}"),
        },
        other => panic!("not a reply: {other:?}"),
    }
}

/// Waits for a server stopped by a client, failing if it does not stop.
fn joined_within(server: RunningServer, limit: Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(server.join()));
    match rx.recv_timeout(limit) {
        Ok(result) => result.expect("server stopped cleanly"),
        Err(_) => panic!("the server did not stop within {limit:?}"),
    }
}

/// The reply bytes are Python 3.13's own xmlrpclib server's, and the connection answers
/// in XML-RPC for good once its first request was XML-RPC.
#[test]
fn xml_replies_are_byte_for_byte_pythons() {
    let server = server();
    let mut s = raw(server.local_addr());
    // Captured from Python 3.13's Server with serializer='xmlrpclib'.
    assert_eq!(
        call(&mut s, &request(None, "dummy", vec![])),
        b"<params>\n<param>\n<value><array><data>\n<value><string>#RETURN</string></value>\n\
          <value><nil/></value></data></array></value>\n</param>\n</params>\n"
    );

    let mut s = raw(server.local_addr());
    let (kind, created) = reply(&call(
        &mut s,
        &request(None, "create", vec![Value::str("get_task_queue")]),
    ));
    assert_eq!(kind, "#RETURN");
    let ident = match &created {
        Value::List(pair) => pair[0].as_str().unwrap().to_string(),
        other => panic!("{other:?}"),
    };

    let mut s = raw(server.local_addr());
    let (kind, _) = reply(&call(
        &mut s,
        &request(None, "accept_connection", vec![Value::str("raw")]),
    ));
    assert_eq!(kind, "#RETURN");
    let put = request(Some(&ident), "put", vec![Value::str("a<&>é")]);
    let (kind, _) = reply(&call(&mut s, &put));
    assert_eq!(kind, "#RETURN");
    assert_eq!(
        call(&mut s, &request(Some(&ident), "get", vec![])),
        "<params>\n<param>\n<value><array><data>\n<value><string>#RETURN</string></value>\n\
         <value><string>a&lt;&amp;&gt;é</string></value>\n</data></array></value>\n</param>\n</params>\n"
            .as_bytes()
    );
    // Empty, as Python sends it: the exception's (empty) __dict__.
    let get_nowait = request(Some(&ident), "get_nowait", vec![]);
    assert_eq!(
        call(&mut s, &get_nowait),
        b"<params>\n<param>\n<value><array><data>\n<value><string>#ERROR</string></value>\n\
          <value><struct>\n</struct></value>\n</data></array></value>\n</param>\n</params>\n"
    );
    // A pickle on this channel is not switched to: it is a malformed XML-RPC request.
    let pickle = distq::pickle::encode(&Value::None).unwrap();
    let (kind, text) = reply(&call(&mut s, &pickle));
    assert_eq!(kind, "#TRACEBACK");
    assert!(text.as_str().unwrap().contains("ExpatError"), "{text}");
    server.shutdown().unwrap();
}

/// Hostile documents get a `#TRACEBACK` (in XML-RPC) and the channel goes on.
#[test]
fn hostile_xml_is_answered_and_the_channel_goes_on() {
    let server = server();
    let mut s = raw(server.local_addr());
    let (kind, _) = reply(&call(
        &mut s,
        &request(None, "accept_connection", vec![Value::str("raw")]),
    ));
    assert_eq!(kind, "#RETURN");
    let deep = format!(
        "<params><param>{}</param></params>",
        "<value><array><data>".repeat(100_000)
    );
    let laughs = "<?xml version='1.0'?><!DOCTYPE lol [<!ENTITY lol 'lol'>\
                  <!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>]>\
                  <params><param><value>&lol2;</value></param></params>";
    let cases: [(&[u8], &str); 6] = [
        (laughs.as_bytes(), "DTD"),
        (
            b"<params><param><value>&xxe;</value></param></params>",
            "entity",
        ),
        (deep.as_bytes(), "deeper"),
        (
            b"<params><param><value><int>123456789012345678901234567890</int>",
            "64 bits",
        ),
        (
            b"<params><param><value><array><data>",
            "end of the document",
        ),
        (b"<params>\xff", "UTF-8"),
    ];
    for (doc, want) in cases {
        let (kind, text) = reply(&call(&mut s, doc));
        assert_eq!(kind, "#TRACEBACK", "{want}");
        assert!(text.as_str().unwrap().contains(want), "{want}: {text}");
    }
    let (kind, _) = reply(&call(&mut s, &request(Some("nope"), "qsize", vec![])));
    assert_eq!(kind, "#TRACEBACK", "unknown ident");
    server.shutdown().unwrap();
}

fn check_lines() -> &'static [&'static str] {
    &[
        "round trip str 'non-ASCII é ☃ 𝄞' -> str 'non-ASCII é ☃ 𝄞'",
        "round trip str '<&> \"quotes\" \\'apos\\'' -> str '<&> \"quotes\" \\'apos\\''",
        "round trip str 'cr\\rlf\\r\\ncrlf\\n' -> str 'cr\\nlf\\ncrlf\\n'",
        "round trip float 1e+16 -> float 1e+16",
        "round trip float nan -> float nan",
        "round trip bool True -> bool True",
        "round trip NoneType None -> NoneType None",
        "round trip bytes b'bytes\\x00\\xff' -> Binary(b'bytes\\x00\\xff')",
        "round trip (int 1, int 2) -> [int 1, int 2]",
        "round trip {'k': int 1, 'nested': {'x': [int 1, {'y': NoneType None}]}} -> {'k': int 1, 'nested': {'x': [int 1, {'y': NoneType None}]}}",
        "round trip datetime datetime.datetime(2024, 1, 2, 3, 4, 5) -> DateTime('20240102T03:04:05')",
        // What Python's own server sends for queue.Empty, and what its client then does.
        "get(timeout=0.1) on an empty queue raised TypeError: exceptions must derive from BaseException",
        "waited about the timeout True",
        "qsize returned int 3",
        "put of a control character raised RemoteError",
        "get after the errors returned str 'after the errors'",
        "checked",
    ]
}

/// Every Python found, as an xmlrpclib client of distq: values of every XML-RPC type,
/// Empty, qsize, errors that leave the channel usable.
#[test]
fn python_xmlrpclib_clients_are_served() {
    let server = server();
    let port = server.local_addr().port().to_string();
    for py in require_pythons() {
        let out = py.run_ok(CLIENT, &["check", "127.0.0.1", &port, KEY]);
        for line in check_lines() {
            assert!(
                out.lines().any(|l| l == *line),
                "python {:?}: missing {line:?} in\n{out}",
                py.version
            );
        }
    }
    server.shutdown().unwrap();
}

/// The same script against Python's own xmlrpclib server gives the same lines, and an
/// xmlrpclib client's `shutdown` stops both servers.
#[test]
fn same_results_as_pythons_own_xmlrpclib_server() {
    for py in require_pythons() {
        let mut python_server = py.spawn(CLIENT, &["serve", KEY]);
        let addr = read_line_starting(&mut python_server, "ADDRESS ");
        let python_port = addr.rsplit(' ').next().unwrap().to_string();
        let expected = py.run_ok(CLIENT, &["check", "127.0.0.1", &python_port, KEY]);
        py.run_ok(CLIENT, &["shutdown", "127.0.0.1", &python_port, KEY]);
        let out = wait_with_deadline(python_server, Duration::from_secs(10));
        assert!(out.status.success(), "python {:?} server", py.version);

        let server = server();
        let port = server.local_addr().port().to_string();
        let got = py.run_ok(CLIENT, &["check", "127.0.0.1", &port, KEY]);
        assert_eq!(got, expected, "python {:?}", py.version);
        py.run_ok(CLIENT, &["shutdown", "127.0.0.1", &port, KEY]);
        joined_within(server, Duration::from_secs(10));
    }
}

/// What an xmlrpclib client puts, a pickle client gets, and the reverse: XML-RPC's types
/// arrive as their natural Python values, and what XML-RPC cannot carry reaches the
/// xmlrpclib client as Python's "Unserializable message" (the item is consumed, as on
/// Python's server when a reply cannot be sent).
#[test]
fn items_cross_between_serializers() {
    let pythons = require_pythons();
    let server = server();
    let port = server.local_addr().port().to_string();
    let from_xml = "int 1\nstr 'é<&>'\nfloat 1.5\nbool True\nNoneType None\nbytes b'by'\n\
                    [int 1, [int 2]]\n{'k': [int 1]}\nDateTime('20240102T03:04:05')\ndone\n";
    let from_pickle = "int 1\nstr 'é<&>'\nfloat 1.5\nbool True\nNoneType None\nBinary(b'by')\n\
                       [int 1, [int 2]]\n{'k': [int 1]}\nBinary(b'ba')\n\
                       RemoteError Unserializable message: OverflowError: int exceeds XML-RPC limits\n\
                       RemoteError Unserializable message: TypeError: dictionary key must be string\n\
                       RemoteError Unserializable message: TypeError: cannot marshal <class 'set'> objects\n\
                       {'a': int 1}\nDateTime('20240102T00:00:00')\n\
                       RemoteError Unserializable message: TypeError: cannot marshal <class 'datetime.date'> objects\n\
                       done\n";
    for (i, producer) in pythons.iter().enumerate() {
        let consumer = &pythons[(i + 1) % pythons.len()];
        let args = |mode: &'static str, serializer: &'static str| {
            [mode, "127.0.0.1", port.as_str(), KEY, serializer]
        };
        producer.run_ok(CLIENT, &args("put", "xmlrpclib"));
        let got = consumer.run_ok(CLIENT, &args("get", "pickle"));
        assert_eq!(
            got, from_xml,
            "{:?} -> {:?}",
            producer.version, consumer.version
        );
        producer.run_ok(CLIENT, &args("put", "pickle"));
        let got = consumer.run_ok(CLIENT, &args("get", "xmlrpclib"));
        assert_eq!(
            got, from_pickle,
            "{:?} -> {:?}",
            producer.version, consumer.version
        );
    }
    // The Rust client reads what an xmlrpclib client put, too.
    if let Some(py) = pythons.first() {
        py.run_ok(CLIENT, &["put", "127.0.0.1", &port, KEY, "xmlrpclib"]);
        let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
        let q = m.queue("get_result_queue").unwrap();
        assert_eq!(q.get(Duration::from_secs(1)).unwrap(), Value::from(1));
        assert_eq!(q.qsize().unwrap(), 8);
    }
    server.shutdown().unwrap();
}
