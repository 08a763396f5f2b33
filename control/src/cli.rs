//! The `freeflow` command line: `up`, `down`, `container add|rm|ls`, `status`, `cluster`, `demo`
//! (see `demo`), and the hidden `daemon` subcommand that `up` re-executes itself as.
//!
//! Every command needs only the runtime directory: `up` records host address, overlay prefix,
//! registry URL, cores and peer port in `DIR/config.json`, and the others read them from there.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use freeflow_proto::control::{self, ControlRequest, ControlResponse, RouterStatus};
use freeflow_proto::identity::NetnsId;
use ipnet::Ipv4Net;
use serde_json::json;

use crate::config::{self, Config, ConfigError, RuntimeDir};
use crate::daemon::{self, DaemonError, DaemonState, DaemonStatus};
use crate::registry::{self, ContainerRecord, HostRecord, RegistryError};
use crate::supervise::{
    self, exit_reason, format_duration, format_unix_ms, os, unix_ms_now, SuperviseError,
};

/// How long `up` waits for the daemon to report its router ready with its table.
const UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `down` waits for the daemon to exit (it gives the router 5 s, then kills it).
const DOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `container add/rm` waits to see the daemon pick the change up.
const PICKUP_TIMEOUT: Duration = Duration::from_secs(2);

const EXIT_CODES: &str = "\
Exit codes: 0 success; 1 failure (for `status`: the daemon or the router is not running); \
2 usage error. `down` exits 0 when nothing was running.

Files in DIR: config.json (settings from `up`), registry.json (default registry), daemon.lock, \
freeflow.pid, daemon-status.json, freeflow.log, router.log, router.sock, router.ctl, \
libfsocket.so, verbs/libibverbs.so.1.";

const UP_HELP: &str = "\
Options not given fall back to $HOST_IP_PREFIX / $VNET_PREFIX, then to the settings of the \
previous `up` for DIR (DIR/config.json). Daemons of several simulated hosts on one machine \
share one registry: pass the same --registry file:/shared/registry.json to each.

Containers use the shims installed into DIR: LD_PRELOAD=DIR/libfsocket.so (TCP mode) or \
LD_LIBRARY_PATH=DIR/verbs (RDMA mode), with DIR mounted into the container.";

const DEMO_HELP: &str = "\
Progress goes to stderr, one line per step; the results and the table to stdout. It takes about \
a minute with the defaults. Needs freeflow-bench, freeflow-router and libfsocket.so next to \
this executable (cargo build --release --workspace); the RDMA part also needs a C compiler and \
the verbs headers (build-essential libibverbs-dev), and is skipped, saying so, without them. \
Exit code 130 after Ctrl-C (143 after SIGTERM), once everything is removed.";

/// Freeflow: host-network speed for containers on an overlay network.
#[derive(Parser, Debug)]
#[command(name = "freeflow", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the daemon and the router for this host; returns once the router serves
    #[command(after_help = UP_HELP)]
    Up(UpArgs),
    /// Stop the daemon and its router (exit code 0 also when nothing was running)
    Down(DirArg),
    /// Register, unregister and list containers
    #[command(subcommand)]
    Container(ContainerCmd),
    /// Show the daemon, the router (shards, counters), containers and attached shims
    #[command(after_help = "Exit code 1 when the daemon or the router is not running.")]
    Status(StatusArgs),
    /// Build or remove a simulated cluster on this machine (network namespaces; root)
    #[command(subcommand)]
    Cluster(crate::cluster_cli::ClusterCmd),
    /// Try Freeflow on this machine (root): a simulated two-host cluster, Freeflow on both,
    /// containers attaching, the TCP comparison (host link, overlay, Freeflow) and the RDMA
    /// comparison on one host (the router's software engine); removes everything it made,
    /// also on Ctrl-C
    #[command(after_help = DEMO_HELP)]
    Demo(crate::demo::DemoArgs),
    /// Run the daemon in this process, detached (what `freeflow up` starts)
    #[command(hide = true)]
    Daemon(DirArg),
}

