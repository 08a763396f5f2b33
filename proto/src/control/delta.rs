//! Incremental table pushes: what changed between two tables the daemon built
//! ([`TableDelta::between`]), and the table a router serves as full pushes and deltas change it
//! ([`ServedTable`]). A delta names the table generation it applies to; a router whose table
//! is another generation (it restarted, another daemon pushed, a push was lost) refuses it, and
//! the daemon sends the full table instead.

use super::{ContainerEntry, NetworkView, OverlayEntry, PeerHost};
use crate::identity::NetnsId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

/// The changes from one table to the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDelta {
    /// The generation of the table it applies to (the router's must be this one).
    pub base: u64,
    /// The generation of the table after it.
    pub generation: u64,
    /// Containers added or changed, by network namespace.
    #[serde(default)]
    pub upserted: Vec<ContainerEntry>,
    /// Network namespaces of the containers removed.
    #[serde(default)]
    pub removed: Vec<NetnsId>,
    /// The cluster's changes; `None`: the cluster did not change.
    #[serde(default)]
    pub network: Option<NetworkDelta>,
}

/// The changes to the cluster. Hosts are few (one per host of the cluster), so they come
/// whole; overlay addresses come as the entries that went and came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDelta {
    pub host_ip: Ipv4Addr,
    pub peer_port: u16,
    pub hosts: Vec<PeerHost>,
    #[serde(default)]
    pub overlay_added: Vec<OverlayEntry>,
    #[serde(default)]
    pub overlay_removed: Vec<OverlayEntry>,
}

/// Why a router refused a delta; the table is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("the delta applies to table generation {base}, the router's is {}", describe(*.have))]
    Base { base: u64, have: Option<u64> },
    #[error("the delta removes a container the table does not hold (net:[{}])", .0.ino)]
    NoSuchContainer(NetnsId),
    #[error("the delta names network namespace net:[{}] twice", .0.ino)]
    Repeated(NetnsId),
    #[error("the delta removes overlay address {} of tenant {:?} on host {}, which the table does not hold", .0.ip, .0.tenant, .0.host_ip)]
    NoSuchOverlay(OverlayEntry),
}

fn describe(have: Option<u64>) -> String {
    have.map_or_else(
        || "none (it took no numbered table)".into(),
        |g| g.to_string(),
    )
}

/// What applying a delta changed, for the router to pass on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Containers removed or replaced (their entries before the delta): their attachments go.
    pub gone: Vec<ContainerEntry>,
    /// The containers changed.
    pub containers_changed: bool,
    /// The cluster changed.
    pub network_changed: bool,
}

impl TableDelta {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty() && self.network.is_none()
    }

    /// The delta from table `old` to table `new` (each: this host's containers, no network
    /// namespace twice, and the cluster), numbered `base` to `generation`. A `new` without a
    /// cluster keeps the old one (as a full push without one does).
    pub fn between(
        old: (&[ContainerEntry], Option<&NetworkView>),
        new: (&[ContainerEntry], Option<&NetworkView>),
        base: u64,
        generation: u64,
    ) -> TableDelta {
        let before: HashMap<NetnsId, &ContainerEntry> =
            old.0.iter().map(|c| (c.netns, c)).collect();
        let after: HashMap<NetnsId, &ContainerEntry> = new.0.iter().map(|c| (c.netns, c)).collect();
        let upserted = new
            .0
            .iter()
            .filter(|c| before.get(&c.netns) != Some(c))
            .cloned()
            .collect();
        let removed = old
            .0
            .iter()
            .filter(|c| !after.contains_key(&c.netns))
            .map(|c| c.netns)
            .collect();
        let network = match (old.1, new.1) {
            (_, None) => None,
            (Some(o), Some(n)) if o == n => None,
            (o, Some(n)) => Some(network_delta(o, n)),
        };
        TableDelta {
            base,
            generation,
            upserted,
            removed,
            network,
        }
    }
}

/// Overlay entries as a multiset (a view may list one twice).
fn counted(overlay: &[OverlayEntry]) -> BTreeMap<&OverlayEntry, usize> {
    let mut counts = BTreeMap::new();
    for e in overlay {
        *counts.entry(e).or_insert(0) += 1;
    }
    counts
}

fn network_delta(old: Option<&NetworkView>, new: &NetworkView) -> NetworkDelta {
    let before = counted(old.map_or(&[][..], |o| &o.overlay));
    let after = counted(&new.overlay);
    let mut overlay_added = Vec::new();
    let mut overlay_removed = Vec::new();
    for (&entry, &n) in &after {
        let had = before.get(entry).copied().unwrap_or(0);
        overlay_added.extend(std::iter::repeat_n(entry, n.saturating_sub(had)).cloned());
    }
    for (&entry, &n) in &before {
        let has = after.get(entry).copied().unwrap_or(0);
        overlay_removed.extend(std::iter::repeat_n(entry, n.saturating_sub(has)).cloned());
    }
    NetworkDelta {
        host_ip: new.host_ip,
        peer_port: new.peer_port,
        hosts: new.hosts.clone(),
        overlay_added,
        overlay_removed,
    }
}

/// The cluster as a router holds it: overlay addresses counted, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedNetwork {
    pub host_ip: Ipv4Addr,
    pub peer_port: u16,
    pub hosts: Vec<PeerHost>,
    pub overlay: BTreeMap<OverlayEntry, usize>,
}

