//! `distq-server`: a standalone queue server, compatible with Python's managers.

use distq::cli::{self, exit, CommonFlags};
use distq::{Server, ServerConfig};
use lexopt::ValueExt;

const HELP: &str = "\
distq-server: serve named queues to distq and Python multiprocessing.managers clients

USAGE:
    distq-server [OPTIONS]

OPTIONS:
    --bind ADDR           address to listen on [default: 0.0.0.0:5000]
    --queue NAME[:MAX]    declare a queue, optionally bounded to MAX items (repeatable);
                          other names are created unbounded on first use
    --max-frame BYTES     largest request accepted [default: 67108864]
    --max-connections N   connections served at once [default: 1024]
    --idle-timeout SECS   close method channels idle this long [default: never]
    --lease-timeout SECS  requeue reserved items not acked within this time; 0 = only
                          when their connection closes [default: 0]
    --max-deliveries N    after N leased deliveries a returned item goes to NAME.dead
                          instead of NAME; 0 = never [default: 0]
    --no-code-items       refuse items that reference classes or functions (so a client
                          holding the key cannot ship code to Python workers)
    --authkey KEY         shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH   read the shared secret from a file
                          (or set DISTQ_AUTHKEY)
    -v, -q                more / less logging on stderr
    -h, --help            this text;  -V, --version

EXAMPLES:
    DISTQ_AUTHKEY=abc distq-server --bind 127.0.0.1:5000 --queue jobs:1000
    distq-server --authkey-file /etc/distq/key --bind 0.0.0.0:5000

The server runs until a client calls shutdown() (e.g. Python's manager.shutdown()).
`distq-stat HOST:PORT` shows its queues; Python clients can call q.stats() on any queue.
Exit status: 0 after a shutdown; 1 cannot listen; 2 bad usage.
";

fn main() {
    let mut common = CommonFlags::default();
    let mut bind = "0.0.0.0:5000".to_string();
    let mut queues: Vec<(String, usize)> = Vec::new();
    let mut config = ServerConfig::new(distq::AuthKey::new(""));
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            match flag.name().as_str() {
                "--bind" => bind = parser.value()?.string()?,
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
    let server =
        Server::bind(bind.as_str(), config).unwrap_or_else(|e| cli::fail(e, exit::FAILURE));
    for (name, max) in &queues {
        if let Err(e) = server.queues().declare(name, *max) {
            cli::fail(e, exit::FAILURE);
        }
    }
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
