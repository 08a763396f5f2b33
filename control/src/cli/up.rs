//! `freeflow up`: settles this host's settings (options, environment, the previous `up`),
//! registers the host, installs the shims (and with `--cni-bin-dir` the CNI plugin), and starts
//! the daemon: detached (it re-executes this binary as `freeflow daemon`) and waited for until
//! its router serves, or in this process.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::error::io_err;
use super::output::warn;
use super::{CliError, UpArgs};
use crate::config::{self, Config, ConfigError, RuntimeDir};
use crate::daemon::{self, DaemonError, DaemonState, DaemonStatus};
use crate::legacy;
use crate::os;
use crate::registry::{self, HostRecord};
use crate::supervise::{self, exit_reason, format_duration};

/// How long `up` waits for the daemon to report its router ready with its table.
const UP_TIMEOUT: Duration = Duration::from_secs(10);

/// `freeflow up`: settings, checks, registration, shims, daemon. Settings of an `up` that did
/// not come up are taken back.
pub(super) fn up(args: UpArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    for line in legacy::move_old_control_files(&dir)? {
        warn(format_args!("earlier layout: {line}"));
    }
    let previous = match Config::load_if_present(&dir) {
        Ok(previous) => previous,
        Err(e) => {
            warn(format_args!("ignoring the previous settings: {e}"));
            None
        }
    };
    let foreground = args.foreground;
    if let Some(cni_bin_dir) = &args.cni_bin_dir {
        install_cni_plugin(cni_bin_dir)?;
    }
    let mut config = settings(args, &dir, previous.as_ref())?;
    prepare_dir(&dir)?;
    config.registry = register_host(&dir, &config, previous.as_ref())?;
    config.save(&dir)?;
    let result = install_shims(&dir).and_then(|()| {
        if foreground {
            daemon::run(&dir, true)?;
            Ok(ExitCode::SUCCESS)
        } else {
            start_background(&dir, &config)
        }
    });
    if result.is_err() && !foreground {
        // Settings that did not come up are not worth keeping: the next `up` without options
        // should not repeat a bad --cores.
        restore_settings(&dir, previous.as_ref());
    }
    result
}

/// This host's settings: each from its option, else its environment variable, else the
/// previous `up` for DIR, else a default (or an error saying what to pass). The registry URL is
/// as given; [`register_host`] normalises it.
fn settings(args: UpArgs, dir: &RuntimeDir, previous: Option<&Config>) -> Result<Config, CliError> {
    let host_ip = resolve_host_ip(&args, previous)?;
    let vnet_prefix = resolve_vnet_prefix(args.vnet_prefix, previous)?;
    let registry = args
        .registry
        .or_else(|| previous.map(|c| c.registry.clone()))
        .unwrap_or_else(|| dir.default_registry_url());
    let cores = args
        .cores
        .or_else(|| previous.and_then(|c| c.cores.clone()));
    if let Some(cores) = &cores {
        check_cores(cores)?;
    }
    let rdma_device = args
        .rdma_device
        .or_else(|| previous.and_then(|c| c.rdma_device.clone()));
    if let Some(name) = &rdma_device {
        check_rdma_device(name)?;
    }
    let peer_port = args
        .peer_port
        .or(previous.map(|c| c.peer_port))
        .unwrap_or(config::DEFAULT_PEER_PORT);
    Ok(Config {
        version: config::CONFIG_VERSION,
        host_ip,
        vnet_prefix,
        registry,
        cores,
        rdma_device,
        peer_port,
        metrics: args.metrics,
        docker: args.docker.or_else(env_docker),
    })
}

/// `--host-ip`, else the one address in `--host-ip-prefix` or `$HOST_IP_PREFIX`, else the
/// previous one; it must be able to name a host.
fn resolve_host_ip(
    args: &UpArgs,
    previous: Option<&Config>,
) -> Result<std::net::Ipv4Addr, CliError> {
    let host_ip = if let Some(ip) = args.host_ip {
        ip
    } else if let Some(prefix) = args.host_ip_prefix {
        config::host_ip_in(prefix)?
    } else if let Some(prefix) = env_prefix("HOST_IP_PREFIX")? {
        config::host_ip_in(prefix)?
    } else if let Some(previous) = previous {
        previous.host_ip
    } else {
        return Err(CliError::Invalid(
            "this host's address is unknown: pass --host-ip IP or --host-ip-prefix CIDR (or \
             set $HOST_IP_PREFIX)"
                .into(),
        ));
    };
    if host_ip.is_unspecified() || host_ip.is_multicast() || host_ip.is_broadcast() {
        return Err(CliError::Invalid(format!(
            "host address {host_ip} cannot identify a host"
        )));
    }
    Ok(host_ip)
}

