//! `freeflow-bench tcp`: TCP between two simulated hosts, three ways in one run: the host link,
//! the overlay (VXLAN), and Freeflow (overlay addresses, host path). Throughput of one stream,
//! request/response round trip, connection setup (connect to first byte) and connections per
//! second. The cluster, the routers and the registrations are made with the public `freeflow`
//! commands; servers and clients are this binary re-executed inside the namespaces (`roles`).
//!
//! SIGINT, SIGTERM and SIGHUP stop the experiment at the next step (see [`crate::signals`]):
//! whatever it made is removed before the process exits.

mod per_request;
mod roles;

pub use roles::{client, requests, serve};

use crate::signals::{interrupted, Interrupts, CHILD_PAUSE};
use crate::stats::median;
use freeflow_os::child::{self, Ended, Limits};
use freeflow_proto::report::{Progress, TcpPath, TcpPathReport, TcpRatios, TcpReport, TcpSample};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Options {
    pub reps: usize,
    pub seconds: f64,
    pub rtt_samples: u64,
    pub setups: u64,
    /// Concurrent clients of the connection-per-request load, one measurement each; empty: no
    /// such load.
    pub concurrency: Vec<usize>,
    /// Cluster tag; `None` picks one from the pid. A caller that passes one (`freeflow demo`)
    /// can check afterwards that nothing of it is left, also if this process was killed.
    pub tag: Option<String>,
}

/// Where the experiment keeps the runtime directories and the registry of cluster `tag`.
pub fn work_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("freeflow-bench-tcp-{tag}"))
}

/// The overlay addresses of the two containers: web on host 0, db on host 1.
const CONTAINERS: [(usize, &str, &str); 2] = [(0, "web", "10.32.0.2"), (1, "db", "10.32.0.4")];

pub(crate) fn freeflow_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name("freeflow");
    p.exists()
        .then_some(p.clone())
        .ok_or(format!("{} not found: build the workspace", p.display()))
}

/// How the experiment's commands run: without a time limit, looked at every [`CHILD_PAUSE`].
const COMMAND_LIMITS: Limits = Limits {
    run: None,
    pause: CHILD_PAUSE,
    ..Limits::DEFAULT
};

/// Runs `cmd` to completion and returns its stdout; a termination signal kills it and ends the
/// experiment.
pub(crate) fn run(cmd: &mut Command, stop: &Interrupts) -> Result<String, String> {
    run_limited(cmd, stop, &COMMAND_LIMITS)
}

/// [`run`] within `limits`: a child that runs past them is killed and fails the experiment.
pub(crate) fn run_limited(
    cmd: &mut Command,
    mut stop: &Interrupts,
    limits: &Limits,
) -> Result<String, String> {
    stop.check()?;
    let started = child::start(cmd).map_err(|e| format!("{cmd:?}: {e}"))?;
    // Both pipes are read while waiting, so a child that says a lot cannot stall on a full pipe.
    let done = child::watch(started, limits, &mut stop).map_err(|e| format!("wait: {e}"))?;
    match done.ended {
        Ended::Interrupted(sig) => return Err(interrupted(sig)),
        Ended::TimedOut => return Err(format!("{cmd:?} ran past {:?} and was killed", limits.run)),
        Ended::Exited => {}
    }
    if !done.status.success() {
        // A Ctrl-C from the terminal reaches the child too; say why it failed.
        stop.check()?;
        return Err(format!("{cmd:?} failed: {}", done.stderr.trim()));
    }
    Ok(done.stdout)
}

pub(crate) fn in_netns(netns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program);
    c
}

/// Everything the experiment made; removed on drop (also when a step fails).
/// (`freeflow-bench rdma --hosts 2` builds its hosts with it too.)
pub(crate) struct Bench {
    pub(crate) tag: String,
    pub(crate) work: PathBuf,
    pub(crate) freeflow: PathBuf,
    pub(crate) servers: Vec<Child>,
}

impl Bench {
    /// Host `h`'s namespace.
    pub(crate) fn host(&self, h: usize) -> String {
        format!("ff-{}-h{h}", self.tag)
    }

