//! End-to-end tests of the `freeflow` command: real daemons, real routers, real network
//! namespaces. They need root and a built router (`cargo build --workspace`); without either
//! they fail with a message saying so, they never skip.
//!
//! Every test uses its own temporary runtime directory and, where it builds namespaces, its own
//! cluster tag. A [`Daemons`] guard stops whatever a test started, also when it fails: it runs
//! `freeflow down` and then kills any process still naming the test's directory.

use freeflow_testbed::test_support::{self, VNET};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use freeflow_control::os;
use freeflow_proto::paths;
use freeflow_testbed::{self as topology, Cluster, ClusterSpec, ContainerInfo};
use serde_json::Value;

/// The `freeflow` binary under test.
const FREEFLOW: &str = env!("CARGO_BIN_EXE_freeflow");
/// Bound on any one CLI invocation (the CLI bounds its own waits at about 10 s).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

fn preflight() {
    if let Err(e) = topology::ensure_root() {
        panic!("the freeflow CLI tests must run as root: {e}");
    }
    let router = Path::new(FREEFLOW).with_file_name("freeflow-router");
    assert!(
        router.is_file(),
        "{} is missing: run `cargo build --workspace` before these tests",
        router.display()
    );
}

/// A temporary runtime directory whose daemons and routers are stopped when it is dropped.
struct Daemons {
    dir: PathBuf,
    /// The network namespace the daemon runs in, if not this process's: its router answers
    /// only there, so status is asked there.
    netns: Option<String>,
    // Dropped after `drop` below has stopped everything.
    _tmp: tempfile::TempDir,
}

impl Daemons {
    fn new() -> Daemons {
        let tmp = tempfile::Builder::new()
            .prefix("ff-cli-")
            .tempdir()
            .expect("temporary directory");
        Daemons {
            dir: tmp.path().to_path_buf(),
            netns: None,
            _tmp: tmp,
        }
    }

    /// [`Daemons::new`] for a daemon started in network namespace `netns` (a simulated host).
    fn in_netns(netns: &str) -> Daemons {
        let mut daemons = Daemons::new();
        daemons.netns = Some(netns.to_owned());
        daemons
    }

    /// `freeflow ARGS` where the daemon runs.
    fn freeflow(&self, args: &[&str]) -> Command {
        match &self.netns {
            Some(netns) => freeflow_in(netns, args),
            None => freeflow(args),
        }
    }

