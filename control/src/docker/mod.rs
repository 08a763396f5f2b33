//! Registration by watching the local Docker engine (`freeflow up --docker [SOCKET]`).
//!
//! A thread of the daemon talks to the engine's API over its Unix socket (a small HTTP/1.1
//! client, [`http`]). It opens the event stream first (container `start` and `die`), then
//! lists the running containers and reconciles the registry with them, then follows the
//! events; when the stream ends or fails (the engine restarted, the socket is missing) it logs
//! why and starts over after a back-off, reconciling again.
//!
//! A container is Freeflow's when it runs, mounts the Freeflow directory (a mount whose source
//! on the host or destination in the container is DIR) read-only and has an address in this
//! host's overlay prefix on one of its networks. One that mounts it writable is refused, with a
//! log line saying why: it could replace the shims the other containers load. Its network namespace is its sandbox key when this
//! process can open it, else `/proc/<pid>/ns/net` (the router's container sees the engine's
//! sandbox files only if they are mounted in, but sees host pids with `--pid=host`); its tenant
//! is the label `freeflow.tenant`, else `default`. It is registered through the same call as
//! `freeflow container add` and the CNI plugin ([`crate::cli::container::register`]), under the
//! name `docker-<12 digits of its id>-<its name>`; the registry records of this host whose names
//! start with `docker-` are the watcher's, removed when their container dies or, at a
//! reconcile, no longer runs.
//!
//! The engine is trusted no more than a container: its JSON is parsed defensively
//! ([`engine`]); a malformed event is logged (rate-limited) and skipped.

pub mod engine;
pub mod http;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::{ContainerId, ContainerView, Event};
use http::HttpError;

use crate::cli::container::{self, NewContainer, Pickup};
use crate::config::{Config, RuntimeDir};
use crate::daemon::{log_limited, DockerWatchStatus, KEY_DOCKER};
use crate::registry::{self, ContainerRecord};
use crate::supervise::unix_ms_now;

/// Where the engine listens unless `--docker` names another socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Registry names of containers the watcher registered start with this.
pub const NAME_PREFIX: &str = "docker-";
/// The label that names a container's tenant.
pub const TENANT_LABEL: &str = "freeflow.tenant";
/// Tenant of a container without the label.
pub const DEFAULT_TENANT: &str = "default";
/// First wait before talking to the engine again after a failure; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// After this long without an event the watcher pings the engine (a stopped engine keeps its
/// event stream open and silent). `FREEFLOW_DOCKER_QUIET_MS` overrides it (tests).
const QUIET: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the back-off.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// What went wrong in one session with the engine.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// Talking to the engine failed.
    #[error("Docker engine at {socket}: {source}")]
    Http {
        /// The engine's socket.
        socket: String,
        /// What failed.
        #[source]
        source: HttpError,
    },
    /// The engine's answer could not be used.
    #[error("Docker engine at {socket}: {what}: {source}")]
    Parse {
        /// The engine's socket.
        socket: String,
        /// Which answer.
        what: &'static str,
        /// What is wrong with it.
        #[source]
        source: engine::ParseError,
    },
    /// The event stream was quiet and the engine did not answer a ping (stopped, hung).
    #[error(
        "Docker engine at {socket}: no event for {quiet:?} and no answer to a ping ({source})"
    )]
    Silent {
        /// The engine's socket.
        socket: String,
        /// How long the stream had been quiet.
        quiet: Duration,
        /// How the ping failed.
        #[source]
        source: HttpError,
    },
    /// The event stream ended (the engine stopped or restarted).
    #[error("Docker engine at {0}: the event stream ended")]
    StreamEnded(String),
}

/// A container the watcher wants registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Registry name.
    pub name: String,
    /// Tenant (from the label).
    pub tenant: String,
    /// Its address in the overlay prefix.
    pub ip: Ipv4Addr,
    /// Its network namespace file.
    pub netns: PathBuf,
}

/// Why a running container is not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOurs {
    /// It does not mount the Freeflow directory (not worth a log line).
    NoMount,
    /// It mounts the directory, but something else is missing; the reason.
    Skipped(String),
}

