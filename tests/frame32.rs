//! Frame lengths that do not fit in a 32-bit `usize` (issue 5).
//!
//! Python's 8-byte length escape (`ff ff ff ff` + u64) can announce more than `u32::MAX` bytes.
//! On a 32-bit target such a length must be refused with [`Error::FrameTooLarge`] before
//! anything is allocated or read, never truncated to its low 32 bits (which would turn a
//! 4 GiB + 5 frame into a 5-byte one and desynchronise the stream). `scripts/cross-test` runs
//! this file for i686 and armv7 under qemu; on 64-bit targets the same frames are checked
//! against the largest limit a 32-bit build could have.

use std::io::Cursor;

use distq::frame::read_frame;
use distq::Error;

/// The escaped header for `len`, followed by `payload`.
fn escaped(len: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0xff; 4];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The most permissive limit that is safe to test with on this target: `usize::MAX` on 32-bit
/// (no 32-bit limit can admit a length above `u32::MAX`), the 32-bit `usize::MAX` on 64-bit
/// (where `usize::MAX` would really try to allocate).
fn widest_limit() -> usize {
    if cfg!(target_pointer_width = "32") {
        usize::MAX
    } else {
        usize::try_from(u32::MAX).unwrap()
    }
}

/// Reads one frame from `bytes` with `max`, asserting it is refused as too large for `len`, that
/// nothing was allocated and that only the 12 header bytes were consumed.
fn assert_refused(bytes: &[u8], len: u64, max: usize) {
    let mut cursor = Cursor::new(bytes);
    let mut buf = Vec::new();
    match read_frame(&mut cursor, max, &mut buf) {
        Err(Error::FrameTooLarge {
            len: got,
            max: got_max,
        }) => {
            assert_eq!(got, len, "announced length reported unchanged");
            assert_eq!(got_max, max);
        }
        other => panic!("length {len:#x} with max {max:#x}: expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(buf.capacity(), 0, "nothing may be allocated");
    assert_eq!(cursor.position(), 12, "the payload must not be read");
}

#[test]
fn escaped_length_above_u32_max_is_refused_not_truncated() {
    // 2^32 + 5 truncates to 5 on a 32-bit usize; the 5 bytes that follow would then be read as
    // a whole frame if the conversion were `as usize`.
    let len = (1u64 << 32) + 5;
    assert_refused(&escaped(len, b"hello"), len, widest_limit());
}

#[test]
fn escaped_length_just_above_u32_max_is_refused() {
    let len = u64::from(u32::MAX) + 1;
    assert_refused(&escaped(len, b""), len, widest_limit());
}

#[test]
fn largest_escaped_length_is_refused() {
    assert_refused(&escaped(u64::MAX, b""), u64::MAX, widest_limit());
    assert_refused(&escaped(u64::MAX, b""), u64::MAX, 1024);
}

#[test]
fn escaped_length_that_fits_still_reads() {
    // The escape is legal for any size; a small one must keep working on every target.
    let mut buf = Vec::new();
    read_frame(&mut Cursor::new(escaped(5, b"hello")), 1024, &mut buf).unwrap();
    assert_eq!(buf, b"hello");
}

#[cfg(target_pointer_width = "32")]
#[test]
fn usize_is_32_bits_here() {
    // Guards against this file silently running only the 64-bit variant under qemu.
    assert_eq!(usize::BITS, 32);
    assert_eq!(widest_limit(), usize::MAX);
}
