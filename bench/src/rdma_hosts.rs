//! `freeflow-bench rdma --hosts 2`: RDMA between containers on two simulated hosts, through
//! each host's router and the routers' verbs transport on the host link (docs/verbs-engine.md,
//! "Across hosts"), and, in the same run, the host link's own floor: a 64-byte TCP ping-pong and
//! one TCP stream between the two hosts' namespaces.
//!
//! The hosts are built as `freeflow-bench tcp` builds them (the public `freeflow` commands; see
//! `tcp::build_hosts`), each router with `--cores`: host 0's on the first core, host 1's on the
//! last (the same one on a one-core machine). The measuring program (rdma_bench.c's two-host
//! form, built against the installed verbs headers) runs in container web on host 0, its peer
//! in db on host 1, each pinned to its host's router core, as on a real host with one core:
//! the programs poll as perftest's do, and the verbs library yields the router's core while
//! they find nothing (not a `sched_yield` per empty poll: see rdma_bench_hosts.c). The TCP
//! floor is this binary's `tcp-server` / `tcp-client` roles between the host namespaces (not
//! pinned).
//!
//! SIGINT, SIGTERM and SIGHUP stop the experiment at the next step: whatever it made is removed.

use crate::rdma::{compile, phases_of, Phase};
use crate::signals::{Interrupts, CHILD_PAUSE};
use crate::stats::median;
use crate::tcp::{self, Bench, Programs};
use freeflow_os::child::Limits;
use freeflow_proto::report::{
    Progress, RdmaHostsRatios, RdmaHostsReport, RdmaHostsSample, RouterCpuPerOp, TcpSample,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    pub reps: usize,
    pub messages: u64,
    pub samples: u64,
    pub bw_ops: u64,
    pub cm_connections: u64,
    /// Seconds of the host link's TCP stream.
    pub tcp_seconds: f64,
    /// Host h's router and program run on `cores[h]`.
    pub cores: [usize; 2],
    pub tag: Option<String>,
}

/// Where the experiment keeps the runtime directories of cluster `tag`.
pub fn work_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("freeflow-bench-rdma-hosts-{tag}"))
}

/// The peer's TCP port (in container db) and the host link server's (in host 1's namespace).
const PEER_PORT: u16 = 18515;
const LINK_PORT: u16 = 7001;
/// Longest one run of the measuring program may take before it is killed.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// How long the peer may take to exit after the measuring program finished.
const PEER_EXIT: Duration = Duration::from_secs(10);

/// The peer program; killed on drop if it is still running.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Host h's router's pid, as its daemon recorded it.
fn router_pid(work: &Path, h: usize) -> Result<u32, String> {
    let state = freeflow_proto::paths::default_state_dir(&work.join(format!("h{h}")));
    let file = state.join("router.pid");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    text.trim()
        .parse()
        .map_err(|e| format!("{}: {text:?}: {e}", file.display()))
}

/// The measuring program (`side`: "peer" or "client") in `container` of host `h`, with that
/// host's verbs library and runtime directory.
fn program_in(bench: &Bench, container: &str, h: usize, program: &Path, side: &str) -> Command {
    let dir = bench.work.join(format!("h{h}"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &bench.container(container), "env"])
        .arg(format!("FREEFLOW_DIR={}", dir.display()))
        .arg(format!("LD_LIBRARY_PATH={}", dir.join("verbs").display()))
        .arg(program)
        .arg(side);
    cmd
}

/// Runs the experiment. Like `tcp::run_experiment`, it blocks SIGINT, SIGTERM and SIGHUP for
/// the rest of the process's life (call it from the main thread before starting any other).
pub fn run(opts: &Options, progress: &mut dyn FnMut(&Progress)) -> Result<RdmaHostsReport, String> {
    let stop = Interrupts::block()?;
    let freeflow = tcp::freeflow_binary()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    crate::rdma::built_library("libibverbs.so")?;
    crate::rdma::built_library("librdmacm.so")?;
    let tag = tcp::checked_tag(opts.tag.as_deref(), "rh")?;
    let work = work_dir(&tag);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let mut bench = Bench {
        tag,
        work,
        freeflow,
        servers: Vec::new(),
    };
    let programs = Programs {
        shim: exe.with_file_name("libfsocket.so"),
        exe,
    };
    progress(&Progress::RdmaHostsBuilding {
        router_cores: opts.cores.to_vec(),
    });
    let result = measure(&mut bench, &programs, opts, &stop, progress);
    progress(&Progress::RdmaHostsRemoving);
    drop(bench);
    result.map_err(|e| match stop.check() {
        Err(_) => format!("{e}; removed everything it made"),
        Ok(()) => e,
    })
}

