//! What a daemon leaves in its state directory for the CLI, and how to read it: liveness is
//! the flock on `STATE/daemon.lock`, the pid is in `STATE/freeflow.pid`, the counters are in
//! `STATE/daemon-status.json` ([`DaemonStatus`]). The daemon writes them (`super`); `freeflow
//! status`, `up` and `down` read them here.

use std::fs::{self, File};
use std::io;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{io_err, DaemonError};
use crate::config::RuntimeDir;
use crate::os;

/// `state` values in [`DaemonStatus`].
pub const STATE_STARTING: &str = "starting";
/// The router is (or was) up and has had its table; the daemon supervises it.
pub const STATE_READY: &str = "ready";
/// The daemon is shutting down.
pub const STATE_STOPPING: &str = "stopping";

/// A container left out of the router's table, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedContainer {
    /// Its registry name.
    pub name: String,
    /// Why it was left out.
    pub reason: String,
}

/// What the daemon reports in `STATE/daemon-status.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonStatus {
    /// The daemon's pid.
    pub pid: u32,
    /// [`STATE_STARTING`], [`STATE_READY`] or [`STATE_STOPPING`].
    pub state: String,
    /// When the daemon started (ms since the epoch).
    pub started_unix_ms: u64,
    /// This host's address.
    pub host_ip: Option<Ipv4Addr>,
    /// The registry URL.
    pub registry: String,
    /// The router binary.
    pub router_program: String,
    /// The running router's pid; `None` while it is down.
    pub router_pid: Option<u32>,
    /// When the running router was started.
    pub router_started_unix_ms: Option<u64>,
    /// The router's restarts, the table's last push, skipped containers, the last error.
    #[serde(flatten)]
    pub counters: DaemonCounters,
}

/// The supervision counters of [`DaemonStatus`], which `freeflow status` reports as they are.
/// Flattened into both `daemon-status.json` and the `daemon` object of `status --json`, so
/// their keys stay where they were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonCounters {
    /// Router starts after the first one (successful or not).
    pub restarts: u64,
    /// Starts that failed (the router died or hung before it was ready).
    pub start_failures: u64,
    /// Why the last router ended, or why the last start failed.
    pub last_exit: Option<String>,
    /// When that was.
    pub last_exit_unix_ms: Option<u64>,
    /// When the last restart began.
    pub last_restart_unix_ms: Option<u64>,
    /// When the next start is due while the router is down.
    pub next_restart_unix_ms: Option<u64>,
    /// Containers in the running router's table.
    pub containers_pushed: Option<usize>,
    /// Overlay addresses (containers of every host) in the running router's table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_pushed: Option<usize>,
    /// Other hosts' routers in the running router's table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_hosts_pushed: Option<usize>,
    /// Registry generation the running router's table reflects.
    pub registry_generation: Option<u64>,
    /// Times the registry's watch started over from a full read (after an etcd compaction,
    /// a lost connection or a gap); `None` where the registry is polled (the file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_resyncs: Option<u64>,
    /// When the table was last pushed.
    pub last_push_unix_ms: Option<u64>,
    /// Table pushes the router took whole since the daemon started.
    #[serde(skip_serializing_if = "is_zero")]
    pub table_pushes_full: u64,
    /// Table pushes the router took as a delta (the changes since its table) since the daemon
    /// started.
    #[serde(skip_serializing_if = "is_zero")]
    pub table_pushes_delta: u64,
    /// Containers of this host left out of the table.
    pub skipped: Vec<SkippedContainer>,
    /// The last registry or push error, cleared when things work again.
    pub last_error: Option<String>,
    /// Whether the running router was adopted: started by an earlier daemon that died, and
    /// supervised through a pidfd (not our child, so its exit status will be unknown).
    pub router_adopted: bool,
    /// The Docker watcher (`up --docker`), if the daemon runs one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerWatchStatus>,
}

/// What the Docker watcher reports (see `crate::docker`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DockerWatchStatus {
    /// The engine's socket.
    pub socket: String,
    /// Whether it follows the engine's events now.
    pub connected: bool,
    /// Since when it is connected, or since when it is not (ms since the epoch).
    pub since_unix_ms: u64,
    /// Containers it registered, and unregistered, since the daemon started.
    pub registered: u64,
    /// Containers it unregistered.
    pub unregistered: u64,
    /// Running containers it left out (not Freeflow's mount or address, refused).
    pub refused: u64,
    /// Events or answers of the engine it could not use.
    pub malformed: u64,
    /// Why the last connection or request failed.
    pub last_error: Option<String>,
}

impl DaemonStatus {
    /// Reads `STATE/daemon-status.json`; `None` if it is missing or unreadable.
    pub fn read(dir: &RuntimeDir) -> Option<DaemonStatus> {
        let bytes = fs::read(dir.status_file()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Whether a daemon runs for a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonState {
    /// Nobody holds `daemon.lock`.
    Stopped,
    /// A process holds `daemon.lock`; its pid if `freeflow.pid` names one.
    Running {
        /// From the pid file.
        pid: Option<u32>,
    },
}

/// Looks at the daemon lock of `dir` without disturbing a running daemon.
pub fn probe(dir: &RuntimeDir) -> Result<DaemonState, DaemonError> {
    let path = dir.daemon_lock();
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DaemonState::Stopped),
        Err(source) => {
            return Err(DaemonError::Io {
                what: format!("cannot open {}", path.display()),
                source,
            })
        }
    };
    // Taking the lock succeeds only if nobody holds it; closing the file releases it again.
    let free =
        os::try_lock_exclusive(&file).map_err(io_err(format!("cannot lock {}", path.display())))?;
    drop(file);
    if free {
        Ok(DaemonState::Stopped)
    } else {
        Ok(DaemonState::Running { pid: read_pid(dir) })
    }
}

/// Whether a router holds `STATE/router.lock` (`None` if that cannot be told).
pub fn router_lock_held(dir: &RuntimeDir) -> Option<bool> {
    let file = match File::open(dir.router_lock()) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(false),
        Err(_) => return None,
    };
    os::try_lock_exclusive(&file).ok().map(|free| !free)
}

/// The pid in `STATE/router.pid`: the router a daemon started (or adopted) last.
pub fn read_router_pid(dir: &RuntimeDir) -> Option<u32> {
    fs::read_to_string(dir.router_pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
}

/// The pid in `STATE/freeflow.pid`.
pub fn read_pid(dir: &RuntimeDir) -> Option<u32> {
    fs::read_to_string(dir.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