#[derive(Args, Debug, Clone)]
struct DirArg {
    /// Runtime directory of this host: settings, registry, sockets, logs, shims
    /// [default: $FREEFLOW_DIR, else /freeflow]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl DirArg {
    /// `--dir`, else `$FREEFLOW_DIR` (if not empty), else `/freeflow`: what routers and shims
    /// use too.
    fn runtime_dir(&self) -> Result<RuntimeDir, ConfigError> {
        let path = self.dir.clone().unwrap_or_else(freeflow_proto::runtime_dir);
        RuntimeDir::new(&path)
    }
}

#[derive(Args, Debug)]
struct UpArgs {
    #[command(flatten)]
    dir: DirArg,
    /// This host's address on the host network (the registry's key for this host)
    #[arg(long, value_name = "IP", conflicts_with = "host_ip_prefix")]
    host_ip: Option<Ipv4Addr>,
    /// Use the one address of this network namespace's interfaces inside CIDR [env: HOST_IP_PREFIX]
    #[arg(long, value_name = "CIDR")]
    host_ip_prefix: Option<Ipv4Net>,
    /// Overlay prefix whose addresses Freeflow accelerates [env: VNET_PREFIX]
    #[arg(long, value_name = "CIDR")]
    vnet_prefix: Option<Ipv4Net>,
    /// Registry URL [default: file:DIR/registry.json]
    #[arg(long, value_name = "URL")]
    registry: Option<String>,
    /// Cores for the router's shards, e.g. 1 or 0,1 or 0-3 [default: the router's choice]
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// Router-to-router port, recorded in this host's registry record [default: 7471]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    peer_port: Option<u16>,
    /// Run the daemon in this process (logs on stderr) until SIGTERM, SIGINT or `down`
    #[arg(long)]
    foreground: bool,
}

#[derive(Subcommand, Debug)]
enum ContainerCmd {
    /// Register a container (network namespace and overlay IP) on this host
    Add(AddArgs),
    /// Unregister a container
    Rm(RmArgs),
    /// List the registry's containers (all hosts)
    Ls(LsArgs),
}

#[derive(Args, Debug)]
struct AddArgs {
    /// Container name: 1 to 63 of A-Z a-z 0-9 _ . -
    name: String,
    #[command(flatten)]
    dir: DirArg,
    /// The container's network namespace: /run/netns/NAME or /proc/PID/ns/net
    #[arg(long, value_name = "PATH")]
    netns: PathBuf,
    /// The container's overlay address; must lie in this host's overlay prefix
    #[arg(long, value_name = "IP")]
    ip: Ipv4Addr,
    /// Tenant the container belongs to
    #[arg(long, value_name = "T", default_value = "default")]
    tenant: String,
    /// Accept the network namespace freeflow itself runs in (normally a mistake)
    #[arg(long)]
    allow_host_netns: bool,
}

#[derive(Args, Debug)]
struct RmArgs {
    /// Container name
    name: String,
    #[command(flatten)]
    dir: DirArg,
}

#[derive(Args, Debug)]
struct LsArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

/// Errors of CLI commands; each prints as one line after `freeflow: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Runtime directory or `config.json`.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The daemon.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// Finding or starting the router.
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    /// An argument or state that does not work, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// `up` did not get a ready daemon.
    #[error("up failed: {reason} (logs: {} and {})", log.display(), log.with_file_name("router.log").display())]
    UpFailed {
        /// Why.
        reason: String,
        /// The daemon's log.
        log: PathBuf,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Io { what, source }
}

fn warn(message: impl std::fmt::Display) {
    let _ = writeln!(io::stderr(), "freeflow: warning: {message}");
}

/// Prints to stdout, ignoring a closed pipe (`freeflow status | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stdout(), $($arg)*);
    }};
}

