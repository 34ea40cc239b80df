//! Raw bytes against the server: the exact reply bytes, hostile frames, slow and silent
//! peers. Every case ends by checking that the server still serves a normal client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use distq::auth::{self, AuthKey, LegacyAuth};
use distq::frame;
use distq::pickle;
use distq::protocol::{Reply, Request};
use distq::{Manager, Value};

fn still_serving(addr: SocketAddr) {
    let m = Manager::connect(addr, AuthKey::new(KEY)).expect("server still accepts clients");
    let q = m.queue("health").unwrap();
    q.put(1).unwrap();
    assert_eq!(q.get(Duration::from_secs(1)).unwrap(), Value::from(1));
}

/// An authenticated raw connection.
fn raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    auth::client_handshake(&mut s, &AuthKey::new(KEY), LegacyAuth::Allowed).unwrap();
    s
}

fn send_value(s: &mut TcpStream, v: &Value) {
    frame::write_frame(s, &pickle::encode(v).unwrap()).unwrap();
}

fn read_reply(s: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    frame::read_frame(s, 1 << 20, &mut buf).unwrap();
    Reply::from_value(&pickle::decode(&buf).unwrap()).unwrap()
}

/// Reads until the server closes the connection; fails if it stays open.
fn assert_closed_by_server(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection was not closed: {e}"),
        }
    }
}

/// The reply to `dummy` is the pickle Python's client expects, byte for byte.
#[test]
fn dummy_reply_bytes_are_pinned() {
    let server = server();
    let mut s = raw(server.local_addr());
    // Python 3.11's exact dummy request (../shared/python-wire.md 4.2).
    let dummy = [
        0x80, 0x04, 0x95, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x28, 0x4e, 0x8c, 0x05, b'd', b'u', b'm',
        b'm', b'y', 0x94, 0x29, 0x7d, 0x94, 0x74, 0x94, 0x2e,
    ];
    frame::write_frame(&mut s, &dummy).unwrap();
    let mut buf = Vec::new();
    frame::read_frame(&mut s, 1024, &mut buf).unwrap();
    // ('#RETURN', None): PROTO 4, '#RETURN', NONE, TUPLE2, STOP (../shared/python-wire.md 4.3).
    assert_eq!(
        buf,
        [0x80, 0x04, 0x8c, 0x07, b'#', b'R', b'E', b'T', b'U', b'R', b'N', 0x4e, 0x86, 0x2e]
    );
    assert_closed_by_server(&mut s);
    server.shutdown().unwrap();
}

/// A public function is served once per connection, then the server closes it, as
/// Python's does: so each anonymous queue costs its client a whole authenticated
/// connection (`SyncManager().Queue()` opens one per `create`), and no single connection
/// can create a second one.
#[test]
fn a_one_shot_connection_serves_one_create() {
    let server = server();
    let create = Request::new(None, "create", vec![Value::str("Queue")]);
    let mut s = raw(server.local_addr());
    send_value(&mut s, &create.to_value().unwrap());
    assert!(matches!(read_reply(&mut s), Reply::Return(_)));
    // The server may already have closed its end; the write's fate does not matter.
    let _ = frame::write_frame(
        &mut s,
        &pickle::encode(&create.to_value().unwrap()).unwrap(),
    );
    assert_closed_by_server(&mut s);
    let mut s = raw(server.local_addr());
    let count = Request::new(None, "number_of_objects", vec![]);
    send_value(&mut s, &count.to_value().unwrap());
    assert_eq!(read_reply(&mut s), Reply::Return(Value::Int(1)));
    still_serving(server.local_addr());
    server.shutdown().unwrap();
}

#[test]
fn a_silent_peer_is_dropped_at_the_handshake_deadline() {
    let server = server_with(|c| c.handshake_timeout = Duration::from_millis(300));
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    let start = Instant::now();
    assert_closed_by_server(&mut s);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    still_serving(server.local_addr());
    server.shutdown().unwrap();
}

#[test]
fn a_trickling_peer_cannot_stretch_the_handshake() {
    let server = server_with(|c| c.handshake_timeout = Duration::from_millis(500));
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    let start = Instant::now();
    // Announce a 16-byte answer and send it one byte every 100 ms: 1.6 s in all.
    s.write_all(&[0, 0, 0, 16]).unwrap();
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(100));
        if s.write_all(&[0]).is_err() {
            break;
        }
    }
    assert_closed_by_server(&mut s);
    assert!(start.elapsed() < Duration::from_secs(3));
    still_serving(server.local_addr());
    server.shutdown().unwrap();
}

