//! `freeflow demo`: Freeflow on this machine in one command, for a newcomer.
//!
//! 1. Builds a simulated two-host cluster (network namespaces, VXLAN overlay; see `topology`),
//!    starts Freeflow on both hosts with the public commands (`freeflow up`, `container add`),
//!    shows each container attaching to its own host's router, a stranger refused, and
//!    `freeflow status`; then removes that cluster.
//! 2. Runs the TCP comparison (host link, overlay, Freeflow) by starting the sibling binary
//!    `freeflow-bench tcp --json`, which builds and removes a second cluster of its own. Its
//!    progress lines become ours; its JSON report becomes the table. Running it as a program
//!    keeps this crate independent of the bench crate.
//! 3. Runs the RDMA comparison on this host the same way, with `freeflow-bench rdma --json`: a
//!    private router and two QPs through its software verbs engine; the table sets message rate,
//!    round trip and bandwidth against the project's targets and against memcpy in the same run.
//!    It needs a C compiler and the verbs headers (its measuring program is C); without them the
//!    demo says the part is skipped and why, and still succeeds (`--part rdma` fails instead).
//!
//! `--part tcp` runs 1 and 2, `--part rdma` only 3.
//!
//! Progress goes to stderr, one line per step (`[3/16] ...`); results go to stdout.
//!
//! Ctrl-C: SIGINT, SIGTERM and SIGHUP are blocked and read from a signalfd, so they end the demo
//! at the next step instead of killing it with everything in place. A child that is running gets
//! the signal (forwarded, and from the terminal anyway: it is in our process group);
//! `freeflow-bench` handles it by removing its cluster. Whatever the demo made itself is removed
//! on every way out, and afterwards it checks that no namespace of either cluster is left.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::supervise::{self, os, signal_name};
use freeflow_testbed::{self as topology, Cluster, ClusterSpec, TopologyError};

/// Overlay prefix of both simulated clusters.
const VNET: &str = "10.32.0.0/12";
/// The attach part's containers: name, host, overlay address.
const CONTAINERS: [(&str, usize, Ipv4Addr); 2] = [
    ("web", 0, Ipv4Addr::new(10, 32, 0, 2)),
    ("db", 1, Ipv4Addr::new(10, 32, 0, 4)),
];
/// Tenant of the demo's containers.
const TENANT: &str = "blue";
/// Round trips per attach probe: enough for a stable median, a few milliseconds.
const PROBE_SAMPLES: &str = "20000";
/// Per-repetition sizes of the TCP round-trip and setup measurements (those of scripts/demo.sh):
/// about one second per path on this VM, so the default demo takes about a minute.
const TCP_SAMPLES: &str = "10000";
const TCP_SETUPS: &str = "500";
/// How long a container registration may take to reach its router before the probe counts as
/// failed (`container add` already waits for the daemon; this covers the router's table push).
const ATTACH_RETRY_FOR: Duration = Duration::from_secs(3);
/// After a signal, how long a child may take to finish its own clean-up before it is killed
/// (freeflow-bench stops two daemons and removes its namespaces: a few seconds).
const CHILD_CLEANUP_LIMIT: Duration = Duration::from_secs(60);
/// After a child exited, how long to wait for its pipes to close (a grandchild that survived
/// may hold them; we stop reading rather than hang).
const PIPE_GRACE: Duration = Duration::from_secs(2);
/// Sizes of one RDMA repetition (`freeflow-bench rdma`): about a second on this VM, so three
/// repetitions add well under 20 s. Big enough for the router's CPU time, which the kernel counts
/// in 10 ms ticks: the shortest phase (the round trips) spans about ten of them.
const RDMA_MESSAGES: &str = "2000000";
const RDMA_SAMPLES: &str = "100000";
const RDMA_BW_OPS: &str = "100000";
/// The project's RDMA targets (the issue): messages per second per router core, 3x what the
/// original Freeflow reached on real hardware, and the round trip.
const RDMA_TARGET_MOPS: f64 = 4.2;
const ORIGINAL_FREEFLOW_MOPS: f64 = 1.4;
const RDMA_TARGET_RTT_US: f64 = 2.0;
/// What to install when the RDMA part cannot run.
const RDMA_INSTALL_HINT: &str = "install build-essential libibverbs-dev";
/// Steps of the attach part: build, up, register, attach + status, remove.
const ATTACH_STEPS: usize = 5;
/// Fixed steps of the TCP comparison (build, remove) and of the RDMA one (start, stop); each
/// repetition adds one per TCP path and one for RDMA.
const TCP_FIXED_STEPS: usize = 2;
const RDMA_FIXED_STEPS: usize = 2;

/// Which parts of the demo to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The simulated cluster, then the TCP and the RDMA comparisons
    All,
    /// The simulated cluster (attachments, status) and the TCP comparison
    Tcp,
    /// Only the RDMA comparison on this host
    Rdma,
}

/// `freeflow demo` options.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Which part to run
    #[arg(long, value_enum, default_value_t = Part::All)]
    part: Part,
    /// Repetitions of each TCP and RDMA measurement; the tables show medians
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    reps: u32,
    /// Seconds of each one-stream throughput measurement
    #[arg(long, value_name = "S", default_value_t = 2.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Print one JSON object (clusters, attachments, status, TCP and RDMA reports) instead of
    /// text
    #[arg(long)]
    json: bool,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 60.0 => Ok(s),
        _ => Err(format!("{text:?} is not a number of seconds in (0, 60]")),
    }
}

