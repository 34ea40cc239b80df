//! Unix-domain sockets (issue 13, item 9): Python's managers accept
//! `address='/run/app/queue.sock'` (and Linux's abstract `'\0name'`); so do distq's
//! server, client and binaries. Same handshake, same limits, paths under a per-test
//! temporary directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use distq::{Address, AuthKey, ClientConfig, Error, Manager, Server, ServerConfig, Value};

/// A fresh directory for one test's sockets, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("distq-unix-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix_server(path: &Path, adjust: impl FnOnce(&mut ServerConfig)) -> distq::RunningServer {
    quiet_logs();
    let mut config = ServerConfig::new(AuthKey::new(KEY));
    adjust(&mut config);
    Server::bind_unix(path, config)
        .expect("bind a unix socket")
        .spawn()
        .expect("spawn server")
}

/// A Python `BaseManager` client on a Unix socket (`@name`: the abstract `'\0name'`,
/// since an argument cannot hold a NUL): puts, gets, and leaves one item for the next
/// reader.
const PY_CLIENT: &str = "import sys\n\
from multiprocessing.managers import BaseManager\n\
class M(BaseManager): pass\n\
M.register('get_task_queue')\n\
addr = sys.argv[1]\n\
addr = '\\0' + addr[1:] if addr.startswith('@') else addr\n\
m = M(address=addr, authkey=sys.argv[2].encode())\n\
m.connect()\n\
q = m.get_task_queue()\n\
q.put({'n': 1, 'l': [1, 2, 3], 's': 'x' * 20000})\n\
v = q.get(timeout=5)\n\
assert v == {'n': 1, 'l': [1, 2, 3], 's': 'x' * 20000}, v\n\
q.put(('from python', sys.version_info[:2]))\n\
print('OK', flush=True)\n";

/// Python's own manager server on a Unix socket with `n` int tasks; prints each result
/// a worker puts, then serves on until the file `PATH.done` appears (the worker has
/// exited: it still talks to the server after its last put).
const PY_SERVER: &str = "import sys, queue, threading\n\
from multiprocessing.managers import BaseManager\n\
path, key, n = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])\n\
tasks, results = queue.Queue(), queue.Queue()\n\
for i in range(n): tasks.put(i)\n\
class M(BaseManager): pass\n\
M.register('get_task_queue', callable=lambda: tasks)\n\
M.register('get_result_queue', callable=lambda: results)\n\
server = M(address=path, authkey=key).get_server()\n\
threading.Thread(target=server.serve_forever, daemon=True).start()\n\
print('READY', flush=True)\n\
for _ in range(n): print('RESULT', results.get(timeout=30), flush=True)\n\
import os, time\n\
deadline = time.time() + 30\n\
while not os.path.exists(path + '.done') and time.time() < deadline: time.sleep(0.02)\n";

/// Where a socket file for `py` lives, as this process names it and as `py` does: a
/// chrooted interpreter (`chroot ROOT python3`, how CI runs Python 3.14) sees the files
/// under ROOT, so its socket goes there. Others share the path, returned twice.
fn path_for(py: &Python, path: &Path) -> (PathBuf, String) {
    let seen = path.to_str().unwrap().to_string();
    match py.cmd.as_slice() {
        [chroot, root, ..] if chroot == "chroot" => {
            let host = Path::new(root).join(path.strip_prefix("/").unwrap());
            std::fs::create_dir_all(host.parent().unwrap()).unwrap();
            (host, seen)
        }
        _ => (path.to_path_buf(), seen),
    }
}

/// Every Python found (at least 3.8 and 3.13 in CI) puts and gets through an
/// in-process distq server on a socket file and on an abstract name; the Rust client
/// reads what each left.
#[test]
fn python_clients_use_a_unix_socket() {
    let dir = TempDir::new("python");
    let path = dir.join("q.sock");
    let server = unix_server(&path, |_| {});
    let rust = Manager::connect_unix(&path, AuthKey::new(KEY)).unwrap();
    let tasks = rust.queue("get_task_queue").unwrap();
    let abstract_name = format!("\0distq-test-{}", std::process::id());
    let abstract_server = unix_server(Path::new(&abstract_name), |_| {});
    let pythons = require_pythons();
    for py in &pythons {
        let (host, seen) = path_for(py, &dir.join("python-q.sock"));
        let own = (host != path).then(|| unix_server(&host, |_| {}));
        let out = py.run_ok(PY_CLIENT, &[&seen, KEY]);
        assert!(out.contains("OK"), "{:?}: {out}", py.version);
        let left = match own {
            Some(own) => {
                let m = Manager::connect_unix(&host, AuthKey::new(KEY)).unwrap();
                let left = m
                    .queue("get_task_queue")
                    .unwrap()
                    .get(Duration::from_secs(5));
                drop(m);
                own.shutdown().unwrap();
                left.unwrap()
            }
            None => tasks.get(Duration::from_secs(5)).unwrap(),
        };
        let want = format!("('from python', ({}, {}))", py.version.0, py.version.1);
        assert_eq!(left.to_string(), want);
    }
    // Linux's abstract namespace: no file, the name alone.
    if let Some(py) = pythons.last() {
        let out = py.run_ok(PY_CLIENT, &[&abstract_name.replace('\0', "@"), KEY]);
        assert!(out.contains("OK"), "{out}");
        let m = Manager::connect_unix(&abstract_name, AuthKey::new(KEY)).unwrap();
        let q = m.queue("get_task_queue").unwrap();
        assert!(q
            .get(Duration::from_secs(5))
            .unwrap()
            .to_string()
            .contains("from python"));
    }
    drop(tasks);
    abstract_server.shutdown().unwrap();
    server.shutdown().unwrap();
    assert!(
        !path.exists(),
        "the socket file is removed when the server stops"
    );
}

