//! Durable queues: `distq-server --journal DIR` killed with SIGKILL and restarted.
//!
//! `DISTQ_LONG=1` repeats the crash test 20 times.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use distq::journal::{FileWrapper, Fsync, Journal, JournalConfig, JournalFile};
use distq::pickle::Fragment;
use distq::queues::{always_alive, Event, EventSink, Policy, QueueMap, Taken, Wait};
use distq::{AuthKey, Error, Manager, Value};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distq-jtest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Starts `distq-server --journal dir` on `bind` and returns it with its address.
fn start(dir: &Path, bind: &str, extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = bin("distq-server")
        .args(["--bind", bind, "--authkey", KEY, "--journal"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8];
    while !(text(&line).contains("listening on ") && line.ends_with(b"\n")) {
        if err.read(&mut b).unwrap_or(0) == 0 {
            panic!("server exited: {}", text(&line));
        }
        line.push(b[0]);
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let text = text(&line);
    let last = text.lines().last().unwrap();
    let addr = last.trim_end().rsplit(' ').next().unwrap().parse().unwrap();
    (child, addr)
}

fn restart(dir: &Path, addr: SocketAddr, extra: &[&str]) -> (Child, SocketAddr) {
    start(dir, &addr.to_string(), extra)
}

fn kill9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn connect(addr: SocketAddr) -> Manager {
    Manager::connect(addr, AuthKey::new(KEY)).unwrap()
}

/// Several producers put numbered items; the server is killed mid-stream; after a
/// restart every acknowledged item is there exactly once, in order per producer.
#[test]
fn acknowledged_puts_survive_kill_9() {
    let rounds = if std::env::var_os("DISTQ_LONG").is_some() {
        20
    } else {
        2
    };
    for round in 0..rounds {
        let dir = tmpdir(&format!("kill{round}"));
        let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let q = connect(addr).queue("durable").unwrap();
                    let mut acked = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        match q.put(Value::tuple(vec![Value::from(p), Value::from(n)])) {
                            Ok(()) => acked.push(n),
                            Err(_) => break, // the server died under us: not acknowledged
                        }
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        kill9(server);
        stop.store(true, Ordering::SeqCst);
        let acked: Vec<Vec<i64>> = producers.into_iter().map(|p| p.join().unwrap()).collect();
        assert!(
            acked.iter().all(|a| !a.is_empty()),
            "every producer got some puts in"
        );

        let (server, addr) = restart(&dir, addr, &[]);
        let q = connect(addr).queue("durable").unwrap();
        let mut seen: HashMap<i64, Vec<i64>> = HashMap::new();
        loop {
            match q.get_many(10_000, Duration::from_millis(200)) {
                Ok(batch) => {
                    for v in batch {
                        let t = v.as_tuple().unwrap();
                        seen.entry(t[0].as_int().unwrap())
                            .or_default()
                            .push(t[1].as_int().unwrap());
                    }
                }
                Err(Error::Empty) => break,
                Err(e) => panic!("{e}"),
            }
        }
        for (p, acked) in acked.iter().enumerate() {
            let got = seen.remove(&(p as i64)).unwrap_or_default();
            // Items put but not yet acknowledged when the server died may or may not be
            // there; the acknowledged ones must be, once each, in order.
            assert!(
                got.len() >= acked.len(),
                "producer {p}: {} of {} acked items",
                got.len(),
                acked.len()
            );
            assert_eq!(
                &got[..acked.len()],
                &acked[..],
                "producer {p}: order or duplicates"
            );
            assert!(
                got.len() <= acked.len() + 1,
                "at most the one in flight extra"
            );
        }
        kill9(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Reserved-but-unacked items come back after a restart, at the head; acked ones do not.
#[test]
fn reserved_items_come_back_acked_ones_do_not() {
    let dir = tmpdir("leases");
    let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
    let q = connect(addr).queue("jobs").unwrap();
    for i in 0..5 {
        q.put(i).unwrap();
    }
    let (a, _) = q.reserve(Duration::from_secs(1)).unwrap(); // 0
    let (_b, _) = q.reserve(Duration::from_secs(1)).unwrap(); // 1: never acked
    q.ack(a).unwrap();
    assert_eq!(q.get(Duration::from_secs(1)).unwrap(), Value::from(2)); // plain get: gone
    std::thread::sleep(Duration::from_millis(200)); // let the flusher write the acks
    kill9(server);
    let (server, addr) = restart(&dir, addr, &[]);
    let q = connect(addr).queue("jobs").unwrap();
    let got = q.get_many(100, Duration::from_secs(1)).unwrap();
    assert_eq!(got, vec![Value::from(1), Value::from(3), Value::from(4)]);
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Compaction while producers and consumers run loses nothing.
#[test]
fn compaction_under_load_loses_nothing() {
    let dir = tmpdir("compact");
    let (server, addr) = start(
        &dir,
        "127.0.0.1:0",
        &["--fsync", "never", "--compact-min", "100000"],
    );
    let m = connect(addr);
    let q = m.queue("churn").unwrap();
    // 20,000 puts, 19,000 gets: the journal is mostly dead records, so it compacts.
    let payload = "p".repeat(200);
    let mut kept = Vec::new();
    for i in 0..20_000i64 {
        q.put(Value::tuple(vec![
            Value::from(i),
            Value::from(payload.as_str()),
        ]))
        .unwrap();
        if i % 20 != 0 {
            q.get(Duration::from_secs(1)).unwrap();
        } else {
            kept.push(i);
        }
    }
    std::thread::sleep(Duration::from_millis(300)); // the last gets' records reach the file
    let len = std::fs::metadata(dir.join("distq.journal")).unwrap().len();
    assert!(
        len < 20_000 * 200,
        "the journal was compacted ({len} bytes)"
    );
    kill9(server);
    let (server, addr) = restart(&dir, addr, &[]);
    let q = connect(addr).queue("churn").unwrap();
    let all = q.get_many(100_000, Duration::from_secs(1)).unwrap();
    let ids: Vec<i64> = all
        .iter()
        .map(|v| v.as_tuple().unwrap()[0].as_int().unwrap())
        .collect();
    // FIFO gets took the oldest 19,000: exactly the newest 1,000 are left, in order.
    assert!(
        ids == (19_000..20_000).collect::<Vec<i64>>(),
        "{} items, first {:?}",
        ids.len(),
        ids.first()
    );
    eprintln!("journal was {len} bytes before the restart");
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A full disk: the put that cannot be journaled gets an error, gets keep working, and
/// puts work again once space returns. Uses a 1 MiB tmpfs (needs root, as CI has).
#[test]
fn a_full_disk_refuses_puts_and_recovers() {
    let mnt = tmpdir("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but mounting a tmpfs failed (needs root)"
        );
        eprintln!("note: cannot mount a tmpfs (not root?); skipping the disk-full test");
        return;
    }
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 700 * 1024]).unwrap();
    let dir = mnt.join("journal");
    let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
    let q = connect(addr).queue("big").unwrap();
    let item = Value::from(vec![7u8; 20_000]);
    let mut acked = 0;
    let err = loop {
        match q.put(item.clone()) {
            Ok(()) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 100, "the disk never filled");
    };
    assert!(err.to_string().contains("journal"), "{err}");
    assert!(acked > 0);
    // Gets still work.
    assert_eq!(q.get(Duration::from_secs(1)).unwrap(), item);
    std::fs::remove_file(&filler).unwrap();
    q.put(item.clone()).unwrap();
    kill9(server);
    let (server, addr) = restart(&dir, addr, &[]);
    let q = connect(addr).queue("big").unwrap();
    let back = q.get_many(1000, Duration::from_secs(1)).unwrap();
    // Everything acknowledged minus the one taken (plus possibly the refused one, which
    // was queued in memory but never acknowledged).
    assert!(back.len() >= acked, "{} < {acked}", back.len());
    kill9(server);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir_all(&mnt);
}

/// Corruption in the middle refuses to start, with a message naming --journal-repair.
#[test]
fn a_corrupt_journal_refuses_to_start_unless_repaired() {
    let dir = tmpdir("corrupt");
    let (server, addr) = start(&dir, "127.0.0.1:0", &["--fsync", "always"]);
    let q = connect(addr).queue("c").unwrap();
    for i in 0..50 {
        q.put(i).unwrap();
    }
    kill9(server);
    let path = dir.join("distq.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let out = bin("distq-server")
        .args(["--bind", "127.0.0.1:0", "--authkey", KEY, "--journal"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--journal-repair"),
        "{}",
        text(&out.stderr)
    );
    let (server, addr) = start(&dir, "127.0.0.1:0", &["--journal-repair"]);
    let left = connect(addr).queue("c").unwrap().qsize().unwrap();
    assert!((40..50).contains(&left), "{left} items survive the repair");
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A master hosting its server with `--journal` leaves unfinished tasks in the journal,
/// and a server started on the same directory serves them.
#[test]
fn a_hosting_master_keeps_its_tasks_in_the_journal() {
    let dir = tmpdir("master");
    let out = bin("distq-master")
        .args([
            "--bind",
            "127.0.0.1:0",
            "--tasks",
            "3",
            "--result-timeout",
            "0.3",
        ])
        .args(["--authkey", KEY, "--journal"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let (server, addr) = start(&dir, "127.0.0.1:0", &[]);
    let tasks = connect(addr).queue("get_task_queue").unwrap();
    assert_eq!(
        tasks.qsize().unwrap(),
        3,
        "the unworked tasks survived the master"
    );
    kill9(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bytes distq wrote for the history below before queues emitted events: a change
/// to how events become records (or to the record layout) shows here, and old journals
/// would no longer replay as they did.
const PINNED_HISTORY: [&str; 11] = [
    "0400000092c8e1a701000171080000008779558b0200010000024b0108000000935ac8940200020000024b02",
    "08000000a0b993280200030000024b0308000000bb1cf2ab0200040000024b040800000088ffa91702000500",
    "00024b05080000009cdc34080200060000024b0608000000af3f6fb40200070000024b0708000000eb9086d5",
    "0200080000024b080300000058414f8f04000103000000e2104616040002080000000d5a6258030002000002",
    "4b02080000001979ff470300010000024b010300000058414f8f04000103000000d57a841705000203000000",
    "8cc4c21506000203000000434a8360050003030000002d9e076307000303000000434a836005000309000000",
    "70ece62c010106712e6465616404000000a694dab80800030103000000e0dfe7fe050004030000008e0b63fd",
    "0700040300000076efe08905000503000000ccbee91005000603000000a26a6d1307000603000000183b648a",
    "0700050300000076efe08905000506000000d28d189401020372657303000000ccbee9100500060800000014",
    "7f41cd0202090000024b64030000009500af12060006080000002c3dd23c02020a0000024b650300000033e1",
    "a82c09020208000000253f19430300000000024b3703000000183b648a0700050300000041852288040005",
];

/// Every kind of record, through the queue map: puts, an undelivered reply, a get, an
/// ack, releases (one delayed), a dead letter, an owner's loss, `ack_put`, a clear, and
/// a restart that requeues a formerly reserved item.
#[test]
fn a_fixed_history_writes_the_pinned_journal_bytes() {
    let dir = tmpdir("pinned");
    let mut cfg = JournalConfig::new(&dir);
    cfg.fsync = Fsync::Never;
    let alive = &always_alive;
    let open = |policy| {
        let (journal, recovered) = Journal::open(cfg.clone()).unwrap();
        let journal = Arc::new(journal);
        let map = QueueMap::with_journal(policy, journal.clone(), recovered).unwrap();
        (map, journal)
    };
    let (map, journal) = open(Policy {
        max_deliveries: 2,
        ..Policy::default()
    });
    let q = map.create("q").unwrap();
    q.put_many((1..=8).map(frag).collect(), Wait::No, alive)
        .unwrap();
    let taken = q.get_many(2, Wait::No, alive).unwrap();
    q.unget(taken).unwrap();
    q.get(Wait::No, alive).unwrap();
    let r = q.reserve(1, None, Wait::No, alive).unwrap();
    q.ack(r.lease).unwrap();
    for _ in 0..2 {
        let r = q.reserve(1, None, Wait::No, alive).unwrap();
        map.release(&q, r.lease, None).unwrap();
    }
    let r = q.reserve(1, None, Wait::No, alive).unwrap();
    map.release(&q, r.lease, Some(Duration::from_secs(60)))
        .unwrap();
    q.reserve(2, None, Wait::No, alive).unwrap();
    q.reserve(2, None, Wait::No, alive).unwrap();
    map.release_owner(2).unwrap();
    q.reserve(3, None, Wait::No, alive).unwrap();
    let results = map.create("res").unwrap();
    let r = q.reserve(4, None, Wait::No, alive).unwrap();
    map.ack_put(&q, r.lease, "res", frag(100), Wait::No, alive)
        .unwrap();
    results.put(frag(101), Wait::No, alive).unwrap();
    results.shutdown(true).unwrap();
    q.unget(vec![Taken::new(frag(55))]).unwrap();
    journal.tick().unwrap();
    drop((q, results, map, journal));
    let (map, journal) = open(Policy::default());
    map.create("q").unwrap().get(Wait::No, alive).unwrap();
    journal.tick().unwrap();
    drop((map, journal));
    let bytes = std::fs::read(dir.join("distq.journal")).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, PINNED_HISTORY.concat());
    let _ = std::fs::remove_dir_all(&dir);
}

/// How the next journal writes and syncs fail (see [`Faulty`]).
#[derive(Debug, Default)]
struct Faults {
    /// Every write fails with ENOSPC (a full disk).
    full: AtomicBool,
    /// Every write stores half its bytes, and the next call fails (a short write).
    short: AtomicBool,
    /// Every sync fails with EIO.
    sync: AtomicBool,
    /// Writes and syncs seen, and how many of them failed.
    calls: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl Faults {
    fn fail(&self, errno: i32) -> std::io::Error {
        self.failed.fetch_add(1, Ordering::SeqCst);
        std::io::Error::from_raw_os_error(errno)
    }
}

/// A journal file that fails as [`Faults`] says.
#[derive(Debug)]
struct Faulty {
    inner: Box<dyn JournalFile>,
    faults: Arc<Faults>,
    owe_error: bool,
}

impl JournalFile for Faulty {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        self.faults.calls.fetch_add(1, Ordering::SeqCst);
        if self.faults.full.load(Ordering::SeqCst) {
            return Err(self.faults.fail(28));
        }
        if self.faults.short.load(Ordering::SeqCst) {
            if self.owe_error || data.len() < 2 {
                self.owe_error = false;
                return Err(self.faults.fail(28));
            }
            self.owe_error = true;
            return self.inner.write_at(offset, &data[..data.len() / 2]);
        }
        self.inner.write_at(offset, data)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.faults.calls.fetch_add(1, Ordering::SeqCst);
        if self.faults.sync.load(Ordering::SeqCst) {
            return Err(self.faults.fail(5));
        }
        self.inner.sync()
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

fn faulty_config(dir: &Path, faults: &Arc<Faults>) -> JournalConfig {
    let mut cfg = JournalConfig::new(dir);
    cfg.fsync = Fsync::Always;
    cfg.compact_min_bytes = 0;
    let faults = faults.clone();
    cfg.wrap_file = Some(FileWrapper(Arc::new(move |inner| {
        Box::new(Faulty {
            inner,
            faults: faults.clone(),
            owe_error: false,
        }) as Box<dyn JournalFile>
    })));
    cfg
}

/// The journal as the queues' sink, refusing puts up front while `refuse` is set: what
/// the journal itself does once failed writes back up past its limit, which a run this
/// short never reaches through the file.
#[derive(Debug)]
struct Refusing {
    journal: Arc<Journal>,
    refuse: Arc<AtomicBool>,
}

impl EventSink for Refusing {
    fn declare(&self, name: &str) -> distq::Result<u32> {
        EventSink::declare(&*self.journal, name)
    }

    fn item_id(&self) -> u64 {
        self.journal.item_id()
    }

    fn admit(&self, items: &[Fragment]) -> distq::Result<()> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(Error::Value("the journal's backlog is full".into()));
        }
        EventSink::admit(&*self.journal, items)
    }

    fn emit(&self, queue: u32, event: &Event<'_>) -> u64 {
        self.journal.emit(queue, event)
    }

    fn commit(&self, ticket: u64) -> distq::Result<()> {
        EventSink::commit(&*self.journal, ticket)
    }
}

/// A reply that could not be delivered puts its item back (unget), and that is written
/// before `unget` returns: the take may be in the file already (here a later put's
/// commit wrote it), and a crash between the two would otherwise lose an item whose put
/// was acknowledged.
#[test]
fn an_undelivered_reply_survives_a_crash() {
    let dir = tmpdir("unget-crash");
    let mut cfg = JournalConfig::new(&dir);
    cfg.fsync = Fsync::Never;
    let refuse = Arc::new(AtomicBool::new(false));
    let (map, journal) = open_map(&cfg, &refuse);
    let q = map.create("q").unwrap();
    q.put(frag(1), Wait::No, &always_alive).unwrap();
    let taken = q.get(Wait::No, &always_alive).unwrap();
    q.put(frag(2), Wait::No, &always_alive).unwrap(); // its commit writes the take too
    q.unget(vec![taken]).unwrap();
    // A crash: nothing flushed after this point.
    drop((q, map, journal));
    let (map, _journal) = open_map(&cfg, &refuse);
    assert_eq!(contents(&map), [1, 2]);
}

/// A queue map on the journal in `cfg`'s directory, and the journal (to flush and
/// compact it), its sink refusing puts while `refuse` is set.
fn open_map(cfg: &JournalConfig, refuse: &Arc<AtomicBool>) -> (QueueMap, Arc<Journal>) {
    let (journal, recovered) = Journal::open(cfg.clone()).unwrap();
    let journal = Arc::new(journal);
    let policy = Policy {
        max_deliveries: 2,
        ..Policy::default()
    };
    let sink = Arc::new(Refusing {
        journal: journal.clone(),
        refuse: refuse.clone(),
    });
    (
        QueueMap::with_sink(policy, sink, recovered).unwrap(),
        journal,
    )
}

fn frag(v: i64) -> Fragment {
    Fragment::encode(&Value::from(v)).unwrap()
}

fn int(f: &Fragment) -> i64 {
    match f.decode().unwrap() {
        Value::Int(i) => i,
        other => panic!("not an int: {other:?}"),
    }
}

/// Every item in `q` and `q.dead` (taken out and put back at the head, in order).
fn contents(map: &QueueMap) -> Vec<i64> {
    let mut out = Vec::new();
    for name in ["q", "q.dead"] {
        let q = map.create(name).unwrap();
        map.decref(q.ident()).unwrap();
        let mut taken = Vec::new();
        while let Ok(t) = q.get(Wait::No, &always_alive) {
            out.push(int(&t.item));
            taken.push(t);
        }
        // On a failing disk the unget's record waits for a retry: the items are back.
        let _ = q.unget(taken);
    }
    out
}

/// Where the reference model says an item is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum At {
    /// Waiting (in `q` or `q.dead`): must survive any restart.
    Ready,
    /// Out under a lease: must come back after a restart.
    Leased(u64),
    /// Got or acked: may come back after a crash (delivery is at least once), never
    /// after a clean restart with a healthy disk.
    Consumed,
}

/// One seeded run of the model-based test: random puts, gets, undelivered replies,
/// reserves, acks, releases (some delayed) and killed connections against a journaled
/// queue map whose file fails on demand and whose sink refuses puts on demand, with
/// crashes (the map dropped without a flush) and clean restarts, each restart checked
/// against the model.
fn model_run(seed: u64, steps: usize) {
    let dir = tmpdir(&format!("model-{seed}"));
    let faults = Arc::new(Faults::default());
    let refuse = Arc::new(AtomicBool::new(false));
    let cfg = faulty_config(&dir, &faults);
    let (mut map, mut journal) = open_map(&cfg, &refuse);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut next = move |n: u64| rng.gen_range(0..n);
    let mut model: HashMap<i64, At> = HashMap::new();
    let mut refused: Vec<i64> = Vec::new();
    let mut leases: Vec<(u64, u64, i64)> = Vec::new(); // (owner, lease, item)
    let mut value = 0i64;
    for step in 0..steps {
        let ctx = || format!("seed {seed} step {step}");
        let q = map.create("q").unwrap();
        map.decref(q.ident()).unwrap();
        let op = next(100);
        if std::env::var_os("DISTQ_TRACE").is_some() {
            eprintln!(
                "step {step} op {op} full {:?} short {:?} sync {:?} leases {leases:?} q {:?}",
                faults.full,
                faults.short,
                faults.sync,
                q.stats().unwrap().size
            );
        }
        match op {
            0..=34 => {
                value += 1;
                match q.put(frag(value), Wait::No, &always_alive) {
                    Ok(()) => {
                        model.insert(value, At::Ready);
                    }
                    Err(e) => {
                        let why = e.to_string();
                        assert!(
                            why.contains("not stored") || why.contains("backlog"),
                            "{}: {e}",
                            ctx()
                        );
                        refused.push(value);
                    }
                }
            }
            35..=49 => match q.get(Wait::No, &always_alive) {
                Ok(t) => {
                    let v = int(&t.item);
                    assert!(!refused.contains(&v), "{}: got refused item {v}", ctx());
                    assert_eq!(model.get(&v), Some(&At::Ready), "{}: got {v}", ctx());
                    if next(4) == 0 {
                        // Its reply could not be delivered: back at the head (on a
                        // failing disk its record waits for a retry, like the take's).
                        let _ = q.unget(vec![t]);
                    } else {
                        model.insert(v, At::Consumed);
                    }
                }
                Err(Error::Empty) => {}
                Err(e) => panic!("{}: get: {e}", ctx()),
            },
            50..=64 => {
                let owner = next(3);
                match q.reserve(owner, None, Wait::No, &always_alive) {
                    Ok(r) => {
                        let v = int(&r.item);
                        assert!(!refused.contains(&v), "{}: reserved refused {v}", ctx());
                        assert_eq!(model.get(&v), Some(&At::Ready), "{}: reserved {v}", ctx());
                        model.insert(v, At::Leased(r.lease));
                        leases.push((owner, r.lease, v));
                    }
                    Err(Error::Empty) => {}
                    Err(e) => panic!("{}: reserve: {e}", ctx()),
                }
            }
            65..=72 if !leases.is_empty() => {
                let (_, lease, v) = leases.swap_remove(next(leases.len() as u64) as usize);
                q.ack(lease).unwrap();
                model.insert(v, At::Consumed);
            }
            73..=80 if !leases.is_empty() => {
                let (_, lease, v) = leases.swap_remove(next(leases.len() as u64) as usize);
                // A delayed one is not handed out again in this run, but survives a
                // restart like any waiting item.
                let delay = (next(3) == 0).then_some(Duration::from_secs(600));
                map.release(&q, lease, delay).unwrap();
                model.insert(v, At::Ready);
            }
            81..=85 => {
                // A worker's connection dies: its leases go back (or to q.dead).
                let owner = next(3);
                map.release_owner(owner).unwrap();
                for (_, _, v) in leases.iter().filter(|l| l.0 == owner) {
                    model.insert(*v, At::Ready);
                }
                leases.retain(|l| l.0 != owner);
            }
            86..=91 => {
                // The disk (or the journal's backlog) changes its mind.
                let which = next(5);
                faults.full.store(which == 1, Ordering::SeqCst);
                faults.short.store(which == 2, Ordering::SeqCst);
                faults.sync.store(which == 3, Ordering::SeqCst);
                refuse.store(which == 4, Ordering::SeqCst);
            }
            92..=93 => {
                let _ = journal.compact();
            }
            _ => {
                // Restart: a crash (no flush) or a clean stop (flushed, if the disk lets it).
                let crash = next(2) == 0;
                let clean = !crash && journal.tick().is_ok();
                drop(q);
                drop(map);
                drop(journal);
                (map, journal) = open_map(&cfg, &refuse);
                let found = contents(&map);
                let mut seen = std::collections::HashSet::new();
                for v in &found {
                    assert!(seen.insert(*v), "{}: item {v} in two places", ctx());
                    assert!(
                        !refused.contains(v),
                        "{}: refused item {v} came back",
                        ctx()
                    );
                    if clean {
                        assert_ne!(
                            model.get(v),
                            Some(&At::Consumed),
                            "{}: consumed item {v} back after a clean restart",
                            ctx()
                        );
                    }
                }
                for (v, at) in &model {
                    if *at != At::Consumed {
                        assert!(
                            seen.contains(v),
                            "{}: acknowledged item {v} ({at:?}) lost",
                            ctx()
                        );
                    }
                }
                // What came back is waiting again (at-least-once delivery); go on with it.
                model.clear();
                leases.clear();
                for v in found {
                    model.insert(v, At::Ready);
                }
            }
        }
    }
    assert!(
        faults.failed.load(Ordering::SeqCst) > 0,
        "seed {seed}: no write failed, so the run tested nothing"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn model_based_journal_with_failing_disk_and_crashes() {
    quiet_logs();
    let long = std::env::var_os("DISTQ_LONG").is_some();
    let (runs, steps) = if long { (400, 3000) } else { (40, 800) };
    let base: u64 = std::env::var("DISTQ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    for run in 0..runs {
        let seed = base.wrapping_add(run);
        let result = std::panic::catch_unwind(|| model_run(seed, steps));
        if let Err(e) = result {
            eprintln!("model-based test failed with seed {seed} (rerun: DISTQ_SEED={seed})");
            std::panic::resume_unwind(e);
        }
    }
}
