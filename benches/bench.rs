//! distq's benchmark: distq beside Python's managers, Redis and the raw loopback limit,
//! measured in one run on one machine (see docs/performance.md and issue 4).
//!
//! ```sh
//! scripts/bench            # builds, installs redis-server if it can, runs everything
//! cargo build --release --bins && cargo bench --bench bench -- [--quick]
//! ```
//!
//! Everything runs on loopback with ports the kernel picks. Each round runs every case once
//! (A B C .. A B C ..), so slow drift on these shared machines hits all cases alike; the
//! ratios are computed inside each round and then summarised (median, min–max).
//!
//! Who does what:
//! - the kernel floor is an echo server and its clients inside this process (std only);
//! - distq cases run against a `distq-server` child process (release build), with the
//!   Rust client library in threads of this process (one `Manager` and its own
//!   connections per thread; a worker thread is what `distq-worker` does, minus the
//!   printing per task);
//! - Python cases run `bench/py_clients.py` (plain `BaseManager` code, worker
//!   *processes*) against a Python `BaseManager` server child or the distq-server child;
//! - Redis: `redis-server` on a free port (`--save '' --appendonly no`) and
//!   `redis-benchmark`, skipped with a message if they are not installed.
//!
//! Every child is killed and reaped when its guard drops (also on panic).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use distq::protocol::{encode_frame, encode_reply_frame, Reply, Request};
use distq::{AuthKey, Error, Manager, Value};

const KEY: &str = "distq-bench";
const PY_CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/py_clients.py");
/// The seed's classic scripts (port 0 and argv instead of constants, otherwise as shipped).
const SEED_MASTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/task_master.py");
const SEED_WORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/task_worker.py");

// ---------------------------------------------------------------------------------------
// Options

struct Opts {
    rounds: usize,
    /// How long each throughput measurement runs.
    secs: f64,
    /// Tasks per pipeline run.
    tasks: usize,
    python: String,
    skip_python: bool,
    skip_redis: bool,
    only: Vec<String>,
    /// "split" (servers on CPU 0, clients on CPU 1), "same" (all on CPU 0) or "none".
    pin: String,
}

const HELP: &str = "\
bench: distq beside Python managers, Redis and the loopback floor

USAGE: bench [--quick] [--rounds N] [--secs S] [--tasks N] [--python PATH] [--pin MODE]
             [--no-python] [--no-redis] [--only floor,rt,pipe,classic,batch,many,lat,mem]

  --quick      3 rounds, 0.3 s per throughput case, 5,000 tasks (about a minute)
  default      5 rounds, 1 s per throughput case, 20,000 tasks (a few minutes)
  --pin split   (default, needs taskset and 2+ CPUs) every server on CPU 0 and every
               client on CPU 1: each round trip crosses CPUs, as between two machines
  --pin same   everything on CPU 0: no cross-CPU wake-ups, so CPU cost per call shows most
  --pin none   (or --no-pin) let the scheduler place processes; it switches between the two
               modes above by itself, which makes single-connection numbers swing ~4x
";

/// Set when servers go to CPU 0 and clients (this process and its children) to CPU 1.
static PINNED: AtomicBool = AtomicBool::new(false);

/// A command for a server process: under `taskset -c 0` when pinned.
fn server_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if PINNED.load(Ordering::Relaxed) {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Pins this process (and so every client it starts) by re-executing itself under
/// `taskset`: to CPU 1 for `--pin split`, CPU 0 for `--pin same`. Returns whether the
/// run is pinned.
fn pin_self(opts: &Opts) -> bool {
    if std::env::var_os("DISTQ_BENCH_PINNED").is_some() {
        return true;
    }
    let cpu = match opts.pin.as_str() {
        "none" => return false,
        "split" => "1",
        "same" => "0",
        other => fail(&format!("--pin {other:?}: use split, same or none")),
    };
    if online_cpus() < 2 || Command::new("taskset").arg("--version").output().is_err() {
        eprintln!("bench: not pinning (needs taskset and 2 CPUs)");
        return false;
    }
    let status = Command::new("taskset")
        .args(["-c", cpu])
        .arg(std::env::current_exe().expect("current_exe"))
        .args(std::env::args_os().skip(1))
        .env("DISTQ_BENCH_PINNED", "1")
        .status()
        .unwrap_or_else(|e| fail(&format!("taskset: {e}")));
    std::process::exit(status.code().unwrap_or(1));
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        rounds: 5,
        secs: 1.0,
        tasks: 20_000,
        python: "python3".into(),
        skip_python: false,
        skip_redis: false,
        only: Vec::new(),
        pin: "split".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--quick" => {
                o.rounds = 3;
                o.secs = 0.3;
                o.tasks = 5_000;
            }
            "--rounds" => {
                o.rounds = val("--rounds")
                    .parse()
                    .unwrap_or_else(|_| fail("--rounds N"))
            }
            "--secs" => o.secs = val("--secs").parse().unwrap_or_else(|_| fail("--secs S")),
            "--tasks" => o.tasks = val("--tasks").parse().unwrap_or_else(|_| fail("--tasks N")),
            "--python" => o.python = val("--python"),
            "--no-python" => o.skip_python = true,
            "--no-redis" => o.skip_redis = true,
            "--pin" => o.pin = val("--pin"),
            "--no-pin" => o.pin = "none".into(),
            "--serve-floor" => serve_floor(),
            "--only" => o.only = val("--only").split(',').map(str::to_string).collect(),
            // `cargo bench` passes it to every bench without a harness.
            "--bench" => {}
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => fail(&format!("unknown argument {other:?}\n{HELP}")),
        }
    }
    o
}

