//! The memory a request takes to parse and to store, measured by a counting allocator
//! (in a test binary of its own, so that nothing else allocates through it): the scan's
//! working memory is bounded by a small multiple of the frame, a pickle that would need
//! more is refused before the memory is allocated, and a put's item is not copied on its
//! way into the queue.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::AtomicUsize;

use distq::dispatch::{self, Session};
use distq::pickle::{SCAN_MEMORY_FACTOR, SCAN_MEMORY_SLACK};
use distq::protocol::{Arg, Request};
use distq::queues::QueueMap;
use distq::Error;

/// Counts this thread's live bytes and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// The test's only `unsafe`: a global allocator is an unsafe trait; this one forwards to
// `System` unchanged.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            added(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        added(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, size);
        if !q.is_null() {
            added(size as isize - layout.size() as isize);
        }
        q
    }
}

fn added(n: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add_signed(n);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Parses `frame` and returns the result with the most memory the parse held at once
/// beyond what was live before (the request it returns included).
fn parse_peak(frame: &[u8]) -> (Result<Request, Error>, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let result = Request::parse(frame);
    (result, PEAK.with(Cell::get) - before)
}

/// `(ident, 'put', (item,), {})` as Python's pickler writes it at protocol 4 (without
/// FRAME opcodes, which the scan skips), `item` being its opcodes.
fn put_request(item: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x04(\x8c\x0c7f2a3c4b5d60\x94\x8c\x03put\x94".to_vec();
    p.extend_from_slice(item);
    p.extend_from_slice(b"\x85\x94}\x94t\x94.");
    p
}

/// A list of `n` elements, each `element`, batched in APPENDS of 1000 as Python does.
fn list_of(n: usize, element: &[u8]) -> Vec<u8> {
    let mut p = b"]\x94".to_vec();
    for batch in (0..n).collect::<Vec<_>>().chunks(1000) {
        p.push(b'(');
        for _ in batch {
            p.extend_from_slice(element);
        }
        p.push(b'e');
    }
    p
}

fn item_len(req: &Request) -> usize {
    match &req.args[..] {
        [Arg::Pickled(p)] => p.fragment.bytes().len(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_request_of_memoized_containers_takes_a_bounded_multiple_of_its_frame() {
    // [[] for _ in range(5_000_000)]: every empty list memoized (2 bytes a binding).
    let frame = put_request(&list_of(5_000_000, b"]\x94"));
    let (req, peak) = parse_peak(&frame);
    let req = req.unwrap();
    // The item is the list without its unread memo writes.
    assert_eq!(item_len(&req), 5_000_000 + 2 * 5000 + 1);
    eprintln!(
        "5M memoized empty lists: frame {} bytes, peak {peak} bytes ({:.1}x)",
        frame.len(),
        peak as f64 / frame.len() as f64
    );
    assert!(
        peak <= 11 * frame.len(),
        "peak {peak} for a {}-byte frame",
        frame.len()
    );
}

#[test]
fn a_request_of_flat_data_takes_little_more_than_its_item() {
    // [None] * 3_000_000: the scan's stack never holds more than a batch.
    let frame = put_request(&list_of(3_000_000, b"N"));
    let (req, peak) = parse_peak(&frame);
    let req = req.unwrap();
    let item = item_len(&req);
    eprintln!(
        "3M Nones: frame {} bytes, peak {peak} bytes ({:.2}x)",
        frame.len(),
        peak as f64 / frame.len() as f64
    );
    assert!(
        peak <= item + (1 << 20),
        "peak {peak} for a {item}-byte item"
    );
}

#[test]
fn a_pickle_needing_more_scan_memory_than_the_bound_is_refused_before_allocating_it() {
    // One None memoized under 4 million indices, the first out of order: CPython's
    // pickler never writes it, and scanning it would take ~28 bytes per byte.
    let mut item = b"Nq\x05".to_vec();
    item.resize(4_000_000, b'\x94');
    let frame = put_request(&item);
    let (req, peak) = parse_peak(&frame);
    let err = req.unwrap_err().to_string();
    assert!(err.contains("more than") && err.contains("memory"), "{err}");
    let bound = SCAN_MEMORY_FACTOR * frame.len() + SCAN_MEMORY_SLACK;
    // Beyond the buffers the bound counts: the buffers' own struct and the error.
    assert!(peak <= bound + 4096, "peak {peak} above the bound {bound}");
}

#[test]
fn a_tuple_of_memoized_containers_is_within_the_bound() {
    // tuple([] for _ in range(1_000_000)): every list on the stack at once, the most
    // working memory per byte of the shapes CPython writes.
    let mut item = b"(".to_vec();
    for _ in 0..1_000_000 {
        item.extend_from_slice(b"]\x94");
    }
    item.extend_from_slice(b"t\x94");
    let frame = put_request(&item);
    let (req, peak) = parse_peak(&frame);
    req.unwrap();
    let bound = SCAN_MEMORY_FACTOR * frame.len() + SCAN_MEMORY_SLACK;
    // Beyond the buffers the bound counts: the buffers' own struct and the error.
    assert!(peak <= bound + 4096, "peak {peak} above the bound {bound}");
}

#[test]
fn a_put_stores_its_item_without_a_third_copy() {
    // The frame holds the item once and the queue's store once more; binding the put
    // moves the item out of the request instead of copying it.
    let map = QueueMap::new();
    let q = map.create("q").unwrap();
    let mut req = Request::parse(&put_request(&list_of(2_000_000, b"N"))).unwrap();
    req.ident = Some(q.ident().to_string());
    let item = item_len(&req);
    let alive = || true;
    let connections = AtomicUsize::new(1);
    let session = Session::new(1, &alive, &connections);
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let outcome = dispatch::method(&map, &mut req, &session);
    let peak = PEAK.with(Cell::get) - before;
    assert!(!outcome.hang_up, "{:?}", outcome.reply);
    assert_eq!(q.len().unwrap(), 1);
    eprintln!("a put of a {item}-byte item: peak {peak} bytes beyond the request");
    assert!(
        peak <= item + item / 2,
        "peak {peak} for a {item}-byte item"
    );
}