/// The Rust client: put/get, `connect_to`, a wrong key refused, and a proxy that
/// reconnects to a server restarted on the same path.
#[test]
fn a_rust_client_on_a_unix_socket_reconnects() {
    let dir = TempDir::new("rust");
    let path = dir.join("q.sock");
    let server = unix_server(&path, |_| {});
    assert_eq!(server.address(), &Address::Unix(path.clone()));
    let mut config = ClientConfig::default();
    config.reconnect_for = Duration::from_secs(10);
    let address = Address::parse(path.to_str().unwrap());
    let m = Manager::connect_to(&address, AuthKey::new(KEY), config).unwrap();
    assert_eq!(m.address(), address);
    let q = m.queue("jobs").unwrap();
    q.put(Value::from(7)).unwrap();
    assert_eq!(q.get(Duration::from_secs(1)).unwrap(), Value::from(7));
    assert!(matches!(
        Manager::connect_unix(&path, AuthKey::new("wrong")),
        Err(Error::AuthFailed(_))
    ));
    server.shutdown().unwrap();
    assert!(!path.exists());
    let err = Manager::connect_unix(&path, AuthKey::new(KEY)).unwrap_err();
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

    // The proxy's channel is gone; a server back on the path within `reconnect_for`
    // takes the retried call.
    let restart = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            unix_server(&path, |_| {})
        })
    };
    q.put(Value::from(8)).unwrap();
    let server = restart.join().unwrap();
    assert_eq!(q.get(Duration::from_secs(1)).unwrap(), Value::from(8));
    drop(q);
    server.shutdown().unwrap();
}

/// A socket file whose server died (nothing listens) is replaced; one a server answers
/// on is refused with "address in use", and so is a path that is not a socket.
#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
    let dir = TempDir::new("stale");
    let path = dir.join("q.sock");
    // A listener dropped without removing its file: what a killed server leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = unix_server(&path, |_| {});
    let m = Manager::connect_unix(&path, AuthKey::new(KEY)).unwrap();
    m.queue("jobs").unwrap().put(Value::from(1)).unwrap();

    let live = Server::bind_unix(&path, ServerConfig::new(AuthKey::new(KEY))).unwrap_err();
    let msg = live.to_string();
    assert!(msg.contains("in use"), "{msg}");
    // The running server keeps its socket.
    m.queue("jobs").unwrap().put(Value::from(2)).unwrap();

    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = Server::bind_unix(&file, ServerConfig::new(AuthKey::new(KEY))).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    server.shutdown().unwrap();
    assert!(!path.exists());
}