fn fail(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(2)
}

impl Opts {
    fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

// ---------------------------------------------------------------------------------------
// Child processes

/// A child process that is killed and reaped when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The directory holding the binaries this bench runs (`target/release`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/release/deps/bench-HASH -> target/release
    exe.parent()
        .and_then(Path::parent)
        .expect("the bench runs from target/<profile>/deps")
        .to_path_buf()
}

/// Starts `distq-server` on a kernel-chosen port and returns it with its address, read
/// from its "listening on" log line. Its stderr is drained by a thread afterwards.
fn start_distq_server() -> (Proc, SocketAddr) {
    start_server_binary(&bin_dir().join("distq-server"))
}

/// [`start_distq_server`] for a given `distq-server` executable.
fn start_server_binary(path: &Path) -> (Proc, SocketAddr) {
    let path = path.to_path_buf();
    if !path.exists() {
        fail(&format!(
            "{} is missing: run `cargo build --release --bins` first (scripts/bench does)",
            path.display()
        ));
    }
    let mut child = server_command(&path)
        .args(["--bind", "127.0.0.1:0", "--authkey", KEY])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", path.display())));
    let mut lines = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    let addr = loop {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            fail("distq-server exited before listening");
        }
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().parse().expect("address in the log line");
        }
    };
    thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = lines.read_to_end(&mut sink);
    });
    (
        Proc {
            child,
            name: "distq-server",
        },
        addr,
    )
}

fn start_python_server(python: &str) -> Option<(Proc, SocketAddr)> {
    let mut child = server_command(python)
        .args([PY_CLIENTS, "server"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| eprintln!("bench: cannot start {python}: {e}; skipping Python cases"))
        .ok()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .ok()?;
    let port: u16 = line.trim().parse().ok()?;
    Some((
        Proc {
            child,
            name: "python server",
        },
        SocketAddr::from(([127, 0, 0, 1], port)),
    ))
}

/// Runs a `py_clients.py` mode and returns the number under `key` in its JSON output.
fn py(opts: &Opts, args: &[String], key: &str) -> Vec<f64> {
    let out = Command::new(&opts.python)
        .arg(PY_CLIENTS)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| fail(&format!("running {}: {e}", opts.python)));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        fail(&format!("py_clients.py {args:?} failed: {text}"));
    }
    // The output is one flat JSON object; a number or a list of numbers under `key`.
    let after = text
        .split(&format!("\"{key}\":"))
        .nth(1)
        .unwrap_or_else(|| fail(&format!("no {key} in {text}")));
    let end = after.find(['}', ']']).unwrap_or(after.len());
    after[..end]
        .trim_start_matches([' ', '['])
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// A free loopback port (bound, read, released: the kernel does not hand it out again at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding port 0")
}

fn start_redis() -> Option<(Proc, u16)> {
    let port = free_port();
    let child = server_command("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let proc = Proc {
        child,
        name: "redis-server",
    };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() {
                return Some((proc, port));
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `redis-benchmark -t lpush,rpop -c 16` requests per second for LPUSH and RPOP.
fn redis_bench(port: u16, requests: usize) -> (f64, f64) {
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "lpush,rpop",
            "-c",
            "16",
            "--csv",
        ])
        .args(["-n", &requests.to_string()])
        .output()
        .unwrap_or_else(|e| fail(&format!("redis-benchmark: {e}")));
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = |name: &str| {
        text.lines()
            .find(|l| l.trim_start_matches('"').starts_with(name))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or(f64::NAN)
    };
    (rate("LPUSH"), rate("RPOP"))
}

fn rss_bytes(pid: u32) -> f64 {
    status_bytes(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb * 1024.0)
}

// ---------------------------------------------------------------------------------------
// Case 1: the kernel floor, a std-only length-prefixed echo (thread per connection)

/// The frame sizes of distq's put and get requests and their replies, so that the floor
/// moves exactly as many bytes per round trip as the real thing.
struct FrameSizes {
    put: usize,
    get: usize,
    reply_none: usize,
    reply_item: usize,
}

