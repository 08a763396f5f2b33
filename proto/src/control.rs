//! The router's control socket (`router.ctl` in the state directory, see [`crate::paths`]; only
//! root in the router's network namespace, see [`crate::identity::check_control_peer`]): JSON,
//! one object per line, one request and one response at a time. Used by the control daemon,
//! the CLI and bench.

use crate::identity::NetnsId;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, Write};
use std::net::Ipv4Addr;

mod delta;
pub use delta::{Applied, DeltaError, NetworkDelta, ServedNetwork, ServedTable, TableDelta};

/// Longest line either side accepts.
pub const MAX_LINE: usize = 4 << 20;

/// A container the router serves: the attach check matches callers against these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerEntry {
    pub name: String,
    pub tenant: String,
    pub ip: Ipv4Addr,
    pub netns: NetnsId,
}

/// Another host's router, reachable on the host network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHost {
    pub host_ip: Ipv4Addr,
    pub peer_port: u16,
}

/// Where an overlay address lives, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OverlayEntry {
    pub ip: Ipv4Addr,
    pub tenant: String,
    pub host_ip: Ipv4Addr,
}

/// What TCP mode needs to know about the cluster: this host, the other hosts' routers, and
/// every registered overlay address (all hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    pub host_ip: Ipv4Addr,
    pub peer_port: u16,
    pub hosts: Vec<PeerHost>,
    pub overlay: Vec<OverlayEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Replaces the table of containers; attached containers no longer in it are detached.
    /// `network` (absent for a router used alone) enables TCP-mode acceleration.
    SetContainers {
        containers: Vec<ContainerEntry>,
        #[serde(default)]
        network: Option<NetworkView>,
        /// The number the daemon gives this table, for the deltas that follow it (`None`: the
        /// router takes no delta until a numbered full push).
        #[serde(default)]
        generation: Option<u64>,
    },
    /// Changes the table by a delta, if the router's table is the delta's base generation;
    /// otherwise an error, the table unchanged (the daemon then pushes the full table).
    /// Attached containers removed or changed are detached, as with `SetContainers`.
    UpdateContainers(TableDelta),
    /// Asks for [`RouterStatus`].
    Status,
    /// Asks for the table the router serves ([`RouterTable`]), unless it is still the one of
    /// push `unless_push` (then the answer is [`ControlResponse::TableUnchanged`]): a watcher
    /// can poll it cheaply and read the table only when it changed.
    Table {
        #[serde(default)]
        unless_push: Option<u64>,
    },
    /// Stops the router cleanly.
    Shutdown,
    /// Tests only: makes a thread of the router panic, to check that a panic ends the process
    /// (so that its supervisor restarts it). `shard: Some(i)` panics shard `i`, `None` the
    /// control thread. Only debug builds of the router obey; a release build answers with an
    /// error.
    TestPanic {
        #[serde(default)]
        shard: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    Ok,
    Status(RouterStatus),
    Table(RouterTable),
    /// The table is still the one of push `pushes`.
    TableUnchanged {
        pushes: u64,
    },
    Error {
        message: String,
    },
}

/// What the router serves, as the daemon last pushed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterTable {
    /// Table pushes accepted since the router started (0: none yet); it numbers this table.
    pub pushes: u64,
    /// This host's containers.
    pub containers: Vec<ContainerEntry>,
    /// The cluster (`None` until a push carried one).
    pub network: Option<NetworkView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterStatus {
    pub pid: u32,
    pub version: String,
    pub uptime_ms: u64,
    pub shards: Vec<ShardStatus>,
    pub registered: usize,
    pub attached: Vec<AttachedStatus>,
    pub attaches_accepted: u64,
    pub attaches_refused: u64,
    /// TCP mode: accelerated listeners on this host.
    #[serde(default)]
    pub tcp_listeners: usize,
    /// TCP mode: connections set up on the host network.
    #[serde(default)]
    pub tcp_connects: u64,
    /// TCP mode: connects sent back to the overlay path (destination not accelerated).
    #[serde(default)]
    pub tcp_fallbacks: u64,
    /// TCP mode: clients that reached an accelerated listener without Freeflow, handed to the
    /// application through the router.
    #[serde(default)]
    pub tcp_relayed: u64,
    /// TCP mode: connects to other hosts made on a host port claimed in advance (the peer
    /// router and the server's process knew it before the connection came).
    #[serde(default)]
    pub tcp_claimed: u64,
    /// TCP mode: the other hosts' accelerated listeners this router knows (from their
    /// routers' tables), as overlay `ip:port`, sorted: a connect to one is accelerated.
    #[serde(default)]
    pub tcp_remote_listeners: Vec<String>,
    /// TCP mode: connects, fallbacks and relayed clients per tenant (of the connecting
    /// container; of the listener's for a relayed client), by tenant name.
    #[serde(default)]
    pub tcp_by_tenant: Vec<TenantTcpStatus>,
    /// TCP mode: whether the host-socket jail is up (host sockets handed to containers cannot
    /// be connected again nor serve as listeners for the host network).
    #[serde(default)]
    pub jail_active: bool,
    /// RDMA mode: rdma_cm listeners on this host.
    #[serde(default)]
    pub cm_listeners: usize,
    /// RDMA mode: rdma_cm connections established since the router started.
    #[serde(default)]
    pub cm_established: u64,
    /// RDMA mode: rdma_cm address resolutions that waited for the daemon's news of an address
    /// (a container registered on another host a moment ago) and then resolved.
    #[serde(default)]
    pub cm_resolved_late: u64,
}

/// One tenant's TCP-mode counters in [`RouterStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantTcpStatus {
    pub tenant: String,
    pub connects: u64,
    pub fallbacks: u64,
    pub relayed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub index: usize,
    pub core: Option<usize>,
    pub attached: usize,
    pub requests: u64,
    pub wakeups: u64,
    pub parks: u64,
    pub protocol_errors: u64,
    /// Time the shard spent parked (asleep, no CPU), in ns.
    #[serde(default)]
    pub parked_ns: u64,
    /// CPU time of the shard's thread (serving requests, or spinning before it parks), in ns.
    #[serde(default)]
    pub cpu_ns: u64,
    /// Containers with an attachment on the shard.
    #[serde(default)]
    pub containers: usize,
    /// QPs of its verbs engine.
    #[serde(default)]
    pub qps: usize,
    /// Send work requests its verbs engine executed, and their payload bytes.
    #[serde(default)]
    pub verbs_ops: u64,
    #[serde(default)]
    pub verbs_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachedStatus {
    pub id: u32,
    pub container: String,
    pub pid: i32,
    /// The shard serving its rings; `None` for a socket shim, which the control thread serves.
    pub shard: Option<usize>,
    pub kind: String,
}

/// Writes one message as a line.
pub fn write_line<T: Serialize>(w: &mut impl Write, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one line (bounded by [`MAX_LINE`]) and parses it. `Ok(None)` at end of stream.
pub fn read_line<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    let n = io::Read::take(&mut *r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control line too long or cut short",
        ));
    }
    serde_json::from_slice(&line).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad control message: {e}"),
        )
    })
}

/// Sends one request to the router's control socket at `path` and returns its response.
pub fn call(
    path: &std::path::Path,
    request: &ControlRequest,
    timeout: std::time::Duration,
) -> io::Result<ControlResponse> {
    let stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = &stream;
    write_line(&mut writer, request)?;
    let mut reader = io::BufReader::new(&stream);
    read_line(&mut reader)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "router closed the control connection",
        )
    })
}
