//! The seed's Docker experience, for real (issue 15): two simulated hosts, each a network
//! namespace with its own dockerd (own data root, exec root, pid file and socket), joined by a
//! link and a VXLAN overlay that both hosts' Docker bridge networks share (the way Weave and
//! Flannel give containers one overlay subnet). Images are built offline with
//! scripts/docker-image.sh. Freeflow runs as the seed's router container on each host; iperf3
//! runs unmodified in application containers started with the seed's flags, registered by the
//! daemon's Docker watcher (no `freeflow container add`), and is accelerated: the iperf3 data
//! does not cross the VXLAN device. A container that mounts the directory writable is refused. A container that stops is unregistered; a daemon restarted
//! while a container stopped reconciles the registry with what runs.
//!
//! Needs root, a built workspace and Debian's docker.io (scripts/test.sh installs it). If
//! dockerd cannot start here, the test fails with dockerd's own words.

mod common;

use common::{describe, poll, require_programs, require_root, target_dir};
use freeflow_testbed::{self as topology, Cluster, ClusterSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The docker CLI of Debian's docker.io (another docker on PATH may speak a newer API).
const DOCKER_CLI: &str = "/usr/bin/docker";
/// Every docker CLI call is bounded by `timeout` with this many seconds.
const CLI_TIMEOUT_S: &str = "120";
/// The Docker network of each host that the overlay joins (the seed's `--net=weave`).
const NETWORK: &str = "ffnet";
/// Its Linux bridge, in the host's namespace; the host's VXLAN device becomes its port.
const NETWORK_BRIDGE: &str = "ffbr";

/// The test's work directory, removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One simulated host's Docker engine, stopped (with its containers) on drop.
struct Engine {
    host: usize,
    /// `<work>/h<host>`: data root, exec root, socket, pid file, log, and Freeflow's DIR.
    root: PathBuf,
    dockerd: Child,
}

impl Engine {
    fn socket(&self) -> PathBuf {
        self.root.join("docker.sock")
    }

    /// Freeflow's runtime directory on this host (what containers mount at /freeflow).
    fn freeflow_dir(&self) -> PathBuf {
        self.root.join("freeflow")
    }

    /// `docker -H unix://SOCKET args...`, bounded.
    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args([CLI_TIMEOUT_S, DOCKER_CLI, "-H"])
            .arg(format!("unix://{}", self.socket().display()))
            .args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli(args).output().expect("run the docker CLI")
    }

    /// Runs `args` and returns its stdout, trimmed; fails the test with the output otherwise.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "host {}: docker {}: {}",
            self.host,
            args.join(" "),
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The registry as the router container of this host lists it (`container ls --json`).
    fn registered(&self) -> serde_json::Value {
        let out = self.ok(&["exec", "freeflow", "freeflow", "container", "ls", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("container ls --json: {e}: {out}"))
    }

    /// The registry record of the container `id` (by the watcher's name), if any.
    fn record_of(&self, id: &str) -> Option<serde_json::Value> {
        let prefix = format!("docker-{}", &id[..12]);
        self.registered()["containers"]
            .as_array()?
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(&prefix)))
            .cloned()
    }

    fn router_logs(&self) -> String {
        let out = self.run(&["logs", "freeflow"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = self.run(&["ps", "-aq"]);
        let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = self.run(&args);
        }
        // dockerd stops its containerd and unmounts its layers on SIGTERM.
        let _ = Command::new("kill")
            .args(["-TERM", &self.dockerd.id().to_string()])
            .status();
        let stopped = poll(Duration::from_secs(30), Duration::from_millis(100), || {
            self.dockerd.try_wait().ok().flatten()
        });
        if stopped.is_none() {
            let _ = self.dockerd.kill();
            let _ = self.dockerd.wait();
        }
        let containerd_pid = self.root.join("exec/containerd/containerd.pid");
        if let Ok(pid) = std::fs::read_to_string(containerd_pid) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        // dockerd leaves its bind mount of the host's namespace (exec/netns/default), which
        // would keep the namespace alive; anything a killed dockerd left goes the same way.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| Path::new(m).starts_with(&self.root))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}

/// Starts dockerd in host `host`'s namespace (nsenter --net, not `ip netns exec`, which
/// remounts /sys and hides the cgroup mounts) and waits until it answers; fails with its log.
fn start_engine(cluster: &Cluster, host: usize, work: &Path) -> Engine {
    let root = work.join(format!("h{host}"));
    std::fs::create_dir_all(root.join("freeflow")).unwrap();
    let log = std::fs::File::create(root.join("dockerd.log")).unwrap();
    let netns = format!("/var/run/netns/{}", cluster.hosts()[host].netns);
    let dockerd = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("dockerd")
        .arg("--data-root")
        .arg(root.join("data"))
        .arg("--exec-root")
        .arg(root.join("exec"))
        .arg("--pidfile")
        .arg(root.join("dockerd.pid"))
        .arg("-H")
        .arg(format!("unix://{}", root.join("docker.sock").display()))
        // Its own containerd namespaces, in case a system containerd is shared.
        .args(["--containerd-namespace", &format!("ff-h{host}")])
        .args([
            "--containerd-plugins-namespace",
            &format!("ff-h{host}-plugins"),
        ])
        // The simulated hosts need no NAT, and the machine's iptables stay untouched.
        .args(["--iptables=false", "--bridge=none"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start dockerd (apt-get install docker.io; scripts/test.sh does)");
    let mut engine = Engine {
        host,
        root,
        dockerd,
    };
    let answered = poll(Duration::from_secs(60), Duration::from_millis(250), || {
        if let Ok(Some(status)) = engine.dockerd.try_wait() {
            panic!(
                "dockerd of host {host} exited ({status}) before answering:\n{}",
                engine.log_tail()
            );
        }
        engine
            .run(&["version", "--format", "{{.Server.Version}}"])
            .status
            .success()
            .then_some(())
    });
    assert!(
        answered.is_some(),
        "dockerd of host {host} did not answer within 60 s:\n{}",
        engine.log_tail()
    );
    engine
}

/// scripts/docker-image.sh against `engine`.
fn build_images(engine: &Engine) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/docker-image.sh");
    for args in [
        vec![
            "freeflow".to_owned(),
            "--bin-dir".to_owned(),
            target_dir().display().to_string(),
        ],
        // `sleep` keeps an application container up until iperf3 is run in it (the seed's
        // step 2 runs a shell and iperf3 from it).
        ["programs", "--tag", "ff-iperf3", "iperf3", "sleep"]
            .map(String::from)
            .to_vec(),
    ] {
        let out = Command::new("timeout")
            .arg("180")
            .arg(&script)
            .args(&args)
            .env("DOCKER", DOCKER_CLI)
            .env(
                "DOCKER_HOST",
                format!("unix://{}", engine.socket().display()),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "host {}: scripts/docker-image.sh {}: {}",
            engine.host,
            args.join(" "),
            describe(&out)
        );
    }
}

/// The host's Docker network on the overlay subnet, each host allocating from its own /24,
/// with the host's VXLAN device moved onto its bridge.
fn create_overlay_network(cluster: &Cluster, engine: &Engine) {
    let h = engine.host + 1;
    engine.ok(&[
        "network",
        "create",
        "--driver",
        "bridge",
        "--subnet",
        common::VNET,
        "--ip-range",
        &format!("10.32.{h}.0/24"),
        "--gateway",
        &format!("10.32.{h}.1"),
        "-o",
        &format!("com.docker.network.bridge.name={NETWORK_BRIDGE}"),
        "-o",
        "com.docker.network.driver.mtu=1450",
        NETWORK,
    ]);
    let out = cluster
        .command_in(&cluster.hosts()[engine.host].netns, "ip")
        .args(["link", "set", "vx0", "master", NETWORK_BRIDGE])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vx0 onto {NETWORK_BRIDGE}: {}",
        describe(&out)
    );
}

/// The seed's router container: `docker run -d --privileged --net=host -v DIR:/freeflow -e
/// HOST_IP_PREFIX=... freeflow:tcp`, plus what lets the daemon register containers by itself
/// (the engine's socket, `--pid=host` for their namespaces) and share one registry with the
/// other host. Where `--privileged` cannot start a container (a machine whose bounding set
/// lacks a capability Docker grants to privileged containers), every capability it has is
/// given instead, with seccomp and AppArmor off; returns what was used.
fn start_router(engine: &Engine, shared: &Path) -> &'static str {
    let volumes = [
        format!("{}:/freeflow", engine.freeflow_dir().display()),
        format!("{}:/var/run/docker.sock", engine.socket().display()),
        format!("{}:/shared", shared.display()),
    ];
    let run = |privilege: &[&str]| {
        let mut args = vec!["run", "-d", "--name", "freeflow"];
        args.extend_from_slice(privilege);
        args.extend(["--net=host", "--pid=host"]);
        for v in &volumes {
            args.extend(["-v", v]);
        }
        args.extend([
            "-e",
            "HOST_IP_PREFIX=192.168.1.0/24",
            "-e",
            "VNET_PREFIX=10.32.0.0/12",
            "-e",
            "FREEFLOW_REGISTRY=file:/shared/registry.json",
            "freeflow:tcp",
        ]);
        engine.run(&args)
    };
    let out = run(&["--privileged"]);
    if out.status.success() {
        return "--privileged";
    }
    let why = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        why.contains("apply caps"),
        "host {}: the router container did not start: {}",
        engine.host,
        describe(&out)
    );
    let _ = engine.run(&["rm", "-f", "freeflow"]);
    let own_caps = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = own_caps
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // CAP_SYS_RESOURCE (24) is the one this project's machines lack; drop whichever of
    // Docker's capabilities the bounding set does not have.
    let names = [
        (24, "SYS_RESOURCE"),
        (25, "SYS_TIME"),
        (16, "SYS_MODULE"),
        (17, "SYS_RAWIO"),
        (22, "SYS_BOOT"),
    ];
    let drops: Vec<String> = names
        .iter()
        .filter(|(bit, _)| bounding & (1 << bit) == 0)
        .map(|(_, n)| format!("--cap-drop={n}"))
        .collect();
    let mut privilege = vec![
        "--cap-add=ALL",
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
    ];
    privilege.extend(drops.iter().map(String::as_str));
    let out = run(&privilege);
    assert!(
        out.status.success(),
        "host {}: the router container did not start with --privileged ({}) nor with {}: {}",
        engine.host,
        why.trim(),
        privilege.join(" "),
        describe(&out)
    );
    eprintln!(
        "host {}: --privileged failed here ({}); the router container runs with {} instead",
        engine.host,
        why.trim(),
        privilege.join(" ")
    );
    "all capabilities the machine has"
}

