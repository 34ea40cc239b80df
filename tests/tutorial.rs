//! Runs every command of `docs/tutorial.md`, so the tutorial cannot rot.
//!
//! The tutorial's fenced blocks are its script:
//!
//! * ```` ```sh ```` — a terminal session, run with `sh -e` in a scratch directory that
//!   all blocks share; it must exit 0 (or N with `exit=N`) within 90 s.
//!   `setup` blocks run once and are prepended to every later block (they stand for
//!   "do this in every terminal"). `bg=NAME` blocks are left running (another
//!   terminal); the test waits for their first line of output before going on.
//! * ```` ```python file=NAME ```` — written to NAME.
//! * ```` ```text expect ```` — lines the previous `sh` block must have printed;
//!   ```` ```text expect=NAME ```` waits for background block NAME to exit 0 and checks
//!   its output. Lines match in order, whitespace runs count as one space, and `…`
//!   stands for anything.
//!
//! Any other block is an error, so a new command cannot slip in unrun. Each `##` section
//! gets a fresh free port in place of 5000; `0.0.0.0` and `192.168.1.10` become
//! `127.0.0.1`. Background blocks are killed (their whole process group) at the end of
//! their section, or when the test fails.

mod common;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

#[derive(Debug)]
enum Block {
    Shell {
        script: String,
        setup: bool,
        bg: Option<String>,
        exit: i32,
    },
    File {
        name: String,
        text: String,
    },
    Expect {
        of: Option<String>,
        lines: Vec<String>,
    },
}

#[derive(Debug)]
struct Section {
    title: String,
    blocks: Vec<Block>,
}

fn parse(markdown: &str) -> Vec<Section> {
    let mut sections = vec![Section {
        title: "preamble".into(),
        blocks: Vec::new(),
    }];
    let mut lines = markdown.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        if let Some(title) = line.strip_prefix("## ") {
            sections.push(Section {
                title: title.to_string(),
                blocks: Vec::new(),
            });
            continue;
        }
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| !l.starts_with("```"))
            .collect();
        let mut words = info.split_whitespace();
        let lang = words.next().unwrap_or("");
        let attrs: Vec<(&str, Option<&str>)> = words
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (w, None),
            })
            .collect();
        let text = body.join("\n") + "\n";
        let block = match lang {
            "sh" => {
                let mut block = Block::Shell {
                    script: text,
                    setup: false,
                    bg: None,
                    exit: 0,
                };
                if let Block::Shell {
                    setup, bg, exit, ..
                } = &mut block
                {
                    for (k, v) in attrs {
                        match (k, v) {
                            ("setup", None) => *setup = true,
                            ("bg", Some(name)) => *bg = Some(name.to_string()),
                            ("exit", Some(code)) => *exit = code.parse().unwrap(),
                            other => panic!("line {}: unknown sh attribute {other:?}", n + 1),
                        }
                    }
                }
                block
            }
            "python" => match attrs[..] {
                [("file", Some(name))] => Block::File {
                    name: name.to_string(),
                    text,
                },
                _ => panic!("line {}: a python block needs file=NAME", n + 1),
            },
            "text" => match attrs[..] {
                [("expect", of)] => Block::Expect {
                    of: of.map(str::to_string),
                    lines: body.iter().map(|l| l.to_string()).collect(),
                },
                _ => panic!(
                    "line {}: a text block must be `expect` or `expect=NAME`",
                    n + 1
                ),
            },
            other => panic!("line {}: a ```{other} block cannot be run", n + 1),
        };
        sections.last_mut().unwrap().blocks.push(block);
    }
    sections
}