/// Errors of the demo; each prints as one line after `freeflow: demo: `.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The demo builds network namespaces.
    #[error(
        "the demo builds network namespaces and must run as root (effective uid is {euid}): \
         sudo {exe} demo"
    )]
    NotRoot {
        /// Our effective uid.
        euid: u32,
        /// How we were started, for the hint.
        exe: String,
    },
    /// A program or library of the workspace is not built.
    #[error("{} not found: build the whole workspace first (cargo build --release --workspace)", .0.display())]
    Missing(PathBuf),
    /// SIGINT, SIGTERM or SIGHUP; everything was removed.
    #[error("interrupted by {}; removed everything the demo made", signal_name(*.0))]
    Interrupted(i32),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Building or removing the simulated cluster.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A command of the demo failed.
    #[error("`{command}` failed ({status}): {said}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// Its last words on stderr.
        said: String,
    },
    /// `--part rdma` on a machine that cannot build the RDMA measuring program.
    #[error("the RDMA comparison cannot run here: {0}")]
    RdmaUnavailable(String),
    /// Something did not behave as Freeflow should (e.g. a stranger was let in).
    #[error("{0}")]
    Unexpected(String),
    /// Clean-up left something behind.
    #[error("clean-up incomplete: {}", .0.join("; "))]
    Cleanup(Vec<String>),
}

impl DemoError {
    /// The signal that ended the demo, if one did (the CLI exits with 128 + its number).
    pub fn signal(&self) -> Option<i32> {
        match self {
            DemoError::Interrupted(sig) => Some(*sig),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

// ---------------------------------------------------------------- signals and progress

/// The termination signals, blocked and readable from a signalfd; remembers the first one.
struct Interrupt {
    signals: os::SignalFd,
    received: Cell<Option<i32>>,
}

impl Interrupt {
    /// Blocks SIGINT, SIGTERM and SIGHUP. Called before the demo starts any thread, so no thread
    /// can take one with the default action; children get an empty mask again (std resets it).
    fn install() -> Result<Interrupt, DemoError> {
        Ok(Interrupt {
            signals: os::SignalFd::block(&os::TERMINATION_SIGNALS)
                .map_err(io_err("cannot block SIGINT/SIGTERM/SIGHUP"))?,
            received: Cell::new(None),
        })
    }

    /// Waits up to `timeout` for a signal; returns one that arrived during this call.
    fn poll(&self, timeout: Duration) -> Result<Option<i32>, DemoError> {
        let ready = os::poll_readable(&[self.signals.as_fd()], timeout)
            .map_err(io_err("waiting for signals"))?;
        if !ready[0] {
            return Ok(None);
        }
        let first = self
            .signals
            .drain()
            .map_err(io_err("reading the signalfd"))?
            .first()
            .copied();
        if self.received.get().is_none() {
            self.received.set(first);
        }
        Ok(first)
    }

    /// `Err(Interrupted)` once a signal has arrived, now or earlier.
    fn check(&self) -> Result<(), DemoError> {
        self.poll(Duration::ZERO)?;
        match self.received.get() {
            Some(sig) => Err(DemoError::Interrupted(sig)),
            None => Ok(()),
        }
    }

    fn interrupted(&self) -> bool {
        self.check().is_err()
    }
}

/// One numbered line per step on stderr.
struct Progress {
    done: usize,
    total: usize,
}

impl Progress {
    fn step(&mut self, what: impl std::fmt::Display) {
        self.done += 1;
        // A step count that grows past the estimate (a changed freeflow-bench) stays readable.
        self.total = self.total.max(self.done);
        let _ = writeln!(io::stderr(), "[{}/{}] {what}", self.done, self.total);
    }

    fn note(&self, what: impl std::fmt::Display) {
        let _ = writeln!(io::stderr(), "      {what}");
    }
}

// ---------------------------------------------------------------- children

/// A finished child.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// Its stdout if it succeeded, else [`DemoError::CommandFailed`].
    fn ok(self, command: &str) -> Result<String, DemoError> {
        if self.status.success() {
            return Ok(self.stdout);
        }
        Err(DemoError::CommandFailed {
            command: command.to_owned(),
            status: supervise::exit_reason(self.status),
            said: last_words(&self.stderr),
        })
    }
}

/// The last non-empty line a program wrote, for an error message.
fn last_words(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(nothing on stderr)")
        .to_owned()
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

enum Event {
    Stdout(String),
    StderrLine(String),
    StderrClosed,
}

/// What [`run_child`] tells its caller while the child runs.
enum Seen<'a> {
    /// The child started with this pid.
    Started(u32),
    /// A line the child wrote to stderr.
    Line(&'a str),
    /// A termination signal arrived and was forwarded to the child.
    Signal(i32),
}

/// Runs `cmd` to completion, telling `seen` each stderr line as it comes. A signal that
/// arrives meanwhile is forwarded to the child (which then cleans up and exits) and ends the
/// demo once the child is gone: `Err(Interrupted)`. A child that takes longer than
/// [`CHILD_CLEANUP_LIMIT`] after the signal is killed.
fn run_child(
    cmd: &mut Command,
    stop: &Interrupt,
    seen: &mut dyn FnMut(Seen<'_>),
) -> Result<Finished, DemoError> {
    stop.check()?;
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("cannot run `{command}`")))?;
    seen(Seen::Started(child.id()));
    // Readers in threads (they inherit the blocked signals) so that the main thread can watch
    // the signalfd and the child at the same time.
    let (tx, rx) = mpsc::channel();
    if let Some(mut out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = out.read_to_end(&mut text);
            let _ = tx.send(Event::Stdout(String::from_utf8_lossy(&text).into_owned()));
        });
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::StderrLine(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::StderrClosed);
        });
    }
    drop(tx);

    let mut stdout = None;
    let mut stderr = String::new();
    let mut stderr_closed = false;
    let mut exited: Option<(ExitStatus, Instant)> = None;
    let mut signalled: Option<Instant> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Event::Stdout(text)) => stdout = Some(text),
                Ok(Event::StderrLine(line)) => {
                    seen(Seen::Line(&line));
                    stderr.push_str(&line);
                    stderr.push('\n');
                }
                Ok(Event::StderrClosed) => stderr_closed = true,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    stdout.get_or_insert_with(String::new);
                    stderr_closed = true;
                    break;
                }
            }
        }
        if exited.is_none() {
            if let Some(status) = child
                .try_wait()
                .map_err(io_err(format!("waiting for `{command}`")))?
            {
                exited = Some((status, Instant::now()));
            }
        }
        if let Some((status, at)) = exited {
            if (stdout.is_some() && stderr_closed) || at.elapsed() > PIPE_GRACE {
                stop.check()?;
                return Ok(Finished {
                    status,
                    stdout: stdout.unwrap_or_default(),
                    stderr,
                });
            }
        }
        // The wait for signals is also the loop's pause.
        if let Some(sig) = stop.poll(Duration::from_millis(20))? {
            if exited.is_none() && signalled.is_none() {
                signalled = Some(Instant::now());
                // Not reaped yet (try_wait said so), so the pid is still this child's.
                let _ = os::send_signal(child.id() as i32, sig);
                seen(Seen::Signal(sig));
            }
        }
        if let Some(at) = signalled {
            if exited.is_none() && at.elapsed() > CHILD_CLEANUP_LIMIT {
                let _ = child.kill();
            }
        }
    }
}

