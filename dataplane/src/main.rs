//! freeflow-router: the Freeflow dataplane for one host. Normally started and supervised by
//! `freeflow up`; it can also run alone in the foreground.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here) to `sys` (socket calls, the ready
//! pipe), `uring` (io_uring submissions) and, inside `verbs`, to its `memory` and `notify`
//! modules. Signals, poll and memory files are `freeflow-os`'s.
#![deny(unsafe_code)]

mod attachment;
mod control;
mod shard;
#[allow(unsafe_code)]
mod sys;
mod tcp;
#[allow(unsafe_code)]
mod uring;
mod verbs;

use freeflow_os::signals::{SignalFd, TERMINATION_SIGNALS};
use freeflow_proto::doorbell::EventFd;
use freeflow_proto::{fdpass, RingGeometry, CONTROL_SOCKET, ROUTER_SOCKET};
use shard::{Shard, ShardHandle, ShardStats};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const USAGE: &str = "usage: freeflow-router [--dir DIR] [--cores LIST] [--spin-us N] [--slots N] [--slot-size N] [--ready-fd FD]

  --dir DIR        runtime directory holding router.sock and router.ctl (default $FREEFLOW_DIR or /freeflow)
  --cores LIST     cores to run one pinned shard each on, e.g. 1 or 0,1 or 0-3 (default: the last core)
  --spin-us N      how long an idle shard spins before it parks (default 50)
  --slots N        slots per ring, a power of two (default 1024)
  --slot-size N    bytes per slot, a multiple of 64 (default 64)
  --ready-fd FD    write \"ready\\n\" to this fd once serving, then close it";

struct Config {
    dir: PathBuf,
    cores: Vec<usize>,
    spin: Duration,
    geometry: RingGeometry,
    ready_fd: Option<i32>,
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

fn parse_args() -> Result<Config, String> {
    let mut args = std::env::args().skip(1);
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    let mut config = Config {
        dir: freeflow_proto::runtime_dir(),
        cores: vec![available.last().copied().unwrap_or(0)],
        spin: Duration::from_micros(50),
        geometry: RingGeometry {
            slot_size: 64,
            slot_count: 1024,
        },
        ready_fd: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--dir" => config.dir = PathBuf::from(value("--dir")?),
            "--cores" => config.cores = parse_cores(&value("--cores")?)?,
            "--spin-us" => {
                config.spin = Duration::from_micros(
                    value("--spin-us")?
                        .parse()
                        .map_err(|e| format!("--spin-us: {e}"))?,
                )
            }
            "--slots" => {
                config.geometry.slot_count = value("--slots")?
                    .parse()
                    .map_err(|e| format!("--slots: {e}"))?
            }
            "--slot-size" => {
                config.geometry.slot_size = value("--slot-size")?
                    .parse()
                    .map_err(|e| format!("--slot-size: {e}"))?
            }
            "--ready-fd" => {
                config.ready_fd = Some(
                    value("--ready-fd")?
                        .parse()
                        .map_err(|e| format!("--ready-fd: {e}"))?,
                )
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    config.geometry = config.geometry.validate()?;
    if let Some(bad) = config.cores.iter().find(|c| !available.contains(c)) {
        return Err(format!(
            "core {bad} is not available to this process (available: {available:?})"
        ));
    }
    Ok(config)
}

fn run(config: Config) -> Result<(), String> {
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| format!("cannot create {}: {e}", config.dir.display()))?;
    let _lock = sys::lock_exclusive(&config.dir.join("router.lock"))
        .map_err(|e| format!("another router serves {} ({e})", config.dir.display()))?;
    // Signals are blocked before any thread starts, so every thread inherits the mask and only
    // the control thread sees them, through the signalfd.
    let signals = SignalFd::block(&TERMINATION_SIGNALS).map_err(|e| format!("signalfd: {e}"))?;
    let signals = OwnedFd::from(signals);

    let attach_path = config.dir.join(ROUTER_SOCKET);
    let control_path = config.dir.join(CONTROL_SOCKET);
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

    let attached: shard::AttachedTable = Arc::new(Mutex::new(Default::default()));
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    for (index, &core) in config.cores.iter().enumerate() {
        let handle = ShardHandle {
            index,
            core: Some(core),
            bell: Arc::new(EventFd::new().map_err(|e| format!("eventfd: {e}"))?),
            inbox: Arc::new(crossbeam_queue::ArrayQueue::new(1024)),
            stats: Arc::new(ShardStats::default()),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let shard = Shard::new(&handle, attached.clone(), config.spin)
            .map_err(|e| format!("io_uring: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(format!("ff-shard-{index}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    eprintln!("freeflow-router: shard {index}: could not pin to core {core}");
                }
                shard.run();
            })
            .map_err(|e| format!("spawn shard: {e}"))?;
        handles.push(handle);
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
    eprintln!(
        "freeflow-router: pid {} serving {} with {} shard(s) on cores {:?}",
        std::process::id(),
        config.dir.display(),
        config.cores.len(),
        config.cores
    );
    if let Some(fd) = config.ready_fd {
        sys::write_ready_line(fd);
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
    eprintln!("freeflow-router: stopped");
    result
}

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("freeflow-router: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freeflow-router: {e}");
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

#[cfg(test)]
mod tests {
    use super::parse_cores;

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
