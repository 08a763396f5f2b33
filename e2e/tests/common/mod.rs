//! Scaffolding shared by the end-to-end tests of freeflow-e2e: where the built binaries are,
//! preflight checks, a simulated cluster with Freeflow up on its hosts and registered
//! network-namespace "containers" ([`Site`], with constructors for the TCP-mode and the RDMA-mode
//! tests), programs run in a container's namespace (read line by line, held, stopped), the
//! routers' status, counters and logs, C probes built against the installed headers (from the
//! sources in tests/programs/, [`CProbe`]), the checks of ibverbs-utils' pingpong runs, bounded
//! waits. The generic checks and helpers of tests that build clusters
//! ([`require_root`], [`require_programs`], [`describe`], [`poll`], [`VNET`]) are
//! freeflow-testbed's `test_support`, re-exported here.
//!
//! The tests use the binaries and libraries of a built workspace (`cargo build --workspace`):
//! `freeflow`, `freeflow-router`, `libfsocket.so`, `libibverbs.so`, found in the target
//! directory the test executable itself was built into.
//!
//! Each file in tests/ is a crate of its own that includes this module with `mod common;` and
//! uses only part of it, so what one crate leaves unused is not dead code: hence the allow.
#![allow(dead_code)]

use freeflow_testbed::{self as topology, Cluster, ClusterSpec};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

// Not every test crate uses every helper (see the allow above).
#[allow(unused_imports)]
pub use freeflow_testbed::test_support::{describe, poll, require_programs, require_root, VNET};

/// The `freeflow` binary under test, next to this test executable's `deps/` directory; fails if
/// the workspace is not built.
pub static FREEFLOW: LazyLock<String> =
    LazyLock::new(|| built("freeflow").to_string_lossy().into_owned());

/// Where cargo put the workspace's binaries and libraries: the directory above the `deps/`
/// directory that holds this test executable (`target/<profile>/deps/<test>-<hash>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let deps = exe.parent().expect("directory of the test executable");
    let dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("target directory")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// The TCP-mode shim, `libfsocket.so`; fails if the workspace is not built.
pub fn shim() -> PathBuf {
    built("libfsocket.so")
}

/// `name` in the target directory; fails if the workspace is not built.
fn built(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// Fails unless each of `built` is in the target directory.
pub fn require_built(built: &[&str]) {
    for built in built {
        assert!(
            target_dir().join(built).exists(),
            "build the workspace first ({built} missing)"
        );
    }
}

/// The containers of the RDMA tests that run a program pair: `server` (10.32.0.2, the address
/// [`Site::verbs_server_and_client`] names) and `client` (10.32.0.3), both on host 0.
pub const SERVER_AND_CLIENT: &[(usize, &str, [u8; 4])] =
    &[(0, "server", [10, 32, 0, 2]), (0, "client", [10, 32, 0, 3])];

/// The one-host site most verbs tests use: containers server, client and other.
pub const SERVER_CLIENT_OTHER: &[(usize, &str, [u8; 4])] = &[
    (0, "server", [10, 32, 0, 2]),
    (0, "client", [10, 32, 0, 3]),
    (0, "other", [10, 32, 0, 4]),
];
/// Their tenants: server and client blue, other red.
pub const BLUE_BLUE_RED: &[(&str, &str)] =
    &[("server", "blue"), ("client", "blue"), ("other", "red")];

/// What [`Site::create`] builds.
#[derive(Default)]
pub struct SiteSpec<'a> {
    /// Prefix of the cluster's fresh tag (one per test, so that tests can run in parallel).
    pub prefix: &'a str,
    /// The work directory is `$TMPDIR/<work_prefix>-<tag>`.
    pub work_prefix: &'a str,
    pub hosts: usize,
    /// Every container: its host, name and overlay address (in a /12).
    pub containers: &'a [(usize, &'a str, [u8; 4])],
    /// The containers registered with `freeflow container add`, in order, with their tenants.
    pub registered: &'a [(&'a str, &'a str)],
    /// Environment variables of `freeflow up`.
    pub up_env: &'a [(&'a str, &'a str)],
    /// More arguments of `freeflow up` on every host (e.g. `--cores 0,1`).
    pub up_args: &'a [&'a str],
    /// How long [`Site::verbs_app`] lets a program run, in seconds (`timeout`'s 0, the
    /// default, is no bound: set it on a site that runs RDMA programs).
    pub verbs_timeout: u32,
    /// The hosts share a registry on etcd (started by the site in host 0's namespace, on
    /// 192.168.1.1:2379) instead of a file.
    pub etcd_registry: bool,
}