fn frame_sizes() -> FrameSizes {
    let size = |v: &Value| {
        let mut buf = Vec::new();
        encode_frame(v, &mut buf).expect("encodes");
        buf.len() - distq::frame::HEADER_RESERVE
    };
    let reply = |r: Reply| {
        let mut buf = Vec::new();
        encode_reply_frame(&r, &mut buf).expect("encodes");
        buf.len() - distq::frame::HEADER_RESERVE
    };
    let ident = Some("d15700000000".to_string());
    let put = Request {
        ident: ident.clone(),
        method: "put".into(),
        args: vec![distq::protocol::Arg::Value(Value::Int(12345))],
        kwargs: vec![],
    };
    let get = Request {
        ident,
        method: "get".into(),
        args: vec![],
        kwargs: vec![(
            "timeout".into(),
            distq::protocol::Arg::Value(Value::Float(5.0)),
        )],
    };
    FrameSizes {
        put: size(&put.to_value().expect("plain values")),
        get: size(&get.to_value().expect("plain values")),
        reply_none: reply(Reply::Return(Value::None)),
        reply_item: reply(Reply::Return(Value::Int(12345))),
    }
}

/// The echo server, a child process (`bench --serve-floor`) like every other server:
/// reads a frame and answers with a frame of the size written in the request's first 4
/// payload bytes. Prints its port, then serves until killed.
fn serve_floor() -> ! {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    let _ = std::io::stdout().flush();
    for stream in listener.incoming().flatten() {
        thread::spawn(move || floor_serve(stream));
    }
    std::process::exit(0)
}

fn start_floor_server() -> (Proc, SocketAddr) {
    let mut child = server_command(std::env::current_exe().expect("current_exe"))
        .arg("--serve-floor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start the echo server: {e}")));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("echo server port");
    let port: u16 = line.trim().parse().expect("echo server port");
    (
        Proc {
            child,
            name: "echo server",
        },
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
}

fn floor_serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 4];
        if reader.read_exact(&mut head).is_err() {
            return;
        }
        buf.resize(u32::from_be_bytes(head) as usize, 0);
        if reader.read_exact(&mut buf).is_err() {
            return;
        }
        let want = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        out.clear();
        out.extend_from_slice(&(want as u32).to_be_bytes());
        out.resize(4 + want, 0);
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

/// Runs `clients` threads; each sets itself up, waits for the common start, then loops
/// until told to stop and returns how many calls it made. Returns calls per second.
fn counted<F>(clients: usize, secs: f64, setup_and_loop: F) -> f64
where
    F: Fn(&Barrier, &AtomicBool) -> u64 + Send + Sync + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(clients + 1));
    let f = Arc::new(setup_and_loop);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, start, f) = (stop.clone(), start.clone(), f.clone());
            thread::spawn(move || f(&start, &stop))
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = threads.into_iter().map(|t| t.join().expect("client")).sum();
    total as f64 / t0.elapsed().as_secs_f64()
}

/// Echo round trips per second over `clients` connections; each client alternates
/// put-sized and get-sized requests and reads replies of the matching sizes, as the
/// put+get cases do.
fn floor(addr: SocketAddr, clients: usize, secs: f64) -> f64 {
    counted(clients, secs, move |start, stop| {
        let sizes = frame_sizes();
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let frame = |len: usize, reply: usize| {
            let mut f = (len as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&(reply as u32).to_be_bytes());
            f.resize(4 + len, 0);
            f
        };
        let put = frame(sizes.put, sizes.reply_none);
        let get = frame(sizes.get, sizes.reply_item);
        let mut reader = BufReader::new(&stream);
        let mut writer = &stream;
        let mut buf = vec![0u8; 256];
        let mut round_trip = |req: &[u8]| {
            writer.write_all(req).expect("write");
            let mut head = [0u8; 4];
            reader.read_exact(&mut head).expect("read");
            buf.resize(u32::from_be_bytes(head) as usize, 0);
            reader.read_exact(&mut buf).expect("read");
        };
        for _ in 0..100 {
            round_trip(&put);
            round_trip(&get);
        }
        start.wait();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            round_trip(&put);
            round_trip(&get);
            n += 2;
        }
        n
    })
}

// ---------------------------------------------------------------------------------------
// distq cases (Rust client library against the distq-server child)

fn manager(addr: SocketAddr) -> Manager {
    Manager::connect(addr, AuthKey::new(KEY)).expect("connect to distq-server")
}

const T: Duration = Duration::from_secs(30);

/// Round trips (calls) per second of `clients` connections doing put then get on one queue.
fn distq_put_get(addr: SocketAddr, clients: usize, queue: &'static str, secs: f64) -> f64 {
    counted(clients, secs, move |start, stop| {
        let q = manager(addr).queue(queue).expect("queue");
        for i in 0..100 {
            q.put(i).expect("put");
            q.get(T).expect("get");
        }
        start.wait();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            q.put(12345).expect("put");
            q.get(T).expect("get");
            n += 2;
        }
        n
    })
}