/// A process running one block, in its own process group, with its output in a file.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Proc {
    fn spawn(name: &str, script: &str, dir: &Path, log: PathBuf) -> Proc {
        let out = File::create(&log).unwrap();
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_distq-master"))
            .parent()
            .unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("sh")
            .args(["-e", "-c", script])
            .current_dir(dir)
            .env("PATH", path)
            .env("PYTHONUNBUFFERED", "1")
            .env_remove("DISTQ_AUTHKEY")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap();
        Proc {
            name: name.to_string(),
            child,
            log,
            started: Instant::now(),
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit, killing it (and failing) at the deadline.
    fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if self.started.elapsed() > LIMIT {
                self.kill();
                panic!(
                    "block {} did not finish within {LIMIT:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the whole group while its leader is unreaped (so the group id is still
    /// ours), then reaps it.
    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("sh")
                .args(["-c", "kill -s KILL -- \"-$1\" 2>/dev/null", "sh"])
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn normalize(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `line` contains the pieces of `pattern` (split at `…`) in order.
fn matches(pattern: &str, line: &str) -> bool {
    let mut rest = line;
    for piece in pattern.split('…') {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

fn check_expected(what: &str, output: &str, expected: &[String]) {
    let lines: Vec<String> = output.lines().map(normalize).collect();
    let mut from = 0;
    for want in expected {
        let want = normalize(want);
        match lines[from..].iter().position(|l| matches(&want, l)) {
            Some(i) => from += i + 1,
            None => panic!(
                "{what}: expected a line like {want:?} (after line {from}); output:\n{output}"
            ),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn substitute(text: &str, port: u16) -> String {
    text.replace(":5000", &format!(":{port}"))
        .replace("', 5000)", &format!("', {port})"))
        .replace("0.0.0.0", "127.0.0.1")
        .replace("192.168.1.10", "127.0.0.1")
}

#[test]
fn every_command_in_the_tutorial_works() {
    let markdown = include_str!("../docs/tutorial.md");
    let sections = parse(markdown);
    let shell_blocks = sections
        .iter()
        .flat_map(|s| &s.blocks)
        .filter(|b| matches!(b, Block::Shell { .. }))
        .count();
    assert!(
        shell_blocks >= 20,
        "the tutorial lost its commands? {shell_blocks}"
    );
    let have_python = !common::require_pythons().is_empty()
        && Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !have_python && std::env::var_os("CI").is_some() {
        panic!("CI is set but `python3` is not on PATH; the tutorial needs it");
    }

    let root = std::env::temp_dir().join(format!("distq-tutorial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("work");
    let logs = root.join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    let mut setup = String::new();
    let mut step = 0;
    for section in &sections {
        let needs_python = section.blocks.iter().any(|b| match b {
            Block::Shell { script, .. } => script.contains("python3"),
            _ => false,
        });
        if needs_python && !have_python {
            eprintln!(
                "note: no python3; skipping tutorial section {:?}",
                section.title
            );
            continue;
        }
        let port = free_port();
        let mut background: Vec<Proc> = Vec::new();
        let mut last: Option<String> = None;
        for block in &section.blocks {
            step += 1;
            let name = format!("{} / step {step}", section.title);
            match block {
                Block::File { name, text } => {
                    std::fs::write(dir.join(name), substitute(text, port)).unwrap()
                }
                Block::Shell {
                    script,
                    setup: is_setup,
                    bg,
                    exit,
                } => {
                    let script = substitute(script, port);
                    let full = format!("{setup}{script}");
                    let log = logs.join(format!("step{step}.log"));
                    let mut proc = Proc::spawn(&name, &full, &dir, log);
                    if let Some(bg) = bg {
                        proc.name = bg.clone();
                        let start = Instant::now();
                        while proc.output().is_empty() {
                            assert!(
                                start.elapsed() < Duration::from_secs(10),
                                "{name}: background block {bg} printed nothing in 10 s"
                            );
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        background.push(proc);
                        continue;
                    }
                    let status = proc.wait();
                    let output = proc.output();
                    assert_eq!(
                        status.code(),
                        Some(*exit),
                        "{name}: {script}\noutput:\n{output}"
                    );
                    last = Some(output);
                    if *is_setup {
                        setup.push_str(&script);
                    }
                }
                Block::Expect { of: None, lines } => {
                    let output = last
                        .as_deref()
                        .unwrap_or_else(|| panic!("{name}: expect without a command before it"));
                    let lines: Vec<String> = lines.iter().map(|l| substitute(l, port)).collect();
                    check_expected(&name, output, &lines);
                }
                Block::Expect {
                    of: Some(of),
                    lines,
                } => {
                    let proc = background
                        .iter_mut()
                        .find(|p| &p.name == of)
                        .unwrap_or_else(|| panic!("{name}: no background block {of}"));
                    let status = proc.wait();
                    let output = proc.output();
                    assert!(status.success(), "{name}: {of} failed: {status}\n{output}");
                    let lines: Vec<String> = lines.iter().map(|l| substitute(l, port)).collect();
                    check_expected(&format!("{name} ({of})"), &output, &lines);
                }
            }
        }
        drop(background); // kills whatever is still running
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn expectations_match_in_order_with_wildcards() {
    assert!(matches("Running task … * …...", "Running task 4 * 4..."));
    assert!(!matches("Result: … = …", "Put task 4..."));
    let out = "a 1\nb   2\nc 3\n";
    check_expected("t", out, &["a …".into(), "c 3".into()]);
    let unordered =
        std::panic::catch_unwind(|| check_expected("t", out, &["c 3".into(), "a 1".into()]));
    assert!(unordered.is_err(), "lines must appear in order");
    assert_eq!(normalize("b   2"), "b 2");
}