#[test]
fn oversized_and_negative_handshake_frames_close_the_connection() {
    let server = server();
    for header in [
        [0u8, 0, 4, 0],
        [0xff, 0xff, 0xff, 0xfb],
        [0xff, 0xff, 0xff, 0xff],
    ] {
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        s.write_all(&header).unwrap();
        s.write_all(&[0xff; 8]).unwrap();
        assert_closed_by_server(&mut s);
    }
    still_serving(server.local_addr());
    server.shutdown().unwrap();
}

#[test]
fn garbage_on_the_method_channel_gets_a_traceback_and_the_channel_survives() {
    let server = server();
    let mut s = raw(server.local_addr());
    send_value(
        &mut s,
        &Request::new(None, "create", vec![Value::str("q")])
            .to_value()
            .unwrap(),
    );
    let ident = match read_reply(&mut s) {
        Reply::Return(v) => v.as_tuple().unwrap()[0].as_str().unwrap().to_string(),
        other => panic!("{other:?}"),
    };
    let mut s = raw(server.local_addr());
    send_value(
        &mut s,
        &Request::new(None, "accept_connection", vec![Value::str("t")])
            .to_value()
            .unwrap(),
    );
    assert_eq!(read_reply(&mut s), Reply::Return(Value::None));
    for junk in [
        &b"\x80\x04\x95"[..],                  // truncated
        b"not a pickle at all",                // unknown opcodes
        b"\x80\x04N.",                         // a pickle, but not a request
        b"\x80\x04(]\x94h\x00a.",              // memo misuse
        b"\x80\x04\x8c\x05hello\x85\x94\x7d.", // wrong shape
    ] {
        frame::write_frame(&mut s, junk).unwrap();
        assert!(
            matches!(read_reply(&mut s), Reply::Traceback(_)),
            "{junk:?}"
        );
    }
    let mut put = Request::new(Some(&ident), "put", vec![Value::from(9)]);
    send_value(&mut s, &put.to_value().unwrap());
    assert_eq!(read_reply(&mut s), Reply::Return(Value::None));
    put.ident = Some("no-such-ident".into());
    send_value(&mut s, &put.to_value().unwrap());
    assert!(matches!(read_reply(&mut s), Reply::Traceback(t) if t.contains("KeyError")));
    still_serving(server.local_addr());
    server.shutdown().unwrap();
}

#[test]
fn a_frame_over_the_limit_is_refused_before_allocating() {
    let server = server_with(|c| c.max_frame = 1024);
    let mut s = raw(server.local_addr());
    // Announce 2 GiB - 1 and an 8-byte-escape exabyte; send nothing more.
    for header in [
        &[0x7f, 0xff, 0xff, 0xff][..],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0],
    ] {
        let mut s2 = raw(server.local_addr());
        s2.write_all(header).unwrap();
        match read_reply(&mut s2) {
            Reply::Traceback(t) => assert!(t.contains("exceeds the limit"), "{t}"),
            other => panic!("{other:?}"),
        }
        assert_closed_by_server(&mut s2);
    }
    // An empty frame is Python's end of stream.
    frame::write_frame(&mut s, &[]).unwrap();
    assert_closed_by_server(&mut s);
    still_serving(server.local_addr());
    server.shutdown().unwrap();
}

/// A frame over the limit but within 16 times it is answered and dropped: the same
/// connection then serves the next request (a Python client keeps one per thread).
#[test]
fn a_moderately_oversized_frame_is_answered_and_the_connection_kept() {
    let server = server_with(|c| c.max_frame = 1024);
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    let q = m.queue("q").unwrap();
    let mut s = raw(server.local_addr());
    let accept = Request::new(None, "accept_connection", vec![Value::str("t")]);
    send_value(&mut s, &accept.to_value().unwrap());
    assert_eq!(read_reply(&mut s), Reply::Return(Value::None));
    frame::write_frame(&mut s, &vec![0x80; 4096]).unwrap();
    match read_reply(&mut s) {
        Reply::Traceback(t) => assert!(t.contains("exceeds the limit of 1024 bytes"), "{t}"),
        other => panic!("{other:?}"),
    }
    let qsize = Request::new(Some(&q.ident()), "qsize", vec![]);
    send_value(&mut s, &qsize.to_value().unwrap());
    assert_eq!(read_reply(&mut s), Reply::Return(Value::Int(0)));
    server.shutdown().unwrap();
}