/// An application container with the seed's flags running `command`; returns its id and
/// overlay address.
fn start_app(engine: &Engine, name: &str, command: &[&str]) -> (String, String) {
    let mount = format!("{}:/freeflow:ro", engine.freeflow_dir().display());
    let network = format!("--net={NETWORK}");
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        &network,
        "-v",
        &mount,
        "-e",
        "VNET_PREFIX=10.32.0.0/12",
        "-e",
        "LD_PRELOAD=/freeflow/libfsocket.so",
        "ff-iperf3",
    ];
    args.extend_from_slice(command);
    let id = engine.ok(&args);
    let ip = engine.ok(&[
        "inspect",
        "--format",
        &format!("{{{{.NetworkSettings.Networks.{NETWORK}.IPAddress}}}}"),
        &id,
    ]);
    (id, ip)
}

/// Waits (bounded) until `engine`'s router container lists `id` with address `ip`.
fn wait_registered(engine: &Engine, id: &str, ip: &str) -> serde_json::Value {
    poll(Duration::from_secs(30), Duration::from_millis(200), || {
        engine
            .record_of(id)
            .filter(|r| r["ip"].as_str() == Some(ip))
    })
    .unwrap_or_else(|| {
        panic!(
            "container {} ({ip}) was not registered within 30 s on host {}: {}\n{}",
            &id[..12],
            engine.host,
            engine.registered(),
            engine.router_logs()
        )
    })
}

