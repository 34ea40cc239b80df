//! Puts per second with the journal's fsync policies against the in-memory server, in one
//! run, interleaved (A B C D A B C D ...), and the journal's bytes per item.
//!
//! ```sh
//! cargo bench --bench journal_bench -- [ROUNDS] [PUTS_PER_PRODUCER]
//! ```
//! 8 producers, each on its own connection, put 100-byte items.
//!
//! ```sh
//! cargo bench --bench journal_bench -- replay-memory [PAIRS] [LIVE]
//! ```
//! The memory that opening and compacting a journal costs: writes PAIRS (default 1M)
//! puts and as many takes of 170-byte items (in batches of 1,000, so the live data stays
//! small while the file grows to ~200 MB), then LIVE (default 0) puts left in the queue,
//! opens it in a child process and reports the child's peak RSS (`VmHWM`) after
//! `Journal::open` and, reset, during a compaction.
//! It uses only the journal's public API, so it runs against older versions too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distq::journal::{Fsync, Journal, JournalConfig, Record};
use distq::pickle::Fragment;
use distq::{AuthKey, Manager, Server, ServerConfig, Value};

const PRODUCERS: usize = 8;

fn run(journal: Option<(Fsync, PathBuf)>, puts: usize) -> (f64, Option<f64>) {
    let mut config = ServerConfig::new(AuthKey::new("bench"));
    let dir = journal.as_ref().map(|(_, d)| d.clone());
    if let Some((fsync, dir)) = &journal {
        let _ = std::fs::remove_dir_all(dir);
        let mut jc = JournalConfig::new(dir);
        jc.fsync = *fsync;
        config.journal = Some(jc);
    }
    let server = Server::bind("127.0.0.1:0", config)
        .unwrap()
        .spawn()
        .unwrap();
    let addr = server.local_addr();
    let item = Value::from(vec![b'x'; 100]);
    let start = Instant::now();
    let threads: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let item = item.clone();
            std::thread::spawn(move || {
                let q = Manager::connect(addr, AuthKey::new("bench"))
                    .unwrap()
                    .queue("bench")
                    .unwrap();
                for _ in 0..puts {
                    q.put(item.clone()).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rate = (PRODUCERS * puts) as f64 / start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    server.shutdown().unwrap();
    let per_item = dir.map(|d| {
        let len = std::fs::metadata(d.join("distq.journal"))
            .map(|m| m.len())
            .unwrap_or(0);
        let _ = std::fs::remove_dir_all(&d);
        len as f64 / (PRODUCERS * puts) as f64
    });
    (rate, per_item)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Puts and takes per batch in [`replay_memory`]: the live data never exceeds one batch.
const BATCH: u64 = 1000;

/// Writes the journal for the memory measurement: `pairs` puts and takes, batch by batch,
/// then `live` puts.
fn write_churn(dir: &Path, pairs: u64, live: u64) -> u64 {
    let _ = std::fs::remove_dir_all(dir);
    let mut config = JournalConfig::new(dir);
    config.fsync = Fsync::Never;
    let (journal, _) = Journal::open(config).unwrap();
    let qnum = journal.declare("churn").unwrap();
    let item = Fragment::encode(&Value::from(vec![b'x'; 170])).unwrap();
    let mut done = 0;
    while done < pairs {
        let n = BATCH.min(pairs - done);
        let ids: Vec<u64> = (0..n).map(|_| journal.next_id()).collect();
        for &id in &ids {
            journal.append(&Record::Put {
                qnum,
                front: false,
                id,
                deliveries: 0,
                item: &item,
            });
        }
        let mut last = 0;
        for &id in &ids {
            last = journal.append(&Record::Take { qnum, id });
        }
        journal.commit(last).unwrap();
        done += n;
    }
    let mut last = 0;
    for _ in 0..live {
        last = journal.append(&Record::Put {
            qnum,
            front: false,
            id: journal.next_id(),
            deliveries: 0,
            item: &item,
        });
    }
    journal.commit(last).unwrap();
    journal.len()
}

/// This process's peak resident set (`VmHWM`) in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets `VmHWM` to the current RSS (Linux's `clear_refs` value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The child of [`replay_memory`]: open, then compact, reporting the peak RSS of each.
fn open_and_compact(dir: &Path) {
    let before = peak_rss_kib();
    let mut config = JournalConfig::new(dir);
    config.fsync = Fsync::Never;
    let start = Instant::now();
    let (journal, recovered) = Journal::open(config).unwrap();
    let opened = start.elapsed();
    let open_peak = peak_rss_kib();
    let live: usize = recovered.iter().map(|q| q.ready.len()).sum();
    drop(recovered);
    reset_peak_rss();
    let floor = peak_rss_kib();
    let start = Instant::now();
    journal.compact().unwrap();
    let compacted = start.elapsed();
    let compact_peak = peak_rss_kib();
    println!("live items after replay: {live}");
    println!("peak RSS before open:    {before:>8} KiB");
    println!(
        "peak RSS after open:     {open_peak:>8} KiB  (+{} KiB, {:.2} s)",
        open_peak - before,
        opened.as_secs_f64()
    );
    println!(
        "peak RSS in compaction:  {compact_peak:>8} KiB  (+{} KiB over {floor} KiB, {:.2} s)",
        compact_peak - floor,
        compacted.as_secs_f64()
    );
    println!("journal after compaction: {} bytes", journal.len());
}

/// Measures opening and compacting a large journal whose live data is small.
fn replay_memory(pairs: u64, live: u64) {
    let dir = std::env::temp_dir().join(format!("distq-replay-memory-{}", std::process::id()));
    let len = write_churn(&dir, pairs, live);
    println!(
        "{pairs} puts and takes, then {live} puts, of 170-byte items: a journal of {len} bytes"
    );
    // A fresh process, so the writer's own allocations do not count.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("open-and-compact")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "the measuring child failed: {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    distq::log::set_level(distq::log::Level::Warn);
    let mut args = std::env::args().skip(1).peekable();
    match args.peek().map(String::as_str) {
        Some("replay-memory") => {
            let pairs = args
                .nth(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1_000_000);
            let live = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
            return replay_memory(pairs, live);
        }
        Some("open-and-compact") => {
            let dir = args.nth(1).expect("open-and-compact DIR");
            return open_and_compact(Path::new(&dir));
        }
        _ => {}
    }
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let puts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("distq-journal-bench-{}", std::process::id()));
    let cases: [(&str, Option<Fsync>); 4] = [
        ("in-memory", None),
        ("--fsync never", Some(Fsync::Never)),
        (
            "--fsync every=50ms",
            Some(Fsync::Every(Duration::from_millis(50))),
        ),
        ("--fsync always", Some(Fsync::Always)),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut bytes = 0.0;
    for round in 0..rounds {
        let mut this = Vec::new();
        for (i, (_, fsync)) in cases.iter().enumerate() {
            let (rate, per_item) = run(fsync.map(|f| (f, dir.clone())), puts);
            rates[i].push(rate);
            this.push(rate);
            if let Some(b) = per_item {
                bytes = b;
            }
        }
        for (i, r) in this.iter().enumerate() {
            ratios[i].push(r / this[0]);
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    println!("{PRODUCERS} producers x {puts} puts of 100-byte items, {rounds} interleaved rounds");
    println!(
        "{:<22} {:>12} {:>22} {:>12}",
        "case", "puts/s", "min-max", "vs memory"
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        let lo = rates[i].iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = rates[i].iter().cloned().fold(0.0, f64::max);
        println!(
            "{:<22} {:>12.0} {:>10.0} - {:<10.0} {:>11.2}x",
            name,
            median(rates[i].clone()),
            lo,
            hi,
            median(ratios[i].clone())
        );
    }
    println!("journal bytes per item: {bytes:.1}");
}
