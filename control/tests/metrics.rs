//! Prometheus metrics end to end: a real daemon and router started by `freeflow up --metrics`
//! in a simulated host's network namespace, with containers of two tenants registered; the
//! endpoint scraped with curl, and `freeflow status --prometheus`, both checked by promtool
//! (`promtool check metrics`, Debian's prometheus package) and read for the values they must
//! show. Needs root, a built router (`cargo build --workspace`), curl and promtool
//! (scripts/test.sh installs them); without them the test fails saying so.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use freeflow_testbed::test_support::{
    self, describe, require_programs, run_within, succeed_within, VNET,
};
use freeflow_testbed::{self as topology, Cluster, ClusterSpec};

/// The `freeflow` binary under test.
const FREEFLOW: &str = env!("CARGO_BIN_EXE_freeflow");
/// Where the daemon serves the metrics, inside the test's own host namespace.
const METRICS_ADDR: &str = "127.0.0.1:9464";
/// Every wait on a process is bounded by this.
const PROCESS_LIMIT: Duration = Duration::from_secs(30);
/// Debian's python (a python earlier on the PATH may be another build).
const DEBIAN_PYTHON: &str = "/usr/bin/python3";
/// One TCP connect to 10.32.0.3:9 (container a2, nothing listens), whatever its outcome.
const CONNECT_ONCE: &str = "import socket\n\
    s = socket.socket()\n\
    s.settimeout(5)\n\
    s.connect_ex(('10.32.0.3', 9))\n";

/// Stops the daemon and router of `dir` when dropped, also when the test fails.
struct Up<'a> {
    netns: &'a str,
    dir: &'a str,
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        let _ = run(topology::command_in(self.netns, FREEFLOW).args(["down", "--dir", self.dir]));
    }
}

/// Runs `cmd` (stdin closed) within PROCESS_LIMIT, else kills it and fails.
fn run(cmd: &mut Command) -> Output {
    run_within(cmd, b"", PROCESS_LIMIT)
}

fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    run_within(cmd, input, PROCESS_LIMIT)
}

#[track_caller]
fn succeed(cmd: &mut Command) -> String {
    succeed_within(cmd, PROCESS_LIMIT)
}

/// `promtool check metrics` on `text`: it must accept it (exit 0, no lint problem).
#[track_caller]
fn promtool_accepts(text: &str, what: &str) {
    let out = run_with_input(
        Command::new("promtool").args(["check", "metrics"]),
        text.as_bytes(),
    );
    assert!(
        out.status.success(),
        "promtool rejects {what}: {}\n--- metrics\n{text}",
        describe(&out)
    );
}

