//! freeflow-router: the Freeflow dataplane for one host. Normally started and supervised by
//! `freeflow up`; it can also run alone in the foreground.
//!
//! A panic in any of its threads (shards, the control thread, the closer thread) ends the
//! process with [`PANIC_EXIT_STATUS`] after one log line naming the thread and the panic: a
//! shard thread that died alone would leave its attachments hanging in a process that still
//! looks alive, while a router that exits is restarted by `freeflow up`'s daemon.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here) to `sys` (socket calls, the ready
//! pipe), `uring` (io_uring submissions), `jail::kernel` (bpf(2), SO_MARK) and, inside `verbs`,
//! to its `memory` and `notify` modules, and with the `rdma-hw` feature to `verbs::hw::sys`
//! (rdma-core's verbs). Signals, poll and memory files are `freeflow-os`'s.
#![deny(unsafe_code)]

mod admission;
mod attachment;
mod cm;
mod control;
mod control_peer;
mod jail;
mod log;
mod shard;
#[allow(unsafe_code)]
mod sys;
mod tcp;
#[allow(unsafe_code)]
mod uring;
mod verbs;

use ::log::{error, info, warn};
use clap::Parser;
use freeflow_os::signals::{SignalFd, TERMINATION_SIGNALS};
use freeflow_proto::doorbell::EventFd;
use freeflow_proto::paths::{self, ROUTER_LOCK};
use freeflow_proto::{fdpass, RingGeometry, CONTROL_SOCKET, ROUTER_SOCKET};
use shard::{Shard, ShardHandle, ShardStats};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What `--help` adds after the options.
const ENVIRONMENT: &str = "Environment:
  FREEFLOW_DIR              the default of --dir
  FREEFLOW_STATE_DIR        the default of --state-dir
  FREEFLOW_CONTROL_SPIN_US  how long the control thread polls without sleeping after a request (default 0)
  FREEFLOW_CONTROL_NICE     the control thread's nice value, -20..19 (default -10; 0: an ordinary thread)
  FREEFLOW_CONNECTS_ON_SHARDS  1: TCP-mode connects are started and answered by the shards (default: the control thread)
  FREEFLOW_SHARD_SLICE_US   the time slice each shard asks the kernel for, in us (default 100, the
                            shortest: its wake-ups preempt; 0: the kernel's default)

Log lines on stderr: <RFC 3339 UTC time, ms> freeflow-router[<pid>] <ERROR|WARN|INFO> <message>

Exit status: 0 after a clean stop, 1 when serving failed, 2 for bad arguments, 70 after a panic
in any thread (the last log line says which and why)";

/// The exit status after a panic: sysexits' EX_SOFTWARE (internal software error).
const PANIC_EXIT_STATUS: i32 = 70;

/// freeflow-router: the Freeflow dataplane for one host (normally started by `freeflow up`)
#[derive(Parser, Debug)]
#[command(name = "freeflow-router", args_override_self = true, after_help = ENVIRONMENT)]
struct Args {
    /// runtime directory holding router.sock, the one containers mount
    /// [default: $FREEFLOW_DIR, else /freeflow]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// root-only directory holding router.ctl and router.lock, never mounted into containers
    /// [default: $FREEFLOW_STATE_DIR, else /run/freeflow/state/<DIR escaped>]
    #[arg(long, value_name = "STATE")]
    state_dir: Option<PathBuf>,
    /// cores to run one pinned shard each on, e.g. 1 or 0,1 or 0-3 [default: the last core]
    #[arg(long, value_name = "LIST", value_parser = parse_core_list)]
    cores: Option<CoreList>,
    /// how long an idle shard spins before it parks, in microseconds
    #[arg(long, value_name = "N", default_value_t = 50)]
    spin_us: u64,
    /// slots per ring, a power of two
    #[arg(long, value_name = "N", default_value_t = 1024)]
    slots: u32,
    /// bytes per slot, a multiple of 64
    #[arg(long, value_name = "N", default_value_t = 64)]
    slot_size: u32,
    /// write "ready\n" to this fd once serving, then close it
    #[arg(long, value_name = "FD")]
    ready_fd: Option<i32>,
    /// open this RDMA device (a libibverbs device name, or `auto`: the first with an active
    /// port 1) and keep it; needs a router built with the `rdma-hw` feature [default: none, the
    /// software engine only]
    #[arg(long, value_name = "NAME|auto")]
    rdma_device: Option<String>,
    /// with --rdma-device: check the device end to end (two QPs of the router's own carry
    /// SEND, RDMA WRITE and READ of several sizes, a forged rkey is refused), print the result
    /// and exit instead of serving
    #[arg(long, requires = "rdma_device")]
    rdma_probe: bool,
    /// with --rdma-probe: also measure what the backend's translation costs per work request
    /// and completion, and a SEND through the device (medians of 5 runs)
    #[arg(long, requires = "rdma_probe")]
    rdma_bench: bool,
}

/// A parsed `--cores` list (a newtype, so that clap takes it as one value).
#[derive(Clone, Debug)]
struct CoreList(Vec<usize>);

struct Config {
    dir: PathBuf,
    state_dir: PathBuf,
    cores: Vec<usize>,
    spin: Duration,
    geometry: RingGeometry,
    ready_fd: Option<i32>,
    rdma_device: Option<String>,
    rdma_probe: bool,
    rdma_bench: bool,
}

fn parse_core_list(s: &str) -> Result<CoreList, String> {
    parse_cores(s).map(CoreList)
}

fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad core list {s:?}");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                cores.extend(a..=b);
            }
            None => cores.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cores.is_empty() {
        return Err("empty core list".into());
    }
    let mut seen = std::collections::HashSet::new();
    if !cores.iter().all(|c| seen.insert(*c)) {
        return Err(format!("core listed twice in {s:?}"));
    }
    Ok(cores)
}

