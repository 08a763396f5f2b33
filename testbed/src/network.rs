//! The network of the hosts: the physical link (a veth pair between two hosts, or one veth per
//! host to the switch's bridge) and, on each host, its link address, the VXLAN device with
//! head-end replication towards every other host, and the overlay bridge.

use std::process::Command;

use crate::command::{iproute, run};
use crate::error::TopologyError;
use crate::spec::{
    HostInfo, HOST_PREFIX_LEN, LINK_DEV, OVERLAY_BRIDGE, OVERLAY_DEV, OVERLAY_MTU, VXLAN_PORT,
    VXLAN_VNI,
};

/// The physical network: with no switch (exactly two hosts) one veth pair joins the hosts'
/// `eth0`s; otherwise each host's `eth0` is a veth whose peer `h<index>` is a port of the
/// switch's bridge.
pub(crate) fn build_physical_link(
    hosts: &[HostInfo],
    switch: Option<&str>,
) -> Result<(), TopologyError> {
    match switch {
        None => {
            iproute(&hosts[0].netns, &["link", "add", LINK_DEV, "type", "veth"])
                .args(["peer", "name", LINK_DEV, "netns", &hosts[1].netns])
                .run()?;
        }
        Some(switch) => {
            iproute(switch, &["link", "add", OVERLAY_BRIDGE, "type", "bridge"]).run()?;
            iproute(switch, &["link", "set", OVERLAY_BRIDGE, "up"]).run()?;
            for host in hosts {
                let port = format!("h{}", host.index);
                iproute(&host.netns, &["link", "add", LINK_DEV, "type", "veth"])
                    .args(["peer", "name", &port, "netns", switch])
                    .run()?;
                iproute(switch, &["link", "set", &port, "master", OVERLAY_BRIDGE]).run()?;
                iproute(switch, &["link", "set", &port, "up"]).run()?;
            }
        }
    }
    Ok(())
}

/// One host: address on the link, VXLAN device (with an all-zeros FDB entry towards each of the
/// other `hosts`), overlay bridge.
pub(crate) fn build_host_overlay(host: &HostInfo, hosts: &[HostInfo]) -> Result<(), TopologyError> {
    let mtu = OVERLAY_MTU.to_string();
    let vni = VXLAN_VNI.to_string();
    let port = VXLAN_PORT.to_string();
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
    Ok(())
}
