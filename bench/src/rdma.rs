//! `freeflow-bench rdma`: RDMA mode through the router's software engine, between two QPs of
//! one host. Needs root (a network namespace stands for the container), a C compiler and the
//! verbs headers (libibverbs-dev): the measuring program is C, built against the installed
//! headers and run with Freeflow's `libibverbs.so.1`, as any verbs program is.
//!
//! A private router runs on one core; the program runs pinned to another, in a registered
//! namespace, with two device contexts (two attachments, as two containers would have) and one
//! QP each, connected through the router. One application thread drives both ends so that the
//! application and the router have a core each. Phases: the message rate of 64-byte
//! SEND/RECV and of 64-byte RDMA WRITE (inline, lists of 32 with one signaled), the round trip
//! of a 64-byte SEND from one QP to the other and back (hdrhistogram p50/p99), the bandwidth of
//! 64 KiB RDMA WRITEs against a memcpy of the same buffers on the application's core in the
//! same run, and the router's CPU time per operation in each phase.
//!
//! Ctrl-C (SIGINT, SIGTERM, SIGHUP; also when `freeflow demo` forwards it): the signals are
//! blocked and collected (see `signals`), the measuring program is killed, and the namespace, the
//! router and its directory are removed before the experiment ends with an error.

use crate::router::PrivateRouter;
use crate::signals::{interrupted, Interrupts, CHILD_PAUSE};
use crate::stats::median;
use freeflow_os::child::{self, Ended, Limits};
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::identity::NetnsId;
use freeflow_proto::report::{Progress, RdmaReport, RdmaSample};
use hdrhistogram::Histogram;
use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The measuring program; it includes its two-host form (`rdma --hosts 2`) and its rdma_cm
/// phase.
const PROGRAM: &str = include_str!("rdma_bench.c");
const PROGRAM_HOSTS: &str = include_str!("rdma_bench_hosts.c");
const PROGRAM_CM: &str = include_str!("rdma_bench_cm.c");
/// Longest one run of the measuring program may take before it is killed (the defaults take a
/// few seconds).
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// How the measuring program runs: killed after [`RUN_LIMIT`] or on a termination signal, looked
/// at every [`CHILD_PAUSE`] (SIGCHLD ends the wait when it exits).
const PROGRAM_LIMITS: Limits = Limits {
    run: Some(RUN_LIMIT),
    pause: CHILD_PAUSE,
    ..Limits::DEFAULT
};

/// The namespace's overlay address (the rdma_cm phase connects to itself there).
const CONTAINER_IP: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 1);

pub struct Options {
    pub reps: usize,
    pub messages: u64,
    pub samples: u64,
    pub bw_ops: u64,
    pub cm_connections: u64,
    pub app_core: usize,
    pub router_core: usize,
}

/// One line of the measuring program's output.
#[derive(Debug, Deserialize)]
pub(crate) struct Phase {
    phase: String,
    #[serde(default)]
    ops: u64,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    router_cpu_s: f64,
    /// Host 1's router (`--hosts 2`).
    #[serde(default)]
    router1_cpu_s: f64,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    ns: Vec<u64>,
}

impl Phase {
    /// Millions of operations per second.
    pub(crate) fn mops(&self) -> f64 {
        self.ops as f64 / self.seconds / 1e6
    }

    /// Operations per second.
    pub(crate) fn per_sec(&self) -> f64 {
        self.ops as f64 / self.seconds
    }

    pub(crate) fn gbytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    /// Router `h`'s CPU time per operation, in ns.
    pub(crate) fn router_ns_per_op(&self, h: usize) -> f64 {
        let cpu = if h == 0 {
            self.router_cpu_s
        } else {
            self.router1_cpu_s
        };
        cpu * 1e9 / self.ops.max(1) as f64
    }
}

/// The program's output: its phases by name, and the round trips' p50 and p99 in µs.
pub(crate) fn phases_of(
    stdout: &str,
) -> Result<(std::collections::HashMap<String, Phase>, f64, f64), String> {
    let mut phases = std::collections::HashMap::new();
    for line in stdout.lines() {
        let p: Phase =
            serde_json::from_str(line).map_err(|e| format!("bad phase line {line:?}: {e}"))?;
        phases.insert(p.phase.clone(), p);
    }
    let samples = phases
        .get("rtt_samples")
        .ok_or("the program reported no rtt_samples phase")?;
    let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for &ns in &samples.ns {
        h.record(ns.max(1)).map_err(|e| e.to_string())?;
    }
    let (p50, p99) = (
        h.value_at_quantile(0.50) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
    );
    Ok((phases, p50, p99))
}

