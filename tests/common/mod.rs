//! Helpers shared by the integration tests: in-process servers on port 0, the binaries,
//! and the Python interpreters the interop tests run against.

#![allow(dead_code)] // each test crate uses a different subset of these helpers

use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use distq::{AuthKey, RunningServer, Server, ServerConfig};

pub const KEY: &str = "abc";

/// Server logs go to the test harness's capture: shown only for a test that fails.
/// Warnings only: tests provoke them on purpose; connection chatter is noise.
pub fn quiet_logs() {
    distq::log::to_test_capture();
    distq::log::set_level(distq::log::Level::Warn);
}

/// A distq server on 127.0.0.1:0 in this process.
pub fn server() -> RunningServer {
    server_with(|_| {})
}

pub fn server_with(adjust: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    quiet_logs();

    let mut config = ServerConfig::new(AuthKey::new(KEY));
    adjust(&mut config);
    Server::bind("127.0.0.1:0", config)
        .expect("bind 127.0.0.1:0")
        .spawn()
        .expect("spawn server")
}

/// A command for one of this crate's binaries.
pub fn bin(name: &str) -> Command {
    let path = match name {
        "distq-master" => env!("CARGO_BIN_EXE_distq-master"),
        "distq-worker" => env!("CARGO_BIN_EXE_distq-worker"),
        "distq-server" => env!("CARGO_BIN_EXE_distq-server"),
        "distq-stat" => env!("CARGO_BIN_EXE_distq-stat"),
        other => panic!("unknown binary {other}"),
    };
    let mut cmd = Command::new(path);
    cmd.env_remove("DISTQ_AUTHKEY");
    cmd
}

/// Waits for a child with a deadline, killing it if it overstays.
pub fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "process did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads lines from a child's stdout until one starts with `prefix`; returns the rest.
/// Reads byte by byte so that nothing after that line is consumed from the pipe.
pub fn read_line_starting(child: &mut Child, prefix: &str) -> String {
    use std::io::Read;
    let stdout = child.stdout.as_mut().expect("stdout piped");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stdout.read(&mut byte).expect("read child stdout") == 0 {
            panic!(
                "child exited before printing {prefix:?}; last partial line: {}",
                text(&line)
            );
        }
        if byte[0] != b'\n' {
            line.push(byte[0]);
            continue;
        }
        let s = text(&line);
        if let Some(rest) = s.trim_end().strip_prefix(prefix) {
            return rest.to_string();
        }
        line.clear();
    }
}

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A Python interpreter: the command prefix that runs it, and its version.
#[derive(Clone, Debug)]
pub struct Python {
    pub cmd: Vec<String>,
    pub version: (u32, u32),
}

impl Python {
    /// Runs `script` with `args`, stdout and stderr piped.
    pub fn spawn(&self, script: &str, args: &[&str]) -> Child {
        let mut cmd = Command::new(&self.cmd[0]);
        cmd.args(&self.cmd[1..])
            .arg("-c")
            .arg(script)
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.cmd))
    }

    /// Runs `script` to completion and asserts it succeeded; returns its stdout.
    pub fn run_ok(&self, script: &str, args: &[&str]) -> String {
        let out = wait_with_deadline(self.spawn(script, args), Duration::from_secs(60));
        assert!(
            out.status.success(),
            "python {:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            self.version,
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn probe(cmd: Vec<String>) -> Option<Python> {
        let out = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["-c", "import sys; print('%d %d' % sys.version_info[:2])"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let s = text(&out.stdout);
        let mut it = s.split_whitespace().map(|n| n.parse().ok());
        Some(Python {
            cmd,
            version: (it.next()??, it.next()??),
        })
    }
}

/// Every Python interpreter available for interop tests, deduplicated by version.
///
/// Sources: `DISTQ_PYTHONS` (a `;`-separated list of commands, e.g.
/// `python3;chroot /opt/trixie python3`), `python3` on PATH, and pyenv builds under
/// `~/.pyenv/versions`.
pub fn pythons() -> Vec<Python> {
    let mut cmds: Vec<Vec<String>> = Vec::new();
    if let Ok(list) = std::env::var("DISTQ_PYTHONS") {
        for c in list.split(';').filter(|c| !c.trim().is_empty()) {
            cmds.push(c.split_whitespace().map(str::to_string).collect());
        }
    }
    cmds.push(vec!["python3".into()]);
    if let Some(home) = std::env::var_os("HOME") {
        let root = std::path::Path::new(&home).join(".pyenv/versions");
        if let Ok(entries) = std::fs::read_dir(root) {
            let mut dirs: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs {
                let exe = d.join("bin/python3");
                if exe.exists() {
                    cmds.push(vec![exe.to_string_lossy().into_owned()]);
                }
            }
        }
    }
    let mut found: Vec<Python> = Vec::new();
    for cmd in cmds {
        if let Some(p) = Python::probe(cmd) {
            if p.version >= (3, 8) && !found.iter().any(|f| f.version == p.version) {
                found.push(p);
            }
        }
    }
    found.sort_by_key(|p| p.version);
    let versions: Vec<String> = found
        .iter()
        .map(|p| format!("{}.{}", p.version.0, p.version.1))
        .collect();
    eprintln!("python interpreters: {}", versions.join(", "));
    found
}

/// The interpreters to test against. With `CI` set, a missing `python3` is a failure,
/// not a skip; without it, tests that need Python say so and pass vacuously only on a
/// developer machine that has none.
pub fn require_pythons() -> Vec<Python> {
    let all = pythons();
    if all.is_empty() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set but no python3 >= 3.8 was found (install python3 or set DISTQ_PYTHONS)"
            );
        }
        eprintln!("note: no python3 found; skipping Python interop checks");
    }
    all
}

/// An interpreter with the legacy handshake (<= 3.11) and one with the modern one (>= 3.12).
/// With `CI` set, both must exist.
pub fn legacy_and_modern() -> (Option<Python>, Option<Python>) {
    let all = require_pythons();
    let legacy = all.iter().rev().find(|p| p.version <= (3, 11)).cloned();
    let modern = all.iter().rev().find(|p| p.version >= (3, 12)).cloned();
    if std::env::var_os("CI").is_some() {
        assert!(
            legacy.is_some(),
            "CI is set but no Python <= 3.11 was found"
        );
        assert!(
            modern.is_some(),
            "CI is set but no Python >= 3.12 was found (see .ci/run)"
        );
    }
    (legacy, modern)
}

pub fn addr_arg(addr: SocketAddr) -> String {
    addr.to_string()
}

/// `distq-server --bind 127.0.0.1:0` as a process, its address (from its "listening on"
/// log line), and the rest of its stderr for the test to read.
pub fn server_process(
    extra: &[&str],
) -> (Child, String, std::io::BufReader<std::process::ChildStderr>) {
    server_process_at("127.0.0.1:0", extra)
}

/// [`server_process`] listening on `bind` (an address or a Unix socket path).
pub fn server_process_at(
    bind: &str,
    extra: &[&str],
) -> (Child, String, std::io::BufReader<std::process::ChildStderr>) {
    use std::io::BufRead;
    let mut server = bin("distq-server")
        .args(["--bind", bind, "--authkey", KEY])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on ") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited early");
    }
    let addr = line.trim_end().rsplit(' ').next().unwrap().to_string();
    (server, addr, err)
}
