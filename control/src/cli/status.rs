//! `freeflow status`: gathers a [`StatusReport`] (settings, daemon, router, this host's
//! containers) and prints it as JSON (`--json`) or text (`status_text`).
//!
//! The JSON is the report serialised through `serde_json::Value`, whose maps keep their keys
//! sorted: every object of `status --json` lists its keys in alphabetical order, as it always
//! has, whatever the order of the fields below.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use freeflow_proto::control::{
    self, AttachedStatus, ControlRequest, ControlResponse, RouterStatus, ShardStatus,
};
use freeflow_proto::identity::NetnsId;
use serde::Serialize;

use super::{status_text, CliError, StatusArgs};
use crate::config::{Config, RuntimeDir};
use crate::daemon::{self, DaemonCounters, DaemonState, DaemonStatus};
use crate::registry::{self, ContainerRecord};

/// What `freeflow status` reports about one runtime directory.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The runtime directory (absolute).
    pub dir: PathBuf,
    /// The settings of the last `up`, if `config.json` is there and readable.
    pub config: Option<Config>,
    /// Why there are no settings (missing or unreadable `config.json`).
    pub config_error: Option<String>,
    /// The daemon.
    pub daemon: DaemonReport,
    /// The router, as its control socket reports it.
    pub router: RouterReport,
    /// This host's containers in the registry.
    pub containers: Vec<ContainerRecord>,
    /// Why the registry could not be read, if it could not.
    pub registry_error: Option<String>,
    /// Whether the registry was read, and if not where it is and what is wrong with it.
    pub registry: RegistryReport,
}

/// The registry part of a [`StatusReport`]. `containers` (empty) means "none" only when
/// `readable` is true; otherwise the registry could not tell.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegistryReport {
    /// The registry URL of the settings (`None` without settings).
    pub url: Option<String>,
    /// Whether it was read.
    pub readable: bool,
    /// "corrupt" (there, but its contents cannot be used) or "unreadable"; `None` if it was
    /// read or not asked.
    pub problem: Option<&'static str>,
    /// The registry file the error names, if it names one.
    pub path: Option<PathBuf>,
    /// The error, with the parser's line and column for a corrupt file.
    pub error: Option<String>,
}

/// The daemon part of a [`StatusReport`]: whether it runs, and its counters from
/// `daemon-status.json` (absent: `None`, zero or empty) while it does.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonReport {
    /// Whether a process holds `daemon.lock`.
    pub running: bool,
    /// Its pid, if `freeflow.pid` names one.
    pub pid: Option<u32>,
    /// Its state; `None` when its status file was not read (not running, or not written yet).
    pub state: Option<String>,
    /// When it started (ms since the epoch).
    pub started_unix_ms: Option<u64>,
    /// The counters of its status file (zero and empty when it was not read).
    #[serde(flatten)]
    pub counters: DaemonCounters,
}

/// The router part of a [`StatusReport`]. Both forms carry `running`, `pid`, `shards`,
/// `attached` and `registered`, so readers find those keys either way.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RouterReport {
    /// The router answered on its control socket: its status, plus `running: true`.
    Running {
        /// Always `true`.
        running: bool,
        /// What the router said.
        #[serde(flatten)]
        status: RouterStatus,
    },
    /// It did not answer.
    NotRunning {
        /// Always `false`.
        running: bool,
        /// Always `None`.
        pid: Option<u32>,
        /// Always empty.
        shards: Vec<ShardStatus>,
        /// Always empty.
        attached: Vec<AttachedStatus>,
        /// Always 0.
        registered: usize,
        /// Why the control socket did not answer.
        error: String,
    },
}

impl RouterReport {
    /// The report of a router that answered, or of one that did not and why.
    fn new(answer: Result<RouterStatus, String>) -> RouterReport {
        match answer {
            Ok(status) => RouterReport::Running {
                running: true,
                status,
            },
            Err(error) => RouterReport::NotRunning {
                running: false,
                pid: None,
                shards: Vec::new(),
                attached: Vec::new(),
                registered: 0,
                error,
            },
        }
    }

    /// What the router said, if it answered.
    pub fn status(&self) -> Result<&RouterStatus, &str> {
        match self {
            RouterReport::Running { status, .. } => Ok(status),
            RouterReport::NotRunning { error, .. } => Err(error),
        }
    }
}

