//! The cluster as the daemon last described it: this host, and where each registered overlay
//! address lives and whose it is. Every decision about a container's traffic (which connects
//! are accelerated, which announcements are believed, which peers are accepted) checks it.

use freeflow_proto::control::NetworkView;
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Where a registered overlay address lives, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Placement {
    pub tenant: String,
    pub host: Ipv4Addr,
}

#[derive(Default)]
pub(super) struct Registry {
    network: Option<NetworkView>,
    overlay: HashMap<Ipv4Addr, Placement>,
}

impl Registry {
    /// Whether `network` moves this host's address or peer port.
    pub fn changes_host(&self, network: &NetworkView) -> bool {
        self.network.as_ref().map(|n| (n.host_ip, n.peer_port))
            != Some((network.host_ip, network.peer_port))
    }

    /// Takes a new view of the cluster.
    pub fn set(&mut self, network: NetworkView) {
        self.overlay = network
            .overlay
            .iter()
            .map(|e| {
                let placement = Placement {
                    tenant: e.tenant.clone(),
                    host: e.host_ip,
                };
                (e.ip, placement)
            })
            .collect();
        self.network = Some(network);
    }

    /// This host's address, once the daemon has said it (a router run alone has none).
    pub fn host_ip(&self) -> Option<Ipv4Addr> {
        self.network.as_ref().map(|n| n.host_ip)
    }

    pub fn placement(&self, overlay_ip: Ipv4Addr) -> Option<&Placement> {
        self.overlay.get(&overlay_ip)
    }

    /// Whether some registered overlay address lives on `host`.
    pub fn places_on(&self, host: Ipv4Addr) -> bool {
        self.overlay.values().any(|p| p.host == host)
    }
}
