//! The simulated cluster: hosts, the physical link, the VXLAN overlay and containers, all built
//! from Linux network namespaces with iproute2 (`ip`, `bridge`).
//!
//! ```text
//!  ff-<tag>-c-a (container)          ff-<tag>-h0 (host 0)                  ff-<tag>-h1 (host 1)
//!  eth0 10.32.0.5/12 ── veth ── vc0 ─ br0 ─ vx0 (VNI 42) ─ eth0 192.168.1.1 ══ eth0 192.168.1.2 ─ ...
//! ```
//!
//! Two hosts are joined directly by a veth pair; with any other number of hosts every host's
//! `eth0` is a veth whose peer is a port of the bridge `br0` in a "switch" namespace
//! `ff-<tag>-sw`. Each host carries the overlay the way Flannel and Weave build it: a VXLAN device
//! `vx0` on top of `eth0` with an all-zeros FDB entry (head-end replication) towards every other
//! host, enslaved to a bridge `br0` together with the host ends of its containers' veths. A
//! container has only its overlay address and no default route, so it reaches another host's
//! container through VXLAN and nothing else, and cannot reach the host link at all.
//!
//! Every namespace is named `ff-<tag>-...`; the tag is what keeps two clusters (parallel tests,
//! two CI runs) apart, and what [`teardown_tag`] and [`list_tags`] work on. Interfaces are created
//! directly inside their namespaces (`ip -n A link add X type veth peer name Y netns B`), never in
//! the caller's namespace, so their names only need to be unique inside one namespace. IPv6 is
//! disabled in every namespace so that no router solicitation or MLD chatter disturbs packet
//! counters.
//!
//! [`Cluster`] tears everything down when dropped, also while a panic unwinds, unless
//! [`Cluster::persist`] was called. Teardown kills processes still running inside the cluster's
//! namespaces (they would otherwise keep an anonymous namespace alive), deletes every link in them
//! and then the namespaces, so no interface, namespace or `/run/netns` entry is left behind.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// Where `ip netns add` puts the handle of a named namespace.
pub const NETNS_DIR: &str = "/run/netns";
/// Every namespace of every cluster starts with this.
pub const NAME_PREFIX: &str = "ff-";
/// The host's "physical" interface.
pub const LINK_DEV: &str = "eth0";
/// The host's VXLAN device.
pub const OVERLAY_DEV: &str = "vx0";
/// The host's overlay bridge (VXLAN device plus container veths), and the switch's bridge.
pub const OVERLAY_BRIDGE: &str = "br0";
/// The container's interface.
pub const CONTAINER_DEV: &str = "eth0";
/// VXLAN network identifier of the overlay.
pub const VXLAN_VNI: u32 = 42;
/// UDP destination port of the overlay (the IANA VXLAN port).
pub const VXLAN_PORT: u16 = 4789;
/// MTU of the overlay: 1500 minus 50 bytes of VXLAN encapsulation.
pub const OVERLAY_MTU: u32 = 1450;
/// Prefix length of the host link subnet 192.168.1.0/24.
pub const HOST_PREFIX_LEN: u8 = 24;
/// Host `i` gets 192.168.1.(i+1), so at most 253 hosts fit in the /24.
pub const MAX_HOSTS: usize = 253;
/// Longest tag; `ff-<tag>-h252` stays short and interface names never contain the tag.
pub const MAX_TAG_LEN: usize = 8;
/// Longest container name.
pub const MAX_CONTAINER_NAME_LEN: usize = 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Building namespaces needs root.
    #[error(
        "building network namespaces needs root (effective uid is {euid}); \
         run as root, e.g. `sudo -E cargo test`"
    )]
    NotRoot {
        /// The effective uid we run with.
        euid: u32,
    },
    /// The caller asked for something that cannot be built.
    #[error("invalid topology request: {0}")]
    InvalidSpec(String),
    /// A namespace (or container) of that name is already there.
    #[error("{0} already exists")]
    Exists(String),
    /// No host with that index.
    #[error("no host {index} in this cluster (it has {count})")]
    NoSuchHost {
        /// The index asked for.
        index: usize,
        /// How many hosts there are.
        count: usize,
    },
    /// No container with that name.
    #[error("no container named {0:?} in this cluster")]
    NoSuchContainer(String),
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// What it said on stderr, trimmed.
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("cannot run `{command}` (is iproute2 installed?): {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// A command said something we could not understand.
    #[error("unexpected output from `{command}`: {detail}")]
    BadOutput {
        /// The command line.
        command: String,
        /// What was wrong with it.
        detail: String,
    },
    /// Reading the namespace directory failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Teardown tried everything and some steps failed.
    #[error("teardown of cluster {tag} incomplete: {}", errors.join("; "))]
    TeardownIncomplete {
        /// The cluster's tag.
        tag: String,
        /// One message per failed step.
        errors: Vec<String>,
    },
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Unique tag, `[a-z0-9]{1,8}`, part of every namespace name.
    pub tag: String,
    /// Number of hosts, 1 to [`MAX_HOSTS`].
    pub hosts: usize,
}