/// Runs `cmd`, which must succeed; returns its stdout.
fn run_ok(cmd: &mut Command, stop: &Interrupt) -> Result<String, DemoError> {
    let command = describe(cmd);
    run_child(cmd, stop, &mut |_| ())?.ok(&command)
}

// ---------------------------------------------------------------- part 1: attach

/// Everything the attach part made; [`Made::remove`] (or drop) takes it all away.
struct Made {
    freeflow: PathBuf,
    cluster: Option<Cluster>,
    work: PathBuf,
    work_created: bool,
    /// Runtime directories `freeflow up` was run for (also if it failed half way).
    hosts_up: Vec<PathBuf>,
}

impl Made {
    /// Stops the daemons, removes the cluster and the directory; returns what went wrong.
    fn remove(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for dir in self.hosts_up.drain(..) {
            // In a process group of its own: a second Ctrl-C must not cut the clean-up short.
            let out = Command::new(&self.freeflow)
                .arg("down")
                .arg("--dir")
                .arg(&dir)
                .stdin(Stdio::null())
                .process_group(0)
                .output();
            match out {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "freeflow down --dir {}: {}",
                    dir.display(),
                    last_words(&String::from_utf8_lossy(&out.stderr))
                )),
                Err(e) => problems.push(format!("freeflow down --dir {}: {e}", dir.display())),
            }
        }
        // Teardown also kills whatever still runs in the namespaces (a daemon `down` missed).
        if let Some(cluster) = self.cluster.take() {
            let tag = cluster.tag().to_owned();
            if let Err(e) = cluster.teardown() {
                problems.push(format!("{e} (try `freeflow cluster down --tag {tag}`)"));
            }
        }
        if std::mem::take(&mut self.work_created) {
            if let Err(e) = std::fs::remove_dir_all(&self.work) {
                problems.push(format!("removing {}: {e}", self.work.display()));
            }
        }
        problems
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        // Only reached on a panic; `remove` is the reporting variant.
        let _ = self.remove();
    }
}

/// One container's successful attachment (`freeflow-bench probe --json`).
#[derive(Debug, Serialize, Deserialize)]
struct Probe {
    container: String,
    tenant: String,
    ip: String,
    shard: u16,
    rtt_p50_ns: u64,
    rtt_p99_ns: u64,
}

#[derive(Debug)]
struct Attached {
    probes: Vec<(usize, Probe)>,
    stranger_refused: String,
    status_text: String,
    status_json: Value,
}

struct Programs {
    freeflow: PathBuf,
    bench: PathBuf,
}