/// The configuration the arguments describe, with the defaults that depend on this host
/// filled in; errors for a geometry or cores this router cannot use.
fn configure(args: Args) -> Result<Config, String> {
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    let geometry = RingGeometry {
        slot_size: args.slot_size,
        slot_count: args.slots,
    }
    .validate()?;
    let cores = match args.cores {
        Some(CoreList(cores)) => cores,
        None => vec![available.last().copied().unwrap_or(0)],
    };
    if let Some(bad) = cores.iter().find(|c| !available.contains(c)) {
        return Err(format!(
            "core {bad} is not available to this process (available: {available:?})"
        ));
    }
    let dir = args.dir.unwrap_or_else(freeflow_proto::runtime_dir);
    let state_dir = match args.state_dir {
        Some(state) => paths::state_dir_with(&dir, Some(&state)),
        None => paths::state_dir(&dir),
    };
    Ok(Config {
        dir,
        state_dir,
        cores,
        spin: Duration::from_micros(args.spin_us),
        geometry,
        ready_fd: args.ready_fd,
        rdma_device: args.rdma_device,
        rdma_probe: args.rdma_probe,
        rdma_bench: args.rdma_bench,
    })
}

/// Raises the soft limit on open descriptors to the hard one (before any shard sizes its
/// containers' verbs budgets from it) and logs what each container gets.
fn raise_open_file_limit() {
    match freeflow_os::process::raise_open_file_limit() {
        Ok((before, now)) => info!(
            "open-file limit {now}{}; verbs descriptors and mappings per container: {}",
            if before < now {
                format!(" (raised from {before})")
            } else {
                String::new()
            },
            verbs::budget_of_this_process()
        ),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

/// The device `--rdma-device` names, opened (the router keeps it while it serves).
#[cfg(feature = "rdma-hw")]
fn open_rdma_device(config: &Config) -> Result<Option<verbs::hw::Nic>, String> {
    let Some(name) = &config.rdma_device else {
        return Ok(None);
    };
    let choice = verbs::hw::DeviceChoice::parse(name)?;
    let nic = verbs::hw::Nic::open(&choice).map_err(|e| format!("--rdma-device {name}: {e}"))?;
    info!(
        "{}; containers' RC QPs run on it (one host; UD, UC, SRQs, atomics and destinations \
         on other hosts or shards are refused)",
        nic.describe()
    );
    Ok(Some(nic))
}

/// Without the `rdma-hw` feature, `--rdma-device` is refused.
#[cfg(not(feature = "rdma-hw"))]
fn open_rdma_device(config: &Config) -> Result<Option<()>, String> {
    match &config.rdma_device {
        None => Ok(None),
        Some(name) => Err(format!(
            "--rdma-device {name}: this freeflow-router was built without the rdma-hw feature \
             (cargo build -p freeflow-dataplane --features rdma-hw)"
        )),
    }
}

/// `--rdma-probe`: checks the opened device end to end and prints one line.
#[cfg(feature = "rdma-hw")]
fn probe_rdma_device(nic: Option<verbs::hw::Nic>, bench: bool) -> Result<(), String> {
    let nic = nic.ok_or("--rdma-probe needs --rdma-device")?;
    let sizes = [1, 64, 4096, 65536, 1 << 20];
    let report = nic
        .probe(&sizes)
        .map_err(|e| format!("RDMA probe of {} failed: {e}", nic.device.name()))?;
    println!(
        "rdma probe ok: device {} QPs {:#x} and {:#x}: SEND, RDMA WRITE, RDMA READ of {} sizes \
         checked; a forged rkey was refused (REM_ACCESS_ERR)",
        nic.device.name(),
        report.qpns.0,
        report.qpns.1,
        report.sizes_checked
    );
    if bench {
        let costs = nic
            .measure()
            .map_err(|e| format!("RDMA probe of {} failed: {e}", nic.device.name()))?;
        println!(
            "rdma probe: translation {:.1} ns per send WQE, {:.1} ns per completion; a 64-byte \
             SEND through the device {:.0} ns from post to completion (medians of 5 runs)",
            costs.translate_send_ns, costs.translate_completion_ns, costs.device_send_ns
        );
    }
    let path = nic
        .probe_container_path()
        .map_err(|e| format!("RDMA probe of {} failed: {e}", nic.device.name()))?;
    println!(
        "rdma probe: a container's RDMA WRITE ({} bytes, virtual keys and addresses in its \
         memory file) translated, carried by the device, completed on virtual QP {:#x}; a \
         forged virtual rkey refused before the device",
        path.bytes, path.completion.qp_num
    );
    match nic
        .probe_zero_copy()
        .map_err(|e| format!("RDMA probe of {} failed: {e}", nic.device.name()))?
    {
        verbs::hw::ZeroCopy::Works => println!(
            "rdma probe: zero-copy registration of shared memory-file pages works (what the \
             backend registers for containers)"
        ),
        verbs::hw::ZeroCopy::Refused(e) => println!(
            "rdma probe: zero-copy registration of shared memory-file pages refused: {e} (the \
             backend cannot register containers' memory on this device)"
        ),
    }
    Ok(())
}

#[cfg(not(feature = "rdma-hw"))]
fn probe_rdma_device(_: Option<()>, _: bool) -> Result<(), String> {
    Err("--rdma-probe: built without the rdma-hw feature".into())
}

fn run(config: Config) -> Result<(), String> {
    // First: a device that cannot be opened fails the start, before anything is created.
    let nic = open_rdma_device(&config)?;
    if config.rdma_probe {
        return probe_rdma_device(nic, config.rdma_bench);
    }
    // Kept open while the router serves.
    let _nic = nic;
    raise_open_file_limit();
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| format!("cannot create {}: {e}", config.dir.display()))?;
    paths::create_state_dir(&config.state_dir)
        .map_err(|e| format!("cannot create {}: {e}", config.state_dir.display()))?;
    let _lock = sys::lock_exclusive(&config.state_dir.join(ROUTER_LOCK))
        .map_err(|e| format!("another router serves {} ({e})", config.dir.display()))?;
    // Signals are blocked before any thread starts, so every thread inherits the mask and only
    // the control thread sees them, through the signalfd.
    let signals = SignalFd::block(&TERMINATION_SIGNALS).map_err(|e| format!("signalfd: {e}"))?;
    let signals = OwnedFd::from(signals);

    let attach_path = config.dir.join(ROUTER_SOCKET);
    // Not in DIR: containers mount DIR, and root in a container ignores the socket's mode.
    let control_path = config.state_dir.join(CONTROL_SOCKET);
    // We hold the lock, so any socket files left here belong to a router that died.
    let _ = std::fs::remove_file(&attach_path);
    let _ = std::fs::remove_file(&control_path);
    let attach_listener = fdpass::unix_socket(libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK)
        .map_err(|e| format!("socket: {e}"))?;
    fdpass::bind_listen_unix(attach_listener.as_fd(), &attach_path, 512)
        .map_err(|e| format!("bind {}: {e}", attach_path.display()))?;
    // Containers may run as any user; who they are is decided by their network namespace.
    std::fs::set_permissions(&attach_path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("chmod {}: {e}", attach_path.display()))?;
    let control_listener = std::os::unix::net::UnixListener::bind(&control_path)
        .map_err(|e| format!("bind {}: {e}", control_path.display()))?;
    std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", control_path.display()))?;
    control_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;

    // Before any socket is handed out: the jail marks them (dropped at the end of `run`).
    let _jail = jail::set_up();

    // Every region created from here on tells the shims where the shards run (a program
    // polling on one of those cores gives it up while it waits).
    freeflow_proto::region::announce_router_cores(&config.cores);
    let attached: shard::AttachedTable = Arc::new(Mutex::new(Default::default()));
    let mut handles = Vec::new();
    for (index, &core) in config.cores.iter().enumerate() {
        handles.push(ShardHandle {
            index,
            core: Some(core),
            bell: Arc::new(EventFd::new().map_err(|e| format!("eventfd: {e}"))?),
            inbox: Arc::new(crossbeam_queue::ArrayQueue::new(1024)),
            stats: Arc::new(ShardStats::default()),
            stop: Arc::new(AtomicBool::new(false)),
        });
    }
    // Each shard's verbs engine reaches the others' (QPs whose ends different shards serve)
    // over socket pairs, and hands them connections from other hosts.
    let siblings: shard::Siblings = handles
        .iter()
        .map(|h| (h.inbox.clone(), h.bell.clone()))
        .collect();
    let mut links = verbs::SiblingLink::mesh(handles.len())
        .map_err(|e| format!("socket pairs between shards: {e}"))?
        .into_iter();
    let mut threads = Vec::new();
    for (handle, &core) in handles.iter().zip(&config.cores) {
        let index = handle.index;
        let mut shard = Shard::new(handle, attached.clone(), config.spin)
            .map_err(|e| format!("io_uring: {e}"))?;
        shard.link(siblings.clone(), links.next().unwrap_or_default());
        #[cfg(feature = "rdma-hw")]
        if let Some(nic) = &_nic {
            shard.set_device(nic.clone());
        }
        let thread = std::thread::Builder::new()
            .name(format!("ff-shard-{index}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    warn!("shard {index}: could not pin to core {core}");
                }
                shard.run();
            })
            .map_err(|e| format!("spawn shard: {e}"))?;
        threads.push(thread);
    }

    let mut control = control::ControlThread::new(
        attach_listener,
        control_listener,
        signals,
        handles,
        attached,
        config.geometry,
        control_spin(),
    );
    info!(
        "pid {} serving {} (control {}) with {} shard(s) on cores {:?}",
        std::process::id(),
        config.dir.display(),
        control_path.display(),
        config.cores.len(),
        config.cores
    );
    if let Some(fd) = config.ready_fd {
        sys::write_ready_line(fd);
    }
    let nice = control_nice();
    // The session first: under autogroups the thread's own value weighs only inside it.
    match sys::set_session_nice(nice) {
        Ok(true) => info!("session scheduling group at nice {nice}"),
        Ok(false) => {}
        Err(e) => warn!("cannot set the session scheduling group's nice {nice}: {e}"),
    }
    match sys::set_thread_nice(nice) {
        // Read back: what the kernel applies is what the log should say.
        Ok(()) => match sys::thread_nice() {
            Ok(applied) => info!("control thread at nice {applied}"),
            Err(e) => warn!("control thread: nice {nice} set, but reading it back failed: {e}"),
        },
        Err(e) => warn!("control thread: cannot set nice {nice} ({e}); it competes for CPU as an ordinary thread"),
    }
    let result = control.run().map_err(|e| format!("control loop: {e}"));
    for shard in &control.shards {
        shard.stop.store(true, Ordering::Relaxed);
        let _ = shard.bell.ring();
    }
    for thread in threads {
        let _ = thread.join();
    }
    let _ = std::fs::remove_file(&attach_path);
    let _ = std::fs::remove_file(&control_path);
    info!("stopped");
    result
}