    /// Container `name`'s namespace.
    pub(crate) fn container(&self, name: &str) -> String {
        format!("ff-{}-c-{name}", self.tag)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        // The clean-up commands run in their own process group: a second Ctrl-C at the
        // terminal must not kill them half way.
        for h in 0..2 {
            let _ = in_netns(&self.host(h), &self.freeflow)
                .args(["down", "--dir"])
                .arg(self.work.join(format!("h{h}")))
                .process_group(0)
                .output();
            // The default one only: never a directory the user chose with FREEFLOW_STATE_DIR.
            let state = freeflow_proto::paths::default_state_dir(&self.work.join(format!("h{h}")));
            let _ = std::fs::remove_dir_all(state);
        }
        let _ = Command::new(&self.freeflow)
            .args(["cluster", "down", "--tag", &self.tag])
            .process_group(0)
            .output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Runs the experiment. It blocks SIGINT, SIGTERM and SIGHUP for the rest of the process's life
/// (call it from the main thread before starting any other); one of them stops it with an error
/// after everything it made is removed.
pub fn run_experiment(
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TcpReport, String> {
    let stop = Interrupts::block()?;
    let freeflow = freeflow_binary()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let shim = exe.with_file_name("libfsocket.so");
    if !shim.exists() {
        return Err(format!("{} not found: build the workspace", shim.display()));
    }
    let tag = checked_tag(opts.tag.as_deref(), "bt")?;
    let work = work_dir(&tag);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let mut bench = Bench {
        tag,
        work,
        freeflow,
        servers: Vec::new(),
    };
    let programs = Programs { exe, shim };
    let result = measure(&mut bench, &programs, opts, &stop, progress);
    progress(&Progress::TcpRemoving);
    drop(bench);
    result.map_err(|e| match stop.check() {
        Err(_) => format!("{e}; removed everything it made"),
        Ok(()) => e,
    })
}

/// `tag`, or one made of `prefix` and the pid; checked: it names a directory that is removed,
/// so only the cluster tag alphabet may reach it.
pub(crate) fn checked_tag(tag: Option<&str>, prefix: &str) -> Result<String, String> {
    let tag = tag.map_or_else(
        || format!("{prefix}{}", std::process::id() % 100_000),
        str::to_owned,
    );
    if tag.is_empty()
        || tag.len() > 8
        || !tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!("--tag {tag:?}: 1 to 8 of a-z 0-9"));
    }
    Ok(tag)
}

/// The two programs the experiment runs in the namespaces: this binary and the socket shim.
pub(crate) struct Programs {
    pub(crate) exe: PathBuf,
    pub(crate) shim: PathBuf,
}

impl Programs {
    /// This binary in `netns`, for host `h`'s router, with the shim or without; the caller adds
    /// the role and its arguments.
    pub(crate) fn role_in(&self, netns: &str, work: &Path, h: usize, preload: bool) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns, "env"])
            .arg(format!(
                "FREEFLOW_DIR={}",
                work.join(format!("h{h}")).display()
            ))
            .arg("VNET_PREFIX=10.32.0.0/12");
        if preload {
            c.arg(format!("LD_PRELOAD={}", self.shim.display()));
        }
        c.arg(&self.exe);
        c
    }
}