fn attach_part(
    made: &mut Made,
    tag: &str,
    programs: &Programs,
    stop: &Interrupt,
    progress: &mut Progress,
) -> Result<Attached, DemoError> {
    let freeflow = programs.freeflow.as_path();
    progress.step(format_args!(
        "building a simulated cluster (namespaces ff-{tag}-*): host 0 (192.168.1.1) and host 1 \
         (192.168.1.2) joined by a link, a VXLAN overlay {VNET}, containers web on host 0 and \
         db on host 1"
    ));
    let mut cluster = Cluster::create(ClusterSpec::new(tag, 2))?;
    for (name, host, ip) in CONTAINERS {
        cluster.add_container(host, name, ip, 12)?;
    }
    let hosts: Vec<String> = cluster.hosts().iter().map(|h| h.netns.clone()).collect();
    let netns_of: Vec<PathBuf> = CONTAINERS
        .iter()
        .map(|(name, ..)| cluster.container(name).map(|c| c.netns_path.clone()))
        .collect::<Result<_, _>>()?;
    made.cluster = Some(cluster);
    std::fs::create_dir(&made.work)
        .and_then(|()| std::fs::set_permissions(&made.work, std::fs::Permissions::from_mode(0o755)))
        .map_err(io_err(format!("cannot create {}", made.work.display())))?;
    made.work_created = true;
    stop.check()?;

    progress.step("starting Freeflow on both hosts (freeflow up; one registry file for both)");
    let dirs: Vec<PathBuf> = (0..2).map(|h| made.work.join(format!("h{h}"))).collect();
    let registry = format!("file:{}", made.work.join("registry.json").display());
    for (h, netns) in hosts.iter().enumerate() {
        made.hosts_up.push(dirs[h].clone());
        run_ok(
            topology::command_in(netns, &freeflow.to_string_lossy())
                .arg("up")
                .arg("--dir")
                .arg(&dirs[h])
                .args(["--host-ip", &topology::host_ip(h).to_string()])
                .args(["--vnet-prefix", VNET, "--registry", &registry]),
            stop,
        )?;
    }

    progress.step(format_args!(
        "registering the containers (freeflow container add, tenant {TENANT})"
    ));
    for ((name, host, ip), netns) in CONTAINERS.iter().zip(&netns_of) {
        run_ok(
            Command::new(freeflow)
                .args(["container", "add", name, "--dir"])
                .arg(&dirs[*host])
                .arg("--netns")
                .arg(netns)
                .args(["--ip", &ip.to_string(), "--tenant", TENANT]),
            stop,
        )?;
    }

    progress.step(
        "each container attaches to its own host's router; a stranger (a process in host 1's \
         own namespace) tries too",
    );
    let mut probes = Vec::new();
    for (name, host, _) in CONTAINERS {
        let netns = topology::container_netns(tag, name);
        let out = retry_for(ATTACH_RETRY_FOR, stop, || {
            run_child(
                topology::command_in(&netns, &programs.bench.to_string_lossy())
                    .arg("probe")
                    .arg(&dirs[host])
                    .args(["--json", "--samples", PROBE_SAMPLES]),
                stop,
                &mut |_| (),
            )
        })?;
        let probe: Probe = serde_json::from_str(out.trim()).map_err(|e| {
            DemoError::Unexpected(format!("freeflow-bench probe printed {out:?}: {e}"))
        })?;
        probes.push((host, probe));
    }
    let stranger = run_child(
        topology::command_in(&hosts[1], &programs.bench.to_string_lossy())
            .arg("probe")
            .arg(&dirs[1])
            .args(["--samples", "10"]),
        stop,
        &mut |_| (),
    )?;
    if stranger.status.success() {
        return Err(DemoError::Unexpected(format!(
            "host 1's own namespace is not a registered container, yet its router let it attach: {}",
            stranger.stdout.trim()
        )));
    }
    let stranger_refused = last_words(&stranger.stderr)
        .trim_start_matches("freeflow-bench: ")
        .to_owned();
    let status_text = run_ok(
        Command::new(freeflow)
            .arg("status")
            .arg("--dir")
            .arg(&dirs[0]),
        stop,
    )?;
    let status_json = run_ok(
        Command::new(freeflow)
            .arg("status")
            .arg("--dir")
            .arg(&dirs[0])
            .arg("--json"),
        stop,
    )?;
    let status_json = serde_json::from_str(status_json.trim()).unwrap_or(Value::Null);
    Ok(Attached {
        probes,
        stranger_refused,
        status_text,
        status_json,
    })
}

/// Runs `attempt` until it succeeds or `limit` has passed (the last failure is the error); a
/// registration can take a moment to reach the router.
fn retry_for(
    limit: Duration,
    stop: &Interrupt,
    mut attempt: impl FnMut() -> Result<Finished, DemoError>,
) -> Result<String, DemoError> {
    let deadline = Instant::now() + limit;
    loop {
        let finished = attempt()?;
        if finished.status.success() || Instant::now() >= deadline {
            return finished.ok("freeflow-bench probe");
        }
        if stop.poll(Duration::from_millis(200))?.is_some() {
            stop.check()?;
        }
    }
}

fn print_attached(tag: &str, a: &Attached) {
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "\nSimulated cluster {tag}: two hosts, Freeflow on both, containers of tenant {TENANT}"
    );
    for (host, p) in &a.probes {
        let _ = writeln!(
            out,
            "  {:<5} ({}, host {host}) attached to its host's router (shard {}): round trip \
             through shared memory p50 {} ns, p99 {} ns",
            p.container, p.ip, p.shard, p.rtt_p50_ns, p.rtt_p99_ns
        );
    }
    let _ = writeln!(
        out,
        "  a stranger (host 1's own namespace, not a registered container) was refused: {}",
        a.stranger_refused
    );
    let _ = writeln!(out, "\n$ freeflow status   (host 0)");
    for line in a.status_text.lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = out.flush();
}

// ---------------------------------------------------------------- part 2: TCP

#[derive(Debug, Deserialize)]
struct TcpReport {
    repetitions: usize,
    stream_seconds: f64,
    paths: Vec<TcpPath>,
    freeflow_vs_host: Ratios,
    overlay_vs_host: Ratios,
}

#[derive(Debug, Deserialize)]
struct TcpPath {
    path: String,
    median: TcpSample,
}

#[derive(Debug, Deserialize)]
struct TcpSample {
    gbit_per_sec: f64,
    rtt_p50_us: f64,
    setup_p50_us: f64,
    conns_per_sec: f64,
}

#[derive(Debug, Deserialize)]
struct Ratios {
    throughput: f64,
    rtt_p50: f64,
    setup_p50: f64,
}

/// What the table calls freeflow-bench's path names.
fn path_label(path: &str) -> &str {
    match path {
        "host" => "host link",
        "overlay" => "overlay (VXLAN)",
        "freeflow" => "Freeflow",
        other => other,
    }
}

/// Our step line for one of freeflow-bench's progress lines (`None`: not a progress line).
fn tcp_step(line: &str, tag: &str) -> Option<String> {
    let what = line.strip_prefix("[freeflow-bench] tcp: ")?;
    Some(if what.starts_with("building") {
        format!(
            "TCP comparison: building a second two-host cluster (namespaces ff-{tag}-*), \
             Freeflow on both, a server on host 1 for each path"
        )
    } else if let Some(rest) = what.strip_prefix("repetition ") {
        match rest.split_once(": ") {
            Some((count, path)) => format!(
                "TCP repetition {count}: {} (stream, round trips, connection setups)",
                path_label(path)
            ),
            None => format!("TCP {what}"),
        }
    } else if what.starts_with("removing") {
        "TCP comparison: removing its cluster".to_owned()
    } else {
        format!("TCP: {what}")
    })
}

