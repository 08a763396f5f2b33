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
//!
//! Where to read: [`spec`] (what a cluster is made of, and its constants), [`names`] (the naming
//! scheme), `cluster` ([`Cluster`] and how [`Cluster::create`] proceeds), `network` (the
//! physical link and each host's overlay), `container` (adding and removing containers),
//! `namespace` (one namespace: add, prepare, list, counters), `cleanup` (teardown), `command`
//! (running `ip` and `bridge`, with [`fault`] injection for tests) and [`test_support`] (what the
//! tests that build clusters share).
//!
//! Unsafe code: none; the crate root denies it. The two system calls std does not offer (the
//! effective uid, SIGKILL for processes left in a namespace) come from `freeflow-os`.

#![deny(unsafe_code)]

mod cleanup;
mod cluster;
mod command;
mod container;
mod error;
pub mod etcd;
pub mod names;
mod namespace;
mod network;
pub mod spec;
pub mod test_support;

pub use cleanup::teardown_tag;
pub use cluster::{Cluster, PersistentCluster};
pub use command::{command_in, fault};
pub use error::TopologyError;
pub use names::{
    container_mac, container_netns, fresh_tag, host_ip, host_netns, netns_path, switch_netns,
    validate_container_name, validate_tag,
};
pub use namespace::{ensure_root, link_stats, list_netns, list_tags, netns_of_tag};
pub use spec::{
    ClusterSpec, ContainerInfo, HostInfo, LinkStats, CONTAINER_DEV, HOST_PREFIX_LEN, LINK_DEV,
    MAX_CONTAINER_NAME_LEN, MAX_HOSTS, MAX_TAG_LEN, NAME_PREFIX, NETNS_DIR, OVERLAY_BRIDGE,
    OVERLAY_DEV, OVERLAY_MTU, VXLAN_PORT, VXLAN_VNI,
};