/// The registry name of a container: `docker-<short id>-<name>`, the name cut to fit 63
/// characters and reduced to the registry's alphabet.
pub fn registry_name(id: &ContainerId, name: &str) -> String {
    let mut out = format!("{NAME_PREFIX}{}", id.short());
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(registry::MAX_NAME_LEN - out.len() - 1)
        .collect();
    if !clean.is_empty() {
        out.push('-');
        out.push_str(&clean);
    }
    out
}

/// The short id in a registry name the watcher made, if it is one.
fn short_id_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let short = rest.get(..12)?;
    (short
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && matches!(rest.as_bytes().get(12), None | Some(b'-')))
    .then_some(short)
}

/// Decides whether `c` is Freeflow's on this host (see the module documentation) and how to
/// register it. `netns_usable` says whether this process can open a namespace file.
pub fn wanted(
    c: &ContainerView,
    dir: &Path,
    vnet: ipnet::Ipv4Net,
    netns_usable: &dyn Fn(&Path) -> bool,
) -> Result<Wanted, NotOurs> {
    if !c.running {
        return Err(NotOurs::Skipped("it does not run".into()));
    }
    let mounts: Vec<&engine::Mount> = c
        .mounts
        .iter()
        .filter(|m| same_path(&m.source, dir) || same_path(&m.destination, dir))
        .collect();
    if mounts.is_empty() {
        return Err(NotOurs::NoMount);
    }
    if let Some(m) = mounts.iter().find(|m| m.writable) {
        return Err(NotOurs::Skipped(format!(
            "it mounts {} writable at {}: a container that can write the Freeflow directory \
             can replace the shims other containers load; mount it read-only (-v {}:{}:ro)",
            m.source.display(),
            m.destination.display(),
            m.source.display(),
            m.destination.display()
        )));
    }
    let Some(ip) = c.addresses.values().copied().find(|ip| vnet.contains(ip)) else {
        return Err(NotOurs::Skipped(format!(
            "it mounts {} but has no address in the overlay prefix {vnet} (its addresses: {:?})",
            dir.display(),
            c.addresses
        )));
    };
    let netns = match &c.sandbox_key {
        Some(key) if netns_usable(key) => key.clone(),
        _ if c.pid > 0 && netns_usable(&proc_netns(c.pid)) => proc_netns(c.pid),
        _ => {
            return Err(NotOurs::Skipped(format!(
                "neither its sandbox key {:?} nor /proc/{}/ns/net can be opened here (run the \
                 router's container with --pid=host, or mount the engine's netns directory)",
                c.sandbox_key, c.pid
            )))
        }
    };
    let tenant = c
        .labels
        .get(TENANT_LABEL)
        .cloned()
        .unwrap_or_else(|| DEFAULT_TENANT.to_owned());
    Ok(Wanted {
        name: registry_name(&c.id, &c.name),
        tenant,
        ip,
        netns,
    })
}

