//! `distq-stat`: a server's queues and connections at a glance, once or every few
//! seconds, for a person (a table) or a script (`--json`).

use std::io::IsTerminal;
use std::time::Duration;

use distq::{text, Address, ClientConfig, Error, Manager, Value};
use lexopt::ValueExt;

/// Shared by the binaries; each uses a part of it.
#[path = "cli.rs"]
mod cli;
use cli::{exit, CommonFlags};

const HELP: &str = "\
distq-stat: show a server's queues (size, reserved, waiting getters, counters)

USAGE:
    distq-stat [HOST:PORT] [OPTIONS]

OPTIONS:
    --connect HOST:PORT   server address (or give it as the argument), or a Unix socket
                          PATH [default: 127.0.0.1:5000]
    --watch SECS          refresh every SECS seconds until interrupted
    --count N             with --watch: stop after N reports
    --json                one JSON object per report instead of a table
    --no-legacy-auth      refuse a server that uses HMAC-MD5 in the handshake (Python
                          <= 3.11's own manager), as if its key were wrong (exit 3)
    --authkey KEY         shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH   read the shared secret from a file (or set DISTQ_AUTHKEY)
    -v, -q                more / less logging on stderr
    -h, --help            this text;  -V, --version

COLUMNS:
    size       items waiting            reserved   taken under a lease, not yet acked
    waiting    getters blocked in get   puts/gets  items put / taken so far
    acks       leases completed         requeues   items that went back (release, lost
    dead       items moved to NAME.dead            connection, expired lease)

EXAMPLES:
    DISTQ_AUTHKEY=abc distq-stat 127.0.0.1:5000
    distq-stat 192.168.1.10:5000 --authkey-file ~/.distq-key --watch 2

From Python, any queue proxy has the same numbers: q.stats().
";

const COLUMNS: [(&str, &str); 8] = [
    ("size", "size"),
    ("reserved", "reserved"),
    ("waiting_getters", "waiting"),
    ("puts", "puts"),
    ("gets", "gets"),
    ("acks", "acks"),
    ("requeues", "requeues"),
    ("dead_lettered", "dead"),
];

/// The shortest `--watch` period: below it the refresh loop is a load generator.
const MIN_WATCH: Duration = Duration::from_millis(10);

fn main() {
    let mut common = CommonFlags::default();
    let mut addr = "127.0.0.1:5000".to_string();
    let mut watch: Option<Duration> = None;
    let mut count: Option<u64> = None;
    let mut json = false;
    let mut client = ClientConfig::default();
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            match (flag.name().as_str(), flag) {
                ("--connect", _) => addr = cli::address("--connect", parser.value()?)?,
                ("--watch", _) => watch = Some(cli::seconds(parser.value()?)?),
                ("--count", _) => count = Some(parser.value()?.parse()?),
                ("--json", _) => json = true,
                ("--no-legacy-auth", _) => client.legacy_auth = false,
                ("", cli::Flag::Value(v)) => addr = cli::address("HOST:PORT", v)?,
                (_, flag) => return Err(flag.unexpected()),
            }
        }
        if watch.is_some_and(|w| w < MIN_WATCH) {
            return Err(format!("--watch must be at least {MIN_WATCH:?} (a report per request would load the server)").into());
        }
        if count.is_some() && watch.is_none() {
            return Err("--count only applies with --watch".into());
        }
        Ok(())
    })();
    if let Err(e) = parsed {
        cli::fail(format!("{e} (see --help)"), exit::USAGE);
    }
    common.init_logging();
    let authkey = common
        .authkey()
        .unwrap_or_else(|e| cli::fail(e, exit::USAGE));
    common.warn_if_key_exposed(&addr);
    let manager = Manager::connect_to(&Address::parse(&addr), authkey, client)
        .unwrap_or_else(|e| cli::fail(&e, cli::status_for(&e)));
    // Redraw in place on a terminal; append reports otherwise (a log stays readable).
    let redraw = watch.is_some() && !json && std::io::stdout().is_terminal();
    let mut reports = 0u64;
    loop {
        let stats = manager.stats().unwrap_or_else(|e| match e {
            // Python's server answers an unknown public function with a traceback.
            Error::Traceback(t) if t.contains("'stats' unrecognized") => cli::fail(
                format!(
                    "{addr} is not a distq server (stats are a distq extension); \
                     a Python manager's queues can be inspected from Python with qsize()"
                ),
                exit::FAILURE,
            ),
            e => cli::fail(&e, cli::status_for(&e)),
        });
        let mut report = String::new();
        if redraw {
            report.push_str("\x1b[H\x1b[2J");
        }
        if json {
            report = text::to_json(&stats) + "\n";
        } else {
            report.push_str(&table(&addr, &stats));
        }
        reports += 1;
        let again = watch.filter(|_| count.map_or(true, |n| reports < n));
        if again.is_some() && !redraw && !json {
            report.push('\n');
        }
        emit(&report);
        match again {
            Some(every) => std::thread::sleep(every),
            None => break,
        }
    }
}

/// The report: a header line, then one row per queue.
fn table(addr: &str, stats: &Value) -> String {
    let int = |v: Option<&Value>| v.and_then(Value::as_int).unwrap_or(0);
    let uptime = text::field(stats, "uptime").map_or(0.0, |v| match v {
        Value::Float(x) => *x,
        other => other.as_int().unwrap_or(0) as f64,
    });
    let mut out = format!(
        "server {addr}: {} connection(s), up {}\n",
        int(text::field(stats, "connections")),
        cli::human_duration(Duration::from_secs_f64(uptime.max(0.0)))
    );
    let queues: Vec<(String, &Value)> = match text::field(stats, "queues") {
        Some(Value::Dict(pairs)) => pairs.iter().map(|(k, v)| (text::text_form(k), v)).collect(),
        _ => Vec::new(),
    };
    let width = queues
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(0)
        .max(5);
    out.push_str(&format!("{:<width$}", "queue"));
    for (_, title) in COLUMNS {
        out.push_str(&format!(" {title:>8}"));
    }
    out.push('\n');
    for (name, q) in queues {
        out.push_str(&format!("{name:<width$}"));
        for (key, _) in COLUMNS {
            out.push_str(&format!(" {:>8}", int(text::field(q, key))));
        }
        out.push('\n');
    }
    out
}

/// Writes a report; a reader that went away (`| head`) ends the program quietly, since
/// it has seen what it wanted.
fn emit(report: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if out
        .write_all(report.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(exit::OK);
    }
}