impl ClusterSpec {
    /// A spec with the given tag and number of hosts.
    pub fn new(tag: impl Into<String>, hosts: usize) -> Self {
        Self {
            tag: tag.into(),
            hosts,
        }
    }
}

impl Default for ClusterSpec {
    /// Two hosts under a fresh random tag.
    fn default() -> Self {
        Self::new(fresh_tag("ff"), 2)
    }
}

/// One simulated host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Position in the cluster, 0-based.
    pub index: usize,
    /// Namespace name, `ff-<tag>-h<index>`.
    pub netns: String,
    /// `/run/netns/<netns>`.
    pub netns_path: PathBuf,
    /// Address on the physical link, 192.168.1.(index+1)/24.
    pub host_ip: Ipv4Addr,
    /// The physical interface, `eth0`.
    pub link_dev: String,
    /// The VXLAN device, `vx0`.
    pub overlay_dev: String,
    /// The overlay bridge, `br0`.
    pub bridge_dev: String,
}

/// One simulated container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// The caller's name for it.
    pub name: String,
    /// Index of the host it is attached to.
    pub host: usize,
    /// Namespace name, `ff-<tag>-c-<name>`.
    pub netns: String,
    /// `/run/netns/<netns>`.
    pub netns_path: PathBuf,
    /// Overlay address.
    pub ip: Ipv4Addr,
    /// Prefix length of the overlay address.
    pub prefix_len: u8,
    /// The container's interface, `eth0`.
    pub dev: String,
    /// MAC address of `eth0`, derived from the overlay address (see [`container_mac`]).
    pub mac: String,
    /// The host end of its veth, a port of the host's `br0`, inside the host namespace.
    pub host_veth: String,
}

/// Packet counters of one interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// Packets dropped on send.
    pub tx_dropped: u64,
}

/// Everything a cluster consists of; the serialized form is what [`Cluster::describe`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Layout {
    tag: String,
    hosts: Vec<HostInfo>,
    /// The switch namespace, present unless there are exactly two hosts.
    switch_netns: Option<String>,
    containers: Vec<ContainerInfo>,
    /// Number for the next host-side veth name `vc<n>`; never reused within a cluster.
    #[serde(default)]
    next_veth: u64,
}

/// A built cluster. Dropping it tears it down (errors ignored); [`Cluster::teardown`] does the
/// same and reports errors; [`Cluster::persist`] leaves it in place.
#[derive(Debug)]
pub struct Cluster {
    /// Empty once persisted or torn down, so that `Drop` has nothing left to do.
    layout: Layout,
}

/// A cluster that stays on the machine: no teardown on drop. It serializes to (and deserializes
/// from) the same JSON as [`Cluster::describe`], so a CLI can keep it in a file between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PersistentCluster {
    layout: Layout,
}

/// Validate a cluster tag: 1 to 8 characters out of `[a-z0-9]`.
pub fn validate_tag(tag: &str) -> Result<(), TopologyError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(TopologyError::InvalidSpec(format!(
            "tag {tag:?} must be 1 to {MAX_TAG_LEN} characters long"
        )));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(TopologyError::InvalidSpec(format!(
            "tag {tag:?} may only contain a-z and 0-9"
        )));
    }
    Ok(())
}

/// Validate a container name: 1 to 32 characters out of `[A-Za-z0-9_-]`, starting with a letter
/// or digit.
pub fn validate_container_name(name: &str) -> Result<(), TopologyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CONTAINER_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(TopologyError::InvalidSpec(format!(
            "container name {name:?} must be 1 to {MAX_CONTAINER_NAME_LEN} characters of \
             A-Z a-z 0-9 - _ starting with a letter or digit"
        )))
    }
}

/// A tag that no other cluster is using with overwhelming probability: up to 3 characters of
/// `prefix` (lowercased, other characters dropped) followed by random base-36 characters, 8 in all.
/// The randomness comes from std's per-process hash keys mixed with pid, time and a counter, so it
/// also differs between processes in different PID namespaces.
pub fn fresh_tag(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tag: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .take(3)
        .collect();
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    let mut bits = hasher.finish();
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    while tag.len() < MAX_TAG_LEN {
        tag.push(char::from(DIGITS[(bits % 36) as usize]));
        bits /= 36;
    }
    tag
}

/// Name of host `index`'s namespace.
pub fn host_netns(tag: &str, index: usize) -> String {
    format!("{NAME_PREFIX}{tag}-h{index}")
}

