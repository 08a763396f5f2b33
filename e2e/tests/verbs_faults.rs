//! RDMA mode when the router goes: programs get errors, not silence. The router is SIGKILLed
//! under running programs (the daemon restarts it):
//!
//! - two unmodified `ibv_rc_pingpong` (the server sleeping in `ibv_get_cq_event`, the client
//!   polling) both exit with an error, on their own, instead of spinning for ever;
//! - a C probe with sends (one in an RNR wait) and receives outstanding gets each of them back
//!   as IBV_WC_WR_FLUSH_ERR with its wr_id, in order, its completion channel wakes, new posts
//!   fail with EIO, destroys succeed, and a new context on the restarted router works;
//! - Debian's unmodified `ibv_asyncwatch`, blocked in `ibv_get_async_event`, gets
//!   IBV_EVENT_DEVICE_FATAL and then exits on the next call's error (EIO).
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils, libibverbs-dev.
//! The Site scaffolding is in common/mod.rs.

mod common;

use common::{build_c_probe, Site, SiteSpec};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// How long a program may take to notice that its router is gone and exit.
const EXIT_BOUND: Duration = Duration::from_secs(30);

impl Site {
    /// One host with Freeflow up (its daemon restarts a killed router); containers server and
    /// client of tenant blue.
    fn new(prefix: &str) -> Site {
        common::require_root("RDMA-mode");
        common::require_built(&["freeflow-router", "libibverbs.so"]);
        Site::create(SiteSpec {
            prefix,
            work_prefix: "ff-verbs-faults",
            hosts: 1,
            containers: &[(0, "server", [10, 32, 0, 2]), (0, "client", [10, 32, 0, 3])],
            registered: &[("server", "blue"), ("client", "blue")],
            verbs_timeout: 120,
            ..SiteSpec::default()
        })
    }

    /// SIGKILLs the host's router (by its pid); returns the pid.
    fn kill_router(&self) -> i32 {
        let pattern = format!("freeflow-router --dir {}", self.dirs[0].display());
        let out = Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .unwrap();
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert_eq!(pids.len(), 1, "one router runs: {pids:?}");
        // SAFETY: kill has no memory preconditions; the pid is the router this test started.
        assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
        pids[0]
    }
}

/// The first process named `name` (its `comm`) among the descendants of `root`.
fn descendant_named(root: i32, name: &str) -> Option<i32> {
    // Each process's parent, from /proc/<pid>/stat (the comm field may hold spaces: after
    // its closing parenthesis come the state and the parent).
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid, comm));
        }
    }
    let descends = |mut pid: i32| {
        // Bounded: a chain of parents is never longer than the process table.
        for _ in 0..parents.len() {
            if pid == root {
                return true;
            }
            match parents.iter().find(|(p, _, _)| *p == pid) {
                Some(&(_, ppid, _)) => pid = ppid,
                None => return false,
            }
        }
        false
    };
    parents
        .iter()
        .find(|(pid, _, comm)| comm == name && descends(*pid))
        .map(|(pid, _, _)| *pid)
}