fn tcp_part(
    tag: &str,
    args: &DemoArgs,
    programs: &Programs,
    stop: &Interrupt,
    progress: &mut Progress,
) -> Result<Value, DemoError> {
    let mut cmd = Command::new(&programs.bench);
    cmd.args(["tcp", "--json", "--reps", &args.reps.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args([
            "--samples",
            TCP_SAMPLES,
            "--setups",
            TCP_SETUPS,
            "--tag",
            tag,
        ]);
    let command = describe(&cmd);
    let finished = run_child(&mut cmd, stop, &mut |seen| match seen {
        Seen::Line(line) => {
            if let Some(step) = tcp_step(line, tag) {
                progress.step(step);
            } else if !line.starts_with("freeflow-bench: ") {
                // (Its own error line is reported below, with its exit status.)
                progress.note(line);
            }
        }
        Seen::Signal(sig) => progress.note(format_args!(
            "{}: freeflow-bench stops and removes its cluster",
            signal_name(sig)
        )),
        Seen::Started(_) => {}
    });
    // Whatever happened to freeflow-bench (killed after the limit, crashed), nothing of its
    // cluster may stay: its namespaces (and the processes in them) and its directory.
    let leftovers = remove_bench_leftovers(tag);
    let out = finished?.ok(&command)?;
    leftovers?;
    serde_json::from_str(out.trim()).map_err(|e| {
        DemoError::Unexpected(format!(
            "freeflow-bench tcp printed no report ({e}): {out:?}"
        ))
    })
}

/// Removes what a freeflow-bench that could not clean up left of cluster `tag`.
fn remove_bench_leftovers(tag: &str) -> Result<(), DemoError> {
    let mut problems = Vec::new();
    match topology::netns_of_tag(tag) {
        Ok(left) if left.is_empty() => {}
        Ok(_) => {
            if let Err(e) = topology::teardown_tag(tag) {
                problems.push(e.to_string());
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    // freeflow-bench's directory for the cluster (bench/src/tcp.rs `work_dir`).
    let work = std::env::temp_dir().join(format!("freeflow-bench-tcp-{tag}"));
    if work.exists() {
        if let Err(e) = std::fs::remove_dir_all(&work) {
            problems.push(format!("removing {}: {e}", work.display()));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Cleanup(problems))
    }
}

/// `8,123`.
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_table(report: &TcpReport) {
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "\nTCP between containers on two simulated hosts (medians of {} repetition{}, {} s \
         streams)",
        report.repetitions,
        if report.repetitions == 1 { "" } else { "s" },
        report.stream_seconds
    );
    let _ = writeln!(
        out,
        "{:<17}{:>14}{:>17}{:>19}{:>15}",
        "path", "throughput", "round trip p50", "connection setup", "connections/s"
    );
    for p in &report.paths {
        let m = &p.median;
        let _ = writeln!(
            out,
            "{:<17}{:>14}{:>17}{:>19}{:>15}",
            path_label(&p.path),
            format!("{:.1} Gbit/s", m.gbit_per_sec),
            format!("{:.0} µs", m.rtt_p50_us),
            format!("{:.0} µs", m.setup_p50_us),
            thousands(m.conns_per_sec)
        );
    }
    let o = &report.overlay_vs_host;
    let f = &report.freeflow_vs_host;
    let _ = writeln!(
        out,
        "\nOn the overlay, containers get {:.2}x the host link's throughput and {:.2}x its round \
         trip time.",
        o.throughput, o.rtt_p50
    );
    let _ = writeln!(
        out,
        "With Freeflow, the same containers keep their overlay addresses and get {:.2}x and {:.2}x; \
         opening a connection takes {:.2}x as long as on the host link.",
        f.throughput, f.rtt_p50, f.setup_p50
    );
    let _ = out.flush();
}

// ---------------------------------------------------------------- part 3: RDMA

/// What the RDMA table reads of `freeflow-bench rdma --json`.
#[derive(Debug, Deserialize)]
struct RdmaReport {
    repetitions: usize,
    app_core: usize,
    router_core: usize,
    median: RdmaSample,
}

#[derive(Debug, Deserialize)]
struct RdmaSample {
    send_mops: f64,
    write_mops: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    write_gbytes_per_sec: f64,
    memcpy_gbytes_per_sec: f64,
    write_vs_memcpy: f64,
    router_ns_per_send: f64,
    router_ns_per_write: f64,
    router_ns_per_round_trip: f64,
    router_ns_per_64k_write: f64,
}

/// `Ok` if freeflow-bench can build its RDMA measuring program here: a C compiler (`cc`) and the
/// verbs headers and library (libibverbs-dev). Else why not, with what to install. Compiles and
/// links a two-line program, as freeflow-bench will (a tenth of a second).
fn rdma_prerequisites() -> Result<(), String> {
    let output =
        std::env::temp_dir().join(format!("freeflow-demo-verbs-check-{}", std::process::id()));
    let child = Command::new("cc")
        .args(["-x", "c", "-", "-o"])
        .arg(&output)
        .arg("-libverbs")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("no C compiler (cc) found; {RDMA_INSTALL_HINT}"));
        }
        Err(e) => return Err(format!("cannot run cc ({e}); {RDMA_INSTALL_HINT}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A failed write shows as cc's error below.
        let _ = stdin.write_all(
            b"#include <infiniband/verbs.h>\n\
              int main(void) { return ibv_get_device_list(0) != 0; }\n",
        );
    }
    let result = child.wait_with_output();
    let _ = std::fs::remove_file(&output);
    let out = result.map_err(|e| format!("waiting for cc: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(if said.contains("verbs.h") {
        format!("the verbs headers (infiniband/verbs.h) are not installed; {RDMA_INSTALL_HINT}")
    } else if said.contains("ibverbs") {
        format!("the verbs library (libibverbs.so) is not installed; {RDMA_INSTALL_HINT}")
    } else {
        format!(
            "cc cannot build a verbs program ({}); {RDMA_INSTALL_HINT}",
            last_words(&said)
        )
    })
}

/// freeflow-bench rdma's namespace and router directory, named after its pid (bench/src/rdma.rs
/// and bench/src/router.rs).
fn rdma_netns(bench_pid: u32) -> String {
    format!("ffrdma-{bench_pid}")
}

fn rdma_dir(bench_pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("freeflow-bench-rdma-{bench_pid}"))
}

/// Our step line for one of freeflow-bench rdma's progress lines (`None`: not a progress line).
fn rdma_step(line: &str, netns: &str) -> Option<String> {
    let what = line.strip_prefix("[freeflow-bench] rdma: ")?;
    Some(
        if let Some(core) = what.strip_prefix("starting a private router on core ") {
            let core = core.split_whitespace().next().unwrap_or("?");
            format!(
                "RDMA comparison on this host: a private router on core {core}; a C program built \
             against the verbs headers runs in namespace {netns} (a registered container) \
             with two QPs connected through the router"
            )
        } else if let Some(rest) = what.strip_prefix("repetition ") {
            match rest.split_once(" of ") {
                Some((done, total)) => format!(
                    "RDMA repetition {done}/{total}: 64 B SEND/RECV and RDMA WRITE message rates, \
                 SEND round trips, 64 KiB RDMA WRITE bandwidth and memcpy"
                ),
                None => format!("RDMA {what}"),
            }
        } else if what.starts_with("stopping") {
            format!("RDMA comparison: stopping its router and removing namespace {netns}")
        } else {
            format!("RDMA: {what}")
        },
    )
}

fn rdma_part(
    args: &DemoArgs,
    programs: &Programs,
    stop: &Interrupt,
    progress: &mut Progress,
) -> Result<Value, DemoError> {
    let mut cmd = Command::new(&programs.bench);
    cmd.args(["rdma", "--json", "--reps", &args.reps.to_string()])
        .args(["--messages", RDMA_MESSAGES, "--samples", RDMA_SAMPLES])
        .args(["--bw-ops", RDMA_BW_OPS]);
    let command = describe(&cmd);
    let mut bench_pid = None;
    let finished = run_child(&mut cmd, stop, &mut |seen| match seen {
        Seen::Started(pid) => bench_pid = Some(pid),
        Seen::Line(line) => {
            let netns = rdma_netns(bench_pid.unwrap_or_default());
            if let Some(step) = rdma_step(line, &netns) {
                progress.step(step);
            } else if !line.starts_with("freeflow-bench: ") {
                progress.note(line);
            }
        }
        Seen::Signal(sig) => progress.note(format_args!(
            "{}: freeflow-bench stops its router and removes its namespace",
            signal_name(sig)
        )),
    });
    let leftovers = bench_pid.map_or(Ok(()), remove_rdma_leftovers);
    let out = finished?.ok(&command)?;
    leftovers?;
    serde_json::from_str(out.trim()).map_err(|e| {
        DemoError::Unexpected(format!(
            "freeflow-bench rdma printed no report ({e}): {out:?}"
        ))
    })
}

/// Removes what a freeflow-bench rdma (pid `bench_pid`) that could not clean up left: the
/// program in its namespace, the namespace, its router and the router's directory.
fn remove_rdma_leftovers(bench_pid: u32) -> Result<(), DemoError> {
    let mut problems = Vec::new();
    let netns = rdma_netns(bench_pid);
    match topology::list_netns() {
        Ok(all) if all.contains(&netns) => {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &netns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = os::send_signal(pid, libc::SIGKILL);
                    }
                }
            }
            match Command::new("ip").args(["netns", "del", &netns]).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "ip netns del {netns}: {}",
                    last_words(&String::from_utf8_lossy(&out.stderr))
                )),
                Err(e) => problems.push(format!("ip netns del {netns}: {e}")),
            }
        }
        Ok(_) => {}
        Err(e) => problems.push(e.to_string()),
    }
    let dir = rdma_dir(bench_pid);
    for pid in routers_serving(&dir) {
        let _ = os::send_signal(pid, libc::SIGKILL);
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Cleanup(problems))
    }
}