/// `--vnet-prefix`, else `$VNET_PREFIX`, else the previous one; host bits cleared.
fn resolve_vnet_prefix(
    option: Option<Ipv4Net>,
    previous: Option<&Config>,
) -> Result<Ipv4Net, CliError> {
    let prefix = match option {
        Some(p) => p,
        None => match env_prefix("VNET_PREFIX")? {
            Some(p) => p,
            None => previous.map(|c| c.vnet_prefix).ok_or_else(|| {
                CliError::Invalid(
                    "the overlay prefix is unknown: pass --vnet-prefix CIDR (or set $VNET_PREFIX), \
                     e.g. --vnet-prefix 10.32.0.0/12"
                        .into(),
                )
            })?,
        },
    };
    Ok(prefix.trunc())
}

/// `$FREEFLOW_DOCKER`, if set and non-empty: the engine socket to watch.
fn env_docker() -> Option<std::path::PathBuf> {
    std::env::var_os("FREEFLOW_DOCKER")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}

/// A CIDR from an environment variable, if set and non-empty.
fn env_prefix(name: &str) -> Result<Option<Ipv4Net>, CliError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some).map_err(|e| {
            CliError::Invalid(format!("${name}={v:?} is not an IPv4 CIDR prefix: {e}"))
        }),
        _ => Ok(None),
    }
}

/// A `--cores` list has the router's form: digits, commas and dashes.
/// A device name as libibverbs lists them (or `auto`): no path, no option.
fn check_rdma_device(name: &str) -> Result<(), CliError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > 64 || name.starts_with('-') || !name.chars().all(plain) {
        return Err(CliError::Invalid(format!(
            "--rdma-device {name:?}: expected a device name such as rxe0 or mlx5_0, or auto"
        )));
    }
    Ok(())
}

fn check_cores(cores: &str) -> Result<(), CliError> {
    if cores.is_empty()
        || !cores
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b',' || b == b'-')
    {
        return Err(CliError::Invalid(format!(
            "--cores {cores:?}: expected a list like 1 or 0,1 or 0-3"
        )));
    }
    Ok(())
}

/// Creates DIR and its state directory, and checks that no daemon and no hand-started router
/// serve it, and that the router binary is there (so that a missing one fails here, not in the
/// detached daemon).
fn prepare_dir(dir: &RuntimeDir) -> Result<(), CliError> {
    dir.create()?;
    if let DaemonState::Running { pid } = daemon::probe(dir)? {
        return Err(DaemonError::AlreadyRunning {
            dir: dir.path().display().to_string(),
            pid,
        }
        .into());
    }
    // A router that a daemon started and outlived (its pid recorded in router.pid) is adopted
    // by the daemon this `up` starts; one started by hand is not ours to take.
    if daemon::router_lock_held(dir) == Some(true) && daemon::read_router_pid(dir).is_none() {
        return Err(CliError::Invalid(format!(
            "a freeflow-router that `freeflow up` did not start already serves {} (it holds {}); \
             stop it first",
            dir.path().display(),
            dir.router_lock().display()
        )));
    }
    supervise::router_program()?;
    Ok(())
}

/// Records this host in the registry, unless another running daemon serves its address, and
/// warns about containers left on this directory's previous address. Returns the registry's
/// normalised URL.
fn register_host(
    dir: &RuntimeDir,
    config: &Config,
    previous: Option<&Config>,
) -> Result<String, CliError> {
    let registry = registry::open(&config.registry)?;
    let snapshot = registry.load()?;
    if let Some(host) = snapshot.host(config.host_ip) {
        if host.dir != dir.path() {
            if let Ok(other) = RuntimeDir::new(&host.dir) {
                if let Ok(DaemonState::Running { pid }) = daemon::probe(&other) {
                    return Err(CliError::Invalid(format!(
                        "host {} is already served by the daemon of {}{} (registry {}); \
                         give this host another --host-ip or stop that daemon",
                        config.host_ip,
                        other.path().display(),
                        pid.map(|p| format!(", pid {p}")).unwrap_or_default(),
                        registry.url()
                    )));
                }
            }
        }
    }
    let host = HostRecord {
        host_ip: config.host_ip,
        peer_port: config.peer_port,
        vnet_prefix: config.vnet_prefix,
        dir: dir.path().to_path_buf(),
    };
    registry.update(&mut |s| {
        s.upsert_host(host.clone());
        Ok(())
    })?;
    if let Some(previous) = previous {
        let stranded = snapshot.containers_on(previous.host_ip).count();
        if previous.host_ip != config.host_ip && stranded > 0 {
            warn(format_args!(
                "{stranded} container(s) registered on this directory's previous host address \
                 {} stay assigned to it; this daemon serves only {}'s",
                previous.host_ip, config.host_ip
            ));
        }
    }
    Ok(registry.url())
}

