//! `freeflow-bench cluster` at small scale, so that the scale test cannot rot: three simulated
//! hosts on a real etcd, 30 containers, every phase run; then the same run interrupted by
//! SIGTERM half way, which must leave nothing behind. Needs root, Debian's etcd-server and curl,
//! and the workspace built (the bench runs `freeflow` and `freeflow-router` from next to it).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_freeflow-bench");
/// Generous bound on one small run (it takes about half a minute on a busy 2-core machine).
const RUN_LIMIT: &str = "170";

fn small_run(tag: &str) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", RUN_LIMIT, BENCH, "cluster"]).args([
        "--hosts",
        "3",
        "--containers",
        "30",
        "--changes",
        "4",
        "--idle-seconds",
        "1",
        "--big-registered",
        "24",
        "--big-attached",
        "10",
        "--tag",
        tag,
    ]);
    c
}

/// What a run of `tag` could leave behind: namespaces, its work directory, processes that name
/// that directory (etcd, daemons, routers, watchers, holders).
fn leftovers(tag: &str) -> Vec<String> {
    let mut found = Vec::new();
    let prefix = format!("ff-{tag}-");
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                found.push(format!("namespace {name}"));
            }
        }
    }
    let work = format!("/dev/shm/freeflow-bench-cluster-{tag}");
    if Path::new(&work).exists() {
        found.push(work.clone());
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&work) {
                found.push(format!("process {:?}: {cmdline}", p.file_name()));
            }
        }
    }
    found
}

fn tag(suffix: &str) -> String {
    format!("cb{}{suffix}", std::process::id() % 10_000)
}

#[test]
fn small_cluster_runs_every_phase() {
    let tag = tag("a");
    let out = small_run(&tag)
        .arg("--json")
        .stderr(Stdio::inherit())
        .output()
        .expect("run freeflow-bench");
    assert!(out.status.success(), "freeflow-bench cluster failed");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let n = |path: &str| {
        r.pointer(path)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{path} missing in {r:#}"))
    };
    assert_eq!(n("/hosts"), 3.0);
    assert_eq!(n("/registration/containers"), 30.0);
    assert_eq!(n("/registration/latency/samples"), 30.0);
    assert!(n("/registration/per_second") > 0.0);
    assert!(n("/cold_start_s") > 0.0);
    assert_eq!(n("/convergence_add/samples"), 4.0);
    assert_eq!(n("/convergence_remove/samples"), 4.0);
    // Host 2 served containers 2, 5, ..., 29; it was killed, and its records expired.
    assert_eq!(n("/host_kill/host"), 2.0);
    assert_eq!(n("/host_kill/containers_of_host"), 10.0);
    assert!(n("/host_kill/gone_everywhere_s") > 0.0);
    // etcd restarted from its data: the 20 containers of the live hosts are all there, and
    // both live routers hold exactly the registry.
    assert_eq!(n("/etcd_restart/registry_before"), 20.0);
    assert_eq!(n("/etcd_restart/lost"), 0.0);
    assert_eq!(n("/etcd_restart/routers_equal_to_registry"), 2.0);
    assert_eq!(n("/idle/hosts"), 2.0);
    assert!(n("/idle/router_rss_kib_mean") > 0.0 && n("/idle/daemon_rss_kib_mean") > 0.0);
    assert_eq!(n("/big_host/registered"), 24.0);
    assert_eq!(n("/big_host/attached_verbs"), 5.0);
    assert_eq!(n("/big_host/attached_socket"), 5.0);
    assert_eq!(n("/big_host/attach/samples"), 10.0);
    assert_eq!(leftovers(&tag), Vec::<String>::new());
}

#[test]
fn sigterm_half_way_leaves_nothing_behind() {
    let tag = tag("b");
    let mut child = small_run(&tag)
        .args(["--progress-json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run freeflow-bench");
    // Read progress until the registrations run (etcd, hosts, daemons, routers and watchers are
    // all up then), on a thread, so that the wait is bounded.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.contains("registering") {
                let _ = tx.send(());
                break;
            }
        }
        // Keep draining so that the bench never blocks on a full pipe.
        for _ in lines {}
    });
    let reached = rx.recv_timeout(Duration::from_secs(120));
    // `timeout` runs the bench as its child: signal the bench itself.
    let bench_pid = std::fs::read_to_string(format!("/proc/{}/task/{0}/children", child.id()))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok())
        .expect("the bench under timeout");
    let rc = Command::new("kill")
        .args(["-TERM", &bench_pid.to_string()])
        .status()
        .expect("kill");
    assert!(rc.success());
    let status = child.wait().expect("wait");
    assert!(reached.is_ok(), "the bench never started registering");
    assert!(!status.success(), "an interrupted run must fail");
    assert_eq!(leftovers(&tag), Vec::<String>::new());
}
