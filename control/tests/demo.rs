//! `freeflow demo` end to end: the real demo with the smallest measurements, and the same
//! interrupted part way (in the TCP part and in the RDMA part). They need root, the whole
//! workspace built (`cargo build --workspace`: the demo runs freeflow-bench, freeflow-router,
//! libfsocket.so and libibverbs.so from next to the `freeflow` binary) and, for the RDMA part, a
//! C compiler and libibverbs-dev (scripts/test.sh installs it); without them they fail saying
//! so, they never skip.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use freeflow_control::os;
use freeflow_testbed as topology;

const FREEFLOW: &str = env!("CARGO_BIN_EXE_freeflow");
/// Bound on one demo run; with `--reps 1 --seconds 0.3` it takes about 60 s in a debug build
/// on an idle 2-core machine (10 s the cluster and TCP parts, the rest RDMA on one host and
/// across hosts), and over 120 s when builds run beside it (the RDMA engine's debug build
/// shares the cores): the bound is for a hang, not for speed.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);

fn preflight() {
    if let Err(e) = topology::ensure_root() {
        panic!("the demo tests must run as root: {e}");
    }
    for sibling in [
        "freeflow-bench",
        "freeflow-router",
        "libfsocket.so",
        "libibverbs.so",
    ] {
        let path = Path::new(FREEFLOW).with_file_name(sibling);
        assert!(
            path.is_file(),
            "{} is missing: run `cargo build --workspace` before these tests",
            path.display()
        );
    }
}

fn demo(args: &[&str]) -> Command {
    demo_of(FREEFLOW, args)
}

/// `PROGRAM demo ARGS` with no input and its output piped.
fn demo_of(program: impl AsRef<OsStr>, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The cluster tags the demo announced (`namespaces ff-<tag>-*` in its progress lines).
fn announced_tags(stderr: &str) -> Vec<String> {
    stderr
        .split("namespaces ff-")
        .skip(1)
        .filter_map(|rest| rest.split_once("-*").map(|(tag, _)| tag.to_owned()))
        .collect()
}

/// Fails if any namespace of `tags`, or a process of the demo's directories, is left.
#[track_caller]
fn assert_nothing_left(tags: &[String], output: &str) {
    for tag in tags {
        let left = topology::netns_of_tag(tag).expect("list namespaces");
        if !left.is_empty() {
            // Do not leave them to the next run either.
            let _ = topology::teardown_tag(tag);
            panic!("namespaces of cluster {tag} left behind: {left:?}\n{output}");
        }
        for dir in [
            std::env::temp_dir().join(format!("freeflow-demo-{tag}")),
            std::env::temp_dir().join(format!("freeflow-bench-tcp-{tag}")),
            std::env::temp_dir().join(format!("freeflow-bench-rdma-hosts-{tag}")),
        ] {
            assert!(!dir.exists(), "{} left behind\n{output}", dir.display());
        }
    }
}

/// Waits for `child` within [`DEMO_TIMEOUT`], collecting output. One that takes longer gets
/// SIGTERM (so that it still removes what it made), then SIGKILL, and the test fails.
fn wait_bounded(child: Child) -> Output {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEMO_TIMEOUT) {
        Ok(out) => out.expect("wait for freeflow demo"),
        Err(_) => {
            let _ = os::send_signal(pid, libc::SIGTERM);
            if rx.recv_timeout(Duration::from_secs(60)).is_err() {
                let _ = os::send_signal(pid, libc::SIGKILL);
            }
            panic!("freeflow demo did not finish within {DEMO_TIMEOUT:?}");
        }
    }
}

/// The RDMA part's namespace, as the demo announced it (`namespace ffrdma-<pid> `).
fn announced_rdma_netns(stderr: &str) -> Option<String> {
    let rest = stderr.split("namespace ffrdma-").nth(1)?;
    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!pid.is_empty()).then(|| format!("ffrdma-{pid}"))
}

/// Fails if the RDMA part's namespace, its router's directory or a process serving that
/// directory is left.
#[track_caller]
fn assert_no_rdma_left(netns: &str, output: &str) {
    let pid = netns.trim_start_matches("ffrdma-");
    let left = topology::list_netns().expect("list namespaces");
    if left.iter().any(|n| n == netns) {
        let _ = Command::new("ip").args(["netns", "del", netns]).status();
        panic!("namespace {netns} left behind\n{output}");
    }
    let dir = std::env::temp_dir().join(format!("freeflow-bench-rdma-{pid}"));
    assert!(!dir.exists(), "{} left behind\n{output}", dir.display());
    let dir = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(
            !args.windows(2).any(|w| w[0] == "--dir" && w[1] == dir),
            "a process still serves {dir}: {args:?}\n{output}"
        );
    }
}

