//! Python's length-prefixed frames (`multiprocessing.connection.Connection`).
//!
//! Everything a Python manager and its clients exchange over TCP, the handshake included, is a
//! sequence of frames: a 4-byte big-endian *signed* length followed by that many payload bytes.
//! Since Python 3.8 a length of `-1` escapes to an 8-byte big-endian unsigned length, which
//! senders use only above 2 GiB but receivers accept for any size. This module is the only place
//! that knows this layout; the handshake ([`crate::auth`]) and the pickle layer above it only see
//! whole payloads.
//!
//! Two properties matter beyond the byte layout:
//!
//! * **Bounded reads.** Python imposes no size limit after the handshake, so a peer could announce
//!   a 2^63-byte frame. [`read_frame`] checks the announced length against a caller-chosen
//!   maximum *before* allocating, so a hostile or broken peer cannot make us reserve memory.
//! * **One write per frame.** A frame written as two segments (header, then payload) meets
//!   Nagle's algorithm and delayed ACKs on the Python side and stalls for about 90 ms. The
//!   writers here put header and payload on the wire with a single `write` (or one `writev`).

use std::io::{self, IoSlice, Read, Write};

use crate::error::{Error, Result};

/// Default upper bound for one frame after the handshake (64 MiB).
///
/// Python has no limit at all; this one protects the process from a peer announcing an absurd
/// length while leaving ample room for real queue items.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// Upper bound for every handshake frame, the same 256 bytes Python's `recv_bytes(256)` enforces.
pub const HANDSHAKE_MAX_FRAME: usize = 256;

/// Bytes a caller reserves at the start of its buffer for [`finish_and_write`] to fill in.
///
/// An encoder that starts from `vec![0; HEADER_RESERVE]` and appends the payload lets the frame go
/// out without copying the payload into a second buffer.
pub const HEADER_RESERVE: usize = 4;

/// Largest payload the 4-byte header form can describe (`i32::MAX`).
const SHORT_FORM_MAX: usize = 0x7fff_ffff;

/// Frames up to this payload size are copied next to their header and written with one `write`
/// call, which works for any writer. Larger ones use a vectored write instead of a copy.
const COPY_WRITE_MAX: usize = 64 * 1024;

/// Capacity a reused read buffer may keep between frames; a larger one left over by a huge frame
/// is released once a smaller frame arrives (and on the server once its request is parsed,
/// `Connection::parse_request`).
pub(crate) const KEEP_CAPACITY: usize = 1024 * 1024;

/// Length of the escaped header: `ff ff ff ff` plus an 8-byte length.
const LONG_HEADER_LEN: usize = 12;

/// Reads one frame into `buf`, replacing its contents.
///
/// `buf` is cleared first and its allocation reused, so a connection loop can call this with the
/// same vector for every frame. Lengths above `max` are refused with [`Error::FrameTooLarge`]
/// before anything is allocated or read, so the stream is not usable afterwards.
///
/// Errors:
/// * [`Error::Closed`] if the peer closed (or reset) the connection at a frame boundary, which is
///   how Python peers end a conversation;
/// * [`Error::Protocol`] for a negative length other than `-1`, or end of file inside a frame;
/// * [`Error::Timeout`] if the socket's read timeout expired (the stream may then be in the middle
///   of a frame and must be dropped);
/// * [`Error::Io`] for any other I/O failure.
pub fn read_frame<R: Read>(r: &mut R, max: usize, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    let mut head = [0u8; 4];
    read_full(r, &mut head, true)?;
    let len = match i32::from_be_bytes(head) {
        -1 => {
            let mut long = [0u8; 8];
            read_full(r, &mut long, false)?;
            u64::from_be_bytes(long)
        }
        n if n < 0 => {
            return Err(Error::protocol(format!(
                "invalid negative frame length {n}"
            )))
        }
        // Non-negative, so the conversion is lossless.
        n => u64::from(n.unsigned_abs()),
    };
    let len = match usize::try_from(len) {
        Ok(len) if len <= max => len,
        _ => return Err(Error::FrameTooLarge { len, max }),
    };
    if len <= KEEP_CAPACITY && buf.capacity() > KEEP_CAPACITY {
        buf.shrink_to(KEEP_CAPACITY);
    }
    // Grow the buffer as the payload arrives rather than to the announced length at
    // once: a peer that announces 64 MiB and sends nothing more then holds at most one
    // step of memory, not 64 MiB per connection.
    let mut filled = 0;
    while filled < len {
        let step = (len - filled).min(GROW_STEP);
        buf.resize(filled + step, 0);
        read_full(r, &mut buf[filled..], false)?;
        filled += step;
    }
    Ok(())
}