/// The namespace standing for the container; removed on drop.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The workspace's built `name` (`libibverbs.so`: the verbs shim; `librdmacm.so`: the rdma_cm
/// shim), next to this binary.
pub(crate) fn built_library(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let lib = exe.with_file_name(name);
    if lib.exists() {
        Ok(lib)
    } else {
        Err(format!(
            "{} not found: build the workspace (it is one of the shims)",
            lib.display()
        ))
    }
}

pub(crate) fn compile(dir: &Path) -> Result<PathBuf, String> {
    let source = dir.join("rdma_bench.c");
    let binary = dir.join("rdma_bench");
    std::fs::write(&source, PROGRAM).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("rdma_bench_hosts.c"), PROGRAM_HOSTS).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("rdma_bench_cm.c"), PROGRAM_CM).map_err(|e| e.to_string())?;
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .args(["-lrdmacm", "-libverbs"])
        .output()
        .map_err(|e| format!("cc: {e} (a C compiler is needed)"))?;
    if !out.status.success() {
        return Err(format!(
            "building the measuring program failed (libibverbs-dev and librdmacm-dev installed?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(binary)
}

/// One run of the measuring program; it is killed on a termination signal (then `Err` naming
/// it) or after [`RUN_LIMIT`].
fn one_run(
    router: &PrivateRouter,
    ns: &str,
    program: &Path,
    opts: &Options,
    mut stop: &Interrupts,
) -> Result<RdmaSample, String> {
    stop.check()?;
    let started = child::start(&mut program_command(router, ns, program, opts))
        .map_err(|e| format!("running the measuring program: {e}"))?;
    // Both pipes are read while waiting: the round-trip samples alone are a few hundred KB.
    let done =
        child::watch(started, &PROGRAM_LIMITS, &mut stop).map_err(|e| format!("wait: {e}"))?;
    match done.ended {
        Ended::Interrupted(sig) => return Err(interrupted(sig)),
        Ended::TimedOut => {
            stop.check()?;
            return Err(format!(
                "the measuring program did not finish within {RUN_LIMIT:?} and was killed"
            ));
        }
        Ended::Exited => {}
    }
    if !done.status.success() {
        // A Ctrl-C from the terminal reaches the program too; say why it failed.
        stop.check()?;
        return Err(format!(
            "the measuring program failed ({}): {}",
            done.status,
            done.stderr.trim()
        ));
    }
    sample_of(&done.stdout)
}

/// The measuring program in namespace `ns`, with Freeflow's verbs library and the router's
/// directory.
fn program_command(router: &PrivateRouter, ns: &str, program: &Path, opts: &Options) -> Command {
    // `ip netns exec` and `env` exec the program, so the child is the program itself and
    // killing it leaves nothing behind (unlike `timeout`, which runs it in a process group of
    // its own).
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "env"])
        .arg(format!("FREEFLOW_DIR={}", router.dir().display()))
        .arg(format!(
            "LD_LIBRARY_PATH={}",
            router.dir().join("verbs").display()
        ))
        .arg(program)
        .arg(router.pid().to_string())
        .arg(opts.app_core.to_string())
        .arg(opts.messages.to_string())
        .arg(opts.samples.to_string())
        .arg(opts.bw_ops.to_string())
        .arg(opts.cm_connections.to_string())
        .arg(CONTAINER_IP.to_string());
    cmd
}