/// The numbers on the RDMA table's row `label` (`9.33 M/s  108 ns  2.22x the 4.2 M/s target`
/// gives 9.33, 108, 2.22, 4.2); each must be positive and finite.
#[track_caller]
fn rdma_row(stdout: &str, label: &str, units: &[&str], all: &str) -> Vec<f64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no RDMA row {label:?}\n{all}"));
    let rest = &line[label.len()..];
    for unit in units {
        assert!(rest.contains(unit), "{unit:?} missing: {line}\n{all}");
    }
    let numbers: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|t| {
            t.trim_start_matches('(')
                .trim_end_matches([')', 'x'])
                .parse::<f64>()
                .ok()
        })
        .collect();
    assert!(!numbers.is_empty(), "no numbers: {line}\n{all}");
    for n in &numbers {
        assert!(n.is_finite() && *n > 0.0, "{n} in {line}\n{all}");
    }
    numbers
}

/// Waits for `child` (a demo) as [`wait_bounded`] does, and sends it SIGINT once its progress
/// on stderr shows `trigger`. Returns whether it was signalled, and its output with all of
/// stderr.
fn interrupt_when(mut child: Child, trigger: &'static str) -> (bool, Output) {
    let pid = child.id() as i32;
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut signalled = false;
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !signalled && String::from_utf8_lossy(&seen).contains(trigger) {
                signalled = true;
                // Only the demo gets it (not its process group, unlike a terminal's Ctrl-C): it
                // must pass it on to freeflow-bench itself.
                let _ = os::send_signal(pid, libc::SIGINT);
            }
        }
        let _ = tx.send((signalled, seen));
    });
    let mut out = wait_bounded(child);
    let (signalled, stderr) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("stderr reader");
    out.stderr = stderr;
    (signalled, out)
}

/// An interrupted demo exits 128 + SIGINT, says so, and prints no table (no `table_marker`).
#[track_caller]
fn assert_stopped_by_sigint(out: &Output, table_marker: &str, all: &str) {
    assert_eq!(out.status.code(), Some(130), "128 + SIGINT\n{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("freeflow: demo: interrupted by SIGINT"),
        "{all}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(table_marker),
        "no table after an interruption\n{all}"
    );
}

/// Fails unless `text` contains each of `expected`.
#[track_caller]
fn assert_contains_all(text: &str, expected: &[&str], all: &str) {
    for expected in expected {
        assert!(text.contains(expected), "{expected:?} missing\n{all}");
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn demo_prints_the_table_and_removes_everything() {
    preflight();
    let child = demo(&["--reps", "1", "--seconds", "0.3"])
        .spawn()
        .expect("start freeflow demo");
    let out = wait_bounded(child);
    let all = text(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tags = announced_tags(&stderr);
    assert_eq!(
        tags.len(),
        3,
        "three clusters announced (attach, TCP, RDMA across hosts)\n{all}"
    );
    assert_nothing_left(&tags, &all);
    let rdma_netns = announced_rdma_netns(&stderr)
        .unwrap_or_else(|| panic!("the RDMA part did not run (cc, libibverbs-dev?)\n{all}"));
    assert_no_rdma_left(&rdma_netns, &all);
    assert!(out.status.success(), "{all}");

    // The attach part: both containers in, the stranger out, the status shown.
    assert_contains_all(
        &stdout,
        &[
            "web   (10.32.0.2, host 0) attached",
            "db    (10.32.0.4, host 1) attached",
            "was refused: ",
            "router:     running",
        ],
        &all,
    );
    // The table: three rows with numbers, then the two-line summary.
    for row in ["host link", "overlay (VXLAN)", "Freeflow"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row) && l.contains("Gbit/s"))
            .unwrap_or_else(|| panic!("no table row {row:?}\n{all}"));
        assert_eq!(line.matches(" µs").count(), 2, "{line}\n{all}");
    }
    assert_contains_all(
        &stdout,
        &[
            "On the overlay, containers get ",
            "With Freeflow, the same containers",
        ],
        &all,
    );
    // The RDMA table: five rows, each with its measurement, the router's CPU per operation
    // where there is one, and the comparison (numbers parsed; no thresholds, the machine is
    // shared).
    assert!(
        stdout.contains("\nRDMA between two QPs on this host"),
        "{all}"
    );
    let cpu_and_ratio = |n: &[f64]| n.len() >= 3;
    for (label, unit) in [
        ("64 B SEND/RECV message rate", "M/s"),
        ("64 B RDMA WRITE message rate", "M/s"),
        ("64 B SEND round trip p50", "µs"),
    ] {
        let n = rdma_row(&stdout, label, &[unit, " ns ", "x the "], &all);
        assert!(cpu_and_ratio(&n), "{label}: {n:?}\n{all}");
    }
    let p99 = rdma_row(
        &stdout,
        "64 B SEND round trip p99",
        &["µs", "x the 2 µs target"],
        &all,
    );
    assert!(p99.len() >= 2, "{p99:?}\n{all}");
    let bw = rdma_row(
        &stdout,
        "64 KiB RDMA WRITE bandwidth",
        &["GB/s", " ns ", "x memcpy"],
        &all,
    );
    assert_eq!(bw.len(), 4, "bandwidth, CPU, ratio, memcpy: {bw:?}\n{all}");
    assert!(
        stdout.contains("the router's software engine between two programs on one host"),
        "{all}"
    );
    // The cross-host table, after the one-host one: each row's measurement, both routers' CPU
    // per operation, and what the issue compares it with (the host link's TCP, measured in the
    // same run).
    let (_, hosts) = stdout
        .split_once("\nRDMA between containers on two simulated hosts")
        .unwrap_or_else(|| panic!("no cross-host RDMA table\n{all}"));
    let send = rdma_row(
        hosts,
        "64 B SEND/RECV message rate",
        &["M/s", " / ", "x the 1 M/s goal"],
        &all,
    );
    assert_eq!(send.len(), 5, "rate, 2 CPU, ratio, goal: {send:?}\n{all}");
    let rtt = rdma_row(
        hosts,
        "64 B SEND round trip p50",
        &["µs", " / ", "x TCP ping-pong on the host link"],
        &all,
    );
    assert_eq!(
        rtt.len(),
        5,
        "round trip, 2 CPU, ratio, TCP: {rtt:?}\n{all}"
    );
    let bw = rdma_row(
        hosts,
        "64 KiB RDMA WRITE bandwidth",
        &["GB/s", " / ", "x one TCP stream on the host link"],
        &all,
    );
    assert_eq!(bw.len(), 5, "bandwidth, 2 CPU, ratio, TCP: {bw:?}\n{all}");
    // One numbered progress line per step, the last one counting all of them.
    assert_contains_all(
        &stderr,
        &[
            "[1/16] building a simulated cluster",
            "[10/16] TCP comparison: removing",
            "[12/16] RDMA repetition 1/1: ",
            "[13/16] RDMA comparison: stopping its router",
            "[14/16] RDMA across hosts: building a two-host cluster",
            "[15/16] RDMA across hosts, repetition 1/1: ",
            "[16/16] RDMA across hosts: removing its cluster",
        ],
        &all,
    );
}

#[test]
fn demo_interrupted_removes_everything() {
    preflight();
    let child = demo(&["--reps", "3", "--seconds", "1"])
        .spawn()
        .expect("start freeflow demo");
    let start = Instant::now();
    // Read progress until the TCP measurements run (freeflow-bench, its cluster, daemons and
    // servers all exist then), and interrupt there.
    let (signalled, out) = interrupt_when(child, "TCP repetition 1/3: overlay");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = text(&out);
    assert!(
        signalled,
        "the demo never reached the TCP measurements\n{all}"
    );
    let tags = announced_tags(&stderr);
    assert_eq!(tags.len(), 2, "two clusters announced\n{all}");
    assert_nothing_left(&tags, &all);
    assert_stopped_by_sigint(&out, "Gbit/s", &all);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "stopping took {:?}\n{all}",
        start.elapsed()
    );
}

