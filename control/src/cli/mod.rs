//! The `freeflow` command line: `up`, `down`, `container add|rm|ls`, `status`, `cluster`, `demo`
//! (see `demo`), and the hidden `daemon` subcommand that `up` re-executes itself as.
//!
//! Every command needs only the runtime directory: `up` records host address, overlay prefix,
//! registry URL, cores and peer port in `config.json` of DIR's state directory (see
//! `crate::config`), and the others read them from there.
//!
//! This file holds the argument definitions (clap) and the dispatch; each command group lives in
//! its own module: `up` and `down` start and stop a host, `container` edits and lists the
//! registry, `status` gathers the typed [`StatusReport`] that `status --json` prints and
//! `status_text` renders as text. `output` prints (stdout tables, stderr warnings), `error`
//! holds [`CliError`].

// First: the modules below use its `out!`.
#[macro_use]
mod output;

pub(crate) mod container;
mod down;
mod error;
mod status;
mod status_text;
mod up;

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;

use crate::config::{ConfigError, RuntimeDir};
use crate::daemon;

pub use error::CliError;
pub use status::{DaemonReport, RouterReport, StatusReport};

const EXIT_CODES: &str = "\
Exit codes: 0 success; 1 failure (for `status`: the daemon or the router is not running); \
2 usage error. `down` exits 0 when nothing was running.

Files in DIR, which containers mount read-only (`-v DIR:DIR:ro`): router.sock, libfsocket.so, \
verbs/libibverbs.so.1 and verbs/librdmacm.so.1 (the shims, mode 0444). Files in the state directory (root only, never \
mounted; --state-dir, $FREEFLOW_STATE_DIR, else /run/freeflow/state/<DIR escaped>, e.g. /run/freeflow/state/freeflow): \
config.json (settings from `up`), registry.json (default registry), daemon.lock, freeflow.pid, \
daemon-status.json, freeflow.log (rotated to freeflow.log.1 past 16 MiB), router.pid, router.log, \
router.lock, router.ctl.";

const UP_HELP: &str = "\
Options not given fall back to $HOST_IP_PREFIX / $VNET_PREFIX, then to the settings of the \
previous `up` for DIR (config.json in its state directory). Daemons of several simulated hosts \
on one machine share one registry: pass the same --registry file:/shared/registry.json to each. \
Hosts of a cluster share one in etcd: --registry etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (this \
host's records then live on a lease its daemon renews).

Containers use the shims installed into DIR: LD_PRELOAD=DIR/libfsocket.so (TCP mode) or \
LD_LIBRARY_PATH=DIR/verbs (RDMA mode), with DIR mounted read-only into the container \
(`-v DIR:DIR:ro`). Never mount the state directory into a container: it holds the router's \
control socket and the registry. A --state-dir given to `up` is recorded (a symlink at the \
default place), so the other commands find it from --dir. Control files an earlier version left \
in DIR (config.json, registry.json, logs) are moved to the state directory by `up`.

The router outlives the daemon: a daemon that dies (SIGKILL, a crash) leaves its router \
serving, and containers keep working. `up` on a DIR whose router still runs starts a daemon \
that adopts that router (no second router; it keeps its --cores until it is restarted). \
SIGTERM, SIGINT or SIGHUP to the daemon stop the daemon and its router; `down` stops both.";

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
    /// Stop the daemon and then its router, also a router whose daemon died (exit code 0 also
    /// when nothing was running)
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
    /// Runtime directory of this host, the one containers mount read-only: attach socket,
    /// shims [default: $FREEFLOW_DIR, else /freeflow]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// State directory of this host, root only: settings, registry, control socket, logs
    /// [default: $FREEFLOW_STATE_DIR, else the one `up` recorded, else
    /// /run/freeflow/state/<DIR escaped>]
    #[arg(long, value_name = "STATE")]
    state_dir: Option<PathBuf>,
}

impl DirArg {
    /// `--dir`, else `$FREEFLOW_DIR` (if not empty), else `/freeflow`: what routers and shims
    /// use too; with `--state-dir`, else the state directory derived from it.
    fn runtime_dir(&self) -> Result<RuntimeDir, ConfigError> {
        let path = self.dir.clone().unwrap_or_else(freeflow_proto::runtime_dir);
        RuntimeDir::with_state(&path, self.state_dir.as_deref())
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
    /// Registry URL: file:PATH or etcd://HOST:PORT[,...][/PREFIX] [default:
    /// file:STATE/registry.json, in the state directory]
    #[arg(long, value_name = "URL", env = "FREEFLOW_REGISTRY")]
    registry: Option<String>,
    /// Cores for the router's shards, e.g. 1 or 0,1 or 0-3 [default: the router's choice]
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// RDMA device the router opens (a libibverbs device name, or `auto`: the first with an
    /// active port); needs a freeflow-router built with the rdma-hw feature [default: none,
    /// the router's software verbs engine]
    #[arg(long, value_name = "NAME|auto")]
    rdma_device: Option<String>,
    /// Router-to-router port, recorded in this host's registry record [default: 7471]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    peer_port: Option<u16>,
    /// Run the daemon in this process (logs on stderr) until SIGTERM, SIGINT or `down`
    #[arg(long)]
    foreground: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9464 (off unless given
    /// to this `up`)
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Also install the chained CNI plugin freeflow-cni (from next to this executable) into
    /// CNI_BIN_DIR, where container runtimes look for plugins, e.g. /opt/cni/bin (not recorded:
    /// pass it to each `up` that should install it)
    #[arg(long, value_name = "CNI_BIN_DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// Register containers by watching the Docker engine at SOCKET [default socket:
    /// /var/run/docker.sock]: every running container that mounts DIR and has an address in
    /// the overlay prefix, tenant from its label freeflow.tenant; unregistered when it stops
    /// (not recorded: pass it to each `up` that should watch) [env: FREEFLOW_DOCKER=SOCKET]
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = crate::docker::DEFAULT_SOCKET)]
    docker: Option<PathBuf>,
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
    /// Print the metrics the daemon serves with `up --metrics`, in Prometheus text format
    #[arg(long, conflicts_with = "json")]
    prometheus: bool,
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
        Cmd::Up(args) => up::up(args),
        Cmd::Down(args) => down::down(&args),
        Cmd::Container(ContainerCmd::Add(args)) => container::add(args),
        Cmd::Container(ContainerCmd::Rm(args)) => container::rm(&args),
        Cmd::Container(ContainerCmd::Ls(args)) => container::ls(&args),
        Cmd::Status(args) => status::status(&args),
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