/// Processes started with `--dir DIR` (a router freeflow-bench started and could not stop).
fn routers_serving(dir: &std::path::Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2).any(|w| w[0] == b"--dir" && w[1] == dir)
        })
        .collect()
}

/// Width of the notes under a table.
const NOTE_WIDTH: usize = 95;

/// `text` in lines of at most `width` characters, broken between words.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// `1.36x`: a ratio for the comparison column.
fn times(ratio: f64) -> String {
    format!("{ratio:.2}x")
}

fn print_rdma_table(report: &RdmaReport) {
    let m = &report.median;
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "\nRDMA between two QPs on this host, through Freeflow's router: its software verbs \
         engine, no RDMA NIC\n(medians of {} repetition{}; application on core {}, router on \
         core {})",
        report.repetitions,
        if report.repetitions == 1 { "" } else { "s" },
        report.app_core,
        report.router_core
    );
    let row = |what: &str, value: String, cpu: Option<f64>, compared: String| {
        format!(
            "{what:<30}{value:>11}{:>16}   {compared}",
            cpu.map(|ns| format!("{ns:.0} ns")).unwrap_or_default()
        )
    };
    let rows = [
        format!(
            "{:<30}{:>11}{:>16}   {}",
            "", "measured", "router CPU/op", "compared with"
        ),
        row(
            "64 B SEND/RECV message rate",
            format!("{:.2} M/s", m.send_mops),
            Some(m.router_ns_per_send),
            format!(
                "{} the {RDMA_TARGET_MOPS} M/s target",
                times(m.send_mops / RDMA_TARGET_MOPS)
            ),
        ),
        row(
            "64 B RDMA WRITE message rate",
            format!("{:.2} M/s", m.write_mops),
            Some(m.router_ns_per_write),
            format!(
                "{} the {RDMA_TARGET_MOPS} M/s target",
                times(m.write_mops / RDMA_TARGET_MOPS)
            ),
        ),
        row(
            "64 B SEND round trip p50",
            format!("{:.2} µs", m.rtt_p50_us),
            Some(m.router_ns_per_round_trip),
            format!(
                "{} the {RDMA_TARGET_RTT_US} µs target",
                times(m.rtt_p50_us / RDMA_TARGET_RTT_US)
            ),
        ),
        row(
            "64 B SEND round trip p99",
            format!("{:.2} µs", m.rtt_p99_us),
            None,
            format!(
                "{} the {RDMA_TARGET_RTT_US} µs target",
                times(m.rtt_p99_us / RDMA_TARGET_RTT_US)
            ),
        ),
        row(
            "64 KiB RDMA WRITE bandwidth",
            format!("{:.1} GB/s", m.write_gbytes_per_sec),
            Some(m.router_ns_per_64k_write),
            format!(
                "{} memcpy on one core ({:.1} GB/s)",
                times(m.write_vs_memcpy),
                m.memcpy_gbytes_per_sec
            ),
        ),
    ];
    for line in rows {
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let notes = format!(
        "Targets (from the project's issue): {RDMA_TARGET_MOPS} M messages/s per router core, \
         {:.0}x the {ORIGINAL_FREEFLOW_MOPS} M/s the original Freeflow reached on real RDMA \
         hardware; a round trip under {RDMA_TARGET_RTT_US} µs (lower is better). memcpy: one \
         core copying the same 64 KiB buffers in this run, about the most a software copy can \
         move. Router CPU/op: the router's CPU time in a phase divided by its operations (a \
         round trip is two SENDs; the router polls while work is pending, so there it is about \
         the elapsed time). All of this is the router's software engine between two programs \
         on one host: what the router costs, not what an RDMA NIC between two hosts would do.",
        RDMA_TARGET_MOPS / ORIGINAL_FREEFLOW_MOPS
    );
    let _ = writeln!(out);
    for line in wrap(&notes, NOTE_WIDTH) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

/// Says on stdout that the RDMA part did not run, and why.
fn print_rdma_skipped(reason: &str) {
    let _ = writeln!(
        io::stdout(),
        "\nRDMA comparison skipped: {reason}; then run `sudo freeflow demo --part rdma`."
    );
}

// ---------------------------------------------------------------- the command

fn require_root() -> Result<(), DemoError> {
    match topology::ensure_root() {
        Ok(()) => Ok(()),
        Err(TopologyError::NotRoot { euid }) => Err(DemoError::NotRoot {
            euid,
            exe: std::env::args()
                .next()
                .unwrap_or_else(|| "freeflow".to_owned()),
        }),
        Err(e) => Err(e.into()),
    }
}

fn require_file(path: PathBuf) -> Result<PathBuf, DemoError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(DemoError::Missing(path))
    }
}