fn wait_unregistered(engine: &Engine, id: &str, what: &str) {
    let gone = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        engine.record_of(id).is_none().then_some(())
    });
    assert!(
        gone.is_some(),
        "{what}: container {} still registered on host {} after 30 s: {}\n{}",
        &id[..12],
        engine.host,
        engine.registered(),
        engine.router_logs()
    );
}

#[test]
fn seed_docker_commands_register_and_accelerate_iperf3() {
    let started = Instant::now();
    require_root("Docker");
    require_programs(
        &["dockerd", "nsenter", "iperf3", "sleep", "ldd", "tar"],
        "docker.io iperf3",
    );
    assert!(
        Path::new(DOCKER_CLI).exists(),
        "{DOCKER_CLI} missing: apt-get install docker.io (scripts/test.sh does)"
    );
    common::require_built(&["freeflow", "freeflow-router", "libfsocket.so"]);

    let tag = topology::fresh_tag("dk");
    let cluster = Cluster::create(ClusterSpec::new(&tag, 2)).unwrap();
    let work = std::env::temp_dir().join(format!("ff-docker-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    // Removed last, also when the test fails: the engines (declared later) are dropped first.
    let _work_dir = WorkDir(work.clone());
    let shared = work.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    // Dropped before the cluster (declared after it): containers and engines go first.
    let engines: Vec<Engine> = (0..2).map(|h| start_engine(&cluster, h, &work)).collect();
    for engine in &engines {
        build_images(engine);
        create_overlay_network(&cluster, engine);
    }
    eprintln!(
        "engines up, images built: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    for engine in &engines {
        let how = start_router(engine, &shared);
        eprintln!("host {}: router container started ({how})", engine.host);
    }
    for engine in &engines {
        let healthy = poll(Duration::from_secs(60), Duration::from_millis(500), || {
            (engine.ok(&[
                "inspect",
                "--format",
                "{{.State.Health.Status}}",
                "freeflow",
            ]) == "healthy")
                .then_some(())
        });
        assert!(
            healthy.is_some(),
            "host {}: the router container is not healthy after 60 s:\n{}",
            engine.host,
            engine.router_logs()
        );
    }

    // Step 2 of the seed on both hosts; the watcher registers them, no `container add`. The
    // server container's own command is the server: it listens at once, before the watcher
    // has seen the container start (the shim waits for the registration, a container's first
    // seconds only). The client container idles until iperf3 is run in it.
    let (server_id, server_ip) =
        start_app(&engines[1], "iperf-server", &["iperf3", "-s", "-p", "5201"]);
    let (client_id, client_ip) = start_app(&engines[0], "iperf-client", &["sleep", "600"]);
    let server = wait_registered(&engines[1], &server_id, &server_ip);
    let client = wait_registered(&engines[0], &client_id, &client_ip);
    assert_eq!(server["host_ip"], "192.168.1.2", "{server}");
    assert_eq!(client["host_ip"], "192.168.1.1", "{client}");
    assert_eq!(client["tenant"], "default", "{client}");
    let status = engines[0].ok(&["exec", "freeflow", "freeflow", "status"]);
    assert!(
        status.contains("docker:     following /var/run/docker.sock"),
        "freeflow status in the router container:\n{status}"
    );

    // The seed's writable mount is refused (it could replace the shims others load), saying so.
    let writable = format!("{}:/freeflow", engines[0].freeflow_dir().display());
    let writer = engines[0].ok(&[
        "run",
        "-d",
        "--name",
        "writer",
        &format!("--net={NETWORK}"),
        "-v",
        &writable,
        "ff-iperf3",
        "sleep",
        "600",
    ]);
    let refused = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        engines[0]
            .router_logs()
            .lines()
            .find(|l| l.contains("not registering writer") && l.contains("read-only"))
            .map(str::to_owned)
    });
    assert!(
        refused.is_some(),
        "no log line refusing the writable mount:\n{}",
        engines[0].router_logs()
    );
    assert!(
        engines[0].record_of(&writer).is_none(),
        "a writable mount was registered"
    );

    // Step 3: iperf3 between the containers, unmodified.
    let vxlan = |h: usize| {
        topology::link_stats(&cluster.hosts()[h].netns, "vx0")
            .unwrap()
            .tx_packets
    };
    let before = vxlan(0);
    let out = engines[0].run(&[
        "exec",
        "iperf-client",
        "iperf3",
        "-c",
        &server_ip,
        "-p",
        "5201",
        "-t",
        "1",
        "-J",
    ]);
    let after = vxlan(0);
    assert!(
        out.status.success(),
        "iperf3 -c in the client container: {}\nhost 0 router:\n{}\nhost 1 router:\n{}",
        describe(&out),
        engines[0].router_logs(),
        engines[1].router_logs()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    println!(
        "iperf3 between Docker containers through Freeflow: {:.1} Gbit/s, {} VXLAN packets",
        bps / 1e9,
        after - before
    );
    assert!(bps > 0.0, "{report}");
    assert_eq!(
        report["start"]["connected"][0]["remote_host"].as_str(),
        Some(server_ip.as_str()),
        "{report}"
    );
    assert!(
        after - before < 50,
        "iperf3 data went through VXLAN: {} packets (not accelerated)",
        after - before
    );
    let status = engines[0].ok(&["exec", "freeflow", "freeflow", "status", "--prometheus"]);
    let host_connects: u64 = status
        .lines()
        .filter(|l| l.starts_with("freeflow_tcp_host_connects_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum();
    assert!(
        host_connects >= 1,
        "the client's router made no connect on the host network:\n{status}"
    );

    // A container that stops is unregistered.
    engines[0].ok(&["stop", "-t", "1", "iperf-client"]);
    wait_unregistered(&engines[0], &client_id, "after docker stop");

    // A daemon restarted while a container stopped reconciles: host 1's router container
    // stops, the server container stops meanwhile, and the new daemon removes its record.
    engines[1].ok(&["stop", "-t", "10", "freeflow"]);
    engines[1].ok(&["stop", "-t", "1", "iperf-server"]);
    assert!(
        engines[0].record_of(&server_id).is_some(),
        "the server was unregistered while no daemon watched host 1"
    );
    engines[1].ok(&["start", "freeflow"]);
    wait_unregistered(&engines[1], &server_id, "after the daemon restarted");
    // The log line follows the registry's change (and `docker logs` may lag a little).
    let said = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        engines[1]
            .router_logs()
            .contains("its container no longer runs")
            .then_some(())
    });
    assert!(
        said.is_some(),
        "the reconcile did not say why it unregistered:\n{}",
        engines[1].router_logs()
    );

    drop(engines);
    drop(cluster);
    println!("docker test took {:.1} s", started.elapsed().as_secs_f64());
}