impl ServedNetwork {
    fn from_view(view: NetworkView) -> ServedNetwork {
        let mut overlay = BTreeMap::new();
        for e in view.overlay {
            *overlay.entry(e).or_insert(0) += 1;
        }
        ServedNetwork {
            host_ip: view.host_ip,
            peer_port: view.peer_port,
            hosts: view.hosts,
            overlay,
        }
    }

    /// As a view (overlay addresses in order).
    pub fn view(&self) -> NetworkView {
        NetworkView {
            host_ip: self.host_ip,
            peer_port: self.peer_port,
            hosts: self.hosts.clone(),
            overlay: self
                .overlay
                .iter()
                .flat_map(|(e, &n)| std::iter::repeat_n(e, n).cloned())
                .collect(),
        }
    }
}

/// The table a router serves: its host's containers by network namespace, the cluster, and
/// the generation the daemon numbered it with (`None` after a push without a number).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServedTable {
    pub containers: HashMap<NetnsId, ContainerEntry>,
    pub network: Option<ServedNetwork>,
    pub generation: Option<u64>,
}

impl ServedTable {
    /// Replaces the table with a full push (`network: None` keeps the cluster). Returns the
    /// containers removed or replaced. Refused (table unchanged) when two containers share a
    /// network namespace.
    pub fn set_full(
        &mut self,
        containers: Vec<ContainerEntry>,
        network: Option<NetworkView>,
        generation: Option<u64>,
    ) -> Result<Vec<ContainerEntry>, String> {
        let mut table = HashMap::with_capacity(containers.len());
        for c in containers {
            if let Some(other) = table.insert(c.netns, c.clone()) {
                return Err(format!(
                    "containers {} and {} share a network namespace",
                    other.name, c.name
                ));
            }
        }
        let gone = self
            .containers
            .values()
            .filter(|c| table.get(&c.netns) != Some(c))
            .cloned()
            .collect();
        self.containers = table;
        if let Some(view) = network {
            self.network = Some(ServedNetwork::from_view(view));
        }
        self.generation = generation;
        Ok(gone)
    }

    /// Applies `delta`, in time proportional to its size, if it applies to this table's
    /// generation and everything it removes is there; otherwise changes nothing.
    pub fn apply(&mut self, delta: TableDelta) -> Result<Applied, DeltaError> {
        if self.generation != Some(delta.base) {
            return Err(DeltaError::Base {
                base: delta.base,
                have: self.generation,
            });
        }
        // Checked before anything changes: a refused delta leaves the table as it was.
        let mut named = std::collections::HashSet::new();
        for &ns in delta
            .removed
            .iter()
            .chain(delta.upserted.iter().map(|c| &c.netns))
        {
            if !named.insert(ns) {
                return Err(DeltaError::Repeated(ns));
            }
        }
        if let Some(&ns) = delta
            .removed
            .iter()
            .find(|ns| !self.containers.contains_key(ns))
        {
            return Err(DeltaError::NoSuchContainer(ns));
        }
        if let Some(net) = &delta.network {
            let mut wanted: BTreeMap<&OverlayEntry, usize> = BTreeMap::new();
            for e in &net.overlay_removed {
                *wanted.entry(e).or_insert(0) += 1;
            }
            let held = |e: &OverlayEntry| {
                self.network
                    .as_ref()
                    .and_then(|n| n.overlay.get(e).copied())
                    .unwrap_or(0)
            };
            if let Some((&e, _)) = wanted.iter().find(|&(&e, &n)| held(e) < n) {
                return Err(DeltaError::NoSuchOverlay(e.clone()));
            }
        }
        let mut applied = Applied {
            containers_changed: !delta.removed.is_empty() || !delta.upserted.is_empty(),
            network_changed: delta.network.is_some(),
            gone: Vec::new(),
        };
        for ns in &delta.removed {
            applied.gone.extend(self.containers.remove(ns));
        }
        for c in delta.upserted {
            applied.gone.extend(self.containers.insert(c.netns, c));
        }
        if let Some(net) = delta.network {
            let served = self.network.get_or_insert_with(|| ServedNetwork {
                host_ip: net.host_ip,
                peer_port: net.peer_port,
                hosts: Vec::new(),
                overlay: BTreeMap::new(),
            });
            served.host_ip = net.host_ip;
            served.peer_port = net.peer_port;
            served.hosts = net.hosts;
            for e in net.overlay_removed {
                if let std::collections::btree_map::Entry::Occupied(mut slot) =
                    served.overlay.entry(e)
                {
                    *slot.get_mut() -= 1;
                    if *slot.get() == 0 {
                        slot.remove();
                    }
                }
            }
            for e in net.overlay_added {
                *served.overlay.entry(e).or_insert(0) += 1;
            }
        }
        self.generation = Some(delta.generation);
        Ok(applied)
    }

    /// The containers, by name.
    pub fn container_list(&self) -> Vec<ContainerEntry> {
        let mut containers: Vec<ContainerEntry> = self.containers.values().cloned().collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name).then(a.netns.ino.cmp(&b.netns.ino)));
        containers
    }

    /// The cluster as a view, if a push carried one.
    pub fn network_view(&self) -> Option<NetworkView> {
        self.network.as_ref().map(ServedNetwork::view)
    }
}

#[cfg(test)]
mod tests;
