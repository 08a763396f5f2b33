//! RDMA mode, `ibv_resize_cq` and shared receive queues end to end: a C program built against
//! the installed headers (`verbs_srq_probe.c`) runs in a registered container through
//! Freeflow's `libibverbs.so.1` and the router's software engine.
//!
//! Resizing: up and down with completions pending (kept, in order), below the pending count
//! (EINVAL, the CQ unchanged), a poller thread taking completions while another thread posts
//! and resizes (each completion exactly once, in order), and completion channels armed before
//! a resize and notified after it.
//!
//! Shared receive queues: one SRQ feeding two QPs that receive SENDs from two peers (receives
//! taken in posting order, data in the SRQ's buffers), `ibv_post_srq_recv` lists, a full SRQ
//! (ENOMEM), `ibv_query_srq`, `ibv_modify_srq` (no limit events: EOPNOTSUPP), EBUSY while QPs
//! use it, `ibv_post_recv` refused on such a QP, RNR on an empty SRQ and the waiting SEND
//! completing once a receive is posted, a QP in ERR leaving the SRQ to the other QP, another
//! context's SRQ refused; and Debian's unmodified `ibv_srq_pingpong` (16 QPs on one SRQ)
//! between two containers, polling and with completion events. Under strace, posting
//! receives to an SRQ (and polling an empty CQ) makes no system call.
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils, libibverbs-dev and
//! strace (scripts/test.sh installs them). The Site set-up is a trimmed copy of the one in
//! verbs_rc.rs (integration test files are separate crates).

use freeflow_control::topology::{self, Cluster, ClusterSpec};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const VNET: &str = "10.32.0.0/12";

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_freeflow"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Site {
    cluster: Option<Cluster>,
    dir: PathBuf,
    work: PathBuf,
}