    fn dir(&self) -> &str {
        self.dir.to_str().expect("utf-8 temp dir")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `name` in the directory's state directory (root only, outside DIR).
    fn state(&self, name: &str) -> PathBuf {
        paths::default_state_dir(&self.dir).join(name)
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        let _ = run_with_timeout(freeflow(&["down", "--dir", self.dir()]));
        for pid in processes_naming(&self.dir) {
            eprintln!(
                "cleanup: killing leftover pid {pid} of {}",
                self.dir.display()
            );
            let _ = os::send_signal(pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(paths::default_state_dir(&self.dir));
    }
}

/// Pids of processes with `dir` among their arguments (daemons and routers of one test).
fn processes_naming(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| cmdline.split(|&b| b == 0).any(|arg| arg == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// `freeflow ARGS` with a clean environment for the variables the CLI reads.
fn freeflow(args: &[&str]) -> Command {
    let mut cmd = Command::new(FREEFLOW);
    cmd.args(args);
    scrub(&mut cmd);
    cmd
}

/// `ip netns exec NETNS freeflow ARGS`.
fn freeflow_in(netns: &str, args: &[&str]) -> Command {
    let mut cmd = topology::command_in(netns, FREEFLOW);
    cmd.args(args);
    scrub(&mut cmd);
    cmd
}

fn scrub(cmd: &mut Command) {
    for var in [
        "FREEFLOW_DIR",
        "FREEFLOW_STATE_DIR",
        "HOST_IP_PREFIX",
        "VNET_PREFIX",
        "FREEFLOW_ROUTER",
    ] {
        cmd.env_remove(var);
    }
}

/// Runs to completion within [`COMMAND_TIMEOUT`] (killed and reported otherwise).
fn run_with_timeout(mut cmd: Command) -> Output {
    let described = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {described}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(output) => output.unwrap_or_else(|e| panic!("{described}: {e}")),
        Err(_) => {
            let _ = os::send_signal(pid, libc::SIGKILL);
            panic!("{described} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn ran(cmd: Command) -> Ran {
    let out = run_with_timeout(cmd);
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[track_caller]
fn succeed(cmd: Command) -> Ran {
    let described = format!("{cmd:?}");
    let r = ran(cmd);
    assert!(r.ok(), "{described} failed: {r}");
    r
}

/// Runs a command that must fail with exit code 1 and one clear line containing `expected`.
#[track_caller]
fn fail_with(cmd: Command, expected: &str) -> Ran {
    let described = format!("{cmd:?}");
    let r = ran(cmd);
    assert_eq!(r.code, Some(1), "{described} should exit 1: {r}");
    assert!(
        r.stderr.contains(expected),
        "{described}: stderr should mention {expected:?}: {r}"
    );
    assert!(
        r.stderr.starts_with("freeflow: "),
        "{described}: errors start with `freeflow: `: {r}"
    );
    r
}

fn status_json(d: &Daemons) -> (Option<i32>, Value) {
    let r = ran(d.freeflow(&["status", "--dir", d.dir(), "--json"]));
    let value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {r}"));
    (r.code, value)
}

/// Polls `f` every 10 ms until it returns `Some`, at most `limit`.
#[track_caller]
fn wait_for<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match test_support::poll(limit, Duration::from_millis(10), f) {
        Some(v) => v,
        None => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// `freeflow up --dir DIR --host-ip HOST_IP --vnet-prefix VNET EXTRA...`.
fn up_at(dir: &str, host_ip: &str, extra: &[&str]) -> Command {
    let mut cmd = freeflow(&[
        "up",
        "--dir",
        dir,
        "--host-ip",
        host_ip,
        "--vnet-prefix",
        VNET,
    ]);
    cmd.args(extra);
    cmd
}

/// `freeflow up` inside `netns` (which finds its address in 192.168.1.0/24) with `registry`.
fn up_in(netns: &str, dir: &str, registry: &str) -> Command {
    freeflow_in(
        netns,
        &[
            "up",
            "--dir",
            dir,
            "--host-ip-prefix",
            "192.168.1.0/24",
            "--vnet-prefix",
            VNET,
            "--registry",
            registry,
        ],
    )
}

/// `freeflow container add NAME --dir DIR --netns NETNS --ip IP`.
fn container_add(dir: &str, name: &str, netns: &str, ip: &str) -> Command {
    freeflow(&[
        "container",
        "add",
        name,
        "--dir",
        dir,
        "--netns",
        netns,
        "--ip",
        ip,
    ])
}

/// `freeflow container ls --dir DIR --json`, parsed.
fn container_ls_json(d: &Daemons) -> Value {
    let ls = succeed(freeflow(&["container", "ls", "--dir", d.dir(), "--json"]));
    serde_json::from_str(&ls.stdout).unwrap()
}

/// A simulated cluster of `hosts` hosts with a fresh tag.
fn cluster(hosts: usize) -> Cluster {
    Cluster::create(ClusterSpec::new(topology::fresh_tag("cli"), hosts))
        .expect("build the simulated cluster")
}

/// A container `name` on host `host` of `cluster` at `ip`/12.
fn add_container(cluster: &mut Cluster, host: usize, name: &str, ip: &str) -> ContainerInfo {
    cluster
        .add_container(host, name, ip.parse().unwrap(), 12)
        .expect("add a container")
}

fn up_local(d: &Daemons) -> Ran {
    succeed(up_at(d.dir(), "127.0.0.1", &[]))
}

/// The router's part of `freeflow status --json` (asked where the daemon runs), if it answered.
fn router_status(d: &Daemons) -> Option<Value> {
    let (_, st) = status_json(d);
    (st["router"]["running"] == true).then(|| st["router"].clone())
}

/// How many containers the router serves, if it answered.
fn registered(d: &Daemons) -> Option<u64> {
    router_status(d).and_then(|r| r["registered"].as_u64())
}

#[test]
fn lifecycle_registration_restart_and_down() {
    preflight();
    let mut cluster = cluster(2);
    let web = add_container(&mut cluster, 0, "web", "10.32.0.5");
    let h0 = cluster.host(0).unwrap().clone();
    let d = Daemons::in_netns(&h0.netns);
    let registry = format!("file:{}", d.path("shared-registry.json").display());

    // The daemon runs inside host 0's namespace and finds its address from the prefix.
    let up = succeed(up_in(&h0.netns, d.dir(), &registry));
    assert!(up.stdout.contains("router pid"), "{up}");
    assert!(d.path("libfsocket.so").is_file(), "socket shim installed");
    assert!(
        d.path("verbs/libibverbs.so.1").is_file(),
        "verbs shim installed"
    );

    let (code, st) = status_json(&d);
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["daemon"]["running"], true, "{st}");
    assert_eq!(st["daemon"]["restarts"], 0, "{st}");
    assert_eq!(st["router"]["running"], true, "{st}");
    assert!(
        !st["router"]["shards"].as_array().unwrap().is_empty(),
        "{st}"
    );
    assert_eq!(st["config"]["host_ip"], "192.168.1.1", "{st}");
    assert_eq!(st["config"]["registry"], registry.as_str(), "{st}");
    let text = succeed(d.freeflow(&["status", "--dir", d.dir()]));
    assert!(text.stdout.contains("router:     running"), "{text}");
    assert!(text.stdout.contains("shard 0"), "{text}");

    // Registration reaches the running router without a restart.
    let netns = web.netns_path.to_str().unwrap();
    let mut add = container_add(d.dir(), "web", netns, "10.32.0.5");
    add.args(["--tenant", "t1"]);
    let add = succeed(add);
    assert!(add.stdout.contains("the router serves it now"), "{add}");
    let st = wait_for(Duration::from_secs(2), "the router to register web", || {
        let (_, st) = status_json(&d);
        (st["router"]["registered"] == 1).then_some(st)
    });
    assert_eq!(st["containers"][0]["name"], "web", "{st}");
    assert_eq!(st["daemon"]["restarts"], 0, "{st}");
    let ls = container_ls_json(&d);
    assert_eq!(ls["containers"][0]["this_host"], true, "{ls}");
    assert_eq!(ls["containers"][0]["tenant"], "t1", "{ls}");

    // kill -9 of the router: a new one is ready within about a second.
    let old_pid = st["router"]["pid"].as_i64().unwrap() as i32;
    let killed = Instant::now();
    os::send_signal(old_pid, libc::SIGKILL).unwrap();
    let new_pid = wait_for(Duration::from_secs(5), "a new router", || {
        router_status(&d)
            .and_then(|r| r["pid"].as_i64())
            .map(|p| p as i32)
            .filter(|&p| p != old_pid)
    });
    let ready_after = killed.elapsed();
    wait_for(Duration::from_secs(5), "the new router's table", || {
        (registered(&d) == Some(1)).then_some(())
    });
    let table_after = killed.elapsed();
    println!(
        "router restart after kill -9: new router (pid {new_pid}) answering after {ready_after:?}, \
         with its container table after {table_after:?}"
    );
    assert!(
        ready_after < Duration::from_secs(2),
        "restart took {ready_after:?}"
    );
    let st = wait_for(Duration::from_secs(2), "status to show the restart", || {
        let (code, st) = status_json(&d);
        (code == Some(0) && st["daemon"]["restarts"] == 1 && st["router"]["pid"] == new_pid)
            .then_some(st)
    });
    assert!(
        st["daemon"]["last_exit"]
            .as_str()
            .unwrap()
            .contains("SIGKILL"),
        "{st}"
    );
    assert_eq!(st["router"]["registered"], 1, "{st}");

    // Unregistration is picked up too.
    succeed(freeflow(&["container", "rm", "web", "--dir", d.dir()]));
    wait_for(Duration::from_secs(2), "the router to drop web", || {
        (registered(&d) == Some(0)).then_some(())
    });

    // down stops both and leaves no sockets.
    let down = succeed(freeflow(&["down", "--dir", d.dir()]));
    assert!(down.stdout.contains("stopped the daemon"), "{down}");
    wait_for(Duration::from_secs(2), "all processes to exit", || {
        processes_naming(&d.dir).is_empty().then_some(())
    });
    assert!(!d.path("router.sock").exists(), "router.sock left behind");
    for gone in ["router.ctl", "freeflow.pid", "daemon-status.json"] {
        assert!(!d.state(gone).exists(), "{gone} left behind");
    }
    let r = ran(freeflow(&["status", "--dir", d.dir()]));
    assert_eq!(r.code, Some(1), "{r}");
    drop(d);
    cluster.teardown().expect("teardown");
}

#[test]
fn two_hosts_share_one_registry() {
    preflight();
    let mut cluster = cluster(2);
    let a = add_container(&mut cluster, 0, "a", "10.32.0.11");
    let b = add_container(&mut cluster, 1, "b", "10.32.1.12");
    let shared = tempfile::tempdir().unwrap();
    let registry = format!("file:{}/registry.json", shared.path().display());
    let hosts = [0, 1].map(|h| Daemons::in_netns(&cluster.host(h).unwrap().netns));
    for (i, d) in hosts.iter().enumerate() {
        let netns = cluster.host(i).unwrap().netns.clone();
        succeed(up_in(&netns, d.dir(), &registry));
    }
    for (d, c) in hosts.iter().zip([&a, &b]) {
        succeed(container_add(
            d.dir(),
            &c.name,
            c.netns_path.to_str().unwrap(),
            &c.ip.to_string(),
        ));
    }
    for (i, d) in hosts.iter().enumerate() {
        wait_for(
            Duration::from_secs(2),
            "each router to have its one container",
            || (registered(d) == Some(1)).then_some(()),
        );
        let ls = container_ls_json(d);
        let containers = ls["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 2, "{ls}");
        for c in containers {
            let mine = c["host_ip"] == format!("192.168.1.{}", i + 1);
            assert_eq!(c["this_host"], mine, "{ls}");
        }
        let text = succeed(freeflow(&["container", "ls", "--dir", d.dir()]));
        assert!(text.stdout.contains("(this host)"), "{text}");
    }
    // One host address cannot be served by two daemons.
    let third = Daemons::new();
    fail_with(
        up_in(&cluster.host(0).unwrap().netns, third.dir(), &registry),
        "already served by the daemon of",
    );
    drop(third);
    drop(hosts);
    cluster.teardown().expect("teardown");
}

#[test]
fn up_twice_refuses_and_down_is_idempotent() {
    preflight();
    let d = Daemons::new();
    let up = up_local(&d);
    let pid_before = std::fs::read_to_string(d.state("freeflow.pid")).unwrap();
    fail_with(up_at(d.dir(), "127.0.0.1", &[]), "already running");
    fail_with(
        freeflow(&["up", "--dir", d.dir(), "--foreground"]),
        "already running",
    );
    // The first daemon is untouched.
    assert_eq!(
        std::fs::read_to_string(d.state("freeflow.pid")).unwrap(),
        pid_before,
        "{up}"
    );
    let (code, st) = status_json(&d);
    assert_eq!(code, Some(0), "{st}");
    succeed(freeflow(&["down", "--dir", d.dir()]));
    let again = succeed(freeflow(&["down", "--dir", d.dir()]));
    assert!(again.stdout.contains("nothing to stop"), "{again}");
    // `up` with no options reuses the settings of the last one.
    let up = succeed(freeflow(&["up", "--dir", d.dir()]));
    assert!(up.stdout.contains("127.0.0.1"), "{up}");
    succeed(freeflow(&["down", "--dir", d.dir()]));
}

#[test]
fn container_add_rejects_bad_input_with_clear_errors() {
    preflight();
    let mut cluster = cluster(1);
    let c1 = add_container(&mut cluster, 0, "c1", "10.32.0.21");
    let c2 = add_container(&mut cluster, 0, "c2", "10.32.0.22");
    let d = Daemons::new();
    let ns1 = c1.netns_path.to_str().unwrap();
    let ns2 = c2.netns_path.to_str().unwrap();
    let add = |name: &str, netns: &str, ip: &str| container_add(d.dir(), name, netns, ip);
    fail_with(add("c1", ns1, "10.32.0.21"), "freeflow up --dir");
    up_local(&d);
    succeed(add("c1", ns1, "10.32.0.21"));
    let registry = d.state("registry.json");
    let before = std::fs::read(&registry).unwrap();

    fail_with(
        add("c2", ns2, "10.99.0.22"),
        "outside this host's overlay prefix 10.32.0.0/12",
    );
    fail_with(add("c1", ns2, "10.32.0.22"), "\"c1\" is already registered");
    fail_with(
        add("c2", ns2, "10.32.0.21"),
        "10.32.0.21 of container \"c2\" is already used by container \"c1\"",
    );
    fail_with(
        add("c2", ns1, "10.32.0.22"),
        "already registered to container",
    );
    let missing = format!("/run/netns/ff-missing-{}", topology::fresh_tag("x"));
    fail_with(add("c2", &missing, "10.32.0.22"), "does not exist");
    fail_with(
        add("c2", "/proc/self/ns/net", "10.32.0.22"),
        "host's own network namespace",
    );
    fail_with(
        add("c2", "/proc/self/ns/mnt", "10.32.0.22"),
        "not a network namespace",
    );
    fail_with(
        add("c2", "/etc/hostname", "10.32.0.22"),
        "not a network namespace",
    );
    fail_with(add("bad/name", ns2, "10.32.0.22"), "invalid container name");
    fail_with(
        freeflow(&["container", "rm", "nobody", "--dir", d.dir()]),
        "no container named \"nobody\"",
    );
    assert_eq!(
        std::fs::read(&registry).unwrap(),
        before,
        "failed commands changed the registry"
    );

    succeed(add("c2", ns2, "10.32.0.22"));
    wait_for(Duration::from_secs(2), "both containers registered", || {
        (registered(&d) == Some(2)).then_some(())
    });
    succeed(freeflow(&["container", "rm", "c1", "--dir", d.dir()]));
    let ls = succeed(freeflow(&["container", "ls", "--dir", d.dir()]));
    assert!(
        ls.stdout.contains("c2") && !ls.stdout.contains("c1 "),
        "{ls}"
    );
    drop(d);
    cluster.teardown().expect("teardown");
}

#[test]
fn status_and_commands_without_a_daemon() {
    preflight();
    let d = Daemons::new();
    let r = fail_with(
        freeflow(&["status", "--dir", d.dir()]),
        "no daemon is running",
    );
    assert!(r.stdout.contains("daemon:     not running"), "{r}");
    let (code, st) = status_json(&d);
    assert_eq!(code, Some(1));
    assert_eq!(st["daemon"]["running"], false, "{st}");
    assert_eq!(st["router"]["running"], false, "{st}");
    let down = succeed(freeflow(&["down", "--dir", d.dir()]));
    assert!(down.stdout.contains("nothing to stop"), "{down}");
    fail_with(
        freeflow(&["container", "ls", "--dir", d.dir()]),
        "has no config.json",
    );
    fail_with(
        freeflow(&["up", "--dir", d.dir(), "--host-ip", "127.0.0.1"]),
        "--vnet-prefix",
    );
    fail_with(
        freeflow(&["up", "--dir", d.dir(), "--vnet-prefix", VNET]),
        "--host-ip",
    );
    let mut bad_env = freeflow(&["up", "--dir", d.dir(), "--vnet-prefix", VNET]);
    bad_env.env("HOST_IP_PREFIX", "203.0.113.0/24");
    fail_with(
        bad_env,
        "no interface of this network namespace has an address",
    );
    let usage = ran(freeflow(&["container", "add", "x"]));
    assert_eq!(usage.code, Some(2), "{usage}");
}

#[test]
fn corrupt_registry_is_reported_and_left_alone() {
    preflight();
    let mut cluster = cluster(1);
    let c = add_container(&mut cluster, 0, "c", "10.32.0.31");
    let d = Daemons::new();
    up_local(&d);
    let registry = d.state("registry.json");
    let garbage =
        b"{\"format\": \"freeflow-registry\", \"version\": 1, \"generation\": \n".to_vec();
    std::fs::write(&registry, &garbage).unwrap();
    let r = fail_with(
        container_add(d.dir(), "c", c.netns_path.to_str().unwrap(), "10.32.0.31"),
        registry.to_str().unwrap(),
    );
    assert!(r.stderr.contains("corrupt"), "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r}");
    assert_eq!(std::fs::read(&registry).unwrap(), garbage, "file touched");
    // The daemon keeps running with its last table and reports the problem.
    let st = wait_for(Duration::from_secs(2), "the daemon to notice", || {
        let (code, st) = status_json(&d);
        (code == Some(0)
            && st["daemon"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("corrupt")))
        .then_some(st)
    });
    assert_eq!(st["router"]["running"], true, "{st}");
    // `status` says the registry is corrupt, where it is and what the parser found; not that
    // this host has no containers.
    let registry_str = registry.to_str().unwrap();
    assert_eq!(st["registry"]["readable"], false, "{st}");
    assert_eq!(st["registry"]["problem"], "corrupt", "{st}");
    assert_eq!(st["registry"]["path"], registry_str, "{st}");
    assert!(
        st["registry"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("line 2")),
        "{st}"
    );
    assert!(st["registry_error"].as_str().is_some(), "key kept: {st}");
    let text = succeed(d.freeflow(&["status", "--dir", d.dir()]));
    let line = text
        .stdout
        .lines()
        .find(|l| l.starts_with("containers of this host"))
        .unwrap_or_else(|| panic!("no containers line: {text}"));
    assert!(
        line.contains("unknown: the registry is corrupt")
            && line.contains(registry_str)
            && line.contains("line 2"),
        "{text}"
    );
    fail_with(
        freeflow(&["container", "ls", "--dir", d.dir()]),
        "is corrupt",
    );
    // A fresh `up` against the corrupt file fails up front, naming it.
    let other = Daemons::new();
    fail_with(
        up_at(
            other.dir(),
            "127.0.0.2",
            &["--registry", registry.to_str().unwrap()],
        ),
        registry.to_str().unwrap(),
    );
    assert_eq!(std::fs::read(&registry).unwrap(), garbage, "file touched");
    drop(other);
    drop(d);
    cluster.teardown().expect("teardown");
}

#[test]
fn foreground_daemon_stops_on_sigterm() {
    preflight();
    let d = Daemons::new();
    let mut cmd = up_at(d.dir(), "127.0.0.1", &["--foreground"]);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Kill the child if anything below panics.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = os::send_signal(self.0, libc::SIGKILL);
        }
    }
    let _guard = KillOnDrop(pid);
    let st = wait_for(Duration::from_secs(10), "the foreground daemon", || {
        let (code, st) = status_json(&d);
        (code == Some(0)).then_some(st)
    });
    assert_eq!(st["daemon"]["pid"], pid, "{st}");
    let router_pid = st["router"]["pid"].as_i64().unwrap() as i32;
    os::send_signal(pid, libc::SIGTERM).unwrap();
    let status = wait_for(Duration::from_secs(10), "the daemon to exit", || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
    assert!(!os::process_exists(router_pid), "router left running");
    assert!(!d.path("router.sock").exists());
    assert!(!d.state("freeflow.pid").exists());
}

#[test]
fn router_start_failure_is_reported_by_up() {
    preflight();
    let d = Daemons::new();
    let started = Instant::now();
    let r = fail_with(
        up_at(d.dir(), "127.0.0.1", &["--cores", "4000"]),
        "core 4000 is not available",
    );
    assert!(started.elapsed() < Duration::from_secs(12), "{r}");
    assert!(processes_naming(&d.dir).is_empty(), "processes left: {r}");
    assert!(
        !d.state("config.json").exists(),
        "settings of a failed up were kept"
    );
    let (code, st) = status_json(&d);
    assert_eq!(code, Some(1));
    assert_eq!(st["daemon"]["running"], false, "{st}");
}

#[test]
fn rdma_device_reaches_the_router_and_bad_names_are_refused() {
    preflight();
    let d = Daemons::new();
    // The workspace's router is the default build: it refuses the device it is handed, and
    // `up` reports the router's reason (the option did reach it).
    let r = fail_with(
        up_at(d.dir(), "127.0.0.1", &["--rdma-device", "rxe0"]),
        "built without the rdma-hw feature",
    );
    assert!(processes_naming(&d.dir).is_empty(), "processes left: {r}");
    assert!(
        !d.state("config.json").exists(),
        "settings of a failed up were kept"
    );
    // Not a device name: refused before anything starts.
    for bad in ["../rxe0", "rxe/0", "rxe 0", ""] {
        fail_with(
            up_at(d.dir(), "127.0.0.1", &["--rdma-device", bad]),
            "--rdma-device",
        );
    }
}

#[test]
fn crashing_router_is_restarted_with_backoff() {
    preflight();
    let d = Daemons::new();
    // A router that fails at start while the flag file exists.
    let flag = d.path("fail-router");
    let wrapper = d.path("router-wrapper.sh");
    let router = Path::new(FREEFLOW).with_file_name("freeflow-router");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ -e '{}' ] && {{ echo 'freeflow-router: simulated failure' >&2; exit 3; }}\nexec '{}' \"$@\"\n",
            flag.display(),
            router.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut up = up_at(d.dir(), "127.0.0.1", &[]);
    up.env("FREEFLOW_ROUTER", &wrapper);
    succeed(up);
    let (_, st) = status_json(&d);
    let pid = st["router"]["pid"].as_i64().unwrap() as i32;
    std::fs::write(&flag, b"").unwrap();
    os::send_signal(pid, libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (code, st) = status_json(&d);
    assert_eq!(code, Some(1), "router down: {st}");
    assert_eq!(st["router"]["running"], false, "{st}");
    let failures = st["daemon"]["start_failures"].as_u64().unwrap();
    // 0, 50, 100, 200, 400, 800 ms: about six tries in 1.5 s, not hundreds.
    assert!((3..=8).contains(&failures), "{failures} failures: {st}");
    assert!(
        st["daemon"]["last_exit"]
            .as_str()
            .unwrap()
            .contains("simulated failure"),
        "{st}"
    );
    std::fs::remove_file(&flag).unwrap();
    // The router answers status as soon as it is up; the daemon records the restart in its
    // own status file a moment later: wait for both.
    let st = wait_for(Duration::from_secs(6), "the router to come back", || {
        let (code, st) = status_json(&d);
        let restarts = st["daemon"]["restarts"].as_u64();
        let failures = st["daemon"]["start_failures"].as_u64();
        let recorded = matches!((restarts, failures), (Some(r), Some(f)) if r == f + 1);
        (code == Some(0) && recorded).then_some(st)
    });
    // Every restart but the last failed; one more may have failed after the sample above.
    let restarts = st["daemon"]["restarts"].as_u64().unwrap();
    let final_failures = st["daemon"]["start_failures"].as_u64().unwrap();
    assert_eq!(restarts, final_failures + 1, "{st}");
    assert!(final_failures >= failures, "{st}");
    succeed(freeflow(&["down", "--dir", d.dir()]));
}

/// DIR holds only what containers need, the shims read-only; the control plane is in the state
/// directory, and one chosen with `up --state-dir` is found by later commands from `--dir`.
#[test]
fn control_files_live_in_a_state_directory_that_later_commands_find() {
    use std::os::unix::fs::PermissionsExt;
    preflight();
    let d = Daemons::new();
    let chosen = tempfile::tempdir().unwrap();
    let state = chosen.path().join("state");
    let up = succeed(up_at(
        d.dir(),
        "127.0.0.1",
        &["--state-dir", state.to_str().unwrap()],
    ));
    let mut in_dir: Vec<String> = std::fs::read_dir(&d.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_dir.sort();
    assert_eq!(in_dir, ["libfsocket.so", "router.sock", "verbs"], "{up}");
    for shim in [
        "libfsocket.so",
        "verbs/libibverbs.so.1",
        "verbs/librdmacm.so.1",
    ] {
        let mode = std::fs::metadata(d.path(shim))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444, "{shim}");
    }
    for file in ["config.json", "registry.json", "router.ctl", "freeflow.pid"] {
        assert!(
            state.join(file).exists(),
            "{file} not in {}",
            state.display()
        );
    }
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    // Recorded at the derived place, so --dir alone finds it.
    assert_eq!(
        std::fs::read_link(paths::default_state_dir(&d.dir)).ok(),
        Some(state.clone())
    );
    let (code, st) = status_json(&d);
    assert_eq!(code, Some(0), "{st}");
    let down = succeed(freeflow(&["down", "--dir", d.dir()]));
    assert!(down.stdout.contains("stopped the daemon"), "{down}");
}