/// The classic pipeline with `workers` threads; `batch` 0 means put/get one at a time.
/// Returns tasks per second, from the master's first put to its last result.
fn distq_pipeline(addr: SocketAddr, tasks: usize, workers: usize, batch: usize) -> f64 {
    let ready = Arc::new(Barrier::new(workers + 1));
    let done = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (ready, done) = (ready.clone(), done.clone());
            thread::spawn(move || {
                let m = manager(addr);
                let (tq, rq) = (
                    m.queue("get_task_queue").unwrap(),
                    m.queue("get_result_queue").unwrap(),
                );
                tq.qsize().unwrap(); // open both method channels before the clock starts
                rq.qsize().unwrap();
                ready.wait();
                let poll = Duration::from_millis(50);
                let square = |v: &Value| {
                    let n = v.as_int().expect("int task");
                    Value::str(&format!("{n} * {n} = {}", i128::from(n) * i128::from(n)))
                };
                loop {
                    let got = if batch == 0 {
                        tq.get(poll).and_then(|v| rq.put(square(&v)))
                    } else {
                        tq.get_many(batch, poll)
                            .and_then(|vs| rq.put_many(vs.iter().map(square).collect(), None))
                    };
                    match got {
                        Ok(()) => {}
                        Err(Error::Empty) if done.load(Ordering::SeqCst) => return,
                        Err(Error::Empty) => {}
                        Err(e) => panic!("worker: {e}"),
                    }
                }
            })
        })
        .collect();
    let m = manager(addr);
    let (tq, rq) = (
        m.queue("get_task_queue").unwrap(),
        m.queue("get_result_queue").unwrap(),
    );
    tq.qsize().unwrap();
    rq.qsize().unwrap();
    ready.wait();
    let t0 = Instant::now();
    if batch == 0 {
        for i in 0..tasks {
            tq.put(i as i64).unwrap();
        }
        for _ in 0..tasks {
            rq.get(T).unwrap();
        }
    } else {
        for chunk in (0..tasks as i64).collect::<Vec<_>>().chunks(batch) {
            tq.put_many(chunk.iter().map(|&i| Value::Int(i)).collect(), None)
                .unwrap();
        }
        let mut got = 0;
        while got < tasks {
            got += rq.get_many(batch, T).unwrap().len();
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("worker thread");
    }
    tasks as f64 / elapsed
}

/// A scratch file for a classic run's output.
fn scratch_file(name: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("distq-bench-{}-{name}", std::process::id()));
    std::fs::File::create(&path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())))
}

/// Polls the output `read` returns until a line contains `marker`; returns that line.
fn wait_for_line(child: &mut Child, read: impl Fn() -> String, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = read().lines().find(|l| l.contains(marker)) {
            return line.to_string();
        }
        if Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
            fail(&format!("no {marker:?} line from a classic master"));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// The classic job with the real programs: `distq-master --tasks N` hosting its server
/// (on the servers' CPU) and `workers` `distq-worker` processes, every line of output
/// going to files. Tasks per second from the master's start to its exit.
fn classic_binaries(tasks: usize, workers: usize) -> f64 {
    let dir = bin_dir();
    let out_path = std::env::temp_dir().join(format!("distq-bench-{}-master", std::process::id()));
    let t0 = Instant::now();
    let mut master = server_command(dir.join("distq-master"))
        .args(["--bind", "127.0.0.1:0", "--authkey", KEY, "--tasks"])
        .arg(tasks.to_string())
        .stdout(std::fs::File::create(&out_path).expect("master output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start distq-master: {e}")));
    let read = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let line = wait_for_line(&mut master, read, "Listening on ");
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut ws: Vec<Child> = (0..workers)
        .map(|i| {
            Command::new(dir.join("distq-worker"))
                .args(["--connect", &addr, "--authkey", KEY, "--forever"])
                .stdout(scratch_file(&format!("worker{i}")))
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| fail(&format!("cannot start distq-worker: {e}")))
        })
        .collect();
    let status = master.wait().expect("wait for distq-master");
    let elapsed = t0.elapsed().as_secs_f64();
    if !status.success() {
        fail(&format!("distq-master failed: {status}"));
    }
    for w in &mut ws {
        let _ = w.wait(); // the master ended the job: they exit at once
    }
    tasks as f64 / elapsed
}

/// The seed's `task_master.py` (Python's own server, on the servers' CPU) and `workers`
/// `task_worker.py`, output to files, timed like [`classic_binaries`].
fn classic_scripts(python: &str, tasks: usize, workers: usize) -> f64 {
    let out_path =
        std::env::temp_dir().join(format!("distq-bench-{}-pymaster", std::process::id()));
    let t0 = Instant::now();
    let mut master = server_command(python)
        .args([SEED_MASTER, KEY])
        .arg(tasks.to_string())
        .stdout(std::fs::File::create(&out_path).expect("master output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {python}: {e}")));
    let read = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let line = wait_for_line(&mut master, read, "ADDRESS ");
    let port = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let ws: Vec<Proc> = (0..workers)
        .map(|i| Proc {
            child: Command::new(python)
                .args([SEED_WORKER, "127.0.0.1", &port, KEY])
                .arg(tasks.to_string())
                .stdout(scratch_file(&format!("pyworker{i}")))
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| fail(&format!("cannot start {python}: {e}"))),
            name: "task_worker.py",
        })
        .collect();
    let status = master.wait().expect("wait for task_master.py");
    let elapsed = t0.elapsed().as_secs_f64();
    if !status.success() {
        fail(&format!("task_master.py failed: {status}"));
    }
    drop(ws); // they would poll the gone server for their remaining rounds
    tasks as f64 / elapsed
}