/// Makes a panic in any thread end the process: logs the thread, where and what (the panic's
/// backtrace first if `RUST_BACKTRACE` asks for one, so that the panic line is the last), then
/// exits with [`PANIC_EXIT_STATUS`] without unwinding. No thread is left running on without
/// a shard that died, and the supervisor sees the router exit and restarts it.
fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("(unnamed)");
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)")
            .replace('\n', " ");
        let at = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            let backtrace = backtrace.to_string();
            error!(
                "backtrace of the panic in thread {name}:\n{}",
                backtrace.trim_end()
            );
        }
        error!(
            "thread {name} panicked{at}: {message}; exiting with status {PANIC_EXIT_STATUS}, \
             to be restarted"
        );
        std::process::exit(PANIC_EXIT_STATUS);
    }));
}

fn main() -> ExitCode {
    log::init();
    exit_on_panic();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            error!(
                "{}",
                text.strip_prefix("error: ").unwrap_or(&text).trim_end()
            );
            return ExitCode::from(2);
        }
    };
    let config = match configure(args) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// How long the control thread polls without sleeping after a request: `FREEFLOW_CONTROL_SPIN_US`,
/// default 0. Spinning pays on hosts with a core to spare for it; on this project's two-core
/// machines it made connection setup slower (measured: 161 us p50 without, 185 us with 50 us).
fn control_spin() -> Duration {
    Duration::from_micros(
        std::env::var("FREEFLOW_CONTROL_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

/// The control thread's nice value: `FREEFLOW_CONTROL_NICE`, default [`CONTROL_NICE`].
fn control_nice() -> i32 {
    parse_nice(std::env::var("FREEFLOW_CONTROL_NICE").ok().as_deref())
}

/// A nice value as given (clamped to -20..19), [`CONTROL_NICE`] if absent or not a number.
fn parse_nice(value: Option<&str>) -> i32 {
    value
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map_or(CONTROL_NICE, |n| n.clamp(-20, 19))
}

/// The control thread serves every container's connection setup (and the relay) of the host,
/// one request after another, at a few tens of microseconds of CPU each; as an ordinary thread
/// it gets one fair share among all the applications' threads. Measured on a loaded 2-core
/// machine (20 clients opening a connection per request, release build): at nice 0 the thread
/// was runnable 84% of the time but ran 19% of it (schedstat), so every connect queued behind
/// it. A lower nice value lets it run when it has work; it is one thread, so it never takes
/// more than one core, and an idle router (blocked in poll) takes nothing. Where the kernel
/// groups processes by session (autogroups), the thread's value counts only inside the
/// router's session, which then competes as one with every other session (each build, each
/// shell): the router, which leads its own session, gives its session group the same value.
const CONTROL_NICE: i32 = -10;

#[cfg(test)]
mod tests {
    use super::{parse_cores, parse_nice, Args, CoreList, CONTROL_NICE};
    use clap::{CommandFactory, Parser};
    use std::path::Path;

    #[test]
    fn the_control_threads_nice_value_defaults_and_is_clamped() {
        assert_eq!(parse_nice(None), CONTROL_NICE);
        assert_eq!(parse_nice(Some("junk")), CONTROL_NICE);
        assert_eq!(parse_nice(Some(" 0\n")), 0);
        assert_eq!(parse_nice(Some("-40")), -20);
        assert_eq!(parse_nice(Some("25")), 19);
    }

    #[test]
    fn argument_definitions_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn the_daemons_arguments_parse_and_a_repeated_flag_takes_the_last_value() {
        let args = Args::try_parse_from([
            "freeflow-router",
            "--dir",
            "/tmp/a",
            "--ready-fd",
            "7",
            "--cores",
            "0-1",
            "--dir",
            "/tmp/b",
            "--state-dir",
            "/tmp/s",
        ])
        .unwrap();
        assert_eq!(args.dir.as_deref(), Some(Path::new("/tmp/b")));
        assert_eq!(args.state_dir.as_deref(), Some(Path::new("/tmp/s")));
        assert_eq!(args.ready_fd, Some(7));
        assert!(matches!(args.cores, Some(CoreList(c)) if c == [0, 1]));
        assert_eq!((args.spin_us, args.slots, args.slot_size), (50, 1024, 64));
        assert!(Args::try_parse_from(["freeflow-router", "--cores", "3-1"]).is_err());
        assert!(Args::try_parse_from(["freeflow-router", "--bogus"]).is_err());
    }

    #[test]
    fn core_lists() {
        assert_eq!(parse_cores("1").unwrap(), vec![1]);
        assert_eq!(parse_cores("0,2").unwrap(), vec![0, 2]);
        assert_eq!(parse_cores("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("1,1").is_err());
        assert!(parse_cores("x").is_err());
        assert!(parse_cores("").is_err());
    }
}
