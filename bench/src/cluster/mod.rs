//! `freeflow-bench cluster`: the scale test. etcd (Debian's etcd-server) on tmpfs, N simulated
//! hosts (network namespaces, `freeflow cluster up`), each with its daemon and router (`freeflow
//! up --registry etcd://...`), M containers registered over them with `freeflow container add`:
//! all real processes and the public commands. What it measures, in order:
//!
//! 1. cold start: from the first `freeflow up` until every router knows every other host;
//! 2. registration: M `container add` commands, a few at once (throughput, latency), until
//!    every router holds every container;
//! 3. convergence: one `container add` (then `rm`) at a time, from its start until the address
//!    is in (gone from) every router;
//! 4. a host's daemon and router SIGKILLed, until no other router knows it or its containers;
//! 5. etcd SIGKILLed and started again from its data: nothing lost, routers equal the registry;
//! 6. idle hosts: daemon and router RSS and CPU over some seconds (watchers stopped);
//! 7. one host with many containers registered and some attached (verbs and socket shims,
//!    one holder process per container namespace): attach latency, router RSS and idle CPU.
//!
//! Routers are watched through `router.ctl` (`watch`). Containers are bare network namespaces
//! (`ip netns add ff-<tag>-c-<name>`, removed with the cluster): registration and attach check
//! a namespace, not its interfaces. Everything is removed at the end, also on an error and on
//! SIGINT, SIGTERM or SIGHUP (see [`crate::signals`]).

mod procs;
mod watch;

pub use procs::hold;
pub use watch::watch;

use crate::signals::Interrupts;
use crate::tcp::{checked_tag, freeflow_binary, in_netns, run};
use freeflow_proto::report::{
    ClusterBigHost, ClusterEtcdRestart, ClusterHostKill, ClusterIdle, ClusterRegistration,
    ClusterReport, LatencyMs, Progress,
};
use hdrhistogram::Histogram;
use procs::{read_pid, usage, Etcd, Holders};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use watch::{View, Watchers, WATCH_INTERVAL};

pub struct Options {
    pub hosts: usize,
    pub containers: usize,
    /// `container add` commands at once in the registration phase.
    pub registrars: usize,
    /// Single changes (an add, then a rm) of the convergence phase.
    pub changes: usize,
    pub idle_seconds: u64,
    /// Containers registered on the big host (0: no big-host phase).
    pub big_registered: usize,
    /// Of which attached (half verbs, half socket).
    pub big_attached: usize,
    pub tag: Option<String>,
}

/// The lease TTL of a host's records (the daemon's, control/src/registry/etcd).
const LEASE_TTL: Duration = Duration::from_secs(10);
/// The overlay prefix every host accelerates.
const VNET_PREFIX: &str = "10.32.0.0/12";
/// Limits of the waits for the routers (generous: they fail the run, they do not time it).
const TABLES_LIMIT: Duration = Duration::from_secs(300);
const CHANGE_LIMIT: Duration = Duration::from_secs(30);

/// Everything the bench made; removed on drop (also when a step fails).
struct Bench {
    tag: String,
    work: PathBuf,
    freeflow: PathBuf,
    hosts: usize,
    etcd: Option<Etcd>,
    watchers: Option<Watchers>,
    holders: Holders,
}

impl Bench {
    fn host_netns(&self, h: usize) -> String {
        format!("ff-{}-h{h}", self.tag)
    }

    fn host_dir(&self, h: usize) -> PathBuf {
        self.work.join(format!("h{h}"))
    }

    fn host_ip(h: usize) -> String {
        format!("192.168.1.{}", h + 1)
    }

    fn container_netns(&self, name: &str) -> String {
        format!("ff-{}-c-{name}", self.tag)
    }

    fn registry_url(&self) -> String {
        let endpoint = self.etcd.as_ref().map(Etcd::endpoint).unwrap_or_default();
        format!("etcd://{endpoint}/ffbench-{}", self.tag)
    }

    /// `freeflow ARGS` in host `h`'s namespace, on its runtime directory.
    fn freeflow_in(&self, h: usize, args: &[&str]) -> Command {
        let mut c = in_netns(&self.host_netns(h), &self.freeflow);
        c.args(args).arg("--dir").arg(self.host_dir(h));
        c
    }

