//! TCP mode under faults (issue 10): a stopped router, a container past its router's listener
//! cap. Two simulated hosts, Freeflow up on both, unmodified Python programs with libfsocket.so
//! preloaded. Needs root and a built workspace (`cargo build --workspace`).

mod common;

use common::{Site, SiteSpec};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// Answers every connection on any of its ports with "HELLO <port>" (see the program).
const SERVER: &str = include_str!("programs/tcp_faults_server.py");
/// Connects when told on stdin and prints how long it took (see the program).
const CLIENT: &str = include_str!("programs/tcp_faults_client.py");

/// How long any one step may take before the test fails (a hang must not hang CI).
const STEP: Duration = Duration::from_secs(30);

/// Two hosts; web on host 0 and db on host 1, both registered (tenant blue).
fn two_hosts(prefix: &str) -> Site {
    common::require_root("TCP-mode");
    common::require_built(&["freeflow-router"]);
    Site::create(SiteSpec {
        prefix,
        work_prefix: "ff-tcpf",
        hosts: 2,
        containers: &[(0, "web", [10, 32, 0, 2]), (1, "db", [10, 32, 0, 4])],
        registered: &[("web", "blue"), ("db", "blue")],
        ..SiteSpec::default()
    })
}

/// python3 running `script` in `container` with the shim preloaded, bounded in time.
fn python(site: &Site, container: &str, script: &str) -> Command {
    let mut cmd = site.shim_env(container, true);
    cmd.args(["timeout", "-s", "KILL", "90", "python3", "-c", script]);
    cmd
}

/// A program the test talks to line by line; killed when dropped.
struct Program {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Program {
    fn start(cmd: &mut Command) -> Program {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Program {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// The program's next line; fails the test if none comes within [`STEP`].
    fn line(&self, waiting_for: &str) -> String {
        self.lines
            .recv_timeout(STEP)
            .unwrap_or_else(|e| panic!("no line while waiting for {waiting_for}: {e}"))
    }

    fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connect by the client program: its line, and how long the program says it took.
fn connect(client: &mut Program, to: &str) -> (String, f64) {
    client.tell(&format!("connect {to}"));
    let line = client.line("a connect");
    let seconds = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected client line {line:?}"));
    (line, seconds)
}

/// The pid of host `host`'s router.
fn router_pid(site: &Site, host: usize) -> libc::pid_t {
    let out = Command::new("pgrep")
        .args([
            "-f",
            &format!("freeflow-router --dir {}", site.dirs[host].display()),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the router runs")
}

/// A router stopped with SIGSTOP; continued (SIGCONT) when dropped, also when the test fails
/// (the site's teardown needs a router that answers).
struct Stopped(libc::pid_t);

impl Stopped {
    fn new(pid: libc::pid_t) -> Stopped {
        // SAFETY: kill has no memory-safety preconditions; the pid is the test's own router.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Connects host `host`'s router set up (its status counter).
fn tcp_connects(site: &Site, host: usize) -> u64 {
    site.router_status(host)["router"]["tcp_connects"]
        .as_u64()
        .unwrap_or(0)
}

/// Issue 10, finding 6: a stopped router must not make connects hang. The client's connects
/// while its router is stopped take the overlay (the server still listens there) and return
/// well within the application's own 10 s timeout, the later ones without waiting for the
/// router again; once the router continues, new connects are accelerated again. The clients
/// keep an interval timer, as profilers and language runtimes do: its signals must not
/// restart the wait.
#[test]
fn connects_fall_back_fast_while_the_router_is_stopped() {
    let site = two_hosts("tfs");
    let server = Program::start(python(&site, "db", SERVER).args(["5600", "1"]));
    assert_eq!(server.line("the server"), "LISTENING 1");
    site.wait_listener_known(0, "10.32.0.4", 5600);
    let mut client = Program::start(python(&site, "web", CLIENT).arg("timer"));
    let (line, _) = connect(&mut client, "10.32.0.4 5600");
    assert!(line.ends_with("HELLO 5600"), "{line}");
    let accelerated = tcp_connects(&site, 0);
    assert!(accelerated >= 1, "the first connect is accelerated");

    let stopped = Stopped::new(router_pid(&site, 0));
    let mut took = Vec::new();
    for _ in 0..3 {
        let (line, seconds) = connect(&mut client, "10.32.0.4 5600");
        assert!(
            line.starts_with("CONNECTED") && line.ends_with("HELLO 5600"),
            "{line}"
        );
        took.push(seconds);
    }
    // A process that starts while the router is stopped.
    let mut newcomer = Program::start(python(&site, "web", CLIENT).arg("timer"));
    let (line, seconds) = connect(&mut newcomer, "10.32.0.4 5600");
    assert!(line.ends_with("HELLO 5600"), "{line}");
    took.push(seconds);
    eprintln!("connects with the router stopped took {took:?} s");
    for seconds in &took {
        assert!(*seconds < 10.0, "a connect waited {seconds} s: {took:?}");
    }
    drop(stopped);

    // Accelerated again once the router answers (after the shim's back-off).
    let deadline = Instant::now() + STEP;
    loop {
        let (line, _) = connect(&mut client, "10.32.0.4 5600");
        assert!(line.ends_with("HELLO 5600"), "{line}");
        if tcp_connects(&site, 0) > accelerated {
            break;
        }
        assert!(Instant::now() < deadline, "connects not accelerated again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 10, finding 9: a container past its router's listener cap (256) still listens: the
/// listens beyond the cap are not accelerated but succeed, and clients reach them.
#[test]
fn listens_beyond_the_routers_cap_fall_back_to_the_overlay() {
    let site = two_hosts("tfl");
    let server = Program::start(python(&site, "db", SERVER).args(["6000", "260"]));
    let line = server.line("the server");
    assert_eq!(line, "LISTENING 260", "every listen succeeds");
    site.wait_listener_known(0, "10.32.0.4", 6000);
    let mut client = Program::start(&mut python(&site, "web", CLIENT));
    for port in [6000, 6255, 6256, 6259] {
        let (line, _) = connect(&mut client, &format!("10.32.0.4 {port}"));
        assert!(
            line.starts_with("CONNECTED") && line.ends_with(&format!("HELLO {port}")),
            "port {port}: {line}"
        );
    }
    let listeners = site.router_status(1)["router"]["tcp_listeners"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(listeners, 256, "the router accelerates up to its cap");
}
