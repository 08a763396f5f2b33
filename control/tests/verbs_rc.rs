//! RDMA mode, reliable connections end to end: Debian's unmodified `ibv_rc_pingpong` between
//! two registered containers of one simulated host, through Freeflow's `libibverbs.so.1` and
//! the router's software engine; polling (`-c`: the data is validated) and completion events
//! (`-e`). Then a C program built against the installed headers checks the verbs one by one:
//! CQs, completion channels (poll(2) on the channel fd), the QP state machine and its attribute
//! masks, every opcode, inline data, unsignaled sends, scatter/gather lists, and the errors
//! (LOC_PROT_ERR, REM_ACCESS_ERR, RNR, WR_FLUSH_ERR, RETRY_EXC_ERR, ENETUNREACH, EINVAL).
//!
//! Under strace, polling an empty CQ and posting receives make no system call, and posting a
//! list of sends at most one (the doorbell of a parked router). Containers cannot use each
//! other's QP numbers or keys, and one that writes garbage into its queue is detached alone.
//!
//! Needs root, a built workspace (`cargo build --workspace`), ibverbs-utils, libibverbs-dev and
//! strace (scripts/test.sh installs them). The Site set-up is a trimmed copy of the one in verbs_mr.rs
//! (integration test files are separate crates).

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
    /// One host with Freeflow up; containers server, client (tenant blue) and other (tenant red)
    /// registered.
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
        for (name, ip) in [
            ("server", [10, 32, 0, 2]),
            ("client", [10, 32, 0, 3]),
            ("other", [10, 32, 0, 4]),
        ] {
            cluster
                .add_container(0, name, Ipv4Addr::from(ip), 12)
                .unwrap();
        }
        let work = std::env::temp_dir().join(format!("ff-verbs-rc-{tag}"));
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
        for (name, tenant) in [("server", "blue"), ("client", "blue"), ("other", "red")] {
            let c = site.cluster().container(name).unwrap().clone();
            let out = site
                .in_host(env!("CARGO_BIN_EXE_freeflow"))
                .args(["container", "add", name, "--dir"])
                .arg(&site.dir)
                .arg("--netns")
                .arg(&c.netns_path)
                .args(["--ip", &c.ip.to_string(), "--tenant", tenant])
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
    fn verbs_app(&self, container: &str, program: &Path, env: &[(&str, &str)]) -> Command {
        let c = self.cluster().container(container).unwrap();
        let mut cmd = topology::command_in(&c.netns, "env");
        cmd.arg(format!("FREEFLOW_DIR={}", self.dir.display()))
            .arg(format!(
                "LD_LIBRARY_PATH={}",
                self.dir.join("verbs").display()
            ));
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.args(["timeout", "-s", "KILL", "60"])
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

/// Runs `ibv_rc_pingpong ARGS` as server in `server` and as client (naming the server's
/// overlay address) in `client`; returns both outputs.
fn pingpong(site: &Site, port: u16, args: &[&str]) -> (Output, Output) {
    let program = Path::new("ibv_rc_pingpong");
    let port_arg = port.to_string();
    let mut server = site
        .verbs_app("server", program, &[])
        .args(["-p", &port_arg])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    site.wait_listening("server", port, &mut server);
    let client = site
        .verbs_app("client", program, &[])
        .args(["-p", &port_arg])
        .args(args)
        .arg("10.32.0.2")
        .output()
        .unwrap();
    let server = server.wait_with_output().unwrap();
    (server, client)
}

/// Checks a pingpong run: both sides exit 0, report their transfer, and show the GIDs of both
/// containers (their overlay addresses).
fn assert_pingpong(site: &Site, (server, client): &(Output, Output), iters: u64, size: u64) {
    for (who, out, local, remote) in [
        ("server", server, "10.32.0.2", "10.32.0.3"),
        ("client", client, "10.32.0.3", "10.32.0.2"),
    ] {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ibv_rc_pingpong {who}: {}\n--- router log\n{}",
            describe(out),
            site.router_log()
        );
        assert!(
            text.contains(&format!("{} bytes in", iters * size * 2))
                && text.contains(&format!("{iters} iters in")),
            "{who}: {}",
            describe(out)
        );
        assert!(
            text.contains("local address:  LID 0x0000")
                && text.contains(&format!("GID ::ffff:{local}"))
                && text.contains(&format!("GID ::ffff:{remote}")),
            "{who}: {}",
            describe(out)
        );
        eprintln!("{who}: {}", text.trim_end().replace('\n', "\n    "));
    }
}

#[test]
fn unmodified_ibv_rc_pingpong_runs_between_two_containers() {
    let site = Site::new("vrc");
    // Polling, with the received data validated, at the default size (4 KiB: through the
    // registered buffer, not inline).
    let runs = pingpong(&site, 18515, &["-g", "0", "-c", "-n", "1000"]);
    assert_pingpong(&site, &runs, 1000, 4096);
    // Completion events: the program sleeps in ibv_get_cq_event on the channel's fd.
    let runs = pingpong(&site, 18516, &["-g", "0", "-c", "-e", "-n", "500"]);
    assert_pingpong(&site, &runs, 500, 4096);
    // Small messages (inline data) and several sizes.
    let runs = pingpong(&site, 18517, &["-g", "0", "-c", "-s", "64", "-n", "2000"]);
    assert_pingpong(&site, &runs, 2000, 64);
    let runs = pingpong(
        &site,
        18518,
        &["-g", "0", "-c", "-e", "-s", "100000", "-n", "50"],
    );
    assert_pingpong(&site, &runs, 50, 100000);
}

/// The C side of the checks below (its own file, to be readable and compilable by hand).
const PROBE: &str = include_str!("verbs_rc_probe.c");

/// Builds [`PROBE`] against the installed headers and the system's libibverbs (so it imports
/// the verbs with rdma-core's symbol versions, like any Debian binary).
fn build_probe(work: &Path) -> PathBuf {
    let source = work.join("qp_probe.c");
    let binary = work.join("qp_probe");
    std::fs::write(&source, PROBE).unwrap();
    let out = Command::new("cc")
        .args(["-Wall", "-Werror", "-O1", "-o"])
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

#[test]
fn every_verb_and_every_error_as_rdma_core_reports_them() {
    let site = Site::new("vrq");
    let probe = build_probe(&site.work);
    let out = site
        .verbs_app("client", &probe, &[])
        .args(["checks", "10.32.0.4"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("checks passed"),
        "{}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
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
fn polling_and_posting_make_no_system_call() {
    let site = Site::new("vrs");
    let probe = build_probe(&site.work);
    let log = site.work.join("strace.log");
    let out = site
        .verbs_app("client", Path::new("strace"), &[])
        .args(["-qq", "-o"])
        .arg(&log)
        .arg(&probe)
        .arg("nosyscall")
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("checks passed"),
        "{}",
        describe(&out)
    );
    let log = std::fs::read_to_string(&log).unwrap();
    // 100,000 empty polls and 32 receives posted: not one system call.
    let polls = between_markers(&log, "getppid(");
    assert!(polls.is_empty(), "system calls while polling: {polls:?}");
    // 32 sends posted in one list: at most the doorbell, if the router's shard was parked.
    let sends = between_markers(&log, "getpgrp(");
    eprintln!(
        "100000 empty polls and 32 posted receives: {} system calls; 32 posted sends: {} ({sends:?})",
        polls.len(),
        sends.len()
    );
    assert!(
        sends.is_empty() || (sends.len() == 1 && sends[0].starts_with("write(")),
        "system calls while posting sends: {sends:?}"
    );
}

#[test]
fn containers_cannot_reach_each_others_queues_or_memory() {
    let site = Site::new("vri");
    let probe = build_probe(&site.work);
    // server holds a QP and a region and says their numbers; client guesses with them.
    let mut holder = site
        .verbs_app("server", &probe, &[])
        .arg("hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let stdout = holder.stdout.as_mut().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .unwrap();
    }
    let numbers: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(numbers.len(), 4, "holder said {first:?}");
    let out = site
        .verbs_app("client", &probe, &[])
        .args(["guess", "10.32.0.2"])
        .args(&numbers)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("checks passed"),
        "guess: {}",
        describe(&out)
    );
    // A container that writes garbage into its queue is detached; nobody else is.
    let out = site
        .verbs_app("other", &probe, &[])
        .arg("hostile")
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("checks passed"),
        "hostile: {}\n--- router log\n{}",
        describe(&out),
        site.router_log()
    );
    assert!(
        site.router_log()
            .contains("verbs queue protocol violation: ring index out of bounds"),
        "{}",
        site.router_log()
    );
    drop(holder.stdin.take());
    let held = holder.wait_with_output().unwrap();
    assert!(
        held.status.success() && String::from_utf8_lossy(&held.stdout).contains("checks passed"),
        "holder: {}",
        describe(&held)
    );
    // And the two containers still talk.
    let runs = pingpong(&site, 18519, &["-g", "0", "-c", "-n", "20"]);
    assert_pingpong(&site, &runs, 20, 4096);
}