/// Name of the switch namespace (clusters with other than two hosts).
pub fn switch_netns(tag: &str) -> String {
    format!("{NAME_PREFIX}{tag}-sw")
}

/// Name of a container's namespace.
pub fn container_netns(tag: &str, name: &str) -> String {
    format!("{NAME_PREFIX}{tag}-c-{name}")
}

/// `/run/netns/<name>`, the path `ip netns add` binds a namespace to.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// Address of host `index` on the physical link: 192.168.1.(index+1).
pub fn host_ip(index: usize) -> Ipv4Addr {
    assert!(index < MAX_HOSTS, "host index {index} out of range");
    // The assert bounds index + 1 by 253.
    Ipv4Addr::new(192, 168, 1, (index + 1) as u8)
}

/// The MAC address of the container with overlay address `ip`: `02:42:` followed by the four
/// address bytes, Docker's convention. Deriving it from the address keeps the neighbour caches of
/// other containers right when a container is removed and added again with the same address.
pub fn container_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Fail with [`TopologyError::NotRoot`] unless the effective uid is 0.
pub fn ensure_root() -> Result<(), TopologyError> {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(TopologyError::NotRoot { euid })
    }
}

/// `ip netns exec <netns> <program>`: run `program` inside a namespace. Add arguments with
/// [`Command::arg`].
pub fn command_in(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]);
    cmd
}

/// Counters of interface `dev` inside namespace `netns` (`ip -n <netns> -s -j link show dev <dev>`).
pub fn link_stats(netns: &str, dev: &str) -> Result<LinkStats, TopologyError> {
    let mut cmd = ip_in(netns);
    cmd.args(["-s", "-j", "link", "show", "dev", dev]);
    let command = describe_command(&cmd);
    let out = run(&mut cmd)?;
    let bad = |detail: String| TopologyError::BadOutput {
        command: command.clone(),
        detail,
    };
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| bad(format!("not JSON: {e}")))?;
    let stats = json
        .get(0)
        .and_then(|link| link.get("stats64"))
        .ok_or_else(|| bad("no stats64 object".into()))?;
    let field = |dir: &str, name: &str| -> Result<u64, TopologyError> {
        stats
            .get(dir)
            .and_then(|d| d.get(name))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(format!("no {dir}.{name} counter")))
    };
    Ok(LinkStats {
        rx_packets: field("rx", "packets")?,
        rx_bytes: field("rx", "bytes")?,
        tx_packets: field("tx", "packets")?,
        tx_bytes: field("tx", "bytes")?,
        rx_dropped: field("rx", "dropped")?,
        tx_dropped: field("tx", "dropped")?,
    })
}