/// Runs the demo. Errors, also [`DemoError::Interrupted`], come after everything the demo made
/// is removed.
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    require_root()?;
    let with_tcp = args.part != Part::Rdma;
    let with_rdma = args.part != Part::Tcp;
    let programs = Programs {
        freeflow: std::env::current_exe().map_err(io_err("cannot find the freeflow executable"))?,
        bench: require_file(supervise::sibling_of_exe("freeflow-bench"))?,
    };
    supervise::router_program()
        .map_err(|_| DemoError::Missing(supervise::sibling_of_exe("freeflow-router")))?;
    if with_tcp {
        require_file(supervise::sibling_of_exe("libfsocket.so"))?;
    }
    // Whether the RDMA part can run here is known before the first step, so that the step
    // count is right; asked for alone, it must run.
    let rdma_ready = if with_rdma {
        require_file(supervise::sibling_of_exe("libibverbs.so"))?;
        Some(rdma_prerequisites())
    } else {
        None
    };
    if let (Part::Rdma, Some(Err(reason))) = (args.part, &rdma_ready) {
        return Err(DemoError::RdmaUnavailable(reason.clone()));
    }
    let stop = Interrupt::install()?;
    let reps = args.reps as usize;
    let mut progress = Progress {
        done: 0,
        total: if with_tcp {
            ATTACH_STEPS + TCP_FIXED_STEPS + 3 * reps
        } else {
            0
        } + match &rdma_ready {
            Some(Ok(())) => RDMA_FIXED_STEPS + reps,
            Some(Err(_)) => 1,
            None => 0,
        },
    };
    let mut value = serde_json::Map::new();
    let mut removed = Vec::new();
    if with_tcp {
        let tags = cluster_and_tcp(args, &programs, &stop, &mut progress, &mut value)?;
        removed.push(format!(
            "clusters {} and {} and their daemons",
            tags[0], tags[1]
        ));
    }
    match rdma_ready {
        None => {}
        Some(Ok(())) => {
            stop.check()?;
            let rdma_json = rdma_part(args, &programs, &stop, &mut progress)?;
            let report: RdmaReport = serde_json::from_value(rdma_json.clone()).map_err(|e| {
                DemoError::Unexpected(format!(
                    "freeflow-bench rdma's report is not what we read: {e}"
                ))
            })?;
            if !args.json {
                print_rdma_table(&report);
            }
            value.insert("rdma".into(), rdma_json);
            removed.push("the RDMA comparison's router and namespace".to_owned());
        }
        Some(Err(reason)) => {
            progress.step(format_args!("RDMA comparison skipped: {reason}"));
            if !args.json {
                print_rdma_skipped(&reason);
            }
            value.insert("rdma".into(), json!({ "skipped": reason }));
        }
    }
    if args.json {
        let text =
            serde_json::to_string_pretty(&Value::Object(value)).unwrap_or_else(|_| "null".into());
        let _ = writeln!(io::stdout(), "{text}");
    }
    let _ = writeln!(io::stderr(), "done: {} are removed", removed.join("; "));
    Ok(())
}

