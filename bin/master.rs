//! `distq-master`: the Rust twin of the classic `task_master.py`.

use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Child, Command};
use std::time::Duration;

use distq::cli::{self, CommonFlags};
use distq::{AuthKey, Error, Manager, Server, ServerConfig, Value};
use lexopt::ValueExt;
use rand::Rng;

const HELP: &str = "\
distq-master: put random tasks on a queue, collect the workers' results

USAGE:
    distq-master [OPTIONS]

By default the master hosts the server itself (like Python's manager.start()).

OPTIONS:
    --bind ADDR             where the hosted server listens [default: 0.0.0.0:5000]
    --connect HOST:PORT     use an existing server (distq or Python) instead of hosting one
    --tasks N               how many tasks to put [default: 10]
    --result-timeout SECS   how long to wait for each result [default: 10]
    --local-workers K       also run K distq-worker processes against this master
    --authkey KEY           shared secret (visible in `ps`; prefer the next two)
    --authkey-file PATH     read the shared secret from a file (or set DISTQ_AUTHKEY)
    -v, -q                  more / less logging on stderr
    -h, --help              this text;  -V, --version

EXAMPLES:
    distq-master --local-workers 2 --authkey abc        # the whole demo, one command
    distq-master --bind 0.0.0.0:5000 --authkey abc      # then run workers elsewhere
    distq-master --connect 127.0.0.1:5000 --authkey abc # a server that is already running
";

struct Flags {
    bind: String,
    connect: Option<String>,
    tasks: u64,
    result_timeout: Duration,
    local_workers: u32,
}

fn main() {
    let mut common = CommonFlags::default();
    let mut flags = Flags {
        bind: "0.0.0.0:5000".into(),
        connect: None,
        tasks: 10,
        result_timeout: Duration::from_secs(10),
        local_workers: 0,
    };
    let parsed: Result<(), lexopt::Error> = (|| {
        let mut parser = lexopt::Parser::from_env();
        while let Some(flag) = cli::next(&mut parser)? {
            if common.take(&flag, &mut parser, HELP)? {
                continue;
            }
            match flag.name().as_str() {
                "--bind" => flags.bind = parser.value()?.string()?,
                "--connect" => flags.connect = Some(parser.value()?.string()?),
                "--tasks" => flags.tasks = parser.value()?.parse()?,
                "--result-timeout" => flags.result_timeout = cli::seconds(parser.value()?)?,
                "--local-workers" => flags.local_workers = parser.value()?.parse()?,
                _ => return Err(flag.unexpected()),
            }
        }
        Ok(())
    })();
    if let Err(e) = parsed {
        cli::fail(format!("{e} (see --help)"), 2);
    }
    common.init_logging();
    let authkey = common.authkey().unwrap_or_else(|e| cli::fail(e, 2));
    match run(&flags, authkey) {
        Ok(()) => println!("Master exit."),
        Err(e) => cli::fail(e, 1),
    }
}

fn run(flags: &Flags, authkey: AuthKey) -> distq::Result<()> {
    // Host the server unless told to use an existing one.
    let (running, addr) = match &flags.connect {
        Some(addr) => (None, addr.clone()),
        None => {
            let server = Server::bind(flags.bind.as_str(), ServerConfig::new(authkey.clone()))?;
            println!("Listening on {}", server.local_addr());
            let addr = loopback(server.local_addr());
            (Some(server.spawn()?), addr.to_string())
        }
    };
    let manager = Manager::connect(addr.as_str(), authkey.clone())?;
    let tasks = manager.queue("get_task_queue")?;
    let results = manager.queue("get_result_queue")?;

    let mut workers = spawn_workers(flags.local_workers, &addr, &authkey)?;
    for _ in 0..flags.tasks {
        let n: i64 = rand::rngs::OsRng.gen_range(0..=10_000);
        println!("Put task {n}...");
        tasks.put(Value::from(n))?;
    }
    println!("Try getting results...");
    let mut received = 0;
    let mut outcome = Ok(());
    while received < flags.tasks {
        match results.get(flags.result_timeout) {
            Ok(r) => {
                received += 1;
                println!(
                    "Result: {}",
                    r.as_str().map_or_else(|| r.to_string(), str::to_string)
                );
            }
            Err(Error::Empty) => {
                outcome = Err(Error::Protocol(format!(
                    "only {received} of {} results arrived; none came for {:?} (are workers running? see --result-timeout)",
                    flags.tasks, flags.result_timeout
                )));
                break;
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    if let Some(running) = running {
        manager.shutdown()?;
        drop((tasks, results));
        running.join()?;
    }
    outcome
}

/// The address our own clients and workers use for a hosted server: a wildcard bind
/// (`0.0.0.0`) is reached through loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => [127, 0, 0, 1].into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Starts `k` `distq-worker` processes (from the directory of this executable), handing
/// them the key through the environment so it never shows in `ps`.
fn spawn_workers(k: u32, addr: &str, authkey: &AuthKey) -> distq::Result<Vec<Child>> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("finding distq-master's own path", e))?
        .with_file_name("distq-worker");
    (0..k)
        .map(|_| {
            Command::new(&exe)
                .args(["--connect", addr, "--forever", "-q"])
                .env(
                    "DISTQ_AUTHKEY",
                    std::ffi::OsStr::from_bytes(authkey.as_bytes()),
                )
                .spawn()
                .map_err(|e| Error::io(format!("starting {}", exe.display()), e))
        })
        .collect()
}