/// Names of all named namespaces on the machine (the entries of `/run/netns`).
pub fn list_netns() -> Result<Vec<String>, TopologyError> {
    let dir = Path::new(NETNS_DIR);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TopologyError::Io {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::Io {
            path: dir.to_owned(),
            source,
        })?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The tag of a cluster namespace name `ff-<tag>-...`, if it is one.
fn tag_of(netns: &str) -> Option<&str> {
    let rest = netns.strip_prefix(NAME_PREFIX)?;
    let (tag, _) = rest.split_once('-')?;
    validate_tag(tag).ok().map(|()| tag)
}

/// Namespaces on the machine that belong to cluster `tag`.
pub fn netns_of_tag(tag: &str) -> Result<Vec<String>, TopologyError> {
    Ok(list_netns()?
        .into_iter()
        .filter(|n| tag_of(n) == Some(tag))
        .collect())
}

/// Tags of the clusters that have at least one namespace on this machine, sorted.
pub fn list_tags() -> Result<Vec<String>, TopologyError> {
    let mut tags: Vec<String> = list_netns()?
        .iter()
        .filter_map(|n| tag_of(n).map(str::to_owned))
        .collect();
    tags.sort();
    tags.dedup();
    Ok(tags)
}

/// Remove every namespace named `ff-<tag>-*` (containers first, then hosts, then the switch),
/// with the same thoroughness as [`Cluster::teardown`]. Works on persisted clusters, half-built
/// ones and leftovers of killed runs. Returns how many namespaces were removed; 0 if there were
/// none.
pub fn teardown_tag(tag: &str) -> Result<usize, TopologyError> {
    validate_tag(tag)?;
    ensure_root()?;
    let mut names = netns_of_tag(tag)?;
    let container_prefix = container_netns(tag, "");
    let switch = switch_netns(tag);
    // Containers, then hosts, then the switch: peers before the bridges they hang on.
    names.sort_by_key(|n| {
        if n.starts_with(&container_prefix) {
            0
        } else if *n == switch {
            2
        } else {
            1
        }
    });
    remove_all(tag, &names)
}

/// Remove namespaces in order, trying all of them; count those that existed.
fn remove_all(tag: &str, names: &[String]) -> Result<usize, TopologyError> {
    let mut removed = 0;
    let mut errors = Vec::new();
    for name in names {
        match remove_netns(name) {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        Ok(removed)
    } else {
        Err(TopologyError::TeardownIncomplete {
            tag: tag.to_owned(),
            errors,
        })
    }
}

impl Cluster {
    /// Build the cluster. Refuses a tag that any namespace on the machine already uses. On a
    /// failure half way, whatever was built is torn down before the error is returned.
    pub fn create(spec: ClusterSpec) -> Result<Cluster, TopologyError> {
        validate_tag(&spec.tag)?;
        if spec.hosts == 0 || spec.hosts > MAX_HOSTS {
            return Err(TopologyError::InvalidSpec(format!(
                "a cluster has 1 to {MAX_HOSTS} hosts, not {}",
                spec.hosts
            )));
        }
        ensure_root()?;
        if let Some(existing) = netns_of_tag(&spec.tag)?.into_iter().next() {
            return Err(TopologyError::Exists(format!(
                "namespace {existing} (tag {:?} is in use)",
                spec.tag
            )));
        }
        // From here on, `cluster` records each namespace as soon as it exists, so that an early
        // return through `?` drops it and the drop removes exactly what this call made.
        let mut cluster = Cluster {
            layout: Layout {
                tag: spec.tag.clone(),
                ..Layout::default()
            },
        };
        let tag = spec.tag.as_str();

        for index in 0..spec.hosts {
            let netns = host_netns(tag, index);
            add_netns(&netns)?;
            cluster.layout.hosts.push(HostInfo {
                index,
                netns_path: netns_path(&netns),
                netns,
                host_ip: host_ip(index),
                link_dev: LINK_DEV.to_owned(),
                overlay_dev: OVERLAY_DEV.to_owned(),
                bridge_dev: OVERLAY_BRIDGE.to_owned(),
            });
        }
        if spec.hosts != 2 {
            let netns = switch_netns(tag);
            add_netns(&netns)?;
            cluster.layout.switch_netns = Some(netns);
        }
        // Namespace-wide settings first, so interfaces created later inherit them.
        let all_netns: Vec<String> = cluster.netns_names();
        for netns in &all_netns {
            prepare_netns(netns)?;
        }

        // The physical network.
        let hosts = cluster.layout.hosts.clone();
        match &cluster.layout.switch_netns {
            None => {
                iproute(&hosts[0].netns, &["link", "add", LINK_DEV, "type", "veth"])
                    .args(["peer", "name", LINK_DEV, "netns", &hosts[1].netns])
                    .run()?;
            }
            Some(switch) => {
                iproute(switch, &["link", "add", OVERLAY_BRIDGE, "type", "bridge"]).run()?;
                iproute(switch, &["link", "set", OVERLAY_BRIDGE, "up"]).run()?;
                for host in &hosts {
                    let port = format!("h{}", host.index);
                    iproute(&host.netns, &["link", "add", LINK_DEV, "type", "veth"])
                        .args(["peer", "name", &port, "netns", switch])
                        .run()?;
                    iproute(switch, &["link", "set", &port, "master", OVERLAY_BRIDGE]).run()?;
                    iproute(switch, &["link", "set", &port, "up"]).run()?;
                }
            }
        }

        // Each host: address on the link, VXLAN device, overlay bridge.
        let mtu = OVERLAY_MTU.to_string();
        let vni = VXLAN_VNI.to_string();
        let port = VXLAN_PORT.to_string();
        for host in &hosts {
            let ns = host.netns.as_str();
            let addr = format!("{}/{HOST_PREFIX_LEN}", host.host_ip);
            let local = host.host_ip.to_string();
            iproute(ns, &["addr", "add", &addr, "dev", LINK_DEV]).run()?;
            iproute(ns, &["link", "set", LINK_DEV, "up"]).run()?;
            iproute(
                ns,
                &["link", "add", OVERLAY_DEV, "mtu", &mtu, "type", "vxlan"],
            )
            .args(["id", &vni, "dstport", &port, "local", &local])
            .args(["dev", LINK_DEV, "learning"])
            .run()?;
            for other in hosts.iter().filter(|o| o.index != host.index) {
                let dst = other.host_ip.to_string();
                let mut cmd = Command::new("bridge");
                cmd.args(["-n", ns, "fdb", "append", "00:00:00:00:00:00"])
                    .args(["dev", OVERLAY_DEV, "dst", &dst]);
                run(&mut cmd)?;
            }
            iproute(ns, &["link", "add", OVERLAY_BRIDGE, "type", "bridge"]).run()?;
            iproute(ns, &["link", "set", OVERLAY_DEV, "master", OVERLAY_BRIDGE]).run()?;
            iproute(ns, &["link", "set", OVERLAY_DEV, "up"]).run()?;
            iproute(ns, &["link", "set", OVERLAY_BRIDGE, "up"]).run()?;
        }
        Ok(cluster)
    }

    /// Add a container on host `host` with overlay address `ip/prefix_len`: a namespace
    /// `ff-<tag>-c-<name>` whose `eth0` (MTU 1450) is a veth with its peer on the host's `br0`.
    /// On failure nothing of the container is left behind.
    pub fn add_container(
        &mut self,
        host: usize,
        name: &str,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<ContainerInfo, TopologyError> {
        add_container(&mut self.layout, host, name, ip, prefix_len)
    }

    /// Remove a container: its processes, its veth pair and its namespace.
    pub fn remove_container(&mut self, name: &str) -> Result<(), TopologyError> {
        remove_container(&mut self.layout, name)
    }

    /// The hosts, by index.
    pub fn hosts(&self) -> &[HostInfo] {
        &self.layout.hosts
    }

    /// Host `index`.
    pub fn host(&self, index: usize) -> Result<&HostInfo, TopologyError> {
        self.layout.host(index)
    }

    /// The containers, in the order they were added.
    pub fn containers(&self) -> &[ContainerInfo] {
        &self.layout.containers
    }

    /// The container called `name`.
    pub fn container(&self, name: &str) -> Result<&ContainerInfo, TopologyError> {
        self.layout.container(name)
    }

    /// The cluster's tag.
    pub fn tag(&self) -> &str {
        &self.layout.tag
    }

    /// The switch namespace, if the cluster has one (any number of hosts but two).
    pub fn switch_netns(&self) -> Option<&str> {
        self.layout.switch_netns.as_deref()
    }

    /// `ip netns exec <netns> <program>`; see [`command_in`].
    pub fn command_in(&self, netns: &str, program: &str) -> Command {
        command_in(netns, program)
    }

    /// Counters of the VXLAN device of host `index`.
    pub fn overlay_stats(&self, index: usize) -> Result<LinkStats, TopologyError> {
        let host = self.host(index)?;
        link_stats(&host.netns, &host.overlay_dev)
    }

    /// Leave the cluster in place: no teardown on drop. Remove it later with
    /// [`PersistentCluster::teardown`] or [`teardown_tag`].
    pub fn persist(mut self) -> PersistentCluster {
        PersistentCluster {
            layout: std::mem::take(&mut self.layout),
        }
    }

    /// Hosts and containers as JSON (`{"tag", "hosts": [...], "switch_netns", "containers":
    /// [...], "next_veth"}`); [`PersistentCluster::from_description`] reads it back.
    pub fn describe(&self) -> serde_json::Value {
        self.layout.describe()
    }

    /// Tear everything down now and report what failed; every step is tried regardless.
    pub fn teardown(mut self) -> Result<(), TopologyError> {
        std::mem::take(&mut self.layout).teardown()
    }

    /// All namespaces of the cluster: hosts, the switch, containers.
    fn netns_names(&self) -> Vec<String> {
        self.layout.netns_names()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Errors are ignored: there is nobody to report them to, and a panic here while
        // unwinding would abort. `teardown` is the reporting variant.
        let _ = std::mem::take(&mut self.layout).teardown();
    }
}

impl PersistentCluster {
    /// Read back the JSON of [`Cluster::describe`] (e.g. kept in a file by the CLI). The names
    /// in it are checked against the naming scheme, so that a teardown can only ever remove
    /// namespaces of the cluster's own tag.
    pub fn from_description(value: &serde_json::Value) -> Result<Self, TopologyError> {
        let layout: Layout = Layout::deserialize(value)
            .map_err(|e| TopologyError::InvalidSpec(format!("not a cluster description: {e}")))?;
        layout.validate()?;
        Ok(Self { layout })
    }

    /// Take ownership again: the returned [`Cluster`] tears down on drop.
    pub fn into_cluster(self) -> Result<Cluster, TopologyError> {
        self.layout.validate()?;
        Ok(Cluster {
            layout: self.layout,
        })
    }

    /// The hosts, by index.
    pub fn hosts(&self) -> &[HostInfo] {
        &self.layout.hosts
    }

    /// The containers, in the order they were added.
    pub fn containers(&self) -> &[ContainerInfo] {
        &self.layout.containers
    }

    /// The cluster's tag.
    pub fn tag(&self) -> &str {
        &self.layout.tag
    }

    /// See [`Cluster::add_container`].
    pub fn add_container(
        &mut self,
        host: usize,
        name: &str,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<ContainerInfo, TopologyError> {
        add_container(&mut self.layout, host, name, ip, prefix_len)
    }

    /// See [`Cluster::remove_container`].
    pub fn remove_container(&mut self, name: &str) -> Result<(), TopologyError> {
        remove_container(&mut self.layout, name)
    }

    /// See [`Cluster::describe`].
    pub fn describe(&self) -> serde_json::Value {
        self.layout.describe()
    }

    /// Tear the cluster down; see [`Cluster::teardown`].
    pub fn teardown(self) -> Result<(), TopologyError> {
        self.layout.teardown()
    }
}

impl Layout {
    fn host(&self, index: usize) -> Result<&HostInfo, TopologyError> {
        self.hosts.get(index).ok_or(TopologyError::NoSuchHost {
            index,
            count: self.hosts.len(),
        })
    }

    fn container(&self, name: &str) -> Result<&ContainerInfo, TopologyError> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| TopologyError::NoSuchContainer(name.to_owned()))
    }

    fn netns_names(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.netns.clone())
            .chain(self.switch_netns.clone())
            .chain(self.containers.iter().map(|c| c.netns.clone()))
            .collect()
    }

    fn describe(&self) -> serde_json::Value {
        // Serializing plain strings, numbers and addresses cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Check that every name follows the naming scheme of `tag`.
    fn validate(&self) -> Result<(), TopologyError> {
        validate_tag(&self.tag)?;
        let bad = |what: String| Err(TopologyError::InvalidSpec(what));
        for (index, host) in self.hosts.iter().enumerate() {
            if host.index != index
                || index >= MAX_HOSTS
                || host.netns != host_netns(&self.tag, index)
                || host.netns_path != netns_path(&host.netns)
            {
                return bad(format!(
                    "host entry {index} does not match tag {}",
                    self.tag
                ));
            }
        }
        if let Some(sw) = &self.switch_netns {
            if *sw != switch_netns(&self.tag) {
                return bad(format!("switch {sw:?} does not match tag {}", self.tag));
            }
        }
        for c in &self.containers {
            validate_container_name(&c.name)?;
            if c.netns != container_netns(&self.tag, &c.name)
                || c.netns_path != netns_path(&c.netns)
                || c.host >= self.hosts.len()
            {
                return bad(format!(
                    "container {:?} does not match tag {}",
                    c.name, self.tag
                ));
            }
        }
        Ok(())
    }

    /// Remove containers, then hosts, then the switch; try every step.
    fn teardown(self) -> Result<(), TopologyError> {
        if self.hosts.is_empty() && self.containers.is_empty() && self.switch_netns.is_none() {
            return Ok(());
        }
        let order: Vec<String> = self
            .containers
            .iter()
            .map(|c| c.netns.clone())
            .chain(self.hosts.iter().map(|h| h.netns.clone()))
            .chain(self.switch_netns.clone())
            .collect();
        remove_all(&self.tag, &order).map(|_| ())
    }
}

fn add_container(
    layout: &mut Layout,
    host: usize,
    name: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<ContainerInfo, TopologyError> {
    validate_container_name(name)?;
    if prefix_len == 0 || prefix_len > 32 {
        return Err(TopologyError::InvalidSpec(format!(
            "prefix length {prefix_len} is not in 1..=32"
        )));
    }
    let host_ns = layout.host(host)?.netns.clone();
    if layout.containers.iter().any(|c| c.name == name) {
        return Err(TopologyError::Exists(format!("container {name:?}")));
    }
    if let Some(c) = layout.containers.iter().find(|c| c.ip == ip) {
        return Err(TopologyError::Exists(format!(
            "overlay address {ip} (container {:?})",
            c.name
        )));
    }
    ensure_root()?;
    let netns = container_netns(&layout.tag, name);
    if netns_path(&netns).symlink_metadata().is_ok() {
        return Err(TopologyError::Exists(format!("namespace {netns}")));
    }
    let host_veth = format!("vc{}", layout.next_veth);
    layout.next_veth += 1;
    let info = ContainerInfo {
        name: name.to_owned(),
        host,
        netns_path: netns_path(&netns),
        netns,
        ip,
        prefix_len,
        dev: CONTAINER_DEV.to_owned(),
        mac: container_mac(ip),
        host_veth,
    };
    add_netns(&info.netns)?;
    if let Err(e) = build_container(&info, &host_ns) {
        // Deleting the container's namespace deletes its eth0 and with it the host end; the
        // explicit delete covers a host end left over if creating the pair half failed.
        let _ = remove_netns(&info.netns);
        let _ = iproute(&host_ns, &["link", "del", &info.host_veth]).run();
        return Err(e);
    }
    layout.containers.push(info.clone());
    Ok(info)
}

fn build_container(info: &ContainerInfo, host_ns: &str) -> Result<(), TopologyError> {
    let ns = info.netns.as_str();
    let mtu = OVERLAY_MTU.to_string();
    prepare_netns(ns)?;
    iproute(ns, &["link", "add", &info.dev, "address", &info.mac])
        .args(["mtu", &mtu, "type", "veth"])
        .args([
            "peer",
            "name",
            &info.host_veth,
            "mtu",
            &mtu,
            "netns",
            host_ns,
        ])
        .run()?;
    let addr = format!("{}/{}", info.ip, info.prefix_len);
    iproute(ns, &["addr", "add", &addr, "dev", &info.dev]).run()?;
    iproute(ns, &["link", "set", &info.dev, "up"]).run()?;
    iproute(
        host_ns,
        &["link", "set", &info.host_veth, "master", OVERLAY_BRIDGE],
    )
    .run()?;
    iproute(host_ns, &["link", "set", &info.host_veth, "up"]).run()?;
    Ok(())
}

fn remove_container(layout: &mut Layout, name: &str) -> Result<(), TopologyError> {
    let pos = layout
        .containers
        .iter()
        .position(|c| c.name == name)
        .ok_or_else(|| TopologyError::NoSuchContainer(name.to_owned()))?;
    ensure_root()?;
    let info = layout.containers[pos].clone();
    remove_netns(&info.netns)?;
    layout.containers.remove(pos);
    // Normally gone with its peer; make sure, ignoring "Cannot find device".
    if let Ok(host) = layout.host(info.host) {
        let _ = iproute(&host.netns, &["link", "del", &info.host_veth]).run();
    }
    // Forget where the container's MAC was: other hosts' bridges and VXLAN devices learned it
    // behind the tunnel to this host, and would keep sending there for the ageing time (300 s)
    // if a container with the same address (hence MAC) comes back on another host. Entries that
    // were never learned are fine to miss.
    let batch = format!(
        "fdb del {mac} dev {OVERLAY_DEV} master\nfdb del {mac} dev {OVERLAY_DEV} self\n",
        mac = info.mac
    );
    for host in &layout.hosts {
        let mut cmd = Command::new("bridge");
        cmd.args(["-n", &host.netns, "-force", "-batch", "-"]);
        let _ = run_with_stdin(&mut cmd, batch.as_bytes());
    }
    Ok(())
}

/// `ip netns add`.
fn add_netns(netns: &str) -> Result<(), TopologyError> {
    // The first `ip netns add` on a machine turns /run/netns into a shared bind mount of
    // itself; two of them at once (parallel test threads) may stack two such mounts. Serialize
    // them within this process; it costs a few milliseconds per namespace.
    static NETNS_ADD: Mutex<()> = Mutex::new(());
    let _serial = NETNS_ADD.lock().unwrap_or_else(PoisonError::into_inner);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "add", netns]);
    match run(&mut cmd) {
        Ok(_) => Ok(()),
        Err(TopologyError::CommandFailed { stderr, .. }) if stderr.contains("File exists") => {
            Err(TopologyError::Exists(format!("namespace {netns}")))
        }
        Err(e) => Err(e),
    }
}

/// Settings every namespace gets before any interface is created in it: `lo` up, IPv6 off.
fn prepare_netns(netns: &str) -> Result<(), TopologyError> {
    iproute(netns, &["link", "set", "lo", "up"]).run()?;
    // Best effort: IPv6 only adds background packets (router solicitations, MLD) that disturb
    // counters, and /proc/sys may be read-only in some sandboxes. Interfaces created later take
    // `default`, existing ones `all`.
    let mut cmd = command_in(netns, "sh");
    cmd.args([
        "-c",
        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; \
         echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
    ]);
    let _ = run(&mut cmd);
    Ok(())
}

/// Remove one namespace completely: kill the processes in it, delete its links (synchronously,
/// so that veth peers in other namespaces are gone when this returns, which a namespace
/// destroyed by the kernel's cleanup work would not guarantee), then delete the name. Returns
/// whether it existed.
fn remove_netns(netns: &str) -> Result<bool, TopologyError> {
    let path = netns_path(netns);
    if path.symlink_metadata().is_err() {
        return Ok(false);
    }
    kill_processes_in(netns);
    delete_links_in(netns);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "del", netns]);
    match run(&mut cmd) {
        Ok(_) => Ok(true),
        // Someone else removed it in between: the goal is reached.
        Err(_) if path.symlink_metadata().is_err() => Ok(true),
        Err(e) => Err(e),
    }
}