#[test]
fn demo_interrupted_in_the_rdma_part_removes_everything() {
    preflight();
    let child = demo(&["--part", "rdma", "--reps", "2"])
        .spawn()
        .expect("start freeflow demo");
    // Interrupt while the measuring program runs (the router, the namespace and the program
    // all exist then).
    let (signalled, out) = interrupt_when(child, "RDMA repetition 1/2");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = text(&out);
    assert!(
        signalled,
        "the demo never reached the RDMA measurements\n{all}"
    );
    let netns = announced_rdma_netns(&stderr).expect("the RDMA namespace announced");
    assert_no_rdma_left(&netns, &all);
    assert_stopped_by_sigint(&out, "M/s", &all);
}

#[test]
fn demo_rdma_part_without_a_c_compiler_says_what_to_install() {
    preflight();
    // A PATH without cc: asked for alone, the RDMA part must fail and say why, before it
    // starts anything. (In the whole demo the same check skips the part, saying so.)
    let empty = tempfile::Builder::new()
        .prefix("ff-demo-path-")
        .tempdir()
        .expect("temporary directory");
    let out = wait_bounded(
        demo(&["--part", "rdma"])
            .env("PATH", empty.path())
            .spawn()
            .expect("start freeflow demo"),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "freeflow: demo: the RDMA comparison cannot run here: no C compiler (cc) found; \
         install build-essential libibverbs-dev",
        "{all}"
    );
}

#[test]
fn demo_needs_root() {
    preflight();
    // A copy in a directory anyone may enter (the build directory may be under /root): the
    // root check comes before the demo looks for anything else.
    let tmp = tempfile::Builder::new()
        .prefix("ff-demo-root-")
        .tempdir()
        .expect("temporary directory");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755");
    let copy = tmp.path().join("freeflow");
    std::fs::copy(FREEFLOW, &copy).expect("copy freeflow");
    let out = wait_bounded(
        demo_of(&copy, &[])
            // The demo builds network namespaces; as nobody it must say so and do nothing.
            .uid(65534)
            .gid(65534)
            .spawn()
            .expect("start freeflow demo as nobody"),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .starts_with("freeflow: demo: the demo builds network namespaces and must run as root"),
        "{all}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear line\n{all}");
}

#[test]
fn demo_rejects_bad_options() {
    for args in [
        &["--reps", "0"][..],
        &["--seconds", "0"],
        &["--seconds", "x"],
        &["--part", "udp"],
    ] {
        let out = Command::new(FREEFLOW)
            .arg("demo")
            .args(args)
            .output()
            .expect("run freeflow demo");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
}