#[test]
fn a_memo_bomb_does_not_expand() {
    let server = server();
    // One 1 MiB bytes object referenced 100,000 times: 100 GiB if copied.
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    let q = m.queue("bomb").unwrap();
    let ident = q.ident().to_string();
    let mut s = raw(server.local_addr());
    send_value(
        &mut s,
        &Request::new(None, "accept_connection", vec![Value::str("t")])
            .to_value()
            .unwrap(),
    );
    assert_eq!(read_reply(&mut s), Reply::Return(Value::None));
    let mut bomb = vec![0x80, 0x04, 0x28, 0x8c, ident.len() as u8];
    bomb.extend_from_slice(ident.as_bytes());
    bomb.extend_from_slice(&[0x8c, 0x03, b'p', b'u', b't']);
    bomb.extend_from_slice(&[0x5d, 0x28, 0x42]); // EMPTY_LIST, MARK, BINBYTES of 1 MiB
    bomb.extend_from_slice(&(1u32 << 20).to_le_bytes());
    bomb.extend(std::iter::repeat(0xab).take(1 << 20));
    bomb.push(0x94); // MEMOIZE as memo 0
    for _ in 1..100_000 {
        bomb.extend_from_slice(&[0x68, 0x00]); // BINGET 0
    }
    bomb.extend_from_slice(&[0x65, 0x85, 0x7d, 0x74, 0x2e]); // APPENDS, TUPLE1, EMPTY_DICT, TUPLE, STOP
    frame::write_frame(&mut s, &bomb).unwrap();
    assert_eq!(read_reply(&mut s), Reply::Return(Value::None));
    // Stored shared, and sent back shared (memo references), so the client decodes the
    // same small graph rather than 100 GiB.
    match q.get(Duration::from_secs(5)).unwrap() {
        Value::List(items) => {
            assert_eq!(items.len(), 100_000);
            assert!(items.windows(2).all(|w| match (&w[0], &w[1]) {
                (Value::Bytes(a), Value::Bytes(b)) => std::sync::Arc::ptr_eq(a, b),
                _ => false,
            }));
        }
        other => panic!("{other:?}"),
    }
    still_serving(server.local_addr());
    server.shutdown().unwrap();
}

/// Deep nesting holds on the stacks distq really uses: the server scans without
/// recursion (here 2,000 levels, far past the decoder's limit, arrive raw and go back
/// out as sent), and the Rust client's codec, at its own limit, fits a 512 KiB stack
/// (a connection thread's) even in a debug build.
#[test]
fn deep_nesting_fits_the_real_stacks() {
    let server = server();
    let m = Manager::connect(server.local_addr(), AuthKey::new(KEY)).unwrap();
    let q = m.queue("deep").unwrap();
    let ident = q.ident().to_string();
    let mut s = raw(server.local_addr());
    let accept = Request::new(None, "accept_connection", vec![Value::str("t")]);
    send_value(&mut s, &accept.to_value().unwrap());
    assert_eq!(read_reply(&mut s), Reply::Return(Value::None));
    // (ident, 'put', ([[[...]]],), {}), the item 2,000 EMPTY_LISTs and 1,999 APPENDs.
    let depth = 2000;
    let mut item = vec![b']'; depth];
    item.extend(std::iter::repeat(b'a').take(depth - 1));
    let mut req = vec![0x80, 0x04, b'(', 0x8c, ident.len() as u8];
    req.extend_from_slice(ident.as_bytes());
    req.extend_from_slice(&[0x8c, 0x03, b'p', b'u', b't']);
    req.extend_from_slice(&item);
    req.extend_from_slice(&[0x85, b'}', b't', b'.']);
    frame::write_frame(&mut s, &req).unwrap();
    assert_eq!(read_reply(&mut s), Reply::Return(Value::None));
    send_value(
        &mut s,
        &Request::new(Some(&ident), "get", vec![])
            .to_value()
            .unwrap(),
    );
    let mut reply = Vec::new();
    frame::read_frame(&mut s, 1 << 20, &mut reply).unwrap();
    assert!(
        reply.windows(item.len()).any(|w| w == item.as_slice()),
        "the item did not come back as sent"
    );
    // An odd argument the server does decode (get_many's count as a 499-deep list):
    // refused with a TypeError on the 512 KiB connection stack, not a crash.
    let depth = distq::pickle::MAX_DEPTH - 1;
    let mut arg = vec![b']'; depth];
    arg.extend(std::iter::repeat(b'a').take(depth - 1));
    let mut req = vec![0x80, 0x04, b'(', 0x8c, ident.len() as u8];
    req.extend_from_slice(ident.as_bytes());
    req.extend_from_slice(&[0x8c, 0x08]);
    req.extend_from_slice(b"get_many");
    req.extend_from_slice(&arg);
    req.extend_from_slice(&[0x85, b'}', b't', b'.']);
    frame::write_frame(&mut s, &req).unwrap();
    match read_reply(&mut s) {
        Reply::Error(e) => assert!(e.to_string().contains("max_items"), "{e}"),
        other => panic!("{other:?}"),
    }
    server.shutdown().unwrap();
}