/// SIGKILL every process in `netns` except ourselves; they would keep the namespace (and its
/// interfaces) alive after its name is gone.
fn kill_processes_in(netns: &str) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "pids", netns]);
    let Ok(out) = run(&mut cmd) else { return };
    let me = std::process::id();
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&p| p != me && p != 0)
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: kill takes plain integers and touches no memory; pid is a positive pid
        // reported to be in the namespace, not 0 or -1, so it cannot signal a process group.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Delete every interface but `lo` in `netns`, in one `ip -batch`; errors (e.g. a veth already
/// gone with its peer) are ignored, `ip netns del` follows anyway.
fn delete_links_in(netns: &str) {
    let mut list = ip_in(netns);
    list.args(["-j", "link", "show"]);
    let Ok(out) = run(&mut list) else { return };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return;
    };
    let batch: String = json
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|link| link.get("ifname").and_then(serde_json::Value::as_str))
        .filter(|name| *name != "lo")
        .map(|name| format!("link del dev {name}\n"))
        .collect();
    if batch.is_empty() {
        return;
    }
    let mut cmd = ip_in(netns);
    cmd.args(["-force", "-batch", "-"]);
    let _ = run_with_stdin(&mut cmd, batch.as_bytes());
}

/// `ip -n <netns>`.
fn ip_in(netns: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns]);
    cmd
}

