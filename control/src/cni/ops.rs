//! The CNI operations on freeflow's registry, through the same library calls as
//! `freeflow container add|rm` (never a write of the registry of another kind).
//!
//! - ADD fails (and leaves nothing registered) when Freeflow is not set up for `freeflowDir`,
//!   when the address is outside the host's overlay prefix, when the registry refuses the
//!   container, or when the running daemon reads the registration and skips it. With no daemon
//!   running it succeeds: the container is served once `freeflow up` runs (as with the CLI).
//! - DEL succeeds when there is nothing to remove, also when Freeflow is not set up at all: a
//!   runtime must always be able to delete a container.
//! - STATUS reports "not available" only when ADD would fail for every container (Freeflow not
//!   set up, registry unreadable); a stopped daemon does not make the node's network unready,
//!   because containers still work without acceleration.
//! - GC succeeds without removing anything: registry names do not record which network made
//!   them, so the attachments of one network's GC list cannot tell another network's
//!   registrations from stale ones. DEL is what unregisters.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use serde_json::Value;

use super::spec::{self, code, CniError, NetConf};
use super::Attachment;
use crate::cli::container::{self, NewContainer, Pickup};
use crate::cli::CliError;
use crate::config::{Config, RuntimeDir};
use crate::daemon::DaemonStatus;
use crate::registry::{self, ContainerRecord, RegistryError};

/// ADD: registers the container and returns `prevResult` unchanged.
pub(super) fn add(conf: &NetConf, att: &Attachment) -> Result<Value, CniError> {
    let prev = prev_result(conf)?;
    let netns = existing_netns(att)?;
    let (dir, config) = open_host(conf)?;
    let ip = container_ip(prev, att, &config, &dir)?;
    let name = spec::container_name(&att.container_id, &att.ifname);
    let tenant = conf.tenant(&att.args);
    let wanted = ContainerRecord {
        name: name.clone(),
        tenant: tenant.clone(),
        ip,
        netns: std::path::absolute(netns).unwrap_or_else(|_| netns.to_owned()),
        host_ip: config.host_ip,
    };
    if registered(&config)?.container(&name) == Some(&wanted) {
        // A repeated ADD (the runtime retried): nothing to change.
        return Ok(prev.clone());
    }
    let new = NewContainer {
        name: &name,
        tenant: &tenant,
        ip,
        netns,
        allow_host_netns: false,
    };
    let (_, pickup) = container::register(&dir, &config, new)
        .map_err(|e| from_cli(e, "freeflow refused to register the container"))?;
    match pickup {
        Pickup::Served | Pickup::Pending => {}
        Pickup::NoDaemon => note(format_args!(
            "registered {name} ({ip}), but no freeflow daemon runs for {}: it is accelerated \
             once `freeflow up` runs",
            dir.path().display()
        )),
        Pickup::Skipped(reason) => {
            // Leave nothing behind: the runtime may not call DEL after a failed ADD.
            let _ = container::unregister(&dir, &config, &name);
            return Err(CniError::new(
                code::NOT_SERVED,
                "the freeflow daemon does not serve the container",
                format!("the daemon skipped {name} ({ip}): {reason}"),
            ));
        }
    }
    Ok(prev.clone())
}

/// DEL: unregisters the container if it is registered.
pub(super) fn del(conf: &NetConf, att: &Attachment) -> Result<(), CniError> {
    let name = spec::container_name(&att.container_id, &att.ifname);
    let (dir, config) = match open_host(conf) {
        Ok(host) => host,
        Err(e) if e.code == code::NOT_SET_UP => {
            note(format_args!("nothing to remove for {name}: {}", e.details));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    container::unregister(&dir, &config, &name)
        .map_err(|e| from_cli(e, "cannot unregister the container"))?;
    Ok(())
}

/// CHECK: the container is registered on this host with the chain's address, its namespace
/// and its tenant, and the daemon does not skip it.
pub(super) fn check(conf: &NetConf, att: &Attachment) -> Result<(), CniError> {
    if !spec::version_at_least(&conf.cni_version, "0.4.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "CHECK needs CNI 0.4.0 or later",
            format!("the configuration's cniVersion is {}", conf.cni_version),
        ));
    }
    let prev = prev_result(conf)?;
    let netns = existing_netns(att)?;
    let (dir, config) = open_host(conf)?;
    let ip = container_ip(prev, att, &config, &dir)?;
    let name = spec::container_name(&att.container_id, &att.ifname);
    let snapshot = registered(&config)?;
    let differs = |what: String| {
        CniError::new(
            code::NOT_SERVED,
            "the freeflow registration does not match",
            format!("container {name}: {what}"),
        )
    };
    let record = snapshot
        .container(&name)
        .ok_or_else(|| differs("not registered".to_owned()))?;
    let tenant = conf.tenant(&att.args);
    let netns = std::path::absolute(netns).unwrap_or_else(|_| netns.to_owned());
    for (field, has, wants) in [
        ("address", record.ip.to_string(), ip.to_string()),
        ("tenant", record.tenant.clone(), tenant),
        (
            "host",
            record.host_ip.to_string(),
            config.host_ip.to_string(),
        ),
        (
            "namespace",
            record.netns.display().to_string(),
            netns.display().to_string(),
        ),
    ] {
        if has != wants {
            return Err(differs(format!(
                "registered {field} {has}, expected {wants}"
            )));
        }
    }
    let skipped = DaemonStatus::read(&dir)
        .and_then(|st| st.counters.skipped.into_iter().find(|s| s.name == name));
    match skipped {
        Some(s) => Err(differs(format!("the daemon skips it: {}", s.reason))),
        None => Ok(()),
    }
}

