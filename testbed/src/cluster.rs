//! A cluster: [`Cluster`] (torn down on drop) and [`PersistentCluster`] (left in place, kept as
//! JSON between runs), both over one `Layout` of what was built; how [`Cluster::create`]
//! proceeds, step by step.

use std::net::Ipv4Addr;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::cleanup::remove_all;
use crate::command::command_in;
use crate::container::{add_container, remove_container};
use crate::error::TopologyError;
use crate::names::{
    container_netns, host_ip, host_netns, netns_path, switch_netns, validate_container_name,
    validate_tag,
};
use crate::namespace::{add_netns, ensure_root, link_stats, netns_of_tag, prepare_netns};
use crate::network::{build_host_overlay, build_physical_link};
use crate::spec::{
    ClusterSpec, ContainerInfo, HostInfo, LinkStats, LINK_DEV, MAX_HOSTS, OVERLAY_BRIDGE,
    OVERLAY_DEV,
};
#[cfg(doc)]
use crate::teardown_tag;

/// Everything a cluster consists of; the serialized form is what [`Cluster::describe`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Layout {
    pub(crate) tag: String,
    pub(crate) hosts: Vec<HostInfo>,
    /// The switch namespace, present unless there are exactly two hosts.
    pub(crate) switch_netns: Option<String>,
    pub(crate) containers: Vec<ContainerInfo>,
    /// Number for the next host-side veth name `vc<n>`; never reused within a cluster.
    #[serde(default)]
    pub(crate) next_veth: u64,
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

/// The methods [`Cluster`] and [`PersistentCluster`] share, each a view of (or a change to) the
/// `layout` both hold. A macro rather than a trait, so that callers need no import.
macro_rules! layout_methods {
    ($cluster:ty) => {
        impl $cluster {
            /// Add a container on host `host` with overlay address `ip/prefix_len`: a namespace
            /// `ff-<tag>-c-<name>` whose `eth0` (MTU 1450) is a veth with its peer on the host's
            /// `br0`. On failure nothing of the container is left behind.
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

            /// The containers, in the order they were added.
            pub fn containers(&self) -> &[ContainerInfo] {
                &self.layout.containers
            }

            /// The cluster's tag.
            pub fn tag(&self) -> &str {
                &self.layout.tag
            }

            /// Hosts and containers as JSON (`{"tag", "hosts": [...], "switch_netns",
            /// "containers": [...], "next_veth"}`); [`PersistentCluster::from_description`]
            /// reads it back.
            pub fn describe(&self) -> serde_json::Value {
                self.layout.describe()
            }
        }
    };
}

layout_methods!(Cluster);
layout_methods!(PersistentCluster);

impl Cluster {
    /// Build the cluster. Refuses a tag that any namespace on the machine already uses. On a
    /// failure half way, whatever was built is torn down before the error is returned.
    pub fn create(spec: ClusterSpec) -> Result<Cluster, TopologyError> {
        check_spec(&spec)?;
        // From here on, `cluster` records each namespace as soon as it exists, so that an early
        // return through `?` drops it and the drop removes exactly what this call made.
        let mut cluster = Cluster {
            layout: Layout {
                tag: spec.tag.clone(),
                ..Layout::default()
            },
        };
        cluster.add_namespaces(spec.hosts)?;
        // Namespace-wide settings first, so interfaces created later inherit them.
        for netns in &cluster.netns_names() {
            prepare_netns(netns)?;
        }
        let hosts = cluster.layout.hosts.clone();
        build_physical_link(&hosts, cluster.layout.switch_netns.as_deref())?;
        for host in &hosts {
            build_host_overlay(host, &hosts)?;
        }
        Ok(cluster)
    }

    /// The namespaces of the hosts and, unless there are exactly two hosts, of the switch; each
    /// recorded in the layout as soon as it exists.
    fn add_namespaces(&mut self, hosts: usize) -> Result<(), TopologyError> {
        let tag = self.layout.tag.clone();
        for index in 0..hosts {
            let netns = host_netns(&tag, index);
            add_netns(&netns)?;
            self.layout.hosts.push(HostInfo {
                index,
                netns_path: netns_path(&netns),
                netns,
                host_ip: host_ip(index),
                link_dev: LINK_DEV.to_owned(),
                overlay_dev: OVERLAY_DEV.to_owned(),
                bridge_dev: OVERLAY_BRIDGE.to_owned(),
            });
        }
        if hosts != 2 {
            let netns = switch_netns(&tag);
            add_netns(&netns)?;
            self.layout.switch_netns = Some(netns);
        }
        Ok(())
    }

    /// Host `index`.
    pub fn host(&self, index: usize) -> Result<&HostInfo, TopologyError> {
        self.layout.host(index)
    }

    /// The container called `name`.
    pub fn container(&self, name: &str) -> Result<&ContainerInfo, TopologyError> {
        self.layout.container(name)
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

    /// Tear everything down now and report what failed; every step is tried regardless.
    pub fn teardown(mut self) -> Result<(), TopologyError> {
        std::mem::take(&mut self.layout).teardown()
    }

    /// All namespaces of the cluster: hosts, the switch, containers.
    fn netns_names(&self) -> Vec<String> {
        self.layout.netns_names()
    }
}

/// Refuse a spec that cannot be built: a bad tag, a number of hosts out of range, or a tag that
/// a namespace on the machine already uses. Needs root for the last check.
fn check_spec(spec: &ClusterSpec) -> Result<(), TopologyError> {
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
    Ok(())
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

    /// Tear the cluster down; see [`Cluster::teardown`].
    pub fn teardown(self) -> Result<(), TopologyError> {
        self.layout.teardown()
    }
}

impl Layout {
    pub(crate) fn host(&self, index: usize) -> Result<&HostInfo, TopologyError> {
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
