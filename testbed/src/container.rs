//! Containers: adding one to a cluster (a namespace whose `eth0` is a veth with its peer on the
//! host's overlay bridge) and removing it again, leaving nothing of it behind either way.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::cleanup::remove_netns;
use crate::cluster::Layout;
use crate::command::{iproute, run_with_stdin};
use crate::error::TopologyError;
use crate::names::{container_mac, container_netns, netns_path, validate_container_name};
use crate::namespace::{add_netns, ensure_root, prepare_netns};
use crate::spec::{ContainerInfo, CONTAINER_DEV, OVERLAY_BRIDGE, OVERLAY_DEV, OVERLAY_MTU};

pub(crate) fn add_container(
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

pub(crate) fn remove_container(layout: &mut Layout, name: &str) -> Result<(), TopologyError> {
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