/// A simulated cluster with Freeflow up on every host (host h is 192.168.1.<h+1>, all share a
/// file registry in the work directory) and containers registered. Dropping it runs
/// `freeflow down` on every host, deletes the namespaces and the work directory.
pub struct Site {
    cluster: Option<Cluster>,
    /// Freeflow's runtime directory (`--dir`) of each host: `<work>/h<host>`.
    pub dirs: Vec<PathBuf>,
    /// The test's own directory: the hosts' directories, the registry, probes, logs.
    pub work: PathBuf,
    verbs_timeout: u32,
    /// The etcd holding the registry, with [`SiteSpec::etcd_registry`].
    pub etcd: Option<topology::etcd::EtcdServer>,
    /// The `--registry` every host was brought up with.
    pub registry: String,
}

impl Site {
    /// Builds the cluster and its containers, runs `freeflow up` on each host in turn, then
    /// registers the containers of `spec.registered`; fails on the first error.
    pub fn create(spec: SiteSpec<'_>) -> Site {
        let tag = topology::fresh_tag(spec.prefix);
        let mut cluster = Cluster::create(ClusterSpec::new(&tag, spec.hosts)).unwrap();
        for &(host, name, ip) in spec.containers {
            cluster
                .add_container(host, name, Ipv4Addr::from(ip), 12)
                .unwrap();
        }
        let work = std::env::temp_dir().join(format!("{}-{tag}", spec.work_prefix));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let etcd = spec.etcd_registry.then(|| {
            let netns = cluster.hosts()[0].netns.clone();
            let etcd_dir = work.join("etcd");
            std::fs::create_dir_all(&etcd_dir).unwrap();
            topology::etcd::EtcdServer::start_in_netns(
                &etcd_dir,
                &netns,
                Ipv4Addr::new(192, 168, 1, 1),
            )
        });
        let registry = match &etcd {
            Some(etcd) => etcd.url("/freeflow"),
            None => format!("file:{}", work.join("registry.json").display()),
        };
        let mut site = Site {
            cluster: Some(cluster),
            dirs: Vec::new(),
            work: work.clone(),
            verbs_timeout: spec.verbs_timeout,
            etcd,
            registry,
        };
        for h in 0..spec.hosts {
            let dir = work.join(format!("h{h}"));
            let out = site
                .in_host(h, &FREEFLOW)
                .envs(spec.up_env.iter().copied())
                .args(["up", "--dir"])
                .arg(&dir)
                .args([
                    "--host-ip",
                    &format!("192.168.1.{}", h + 1),
                    "--vnet-prefix",
                    VNET,
                    "--registry",
                    &site.registry,
                ])
                .args(spec.up_args)
                .output()
                .unwrap();
            assert_success(&out, "freeflow up");
            site.dirs.push(dir);
        }
        for &(name, tenant) in spec.registered {
            site.register(name, tenant);
        }
        if !spec.registered.is_empty() {
            site.wait_for_every_host_to_serve_the_registry();
        }
        site
    }

    /// Registers container `name` of the site with `tenant` (`freeflow container add` on its
    /// host, which returns once that host's daemon serves it; other hosts learn it later).
    pub fn register(&self, name: &str, tenant: &str) {
        let c = self.cluster().container(name).unwrap().clone();
        let out = self
            .in_host(c.host, &FREEFLOW)
            .args(["container", "add", name, "--dir"])
            .arg(&self.dirs[c.host])
            .arg("--netns")
            .arg(&c.netns_path)
            .args(["--ip", &c.ip.to_string(), "--tenant", tenant])
            .output()
            .unwrap();
        assert_success(&out, &format!("container add {name}"));
    }