impl DaemonReport {
    /// The report of the daemon in `state`, with the counters of its status file if read.
    fn new(state: DaemonState, status: Option<&DaemonStatus>) -> DaemonReport {
        DaemonReport {
            running: matches!(state, DaemonState::Running { .. }),
            pid: match state {
                DaemonState::Running { pid } => pid,
                DaemonState::Stopped => None,
            },
            state: status.map(|s| s.state.clone()),
            started_unix_ms: status.map(|s| s.started_unix_ms),
            counters: status.map(|s| s.counters.clone()).unwrap_or_default(),
        }
    }

    /// Whether the daemon's status file was read (its counters are meaningful).
    pub fn reported(&self) -> bool {
        self.state.is_some()
    }
}

impl StatusReport {
    /// Looks at everything `status` shows: `config.json`, the daemon lock and status file, the
    /// router's control socket and the registry.
    pub fn gather(dir: &RuntimeDir) -> Result<StatusReport, CliError> {
        let config = Config::load_if_present(dir);
        let daemon_state = daemon::probe(dir)?;
        let daemon_status = match daemon_state {
            DaemonState::Running { .. } => DaemonStatus::read(dir),
            DaemonState::Stopped => None,
        };
        let router = RouterReport::new(ask_router(dir));
        let (containers, registry) = match &config {
            Ok(Some(c)) => host_containers(c),
            _ => (Vec::new(), RegistryReport::default()),
        };
        let (config, config_error) = match config {
            Ok(Some(c)) => (Some(c), None),
            Ok(None) => (
                None,
                Some(format!("{} does not exist", dir.config().display())),
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        Ok(StatusReport {
            dir: dir.path().to_path_buf(),
            config,
            config_error,
            daemon: DaemonReport::new(daemon_state, daemon_status.as_ref()),
            router,
            containers,
            registry_error: registry.error.clone(),
            registry,
        })
    }

    /// What is wrong, if the daemon or the router is not running (`status` then exits 1).
    pub fn problem(&self) -> Option<String> {
        let dir = self.dir.display();
        if !self.daemon.running {
            if let Ok(router) = self.router.status() {
                return Some(format!(
                    "no daemon is running for {dir}, but its router (pid {}) still serves: \
                     `freeflow up --dir {dir}` starts a daemon that adopts it, `freeflow down \
                     --dir {dir}` stops it",
                    router.pid
                ));
            }
            return Some(if self.config.is_none() {
                format!(
                    "no daemon is running for {dir} and it was never set up (run `freeflow up \
                     --dir {dir}`)"
                )
            } else {
                format!("no daemon is running for {dir} (start it with `freeflow up --dir {dir}`)")
            });
        }
        let Err(e) = self.router.status() else {
            return None;
        };
        Some(format!(
            "the router is not running ({e}){}",
            self.daemon
                .counters
                .last_exit
                .as_ref()
                .map(|x| format!("; last exit: {x}; the daemon restarts it"))
                .unwrap_or_default()
        ))
    }

    /// The report as one line of JSON (keys sorted, see the module docs).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        Ok(serde_json::to_value(self)?.to_string())
    }
}

/// `freeflow status`: prints the report; exits 1 (after saying why on stderr) when the daemon
/// or the router is not running.
pub(super) fn status(args: &StatusArgs) -> Result<ExitCode, CliError> {
    let dir = args.dir.runtime_dir()?;
    if args.prometheus {
        let scrape = crate::metrics::Scrape::gather(&dir)?;
        out!("{}", scrape.render().trim_end());
        return Ok(exit_code(scrape.status.problem()));
    }
    let report = StatusReport::gather(&dir)?;
    if args.json {
        let json = report
            .to_json()
            .map_err(|e| CliError::Invalid(format!("cannot encode the status as JSON: {e}")))?;
        out!("{json}");
    } else {
        status_text::print(&report);
    }
    Ok(exit_code(report.problem()))
}

/// Exit 1 (after saying why on stderr) if there is a `problem`.
fn exit_code(problem: Option<String>) -> ExitCode {
    match problem {
        Some(message) => {
            let _ = writeln!(io::stderr(), "freeflow: {message}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

/// Asks the router's control socket for its status; the error says, for a person, why there
/// is no answer.
fn ask_router(dir: &RuntimeDir) -> Result<RouterStatus, String> {
    let socket = dir.control_socket();
    match control::call(&socket, &ControlRequest::Status, daemon::CONTROL_TIMEOUT) {
        Ok(ControlResponse::Status(s)) => Ok(s),
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(format!("{} does not exist", socket.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(format!("nothing listens on {}", socket.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(format!(
            "{}: permission denied (the control socket is root's)",
            socket.display()
        )),
        Err(e) => Err(format!("{}: {e}{}", socket.display(), netns_hint(dir))),
    }
}

/// Why the router may have closed on this process unanswered: it answers only root in its own
/// network namespace, and the daemon (its parent) runs in another one than this command.
fn netns_hint(dir: &RuntimeDir) -> String {
    let own = NetnsId::current().ok();
    let daemon = daemon::read_pid(dir).and_then(|pid| NetnsId::of_pid(pid as i32).ok());
    match (own, daemon) {
        (Some(own), Some(daemon)) if own != daemon => format!(
            " (the router answers only root in its own network namespace, net:[{}], and this \
             command runs in net:[{}]: run it there, e.g. with `ip netns exec`)",
            daemon.ino, own.ino
        ),
        _ => String::new(),
    }
}

/// This host's containers in the registry of `config`, and whether the registry could be read.
fn host_containers(config: &Config) -> (Vec<ContainerRecord>, RegistryReport) {
    let mut report = RegistryReport {
        url: Some(config.registry.clone()),
        ..RegistryReport::default()
    };
    match registry::open(&config.registry).and_then(|r| r.load()) {
        Ok(snapshot) => {
            report.readable = true;
            let containers = snapshot.containers_on(config.host_ip).cloned().collect();
            (containers, report)
        }
        Err(e) => {
            report.problem = Some(if e.is_corrupt() {
                "corrupt"
            } else {
                "unreadable"
            });
            report.path = e.path().map(Path::to_path_buf);
            report.error = Some(e.to_string());
            (Vec::new(), report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::SkippedContainer;

    fn report(daemon: DaemonReport, router: RouterReport) -> StatusReport {
        StatusReport {
            dir: "/tmp/ff x".into(),
            config: Some(Config {
                version: 1,
                host_ip: "192.168.1.1".parse().unwrap(),
                vnet_prefix: "10.32.0.0/12".parse().unwrap(),
                registry: "file:/r.json".into(),
                cores: Some("0,1".into()),
                rdma_device: None,
                peer_port: 7471,
                metrics: None,
                docker: None,
            }),
            config_error: None,
            daemon,
            router,
            containers: vec![ContainerRecord {
                name: "web".into(),
                tenant: "t".into(),
                ip: "10.32.0.5".parse().unwrap(),
                netns: "/run/netns/web".into(),
                host_ip: "192.168.1.1".parse().unwrap(),
            }],
            registry_error: None,
            registry: RegistryReport {
                url: Some("file:/r.json".into()),
                readable: true,
                ..RegistryReport::default()
            },
        }
    }

    fn router_status() -> RouterStatus {
        RouterStatus {
            pid: 11,
            version: "0.1".into(),
            uptime_ms: 1234,
            shards: vec![ShardStatus {
                index: 0,
                core: None,
                attached: 2,
                requests: 3,
                wakeups: 4,
                parks: 5,
                protocol_errors: 6,
                parked_ns: 8,
                cpu_ns: 9,
                containers: 1,
                qps: 10,
                verbs_ops: 12,
                verbs_bytes: 13,
            }],
            registered: 1,
            attached: vec![AttachedStatus {
                id: 1,
                container: "web".into(),
                pid: 77,
                shard: Some(0),
                kind: "socket".into(),
            }],
            attaches_accepted: 1,
            attaches_refused: 2,
            tcp_listeners: 3,
            tcp_connects: 4,
            tcp_fallbacks: 5,
            tcp_relayed: 6,
            tcp_claimed: 7,
            tcp_remote_listeners: Vec::new(),
            tcp_by_tenant: Vec::new(),
            jail_active: false,
            cm_listeners: 0,
            cm_established: 0,
            cm_resolved_late: 0,
        }
    }

    /// The start of both reports' JSON: the settings and the containers of [`report`].
    const SETTINGS_AND_CONTAINERS_JSON: &str = concat!(
        r#"{"config":{"cores":"0,1","host_ip":"192.168.1.1","peer_port":7471,"#,
        r#""registry":"file:/r.json","version":1,"vnet_prefix":"10.32.0.0/12"},"#,
        r#""config_error":null,"containers":[{"host_ip":"192.168.1.1","ip":"10.32.0.5","#,
        r#""name":"web","netns":"/run/netns/web","tenant":"t"}],"#,
    );

    /// The JSON `status --json` printed when it was built with `json!` (keys sorted at every
    /// level); the typed report must print the same bytes.
    #[test]
    fn status_json_keeps_its_keys_order_and_values() {
        let daemon_status = DaemonStatus {
            pid: 5,
            state: "ready".into(),
            started_unix_ms: 17,
            counters: DaemonCounters {
                restarts: 2,
                start_failures: 1,
                last_exit: Some("bye \"q\"".into()),
                last_exit_unix_ms: Some(4),
                last_restart_unix_ms: Some(5),
                containers_pushed: Some(1),
                registry_generation: Some(8),
                last_push_unix_ms: Some(6),
                skipped: vec![SkippedContainer {
                    name: "a".into(),
                    reason: "r".into(),
                }],
                ..DaemonCounters::default()
            },
            ..DaemonStatus::default()
        };
        let up = report(
            DaemonReport::new(DaemonState::Running { pid: Some(5) }, Some(&daemon_status)),
            RouterReport::new(Ok(router_status())),
        );
        let daemon_and_router_up = concat!(
            r#""daemon":{"containers_pushed":1,"last_error":null,"last_exit":"bye \"q\"","#,
            r#""last_exit_unix_ms":4,"last_push_unix_ms":6,"last_restart_unix_ms":5,"#,
            r#""next_restart_unix_ms":null,"pid":5,"registry_generation":8,"restarts":2,"#,
            r#""router_adopted":false,"running":true,"skipped":[{"name":"a","reason":"r"}],"start_failures":1,"#,
            r#""started_unix_ms":17,"state":"ready"},"dir":"/tmp/ff x","#,
            r#""registry":{"error":null,"path":null,"problem":null,"readable":true,"#,
            r#""url":"file:/r.json"},"registry_error":null,"#,
            r#""router":{"attached":[{"container":"web","id":1,"kind":"socket","pid":77,"#,
            r#""shard":0}],"attaches_accepted":1,"attaches_refused":2,"cm_established":0,"cm_listeners":0,"#,
            r#""cm_resolved_late":0,"#,
            r#""jail_active":false,"pid":11,"#,
            r#""registered":1,"running":true,"shards":[{"attached":2,"containers":1,"core":null,"cpu_ns":9,"#,
            r#""index":0,"parked_ns":8,"parks":5,"protocol_errors":6,"qps":10,"requests":3,"#,
            r#""verbs_bytes":13,"verbs_ops":12,"wakeups":4}],"tcp_by_tenant":[],"tcp_claimed":7,"#,
            r#""tcp_connects":4,"tcp_fallbacks":5,"tcp_listeners":3,"tcp_relayed":6,"#,
            r#""tcp_remote_listeners":[],"#,
            r#""uptime_ms":1234,"version":"0.1"}}"#
        );
        assert_eq!(
            up.to_json().unwrap(),
            SETTINGS_AND_CONTAINERS_JSON.to_owned() + daemon_and_router_up
        );
        assert_eq!(up.problem(), None);

        let down = report(
            DaemonReport::new(DaemonState::Stopped, None),
            RouterReport::new(Err("nothing listens".into())),
        );
        let daemon_and_router_down = concat!(
            r#""daemon":{"containers_pushed":null,"last_error":null,"last_exit":null,"#,
            r#""last_exit_unix_ms":null,"last_push_unix_ms":null,"last_restart_unix_ms":null,"#,
            r#""next_restart_unix_ms":null,"pid":null,"registry_generation":null,"restarts":0,"#,
            r#""router_adopted":false,"running":false,"skipped":[],"start_failures":0,"started_unix_ms":null,"#,
            r#""state":null},"dir":"/tmp/ff x","#,
            r#""registry":{"error":null,"path":null,"problem":null,"readable":true,"#,
            r#""url":"file:/r.json"},"registry_error":null,"#,
            r#""router":{"attached":[],"error":"nothing listens","pid":null,"registered":0,"#,
            r#""running":false,"shards":[]}}"#
        );
        assert_eq!(
            down.to_json().unwrap(),
            SETTINGS_AND_CONTAINERS_JSON.to_owned() + daemon_and_router_down
        );
        assert!(down
            .problem()
            .unwrap()
            .starts_with("no daemon is running for /tmp/ff x (start it"));
    }
}
