//! `freeflow container add|rm|ls`: registers, unregisters and lists containers in the registry,
//! and waits (bounded) to see the daemon push a change to its router.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use freeflow_proto::identity::NetnsId;
use serde_json::json;

use super::error::io_err;
use super::output::print_table;
use super::{AddArgs, CliError, LsArgs, RmArgs};
use crate::config::{Config, RuntimeDir};
use crate::daemon::{self, DaemonState, DaemonStatus};
use crate::os;
use crate::registry::{self, ContainerRecord, RegistryError};

/// How long `container add/rm` waits to see the daemon pick the change up.
const PICKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// `freeflow container add`: checks the name, the address and the namespace, registers the
/// container, and says whether the daemon picked it up.
pub(super) fn add(args: AddArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    let config = Config::load(&dir)?;
    let (record, pickup) = register(
        &dir,
        &config,
        NewContainer {
            name: &args.name,
            tenant: &args.tenant,
            ip: args.ip,
            netns: &args.netns,
            allow_host_netns: args.allow_host_netns,
        },
    )?;
    out!(
        "freeflow: registered container {} ({}, tenant {}, netns {}) on host {}{}",
        record.name,
        record.ip,
        record.tenant,
        record.netns.display(),
        config.host_ip,
        match pickup {
            Pickup::Served => "; the router serves it now".to_owned(),
            Pickup::NoDaemon =>
                "; no daemon runs for this directory, so it is served after `freeflow up`".into(),
            Pickup::Skipped(reason) => format!("; but the daemon skips it: {reason}"),
            Pickup::Pending => format!(
                "; the daemon has not picked it up yet (see `freeflow status --dir {}`)",
                dir.path().display()
            ),
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `freeflow container rm`: unregisters a container and says whether the daemon picked that up.
pub(super) fn rm(args: &RmArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    let config = Config::load(&dir)?;
    let (removed, pickup) = unregister(&dir, &config, &args.name)?;
    let removed = removed.ok_or_else(|| RegistryError::NotFound(args.name.clone()))?;
    let tail = if removed.host_ip != config.host_ip {
        format!("; it was served by host {}, not this one", removed.host_ip)
    } else {
        match pickup {
            Pickup::Served | Pickup::Skipped(_) => "; the router no longer serves it".to_owned(),
            Pickup::NoDaemon => String::new(),
            Pickup::Pending => "; the daemon has not picked the change up yet".to_owned(),
        }
    };
    out!(
        "freeflow: removed container {} ({}, host {}){tail}",
        removed.name,
        removed.ip,
        removed.host_ip
    );
    Ok(ExitCode::SUCCESS)
}

/// A container to register on this host, as `container add` and the CNI plugin describe it.
pub(crate) struct NewContainer<'a> {
    /// Registry name.
    pub name: &'a str,
    /// Tenant.
    pub tenant: &'a str,
    /// Overlay address; must lie in this host's overlay prefix.
    pub ip: Ipv4Addr,
    /// The container's network namespace file.
    pub netns: &'a Path,
    /// Accept the namespace freeflow itself runs in.
    pub allow_host_netns: bool,
}

/// Checks the names, the address and the namespace of `new`, registers it as served by this
/// host (the registry write the daemon watches), and waits (bounded) for the daemon to pick
/// the change up. The one way containers get registered: `container add` and `freeflow-cni`.
pub(crate) fn register(
    dir: &RuntimeDir,
    config: &Config,
    new: NewContainer<'_>,
) -> Result<(ContainerRecord, Pickup), CliError> {
    for (what, value) in [("container name", new.name), ("tenant", new.tenant)] {
        if !registry::is_valid_name(value) {
            return Err(RegistryError::InvalidName {
                what,
                value: value.to_owned(),
            }
            .into());
        }
    }
    check_overlay_ip(dir, config, new.ip)?;
    let netns = check_netns(dir, new.netns, new.allow_host_netns)?;
    let registry = registry::open(&config.registry)?;
    let record = ContainerRecord {
        name: new.name.to_owned(),
        tenant: new.tenant.to_owned(),
        ip: new.ip,
        netns,
        host_ip: config.host_ip,
    };
    let generation = registry.add_container(&record)?;
    let pickup = wait_for_pickup(dir, generation, &record.name);
    Ok((record, pickup))
}

/// Unregisters the container `name` (whichever host serves it) and, if there was one, waits
/// (bounded) for the daemon to pick the change up. `None`: no container of that name, and
/// nothing was written.
pub(crate) fn unregister(
    dir: &RuntimeDir,
    config: &Config,
    name: &str,
) -> Result<(Option<ContainerRecord>, Pickup), CliError> {
    let registry = registry::open(&config.registry)?;
    let (removed, generation) = match registry.remove_container(name) {
        Ok(pair) => pair,
        // Nothing was written.
        Err(RegistryError::NotFound(_)) => return Ok((None, Pickup::NoDaemon)),
        Err(e) => return Err(e.into()),
    };
    let pickup = if removed.host_ip == config.host_ip {
        wait_for_pickup(dir, generation, name)
    } else {
        Pickup::NoDaemon
    };
    let removed = Some(removed);
    Ok((removed, pickup))
}

/// `freeflow container ls`: the registry's containers of all hosts, as a table or JSON.
pub(super) fn ls(args: &LsArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    let config = Config::load(&dir)?;
    let registry = registry::open(&config.registry)?;
    let snapshot = registry.load()?;
    if args.json {
        let containers: Vec<_> = snapshot
            .containers
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "tenant": c.tenant,
                    "ip": c.ip,
                    "netns": c.netns,
                    "host_ip": c.host_ip,
                    "this_host": c.host_ip == config.host_ip,
                })
            })
            .collect();
        out!(
            "{}",
            json!({
                "registry": registry.url(),
                "generation": snapshot.generation,
                "host_ip": config.host_ip,
                "containers": containers,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    if snapshot.containers.is_empty() {
        out!("no containers registered in {}", registry.url());
        return Ok(ExitCode::SUCCESS);
    }
    let rows = snapshot.containers.iter().map(|c| {
        vec![
            c.name.clone(),
            c.tenant.clone(),
            c.ip.to_string(),
            if c.host_ip == config.host_ip {
                format!("{} (this host)", c.host_ip)
            } else {
                c.host_ip.to_string()
            },
            c.netns.display().to_string(),
        ]
    });
    print_table(&["NAME", "TENANT", "IP", "HOST", "NETNS"], rows, "");
    Ok(ExitCode::SUCCESS)
}

/// Checks that `ip` is a usable address of this host's overlay prefix.
fn check_overlay_ip(dir: &RuntimeDir, config: &Config, ip: Ipv4Addr) -> Result<(), CliError> {
    let prefix = config.vnet_prefix;
    if !prefix.contains(&ip) {
        return Err(CliError::Invalid(format!(
            "overlay IP {} is outside this host's overlay prefix {prefix} (from {}); pick an \
             address inside it",
            ip,
            dir.config().display()
        )));
    }
    if prefix.prefix_len() < 31 && (ip == prefix.network() || ip == prefix.broadcast()) {
        return Err(CliError::Invalid(format!(
            "overlay IP {} is the {} address of {prefix}",
            ip,
            if ip == prefix.network() {
                "network"
            } else {
                "broadcast"
            }
        )));
    }
    Ok(())
}

/// Checks that `path` is a network namespace other than freeflow's own, and returns it
/// absolute (not canonical: `/proc/PID/ns/net` must stay as it is).
fn check_netns(dir: &RuntimeDir, path: &Path, allow_host: bool) -> Result<PathBuf, CliError> {
    let path = std::path::absolute(path)
        .map_err(io_err(format!("bad namespace path {}", path.display())))?;
    let file = fs::File::open(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CliError::Invalid(format!(
                "network namespace {} does not exist (create it first, e.g. `ip netns add NAME` \
                 for /run/netns/NAME, or name a container process's /proc/PID/ns/net)",
                path.display()
            ))
        } else {
            CliError::Invalid(format!(
                "cannot open network namespace {}: {e}",
                path.display()
            ))
        }
    })?;
    match os::namespace_type(&file) {
        Ok(libc::CLONE_NEWNET) => {}
        Ok(_) => {
            return Err(CliError::Invalid(format!(
                "{} is a namespace, but not a network namespace",
                path.display()
            )))
        }
        Err(_) => {
            return Err(CliError::Invalid(format!(
                "{} is not a network namespace (not a namespace file; a /run/netns entry whose \
                 namespace was deleted looks like this)",
                path.display()
            )))
        }
    }
    if !allow_host {
        let id =
            NetnsId::of_path(&path).map_err(io_err(format!("cannot stat {}", path.display())))?;
        let own = NetnsId::current().ok();
        let daemon_ns = daemon::read_pid(dir).and_then(|pid| NetnsId::of_pid(pid as i32).ok());
        if Some(id) == own || Some(id) == daemon_ns {
            return Err(CliError::Invalid(format!(
                "{} is the host's own network namespace (where freeflow runs), not a container's; \
                 pass --allow-host-netns if that is really meant",
                path.display()
            )));
        }
    }
    Ok(path)
}

/// What became of a registry change on the daemon's side.
pub(crate) enum Pickup {
    /// No daemon runs for the runtime directory (or the change concerns another host).
    NoDaemon,
    /// The daemon pushed the change to its router.
    Served,
    /// The daemon read the change but skips the container, for this reason.
    Skipped(String),
    /// The daemon runs but has not read the change within the bounded wait.
    Pending,
}

/// Waits (bounded) until the daemon's router table reflects registry `generation`.
fn wait_for_pickup(dir: &RuntimeDir, generation: u64, name: &str) -> Pickup {
    if !matches!(daemon::probe(dir), Ok(DaemonState::Running { .. })) {
        return Pickup::NoDaemon;
    }
    let deadline = Instant::now() + PICKUP_TIMEOUT;
    loop {
        if let Some(st) = DaemonStatus::read(dir) {
            if st
                .counters
                .registry_generation
                .is_some_and(|g| g >= generation)
            {
                return match st.counters.skipped.iter().find(|s| s.name == name) {
                    Some(s) => Pickup::Skipped(s.reason.clone()),
                    None => Pickup::Served,
                };
            }
        }
        if Instant::now() >= deadline {
            return Pickup::Pending;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