/// Puts the previous `config.json` back, or removes the new one if there was none.
fn restore_settings(dir: &RuntimeDir, previous: Option<&Config>) {
    let restored = match previous {
        Some(previous) => previous.save(dir),
        None => fs::remove_file(dir.config()).map_err(|source| ConfigError::Io {
            path: dir.config(),
            source,
        }),
    };
    if let Err(e) = restored {
        warn(format_args!("could not restore the previous settings: {e}"));
    }
}

/// The shims' files as cargo builds them, next to the `freeflow` executable (the images copy
/// the same list: docker/Dockerfile, scripts/docker-image.sh).
pub const SHIM_FILES: [&str; 4] = [
    "libfsocket.so",
    "libibverbs.so",
    "librdmacm.so",
    "libfreeflow_providers.so",
];

/// Copies the shims from next to the `freeflow` executable into DIR, mode 0444 (directories
/// 0755): containers load them, nobody writes them in place. A missing shim is a
/// warning (the router and TCP-less setups work without it); a failing copy is an error.
/// Next to the verbs library go the stand-ins for rdma-core's hardware providers libmlx5 and
/// libefa (one file, two names): programs that link those (perftest's `ib_*` tools) then load
/// them instead of the real ones, which need libibverbs' private driver interface; and
/// Freeflow's librdmacm (rdma_cm through the router), which replaces rdma-core's (that one
/// needs the kernel's /dev/infiniband/rdma_cm).
fn install_shims(dir: &RuntimeDir) -> Result<(), CliError> {
    let verbs_dir = |file: &str| dir.verbs_shim().with_file_name(file);
    let [socket, verbs, rdmacm, providers] = SHIM_FILES;
    for (name, dest) in [
        (socket, dir.socket_shim()),
        (verbs, dir.verbs_shim()),
        (rdmacm, verbs_dir("librdmacm.so.1")),
        (providers, verbs_dir("libmlx5.so.1")),
        (providers, verbs_dir("libefa.so.1")),
    ] {
        let src = supervise::sibling_of_exe(name);
        if !src.is_file() {
            warn(format_args!(
                "shim {} not found, so {} is not installed (build the workspace to get it)",
                src.display(),
                dest.display()
            ));
            continue;
        }
        if let Some(parent) = dest.parent() {
            if !parent.is_dir() {
                fs::create_dir_all(parent)
                    .and_then(|()| fs::set_permissions(parent, fs::Permissions::from_mode(0o755)))
                    .map_err(io_err(format!("cannot create {}", parent.display())))?;
            }
        }
        let bytes = fs::read(&src).map_err(io_err(format!("cannot read {}", src.display())))?;
        // Replaced by rename, so containers that have the old copy mapped keep working.
        config::write_atomic(&dest, &bytes, 0o444)?;
    }
    Ok(())
}

/// Copies `freeflow-cni` from next to the `freeflow` executable into `cni_bin_dir` (created
/// 0755 if missing), mode 0755, replaced by rename so a runtime running the old copy is not
/// disturbed. Asked for explicitly, so a missing plugin is an error.
fn install_cni_plugin(cni_bin_dir: &Path) -> Result<(), CliError> {
    let src = supervise::sibling_of_exe("freeflow-cni");
    if !src.is_file() {
        return Err(CliError::Invalid(format!(
            "--cni-bin-dir: the CNI plugin {} is not there (build the workspace to get it)",
            src.display()
        )));
    }
    if !cni_bin_dir.is_dir() {
        fs::create_dir_all(cni_bin_dir)
            .and_then(|()| fs::set_permissions(cni_bin_dir, fs::Permissions::from_mode(0o755)))
            .map_err(io_err(format!("cannot create {}", cni_bin_dir.display())))?;
    }
    let bytes = fs::read(&src).map_err(io_err(format!("cannot read {}", src.display())))?;
    config::write_atomic(&cni_bin_dir.join("freeflow-cni"), &bytes, 0o755)?;
    Ok(())
}

