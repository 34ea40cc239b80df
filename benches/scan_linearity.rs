//! Hostile requests of a given size, parsed once: `scripts/scan-linearity` counts the
//! instructions of `Request::parse` under callgrind at two sizes and prints the ratio,
//! which must stay near the ratio of the sizes (a quadratic scan or extraction would
//! show its square).
//!
//!     scan_linearity CASE N     (parse one request of case CASE at size N)
//!     scan_linearity            (`cargo bench`: every case once at a small size)

use distq::protocol::Request;

/// Builds a request of size ~n.
type Build = fn(usize) -> Vec<u8>;

/// The cases, by name.
const CASES: &[(&str, Build)] = &[
    ("memo rebinds", rebinds),
    ("outside references", outside),
    ("FRAME-heavy shared region", frames),
    ("mutations through memo references", mutations),
    ("DUP chains", dups),
    ("deep nesting", nesting),
];

/// `(ident, method, (item,), {})` at protocol 4: the ident is memo index 0, the method 1.
fn request(method: &str, item: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x04(\x8c\x0c7f2a3c4b5d60\x94\x8c".to_vec();
    p.push(method.len() as u8);
    p.extend_from_slice(method.as_bytes());
    p.push(b'\x94');
    p.extend_from_slice(item);
    p.extend_from_slice(b"\x85\x94}\x94t\x94.");
    p
}

/// A list (memo index 2 when it is the item) of `items`, in APPENDS batches of 1000.
fn list(items: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut p = b"]\x94(".to_vec();
    for (i, item) in items.enumerate() {
        if i > 0 && i % 1000 == 0 {
            p.extend_from_slice(b"e(");
        }
        p.extend_from_slice(&item);
    }
    p.push(b'e');
    p
}

/// One memo index bound again and again, each binding read once.
fn rebinds(n: usize) -> Vec<u8> {
    request("put", &list((0..n).map(|_| b"Nq\x05h\x05".to_vec())))
}

/// `put_many` of one memoized str and `n` references to it, each copied into its item.
fn outside(n: usize) -> Vec<u8> {
    let first = b"\x8c\x05hello\x94".to_vec();
    let refs = (0..n).map(|_| b"h\x03".to_vec());
    request("put_many", &list(std::iter::once(first).chain(refs)))
}

/// `put_many` of a list full of FRAME opcodes and three references to it: each copy
/// walks the list's FRAMEs.
fn frames(n: usize) -> Vec<u8> {
    let shared = list((0..n).map(|_| b"\x95\x01\x00\x00\x00\x00\x00\x00\x00N".to_vec()));
    let items = std::iter::once(shared).chain((0..3).map(|_| b"h\x03".to_vec()));
    request("put_many", &list(items))
}

/// A list appended to through memo references to it.
fn mutations(n: usize) -> Vec<u8> {
    let mut item = b"]\x94".to_vec();
    for _ in 0..n {
        item.extend_from_slice(b"h\x02Na0");
    }
    request("put", &item)
}

/// A list appended to through DUPs of it.
fn dups(n: usize) -> Vec<u8> {
    let mut item = b"]\x94".to_vec();
    for _ in 0..n {
        item.extend_from_slice(b"2Na0");
    }
    request("put", &item)
}

/// Lists nested `n` deep.
fn nesting(n: usize) -> Vec<u8> {
    let mut item = vec![b']'; n + 1];
    item.extend(std::iter::repeat(b'a').take(n));
    request("put", &item)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = |name: &str, n: usize| {
        let Some((_, build)) = CASES.iter().find(|(c, _)| *c == name) else {
            eprintln!("unknown case {name:?}");
            std::process::exit(2);
        };
        let frame = build(n);
        let parsed = std::hint::black_box(Request::parse(std::hint::black_box(&frame)));
        let verdict = match parsed {
            Ok(_) => "parsed".to_string(),
            Err(e) => format!("refused: {e}"),
        };
        println!("{name} n={n}: {} bytes, {verdict}", frame.len());
    };
    match &args[..] {
        [case, n] if n.parse::<usize>().is_ok() => run(case, n.parse().unwrap_or(0)),
        _ => CASES.iter().for_each(|(name, _)| run(name, 1000)),
    }
}