/// The value of the sample `series` (name and labels, as printed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[test]
fn daemon_serves_metrics_that_promtool_accepts() {
    topology::ensure_root().expect("the metrics test must run as root");
    require_programs(&["curl", "promtool"], "curl prometheus");
    let router = Path::new(FREEFLOW).with_file_name("freeflow-router");
    assert!(router.is_file(), "build the workspace first ({router:?})");
    let mut cluster = Cluster::create(ClusterSpec::new(topology::fresh_tag("met"), 1))
        .expect("build the simulated cluster");
    let host = cluster.hosts()[0].netns.clone();
    let tmp = tempfile::Builder::new()
        .prefix("ff-metrics-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_str().unwrap().to_owned();
    let registry = format!("file:{dir}/registry.json");
    let in_host = |program: &str| topology::command_in(&host, program);
    succeed(in_host(FREEFLOW).args([
        "up",
        "--dir",
        &dir,
        "--host-ip-prefix",
        "192.168.1.0/24",
        "--vnet-prefix",
        VNET,
        "--registry",
        &registry,
        "--metrics",
        METRICS_ADDR,
    ]));
    let _up = Up {
        netns: &host,
        dir: &dir,
    };
    for (name, ip, tenant) in [
        ("a1", "10.32.0.2", "blue"),
        ("a2", "10.32.0.3", "blue"),
        ("b1", "10.32.0.4", "green"),
    ] {
        let c = cluster
            .add_container(0, name, ip.parse().unwrap(), 12)
            .unwrap();
        succeed(
            in_host(FREEFLOW)
                .args([
                    "container",
                    "add",
                    name,
                    "--dir",
                    &dir,
                    "--ip",
                    ip,
                    "--tenant",
                    tenant,
                ])
                .arg("--netns")
                .arg(&c.netns_path),
        );
    }
    let url = format!("http://{METRICS_ADDR}/metrics");
    let scrape = || succeed(in_host("curl").args(["-sS", "--fail", "--max-time", "10", &url]));
    // The router's table follows the registry within a poll interval.
    let text = test_support::poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let text = scrape();
        (sample(&text, "freeflow_router_containers") == Some(3.0)).then_some(text)
    })
    .unwrap_or_else(|| panic!("the router never served 3 containers:\n{}", scrape()));
    promtool_accepts(&text, "the scraped metrics");
    for (series, value) in [
        ("freeflow_daemon_up", 1.0),
        ("freeflow_router_up", 1.0),
        ("freeflow_registry_hosts", 1.0),
        ("freeflow_registry_containers{tenant=\"blue\"}", 2.0),
        ("freeflow_registry_containers{tenant=\"green\"}", 1.0),
        ("freeflow_attachments{tenant=\"green\"}", 0.0),
        ("freeflow_router_restarts_total", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series}\n{text}");
    }
    assert!(
        sample(&text, "freeflow_shard_requests_total{shard=\"0\"}").is_some(),
        "{text}"
    );
    // The shard thread has run (it spins before it parks): its CPU time is known and not 0.
    let cpu = sample(&text, "freeflow_shard_cpu_seconds_total{shard=\"0\"}");
    assert!(cpu.is_some_and(|s| s > 0.0), "{text}");
    assert!(
        sample(&text, "freeflow_shard_parked_seconds_total{shard=\"0\"}").is_some(),
        "{text}"
    );
    let revision = sample(&text, "freeflow_registry_revision").expect("registry revision");

    // A TCP connect through the shim from container a1 (tenant blue) to an overlay address with
    // no accelerated listener: the router answers "fall back", counted for blue only.
    let shim = Path::new(FREEFLOW).with_file_name("libfsocket.so");
    let a1 = cluster.container("a1").unwrap().netns.clone();
    let out = run(topology::command_in(&a1, "env")
        .arg(format!("FREEFLOW_DIR={dir}"))
        .arg(format!("VNET_PREFIX={VNET}"))
        .arg(format!("LD_PRELOAD={}", shim.display()))
        .args([DEBIAN_PYTHON, "-c", CONNECT_ONCE]));
    assert!(out.status.success(), "{}", describe(&out));
    let text = scrape();
    promtool_accepts(&text, "the metrics after a fallback");
    assert_eq!(
        sample(&text, "freeflow_tcp_fallbacks_total{tenant=\"blue\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "freeflow_tcp_fallbacks_total{tenant=\"green\"}"),
        None,
        "{text}"
    );
    assert_eq!(
        sample(&text, "freeflow_attaches_accepted_total"),
        Some(1.0),
        "{text}"
    );

    // Each scrape reads afresh: a container removed shows at once.
    succeed(in_host(FREEFLOW).args(["container", "rm", "b1", "--dir", &dir]));
    let text = scrape();
    assert_eq!(
        sample(&text, "freeflow_registry_revision"),
        Some(revision + 1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "freeflow_registry_containers{tenant=\"green\"}"),
        None,
        "{text}"
    );

    let once = succeed(in_host(FREEFLOW).args(["status", "--dir", &dir, "--prometheus"]));
    promtool_accepts(&once, "freeflow status --prometheus");
    assert_eq!(
        sample(&once, "freeflow_registry_containers{tenant=\"blue\"}"),
        Some(2.0),
        "{once}"
    );

    let code = |path: &str| {
        succeed(
            in_host("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "10",
                ])
                .arg(format!("http://{METRICS_ADDR}{path}")),
        )
    };
    assert_eq!(code("/"), "404");
}