/// Re-executes this binary as the detached daemon and waits until it reports ready.
fn start_background(dir: &RuntimeDir, config: &Config) -> Result<ExitCode, CliError> {
    let log_path = dir.log();
    let (mut child, log_start) = spawn_daemon(dir, &log_path)?;
    let pid = child.id();
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(io_err("waiting for the daemon"))? {
            let reason = supervise::last_log_line(&log_path, log_start, "fatal: ")
                .and_then(|line| line.split_once("fatal: ").map(|(_, r)| r.to_owned()))
                .unwrap_or_else(|| {
                    format!("the daemon {} without saying why", exit_reason(status))
                });
            return Err(CliError::UpFailed {
                reason,
                log: log_path,
            });
        }
        if let Some(st) = DaemonStatus::read(dir) {
            if st.pid == pid && st.state == daemon::STATE_READY {
                print_ready(dir, config, &st);
                return Ok(ExitCode::SUCCESS);
            }
        }
        if Instant::now() >= deadline {
            stop_daemon(&mut child);
            return Err(CliError::UpFailed {
                reason: format!(
                    "the daemon did not get a ready router with its container table within {} \
                     and was stopped",
                    format_duration(UP_TIMEOUT)
                ),
                log: log_path,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `freeflow daemon --dir DIR --state-dir STATE` in a new session, its output appended to the daemon's
/// log; returns the child and the log's length before it (where its own lines begin).
fn spawn_daemon(dir: &RuntimeDir, log_path: &Path) -> Result<(Child, u64), CliError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(log_path)
        .map_err(io_err(format!("cannot open {}", log_path.display())))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().map_err(io_err("cannot find the freeflow executable"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon")
        .arg("--dir")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.state())
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(io_err(format!("{}", log_path.display())))?,
        )
        .stderr(log);
    os::new_session_on_exec(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(io_err("cannot start the daemon process"))?;
    Ok((child, log_start))
}

/// What `up` prints once the daemon reports its router ready.
fn print_ready(dir: &RuntimeDir, config: &Config, st: &DaemonStatus) {
    out!(
        "freeflow: up: daemon pid {}, router pid {}{} serving {}",
        st.pid,
        st.router_pid.map(|p| p.to_string()).unwrap_or("?".into()),
        if st.counters.router_adopted {
            " (adopted: it kept running without a daemon)"
        } else {
            ""
        },
        dir.path().display()
    );
    out!(
        "  host {}, overlay {}, registry {}, {} container(s) served",
        config.host_ip,
        config.vnet_prefix,
        config.registry,
        st.counters.containers_pushed.unwrap_or(0)
    );
    out!(
        "  logs: {} and {}",
        dir.log().display(),
        dir.router_log().display()
    );
}

/// Stops a daemon that did not get ready in time: SIGTERM (it stops its router within the
/// grace period), SIGKILL if it is still there after that.
fn stop_daemon(child: &mut Child) {
    let _ = os::send_signal(child.id() as i32, libc::SIGTERM);
    let stop_deadline = Instant::now() + daemon::ROUTER_STOP_GRACE + Duration::from_secs(2);
    while Instant::now() < stop_deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::SHIM_FILES;

    /// The images carry every shim `up` installs (the Dockerfile once lacked librdmacm).
    #[test]
    fn the_images_copy_every_shim() {
        let dockerfile = include_str!("../../../docker/Dockerfile");
        let offline = include_str!("../../../scripts/docker-image.sh");
        for name in SHIM_FILES {
            assert!(
                dockerfile.contains(&format!("/src/target/release/{name}")),
                "docker/Dockerfile does not copy {name}"
            );
            assert!(
                offline.contains(&format!(" {name}")),
                "scripts/docker-image.sh does not copy {name}"
            );
        }
        for package in [
            "freeflow-shim-socket",
            "freeflow-shim-verbs",
            "freeflow-shim-rdmacm",
        ] {
            assert!(
                dockerfile.contains(&format!("-p {package}")),
                "docker/Dockerfile does not build {package}"
            );
        }
    }
}