    /// The pid in `file` of host `h`'s state directory.
    fn state_pid(&self, h: usize, file: &str) -> Result<u32, String> {
        read_pid(&freeflow_proto::paths::state_dir(&self.host_dir(h)).join(file))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        drop(self.watchers.take());
        self.holders = Holders::default();
        // The clean-up commands run in their own process group: a second Ctrl-C at the
        // terminal must not kill them half way.
        for h in 0..self.hosts {
            let _ = self
                .freeflow_in(h, &["down"])
                .process_group(0)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            // The default one only: never a directory the user chose with FREEFLOW_STATE_DIR.
            let state = freeflow_proto::paths::default_state_dir(&self.host_dir(h));
            let _ = std::fs::remove_dir_all(state);
        }
        drop(self.etcd.take());
        let _ = Command::new(&self.freeflow)
            .args(["cluster", "down", "--tag", &self.tag])
            .process_group(0)
            .output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// A container the bench registers: its name and overlay address.
#[derive(Debug, Clone)]
struct Container {
    name: String,
    ip: Ipv4Addr,
    host: usize,
}

/// The `n`th container of series `series` (a letter), on `host`: addresses from 10.32.0.2 for
/// series `c`, from 10.36.0.2 for `b` (the big host), from 10.40.0.2 for `x` (the changes).
fn container(series: char, n: usize, host: usize) -> Container {
    let base: u32 = match series {
        'c' => u32::from(Ipv4Addr::new(10, 32, 0, 2)),
        'b' => u32::from(Ipv4Addr::new(10, 36, 0, 2)),
        _ => u32::from(Ipv4Addr::new(10, 40, 0, 2)),
    };
    Container {
        name: format!("{series}{n}"),
        ip: Ipv4Addr::from(base + n as u32),
        host,
    }
}

/// Runs the experiment. It blocks SIGINT, SIGTERM and SIGHUP for the rest of the process's life
/// (call it from the main thread before starting any other); one of them stops it with an error
/// after everything it made is removed.
pub fn run_experiment(
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ClusterReport, String> {
    if opts.hosts < 2 {
        return Err("--hosts: at least 2 (one is killed)".into());
    }
    if opts.big_registered > 0 && opts.big_attached > opts.big_registered {
        return Err("--big-attached cannot exceed --big-registered".into());
    }
    let stop = Interrupts::block()?;
    let freeflow = freeflow_binary()?;
    let tag = checked_tag(opts.tag.as_deref(), "cl")?;
    // tmpfs: etcd's data (its fsyncs cost nothing there) and the hosts' runtime directories.
    let work = PathBuf::from(format!("/dev/shm/freeflow-bench-cluster-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut bench = Bench {
        tag,
        work,
        freeflow,
        hosts: opts.hosts,
        etcd: None,
        watchers: None,
        holders: Holders::default(),
    };
    let result = measure(&mut bench, opts, &stop, progress);
    // A failure keeps the logs of etcd, the daemons and the routers (the rest goes).
    let result = result.map_err(|e| match keep_logs(&bench) {
        Some(logs) => format!("{e} (logs kept in {})", logs.display()),
        None => e,
    });
    progress(&Progress::Cluster {
        step: "removing everything".into(),
    });
    drop(bench);
    result.map_err(|e| match stop.check() {
        Err(_) => format!("{e}; removed everything it made"),
        Ok(()) => e,
    })
}

fn measure(
    bench: &mut Bench,
    opts: &Options,
    stop: &Interrupts,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ClusterReport, String> {
    let mut step = |s: String| progress(&Progress::Cluster { step: s });
    let n = opts.hosts;
    step(format!("building {n} simulated hosts and etcd"));
    run(
        Command::new(&bench.freeflow).args([
            "cluster",
            "up",
            "--tag",
            &bench.tag,
            "--hosts",
            &n.to_string(),
        ]),
        stop,
    )?;
    let mut etcd = Etcd::new(&bench.host_netns(0), &Bench::host_ip(0), &bench.work);
    etcd.start(stop)?;
    bench.etcd = Some(etcd);

    // Every container's namespace, made before anything is timed (one `ip -batch`).
    let main: Vec<Container> = (0..opts.containers)
        .map(|i| container('c', i, i % n))
        .collect();
    let changes: Vec<Container> = (0..opts.changes)
        .map(|i| container('x', i, (i * 7 + 1) % n))
        .collect();
    let big: Vec<Container> = (0..opts.big_registered)
        .map(|i| container('b', i, 0))
        .collect();
    let extra = container('x', opts.changes, 0);
    add_namespaces(
        bench,
        main.iter()
            .chain(&changes)
            .chain(&big)
            .chain(std::iter::once(&extra)),
    )?;

    step(format!("cold start: `freeflow up` on {n} hosts at once"));
    let host_list: Vec<(String, PathBuf)> = (0..n)
        .map(|h| (bench.host_netns(h), bench.host_dir(h)))
        .collect();
    bench.watchers = Some(Watchers::start(&host_list)?);
    let t0 = freeflow_proto::clock::monotonic_ns();
    let ups: Vec<Command> = (0..n)
        .map(|h| {
            let mut c = bench.freeflow_in(h, &["up"]);
            c.args(["--host-ip", &Bench::host_ip(h)])
                .args(["--vnet-prefix", VNET_PREFIX])
                .args(["--registry", &bench.registry_url()]);
            c
        })
        .collect();
    run_all(ups, n, stop)?;
    let watchers = bench.watchers.as_mut().ok_or("no watchers")?;
    watchers.wait_until(stop, TABLES_LIMIT, "every router knows every host", |v| {
        v.iter().all(|view| view.hosts.len() + 1 == n)
    })?;
    let cold_end = watchers
        .views
        .iter()
        .flat_map(|v| v.hosts.values())
        .max()
        .copied()
        .unwrap_or(t0);
    let cold_start_s = secs(cold_end.saturating_sub(t0));

    step(format!(
        "registering {} containers, {} at once",
        main.len(),
        opts.registrars
    ));
    let (reg_latency, reg_seconds) = register_all(bench, &main, opts.registrars, stop)?;
    let reg_end = freeflow_proto::clock::monotonic_ns();
    let main_ips: Vec<Ipv4Addr> = main.iter().map(|c| c.ip).collect();
    let watchers = bench.watchers.as_mut().ok_or("no watchers")?;
    watchers.wait_until(
        stop,
        TABLES_LIMIT,
        "every router holds every container",
        |v| {
            v.iter()
                .all(|view| main_ips.iter().all(|ip| view.overlay.contains_key(ip)))
        },
    )?;
    let complete = watchers
        .views
        .iter()
        .flat_map(|v| main_ips.iter().filter_map(|ip| v.overlay.get(ip)))
        .max()
        .copied()
        .unwrap_or(reg_end);
    let registration = ClusterRegistration {
        containers: main.len(),
        registrars: opts.registrars,
        seconds: reg_seconds,
        per_second: main.len() as f64 / reg_seconds.max(1e-9),
        latency: reg_latency,
        tables_complete_after_s: secs(complete.saturating_sub(reg_end)),
    };

    step(format!(
        "convergence: {} single registrations and removals",
        changes.len()
    ));
    let (convergence_add, convergence_remove) = converge(bench, &changes, stop)?;

    let victim = n - 1;
    step(format!(
        "killing host {victim}'s daemon and router (SIGKILL)"
    ));
    let host_kill = kill_host(bench, victim, &main, stop)?;

    step("etcd: SIGKILL, then started again from its data".into());
    let etcd_restart = restart_etcd(bench, victim, &extra, stop)?;

    if let Some(mut w) = bench.watchers.take() {
        w.stop();
    }
    step(format!(
        "idle: {} hosts' daemons and routers for {} s",
        n - 1,
        opts.idle_seconds
    ));
    let idle = measure_idle(bench, victim, opts.idle_seconds, stop)?;

    // A failure here is reported with the figures of the other phases (which took minutes).
    let (big_host, big_host_error) = if big.is_empty() {
        (None, None)
    } else {
        step(format!(
            "big host: {} containers on host 0, {} attached",
            big.len(),
            opts.big_attached
        ));
        stop.check()?;
        match big_host(bench, &big, opts, stop) {
            Ok(b) => (Some(b), None),
            Err(e) => {
                stop.check()?;
                (None, Some(e))
            }
        }
    };

    Ok(ClusterReport {
        experiment: "cluster".into(),
        hosts: n,
        containers: main.len(),
        watch_interval_ms: WATCH_INTERVAL.as_millis() as u64,
        cold_start_s,
        registration,
        convergence_add,
        convergence_remove,
        host_kill,
        etcd_restart,
        idle,
        big_host,
        big_host_error,
        note: format!(
            "all on this machine ({} cores), debug or release as built; routers are watched every {} ms",
            std::thread::available_parallelism().map_or(0, |p| p.get()),
            WATCH_INTERVAL.as_millis()
        ),
    })
}

/// Copies etcd's log and every host's daemon and router logs to a directory of their own under
/// the temporary directory, which it returns (`None` if nothing could be kept).
fn keep_logs(bench: &Bench) -> Option<PathBuf> {
    let logs = std::env::temp_dir().join(format!("freeflow-bench-cluster-{}-logs", bench.tag));
    std::fs::create_dir_all(&logs).ok()?;
    let _ = std::fs::copy(bench.work.join("etcd.log"), logs.join("etcd.log"));
    for h in 0..bench.hosts {
        let state = freeflow_proto::paths::state_dir(&bench.host_dir(h));
        for file in ["freeflow.log", "router.log"] {
            let _ = std::fs::copy(state.join(file), logs.join(format!("h{h}-{file}")));
        }
    }
    Some(logs)
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The namespaces of `containers`, made with one `ip -batch` (recorded in the cluster's tag, so
/// `cluster down` removes them).
fn add_namespaces<'a>(
    bench: &Bench,
    containers: impl Iterator<Item = &'a Container>,
) -> Result<(), String> {
    let script = bench.work.join("netns.batch");
    let lines: String = containers
        .map(|c| format!("netns add {}\n", bench.container_netns(&c.name)))
        .collect();
    std::fs::write(&script, lines).map_err(|e| e.to_string())?;
    let out = Command::new("ip")
        .arg("-batch")
        .arg(&script)
        .output()
        .map_err(|e| format!("ip -batch: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip -batch (netns add): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Runs `commands`, `at_once` at a time, each to completion; fails on the first failure.
/// Returns each command's time (process start to exit) and the whole run's seconds.
fn run_all(
    commands: Vec<Command>,
    at_once: usize,
    stop: &Interrupts,
) -> Result<(Vec<Duration>, f64), String> {
    let times = Mutex::new(Vec::with_capacity(commands.len()));
    let queue = Mutex::new(commands.into_iter());
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let stopping = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..at_once.max(1))
            .map(|_| {
                s.spawn(|| loop {
                    if stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some(mut cmd) = next else { return };
                    let t = Instant::now();
                    let out = cmd.output();
                    let took = t.elapsed();
                    let why = match out {
                        Ok(out) if out.status.success() => {
                            let _ = times.lock().map(|mut v| v.push(took));
                            continue;
                        }
                        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                        Err(e) => e.to_string(),
                    };
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(format!("{cmd:?} failed: {why}"));
                    }
                    stopping.store(true, Ordering::Relaxed);
                })
            })
            .collect();
        // The workers' commands are not watched for signals: a Ctrl-C at the terminal reaches
        // them too, a SIGTERM to the bench stops the workers after their current command.
        while workers.iter().any(|w| !w.is_finished()) {
            if stop.wait(Duration::from_millis(100)).is_some() {
                stopping.store(true, Ordering::Relaxed);
            }
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    stop.check()?;
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok((times.into_inner().unwrap_or_default(), seconds))
}

/// `freeflow container add` for `c` on its host.
fn add_command(bench: &Bench, c: &Container) -> Command {
    let mut cmd = bench.freeflow_in(c.host, &["container", "add", &c.name]);
    cmd.arg("--netns")
        .arg(Path::new("/run/netns").join(bench.container_netns(&c.name)))
        .args(["--ip", &c.ip.to_string()]);
    cmd
}

/// Registers `containers`, `at_once` commands at a time; returns the commands' latency and the
/// whole phase's seconds.
fn register_all(
    bench: &Bench,
    containers: &[Container],
    at_once: usize,
    stop: &Interrupts,
) -> Result<(LatencyMs, f64), String> {
    let commands = containers.iter().map(|c| add_command(bench, c)).collect();
    let (times, seconds) = run_all(commands, at_once, stop)?;
    Ok((latency(&times), seconds))
}

/// p50, p99 and max of `times` (recorded in µs).
fn latency(times: &[Duration]) -> LatencyMs {
    let Ok(mut h) = Histogram::<u64>::new(3) else {
        return LatencyMs::default();
    };
    for t in times {
        let _ = h.record(t.as_micros().max(1) as u64);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    LatencyMs {
        samples: times.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

/// Views of the hosts still alive (all but `dead`).
fn alive(views: &[View], dead: Option<usize>) -> impl Iterator<Item = &View> {
    views
        .iter()
        .enumerate()
        .filter(move |(i, _)| Some(*i) != dead)
        .map(|(_, v)| v)
}

/// One registration, then one removal, at a time: from each command's start until every router
/// has (no longer has) the address.
fn converge(
    bench: &mut Bench,
    changes: &[Container],
    stop: &Interrupts,
) -> Result<(LatencyMs, LatencyMs), String> {
    let mut adds = Vec::new();
    let mut removes = Vec::new();
    for c in changes {
        let t0 = freeflow_proto::clock::monotonic_ns();
        run(&mut add_command(bench, c), stop)?;
        let ip = c.ip;
        let watchers = bench.watchers.as_mut().ok_or("no watchers")?;
        watchers.wait_until(stop, CHANGE_LIMIT, &format!("{ip} in every router"), |v| {
            v.iter().all(|view| view.overlay.contains_key(&ip))
        })?;
        let seen = watchers
            .views
            .iter()
            .filter_map(|v| v.overlay.get(&ip))
            .max()
            .copied()
            .unwrap_or(t0);
        adds.push(Duration::from_nanos(seen.saturating_sub(t0)));

        let t0 = freeflow_proto::clock::monotonic_ns();
        run(
            &mut bench.freeflow_in(c.host, &["container", "rm", &c.name]),
            stop,
        )?;
        let watchers = bench.watchers.as_mut().ok_or("no watchers")?;
        watchers.wait_until(stop, CHANGE_LIMIT, &format!("{ip} gone everywhere"), |v| {
            v.iter().all(|view| !view.overlay.contains_key(&ip))
        })?;
        let gone = watchers
            .views
            .iter()
            .filter_map(|v| v.gone.get(&ip))
            .max()
            .copied()
            .unwrap_or(t0);
        removes.push(Duration::from_nanos(gone.saturating_sub(t0)));
    }
    Ok((latency(&adds), latency(&removes)))
}

/// SIGKILL to host `victim`'s daemon and router; waits until no other router knows the host
/// or any of its containers.
fn kill_host(
    bench: &mut Bench,
    victim: usize,
    containers: &[Container],
    stop: &Interrupts,
) -> Result<ClusterHostKill, String> {
    let daemon = bench.state_pid(victim, "freeflow.pid")?;
    let router = bench.state_pid(victim, "router.pid")?;
    let host_ip: Ipv4Addr = Bench::host_ip(victim)
        .parse()
        .map_err(|_| "bad host address")?;
    let ips: Vec<Ipv4Addr> = containers
        .iter()
        .filter(|c| c.host == victim)
        .map(|c| c.ip)
        .collect();
    let t0 = freeflow_proto::clock::monotonic_ns();
    for pid in [daemon, router] {
        let target = freeflow_os::process::Pidfd::open(pid as i32)
            .map_err(|e| format!("pidfd of {pid}: {e}"))?;
        target
            .send_signal(libc::SIGKILL)
            .map_err(|e| format!("SIGKILL to {pid}: {e}"))?;
    }
    let watchers = bench.watchers.as_mut().ok_or("no watchers")?;
    watchers.wait_until(
        stop,
        LEASE_TTL * 6,
        &format!("host {victim} gone from every router"),
        |v| {
            alive(v, Some(victim)).all(|view| {
                !view.hosts.contains_key(&host_ip)
                    && ips.iter().all(|ip| !view.overlay.contains_key(ip))
            })
        },
    )?;
    let gone = alive(&watchers.views, Some(victim))
        .flat_map(|v| {
            std::iter::once(host_ip)
                .chain(ips.iter().copied())
                .filter_map(|ip| v.gone.get(&ip).copied())
        })
        .max()
        .unwrap_or(t0);
    Ok(ClusterHostKill {
        host: victim,
        containers_of_host: ips.len(),
        lease_ttl_s: LEASE_TTL.as_secs_f64(),
        gone_everywhere_s: secs(gone.saturating_sub(t0)),
    })
}

/// The registry's overlay addresses, as `freeflow container ls --json` on host 0 reads them.
fn registry_ips(bench: &Bench, stop: &Interrupts) -> Result<HashSet<Ipv4Addr>, String> {
    let out = run(
        &mut bench.freeflow_in(0, &["container", "ls", "--json"]),
        stop,
    )?;
    let value: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("container ls --json: {e}"))?;
    let list = value
        .as_array()
        .or_else(|| value.get("containers").and_then(|c| c.as_array()))
        .ok_or("container ls --json: not a list")?;
    list.iter()
        .map(|c| {
            c.get("ip")
                .and_then(|ip| ip.as_str())
                .and_then(|ip| ip.parse().ok())
                .ok_or_else(|| format!("container ls --json: no address in {c}"))
        })
        .collect()
}

/// etcd SIGKILLed and started again on its data; then one registration (retried while the
/// daemons reconnect), and every live router compared with the registry.
fn restart_etcd(
    bench: &mut Bench,
    dead: usize,
    extra: &Container,
    stop: &Interrupts,
) -> Result<ClusterEtcdRestart, String> {
    let before = registry_ips(bench, stop)?;
    let down = Duration::from_secs(1);
    let etcd = bench.etcd.as_mut().ok_or("no etcd")?;
    etcd.kill();
    stop.sleep(down)?;
    let started = Instant::now();
    let healthy = etcd.start(stop)?;
    // The daemons find out on their watch's end and start over; a registration made meanwhile
    // may fail with a clear error: retried for up to 30 s.
    let mut registered = None;
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        match run(&mut add_command(bench, extra), stop) {
            Ok(_) => {
                registered = Some(started.elapsed());
                break;
            }
            Err(e) => last = e,
        }
        stop.sleep(Duration::from_millis(100))?;
    }
    let registration_after = registered
        .ok_or_else(|| format!("no registration within 30 s of etcd's restart: {last}"))?;
    let after = registry_ips(bench, stop)?;
    let lost = before.difference(&after).count();
    let mut expected = before.clone();
    expected.insert(extra.ip);
    let watchers = bench.watchers.as_mut().ok_or("no watchers")?;
    let ip = extra.ip;
    watchers.wait_until(stop, CHANGE_LIMIT, &format!("{ip} in every router"), |v| {
        alive(v, Some(dead)).all(|view| view.overlay.contains_key(&ip))
    })?;
    let live_hosts: HashSet<Ipv4Addr> = (0..bench.hosts)
        .filter(|&h| h != dead)
        .filter_map(|h| Bench::host_ip(h).parse().ok())
        .collect();
    let routers_equal = watchers
        .views
        .iter()
        .enumerate()
        .filter(|(h, _)| *h != dead)
        .filter(|(h, v)| {
            let own: Ipv4Addr = Bench::host_ip(*h).parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
            let overlay: HashSet<Ipv4Addr> = v.overlay.keys().copied().collect();
            let hosts: HashSet<Ipv4Addr> = v.hosts.keys().copied().chain([own]).collect();
            overlay == after && hosts == live_hosts
        })
        .count();
    Ok(ClusterEtcdRestart {
        down_s: down.as_secs_f64(),
        healthy_after_s: healthy.as_secs_f64(),
        registration_after_s: registration_after.as_secs_f64(),
        registry_before: before.len(),
        lost,
        routers_equal_to_registry: routers_equal,
        routers: bench.hosts - 1,
    })
}

/// Daemon and router RSS and CPU of every live host over `seconds`, and etcd's.
fn measure_idle(
    bench: &Bench,
    dead: usize,
    seconds: u64,
    stop: &Interrupts,
) -> Result<ClusterIdle, String> {
    // Let the routers' control threads finish the spin the watchers' last questions started.
    stop.sleep(Duration::from_secs(1))?;
    let mut pids = Vec::new();
    for h in (0..bench.hosts).filter(|&h| h != dead) {
        pids.push((
            bench.state_pid(h, "freeflow.pid")?,
            bench.state_pid(h, "router.pid")?,
        ));
    }
    let etcd = bench.etcd.as_ref().and_then(Etcd::pid).ok_or("no etcd")?;
    let before: Vec<_> = pids
        .iter()
        .map(|&(d, r)| Ok((usage(d)?, usage(r)?)))
        .collect::<Result<_, String>>()?;
    let etcd_before = usage(etcd)?;
    let started = Instant::now();
    stop.sleep(Duration::from_secs(seconds))?;
    let elapsed = started.elapsed().as_secs_f64();
    let after: Vec<_> = pids
        .iter()
        .map(|&(d, r)| Ok((usage(d)?, usage(r)?)))
        .collect::<Result<_, String>>()?;
    let etcd_after = usage(etcd)?;
    let hosts = pids.len();
    let cpu = |a: Duration, b: Duration| 100.0 * a.saturating_sub(b).as_secs_f64() / elapsed;
    Ok(ClusterIdle {
        seconds: elapsed,
        hosts,
        daemon_rss_kib_mean: after.iter().map(|(d, _)| d.rss_kib).sum::<u64>() / hosts as u64,
        router_rss_kib_mean: after.iter().map(|(_, r)| r.rss_kib).sum::<u64>() / hosts as u64,
        routers_cpu_percent: before
            .iter()
            .zip(&after)
            .map(|((_, b), (_, a))| cpu(a.cpu, b.cpu))
            .sum(),
        daemons_cpu_percent: before
            .iter()
            .zip(&after)
            .map(|((b, _), (a, _))| cpu(a.cpu, b.cpu))
            .sum(),
        etcd_cpu_percent: cpu(etcd_after.cpu, etcd_before.cpu),
        etcd_rss_kib: etcd_after.rss_kib,
    })
}

/// Host 0 with `big` registered and the first `opts.big_attached` of them attached (even ones
/// as verbs shims, odd ones as socket shims), one after another.
fn big_host(
    bench: &mut Bench,
    big: &[Container],
    opts: &Options,
    stop: &Interrupts,
) -> Result<ClusterBigHost, String> {
    let (registration, reg_seconds) = register_all(bench, big, opts.registrars, stop)?;
    let router = bench.state_pid(0, "router.pid")?;
    let daemon = bench.state_pid(0, "freeflow.pid")?;
    // The daemon pushes its table asynchronously; registration waited for the pickup.
    let rss_before = usage(router)?.rss_kib;
    let mut attach_times = Vec::new();
    let (mut verbs, mut socket) = (0, 0);
    for (i, c) in big.iter().take(opts.big_attached).enumerate() {
        stop.check()?;
        let kind = if i % 2 == 0 { "verbs" } else { "socket" };
        let netns = bench.container_netns(&c.name);
        let dir = bench.host_dir(0);
        attach_times.push(bench.holders.attach(&netns, &dir, kind)?);
        if i % 2 == 0 {
            verbs += 1;
        } else {
            socket += 1;
        }
    }
    stop.sleep(Duration::from_secs(1))?;
    let before = (usage(router)?, usage(daemon)?);
    let started = Instant::now();
    stop.sleep(Duration::from_secs(opts.idle_seconds))?;
    let elapsed = started.elapsed().as_secs_f64();
    let after = (usage(router)?, usage(daemon)?);
    let cpu = |a: Duration, b: Duration| 100.0 * a.saturating_sub(b).as_secs_f64() / elapsed;
    Ok(ClusterBigHost {
        registered: big.len(),
        registration,
        registration_per_second: big.len() as f64 / reg_seconds.max(1e-9),
        attached_verbs: verbs,
        attached_socket: socket,
        attach: latency(&attach_times),
        router_rss_kib: after.0.rss_kib,
        router_rss_shmem_kib: after.0.rss_shmem_kib,
        router_rss_kib_before_attach: rss_before,
        router_cpu_percent: cpu(after.0.cpu, before.0.cpu),
        daemon_cpu_percent: cpu(after.1.cpu, before.1.cpu),
        daemon_rss_kib: after.1.rss_kib,
        seconds: elapsed,
    })
}