/// A server whose socket file was removed while it ran (a tmp cleaner, an operator)
/// still stops at once: its accept is not woken through the file.
#[test]
fn a_server_whose_socket_file_is_gone_still_stops() {
    let dir = TempDir::new("gone");
    let path = dir.join("q.sock");
    let server = unix_server(&path, |_| {});
    std::fs::remove_file(&path).unwrap();
    let start = Instant::now();
    server.shutdown().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// The handshake limits hold on a Unix socket, where every peer is the same source:
/// silent peers past `max_handshakes_per_source` are shed, oldest first, and a real
/// client still gets in.
#[test]
fn silent_unix_peers_are_shed_and_a_client_still_connects() {
    let dir = TempDir::new("shed");
    let path = dir.join("q.sock");
    let server = unix_server(&path, |c| {
        c.max_handshakes_per_source = 2;
        c.handshake_timeout = Duration::from_secs(30);
    });
    let silent: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
        .collect();
    let start = Instant::now();
    let m = Manager::connect_unix(&path, AuthKey::new(KEY)).unwrap();
    m.queue("jobs").unwrap().put(Value::from(1)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    // The first silent peer was shed: it reads the end of the stream, not the challenge.
    let mut first = &silent[0];
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = Vec::new();
    let end = std::io::Read::read_to_end(&mut first, &mut buf);
    assert!(end.is_ok(), "not shed: {end:?} after {buf:?}");
    drop(silent);
    server.shutdown().unwrap();
}

fn server_process_on(path: &Path) -> (Child, std::io::BufReader<std::process::ChildStderr>) {
    let (server, addr, err) = server_process_at(path.to_str().unwrap(), &[]);
    assert!(path.to_str().unwrap().ends_with(&addr), "{addr}");
    (server, err)
}

fn terminate(child: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `distq-server --bind PATH` with `distq-worker --connect PATH` and `distq-stat PATH`;
/// SIGTERM removes the socket file; after a SIGKILL the next server replaces the stale
/// one.
#[test]
fn the_server_and_worker_binaries_on_a_unix_socket() {
    let dir = TempDir::new("binaries");
    let path = dir.join("q.sock");
    let p = path.to_str().unwrap();
    let (server, _err) = server_process_on(&path);
    let m = Manager::connect_unix(&path, AuthKey::new(KEY)).unwrap();
    let tasks = m.queue("get_task_queue").unwrap();
    let results = m.queue("get_result_queue").unwrap();
    for n in 0..3 {
        tasks.put(Value::from(n)).unwrap();
    }
    let worker = bin("distq-worker")
        .args(["--connect", p, "--tasks", "3", "--authkey", KEY])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(worker, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    for _ in 0..3 {
        results.get(Duration::from_secs(5)).unwrap();
    }
    let stat = bin("distq-stat")
        .args([p, "--authkey", KEY])
        .output()
        .unwrap();
    assert!(stat.status.success(), "{}", text(&stat.stderr));
    assert!(text(&stat.stdout).contains(p), "{}", text(&stat.stdout));
    drop((tasks, results, m));
    terminate(&server);
    let out = wait_with_deadline(server, Duration::from_secs(20));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!path.exists(), "SIGTERM removes the socket file");

    // Killed: the file stays behind, and the next server replaces it.
    let (mut killed, _err) = server_process_on(&path);
    killed.kill().unwrap();
    let _ = killed.wait();
    assert!(path.exists());
    let (server, _err) = server_process_on(&path);
    let m = Manager::connect_unix(&path, AuthKey::new(KEY)).unwrap();
    m.queue("jobs").unwrap().put(Value::from(1)).unwrap();
    // And a second server on a live socket fails, exit 1, saying why.
    let refused = bin("distq-server")
        .args(["--bind", p, "--authkey", KEY])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("in use"),
        "{}",
        text(&refused.stderr)
    );
    drop(m);
    terminate(&server);
    wait_with_deadline(server, Duration::from_secs(20));

    // A Linux abstract name, typed as `\0name` (an argument cannot hold a NUL byte).
    let name = format!("distq-bin-{}", std::process::id());
    let (server, addr, _err) = server_process_at(&format!("\\0{name}"), &[]);
    assert_eq!(addr, format!("@{name}"));
    let m = Manager::connect_unix(format!("\0{name}"), AuthKey::new(KEY)).unwrap();
    m.queue("jobs").unwrap().put(Value::from(1)).unwrap();
    drop(m);
    terminate(&server);
    wait_with_deadline(server, Duration::from_secs(20));
}

/// The classic master hosting its server on a socket, with two local workers that
/// connect to it there.
#[test]
fn the_classic_master_with_local_workers_on_a_unix_socket() {
    let dir = TempDir::new("master");
    let path = dir.join("m.sock");
    let p = path.to_str().unwrap();
    let master = bin("distq-master")
        .args([
            "--bind",
            p,
            "--local-workers",
            "2",
            "--tasks",
            "10",
            "--authkey",
            KEY,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(master, Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&format!("Listening on {p}")), "{stdout}");
    assert_eq!(stdout.matches("Result: ").count(), 10, "{stdout}");
    assert!(stdout.trim_end().ends_with("Master exit."), "{stdout}");
    assert!(!path.exists());
}

/// distq-worker against Python's own manager server on a Unix socket, every version.
#[test]
fn distq_worker_against_pythons_server_on_a_unix_socket() {
    let dir = TempDir::new("pyserver");
    for py in require_pythons() {
        let name = format!("py{}{}.sock", py.version.0, py.version.1);
        let (path, seen) = path_for(&py, &dir.join(&name));
        let p = path.to_str().unwrap();
        let mut server = py.spawn(PY_SERVER, &[&seen, KEY, "4"]);
        read_line_starting(&mut server, "READY");
        let worker = bin("distq-worker")
            .args(["--connect", p, "--tasks", "4", "--authkey", KEY])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let wout = wait_with_deadline(worker, Duration::from_secs(60));
        assert!(
            wout.status.success(),
            "python {:?}: {}",
            py.version,
            text(&wout.stderr)
        );
        std::fs::write(format!("{p}.done"), b"").unwrap();
        let sout = wait_with_deadline(server, Duration::from_secs(60));
        assert!(
            sout.status.success(),
            "python {:?}: {}",
            py.version,
            text(&sout.stderr)
        );
        assert_eq!(
            text(&sout.stdout).matches("RESULT ").count(),
            4,
            "python {:?}: {}",
            py.version,
            text(&sout.stdout)
        );
    }
}

/// A relative name that is neither HOST:PORT nor `/...`/`./...` is still bad usage.
#[test]
fn a_bare_file_name_is_not_an_address() {
    let out = bin("distq-server")
        .args(["--bind", "q.sock", "--authkey", KEY])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("socket path"),
        "{}",
        text(&out.stderr)
    );
}