/// Milliseconds from starting the seed's `task_worker.py` (a new Python process) to its
/// first "run task" line, with one task waiting on the server at `port`: interpreter start,
/// connect, two proxies, the first `get`. The median of `samples` runs.
fn seed_worker_first_task(python: &str, port: u16, samples: usize) -> f64 {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let m = manager(addr);
    let (tasks, results) = (
        m.queue("get_task_queue").unwrap(),
        m.queue("get_result_queue").unwrap(),
    );
    let mut ms = Vec::new();
    for i in 0..samples {
        tasks.put(i as i64).unwrap();
        let t0 = Instant::now();
        let mut child = Command::new(python)
            .args([SEED_WORKER, "127.0.0.1", &port.to_string(), KEY, "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot start {python}: {e}")));
        let mut lines = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                fail("task_worker.py ended before running its task");
            }
            if line.starts_with("run task") {
                break;
            }
        }
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        let _ = child.wait();
        results.get(T).unwrap();
    }
    median(&mut ms)
}

/// Milliseconds from nothing to the first reply: connect (with its `dummy` call), create
/// the proxy, open its method channel with the first `put`.
fn distq_cold(addr: SocketAddr, samples: usize) -> f64 {
    let mut ms: Vec<f64> = (0..samples)
        .map(|i| {
            let t0 = Instant::now();
            let q = manager(addr).queue("get_cold_queue").unwrap();
            q.put(i as i64).unwrap();
            let t = t0.elapsed().as_secs_f64() * 1e3;
            q.get(T).unwrap();
            t
        })
        .collect();
    median(&mut ms)
}