/// A command about to be run; `iproute(ns, args).args(more).run()`.
struct Ip(Command);

fn iproute(netns: &str, args: &[&str]) -> Ip {
    let mut cmd = ip_in(netns);
    cmd.args(args);
    Ip(cmd)
}

impl Ip {
    fn args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.0.args(args);
        self
    }

    fn run(mut self) -> Result<Output, TopologyError> {
        run(&mut self.0)
    }
}

fn describe_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run to completion, capture output, fail on a non-zero exit.
fn run(cmd: &mut Command) -> Result<Output, TopologyError> {
    run_with_stdin(cmd, &[])
}

fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Result<Output, TopologyError> {
    let command = describe_command(cmd);
    if let Some(status) = fault::take_injected() {
        return Err(TopologyError::CommandFailed {
            command,
            status,
            stderr: "injected fault".into(),
        });
    }
    // Its own process group: a terminal's Ctrl-C reaches only the program using this module,
    // which decides what to do (the demo tears the cluster down); an `ip` killed half way through
    // a teardown would leave interfaces behind.
    let spawned = cmd
        .process_group(0)
        .stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(source) => return Err(TopologyError::Spawn { command, source }),
    };
    if let Some(mut input) = child.stdin.take() {
        // A write error means the child exited early; its status tells the story.
        let _ = input.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(TopologyError::CommandFailed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Fault injection for tests of cleanup after partial failure. Per thread, so parallel tests do
/// not disturb each other.
#[doc(hidden)]
pub mod fault {
    use std::cell::Cell;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    thread_local! {
        static FAIL_AFTER: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Make this thread's command number `n` from now on (0 = the next one) fail with
    /// "injected fault" instead of running. Fires once.
    pub fn fail_command_after(n: usize) {
        FAIL_AFTER.with(|f| f.set(Some(n)));
    }

    /// Cancel a pending injected fault; returns whether one was still pending.
    pub fn clear() -> bool {
        FAIL_AFTER.with(|f| f.take().is_some())
    }

    pub(super) fn take_injected() -> Option<ExitStatus> {
        FAIL_AFTER.with(|f| match f.get() {
            None => None,
            Some(0) => {
                f.set(None);
                // Wait status of a process that exited with code 1.
                Some(ExitStatus::from_raw(1 << 8))
            }
            Some(n) => {
                f.set(Some(n - 1));
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert!(validate_tag("a").is_ok());
        assert!(validate_tag("abc12345").is_ok());
        for bad in ["", "abc123456", "A", "a-b", "a_b", "é", "a b"] {
            assert!(validate_tag(bad).is_err(), "{bad:?} accepted");
        }
        for _ in 0..100 {
            let t = fresh_tag("Te-St");
            assert!(validate_tag(&t).is_ok(), "{t}");
            assert!(t.starts_with("tes"), "{t}");
        }
        assert_ne!(fresh_tag("x"), fresh_tag("x"));
    }

    #[test]
    fn names() {
        assert_eq!(host_netns("t1", 0), "ff-t1-h0");
        assert_eq!(container_netns("t1", "web-1"), "ff-t1-c-web-1");
        assert_eq!(tag_of("ff-t1-c-web-1"), Some("t1"));
        assert_eq!(tag_of("ff-t1-sw"), Some("t1"));
        assert_eq!(tag_of("ff-T1-sw"), None);
        assert_eq!(tag_of("other"), None);
        assert_eq!(host_ip(0), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(host_ip(252), Ipv4Addr::new(192, 168, 1, 253));
        assert!(validate_container_name("a").is_ok());
        assert!(validate_container_name("-a").is_err());
        assert!(validate_container_name("a/b").is_err());
        assert!(validate_container_name(&"a".repeat(33)).is_err());
    }
}
