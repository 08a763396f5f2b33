//! One namespace at a time: checking for root, adding a namespace and preparing it (`lo` up,
//! IPv6 off), listing the namespaces on the machine and those of a cluster, and reading an
//! interface's counters.

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use crate::command::{command_in, describe_command, ip_in, iproute, run};
use crate::error::TopologyError;
use crate::names::tag_of;
use crate::spec::{LinkStats, NETNS_DIR};

/// Fail with [`TopologyError::NotRoot`] unless the effective uid is 0.
pub fn ensure_root() -> Result<(), TopologyError> {
    let euid = freeflow_os::process::effective_uid();
    if euid == 0 {
        Ok(())
    } else {
        Err(TopologyError::NotRoot { euid })
    }
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

/// `ip netns add`.
pub(crate) fn add_netns(netns: &str) -> Result<(), TopologyError> {
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
pub(crate) fn prepare_netns(netns: &str) -> Result<(), TopologyError> {
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