fn distq_big(addr: SocketAddr, samples: usize, size: usize) -> f64 {
    let q = manager(addr).queue("get_big_queue").unwrap();
    let item = Value::Bytes(vec![0u8; size].into());
    q.put(Value::None).unwrap();
    q.get(T).unwrap();
    let mut ms: Vec<f64> = (0..samples)
        .map(|_| {
            let t0 = Instant::now();
            q.put(item.clone()).unwrap();
            q.get(T).unwrap();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(&mut ms)
}

/// Server RSS: idle (all, and the anonymous part: the rest is shared library and
/// binary pages), bytes per queued small int, bytes per idle connection. A fresh
/// distq-server for each measurement set, so nothing left by other cases counts.
/// Idle RSS and RssAnon of the static release `distq-server` (what ships; built by
/// scripts/bench when the nightly toolchain is there, path in `DISTQ_RELEASE_SERVER`).
fn release_server_idle() -> Option<(f64, f64)> {
    let path = PathBuf::from(std::env::var_os("DISTQ_RELEASE_SERVER")?);
    if !path.exists() {
        return None;
    }
    let (server, _) = start_server_binary(&path);
    thread::sleep(Duration::from_millis(200));
    let idle = (
        rss_bytes(server.pid()),
        status_bytes(server.pid(), "RssAnon:"),
    );
    drop(server);
    Some(idle)
}

fn distq_memory() -> (f64, f64, f64, f64) {
    let (server, addr) = start_distq_server();
    let pid = server.pid();
    thread::sleep(Duration::from_millis(200));
    let idle = rss_bytes(pid);
    let idle_anon = status_bytes(pid, "RssAnon:");

    let m = manager(addr);
    let q = m.queue("get_mem_queue").unwrap();
    q.qsize().unwrap();
    thread::sleep(Duration::from_millis(50));
    let before = rss_bytes(pid);
    const ITEMS: i64 = 100_000;
    for chunk in (0..ITEMS).collect::<Vec<_>>().chunks(1000) {
        // Small ints below 65,536, as a task queue of ids would hold.
        q.put_many(
            chunk.iter().map(|&i| Value::Int(i % 60_000)).collect(),
            None,
        )
        .unwrap();
    }
    thread::sleep(Duration::from_millis(50));
    let per_item = (rss_bytes(pid) - before) / ITEMS as f64;

    const CONNS: usize = 1000;
    let before = rss_bytes(pid);
    let proxies: Vec<_> = (0..CONNS)
        .map(|_| {
            let p = m.queue("get_mem_queue").unwrap();
            p.qsize().unwrap(); // opens the method channel, which then sits idle
            p
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let per_conn = (rss_bytes(pid) - before) / CONNS as f64;
    drop(proxies);
    drop(server);
    (idle, idle_anon, per_item, per_conn)
}

// ---------------------------------------------------------------------------------------
// Results

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Every measurement of the run: (case, unit) -> one value per round.
#[derive(Default)]
struct Results {
    rows: Vec<(String, &'static str, Vec<f64>)>,
}

impl Results {
    fn add(&mut self, case: &str, unit: &'static str, value: f64) {
        eprintln!("  {case:<58} {} {unit}", fmt(value));
        match self.rows.iter_mut().find(|(c, _, _)| c == case) {
            Some((_, _, v)) => v.push(value),
            None => self.rows.push((case.to_string(), unit, vec![value])),
        }
    }

    fn get(&self, case: &str) -> Option<&[f64]> {
        self.rows
            .iter()
            .find(|(c, _, _)| c == case)
            .map(|(_, _, v)| &v[..])
    }
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let med = median(&mut s);
    let min = s.first().copied().unwrap_or(f64::NAN);
    let max = s.last().copied().unwrap_or(f64::NAN);
    (med, min, max)
}

/// A target: `num / den` (per round) compared with `limit`; `at_least` says which way.
/// With `den` empty, `num` itself is compared with the limit.
struct Target {
    name: &'static str,
    num: &'static str,
    den: &'static str,
    limit: f64,
    at_least: bool,
}

const TARGETS: &[Target] = &[
    Target {
        name: "round trip, 1 conn: distq / kernel floor",
        num: "2 round trip: distq Rust client -> distq-server",
        den: "1 kernel floor: echo, 1 conn",
        limit: 0.9,
        at_least: true,
    },
    Target {
        name: "pipeline W=4: distq / Python managers",
        num: "3 pipeline W=4: distq (Rust threads) -> distq-server",
        den: "3 pipeline W=4: Python -> Python server",
        limit: 5.0,
        at_least: true,
    },
    Target {
        name: "pipeline W=4: Python clients, distq-server / Python server",
        num: "3 pipeline W=4: Python -> distq-server",
        den: "3 pipeline W=4: Python -> Python server",
        limit: 2.0,
        at_least: true,
    },
    Target {
        name: "classic W=4, the programs: distq-master + distq-worker / seed scripts on Python",
        num: "8 classic W=4: distq-master + distq-worker processes",
        den: "8 classic W=4: seed task_master.py + task_worker.py, Python server",
        limit: 5.0,
        at_least: true,
    },
    Target {
        name: "classic W=4, the programs / batched (64) library pipeline W=4",
        num: "8 classic W=4: distq-master + distq-worker processes",
        den: "4 batched W=4: distq (Rust threads) -> distq-server",
        limit: 0.5,
        at_least: true,
    },
    Target {
        name: "batched (64) W=4: distq / Python managers unbatched W=4",
        num: "4 batched W=4: distq (Rust threads) -> distq-server",
        den: "3 pipeline W=4: Python -> Python server",
        limit: 50.0,
        at_least: true,
    },
    Target {
        name: "16 clients: distq put+get / Redis LPUSH",
        num: "5 16 clients put+get: distq -> distq-server",
        den: "5 16 clients: redis-benchmark LPUSH",
        limit: 1.1,
        at_least: true,
    },
    Target {
        name: "cold connect to first reply, distq (ms)",
        num: "6 cold connect..first reply: distq Rust client",
        den: "",
        limit: 1.0,
        at_least: false,
    },
    Target {
        name: "put+get of a 17,000-byte item, distq (ms)",
        num: "6 put+get 17,000 B item: distq Rust client",
        den: "",
        limit: 0.5,
        at_least: false,
    },
    Target {
        name: "idle server RSS, static release build (MiB)",
        num: "7 distq-server (static release build) RSS idle",
        den: "",
        limit: 2.0,
        at_least: false,
    },
    Target {
        name: "idle server RSS, glibc release build (MiB)",
        num: "7 distq-server RSS idle",
        den: "",
        limit: 2.0,
        at_least: false,
    },
    Target {
        name: "queued small ints (bytes/item)",
        num: "7 distq-server RSS per queued small int",
        den: "",
        limit: 8.0,
        at_least: false,
    },
    Target {
        name: "idle connection (KiB)",
        num: "7 distq-server RSS per idle connection",
        den: "",
        limit: 64.0,
        at_least: false,
    },
];

/// Unit conversions for the targets stated in MiB / KiB.
fn target_scale(t: &Target) -> f64 {
    if t.name.contains("MiB") {
        1.0 / (1024.0 * 1024.0)
    } else if t.name.contains("KiB") {
        1.0 / 1024.0
    } else {
        1.0
    }
}

fn print_report(results: &Results, opts: &Opts, sizes: &FrameSizes) {
    println!();
    println!(
        "distq benchmark: {} rounds, {} s per throughput case, {} pipeline tasks, {} cores, {}, {}",
        opts.rounds,
        opts.secs,
        opts.tasks,
        online_cpus(),
        cpu_model(),
        match (PINNED.load(Ordering::Relaxed), opts.pin.as_str()) {
            (true, "split") => "pinned: servers on CPU 0, clients on CPU 1",
            (true, _) => "pinned: everything on CPU 0",
            _ => "not pinned",
        }
    );
    println!(
        "frame payload sizes: put {} B, get {} B, replies {} / {} B",
        sizes.put, sizes.get, sizes.reply_none, sizes.reply_item
    );
    println!();
    println!("| case | unit | median | min–max |");
    println!("|---|---|---:|---:|");
    for (case, unit, v) in &results.rows {
        let (med, min, max) = summary(v);
        println!(
            "| {case} | {unit} | {} | {}–{} |",
            fmt(med),
            fmt(min),
            fmt(max)
        );
    }
    println!();
    println!("| target | median (min–max) over rounds | target | met |");
    println!("|---|---:|---:|---|");
    for t in TARGETS {
        let Some(num) = results.get(t.num) else {
            continue;
        };
        let per_round: Vec<f64> = if t.den.is_empty() {
            num.iter().map(|x| x * target_scale(t)).collect()
        } else {
            let Some(den) = results.get(t.den) else {
                println!("| {} | (no {}) | | skipped |", t.name, t.den);
                continue;
            };
            num.iter().zip(den).map(|(a, b)| a / b).collect()
        };
        let (med, min, max) = summary(&per_round);
        let met = if t.at_least {
            med >= t.limit
        } else {
            med <= t.limit
        };
        let (op, suffix) = match (t.at_least, t.den.is_empty()) {
            (true, false) => (">=", "x"),
            (true, true) => (">=", ""),
            (false, false) => ("<=", "x"),
            (false, true) => ("<=", ""),
        };
        println!(
            "| {} | {}{suffix} ({}–{}) | {op} {}{suffix} | {} |",
            t.name,
            fmt(med),
            fmt(min),
            fmt(max),
            t.limit,
            if met { "met" } else { "NOT met" }
        );
    }
}

/// CPUs of the machine (not of this process, which may be pinned to one).
fn online_cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

// ---------------------------------------------------------------------------------------

fn main() {
    let opts = parse_opts();
    PINNED.store(pin_self(&opts), Ordering::Relaxed);
    let started = Instant::now();
    let sizes = frame_sizes();
    let (floor_proc, floor_addr) = start_floor_server();
    let (distq, distq_addr) = start_distq_server();
    let python = if opts.skip_python {
        None
    } else {
        start_python_server(&opts.python)
    };
    let redis = if opts.skip_redis || !opts.wants("many") {
        None
    } else {
        let found = Command::new("redis-benchmark")
            .arg("--version")
            .output()
            .is_ok();
        let r = if found { start_redis() } else { None };
        if r.is_none() {
            eprintln!(
                "bench: redis-server/redis-benchmark not available: skipping the Redis case \
                 (apt-get install -y redis-server; scripts/bench does this)"
            );
        }
        r
    };
    eprintln!(
        "bench: distq-server {distq_addr} (pid {}), python server {}, redis {}",
        distq.pid(),
        python
            .as_ref()
            .map_or("skipped".into(), |(p, a)| format!("{a} (pid {})", p.pid())),
        redis.as_ref().map_or("skipped".into(), |(p, port)| format!(
            "port {port} (pid {})",
            p.pid()
        ))
    );
    let py_port = python.as_ref().map(|(_, a)| a.port().to_string());
    let dq_port = distq_addr.port().to_string();
    let secs = opts.secs;
    let s = |x: &dyn ToString| x.to_string();

    let mut r = Results::default();
    if opts.wants("mem") {
        // Measured once, before any case has touched them.
        thread::sleep(Duration::from_millis(200));
        if let Some((p, _)) = &python {
            r.add("7 Python server RSS idle", "bytes", rss_bytes(p.pid()));
        }
        if let Some((p, _)) = &redis {
            r.add("7 redis-server RSS idle", "bytes", rss_bytes(p.pid()));
        }
    }
    for round in 1..=opts.rounds {
        eprintln!(
            "round {round}/{} ({:.0} s so far)",
            opts.rounds,
            started.elapsed().as_secs_f64()
        );
        if opts.wants("floor") || opts.wants("rt") || opts.wants("many") {
            r.add(
                "1 kernel floor: echo, 1 conn",
                "round trips/s",
                floor(floor_addr, 1, secs),
            );
            r.add(
                "1 kernel floor: echo, 16 conns",
                "round trips/s",
                floor(floor_addr, 16, secs),
            );
        }
        if opts.wants("rt") {
            r.add(
                "2 round trip: distq Rust client -> distq-server",
                "calls/s",
                distq_put_get(distq_addr, 1, "get_rt_queue", secs),
            );
            for (label, port) in [
                ("distq-server", Some(&dq_port)),
                ("Python server", py_port.as_ref()),
            ] {
                if let (Some(port), false) = (port, opts.skip_python || python.is_none()) {
                    let v = py(
                        &opts,
                        &[s(&"roundtrip"), s(port), format!("{secs:.2}")],
                        "calls_per_s",
                    );
                    r.add(
                        &format!("2 round trip: Python client -> {label}"),
                        "calls/s",
                        v[0],
                    );
                }
            }
        }
        if opts.wants("pipe") {
            for w in [1, 2, 4, 8] {
                r.add(
                    &format!("3 pipeline W={w}: distq (Rust threads) -> distq-server"),
                    "tasks/s",
                    distq_pipeline(distq_addr, opts.tasks, w, 0),
                );
                if let Some(py_port) = &py_port {
                    for (label, port) in [("distq-server", &dq_port), ("Python server", py_port)] {
                        let v = py(
                            &opts,
                            &[s(&"pipeline"), s(port), s(&opts.tasks), s(&w)],
                            "tasks_per_s",
                        );
                        r.add(
                            &format!("3 pipeline W={w}: Python -> {label}"),
                            "tasks/s",
                            v[0],
                        );
                    }
                }
            }
        }
        if opts.wants("classic") {
            for w in [1, 2, 4, 8] {
                r.add(
                    &format!("8 classic W={w}: distq-master + distq-worker processes"),
                    "tasks/s",
                    classic_binaries(opts.tasks, w),
                );
                if !opts.skip_python {
                    r.add(
                        &format!(
                            "8 classic W={w}: seed task_master.py + task_worker.py, Python server"
                        ),
                        "tasks/s",
                        classic_scripts(&opts.python, opts.tasks, w),
                    );
                }
            }
        }
        if opts.wants("batch") {
            for w in [1, 4] {
                r.add(
                    &format!("4 batched W={w}: distq (Rust threads) -> distq-server"),
                    "tasks/s",
                    distq_pipeline(distq_addr, opts.tasks * 5, w, 64),
                );
            }
            if py_port.is_some() {
                let v = py(
                    &opts,
                    &[
                        s(&"pipeline"),
                        s(&dq_port),
                        s(&(opts.tasks * 5)),
                        s(&4),
                        s(&64),
                    ],
                    "tasks_per_s",
                );
                r.add("4 batched W=4: Python -> distq-server", "tasks/s", v[0]);
            }
        }
        if opts.wants("many") {
            r.add(
                "5 16 clients put+get: distq -> distq-server",
                "calls/s",
                distq_put_get(distq_addr, 16, "get_many_queue", secs),
            );
            if let Some((_, port)) = &redis {
                let (lpush, rpop) = redis_bench(*port, (150_000.0 * secs) as usize);
                r.add("5 16 clients: redis-benchmark LPUSH", "requests/s", lpush);
                r.add("5 16 clients: redis-benchmark RPOP", "requests/s", rpop);
            }
        }
        if opts.wants("lat") {
            r.add(
                "6 cold connect..first reply: distq Rust client",
                "ms",
                distq_cold(distq_addr, 20),
            );
            if let Some(py_port) = &py_port {
                for (label, port) in [("distq-server", &dq_port), ("Python server", py_port)] {
                    let mut v = py(&opts, &[s(&"cold"), s(port), s(&5)], "ms");
                    r.add(
                        &format!("6 cold connect..first reply: Python -> {label}"),
                        "ms",
                        median(&mut v),
                    );
                }
            }
            if let Some(py_port) = &py_port {
                for (label, port) in [("distq-server", &dq_port), ("Python server", py_port)] {
                    let port: u16 = port.parse().expect("a port");
                    r.add(
                        &format!("6 seed task_worker.py start..first task: {label}"),
                        "ms",
                        seed_worker_first_task(&opts.python, port, 3),
                    );
                }
            }
            r.add(
                "6 put+get 17,000 B item: distq Rust client",
                "ms",
                distq_big(distq_addr, 50, 17_000),
            );
            if let Some(py_port) = &py_port {
                for (label, port, n) in [
                    ("distq-server", &dq_port, 20),
                    ("Python server", py_port, 3),
                ] {
                    let mut v = py(&opts, &[s(&"big"), s(port), s(&n), s(&17_000)], "ms");
                    r.add(
                        &format!("6 put+get 17,000 B item: Python -> {label}"),
                        "ms",
                        median(&mut v),
                    );
                }
            }
        }
        if opts.wants("mem") {
            if let Some((idle, anon)) = release_server_idle() {
                r.add(
                    "7 distq-server (static release build) RSS idle",
                    "bytes",
                    idle,
                );
                r.add(
                    "7 distq-server (static release build) RssAnon idle",
                    "bytes",
                    anon,
                );
            }
            let (idle, idle_anon, per_item, per_conn) = distq_memory();
            r.add("7 distq-server RSS idle", "bytes", idle);
            r.add("7 distq-server RssAnon idle", "bytes", idle_anon);
            r.add(
                "7 distq-server RSS per queued small int",
                "bytes/item",
                per_item,
            );
            r.add(
                "7 distq-server RSS per idle connection",
                "bytes/conn",
                per_conn,
            );
        }
    }
    print_report(&r, &opts, &sizes);
    println!();
    println!("total time {:.0} s", started.elapsed().as_secs_f64());
    let procs = [
        Some(floor_proc),
        Some(distq),
        python.map(|p| p.0),
        redis.map(|r| r.0),
    ];
    for p in procs.into_iter().flatten() {
        eprintln!("bench: stopping {} (pid {})", p.name, p.pid());
        drop(p);
    }
}
