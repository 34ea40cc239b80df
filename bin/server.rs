//! `distq-server`: a standalone queue server, compatible with Python's managers.

use std::sync::OnceLock;

use distq::{Address, Server, ServerConfig, ServerHandle};
use lexopt::ValueExt;

/// Shared by the binaries; each uses a part of it.
#[path = "cli.rs"]
mod cli;
use cli::{exit, CommonFlags};

#[path = "signals.rs"]
mod signals;

#[path = "journal_flags.rs"]
mod journal_flags;
use journal_flags::JournalFlags;

/// The running server, for the signal thread to stop.
static RUNNING: OnceLock<ServerHandle> = OnceLock::new();

const HELP: &str = "\
distq-server: serve named queues to distq and Python multiprocessing.managers clients

USAGE:
    distq-server [OPTIONS]

OPTIONS:
    --bind ADDR           address to listen on: HOST:PORT, or a Unix socket PATH
                          (/..., ./..., or \\0NAME abstract) [default: 0.0.0.0:5000]
    --queue NAME[:MAX]    declare a queue, optionally bounded to MAX items (repeatable);
                          other names are created unbounded on first use
    --max-frame BYTES     largest request accepted [default: 67108864]
    --max-connections N   connections served at once [default: 1024]
    --idle-timeout SECS   close method channels idle this long [default: never]
    --lease-timeout SECS  requeue reserved items not acked within this time; 0 = only
                          when their connection closes [default: 0]
    --max-deliveries N    after N leased deliveries a returned item goes to NAME.dead
                          instead of NAME; 0 = never [default: 0]
    --max-memory BYTES    the most bytes of items the server stores, in all queues;
                          past it puts wait (or fail with queue.Full) [default: no limit]
    --no-code-items       refuse items that reference classes or functions (so a client
                          holding the key cannot ship code to Python workers)
    --no-legacy-auth      refuse clients that prove the key with HMAC-MD5 (Python <= 3.11)
                          as if their key were wrong; Python >= 3.12 and distq use SHA-256
    --journal DIR         keep named queues in an append-only journal in DIR, so a restart
                          or crash loses no acknowledged put
    --fsync POLICY        always | every=MS | never [default: every=50ms]
    --journal-repair      start even if the journal is corrupt in the middle (skips the
                          damaged records, losing their items)
    --compact-min BYTES   compact the journal once it is this big and 4x the live data
                          [default: 67108864]
    --authkey KEY         shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH   read the shared secret from a file
                          (or set DISTQ_AUTHKEY)
    -v, -q                more / less logging on stderr
    -h, --help            this text;  -V, --version

EXAMPLES:
    DISTQ_AUTHKEY=abc distq-server --bind 127.0.0.1:5000 --queue jobs:1000
    distq-server --authkey-file /etc/distq/key --bind 0.0.0.0:5000

The server runs until a client calls shutdown() (e.g. Python's manager.shutdown()) or
it gets SIGTERM or Ctrl-C (SIGINT): then it stops accepting, wakes blocked callers,
writes the journal and logs what it held and whether that survives (with --journal,
named queues do). `distq-stat HOST:PORT` shows its queues; Python clients can call
q.stats() on any queue.
Exit status: 0 after a shutdown or a stop signal; 1 cannot listen; 2 bad usage.
";

fn main() {
    signals::on_stop(|signal| match RUNNING.get() {
        Some(server) => {
            if signals::received() == Some(signal) {
                distq::log::write(
                    distq::log::Level::Warn,
                    format_args!("{}: stopping", signals::name(signal)),
                );
            }
            server.shutdown();
        }
        // Not serving yet: nothing to keep.
        None => std::process::exit(signals::exit_status(signal)),
    });
    let mut common = CommonFlags::default();
    let mut bind = "0.0.0.0:5000".to_string();
    let mut queues: Vec<(String, usize)> = Vec::new();
    let mut config = ServerConfig::new(distq::AuthKey::new(""));
    let mut journal = JournalFlags::default();
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            let name = flag.name();
            if journal.take(&name, &mut parser)? {
                continue;
            }
            match name.as_str() {
                "--bind" => bind = cli::address("--bind", parser.value()?)?,
                "--queue" => {
                    let spec = parser.value()?.string()?;
                    queues.push(parse_queue(&spec)?);
                }
                "--max-frame" => config.max_frame = parser.value()?.parse()?,
                "--max-connections" => config.max_connections = parser.value()?.parse()?,
                "--idle-timeout" => config.idle_timeout = Some(cli::seconds(parser.value()?)?),
                "--lease-timeout" => {
                    config.lease_timeout =
                        Some(cli::seconds(parser.value()?)?).filter(|t| !t.is_zero())
                }
                "--max-deliveries" => config.max_deliveries = parser.value()?.parse()?,
                "--no-code-items" => config.no_code_items = true,
                "--no-legacy-auth" => config.legacy_auth = false,
                "--max-memory" => {
                    config.max_memory =
                        Some(cli::count("--max-memory", parser.value()?)?).filter(|n| *n > 0)
                }
                "--journal-repair" => journal.repair = true,
                "--compact-min" => journal.compact_min = Some(parser.value()?.parse()?),
                _ => return Err(flag.unexpected()),
            }
        }
        Ok(())
    })();
    if let Err(e) = parsed {
        cli::fail(format!("{e} (see --help)"), exit::USAGE);
    }
    common.init_logging();
    config.authkey = common
        .authkey()
        .unwrap_or_else(|e| cli::fail(e, exit::USAGE));
    common.warn_if_key_exposed(&bind);
    if journal.lack_dir() {
        cli::fail(
            "--fsync, --journal-repair and --compact-min need --journal DIR",
            exit::USAGE,
        );
    }
    config.journal = journal.config();
    let server = Server::bind_to(&Address::parse(&bind), config)
        .unwrap_or_else(|e| cli::fail(cli::with_flag_hint(&e), exit::FAILURE));
    for (name, max) in &queues {
        if let Err(e) = server.declare(name, *max) {
            cli::fail(e, exit::FAILURE);
        }
    }
    let _ = RUNNING.set(server.handle());
    if let Err(e) = server.run() {
        cli::fail(e, exit::FAILURE);
    }
}

fn parse_queue(spec: &str) -> Result<(String, usize), lexopt::Error> {
    match spec.rsplit_once(':') {
        Some((name, max)) if !name.is_empty() => match max.parse() {
            Ok(max) => Ok((name.to_string(), max)),
            Err(_) => Err(format!("--queue {spec:?}: {max:?} is not a number of items").into()),
        },
        _ if !spec.is_empty() => Ok((spec.to_string(), 0)),
        _ => Err("--queue needs a name".into()),
    }
}
