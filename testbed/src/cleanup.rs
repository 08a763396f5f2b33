//! Teardown: removing a namespace completely (its processes, its links, then its name), a
//! whole cluster's namespaces in order, and every namespace of a tag ([`teardown_tag`]), for
//! persisted clusters, half-built ones and leftovers of killed runs.

use std::process::Command;

use crate::command::{ip_in, run, run_with_stdin};
use crate::error::TopologyError;
use crate::names::{container_netns, netns_path, switch_netns, validate_tag};
use crate::namespace::{ensure_root, netns_of_tag};
#[cfg(doc)]
use crate::Cluster;

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
pub(crate) fn remove_all(tag: &str, names: &[String]) -> Result<usize, TopologyError> {
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

/// Remove one namespace completely: kill the processes in it, delete its links (synchronously,
/// so that veth peers in other namespaces are gone when this returns, which a namespace
/// destroyed by the kernel's cleanup work would not guarantee), then delete the name. Returns
/// whether it existed.
pub(crate) fn remove_netns(netns: &str) -> Result<bool, TopologyError> {
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
        // Errors (the process is already gone) are ignored.
        let _ = freeflow_os::signals::send_signal(pid, libc::SIGKILL);
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