/// Parts 1 and 2: the simulated cluster, then the TCP comparison. Prints their text (unless
/// `--json`), adds `clusters`, `attach` and `tcp` to `value`, returns the two cluster tags.
fn cluster_and_tcp(
    args: &DemoArgs,
    programs: &Programs,
    stop: &Interrupt,
    progress: &mut Progress,
    value: &mut serde_json::Map<String, Value>,
) -> Result<[String; 2], DemoError> {
    // Two clusters, so two tags; both are printed in the progress lines, so a leftover (after
    // a SIGKILL) can be found and removed with `freeflow cluster down --tag`.
    let attach_tag = topology::fresh_tag("dm");
    let tcp_tag = topology::fresh_tag("dmt");

    let mut made = Made {
        freeflow: programs.freeflow.clone(),
        cluster: None,
        work: std::env::temp_dir().join(format!("freeflow-demo-{attach_tag}")),
        work_created: false,
        hosts_up: Vec::new(),
    };
    let attached = attach_part(&mut made, &attach_tag, programs, stop, progress);
    if let Ok(a) = &attached {
        if !args.json {
            print_attached(&attach_tag, a);
        }
    }
    progress.step(if stop.interrupted() {
        format!("interrupted: stopping Freeflow and removing cluster {attach_tag}")
    } else {
        format!("stopping Freeflow on both hosts and removing cluster {attach_tag}")
    });
    let problems = made.remove();
    let attached = match (attached, problems.is_empty()) {
        (Ok(a), true) => a,
        (Ok(_), false) => return Err(DemoError::Cleanup(problems)),
        (Err(e), _) => {
            for p in problems {
                progress.note(format_args!("clean-up: {p}"));
            }
            return Err(e);
        }
    };
    stop.check()?;

    let tcp_json = tcp_part(&tcp_tag, args, programs, stop, progress)?;
    let report: TcpReport = serde_json::from_value(tcp_json.clone()).map_err(|e| {
        DemoError::Unexpected(format!(
            "freeflow-bench tcp's report is not what we read: {e}"
        ))
    })?;
    if report.paths.len() != 3 {
        return Err(DemoError::Unexpected(format!(
            "freeflow-bench tcp reported {} paths, not host, overlay and Freeflow",
            report.paths.len()
        )));
    }
    if !args.json {
        print_table(&report);
    }
    let left: Vec<String> = [&attach_tag, &tcp_tag]
        .into_iter()
        .map(|t| topology::netns_of_tag(t))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    if !left.is_empty() {
        return Err(DemoError::Cleanup(vec![format!(
            "namespaces still present: {}",
            left.join(" ")
        )]));
    }
    value.insert("clusters".into(), json!([attach_tag, tcp_tag]));
    value.insert(
        "attach".into(),
        json!({
            "containers": attached.probes.iter().map(|(host, p)| json!({
                "host": host,
                "container": p.container,
                "tenant": p.tenant,
                "ip": p.ip,
                "shard": p.shard,
                "rtt_p50_ns": p.rtt_p50_ns,
                "rtt_p99_ns": p.rtt_p99_ns,
            })).collect::<Vec<_>>(),
            "stranger_refused": attached.stranger_refused,
            "status": attached.status_json,
        }),
    );
    value.insert("tcp".into(), tcp_json);
    Ok([attach_tag, tcp_tag])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(8123.0), "8,123");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn bench_progress_becomes_steps() {
        assert_eq!(
            tcp_step("[freeflow-bench] tcp: repetition 2/5: overlay", "t1").as_deref(),
            Some("TCP repetition 2/5: overlay (VXLAN) (stream, round trips, connection setups)")
        );
        assert!(
            tcp_step("[freeflow-bench] tcp: building two simulated hosts", "t1")
                .unwrap()
                .contains("ff-t1-*")
        );
        assert_eq!(tcp_step("freeflow-bench: boom", "t1"), None);
    }

    #[test]
    fn rdma_progress_becomes_steps() {
        let start = rdma_step(
            "[freeflow-bench] rdma: starting a private router on core 1 and building the \
             measuring program",
            "ffrdma-42",
        )
        .unwrap();
        assert!(start.contains("router on core 1;"), "{start}");
        assert!(start.contains("namespace ffrdma-42 "), "{start}");
        assert!(
            rdma_step("[freeflow-bench] rdma: repetition 2 of 3", "ffrdma-42")
                .unwrap()
                .starts_with("RDMA repetition 2/3: ")
        );
        assert_eq!(
            rdma_step(
                "[freeflow-bench] rdma: stopping the router and removing its namespace",
                "ffrdma-42"
            )
            .as_deref(),
            Some("RDMA comparison: stopping its router and removing namespace ffrdma-42")
        );
        assert_eq!(rdma_step("freeflow-bench: boom", "ffrdma-42"), None);
        assert_eq!(rdma_step("[freeflow-bench] tcp: x", "ffrdma-42"), None);
    }

    #[test]
    fn notes_wrap_between_words() {
        assert_eq!(wrap("a bb ccc dd", 6), ["a bb", "ccc dd"]);
        assert_eq!(wrap("abcdefgh ij", 4), ["abcdefgh", "ij"]);
        assert!(wrap("  ", 10).is_empty());
        let text = "word ".repeat(100);
        assert!(wrap(&text, NOTE_WIDTH)
            .iter()
            .all(|l| l.len() <= NOTE_WIDTH));
    }

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(parse_seconds("0.3"), Ok(0.3));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("61").is_err());
    }
}
