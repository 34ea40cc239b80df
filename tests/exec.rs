//! `distq::exec`: one command per task, with its failures reported as data.

use std::time::{Duration, Instant};

use distq::exec::{self, ExecConfig, Status};
use distq::text;
use distq::Value;

fn run(cmd: &str, arg: &str) -> exec::Execution {
    exec::run(
        &ExecConfig::new(cmd),
        arg.as_bytes(),
        format!("{arg}\n").as_bytes(),
        &distq::worker::Stop::new(),
    )
}

#[test]
fn success_sees_the_task_as_dollar_one_and_on_stdin() {
    let out = run(r#"printf '%s|' "$1"; cat; echo err >&2"#, "a b");
    assert_eq!(out.status, Status::Ok);
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|a b\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert!(!out.truncated);
}

#[test]
fn failure_is_a_result_with_its_exit_code() {
    let out = run("echo nope >&2; exit 3", "x");
    assert_eq!(out.status, Status::Failed);
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.signal, None);
    let record = out.record(
        &text::Envelope {
            id: Some(4),
            run: Some(&Value::from("r")),
            task: &Value::from("x"),
        },
        2,
    );
    assert_eq!(
        text::to_json(&record)
            .split(",\"duration\"")
            .next()
            .unwrap(),
        r#"{"id":4,"run":"r","task":"x","status":"failed","exit_code":3,"signal":null,"stdout":"","stderr":"nope\n","truncated":false"#
    );
    assert!(text::to_json(&record).ends_with(r#","attempts":2}"#));
    assert!(out.summary().starts_with("failed (exit 3) in "));
    // A command killed by a signal it did not get from us is a failure too.
    let out = run("kill -s KILL $$", "x");
    assert_eq!(
        (out.status, out.exit_code, out.signal),
        (Status::Failed, None, Some(9))
    );
}

#[test]
fn a_timeout_terminates_the_whole_command() {
    let mut config = ExecConfig::new("sleep 30; echo never");
    config.timeout = Some(Duration::from_millis(300));
    let start = Instant::now();
    let out = exec::run(&config, b"x", b"", &distq::worker::Stop::new());
    assert_eq!(out.status, Status::Timeout);
    assert_eq!(out.signal, Some(15), "SIGTERM was enough");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_command_that_ignores_sigterm_gets_sigkill_after_the_grace_period() {
    let mut config = ExecConfig::new("trap '' TERM; echo started; sleep 30; echo never");
    config.timeout = Some(Duration::from_millis(300));
    config.grace = Duration::from_millis(400);
    let start = Instant::now();
    let out = exec::run(&config, b"x", b"", &distq::worker::Stop::new());
    let took = start.elapsed();
    assert_eq!(out.status, Status::Timeout);
    assert_eq!(out.signal, Some(9));
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
}

#[test]
fn large_output_is_truncated_but_fully_read() {
    let mut config = ExecConfig::new("head -c 3000000 /dev/zero; head -c 100000 /dev/zero >&2");
    config.max_output = 1000;
    let out = exec::run(&config, b"x", b"", &distq::worker::Stop::new());
    assert_eq!(
        out.status,
        Status::Ok,
        "the command never blocked on a full pipe"
    );
    assert_eq!((out.stdout.len(), out.stderr.len()), (1000, 1000));
    assert!(out.truncated);
}

#[test]
fn non_utf8_output_is_replaced_not_an_error() {
    let out = run(r"printf 'a\377b'", "x");
    assert_eq!(out.stdout, b"a\xffb");
    let record = out.record(&text::open_envelope(&Value::from("x")), 1);
    assert_eq!(
        text::field(&record, "stdout"),
        Some(&Value::from("a\u{fffd}b"))
    );
    assert_eq!(text::field(&record, "id"), None, "no envelope, no id");
}

#[test]
fn background_leftovers_do_not_hold_the_worker() {
    let start = Instant::now();
    let out = run("sleep 30 & echo main", "x");
    assert_eq!(out.status, Status::Ok);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "main\n");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_command_that_does_not_read_a_large_stdin_still_finishes() {
    let big = vec![b'x'; 4 << 20];
    let out = exec::run(
        &ExecConfig::new("echo done"),
        b"x",
        &big,
        &distq::worker::Stop::new(),
    );
    assert_eq!(out.status, Status::Ok);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
}

#[test]
fn a_stop_request_ends_the_whole_command_group() {
    // The command's child writes its pid, then both sleep: the stop must reach the
    // child too (the group), not only the shell.
    let dir = std::env::temp_dir().join(format!("distq-stop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("pid");
    let config = ExecConfig::new(format!("sleep 30 & echo $! > {}; wait", pidfile.display()));
    let stop = distq::worker::Stop::new();
    let start = Instant::now();
    let out = std::thread::scope(|s| {
        let running = s.spawn(|| exec::run(&config, b"x", b"", &stop));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&pidfile).map_or(true, |p| p.trim().is_empty()) {
            assert!(Instant::now() < deadline, "the command never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.request();
        running.join().unwrap()
    });
    assert_eq!(out.status, Status::Stopped);
    assert_eq!(out.signal, Some(15));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while running(pid.trim()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !running(pid.trim()),
        "the command's background child {pid} is still running"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether process `pid` is running: it exists and is not a zombie waiting for a reaper
/// (an orphan's reaper in a container may be slow to collect it).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with('Z') && !state.starts_with('X')
    })
}