fn measure(
    bench: &mut Bench,
    programs: &Programs,
    opts: &Options,
    stop: &Interrupts,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RdmaHostsReport, String> {
    let program = compile(&bench.work)?;
    tcp::build_hosts(bench, Some(opts.cores), stop)?;
    let routers = [router_pid(&bench.work, 0)?, router_pid(&bench.work, 1)?];
    let host1 = bench.host(1);
    tcp::start_server(bench, programs, &host1, LINK_PORT, false, stop)?;
    // The cluster's registrations travel to both routers; give them a moment.
    stop.sleep(Duration::from_millis(1000))?;
    let mut reps = Vec::new();
    for rep in 0..opts.reps {
        progress(&Progress::RdmaHostsRepetition {
            rep: rep + 1,
            of: opts.reps,
        });
        let rdma = rdma_run(bench, &program, routers, opts, stop)?;
        let link = link_floor(bench, programs, opts, stop)?;
        reps.push(sample_of(&rdma, &link)?);
    }
    let median = median_of(&reps);
    Ok(RdmaHostsReport {
        experiment: "rdma-hosts".into(),
        hosts: 2,
        repetitions: opts.reps,
        router_cores: opts.cores.to_vec(),
        app_cores: opts.cores.to_vec(),
        messages: opts.messages,
        rtt_samples: opts.samples,
        bw_ops: opts.bw_ops,
        cm_connections: opts.cm_connections,
        tcp_stream_seconds: opts.tcp_seconds,
        ratios: RdmaHostsRatios {
            rtt_p50_vs_tcp: median.rtt_p50_us / median.tcp_rtt_p50_us,
            write_64k_vs_tcp_stream: median.write_gbytes_per_sec / median.tcp_gbytes_per_sec,
            send_mops: median.send_mops,
        },
        median,
        reps,
    })
}

/// One run of the measuring program against its peer; returns the program's output.
fn rdma_run(
    bench: &Bench,
    program: &Path,
    routers: [u32; 2],
    opts: &Options,
    stop: &Interrupts,
) -> Result<String, String> {
    let mut peer = Peer(
        program_in(bench, "db", 1, program, "peer")
            .args([PEER_PORT.to_string(), opts.cores[1].to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the peer program: {e}"))?,
    );
    let mut ready = [0u8; 6];
    if let Err(e) = peer
        .0
        .stdout
        .as_mut()
        .ok_or("no stdout")?
        .read_exact(&mut ready)
    {
        stop.check()?;
        return Err(format!(
            "the peer program did not start: {e}{}",
            peer_said(&mut peer)
        ));
    }
    let limits = Limits {
        run: Some(RUN_LIMIT),
        pause: CHILD_PAUSE,
        ..Limits::DEFAULT
    };
    let mut client = program_in(bench, "web", 0, program, "client");
    client
        .arg("10.32.0.4")
        .arg(PEER_PORT.to_string())
        .arg(opts.cores[0].to_string())
        .args(routers.map(|pid| pid.to_string()))
        .args(
            [
                opts.messages,
                opts.samples,
                opts.bw_ops,
                opts.cm_connections,
            ]
            .map(|n| n.to_string()),
        );
    let out = tcp::run_limited(&mut client, stop, &limits)
        .map_err(|e| format!("{e}{}", peer_said(&mut peer)))?;
    let deadline = Instant::now() + PEER_EXIT;
    loop {
        match peer.0.try_wait().map_err(|e| e.to_string())? {
            Some(status) if status.success() => return Ok(out),
            Some(status) => return Err(format!("the peer program failed ({status})")),
            None if Instant::now() > deadline => {
                return Err(format!(
                    "the peer program did not exit within {PEER_EXIT:?}"
                ))
            }
            None => stop.sleep(Duration::from_millis(20))?,
        }
    }
}

/// What the peer wrote on stderr, once it is killed.
fn peer_said(peer: &mut Peer) -> String {
    let _ = peer.0.kill();
    let mut text = String::new();
    if let Some(err) = peer.0.stderr.as_mut() {
        let _ = err.read_to_string(&mut text);
    }
    if text.trim().is_empty() {
        String::new()
    } else {
        format!("; peer: {}", text.trim())
    }
}

/// The host link's floor: this binary's TCP client in host 0's namespace against the server in
/// host 1's (64-byte ping-pong, one stream).
fn link_floor(
    bench: &Bench,
    programs: &Programs,
    opts: &Options,
    stop: &Interrupts,
) -> Result<TcpSample, String> {
    let out = tcp::run(
        programs
            .role_in(&bench.host(0), &bench.work, 0, false)
            .args([
                "tcp-client",
                &format!("192.168.1.2:{LINK_PORT}"),
                &opts.tcp_seconds.to_string(),
                &opts.samples.min(100_000).to_string(),
                "1",
            ]),
        stop,
    )?;
    serde_json::from_str(out.trim()).map_err(|e| format!("host link client said {out:?}: {e}"))
}

/// One repetition's numbers.
fn sample_of(rdma: &str, link: &TcpSample) -> Result<RdmaHostsSample, String> {
    let (phases, rtt_p50_us, rtt_p99_us) = phases_of(rdma)?;
    let get = |name: &str| -> Result<&Phase, String> {
        phases
            .get(name)
            .ok_or_else(|| format!("the program reported no {name} phase"))
    };
    let (send, write, rtt, bw, cm) = (
        get("send_rate")?,
        get("write_rate")?,
        get("rtt")?,
        get("write_bw")?,
        get("cm_setup")?,
    );
    let router = |h| RouterCpuPerOp {
        send_ns: send.router_ns_per_op(h),
        write_ns: write.router_ns_per_op(h),
        round_trip_ns: rtt.router_ns_per_op(h),
        write_64k_ns: bw.router_ns_per_op(h),
        cm_setup_us: cm.router_ns_per_op(h) / 1e3,
    };
    Ok(RdmaHostsSample {
        send_mops: send.mops(),
        write_mops: write.mops(),
        rtt_p50_us,
        rtt_p99_us,
        write_gbytes_per_sec: bw.gbytes_per_sec(),
        cm_setups_per_sec: cm.per_sec(),
        tcp_rtt_p50_us: link.rtt_p50_us,
        tcp_rtt_p99_us: link.rtt_p99_us,
        tcp_gbytes_per_sec: link.gbit_per_sec / 8.0,
        routers: vec![router(0), router(1)],
    })
}

/// Each number's median over the repetitions.
fn median_of(reps: &[RdmaHostsSample]) -> RdmaHostsSample {
    let m = |f: &dyn Fn(&RdmaHostsSample) -> f64| median(reps.iter().map(f));
    let router = |h: usize| {
        let r = |f: fn(&RouterCpuPerOp) -> f64| m(&|s: &RdmaHostsSample| f(&s.routers[h]));
        RouterCpuPerOp {
            send_ns: r(|c| c.send_ns),
            write_ns: r(|c| c.write_ns),
            round_trip_ns: r(|c| c.round_trip_ns),
            write_64k_ns: r(|c| c.write_64k_ns),
            cm_setup_us: r(|c| c.cm_setup_us),
        }
    };
    RdmaHostsSample {
        send_mops: m(&|s| s.send_mops),
        write_mops: m(&|s| s.write_mops),
        rtt_p50_us: m(&|s| s.rtt_p50_us),
        rtt_p99_us: m(&|s| s.rtt_p99_us),
        write_gbytes_per_sec: m(&|s| s.write_gbytes_per_sec),
        cm_setups_per_sec: m(&|s| s.cm_setups_per_sec),
        tcp_rtt_p50_us: m(&|s| s.tcp_rtt_p50_us),
        tcp_rtt_p99_us: m(&|s| s.tcp_rtt_p99_us),
        tcp_gbytes_per_sec: m(&|s| s.tcp_gbytes_per_sec),
        routers: vec![router(0), router(1)],
    }
}
