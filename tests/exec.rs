//! `distq::exec`: one command per task, with its failures reported as data.

use std::time::{Duration, Instant};

use distq::exec::{self, ExecConfig, Status};
use distq::text;
use distq::Value;

fn run(cmd: &str, arg: &str) -> exec::Outcome {
    exec::run(&ExecConfig::new(cmd), arg, format!("{arg}\n").as_bytes())
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
    let out = exec::run(&config, "x", b"");
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
    let out = exec::run(&config, "x", b"");
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
    let out = exec::run(&config, "x", b"");
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
    let out = exec::run(&ExecConfig::new("echo done"), "x", &big);
    assert_eq!(out.status, Status::Ok);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
}