    /// Waits (at most 20 s) until every host's daemon pushed the registry's current generation
    /// to its router. `container add` waits only for its own host's daemon: a program started
    /// right after it on another host could otherwise meet a router that does not know the
    /// new container yet (`ibv_modify_qp` to RTR then fails as unreachable).
    fn wait_for_every_host_to_serve_the_registry(&self) {
        let out = self
            .in_host(0, &FREEFLOW)
            .args(["container", "ls", "--json", "--dir"])
            .arg(&self.dirs[0])
            .output()
            .unwrap();
        assert_success(&out, "container ls --json");
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let generation = listing["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("no generation in `container ls --json`: {listing}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        for host in 0..self.dirs.len() {
            loop {
                let served = self.router_status(host)["daemon"]["registry_generation"].as_u64();
                if served.is_some_and(|g| g >= generation) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "host {host}'s daemon still serves registry generation {served:?}, not \
                     {generation}, 20 s after the last `container add`"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// [`Site::create`] for the TCP-mode tests: fails first unless the test runs as root and the
    /// router and the shim are built. A test that connects to a listener of another host waits
    /// until the client's router knows it ([`Site::wait_listener_known`]).
    pub fn create_tcp(spec: SiteSpec<'_>) -> Site {
        require_root("TCP-mode");
        require_built(&["freeflow-router"]);
        shim();
        Site::create(spec)
    }

    /// Waits (20 s at most) until host `host`'s router knows the accelerated listener on overlay
    /// `ip`:`port` of another host (its router sends its table right after a listen): a connect
    /// from `host` is accelerated from then on, rather than sent to the overlay.
    pub fn wait_listener_known(&self, host: usize, ip: &str, port: u16) {
        let wanted = format!("{ip}:{port}");
        let known = poll(Duration::from_secs(20), Duration::from_millis(10), || {
            let status = self.router_status(host);
            let remote = status["router"]["tcp_remote_listeners"].as_array()?;
            remote
                .iter()
                .any(|l| l.as_str() == Some(&wanted))
                .then_some(())
        });
        assert!(
            known.is_some(),
            "host {host}'s router does not know {wanted} after 20 s: {}\n--- router logs\n{}",
            self.router_status(host)["router"]["tcp_remote_listeners"],
            self.router_log()
        );
    }

    /// [`Site::create`] for the RDMA-mode tests: fails first unless the test runs as root and
    /// the router and the verbs library are built.
    pub fn create_verbs(spec: SiteSpec<'_>) -> Site {
        require_root("RDMA-mode");
        require_built(&["freeflow-router", "libibverbs.so"]);
        Site::create(spec)
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().unwrap()
    }

    /// `program` in host `host`'s network namespace.
    pub fn in_host(&self, host: usize, program: &str) -> Command {
        self.cluster()
            .command_in(&self.cluster().hosts()[host].netns, program)
    }

    /// `env FREEFLOW_DIR=DIR VNET_PREFIX=VNET [LD_PRELOAD=libfsocket.so]` in a container, the
    /// program and its arguments still to be added. `env` and `ip netns exec` both exec, so the
    /// child's pid is the program's own: killing the child kills the program.
    pub fn shim_env(&self, container: &str, preload: bool) -> Command {
        let c = self.cluster().container(container).unwrap();
        let mut cmd = topology::command_in(&c.netns, "env");
        cmd.arg(format!("FREEFLOW_DIR={}", self.dirs[c.host].display()))
            .arg(format!("VNET_PREFIX={VNET}"));
        if preload {
            cmd.arg(format!("LD_PRELOAD={}", shim().display()));
        }
        cmd
    }

    /// `program` in a container the way RDMA programs run there:
    /// `FREEFLOW_DIR=DIR LD_LIBRARY_PATH=DIR/verbs [env] program`, stdin closed, killed by
    /// `timeout` after the site's `verbs_timeout`.
    pub fn verbs_app(
        &self,
        container: &str,
        program: impl AsRef<OsStr>,
        env: &[(&str, &str)],
    ) -> Command {
        let c = self.cluster().container(container).unwrap();
        let dir = &self.dirs[c.host];
        let mut cmd = topology::command_in(&c.netns, "env");
        cmd.arg(format!("FREEFLOW_DIR={}", dir.display()))
            .arg(format!("LD_LIBRARY_PATH={}", dir.join("verbs").display()));
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.args(["timeout", "-s", "KILL", &self.verbs_timeout.to_string()])
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `program ARGS` as a server in container `server` and, once it listens on TCP
    /// `port`, as a client (`program ARGS 10.32.0.2`, the server's overlay address) in
    /// container `client`; returns both outputs.
    pub fn verbs_server_and_client(
        &self,
        program: &Path,
        port: u16,
        args: &[&str],
    ) -> (Output, Output) {
        let mut server = self
            .verbs_app("server", program, &[])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.wait_listening("server", port, Some(&mut server));
        let client = self
            .verbs_app("client", program, &[])
            .args(args)
            .arg("10.32.0.2")
            .output()
            .unwrap();
        let server = server.wait_with_output().unwrap();
        (server, client)
    }

    /// Runs perftest's `tool` as server in `server` and client in `client` (`-d ffv0 EXTRA -p
    /// PORT -s SIZE -n ITERS`); checks that both exit 0 and that the client prints a result
    /// row for `size`-byte messages and `iters` iterations whose other fields are numbers;
    /// returns that row's fields. The numbers are reported, not judged.
    pub fn perftest_row(
        &self,
        tool: &str,
        extra: &[&str],
        port: u16,
        size: u64,
        iters: u64,
    ) -> Vec<String> {
        let (port_arg, size_arg, iters_arg) =
            (port.to_string(), size.to_string(), iters.to_string());
        let args: Vec<&str> = ["-d", "ffv0"]
            .into_iter()
            .chain(extra.iter().copied())
            .chain(["-p", &port_arg, "-s", &size_arg, "-n", &iters_arg])
            .collect();
        let what = format!("{tool} {}", extra.join(" "));
        let (server, client) = self.verbs_server_and_client(Path::new(tool), port, &args);
        for (who, out) in [("server", &server), ("client", &client)] {
            assert!(
                out.status.success(),
                "{what} {who}: {}\n--- router log\n{}",
                describe(out),
                self.router_log()
            );
        }
        let text = String::from_utf8_lossy(&client.stdout);
        let row: Option<Vec<String>> = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("#bytes"))
            .nth(1)
            .map(|l| l.split_whitespace().map(str::to_owned).collect());
        assert!(
            row.as_ref().is_some_and(|r| r.len() >= 4
                && r[0] == size_arg
                && r[1] == iters_arg
                && r[2..].iter().all(|v| v.parse::<f64>().is_ok())),
            "{what}: no result row\n{}",
            describe(&client)
        );
        eprintln!(
            "{what} client:\n    {}",
            text.trim_end().replace('\n', "\n    ")
        );
        row.unwrap_or_default()
    }

    /// Runs `program ARGS` in `container` with [`Site::verbs_app`] (no extra environment) to
    /// completion.
    pub fn run_verbs_app(
        &self,
        container: &str,
        program: impl AsRef<OsStr>,
        args: &[&str],
    ) -> Output {
        self.verbs_app(container, program, &[])
            .args(args)
            .output()
            .unwrap()
    }

    /// [`Site::verbs_server_and_client`] for the pingpong programs of ibverbs-utils:
    /// `program -p PORT ARGS`.
    pub fn pingpong(&self, program: &str, port: u16, args: &[&str]) -> (Output, Output) {
        let port_arg = port.to_string();
        let args: Vec<&str> = ["-p", &port_arg]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        self.verbs_server_and_client(Path::new(program), port, &args)
    }

    /// Runs `probe MODE` in `container` under `strace -qq -o <work>/strace.log`; returns the
    /// probe's output and the strace log.
    pub fn verbs_app_under_strace(
        &self,
        container: &str,
        probe: &Path,
        mode: &str,
    ) -> (Output, String) {
        let log = self.work.join("strace.log");
        let out = self
            .verbs_app(container, Path::new("strace"), &[])
            .args(["-qq", "-o"])
            .arg(&log)
            .arg(probe)
            .arg(mode)
            .output()
            .unwrap();
        let log = std::fs::read_to_string(&log).unwrap();
        (out, log)
    }

    /// As [`Site::verbs_app_under_strace`], pinned to `core` (`taskset`): where a poll loop
    /// runs decides whether it may yield (it does on the router's core only).
    pub fn verbs_app_under_strace_on_core(
        &self,
        container: &str,
        probe: &Path,
        mode: &str,
        core: usize,
    ) -> (Output, String) {
        let log = self.work.join(format!("strace-core{core}.log"));
        let out = self
            .verbs_app(container, "taskset", &[])
            .args(["-c", &core.to_string(), "strace", "-qq", "-o"])
            .arg(&log)
            .arg(probe)
            .arg(mode)
            .output()
            .unwrap();
        let log = std::fs::read_to_string(&log).unwrap();
        (out, log)
    }

    /// The core of host 0's router shard, from its log ("... shard(s) on cores [N]"), and a
    /// core it does not use, if this machine has one.
    pub fn router_core_and_another(&self) -> (usize, Option<usize>) {
        let log = self.router_log();
        let cores = log
            .split("shard(s) on cores [")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .unwrap_or_else(|| panic!("no shard cores in the router log:\n{log}"));
        let router: usize = cores.split(',').next().unwrap().trim().parse().unwrap();
        assert!(!cores.contains(','), "one shard expected: [{cores}]");
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        (router, (0..count).find(|&c| c != router))
    }

    /// Starts `probe hold` in `container` and reads its first line (what it holds).
    pub fn hold(&self, container: &str, probe: &Path) -> Holder {
        let (child, stdout, first_line) = spawn_reading_first_line(
            self.verbs_app(container, probe, &[])
                .arg("hold")
                .stdin(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        Holder {
            child,
            stdout,
            first_line,
        }
    }

    /// Waits (20 s at most) until something listens on TCP `port` in `container`'s network
    /// namespace; fails early if `server` exits first.
    pub fn wait_listening(&self, container: &str, port: u16, mut server: Option<&mut Child>) {
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
            if let Some(server) = server.as_deref_mut() {
                if let Ok(Some(status)) = server.try_wait() {
                    panic!("the server exited before listening: {status}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on {port} in {container}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The state directory of host `host`: its control plane, outside its runtime directory.
    pub fn state_dir(&self, host: usize) -> PathBuf {
        freeflow_proto::paths::default_state_dir(&self.dirs[host])
    }

    /// The router control socket of host `host`.
    pub fn control_socket(&self, host: usize) -> PathBuf {
        self.state_dir(host).join(freeflow_proto::CONTROL_SOCKET)
    }

    /// What the hosts' daemons and routers logged (every `*.log` of their state directories).
    pub fn router_log(&self) -> String {
        (0..self.dirs.len())
            .map(|h| self.state_dir(h))
            .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts `program ARGS` (with `env`) in container `server` of host 0 and waits (20 s at
    /// most, bounded polls) until host 0's router counts `listeners` rdma_cm listeners; fails
    /// early if the server exits first.
    pub fn start_cm_server(
        &self,
        server: &str,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        listeners: u64,
    ) -> Child {
        let mut child = self
            .verbs_app(server, program, env)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        for _ in 0..400 {
            if self.router_counter(0, "cm_listeners") >= listeners {
                return child;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{program} exited before listening ({status}): {}",
                    describe(&out)
                );
            }
            assert!(Instant::now() < deadline, "{program} never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{program} never listened");
    }

    /// Waits (20 s at most) until counter `name` of host `host`'s router reaches `at_least`;
    /// returns its last value (below `at_least` if it never got there).
    pub fn wait_for_router_counter(&self, host: usize, name: &str, at_least: u64) -> u64 {
        poll(Duration::from_secs(20), Duration::from_millis(50), || {
            let n = self.router_counter(host, name);
            (n >= at_least).then_some(n)
        })
        .unwrap_or_else(|| self.router_counter(host, name))
    }

    /// Counter `name` of the router of host `host` (`freeflow status --json`'s
    /// `router.<name>`; 0 if it is missing).
    pub fn router_counter(&self, host: usize, name: &str) -> u64 {
        self.router_status(host)["router"][name]
            .as_u64()
            .unwrap_or(0)
    }

    /// `freeflow status --json` of host `host` (Null if it printed no JSON).
    pub fn router_status(&self, host: usize) -> serde_json::Value {
        let out = self
            .in_host(host, &FREEFLOW)
            .args(["status", "--json", "--dir"])
            .arg(&self.dirs[host])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for (h, dir) in self.dirs.iter().enumerate() {
            let _ = self
                .in_host(h, &FREEFLOW)
                .args(["down", "--dir"])
                .arg(dir)
                .output();
        }
        drop(self.etcd.take());
        drop(self.cluster.take());
        for h in 0..self.dirs.len() {
            let _ = std::fs::remove_dir_all(self.state_dir(h));
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// A C probe of the verbs tests: its source (a file in tests/programs/) and how it is built.
pub struct CProbe {
    /// The binary's name (and the source's, with `.c`) in the work directory.
    pub name: &'static str,
    pub source: &'static str,
    pub cflags: &'static [&'static str],
    pub libs: &'static [&'static str],
}

impl CProbe {
    /// Builds the probe in `work` with [`build_c_probe`]; returns the binary.
    pub fn build(&self, work: &Path) -> PathBuf {
        build_c_probe(work, self.name, self.source, self.cflags, self.libs)
    }
}

/// The header the C probes share (tests/programs/verbs_probe.h); [`build_c_probe`] writes it
/// next to each probe's source.
const VERBS_PROBE_HEADER: &str = include_str!("../programs/verbs_probe.h");

/// Writes `source` to `<work>/<name>.c` (and the probes' shared header `verbs_probe.h` next to
/// it) and builds `<work>/<name>` with
/// `cc CFLAGS -o BINARY SOURCE LIBS` against the installed headers and the system's libraries
/// (so a verbs probe imports the verbs with rdma-core's symbol versions, like any Debian
/// binary); returns the binary.
pub fn build_c_probe(
    work: &Path,
    name: &str,
    source: &str,
    cflags: &[&str],
    libs: &[&str],
) -> PathBuf {
    let source_path = work.join(format!("{name}.c"));
    let binary = work.join(name);
    std::fs::write(work.join("verbs_probe.h"), VERBS_PROBE_HEADER).unwrap();
    std::fs::write(&source_path, source).unwrap();
    let out = Command::new("cc")
        .args(cflags)
        .arg("-o")
        .arg(&binary)
        .arg(&source_path)
        .args(libs)
        .output()
        .expect("run cc");
    assert_success(
        &out,
        "building the probe failed (libibverbs-dev installed?)",
    );
    binary
}

/// Lines of an strace log strictly between the first two lines that start with `marker`.
pub fn between_markers<'a>(log: &'a str, marker: &str) -> Vec<&'a str> {
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

/// A probe running in `hold` mode ([`Site::hold`]): it keeps what it made until its stdin
/// closes, then checks it and exits.
pub struct Holder {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// What the probe said first: the numbers of what it holds.
    pub first_line: String,
}

impl Holder {
    /// The numbers of the first line.
    pub fn numbers(&self) -> Vec<&str> {
        self.first_line.split_whitespace().collect()
    }

    /// Closes the probe's stdin and waits for it; its stdout past the first line.
    pub fn finish(mut self) -> Output {
        drop(self.child.stdin.take());
        let mut stdout = Vec::new();
        self.stdout.read_to_end(&mut stdout).unwrap();
        let mut out = self.child.wait_with_output().unwrap();
        out.stdout = stdout;
        out
    }
}

/// Fails unless a program exited 0, with `what` and the program's stderr.
/// A program's standard output, as text.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both sides of a server/client run exited 0; else fails with both outputs and the router log.
pub fn assert_both_succeeded(site: &Site, what: &str, server: &Output, client: &Output) {
    for (who, out) in [("server", server), ("client", client)] {
        assert!(
            out.status.success(),
            "{what} {who} failed\n--- server: {}\n--- client: {}\n--- router log\n{}",
            describe(server),
            describe(client),
            site.router_log()
        );
    }
}

pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a program exited 0 and its stdout contains `text` (a probe's "checks passed").
pub fn succeeded_saying(out: &Output, text: &str) -> bool {
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(text)
}

/// Checks both sides of a run of an ibverbs-utils pingpong between `server` (10.32.0.2) and
/// `client` (10.32.0.3) ([`Site::pingpong`]): each exited 0 (`what` names the run in the
/// message), reports `iters` round trips of `size` bytes and shows the GIDs of both containers
/// (their overlay addresses). Returns each side's name and stdout, for the caller's own checks.
pub fn assert_pingpong_sides(
    site: &Site,
    what: &str,
    (server, client): &(Output, Output),
    iters: u64,
    size: u64,
) -> [(&'static str, String); 2] {
    [("server", server), ("client", client)].map(|(who, out)| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{what} {who}: {}\n--- router log\n{}",
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
            text.contains("GID ::ffff:10.32.0.2") && text.contains("GID ::ffff:10.32.0.3"),
            "{who}: {}",
            describe(out)
        );
        (who, text)
    })
}

/// Spawns `cmd` with its stdout piped and reads the first line the program prints; returns the
/// child, the rest of its stdout and that line.
pub fn spawn_reading_first_line(cmd: &mut Command) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    (child, stdout, line)
}

/// Sends SIGTERM to `child` unless it has exited, and waits up to `grace` for it to exit;
/// whether it has.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    if child.try_wait().ok().flatten().is_some() {
        return true;
    }
    // An error means the child is gone already, which the wait below sees.
    let _ = freeflow_os::signals::send_signal(child.id() as i32, libc::SIGTERM);
    poll(grace, Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    })
    .is_some()
}

/// A host's daemon, stopped (SIGSTOP) until dropped: its router keeps serving what it
/// knows, and learns nothing new from the registry meanwhile.
pub struct StoppedDaemon(i32);

impl Site {
    /// Stops host `host`'s daemon (SIGSTOP) until the returned guard is dropped.
    pub fn stop_daemon(&self, host: usize) -> StoppedDaemon {
        let pid_file = self.state_dir(host).join("freeflow.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
            .trim()
            .parse()
            .unwrap();
        // SAFETY: a plain system call on a process id.
        let stopped = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(stopped, 0, "SIGSTOP {pid}");
        StoppedDaemon(pid)
    }
}

impl Drop for StoppedDaemon {
    fn drop(&mut self) {
        // SAFETY: a plain system call on a process id.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The lines a child writes on a pipe (its stderr, say), read by a thread as they come: a test
/// waits for one to appear, then takes everything the child wrote when it is done.
pub struct LineWatch {
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    reader: std::thread::JoinHandle<()>,
}

impl LineWatch {
    pub fn new(pipe: impl std::io::Read + Send + 'static) -> LineWatch {
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufRead::lines(BufReader::new(pipe)).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LineWatch {
            lines,
            seen: Vec::new(),
            reader,
        }
    }

    /// Waits (at most `limit`) for a line containing `needle`; false if the pipe closed or
    /// the time ran out first.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        if self.seen.iter().any(|l| l.contains(needle)) {
            return true;
        }
        let deadline = Instant::now() + limit;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let found = line.contains(needle);
            self.seen.push(line);
            if found {
                return true;
            }
        }
        false
    }

    /// The lines so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Everything written, once the pipe closed (the child ended).
    pub fn finish(mut self) -> String {
        let _ = self.reader.join();
        self.seen.extend(self.lines.try_iter());
        self.seen.iter().map(|l| format!("{l}\n")).collect()
    }
}