/// How much of a frame's payload is allocated ahead of the bytes that fill it.
const GROW_STEP: usize = 1 << 20;

/// Fills `dst` completely. `at_boundary` says whether a clean end of file before the first byte
/// means the peer finished (a frame boundary) rather than hung up mid-frame.
fn read_full<R: Read>(r: &mut R, dst: &mut [u8], at_boundary: bool) -> Result<()> {
    let mut filled = 0;
    while filled < dst.len() {
        match r.read(&mut dst[filled..]) {
            Ok(0) if at_boundary && filled == 0 => return Err(Error::Closed),
            Ok(0) => {
                return Err(Error::protocol(
                    "connection closed in the middle of a frame",
                ))
            }
            Ok(n) => filled += n,
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return Err(Error::Timeout("waiting for a frame"))
                }
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    if at_boundary && filled == 0 =>
                {
                    return Err(Error::Closed)
                }
                _ => return Err(Error::io("reading a frame", e)),
            },
        }
    }
    Ok(())
}

/// The header for a payload of `len` bytes, as Python writes it: the 4-byte form up to
/// `i32::MAX`, else `-1` followed by the 8-byte length. Returns the buffer and how many of its
/// bytes are the header.
fn encode_header(len: usize) -> ([u8; LONG_HEADER_LEN], usize) {
    let mut head = [0u8; LONG_HEADER_LEN];
    match u32::try_from(len) {
        Ok(short) if len <= SHORT_FORM_MAX => {
            head[..4].copy_from_slice(&short.to_be_bytes());
            (head, 4)
        }
        _ => {
            head[..4].copy_from_slice(&(-1i32).to_be_bytes());
            // usize is at most 64 bits wide on every target Rust supports.
            head[4..].copy_from_slice(&(len as u64).to_be_bytes());
            (head, LONG_HEADER_LEN)
        }
    }
}

/// Writes `payload` as one frame and flushes `w`.
///
/// Header and payload leave in a single `write` call for payloads up to 64 KiB (copied into one
/// buffer) and in `writev` calls beyond that, so the peer never sees a lone header segment.
///
/// Errors: [`Error::Timeout`] if the socket's write timeout expired, [`Error::Closed`] if the peer
/// has gone (broken pipe, reset), [`Error::Io`] otherwise. After an error a partial frame may have
/// been sent; the connection must be dropped.
pub fn write_frame<W: Write>(w: &mut W, payload: &[u8]) -> Result<()> {
    let (head, head_len) = encode_header(payload.len());
    let head = &head[..head_len];
    let sent = if payload.len() <= COPY_WRITE_MAX {
        let mut out = Vec::with_capacity(head.len() + payload.len());
        out.extend_from_slice(head);
        out.extend_from_slice(payload);
        w.write_all(&out)
    } else {
        write_two(w, head, payload)
    };
    sent.and_then(|()| w.flush()).map_err(write_error)
}

/// Writes a frame whose payload the caller has already placed in `buf` after
/// [`HEADER_RESERVE`] placeholder bytes, then flushes `w`.
///
/// The length is patched into the placeholder and the whole buffer goes out in one `write`,
/// sparing the copy [`write_frame`] makes. Payloads above `i32::MAX` bytes need the longer
/// escaped header and are sent as header plus payload in vectored writes instead. On return
/// `buf` still holds the frame (header included); callers may clear and reuse it.
///
/// Errors as for [`write_frame`]; a `buf` shorter than [`HEADER_RESERVE`] is an
/// [`Error::Io`] of kind `InvalidInput` and sends nothing.
pub fn finish_and_write<W: Write>(w: &mut W, buf: &mut [u8]) -> Result<()> {
    if buf.len() < HEADER_RESERVE {
        return Err(Error::io(
            "sending a frame",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer is shorter than the reserved frame header",
            ),
        ));
    }
    let (head, head_len) = encode_header(buf.len() - HEADER_RESERVE);
    let sent = if head_len == HEADER_RESERVE {
        buf[..HEADER_RESERVE].copy_from_slice(&head[..HEADER_RESERVE]);
        w.write_all(buf)
    } else {
        write_two(w, &head[..head_len], &buf[HEADER_RESERVE..])
    };
    sent.and_then(|()| w.flush()).map_err(write_error)
}