impl Site {
    /// One host with Freeflow up; containers server and client (tenant blue) registered.
    fn new(prefix: &str) -> Site {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "RDMA-mode tests build network namespaces: run as root"
        );
        for built in ["freeflow-router", "libibverbs.so"] {
            assert!(
                target_dir().join(built).exists(),
                "build the workspace first ({built} missing)"
            );
        }
        let tag = topology::fresh_tag(prefix);
        let mut cluster = Cluster::create(ClusterSpec::new(&tag, 1)).unwrap();
        for (name, ip) in [("server", [10, 32, 0, 2]), ("client", [10, 32, 0, 3])] {
            cluster
                .add_container(0, name, Ipv4Addr::from(ip), 12)
                .unwrap();
        }
        let work = std::env::temp_dir().join(format!("ff-verbs-srq-{tag}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let dir = work.join("h0");
        let site = Site {
            cluster: Some(cluster),
            dir: dir.clone(),
            work: work.clone(),
        };
        let out = site
            .in_host(env!("CARGO_BIN_EXE_freeflow"))
            .args(["up", "--dir"])
            .arg(&dir)
            .args([
                "--host-ip",
                "192.168.1.1",
                "--vnet-prefix",
                VNET,
                "--registry",
            ])
            .arg(format!("file:{}", work.join("registry.json").display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "freeflow up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for name in ["server", "client"] {
            let c = site.cluster().container(name).unwrap().clone();
            let out = site
                .in_host(env!("CARGO_BIN_EXE_freeflow"))
                .args(["container", "add", name, "--dir"])
                .arg(&site.dir)
                .arg("--netns")
                .arg(&c.netns_path)
                .args(["--ip", &c.ip.to_string(), "--tenant", "blue"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "container add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        site
    }

    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().unwrap()
    }

    fn in_host(&self, program: &str) -> Command {
        self.cluster()
            .command_in(&self.cluster().hosts()[0].netns, program)
    }

    /// `program` in a container with `FREEFLOW_DIR=DIR LD_LIBRARY_PATH=DIR/verbs`, bounded by
    /// a timeout.
    fn verbs_app(&self, container: &str, program: &Path) -> Command {
        let c = self.cluster().container(container).unwrap();
        let mut cmd = topology::command_in(&c.netns, "env");
        cmd.arg(format!("FREEFLOW_DIR={}", self.dir.display()))
            .arg(format!(
                "LD_LIBRARY_PATH={}",
                self.dir.join("verbs").display()
            ))
            .args(["timeout", "-s", "KILL", "90"])
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }

    /// Waits until something listens on TCP `port` in `container`'s network namespace.
    fn wait_listening(&self, container: &str, port: u16, server: &mut Child) {
        let c = self.cluster().container(container).unwrap();
        let needle = format!(":{port:04X} 00000000:0000 0A");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = topology::command_in(&c.netns, "cat")
                .args(["/proc/net/tcp", "/proc/net/tcp6"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&needle) {
                return;
            }
            if let Ok(Some(status)) = server.try_wait() {
                panic!("the server exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on {port} in {container}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn router_log(&self) -> String {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self
            .in_host(env!("CARGO_BIN_EXE_freeflow"))
            .args(["down", "--dir"])
            .arg(&self.dir)
            .output();
        drop(self.cluster.take());
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The C side of the checks (its own file, to be readable and compilable by hand).
const PROBE: &str = include_str!("verbs_srq_probe.c");

/// Builds [`PROBE`] against the installed headers and the system's libibverbs.
fn build_probe(work: &Path) -> PathBuf {
    let source = work.join("srq_probe.c");
    let binary = work.join("srq_probe");
    std::fs::write(&source, PROBE).unwrap();
    let out = Command::new("cc")
        .args(["-Wall", "-Werror", "-O1", "-pthread", "-o"])
        .arg(&binary)
        .arg(&source)
        .arg("-libverbs")
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "building the probe failed (libibverbs-dev installed?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

fn run_probe(site: &Site, probe: &Path, mode: &str) {
    let out = site.verbs_app("client", probe).arg(mode).output().unwrap();
    check_probe(site, mode, &out);
}

fn check_probe(site: &Site, mode: &str, out: &Output) {
    eprintln!(
        "{mode}: {}",
        String::from_utf8_lossy(&out.stdout).trim_end()
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("checks passed"),
        "{mode}: {}\n--- router log\n{}",
        describe(out),
        site.router_log()
    );
}

#[test]
fn resize_cq_keeps_pending_completions_in_order_and_refuses_too_small_sizes() {
    let site = Site::new("vsz");
    let probe = build_probe(&site.work);
    run_probe(&site, &probe, "resize");
}

#[test]
fn a_shared_receive_queue_feeds_two_qps_and_reports_its_errors() {
    let site = Site::new("vsq");
    let probe = build_probe(&site.work);
    run_probe(&site, &probe, "srq");
}

/// Lines of an strace log strictly between the first two lines that start with `marker`.
fn between_markers<'a>(log: &'a str, marker: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = log.lines().collect();
    let at: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with(marker))
        .map(|(i, _)| i)
        .collect();
    assert!(at.len() >= 2, "markers {marker} missing in:\n{log}");
    lines[at[0] + 1..at[1]].to_vec()
}

#[test]
fn posting_to_an_srq_makes_no_system_call() {
    let site = Site::new("vsn");
    let probe = build_probe(&site.work);
    let log = site.work.join("strace.log");
    let out = site
        .verbs_app("client", Path::new("strace"))
        .args(["-qq", "-o"])
        .arg(&log)
        .arg(&probe)
        .arg("nosyscall")
        .output()
        .unwrap();
    check_probe(&site, "nosyscall", &out);
    let log = std::fs::read_to_string(&log).unwrap();
    let calls = between_markers(&log, "getppid(");
    assert!(
        calls.is_empty(),
        "system calls while posting to an SRQ: {calls:?}"
    );
}

/// Runs `ibv_srq_pingpong ARGS` as server in `server` and as client in `client`.
fn srq_pingpong(site: &Site, port: u16, args: &[&str]) -> (Output, Output) {
    let program = Path::new("ibv_srq_pingpong");
    let port_arg = port.to_string();
    let mut server = site
        .verbs_app("server", program)
        .args(["-p", &port_arg])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("server", port, &mut server);
    let client = site
        .verbs_app("client", program)
        .args(["-p", &port_arg])
        .args(args)
        .arg("10.32.0.2")
        .output()
        .unwrap();
    let server = server.wait_with_output().unwrap();
    (server, client)
}

#[test]
fn unmodified_ibv_srq_pingpong_runs_between_two_containers() {
    let site = Site::new("vsp");
    for (port, args, iters, size) in [
        (18521, vec!["-g", "0", "-n", "1000"], 1000u64, 4096u64),
        (
            18522,
            vec!["-g", "0", "-e", "-n", "300", "-s", "64"],
            300,
            64,
        ),
        (
            18523,
            vec!["-g", "0", "-q", "4", "-r", "50", "-n", "500"],
            500,
            4096,
        ),
    ] {
        let (server, client) = srq_pingpong(&site, port, &args);
        for (who, out) in [("server", &server), ("client", &client)] {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "ibv_srq_pingpong {args:?} {who}: {}\n--- router log\n{}",
                describe(out),
                site.router_log()
            );
            assert!(
                text.contains(&format!("{} bytes in", iters * size * 2))
                    && text.contains(&format!("{iters} iters in")),
                "{who}: {}",
                describe(out)
            );
            // Every QP printed its address: local and remote, with the GIDs of both.
            assert!(
                text.contains("GID ::ffff:10.32.0.2") && text.contains("GID ::ffff:10.32.0.3"),
                "{who}: {}",
                describe(out)
            );
            eprintln!("{who} {args:?}: {}", text.lines().last().unwrap_or(""));
        }
    }
}
