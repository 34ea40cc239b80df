//! Puts per second with the journal's fsync policies against the in-memory server, in one
//! run, interleaved (A B C D A B C D ...), and the journal's bytes per item.
//!
//! ```sh
//! cargo run --release --example journal_bench -- [ROUNDS] [PUTS_PER_PRODUCER]
//! ```
//! 8 producers, each on its own connection, put 100-byte items.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use distq::journal::{Fsync, JournalConfig};
use distq::{AuthKey, Manager, Server, ServerConfig, Value};

const PRODUCERS: usize = 8;

fn run(journal: Option<(Fsync, PathBuf)>, puts: usize) -> (f64, Option<f64>) {
    distq::log::set_level(distq::log::Level::Warn);
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

fn main() {
    let mut args = std::env::args().skip(1);
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