fn measure(
    bench: &mut Bench,
    programs: &Programs,
    opts: &Options,
    stop: &Interrupts,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TcpReport, String> {
    progress(&Progress::TcpBuilding);
    build_hosts(bench, None, stop)?;
    start_servers(bench, programs, stop)?;
    // Listener tables travel between the routers; give them a moment.
    stop.sleep(Duration::from_millis(1000))?;
    let mut samples: Vec<Vec<TcpSample>> = vec![Vec::new(); TcpPath::ALL.len()];
    for rep in 0..opts.reps {
        for (i, path) in TcpPath::ALL.into_iter().enumerate() {
            progress(&Progress::TcpRepetition {
                rep: rep + 1,
                of: opts.reps,
                path,
            });
            samples[i].push(measure_path(bench, programs, path, opts, stop)?);
        }
    }
    let mut report = report(opts, samples);
    report.per_request = per_request::measure(
        bench,
        programs,
        &opts.concurrency,
        opts.reps,
        opts.seconds,
        stop,
        progress,
    )?;
    Ok(report)
}

/// The cluster (two hosts, containers web and db), Freeflow on both hosts with one registry,
/// and the containers registered: all with the public `freeflow` commands. With `cores`, host
/// h's router runs on core `cores[h]` (`freeflow up --cores`).
pub(crate) fn build_hosts(
    bench: &Bench,
    cores: Option<[usize; 2]>,
    stop: &Interrupts,
) -> Result<(), String> {
    let (tag, work, freeflow) = (&bench.tag, &bench.work, &bench.freeflow);
    let mut up = Command::new(freeflow);
    up.args(["cluster", "up", "--tag", tag, "--hosts", "2"]);
    for (h, name, ip) in CONTAINERS {
        up.args(["--container", &format!("{name}:{h}:{ip}")]);
    }
    run(&mut up, stop)?;
    let registry = format!("file:{}", work.join("registry.json").display());
    for h in 0..2 {
        let mut up = in_netns(&bench.host(h), freeflow);
        up.args(["up", "--dir"])
            .arg(work.join(format!("h{h}")))
            .args([
                "--host-ip",
                &format!("192.168.1.{}", h + 1),
                "--vnet-prefix",
                "10.32.0.0/12",
                "--registry",
                &registry,
            ]);
        if let Some(cores) = cores {
            up.args(["--cores", &cores[h].to_string()]);
        }
        run(&mut up, stop)?;
    }
    for (h, name, ip) in CONTAINERS {
        run(
            in_netns(&bench.host(h), freeflow)
                .args(["container", "add", name, "--dir"])
                .arg(work.join(format!("h{h}")))
                .args([
                    "--netns",
                    &format!("/run/netns/ff-{tag}-c-{name}"),
                    "--ip",
                    ip,
                ]),
            stop,
        )?;
    }
    Ok(())
}

/// Where each path's server listens, on host 1: (namespace, port, with the shim).
fn server_of(bench: &Bench, path: TcpPath) -> (String, u16, bool) {
    match path {
        TcpPath::Host => (bench.host(1), 7001, false),
        TcpPath::Overlay => (bench.container("db"), 7002, false),
        TcpPath::Freeflow => (bench.container("db"), 7003, true),
    }
}

/// Where each path's client runs, on host 0, and what it connects to: (namespace, address,
/// with the shim).
fn client_of(bench: &Bench, path: TcpPath) -> (String, &'static str, bool) {
    match path {
        TcpPath::Host => (bench.host(0), "192.168.1.2:7001", false),
        TcpPath::Overlay => (bench.container("web"), "10.32.0.4:7002", false),
        TcpPath::Freeflow => (bench.container("web"), "10.32.0.4:7003", true),
    }
}

/// One server per path: host link (host 1's namespace), overlay (db without the shim), Freeflow
/// (db with it). Each is owned by `bench` once started, and ready when this returns.
fn start_servers(bench: &mut Bench, programs: &Programs, stop: &Interrupts) -> Result<(), String> {
    for path in TcpPath::ALL {
        let (netns, port, preload) = server_of(bench, path);
        start_server(bench, programs, &netns, port, preload, stop)?;
    }
    Ok(())
}

/// This binary's server role in `netns` (for host 1's router) on `port`: owned by `bench` once
/// started, and ready when this returns.
pub(crate) fn start_server(
    bench: &mut Bench,
    programs: &Programs,
    netns: &str,
    port: u16,
    preload: bool,
    stop: &Interrupts,
) -> Result<(), String> {
    stop.check()?;
    let mut child = programs
        .role_in(netns, &bench.work, 1, preload)
        .args(["tcp-server", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut ready = [0u8; 6];
    let started = child
        .stdout
        .as_mut()
        .ok_or("no stdout")?
        .read_exact(&mut ready);
    // Owned by `bench` before anything can fail, so that it is killed on every path.
    bench.servers.push(child);
    if let Err(e) = started {
        stop.check()?;
        return Err(format!("server start: {e}"));
    }
    Ok(())
}

/// One repetition of one path: the client role against that path's server.
fn measure_path(
    bench: &Bench,
    programs: &Programs,
    path: TcpPath,
    opts: &Options,
    stop: &Interrupts,
) -> Result<TcpSample, String> {
    let (netns, addr, preload) = client_of(bench, path);
    let out = run(
        programs.role_in(&netns, &bench.work, 0, preload).args([
            "tcp-client",
            addr,
            &opts.seconds.to_string(),
            &opts.rtt_samples.to_string(),
            &opts.setups.to_string(),
        ]),
        stop,
    )?;
    serde_json::from_str(out.trim())
        .map_err(|e| format!("{} client said {out:?}: {e}", path.as_str()))
}

/// The report: each path's medians and repetitions, and the ratios to the host link.
fn report(opts: &Options, samples: Vec<Vec<TcpSample>>) -> TcpReport {
    let med = |v: &[TcpSample]| TcpSample {
        gbit_per_sec: median(v.iter().map(|s| s.gbit_per_sec)),
        rtt_p50_us: median(v.iter().map(|s| s.rtt_p50_us)),
        rtt_p99_us: median(v.iter().map(|s| s.rtt_p99_us)),
        setup_p50_us: median(v.iter().map(|s| s.setup_p50_us)),
        setup_p99_us: median(v.iter().map(|s| s.setup_p99_us)),
        connect_p50_us: median(v.iter().map(|s| s.connect_p50_us)),
        conns_per_sec: median(v.iter().map(|s| s.conns_per_sec)),
    };
    let paths: Vec<TcpPathReport> = TcpPath::ALL
        .into_iter()
        .zip(samples)
        .map(|(path, reps)| TcpPathReport {
            path,
            median: med(&reps),
            reps,
        })
        .collect();
    let ratios = |p: &TcpSample, h: &TcpSample| TcpRatios {
        throughput: p.gbit_per_sec / h.gbit_per_sec,
        rtt_p50: p.rtt_p50_us / h.rtt_p50_us,
        setup_p50: p.setup_p50_us / h.setup_p50_us,
    };
    TcpReport {
        experiment: "tcp".into(),
        repetitions: opts.reps,
        stream_seconds: opts.seconds,
        freeflow_vs_host: ratios(&paths[2].median, &paths[0].median),
        overlay_vs_host: ratios(&paths[1].median, &paths[0].median),
        paths,
        per_request: Vec::new(),
    }
}