/// Entry point of the `freeflow` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon_mode = matches!(cli.command, Cmd::Daemon(_));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if daemon_mode {
                // `up` looks for this line in the log to say why the daemon gave up.
                daemon::log(format_args!("fatal: {e}"));
            } else {
                let _ = writeln!(io::stderr(), "freeflow: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Cmd::Up(args) => up(args),
        Cmd::Down(args) => down(&args),
        Cmd::Container(ContainerCmd::Add(args)) => container_add(args),
        Cmd::Container(ContainerCmd::Rm(args)) => container_rm(&args),
        Cmd::Container(ContainerCmd::Ls(args)) => container_ls(&args),
        Cmd::Status(args) => status(&args),
        Cmd::Cluster(cmd) => {
            crate::cluster_cli::run(cmd).map_err(CliError::Invalid)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo(args) => match crate::demo::run(&args) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                let _ = writeln!(io::stderr(), "freeflow: demo: {e}");
                // 128 + signal, as a shell reports a program the signal ended.
                Ok(match e.signal() {
                    Some(sig) => ExitCode::from(128u8.saturating_add(sig as u8)),
                    None => ExitCode::FAILURE,
                })
            }
        },
        Cmd::Daemon(args) => {
            let dir = args.runtime_dir()?;
            daemon::run(&dir, false)?;
            Ok(ExitCode::SUCCESS)
        }
    }
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

fn up(args: UpArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    let previous = match Config::load_if_present(&dir) {
        Ok(previous) => previous,
        Err(e) => {
            warn(format_args!("ignoring the previous settings: {e}"));
            None
        }
    };

    let host_ip = if let Some(ip) = args.host_ip {
        ip
    } else if let Some(prefix) = args.host_ip_prefix {
        config::host_ip_in(prefix)?
    } else if let Some(prefix) = env_prefix("HOST_IP_PREFIX")? {
        config::host_ip_in(prefix)?
    } else if let Some(previous) = &previous {
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
    let vnet_prefix = match args.vnet_prefix {
        Some(p) => p,
        None => match env_prefix("VNET_PREFIX")? {
            Some(p) => p,
            None => previous.as_ref().map(|c| c.vnet_prefix).ok_or_else(|| {
                CliError::Invalid(
                    "the overlay prefix is unknown: pass --vnet-prefix CIDR (or set $VNET_PREFIX), \
                     e.g. --vnet-prefix 10.32.0.0/12"
                        .into(),
                )
            })?,
        },
    }
    .trunc();
    let registry_url = args
        .registry
        .or_else(|| previous.as_ref().map(|c| c.registry.clone()))
        .unwrap_or_else(|| dir.default_registry_url());
    let cores = args
        .cores
        .or_else(|| previous.as_ref().and_then(|c| c.cores.clone()));
    if let Some(cores) = &cores {
        if cores.is_empty()
            || !cores
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b',' || b == b'-')
        {
            return Err(CliError::Invalid(format!(
                "--cores {cores:?}: expected a list like 1 or 0,1 or 0-3"
            )));
        }
    }
    let peer_port = args
        .peer_port
        .or(previous.as_ref().map(|c| c.peer_port))
        .unwrap_or(config::DEFAULT_PEER_PORT);

    dir.create()?;
    if let DaemonState::Running { pid } = daemon::probe(&dir)? {
        return Err(DaemonError::AlreadyRunning {
            dir: dir.path().display().to_string(),
            pid,
        }
        .into());
    }
    if daemon::router_lock_held(&dir) == Some(true) {
        return Err(CliError::Invalid(format!(
            "a freeflow-router that `freeflow up` did not start already serves {} (it holds {}); \
             stop it first",
            dir.path().display(),
            dir.router_lock().display()
        )));
    }
    // Fail here, not in the detached daemon, when the router binary is missing.
    supervise::router_program()?;

    let registry = registry::open(&registry_url)?;
    let snapshot = registry.load()?;
    if let Some(host) = snapshot.host(host_ip) {
        if host.dir != dir.path() {
            if let Ok(other) = RuntimeDir::new(&host.dir) {
                if let Ok(DaemonState::Running { pid }) = daemon::probe(&other) {
                    return Err(CliError::Invalid(format!(
                        "host {host_ip} is already served by the daemon of {}{} (registry {}); \
                         give this host another --host-ip or stop that daemon",
                        other.path().display(),
                        pid.map(|p| format!(", pid {p}")).unwrap_or_default(),
                        registry.url()
                    )));
                }
            }
        }
    }
    let host = HostRecord {
        host_ip,
        peer_port,
        vnet_prefix,
        dir: dir.path().to_path_buf(),
    };
    registry.update(&mut |s| {
        s.upsert_host(host.clone());
        Ok(())
    })?;
    if let Some(previous) = &previous {
        let stranded = snapshot.containers_on(previous.host_ip).count();
        if previous.host_ip != host_ip && stranded > 0 {
            warn(format_args!(
                "{stranded} container(s) registered on this directory's previous host address \
                 {} stay assigned to it; this daemon serves only {host_ip}'s",
                previous.host_ip
            ));
        }
    }
    let config = Config {
        version: config::CONFIG_VERSION,
        host_ip,
        vnet_prefix,
        registry: registry.url(),
        cores,
        peer_port,
    };
    config.save(&dir)?;
    let result = install_shims(&dir).and_then(|()| {
        if args.foreground {
            daemon::run(&dir, true)?;
            Ok(ExitCode::SUCCESS)
        } else {
            start_background(&dir, &config)
        }
    });
    if result.is_err() && !args.foreground {
        // Settings that did not come up are not worth keeping: the next `up` without options
        // should not repeat a bad --cores.
        let restored = match &previous {
            Some(previous) => previous.save(&dir),
            None => fs::remove_file(dir.config()).map_err(|source| ConfigError::Io {
                path: dir.config(),
                source,
            }),
        };
        if let Err(e) = restored {
            warn(format_args!("could not restore the previous settings: {e}"));
        }
    }
    result
}