/// A running program whose stdout lines arrive on a channel (read by a thread) and whose
/// stderr is collected at the end.
struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (up to `bound`) for a line of stdout containing `needle`.
    fn wait_for_line(&mut self, needle: &str, bound: Duration) {
        let deadline = Instant::now() + bound;
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line with {needle:?} within {bound:?}: {}",
                    self.finish_now()
                ),
            }
        }
    }

    /// Waits (up to `bound`) until a process named `name` among the program's descendants
    /// (it runs under `env`, `timeout` and `stdbuf`) sleeps in read(2): blocked on a
    /// descriptor, as `ibv_get_async_event` blocks on the context's async_fd.
    fn wait_blocked_in_read(&mut self, name: &str, bound: Duration) {
        let root = self.child.id() as i32;
        let blocked = common::poll(bound, Duration::from_millis(10), || {
            let pid = descendant_named(root, name)?;
            let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
            // The first field is the system call's number: read(2) is 0 on x86_64 and 63 on
            // aarch64.
            let number = syscall.split_whitespace().next()?;
            let read = if cfg!(target_arch = "aarch64") {
                "63"
            } else {
                "0"
            };
            (number == read).then_some(())
        });
        if blocked.is_none() {
            panic!(
                "{name} did not block in read(2) within {bound:?}: {}",
                self.finish_now()
            );
        }
    }

    /// Waits (up to `bound`) for the program to exit; its exit code (None: killed by a
    /// signal) and everything it said. A program still running then is killed and the test
    /// fails.
    fn wait_exit(&mut self, bound: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), self.output());
            }
            if Instant::now() >= deadline {
                panic!(
                    "still running {bound:?} after the router's death: {}",
                    self.finish_now()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the program and returns what it said: SIGTERM to `timeout` (our child, not
    /// reaped), which passes it on to the program; SIGKILL if that did not end it in 2 s.
    fn finish_now(&mut self) -> String {
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.output()
    }

    fn output(&mut self) -> String {
        // The reader thread ends at end-of-file; take what it read.
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        format!("--- stdout\n{}\n--- stderr\n{stderr}", self.seen.join("\n"))
    }
}

/// `ibv_rc_pingpong ARGS` in `container`, its stdout line-buffered (so its progress can be
/// watched through the pipe).
fn pingpong(site: &Site, container: &str, args: &[&str]) -> Running {
    let mut cmd = site.verbs_app(container, "stdbuf", &[]);
    cmd.args(["-oL", "ibv_rc_pingpong"]).args(args);
    Running::spawn(cmd)
}

#[test]
fn ibv_rc_pingpong_exits_with_an_error_when_the_router_is_killed() {
    let site = Site::new("vfp");
    // Many iterations: the run would last minutes. The server waits for completions in
    // ibv_get_cq_event (-e), the client polls.
    let common = ["-p", "18530", "-g", "0", "-n", "100000000", "-s", "64"];
    let mut server = pingpong(&site, "server", &[&common[..], &["-e"]].concat());
    site.wait_listening("server", 18530, Some(&mut server.child));
    let mut client = pingpong(&site, "client", &[&common[..], &["10.32.0.2"]].concat());
    // Both print the remote address once connected, right before the ping-pong loop.
    client.wait_for_line("remote address", Duration::from_secs(20));
    server.wait_for_line("remote address", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let pid = site.kill_router();
    eprintln!("killed the router (pid {pid}) under the running ping-pong");
    for (who, run) in [("server (-e)", &mut server), ("client", &mut client)] {
        let (code, said) = run.wait_exit(EXIT_BOUND);
        eprintln!("{who} exited with {code:?}:\n{said}");
        // An error exit of its own: not success, not `timeout`'s kill (124 or 137).
        assert!(
            code.is_some_and(|c| c != 0 && c < 124),
            "{who} exited with {code:?}: {said}"
        );
        assert!(
            said.contains("Failed") || said.contains("failed"),
            "{who} reported no failure: {said}"
        );
    }
}

#[test]
fn ibv_asyncwatch_sees_device_fatal_when_the_router_is_killed() {
    let site = Site::new("vfa");
    let mut cmd = site.verbs_app("server", "stdbuf", &[]);
    cmd.args(["-oL", "ibv_asyncwatch", "-d", "ffv0"]);
    let mut watch = Running::spawn(cmd);
    // It prints its async_fd once the context is open, then blocks in ibv_get_async_event.
    watch.wait_for_line("async event FD", Duration::from_secs(20));
    watch.wait_blocked_in_read("ibv_asyncwatch", Duration::from_secs(20));
    let pid = site.kill_router();
    eprintln!("killed the router (pid {pid}) under ibv_asyncwatch");
    let (code, said) = watch.wait_exit(EXIT_BOUND);
    eprintln!("ibv_asyncwatch exited with {code:?}:\n{said}");
    assert!(
        said.contains("event_type IBV_EVENT_DEVICE_FATAL (8), port 1"),
        "no fatal event: {said}"
    );
    // Its loop ends when ibv_get_async_event fails (the device is gone): exit status 1.
    assert_eq!(code, Some(1), "{said}");
}

/// The C side (its own file, to be readable and compilable by hand).
const PROBE: &str = include_str!("programs/verbs_faults_probe.c");

#[test]
fn outstanding_requests_flush_and_a_new_context_works_after_a_router_kill() {
    let site = Site::new("vff");
    let probe = build_c_probe(
        &site.work,
        "faults_probe",
        PROBE,
        &["-Wall", "-Werror", "-O1"],
        &["-libverbs"],
    );
    let mut cmd = site.verbs_app("client", &probe, &[]);
    cmd.stdin(Stdio::piped());
    let mut run = Running::spawn(cmd);
    run.wait_for_line("READY", Duration::from_secs(30));
    let pid = site.kill_router();
    eprintln!("killed the router (pid {pid}) with work outstanding");
    run.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let (code, said) = run.wait_exit(Duration::from_secs(60));
    eprintln!("probe exited with {code:?}:\n{said}");
    assert!(
        code == Some(0) && said.contains("checks passed"),
        "{said}\n--- router log\n{}",
        site.router_log()
    );
}