/// STATUS: fails with "not available" when no ADD could succeed.
pub(super) fn status(conf: &NetConf) -> Result<(), CniError> {
    need_1_1(conf, "STATUS")?;
    let unavailable = |e: CniError| CniError::new(code::NOT_AVAILABLE, e.msg, e.details);
    let (_, config) = open_host(conf).map_err(unavailable)?;
    registered(&config).map_err(unavailable)?;
    Ok(())
}

/// GC: nothing to collect (see the module documentation).
pub(super) fn gc(conf: &NetConf) -> Result<(), CniError> {
    need_1_1(conf, "GC")
}

fn need_1_1(conf: &NetConf, command: &str) -> Result<(), CniError> {
    if spec::version_at_least(&conf.cni_version, "1.1.0") {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("{command} needs CNI 1.1.0"),
        format!("the configuration's cniVersion is {}", conf.cni_version),
    ))
}

/// The runtime and state directories and the settings of `freeflow up` for `freeflowDir`.
fn open_host(conf: &NetConf) -> Result<(RuntimeDir, Config), CniError> {
    let path = conf.freeflow_dir();
    let not_set_up = |e: crate::config::ConfigError| {
        CniError::new(
            code::NOT_SET_UP,
            "freeflow is not set up on this host",
            format!(
                "{e}; run `freeflow up --dir {}` on this host first, or set \"freeflowDir\" in \
                 the plugin's configuration",
                path.display()
            ),
        )
    };
    let dir =
        RuntimeDir::with_state(&path, conf.freeflow_state_dir.as_deref()).map_err(not_set_up)?;
    let config = Config::load(&dir).map_err(not_set_up)?;
    Ok((dir, config))
}

/// The registry's current contents.
fn registered(config: &Config) -> Result<registry::Snapshot, CniError> {
    registry::open(&config.registry)
        .and_then(|r| r.load())
        .map_err(|e| from_cli(e.into(), "cannot read the freeflow registry"))
}

fn prev_result(conf: &NetConf) -> Result<&Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult is missing",
            "freeflow-cni is a chained plugin: list it in a configuration list after the plugin \
             that gives the container its interface and address (bridge with host-local, \
             flannel, calico)",
        )
    })
}

fn existing_netns(att: &Attachment) -> Result<&Path, CniError> {
    let Some(netns) = att.netns.as_deref() else {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set",
            "the container runtime must set CNI_NETNS for ADD and CHECK",
        ));
    };
    if netns.exists() {
        return Ok(netns);
    }
    Err(CniError::new(
        code::UNKNOWN_CONTAINER,
        "the container's network namespace does not exist",
        format!("CNI_NETNS {} does not exist", netns.display()),
    ))
}

/// The first IPv4 address `prevResult` gives the container's interface inside the host's
/// overlay prefix.
fn container_ip(
    prev: &Value,
    att: &Attachment,
    config: &Config,
    dir: &RuntimeDir,
) -> Result<Ipv4Addr, CniError> {
    let ips = spec::container_ipv4s(prev, &att.ifname)?;
    let prefix = config.vnet_prefix;
    if let Some(ip) = ips.iter().find(|ip| prefix.contains(*ip)) {
        return Ok(*ip);
    }
    if ips.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult has no IPv4 address for the container",
            format!(
                "no IPv4 address of interface {} in prevResult; the plugin before freeflow-cni \
                 must assign one (e.g. ipam host-local with an IPv4 subnet)",
                att.ifname
            ),
        ));
    }
    let list: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
    Err(CniError::new(
        code::OUTSIDE_OVERLAY,
        "the container's address is outside freeflow's overlay prefix",
        format!(
            "address {} (from prevResult) is outside the overlay prefix {prefix} that `freeflow \
             up` set for {} (VNET_PREFIX); give the network plugin's IPAM a subnet inside it",
            list.join(", "),
            dir.path().display()
        ),
    ))
}

/// A CNI error for a failed registry or CLI library call: `msg`, and the call's own message.
fn from_cli(e: CliError, msg: &str) -> CniError {
    let code = match &e {
        CliError::Config(_) => code::NOT_SET_UP,
        CliError::Registry(RegistryError::Io { .. }) | CliError::Io { .. } => code::IO_FAILURE,
        CliError::Registry(_) => code::REGISTRY,
        CliError::Invalid(_) => code::REJECTED,
        _ => code::IO_FAILURE,
    };
    CniError::new(code, msg, e.to_string())
}

/// A line on stderr, which runtimes log.
fn note(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "freeflow-cni: {message}");
}