/// Copies the shims from next to the `freeflow` executable into DIR. A missing shim is a
/// warning (the router and TCP-less setups work without it); a failing copy is an error.
/// Next to the verbs library go the stand-ins for rdma-core's hardware providers libmlx5 and
/// libefa (one file, two names): programs that link those (perftest's `ib_*` tools) then load
/// them instead of the real ones, which need libibverbs' private driver interface.
fn install_shims(dir: &RuntimeDir) -> Result<(), CliError> {
    let verbs_dir = |file: &str| dir.verbs_shim().with_file_name(file);
    for (name, dest) in [
        ("libfsocket.so", dir.socket_shim()),
        ("libibverbs.so", dir.verbs_shim()),
        ("libfreeflow_providers.so", verbs_dir("libmlx5.so.1")),
        ("libfreeflow_providers.so", verbs_dir("libefa.so.1")),
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
        config::write_atomic(&dest, &bytes, 0o755)?;
    }
    Ok(())
}

/// Re-executes this binary as the detached daemon and waits until it reports ready.
fn start_background(dir: &RuntimeDir, config: &Config) -> Result<ExitCode, CliError> {
    let log_path = dir.log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(&log_path)
        .map_err(io_err(format!("cannot open {}", log_path.display())))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().map_err(io_err("cannot find the freeflow executable"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon")
        .arg("--dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(io_err(format!("{}", log_path.display())))?,
        )
        .stderr(log);
    os::new_session_on_exec(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(io_err("cannot start the daemon process"))?;
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
                out!(
                    "freeflow: up: daemon pid {pid}, router pid {} serving {}",
                    st.router_pid.map(|p| p.to_string()).unwrap_or("?".into()),
                    dir.path().display()
                );
                out!(
                    "  host {}, overlay {}, registry {}, {} container(s) served",
                    config.host_ip,
                    config.vnet_prefix,
                    config.registry,
                    st.containers_pushed.unwrap_or(0)
                );
                out!(
                    "  logs: {} and {}",
                    log_path.display(),
                    dir.router_log().display()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
        if Instant::now() >= deadline {
            let _ = os::send_signal(pid as i32, libc::SIGTERM);
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

fn down(args: &DirArg) -> Result<ExitCode, CliError> {
    let dir = args.runtime_dir()?;
    let pid = match daemon::probe(&dir)? {
        DaemonState::Running { pid } => pid,
        DaemonState::Stopped => {
            if daemon::router_lock_held(&dir) == Some(true) {
                return stop_orphan_router(&dir);
            }
            out!(
                "freeflow: no daemon is running for {}; nothing to stop",
                dir.path().display()
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    // A daemon that is just starting may not have written its pid yet.
    let pid = match pid {
        Some(pid) => pid,
        None => {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                if let Some(pid) = daemon::read_pid(&dir) {
                    break pid;
                }
                if Instant::now() >= deadline {
                    return Err(CliError::Invalid(format!(
                        "a process holds {} but {} names no pid; find it with `fuser {}`",
                        dir.daemon_lock().display(),
                        dir.pid_file().display(),
                        dir.daemon_lock().display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let router_pid = DaemonStatus::read(&dir).and_then(|s| s.router_pid);
    os::send_signal(pid as i32, libc::SIGTERM)
        .map_err(io_err(format!("cannot signal the daemon (pid {pid})")))?;
    let deadline = Instant::now() + DOWN_TIMEOUT;
    loop {
        if daemon::probe(&dir)? == DaemonState::Stopped {
            out!(
                "freeflow: stopped the daemon (pid {pid}){} for {}",
                router_pid
                    .map(|p| format!(" and its router (pid {p})"))
                    .unwrap_or_default(),
                dir.path().display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            return Err(CliError::Invalid(format!(
                "the daemon (pid {pid}) did not stop within {}; see {} (`kill -9 {pid}` forces it; \
                 its router then gets SIGTERM)",
                format_duration(DOWN_TIMEOUT),
                dir.log().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `down` when no daemon runs but a router does (started by hand): ask it to shut down.
fn stop_orphan_router(dir: &RuntimeDir) -> Result<ExitCode, CliError> {
    match control::call(
        &dir.control_socket(),
        &ControlRequest::Shutdown,
        daemon::CONTROL_TIMEOUT,
    ) {
        Ok(ControlResponse::Ok) => {}
        Ok(other) => {
            return Err(CliError::Invalid(format!(
                "no daemon runs for {}, and the router there refused to shut down: {other:?}",
                dir.path().display()
            )))
        }
        Err(e) => {
            return Err(CliError::Invalid(format!(
                "no daemon runs for {}, but a router holds {} and its control socket {} does not \
                 answer ({e})",
                dir.path().display(),
                dir.router_lock().display(),
                dir.control_socket().display()
            )))
        }
    }
    let deadline = Instant::now() + DOWN_TIMEOUT;
    while daemon::router_lock_held(dir) == Some(true) {
        if Instant::now() >= deadline {
            return Err(CliError::Invalid(format!(
                "the router of {} did not stop within {}",
                dir.path().display(),
                format_duration(DOWN_TIMEOUT)
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    out!(
        "freeflow: no daemon was running for {}; stopped the router that ran there on its own",
        dir.path().display()
    );
    Ok(ExitCode::SUCCESS)
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
enum Pickup {
    NoDaemon,
    Served,
    Skipped(String),
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
            if st.registry_generation.is_some_and(|g| g >= generation) {
                return match st.skipped.iter().find(|s| s.name == name) {
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

fn container_add(args: AddArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    let config = Config::load(&dir)?;
    for (what, value) in [("container name", &args.name), ("tenant", &args.tenant)] {
        if !registry::is_valid_name(value) {
            return Err(RegistryError::InvalidName {
                what,
                value: value.clone(),
            }
            .into());
        }
    }
    let prefix = config.vnet_prefix;
    if !prefix.contains(&args.ip) {
        return Err(CliError::Invalid(format!(
            "overlay IP {} is outside this host's overlay prefix {prefix} (from {}); pick an \
             address inside it",
            args.ip,
            dir.config().display()
        )));
    }
    if prefix.prefix_len() < 31 && (args.ip == prefix.network() || args.ip == prefix.broadcast()) {
        return Err(CliError::Invalid(format!(
            "overlay IP {} is the {} address of {prefix}",
            args.ip,
            if args.ip == prefix.network() {
                "network"
            } else {
                "broadcast"
            }
        )));
    }
    let netns = check_netns(&dir, &args.netns, args.allow_host_netns)?;
    let registry = registry::open(&config.registry)?;
    let record = ContainerRecord {
        name: args.name.clone(),
        tenant: args.tenant.clone(),
        ip: args.ip,
        netns: netns.clone(),
        host_ip: config.host_ip,
    };
    let snapshot = registry.update(&mut |s| s.add_container(record.clone()))?;
    let pickup = wait_for_pickup(&dir, snapshot.generation, &args.name);
    out!(
        "freeflow: registered container {} ({}, tenant {}, netns {}) on host {}{}",
        args.name,
        args.ip,
        args.tenant,
        netns.display(),
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

fn container_rm(args: &RmArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    let config = Config::load(&dir)?;
    let registry = registry::open(&config.registry)?;
    let mut removed = None;
    let snapshot = registry.update(&mut |s| {
        removed = Some(s.remove_container(&args.name)?);
        Ok(())
    })?;
    let removed = removed.ok_or_else(|| RegistryError::NotFound(args.name.clone()))?;
    let tail = if removed.host_ip != config.host_ip {
        format!("; it was served by host {}, not this one", removed.host_ip)
    } else {
        match wait_for_pickup(&dir, snapshot.generation, &args.name) {
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

fn print_table(rows: &[Vec<String>], indent: &str) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out!("{}", line.trim_end());
    }
}

fn container_ls(args: &LsArgs) -> Result<ExitCode, CliError> {
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
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "TENANT".into(),
        "IP".into(),
        "HOST".into(),
        "NETNS".into(),
    ]];
    for c in &snapshot.containers {
        rows.push(vec![
            c.name.clone(),
            c.tenant.clone(),
            c.ip.to_string(),
            if c.host_ip == config.host_ip {
                format!("{} (this host)", c.host_ip)
            } else {
                c.host_ip.to_string()
            },
            c.netns.display().to_string(),
        ]);
    }
    print_table(&rows, "");
    Ok(ExitCode::SUCCESS)
}

fn ms_ago(ms: u64) -> Duration {
    Duration::from_millis(unix_ms_now().saturating_sub(ms))
}

fn status(args: &StatusArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    let config = Config::load_if_present(&dir);
    let daemon_state = daemon::probe(&dir)?;
    let daemon_running = matches!(daemon_state, DaemonState::Running { .. });
    let dstatus = if daemon_running {
        DaemonStatus::read(&dir)
    } else {
        None
    };
    let router: Result<RouterStatus, String> = match control::call(
        &dir.control_socket(),
        &ControlRequest::Status,
        daemon::CONTROL_TIMEOUT,
    ) {
        Ok(ControlResponse::Status(s)) => Ok(s),
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(format!("{} does not exist", dir.control_socket().display()))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Err(format!(
            "nothing listens on {}",
            dir.control_socket().display()
        )),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(format!(
            "{}: permission denied (the control socket is root's)",
            dir.control_socket().display()
        )),
        Err(e) => Err(format!("{}: {e}", dir.control_socket().display())),
    };
    let (containers, registry_error) = match &config {
        Ok(Some(c)) => match registry::open(&c.registry).and_then(|r| r.load()) {
            Ok(snapshot) => (
                snapshot
                    .containers_on(c.host_ip)
                    .cloned()
                    .collect::<Vec<_>>(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e.to_string())),
        },
        _ => (Vec::new(), None),
    };
    let config_error = match &config {
        Ok(Some(_)) => None,
        Ok(None) => Some(format!("{} does not exist", dir.config().display())),
        Err(e) => Some(e.to_string()),
    };
    let config = config.ok().flatten();

    let problem = if !daemon_running {
        Some(if config.is_none() {
            format!(
                "no daemon is running for {} and it was never set up (run `freeflow up --dir {}`)",
                dir.path().display(),
                dir.path().display()
            )
        } else {
            format!(
                "no daemon is running for {} (start it with `freeflow up --dir {}`)",
                dir.path().display(),
                dir.path().display()
            )
        })
    } else if let Err(e) = &router {
        Some(format!(
            "the router is not running ({e}){}",
            dstatus
                .as_ref()
                .and_then(|s| s.last_exit.as_ref())
                .map(|x| format!("; last exit: {x}; the daemon restarts it"))
                .unwrap_or_default()
        ))
    } else {
        None
    };

    if args.json {
        let daemon_json = json!({
            "running": daemon_running,
            "pid": match daemon_state { DaemonState::Running { pid } => pid, DaemonState::Stopped => None },
            "state": dstatus.as_ref().map(|s| s.state.clone()),
            "started_unix_ms": dstatus.as_ref().map(|s| s.started_unix_ms),
            "restarts": dstatus.as_ref().map(|s| s.restarts).unwrap_or(0),
            "start_failures": dstatus.as_ref().map(|s| s.start_failures).unwrap_or(0),
            "last_exit": dstatus.as_ref().and_then(|s| s.last_exit.clone()),
            "last_exit_unix_ms": dstatus.as_ref().and_then(|s| s.last_exit_unix_ms),
            "last_restart_unix_ms": dstatus.as_ref().and_then(|s| s.last_restart_unix_ms),
            "next_restart_unix_ms": dstatus.as_ref().and_then(|s| s.next_restart_unix_ms),
            "containers_pushed": dstatus.as_ref().and_then(|s| s.containers_pushed),
            "registry_generation": dstatus.as_ref().and_then(|s| s.registry_generation),
            "last_push_unix_ms": dstatus.as_ref().and_then(|s| s.last_push_unix_ms),
            "skipped": dstatus.as_ref().map(|s| s.skipped.clone()).unwrap_or_default(),
            "last_error": dstatus.as_ref().and_then(|s| s.last_error.clone()),
        });
        let router_json = match &router {
            Ok(rs) => {
                let mut v = serde_json::to_value(rs).unwrap_or_else(|_| json!({}));
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("running".into(), json!(true));
                }
                v
            }
            Err(e) => json!({
                "running": false,
                "pid": null,
                "shards": [],
                "attached": [],
                "registered": 0,
                "error": e,
            }),
        };
        let value = json!({
            "dir": dir.path(),
            "config": config,
            "config_error": config_error,
            "daemon": daemon_json,
            "router": router_json,
            "containers": containers,
            "registry_error": registry_error,
        });
        out!("{value}");
    } else {
        print_status_text(
            &dir,
            config.as_ref(),
            config_error.as_deref(),
            daemon_state,
            dstatus.as_ref(),
            &router,
            &containers,
            registry_error.as_deref(),
        );
    }
    match problem {
        Some(message) => {
            let _ = writeln!(io::stderr(), "freeflow: {message}");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

#[allow(clippy::too_many_arguments)]
fn print_status_text(
    dir: &RuntimeDir,
    config: Option<&Config>,
    config_error: Option<&str>,
    daemon_state: DaemonState,
    dstatus: Option<&DaemonStatus>,
    router: &Result<RouterStatus, String>,
    containers: &[ContainerRecord],
    registry_error: Option<&str>,
) {
    out!("freeflow in {}", dir.path().display());
    match config {
        Some(c) => {
            out!(
                "  host:       {} (overlay {}, peer port {})",
                c.host_ip,
                c.vnet_prefix,
                c.peer_port
            );
            out!("  registry:   {}", c.registry);
        }
        None => out!("  config:     {}", config_error.unwrap_or("missing")),
    }
    match daemon_state {
        DaemonState::Stopped => out!("  daemon:     not running"),
        DaemonState::Running { pid } => out!(
            "  daemon:     running, pid {}{}",
            pid.map(|p| p.to_string()).unwrap_or("?".into()),
            dstatus
                .map(|s| format!(
                    ", up {}, {}",
                    format_duration(ms_ago(s.started_unix_ms)),
                    s.state
                ))
                .unwrap_or_default()
        ),
    }
    match router {
        Ok(rs) => out!(
            "  router:     running, pid {}, up {}, version {}",
            rs.pid,
            format_duration(Duration::from_millis(rs.uptime_ms)),
            rs.version
        ),
        Err(e) => out!(
            "  router:     not running ({e}){}",
            dstatus
                .and_then(|s| s.next_restart_unix_ms)
                .map(|t| format!(", next start at {}", format_unix_ms(t)))
                .unwrap_or_default()
        ),
    }
    if let Some(s) = dstatus {
        out!(
            "  restarts:   {}{}{}",
            s.restarts,
            if s.start_failures > 0 {
                format!(" ({} failed)", s.start_failures)
            } else {
                String::new()
            },
            match (&s.last_exit, s.last_exit_unix_ms) {
                (Some(why), Some(at)) => format!(
                    "; last exit: {why}, {} ago ({})",
                    format_duration(ms_ago(at)),
                    format_unix_ms(at)
                ),
                _ => String::new(),
            }
        );
        match (s.containers_pushed, s.last_push_unix_ms) {
            (Some(n), Some(at)) => out!(
                "  table:      {n} container(s) pushed {} ago (registry generation {})",
                format_duration(ms_ago(at)),
                s.registry_generation.unwrap_or(0)
            ),
            _ => out!("  table:      not pushed to the current router yet"),
        }
        for skipped in &s.skipped {
            out!("  skipped:    {}: {}", skipped.name, skipped.reason);
        }
        if let Some(e) = &s.last_error {
            out!("  error:      {e}");
        }
    }
    if let Ok(rs) = router {
        out!(
            "  attaches:   {} accepted, {} refused",
            rs.attaches_accepted,
            rs.attaches_refused
        );
        out!(
            "  tcp mode:   {} listener(s), {} connect(s) on the host network ({} on claimed ports), {} sent to the overlay, {} client(s) without Freeflow relayed",
            rs.tcp_listeners,
            rs.tcp_connects,
            rs.tcp_claimed,
            rs.tcp_fallbacks,
            rs.tcp_relayed
        );
        for shard in &rs.shards {
            out!(
                "  shard {}:    core {}, {} attached, {} requests, {} wakeups, {} parks, {} protocol errors",
                shard.index,
                shard
                    .core
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                shard.attached,
                shard.requests,
                shard.wakeups,
                shard.parks,
                shard.protocol_errors
            );
        }
    }
    if let Some(e) = registry_error {
        out!("  registry error: {e}");
    }
    if config.is_some() {
        out!(
            "containers of this host: {} in the registry{}",
            containers.len(),
            match router {
                Ok(rs) => format!(", {} registered with the router", rs.registered),
                Err(_) => String::new(),
            }
        );
    }
    if !containers.is_empty() {
        let mut rows = vec![vec![
            "NAME".to_owned(),
            "TENANT".into(),
            "IP".into(),
            "NETNS".into(),
        ]];
        for c in containers {
            rows.push(vec![
                c.name.clone(),
                c.tenant.clone(),
                c.ip.to_string(),
                c.netns.display().to_string(),
            ]);
        }
        print_table(&rows, "  ");
    }
    if let Ok(rs) = router {
        out!("attached shims: {}", rs.attached.len());
        if !rs.attached.is_empty() {
            let mut rows = vec![vec![
                "ID".to_owned(),
                "CONTAINER".into(),
                "PID".into(),
                "SHARD".into(),
                "KIND".into(),
            ]];
            for a in &rs.attached {
                rows.push(vec![
                    a.id.to_string(),
                    a.container.clone(),
                    a.pid.to_string(),
                    a.shard.map_or_else(|| "-".into(), |s| s.to_string()),
                    a.kind.clone(),
                ]);
            }
            print_table(&rows, "  ");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_forms() {
        let cli = Cli::try_parse_from([
            "freeflow",
            "up",
            "--dir",
            "/tmp/x",
            "--host-ip",
            "192.168.1.1",
            "--vnet-prefix",
            "10.32.0.0/12",
            "--peer-port",
            "7000",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Up(UpArgs {
                peer_port: Some(7000),
                ..
            })
        ));
        assert!(Cli::try_parse_from([
            "freeflow",
            "up",
            "--host-ip",
            "1.2.3.4",
            "--host-ip-prefix",
            "1.2.3.0/24"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["freeflow", "up", "--peer-port", "0"]).is_err());
        let cli = Cli::try_parse_from([
            "freeflow",
            "container",
            "add",
            "c1",
            "--dir",
            "/tmp/x",
            "--netns",
            "/run/netns/c1",
            "--ip",
            "10.32.0.5",
        ])
        .unwrap();
        match cli.command {
            Cmd::Container(ContainerCmd::Add(a)) => {
                assert_eq!(a.tenant, "default");
                assert_eq!(a.name, "c1");
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["freeflow", "container", "ls", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["freeflow", "status", "--json"]).is_ok());
    }
}