/// Writes one frame whose payload is `parts` back to back, each from where it is, then
/// flushes `w`: for a reply carrying a large stored item, which would otherwise be copied
/// into a frame buffer first (and keep that buffer's size for the connection's life).
/// Header and parts go out in vectored writes, resumed after partial writes.
///
/// Errors as for [`write_frame`].
pub fn write_parts<W: Write>(w: &mut W, parts: [&[u8]; 3]) -> Result<()> {
    let (head, head_len) = encode_header(parts.iter().map(|p| p.len()).sum());
    let mut bufs = [&head[..head_len], parts[0], parts[1], parts[2]];
    write_all_vectored(w, &mut bufs)
        .and_then(|()| w.flush())
        .map_err(write_error)
}

fn write_all_vectored<W: Write>(w: &mut W, bufs: &mut [&[u8]; 4]) -> io::Result<()> {
    loop {
        let first = bufs
            .iter()
            .position(|b| !b.is_empty())
            .unwrap_or(bufs.len());
        let rest = &bufs[first..];
        if rest.is_empty() {
            return Ok(());
        }
        let io: Vec<IoSlice<'_>> = rest.iter().map(|b| IoSlice::new(b)).collect();
        match w.write_vectored(&io) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write the whole frame",
                ))
            }
            Ok(mut n) => {
                for b in bufs[first..].iter_mut() {
                    let k = n.min(b.len());
                    *b = &b[k..];
                    n -= k;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `head` then `body` with vectored writes, resuming correctly after partial writes.
fn write_two<W: Write>(w: &mut W, mut head: &[u8], mut body: &[u8]) -> io::Result<()> {
    while !head.is_empty() {
        match w.write_vectored(&[IoSlice::new(head), IoSlice::new(body)]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write the whole frame",
                ))
            }
            Ok(n) if n < head.len() => head = &head[n..],
            Ok(n) => {
                body = body.get(n - head.len()..).unwrap_or(&[]);
                head = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.write_all(body)
}

/// Maps a failed frame write to the error a caller can act on.
fn write_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout("sending a frame"),
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => Error::Closed,
        _ => Error::io("sending a frame", e),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn memory_follows_the_bytes_received_not_the_announced_length() {
        // 64 MiB announced, 10 bytes sent: at most one growth step is allocated.
        let mut input = (64u32 << 20).to_be_bytes().to_vec();
        input.extend_from_slice(&[7; 10]);
        let mut buf = Vec::new();
        let r = read_frame(&mut Cursor::new(input), 64 << 20, &mut buf);
        assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
        assert!(
            buf.capacity() <= 2 * GROW_STEP,
            "{} bytes allocated",
            buf.capacity()
        );
    }

    use super::*;
    use std::io::Cursor;

    fn read(bytes: &[u8], max: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        read_frame(&mut Cursor::new(bytes), max, &mut buf).map(|()| buf)
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn writes_exact_bytes() {
        assert_eq!(framed(b""), [0, 0, 0, 0]);
        assert_eq!(framed(b"hello"), b"\x00\x00\x00\x05hello");
        let big = vec![7u8; 300];
        let out = framed(&big);
        assert_eq!(&out[..4], [0, 0, 1, 0x2c]);
        assert_eq!(&out[4..], &big[..]);
    }

    #[test]
    fn large_frame_goes_through_vectored_path() {
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let out = framed(&big);
        assert_eq!(&out[..4], 200_000u32.to_be_bytes());
        assert_eq!(read(&out, DEFAULT_MAX_FRAME).unwrap(), big);
    }

    /// A writer that accepts at most 3 bytes per call, to exercise partial writes.
    struct Trickle(Vec<u8>);
    impl Write for Trickle {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let n = data.len().min(3);
            self.0.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_vectored_writes_resume() {
        let mut w = Trickle(Vec::new());
        write_two(&mut w, b"\xff\xff\xff\xff\0\0\0\0\0\0\0\x05", b"hello").unwrap();
        assert_eq!(w.0, b"\xff\xff\xff\xff\0\0\0\0\0\0\0\x05hello");
    }

    #[test]
    fn header_form_switches_above_i32_max() {
        assert_eq!(encode_header(0).1, 4);
        assert_eq!(&encode_header(0x7fff_ffff).0[..4], [0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(encode_header(0x7fff_ffff).1, 4);
        let (head, len) = encode_header(0x8000_0000);
        assert_eq!(len, LONG_HEADER_LEN);
        assert_eq!(head, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x80, 0, 0, 0]);
    }

    #[test]
    fn finish_and_write_patches_header() {
        let mut buf = vec![0xaa; HEADER_RESERVE];
        buf.extend_from_slice(b"hello");
        let mut out = Vec::new();
        finish_and_write(&mut out, &mut buf).unwrap();
        assert_eq!(out, b"\x00\x00\x00\x05hello");

        let mut empty = vec![0xaa; HEADER_RESERVE];
        let mut out = Vec::new();
        finish_and_write(&mut out, &mut empty).unwrap();
        assert_eq!(out, [0, 0, 0, 0]);

        let mut short = vec![0u8; 3];
        assert!(matches!(
            finish_and_write(&mut Vec::new(), &mut short),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn reads_round_trip() {
        for payload in [&b""[..], b"hello", &[9u8; 300]] {
            assert_eq!(read(&framed(payload), 1024).unwrap(), payload);
        }
    }

    #[test]
    fn reads_escaped_length_form() {
        let bytes = b"\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x05hello";
        assert_eq!(read(bytes, 1024).unwrap(), b"hello");
    }

    #[test]
    fn rejects_negative_lengths() {
        let bytes = (-5i32).to_be_bytes();
        assert!(matches!(read(&bytes, 1024), Err(Error::Protocol(_))));
        let bytes = i32::MIN.to_be_bytes();
        assert!(matches!(read(&bytes, 1024), Err(Error::Protocol(_))));
    }

    #[test]
    fn rejects_too_large_before_allocating() {
        let mut buf = Vec::new();
        let bytes = 0x7fff_ffffu32.to_be_bytes();
        match read_frame(&mut Cursor::new(&bytes[..]), 1024, &mut buf) {
            Err(Error::FrameTooLarge { len, max }) => {
                assert_eq!(len, 0x7fff_ffff);
                assert_eq!(max, 1024);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(buf.capacity(), 0);

        let mut bytes = vec![0xff; 4];
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        match read_frame(&mut Cursor::new(&bytes[..]), 1024, &mut buf) {
            Err(Error::FrameTooLarge { len, .. }) => assert_eq!(len, u64::MAX),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(buf.capacity(), 0);

        // Exactly at the limit is fine.
        assert_eq!(read(b"\x00\x00\x00\x02hi", 2).unwrap(), b"hi");
        assert!(matches!(
            read(b"\x00\x00\x00\x03hi!", 2),
            Err(Error::FrameTooLarge { len: 3, max: 2 })
        ));
    }

    #[test]
    fn eof_cases() {
        assert!(matches!(read(b"", 1024), Err(Error::Closed)));
        for bytes in [
            &b"\x00"[..],
            b"\x00\x00\x00",
            b"\x00\x00\x00\x05hel",
            b"\xff\xff\xff\xff",
            b"\xff\xff\xff\xff\x00\x00",
        ] {
            assert!(
                matches!(read(bytes, 1024), Err(Error::Protocol(_))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn reuses_and_trims_buffer() {
        let mut stream = framed(b"first frame");
        stream.extend(framed(b"2nd"));
        let mut cursor = Cursor::new(stream);
        let mut buf = Vec::with_capacity(4 * KEEP_CAPACITY);
        read_frame(&mut cursor, 1024, &mut buf).unwrap();
        assert_eq!(buf, b"first frame");
        assert!(buf.capacity() <= KEEP_CAPACITY);
        read_frame(&mut cursor, 1024, &mut buf).unwrap();
        assert_eq!(buf, b"2nd");
        assert!(matches!(
            read_frame(&mut cursor, 1024, &mut buf),
            Err(Error::Closed)
        ));
        assert!(buf.is_empty());
    }

    struct Failing(io::ErrorKind);
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
    }
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn maps_io_errors() {
        let read_err = |kind| read_frame(&mut Failing(kind), 1024, &mut Vec::new());
        assert!(matches!(
            read_err(io::ErrorKind::WouldBlock),
            Err(Error::Timeout(_))
        ));
        assert!(matches!(
            read_err(io::ErrorKind::TimedOut),
            Err(Error::Timeout(_))
        ));
        assert!(matches!(
            read_err(io::ErrorKind::ConnectionReset),
            Err(Error::Closed)
        ));
        assert!(matches!(
            read_err(io::ErrorKind::PermissionDenied),
            Err(Error::Io { .. })
        ));
        assert!(matches!(
            write_frame(&mut Failing(io::ErrorKind::BrokenPipe), b"x"),
            Err(Error::Closed)
        ));
        assert!(matches!(
            write_frame(&mut Failing(io::ErrorKind::WouldBlock), b"x"),
            Err(Error::Timeout(_))
        ));
        assert!(matches!(
            write_frame(&mut Failing(io::ErrorKind::Other), b"x"),
            Err(Error::Io { .. })
        ));
    }
}