/// One repetition's numbers from the program's output: one JSON [`Phase`] per line.
fn sample_of(stdout: &str) -> Result<RdmaSample, String> {
    let (phases, rtt_p50_us, rtt_p99_us) = phases_of(stdout)?;
    let get = |name: &str| {
        phases
            .get(name)
            .ok_or_else(|| format!("the program reported no {name} phase"))
    };
    let (send, write, rtt, bw, memcpy, cm) = (
        get("send_rate")?,
        get("write_rate")?,
        get("rtt")?,
        get("write_bw")?,
        get("memcpy_bw")?,
        get("cm_setup")?,
    );
    Ok(RdmaSample {
        send_mops: send.mops(),
        write_mops: write.mops(),
        rtt_p50_us,
        rtt_p99_us,
        write_gbytes_per_sec: bw.gbytes_per_sec(),
        memcpy_gbytes_per_sec: memcpy.gbytes_per_sec(),
        write_vs_memcpy: bw.gbytes_per_sec() / memcpy.gbytes_per_sec(),
        router_ns_per_send: send.router_ns_per_op(0),
        router_ns_per_write: write.router_ns_per_op(0),
        router_ns_per_round_trip: rtt.router_ns_per_op(0),
        router_ns_per_64k_write: bw.router_ns_per_op(0),
        cm_setups_per_sec: cm.per_sec(),
        router_us_per_cm_setup: cm.router_ns_per_op(0) / 1e3,
    })
}

/// Each number's median over the repetitions.
fn median_of(reps: &[RdmaSample]) -> RdmaSample {
    let m = |f: fn(&RdmaSample) -> f64| median(reps.iter().map(f));
    RdmaSample {
        send_mops: m(|s| s.send_mops),
        write_mops: m(|s| s.write_mops),
        rtt_p50_us: m(|s| s.rtt_p50_us),
        rtt_p99_us: m(|s| s.rtt_p99_us),
        write_gbytes_per_sec: m(|s| s.write_gbytes_per_sec),
        memcpy_gbytes_per_sec: m(|s| s.memcpy_gbytes_per_sec),
        write_vs_memcpy: m(|s| s.write_vs_memcpy),
        router_ns_per_send: m(|s| s.router_ns_per_send),
        router_ns_per_write: m(|s| s.router_ns_per_write),
        router_ns_per_round_trip: m(|s| s.router_ns_per_round_trip),
        router_ns_per_64k_write: m(|s| s.router_ns_per_64k_write),
        cm_setups_per_sec: m(|s| s.cm_setups_per_sec),
        router_us_per_cm_setup: m(|s| s.router_us_per_cm_setup),
    }
}

pub fn run(opts: &Options, progress: &mut dyn FnMut(&Progress)) -> Result<RdmaReport, String> {
    // Before any thread is started (see `signals`).
    let stop = Interrupts::block()?;
    progress(&Progress::RdmaStarting {
        router_core: opts.router_core,
    });
    let router = PrivateRouter::start("rdma", &opts.router_core.to_string())?;
    let verbs = router.dir().join("verbs");
    std::fs::create_dir_all(&verbs).map_err(|e| e.to_string())?;
    // As `freeflow up` installs them.
    for (built, installed) in [
        ("libibverbs.so", "libibverbs.so.1"),
        ("librdmacm.so", "librdmacm.so.1"),
    ] {
        std::fs::copy(built_library(built)?, verbs.join(installed))
            .map_err(|e| format!("installing {installed}: {e}"))?;
    }
    let program = compile(router.dir())?;
    let name = format!("ffrdma-{}", std::process::id());
    let status = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if !status.success() {
        return Err("ip netns add failed (run as root)".into());
    }
    let ns = Namespace(name);
    let netns =
        NetnsId::of_path(&Path::new("/run/netns").join(&ns.0)).map_err(|e| e.to_string())?;
    router.set_containers(vec![ContainerEntry {
        name: "rdma".into(),
        tenant: "bench".into(),
        ip: CONTAINER_IP,
        netns,
    }])?;
    let mut reps = Vec::new();
    for rep in 0..opts.reps {
        stop.check()?;
        progress(&Progress::RdmaRepetition {
            rep: rep + 1,
            of: opts.reps,
        });
        reps.push(one_run(&router, &ns.0, &program, opts, &stop)?);
    }
    progress(&Progress::RdmaStopping);
    let median = median_of(&reps);
    drop(ns);
    drop(router);
    Ok(RdmaReport {
        experiment: "rdma".into(),
        repetitions: opts.reps,
        app_core: opts.app_core,
        router_core: opts.router_core,
        messages: opts.messages,
        rtt_samples: opts.samples,
        bw_ops: opts.bw_ops,
        cm_connections: opts.cm_connections,
        median,
        reps,
    })
}