fn proc_netns(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

/// Starts the watcher on a thread of its own and returns what it reports, for the daemon's
/// status. Called with the daemon's signals blocked, so the thread inherits the mask and
/// SIGTERM still reaches the daemon's signalfd.
pub fn spawn(
    dir: &RuntimeDir,
    config: &Config,
    socket: PathBuf,
) -> std::io::Result<Arc<Mutex<DockerWatchStatus>>> {
    let report = Arc::new(Mutex::new(DockerWatchStatus {
        socket: socket.display().to_string(),
        since_unix_ms: unix_ms_now(),
        ..DockerWatchStatus::default()
    }));
    let watcher = Watcher {
        dir: dir.clone(),
        config: config.clone(),
        socket,
        report: report.clone(),
        quiet: std::env::var("FREEFLOW_DOCKER_QUIET_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(QUIET, Duration::from_millis),
    };
    std::thread::Builder::new()
        .name("docker".into())
        .spawn(move || watcher.run())?;
    Ok(report)
}

struct Watcher {
    dir: RuntimeDir,
    config: Config,
    socket: PathBuf,
    report: Arc<Mutex<DockerWatchStatus>>,
    /// See [`QUIET`].
    quiet: Duration,
}

impl Watcher {
    fn run(&self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let err = match self.session() {
                Ok(never) => match never {},
                Err(e) => e,
            };
            if started.elapsed() >= HEALTHY_SESSION {
                backoff = FIRST_BACKOFF;
            }
            let message = err.to_string();
            self.update(|r| {
                if r.connected {
                    r.since_unix_ms = unix_ms_now();
                }
                r.connected = false;
                if matches!(err, DockerError::Parse { .. }) {
                    r.malformed += 1;
                }
                r.last_error = Some(message);
            });
            log_limited(
                KEY_DOCKER,
                format_args!(
                    "docker: {err}; trying again in {} s (is the engine's socket mounted: -v \
                     {}:{}?)",
                    backoff.as_secs(),
                    DEFAULT_SOCKET,
                    self.socket.display()
                ),
            );
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Changes the watcher's report (a poisoned lock is ignored: it only feeds the status).
    fn update(&self, change: impl FnOnce(&mut DockerWatchStatus)) {
        if let Ok(mut report) = self.report.lock() {
            change(&mut report);
        }
    }

    fn http_err(&self) -> impl Fn(HttpError) -> DockerError + '_ {
        move |source| DockerError::Http {
            socket: self.socket.display().to_string(),
            source,
        }
    }

    fn parse_err(&self, what: &'static str) -> impl Fn(engine::ParseError) -> DockerError + '_ {
        move |source| DockerError::Parse {
            socket: self.socket.display().to_string(),
            what,
            source,
        }
    }

    /// One connection's life: events opened, reconcile, events followed until they end.
    fn session(&self) -> Result<std::convert::Infallible, DockerError> {
        let filters = r#"{"type":["container"],"event":["start","die"]}"#;
        let path = format!("/events?filters={}", http::query_escape(filters));
        // Opened before the list, so that nothing that happens between the two is missed.
        let mut events = http::get(&self.socket, &path).map_err(self.http_err())?;
        let list = http::get(&self.socket, "/containers/json")
            .and_then(|mut r| r.read_body())
            .map_err(self.http_err())?;
        let running = engine::parse_list(&list).map_err(self.parse_err("container list"))?;
        log_limited(
            KEY_DOCKER,
            format_args!(
                "docker: following {}; {} running container(s) to reconcile",
                self.socket.display(),
                running.len()
            ),
        );
        self.update(|r| {
            r.connected = true;
            r.since_unix_ms = unix_ms_now();
        });
        self.reconcile(&running);
        let mut pending = Vec::new();
        loop {
            let line = match events
                .next_line(&mut pending, self.quiet)
                .map_err(self.http_err())?
            {
                http::Next::Line(line) => line,
                http::Next::End => {
                    return Err(DockerError::StreamEnded(self.socket.display().to_string()))
                }
                // Nothing happened for a while; a stopped engine looks the same, but does not
                // answer a ping: then start over (and reconcile) rather than wait for ever.
                http::Next::Quiet => {
                    http::ping(&self.socket, http::IO_TIMEOUT).map_err(|source| {
                        DockerError::Silent {
                            socket: self.socket.display().to_string(),
                            quiet: self.quiet,
                            source,
                        }
                    })?;
                    continue;
                }
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match engine::parse_event(&line) {
                Ok(Event::Start(id)) => self.started(&id),
                Ok(Event::Die(id)) => self.died(&id),
                Ok(Event::Other) => {}
                Err(e) => {
                    self.update(|r| r.malformed += 1);
                    log_limited(
                        KEY_DOCKER,
                        format_args!(
                            "docker: skipping a malformed event ({e}): {:?}",
                            String::from_utf8_lossy(&line[..line.len().min(200)])
                        ),
                    );
                }
            }
        }
    }

    /// Registers every running container that is Freeflow's, and unregisters this host's
    /// watcher records whose container no longer runs. Stale records go first: a container that runs now may have the address or the
    /// namespace path of one that stopped while no daemon watched.
    fn reconcile(&self, running: &[ContainerId]) {
        let shorts: BTreeSet<&str> = running.iter().map(ContainerId::short).collect();
        let stale: Vec<String> = match self.load() {
            Some(snapshot) => snapshot
                .containers_on(self.config.host_ip)
                .filter(|c| short_id_of(&c.name).is_some_and(|s| !shorts.contains(s)))
                .map(|c| c.name.clone())
                .collect(),
            None => Vec::new(),
        };
        for name in stale {
            self.unregister(&name, "its container no longer runs");
        }
        for id in running {
            self.started(id);
        }
    }

    fn load(&self) -> Option<registry::Snapshot> {
        match registry::open(&self.config.registry).and_then(|r| r.load()) {
            Ok(s) => Some(s),
            Err(e) => {
                log_limited(KEY_DOCKER, format_args!("docker: registry: {e}"));
                None
            }
        }
    }

    fn inspect(&self, id: &ContainerId) -> Result<ContainerView, DockerError> {
        let body = http::get(&self.socket, &format!("/containers/{}/json", id.as_str()))
            .and_then(|mut r| r.read_body())
            .map_err(self.http_err())?;
        engine::parse_inspect(&body).map_err(self.parse_err("container inspect"))
    }

    /// A container started: registers it if it is Freeflow's (replacing a record of the same
    /// name that differs, e.g. after a restart gave it a new namespace).
    fn started(&self, id: &ContainerId) {
        let view = match self.inspect(id) {
            Ok(view) => view,
            Err(e) => {
                if matches!(e, DockerError::Parse { .. }) {
                    self.update(|r| r.malformed += 1);
                }
                log_limited(KEY_DOCKER, format_args!("docker: {}: {e}", id.short()));
                return;
            }
        };
        let usable = |p: &Path| std::fs::File::open(p).is_ok();
        let want = match wanted(&view, self.dir.path(), self.config.vnet_prefix, &usable) {
            Ok(want) => want,
            Err(NotOurs::NoMount) => return,
            Err(NotOurs::Skipped(reason)) => {
                self.update(|r| r.refused += 1);
                log_limited(
                    KEY_DOCKER,
                    format_args!(
                        "docker: not registering {} ({}): {reason}",
                        view.name,
                        id.short()
                    ),
                );
                return;
            }
        };
        let Some(snapshot) = self.load() else { return };
        let desired = ContainerRecord {
            name: want.name.clone(),
            tenant: want.tenant.clone(),
            ip: want.ip,
            netns: want.netns.clone(),
            host_ip: self.config.host_ip,
        };
        match snapshot.container(&want.name) {
            Some(existing) if *existing == desired => return,
            Some(_) => self.unregister(&want.name, "it restarted with other settings"),
            None => {}
        }
        let new = NewContainer {
            name: &want.name,
            tenant: &want.tenant,
            ip: want.ip,
            netns: &want.netns,
            allow_host_netns: false,
        };
        match container::register(&self.dir, &self.config, new) {
            Ok((_, Pickup::Skipped(reason))) => log_limited(
                KEY_DOCKER,
                format_args!(
                    "docker: registered {} ({}, tenant {}) but the daemon skips it: {reason}",
                    want.name, want.ip, want.tenant
                ),
            ),
            Ok(_) => {
                self.update(|r| r.registered += 1);
                log_limited(
                    KEY_DOCKER,
                    format_args!(
                        "docker: registered {} ({}, tenant {}, netns {})",
                        want.name,
                        want.ip,
                        want.tenant,
                        want.netns.display()
                    ),
                );
            }
            Err(e) => log_limited(
                KEY_DOCKER,
                format_args!("docker: cannot register {}: {e}", want.name),
            ),
        }
    }

    /// A container died: unregisters this host's watcher records of it.
    fn died(&self, id: &ContainerId) {
        let Some(snapshot) = self.load() else { return };
        let names: Vec<String> = snapshot
            .containers_on(self.config.host_ip)
            .filter(|c| short_id_of(&c.name) == Some(id.short()))
            .map(|c| c.name.clone())
            .collect();
        for name in names {
            self.unregister(&name, "its container stopped");
        }
    }

    fn unregister(&self, name: &str, why: &str) {
        match container::unregister(&self.dir, &self.config, name) {
            Ok((Some(_), _)) => {
                self.update(|r| r.unregistered += 1);
                log_limited(
                    KEY_DOCKER,
                    format_args!("docker: unregistered {name}: {why}"),
                );
            }
            Ok((None, _)) => {}
            Err(e) => log_limited(
                KEY_DOCKER,
                format_args!("docker: cannot unregister {name}: {e}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const ID: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn view() -> ContainerView {
        ContainerView {
            id: ContainerId::parse(ID).unwrap(),
            name: "iperf".into(),
            running: true,
            pid: 77,
            sandbox_key: Some("/var/run/docker/netns/x".into()),
            addresses: BTreeMap::from([("ffnet".into(), Ipv4Addr::new(10, 32, 1, 2))]),
            mounts: vec![engine::Mount {
                source: "/srv/ff".into(),
                destination: "/freeflow".into(),
                writable: false,
            }],
            labels: BTreeMap::from([(TENANT_LABEL.into(), "blue".into())]),
        }
    }

    #[test]
    fn picks_containers_that_mount_the_directory_and_sit_on_the_overlay() {
        let vnet = "10.32.0.0/12".parse().unwrap();
        let all = |_: &Path| true;
        let w = wanted(&view(), Path::new("/freeflow/"), vnet, &all).unwrap();
        assert_eq!(w.name, "docker-fedcba987654-iperf");
        assert_eq!(w.tenant, "blue");
        assert_eq!(w.netns, PathBuf::from("/var/run/docker/netns/x"));
        // The host's path of the directory counts too (a daemon outside a container).
        assert!(wanted(&view(), Path::new("/srv/ff"), vnet, &all).is_ok());
        assert_eq!(
            wanted(&view(), Path::new("/other"), vnet, &all),
            Err(NotOurs::NoMount)
        );
        let outside = "192.168.0.0/16".parse().unwrap();
        assert!(matches!(
            wanted(&view(), Path::new("/freeflow"), outside, &all),
            Err(NotOurs::Skipped(_))
        ));
        // The sandbox file is not visible: the pid's namespace is used.
        let only_proc = |p: &Path| p.starts_with("/proc");
        let w = wanted(&view(), Path::new("/freeflow"), vnet, &only_proc).unwrap();
        assert_eq!(w.netns, PathBuf::from("/proc/77/ns/net"));
        let mut writable = view();
        writable.mounts[0].writable = true;
        match wanted(&writable, Path::new("/freeflow"), vnet, &all) {
            Err(NotOurs::Skipped(why)) => assert!(why.contains("read-only"), "{why}"),
            other => panic!("a writable mount accepted: {other:?}"),
        }
        let none = |_: &Path| false;
        assert!(wanted(&view(), Path::new("/freeflow"), vnet, &none).is_err());
        let mut plain = view();
        plain.labels.clear();
        assert_eq!(
            wanted(&plain, Path::new("/freeflow"), vnet, &all)
                .unwrap()
                .tenant,
            DEFAULT_TENANT
        );
    }

    #[test]
    fn registry_names_fit_and_map_back_to_the_id() {
        let id = ContainerId::parse(ID).unwrap();
        let long = "n".repeat(200);
        let name = registry_name(&id, &long);
        assert!(registry::is_valid_name(&name), "{name}");
        assert_eq!(short_id_of(&name), Some("fedcba987654"));
        assert_eq!(registry_name(&id, "/!!"), "docker-fedcba987654");
        assert_eq!(short_id_of("docker-fedcba987654"), Some("fedcba987654"));
        assert_eq!(short_id_of("docker-web"), None);
        assert_eq!(short_id_of("docker-fedcba987654x"), None);
        assert_eq!(short_id_of("web"), None);
    }
}
