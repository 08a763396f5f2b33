//! What a cluster is made of: its constants (interface names, addresses, VXLAN parameters,
//! limits), the request [`ClusterSpec`], and the descriptions of what was built ([`HostInfo`],
//! [`ContainerInfo`]) and of an interface's counters ([`LinkStats`]).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[cfg(doc)]
use crate::names::container_mac;
use crate::names::fresh_tag;

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
