//! The control daemon of one host: starts `freeflow-router`, keeps its container table in step
//! with the registry, restarts it with backoff when it dies, and stops it on SIGTERM.
//!
//! One loop, single-threaded. It sleeps in poll(2) on a signalfd (SIGTERM, SIGINT, SIGHUP,
//! SIGCHLD) and, for an adopted router, that router's pidfd, for at most [`REGISTRY_POLL`], so a
//! dying router wakes it at once and a registry change is seen within one poll interval.
//!
//! The router outlives the daemon: it runs in its own session without PR_SET_PDEATHSIG, so a
//! daemon killed with SIGKILL leaves it serving (attachments and TCP connections are the
//! router's). Its pid stays in `STATE/router.pid`; the next daemon adopts it (it answers
//! `router.ctl` with that pid) instead of starting a second one, watches it through a pidfd,
//! pushes the table again and restarts it if it dies. A daemon stopped by SIGTERM, SIGINT or
//! SIGHUP stops its router (`freeflow down` also makes sure of it afterwards). State the CLI shows lives in
//! `daemon-status.json` in the state directory (`STATE`, see `crate::config`), replaced
//! atomically on every change; liveness is the flock on `STATE/daemon.lock`, which the kernel
//! drops with the process whatever way it dies; `state` holds those files' types and how the
//! CLI reads them.

mod log;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use freeflow_proto::control::{
    self, ContainerEntry, ControlRequest, ControlResponse, NetworkView, OverlayEntry, PeerHost,
    TableDelta,
};
use freeflow_proto::identity::NetnsId;

pub use log::{log, log_limited, KEY_DOCKER};
use log::{KEY_PUSH, KEY_REGISTRY, KEY_RESTART, KEY_SKIPPED};
pub use state::{
    probe, read_pid, read_router_pid, router_lock_held, DaemonCounters, DaemonState, DaemonStatus,
    DockerWatchStatus, SkippedContainer, STATE_READY, STATE_STARTING, STATE_STOPPING,
};

use crate::config::{self, Config, ConfigError, RuntimeDir};
use crate::os;
use crate::registry::{
    self, Fingerprint, HostRecord, Registry, RegistryError, RegistryWatch, Snapshot,
};
use crate::supervise::{
    self, format_duration, unix_ms_now, Backoff, Router, RouterSpec, SuperviseError,
};

/// What the router is told: this host's containers (for the attach check) and the cluster's
/// overlay addresses and peer routers (for TCP mode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouterTable {
    containers: Vec<ContainerEntry>,
    network: NetworkView,
}

/// How often, while the registry does not change, the table is rebuilt to see namespaces that
/// appeared or went away (a stat per container of this host: at 3,000 containers, rebuilding
/// at every [`REGISTRY_POLL`] kept an idle daemon at a fifth of a core).
pub const NETNS_RECHECK: Duration = Duration::from_secs(1);
/// How often the registry's fingerprint is checked.
pub const REGISTRY_POLL: Duration = Duration::from_millis(200);
/// How long a starting router may take to report ready.
pub const ROUTER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the router gets to stop after SIGTERM before SIGKILL.
pub const ROUTER_STOP_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one exchange on the router's control socket.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// A push the router refused is retried this often while the table stays the same.
const PUSH_RETRY: Duration = Duration::from_secs(2);

/// Errors that stop the daemon (or keep it from starting).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Reading the configuration failed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The registry cannot be opened or read.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The router could not be found or started.
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    /// Another daemon holds the directory's lock.
    #[error("a freeflow daemon is already running for {dir}{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning {
        /// The runtime directory.
        dir: String,
        /// Its pid, if its pid file says.
        pid: Option<u32>,
    },
    /// A router holds the directory's lock but cannot be adopted.
    #[error(
        "a freeflow-router already serves {dir} but cannot be adopted: {reason}; stop it first \
         (`freeflow down --dir {dir}`)"
    )]
    CannotAdopt {
        /// The runtime directory.
        dir: String,
        /// Why not.
        reason: String,
    },
    /// The router took its table with an error, or the control socket failed.
    #[error("could not give the router its container table: {0}")]
    Push(String),
    /// A file or system call of the daemon failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Removes the pid and status files when the daemon ends (before its lock goes).
struct StateFiles<'a> {
    dir: &'a RuntimeDir,
}

impl Drop for StateFiles<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.dir.pid_file());
        let _ = fs::remove_file(self.dir.status_file());
    }
}

/// Runs the daemon for `dir` until SIGTERM, SIGINT or SIGHUP. `foreground` prints a line on
/// stdout once the router is ready and has its table.
pub fn run(dir: &RuntimeDir, foreground: bool) -> Result<(), DaemonError> {
    log::init(&dir.log());
    let config = Config::load(dir)?;
    let lock = lock_dir(dir)?;
    let pid = std::process::id();
    config::write_atomic(&dir.pid_file(), format!("{pid}\n").as_bytes(), 0o644)?;
    let state_files = StateFiles { dir };

    // Block the signals before the first child exists, so no SIGCHLD is lost.
    let signals = os::SignalFd::block(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD])
        .map_err(io_err("cannot set up signal handling"))?;
    if let Some(addr) = config.metrics {
        serve_metrics(dir, addr)?;
    }
    let mut daemon = Daemon::new(dir, config, signals)?;
    log(format_args!(
        "starting for {} (host {}, overlay {}, registry {}, router {})",
        dir.path().display(),
        daemon.config.host_ip,
        daemon.config.vnet_prefix,
        daemon.status.registry,
        daemon.spec.program.display()
    ));
    daemon.write_status();

    let result = daemon.startup().and_then(|()| {
        // After the router is ready, so that each registration's wait for the daemon's pickup
        // is answered; the thread inherits the blocked signals.
        if let Some(socket) = &daemon.config.docker {
            let watch = crate::docker::spawn(dir, &daemon.config, socket.clone())
                .map_err(io_err("cannot start the Docker watcher thread"))?;
            daemon.docker = Some(watch);
            log(format_args!(
                "watching the Docker engine at {} to register containers",
                socket.display()
            ));
        }
        daemon.ready(foreground);
        daemon.serve()
    });
    daemon.shutdown();
    // The order matters: the router is gone, then the pid and status files, then the lock.
    drop(daemon);
    drop(state_files);
    drop(lock);
    result
}

/// Binds `addr` and serves the metrics there on a thread of their own (the daemon's loop stays
/// single-threaded). Called with the signals blocked, so that the thread inherits the mask and
/// SIGTERM reaches the signalfd, not the thread.
fn serve_metrics(dir: &RuntimeDir, addr: std::net::SocketAddr) -> Result<(), DaemonError> {
    let listener = crate::metrics::http::bind(addr)
        .map_err(io_err(format!("cannot serve metrics on {addr}")))?;
    let dir = dir.clone();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || crate::metrics::http::serve(listener, dir))
        .map_err(io_err("cannot start the metrics thread"))?;
    log(format_args!("serving metrics on http://{addr}/metrics"));
    Ok(())
}

/// Opens and takes `STATE/daemon.lock`, which this process then holds for its whole life.
fn lock_dir(dir: &RuntimeDir) -> Result<File, DaemonError> {
    let lock_path = dir.daemon_lock();
    let lock = os::open_lock_file(&lock_path, 0o644)
        .map_err(io_err(format!("cannot open {}", lock_path.display())))?;
    if !os::try_lock_exclusive(&lock)
        .map_err(io_err(format!("cannot lock {}", lock_path.display())))?
    {
        return Err(DaemonError::AlreadyRunning {
            dir: dir.path().display().to_string(),
            pid: read_pid(dir),
        });
    }
    Ok(lock)
}

struct Daemon {
    dir: RuntimeDir,
    config: Config,
    registry: Box<dyn Registry>,
    signals: os::SignalFd,
    spec: RouterSpec,
    router: Option<Router>,
    backoff: Backoff,
    /// When to start the router next; meaningful while `router` is `None`.
    next_start: Instant,
    snapshot: Option<Snapshot>,
    /// When the router's table was last built from `snapshot`; `None`: a new snapshot since.
    table_built: Option<Instant>,
    fingerprint: Option<Fingerprint>,
    /// The registry's pushed changes, where its backend pushes them (etcd); `None`: poll the
    /// fingerprint.
    watch: Option<RegistryWatch>,
    next_registry_poll: Instant,
    registry_error: Option<String>,
    /// What the registry last said about this host's liveness (its lease), to log changes.
    liveness_problem: Option<String>,
    /// The table the running router has.
    pushed: Option<RouterTable>,
    /// The number the router's table has, if the daemon numbered it and nothing failed since:
    /// the next push can then be a delta from `pushed` (`None`: the next push is whole).
    pushed_generation: Option<u64>,
    /// The number of the next table pushed: counted from the start time in milliseconds, so
    /// that another daemon's numbers (one that died, its router adopted) do not meet ours.
    next_table_generation: u64,
    /// The last push that failed, to retry it at a calm pace.
    last_attempt: Option<(RouterTable, Instant)>,
    skipped: BTreeMap<String, String>,
    status: DaemonStatus,
    status_dirty: bool,
    /// What the Docker watcher thread reports, copied into the status file.
    docker: Option<std::sync::Arc<std::sync::Mutex<DockerWatchStatus>>>,
}

/// Why the serve loop ended.
enum Stop {
    Signal(i32),
}

impl Daemon {
    /// The daemon of `dir` before its first start: registry opened, router binary found.
    fn new(dir: &RuntimeDir, config: Config, signals: os::SignalFd) -> Result<Daemon, DaemonError> {
        let registry = registry::open(&config.registry)?;
        let program = supervise::router_program()?;
        let spec = RouterSpec {
            program: program.clone(),
            dir: dir.path().to_path_buf(),
            state_dir: dir.state().to_path_buf(),
            cores: config.cores.clone(),
            rdma_device: config.rdma_device.clone(),
            log: dir.router_log(),
        };
        let now = Instant::now();
        Ok(Daemon {
            dir: dir.clone(),
            status: DaemonStatus {
                pid: std::process::id(),
                state: STATE_STARTING.to_owned(),
                started_unix_ms: unix_ms_now(),
                host_ip: Some(config.host_ip),
                registry: registry.url(),
                router_program: program.display().to_string(),
                ..DaemonStatus::default()
            },
            config,
            registry,
            signals,
            spec,
            router: None,
            backoff: Backoff::default(),
            next_start: now,
            snapshot: None,
            table_built: None,
            fingerprint: None,
            watch: None,
            next_registry_poll: now,
            registry_error: None,
            liveness_problem: None,
            pushed: None,
            pushed_generation: None,
            next_table_generation: unix_ms_now() << 20,
            last_attempt: None,
            skipped: BTreeMap::new(),
            status_dirty: true,
            docker: None,
        })
    }

    /// After [`Daemon::startup`]: records and logs the ready state (`freeflow up` waits for it
    /// in the status file), and says so on stdout in the foreground.
    fn ready(&mut self, foreground: bool) {
        self.status.state = STATE_READY.to_owned();
        self.status_dirty = true;
        self.write_status();
        let router_pid = self.status.router_pid.unwrap_or(0);
        let pushed = self.status.counters.containers_pushed.unwrap_or(0);
        let adopted = if self.status.counters.router_adopted {
            " (adopted)"
        } else {
            ""
        };
        log(format_args!(
            "ready: router pid {router_pid}{adopted} serves {pushed} container(s)"
        ));
        if foreground {
            let dir = self.dir.path().display();
            let _ = writeln!(
                io::stdout(),
                "freeflow: up: daemon pid {}, router pid {router_pid} serving {dir} \
                 (host {}, {pushed} container(s)); stop with SIGTERM, Ctrl-C or `freeflow \
                 down --dir {dir}`",
                self.status.pid,
                self.config.host_ip,
            );
        }
    }

    /// First start: the router an earlier daemon left running is adopted, else one is started;
    /// it must take its table, else the daemon gives up (and `freeflow up` reports why).
    fn startup(&mut self) -> Result<(), DaemonError> {
        self.refresh_registry(true)?;
        // Where the registry's records live on a lease (etcd), this host's stay while we live.
        self.registry.hold_host(&HostRecord {
            host_ip: self.config.host_ip,
            peer_port: self.config.peer_port,
            vnet_prefix: self.config.vnet_prefix,
            dir: self.dir.path().to_path_buf(),
        })?;
        // From here on the registry's own pushes (where it has them) keep the table current.
        self.watch = self.registry.watch()?;
        let router = match self.running_router()? {
            Some(router) => {
                log(format_args!(
                    "adopted the running router pid {} (up {}; not our child: its exit is \
                     watched through a pidfd)",
                    router.pid,
                    format_duration(router.started.elapsed())
                ));
                router
            }
            None => {
                let router = Router::start(&self.spec, ROUTER_READY_TIMEOUT, &self.signals)?;
                log(format_args!(
                    "router pid {} ready after {}",
                    router.pid,
                    format_duration(router.started.elapsed())
                ));
                router
            }
        };
        self.router_started(router);
        self.sync_table();
        if self.pushed.is_none() {
            return Err(DaemonError::Push(
                self.status
                    .counters
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "unknown error".to_owned()),
            ));
        }
        Ok(())
    }

    /// The router an earlier daemon of this directory left running, to adopt: it holds
    /// `router.lock`, `router.pid` names it and it answers `router.ctl` with that pid. `None`
    /// if no router holds the lock; an error if one does that cannot be adopted.
    fn running_router(&self) -> Result<Option<Router>, DaemonError> {
        if router_lock_held(&self.dir) != Some(true) {
            let _ = fs::remove_file(self.dir.router_pid_file());
            return Ok(None);
        }
        let cannot = |reason: String| DaemonError::CannotAdopt {
            dir: self.dir.path().display().to_string(),
            reason,
        };
        let pid = read_router_pid(&self.dir).ok_or_else(|| {
            cannot(format!(
                "it holds {} but {} names no router a daemon started (was it started by hand?)",
                self.dir.router_lock().display(),
                self.dir.router_pid_file().display()
            ))
        })?;
        Router::adopt(pid, &self.dir.control_socket(), CONTROL_TIMEOUT)
            .map(Some)
            .map_err(cannot)
    }

    /// The supervision loop; returns when a termination signal arrives.
    fn serve(&mut self) -> Result<(), DaemonError> {
        loop {
            let now = Instant::now();
            let mut wake = self.next_registry_poll;
            if self.router.is_none() {
                wake = wake.min(self.next_start);
            }
            let timeout = wake.saturating_duration_since(now).min(REGISTRY_POLL);
            let mut fds: Vec<BorrowedFd<'_>> = vec![self.signals.as_fd()];
            // No SIGCHLD comes for an adopted router: its pidfd wakes us instead.
            fds.extend(self.router.as_ref().and_then(Router::exit_fd));
            fds.extend(self.watch.as_ref().map(RegistryWatch::wake_fd));
            let readable = os::poll_readable(&fds, timeout).map_err(io_err("poll"))?;
            log::tick();
            if readable[0] {
                if let Some(Stop::Signal(sig)) = self.take_signals()? {
                    log(format_args!(
                        "received {}, shutting down",
                        supervise::signal_name(sig)
                    ));
                    return Ok(());
                }
            }
            self.reap();
            if self.router.is_none() && Instant::now() >= self.next_start {
                if let Some(Stop::Signal(sig)) = self.restart() {
                    log(format_args!(
                        "received {} while starting the router, shutting down",
                        supervise::signal_name(sig)
                    ));
                    return Ok(());
                }
            }
            self.take_watched();
            if Instant::now() >= self.next_registry_poll {
                // Errors are logged and kept in the status; the last good table stays.
                if self.watch.is_none() {
                    let _ = self.refresh_registry(false);
                }
                self.note_liveness();
                self.next_registry_poll = Instant::now() + REGISTRY_POLL;
            }
            self.sync_table();
            self.sync_docker_status();
            self.write_status();
        }
    }

    /// Copies the Docker watcher's report into the status, if it changed.
    fn sync_docker_status(&mut self) {
        let Some(watch) = &self.docker else { return };
        let Ok(now) = watch.lock().map(|w| w.clone()) else {
            return;
        };
        if self.status.counters.docker.as_ref() != Some(&now) {
            self.status.counters.docker = Some(now);
            self.status_dirty = true;
        }
    }

    fn take_signals(&mut self) -> Result<Option<Stop>, DaemonError> {
        let signals = self.signals.drain().map_err(io_err("read signalfd"))?;
        Ok(signals
            .into_iter()
            .find(|s| os::TERMINATION_SIGNALS.contains(s))
            .map(Stop::Signal))
    }

    fn router_started(&mut self, router: Router) {
        // Kept when the daemon dies, so that the next one finds the router to adopt.
        if let Err(e) = config::write_atomic(
            &self.dir.router_pid_file(),
            format!("{}\n", router.pid).as_bytes(),
            0o644,
        ) {
            log(format_args!("cannot record the router's pid: {e}"));
        }
        self.status.counters.router_adopted = router.adopted();
        self.status.router_pid = Some(router.pid);
        self.status.router_started_unix_ms = Some(router.started_unix_ms);
        self.status.counters.next_restart_unix_ms = None;
        self.status.counters.containers_pushed = None;
        self.status.counters.overlay_pushed = None;
        self.status.counters.peer_hosts_pushed = None;
        self.status.counters.registry_generation = None;
        self.pushed = None;
        self.pushed_generation = None;
        self.last_attempt = None;
        self.router = Some(router);
        self.status_dirty = true;
    }

    /// Notices a router that ended, says why, and schedules the restart.
    fn reap(&mut self) {
        let Some(router) = self.router.as_mut() else {
            return;
        };
        let exit = match router.try_wait() {
            Ok(Some(exit)) => exit,
            Ok(None) => return,
            Err(e) => {
                log(format_args!("waiting for router pid {}: {e}", router.pid));
                return;
            }
        };
        let uptime = router.started.elapsed();
        let reason = format!("the router (pid {}) {}", router.pid, exit.reason());
        // After a crash or an error exit its last words say why; after a signal (or when
        // it was not our child, so we do not know) they may only repeat its start-up line.
        let last_line = exit
            .exited_with_code()
            .then(|| supervise::last_log_line(&self.spec.log, 0, "freeflow-router"))
            .flatten();
        self.router = None;
        self.status.counters.router_adopted = false;
        self.pushed = None;
        self.pushed_generation = None;
        let delay = self.backoff.next_delay(uptime);
        self.next_start = Instant::now() + delay;
        log_limited(
            KEY_RESTART,
            format_args!(
                "{reason} after {}{}; restarting {}",
                format_duration(uptime),
                last_line
                    .map(|l| format!(" (its last log line: {l})"))
                    .unwrap_or_default(),
                if delay.is_zero() {
                    "now".to_owned()
                } else {
                    format!("in {}", format_duration(delay))
                }
            ),
        );
        let now_ms = unix_ms_now();
        self.status.counters.last_exit = Some(reason);
        self.status.counters.last_exit_unix_ms = Some(now_ms);
        self.status.router_pid = None;
        self.status.router_started_unix_ms = None;
        self.status.counters.containers_pushed = None;
        self.status.counters.overlay_pushed = None;
        self.status.counters.peer_hosts_pushed = None;
        self.status.counters.registry_generation = None;
        self.status.counters.next_restart_unix_ms = Some(now_ms + delay.as_millis() as u64);
        self.status_dirty = true;
        self.write_status();
    }

    /// Starts the router again; on failure schedules the next try with backoff.
    fn restart(&mut self) -> Option<Stop> {
        self.status.counters.restarts += 1;
        self.status.counters.last_restart_unix_ms = Some(unix_ms_now());
        self.status_dirty = true;
        match Router::start(&self.spec, ROUTER_READY_TIMEOUT, &self.signals) {
            Ok(router) => {
                log_limited(
                    KEY_RESTART,
                    format_args!(
                        "router restarted: pid {} ready after {} (restart {})",
                        router.pid,
                        format_duration(router.started.elapsed()),
                        self.status.counters.restarts
                    ),
                );
                self.router_started(router);
                self.sync_table();
                self.write_status();
                None
            }
            Err(SuperviseError::Interrupted(sig)) => Some(Stop::Signal(sig)),
            Err(e) => {
                let delay = self.backoff.next_delay(Duration::ZERO);
                self.next_start = Instant::now() + delay;
                log_limited(
                    KEY_RESTART,
                    format_args!(
                        "router start failed: {e}; next try in {}",
                        format_duration(delay)
                    ),
                );
                let now_ms = unix_ms_now();
                self.status.counters.start_failures += 1;
                self.status.counters.last_exit = Some(format!("start failed: {e}"));
                self.status.counters.last_exit_unix_ms = Some(now_ms);
                self.status.counters.next_restart_unix_ms = Some(now_ms + delay.as_millis() as u64);
                self.write_status();
                None
            }
        }
    }

    /// Takes what the registry's watch pushed since the last look, if it runs.
    fn take_watched(&mut self) {
        let Some(watch) = &self.watch else { return };
        let resyncs = watch.resyncs();
        if self.status.counters.registry_resyncs != Some(resyncs) {
            self.status.counters.registry_resyncs = Some(resyncs);
            self.status_dirty = true;
        }
        let Some(news) = watch.take() else { return };
        let result = news.map(|snapshot| {
            self.snapshot = Some(snapshot);
            self.table_built = None;
        });
        // Logged and kept in the status; the last good table stays.
        let _ = self.note_registry_result(result);
    }

    /// Reloads the registry if its fingerprint changed (always if `force`).
    fn refresh_registry(&mut self, force: bool) -> Result<(), RegistryError> {
        let result = (|| -> Result<(), RegistryError> {
            let fingerprint = self.registry.fingerprint()?;
            if !force && self.fingerprint.as_ref() == Some(&fingerprint) {
                return Ok(());
            }
            let snapshot = self.registry.load()?;
            self.snapshot = Some(snapshot);
            self.table_built = None;
            self.fingerprint = Some(fingerprint);
            Ok(())
        })();
        self.note_registry_result(result)
    }

    /// Logs a registry error when it is new, and when reading works again.
    fn note_registry_result(
        &mut self,
        result: Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        match &result {
            Ok(()) => {
                if self.registry_error.take().is_some() {
                    log_limited(KEY_REGISTRY, "the registry is readable again");
                    self.status.counters.last_error = None;
                    self.status_dirty = true;
                }
            }
            Err(e) => {
                let message = e.to_string();
                if self.registry_error.as_deref() != Some(message.as_str()) {
                    log_limited(
                        KEY_REGISTRY,
                        format_args!("{message} (the router keeps its current table)"),
                    );
                    self.status.counters.last_error = Some(message.clone());
                    self.status_dirty = true;
                    self.registry_error = Some(message);
                }
            }
        }
        result
    }

    /// Logs when this host's records stop (or start again) being kept alive in the registry.
    fn note_liveness(&mut self) {
        let problem = self.registry.liveness_problem();
        if problem == self.liveness_problem {
            return;
        }
        match &problem {
            Some(problem) => log_limited(KEY_REGISTRY, format_args!("host liveness: {problem}")),
            None => log_limited(
                KEY_REGISTRY,
                "host liveness: this host's lease is renewed again",
            ),
        }
        self.liveness_problem = problem;
    }

    /// The router's table from the current snapshot: this host's containers whose namespace
    /// exists now. Logs containers that start or stop being skipped.
    fn table(&mut self) -> Option<(RouterTable, u64)> {
        let snapshot = self.snapshot.as_ref()?;
        let network = network_view(&self.config, snapshot);
        let mut entries = Vec::new();
        let mut skipped = BTreeMap::new();
        let mut seen: HashMap<NetnsId, &str> = HashMap::new();
        for rec in snapshot.containers_on(self.config.host_ip) {
            match NetnsId::of_path(&rec.netns) {
                Ok(netns) => {
                    if let Some(other) = seen.insert(netns, &rec.name) {
                        skipped.insert(
                            rec.name.clone(),
                            format!(
                                "its network namespace {} is the same as container {other:?}'s",
                                rec.netns.display()
                            ),
                        );
                        seen.insert(netns, other);
                        continue;
                    }
                    entries.push(ContainerEntry {
                        name: rec.name.clone(),
                        tenant: rec.tenant.clone(),
                        ip: rec.ip,
                        netns,
                    });
                }
                Err(e) => {
                    skipped.insert(
                        rec.name.clone(),
                        format!("network namespace {}: {e}", rec.netns.display()),
                    );
                }
            }
        }
        let generation = snapshot.generation;
        self.note_skipped(skipped);
        Some((
            RouterTable {
                containers: entries,
                network,
            },
            generation,
        ))
    }

    /// Records which containers are left out of the table, logging those that start or stop
    /// being skipped.
    fn note_skipped(&mut self, skipped: BTreeMap<String, String>) {
        if skipped == self.skipped {
            return;
        }
        for (name, reason) in &skipped {
            if self.skipped.get(name) != Some(reason) {
                log_limited(
                    KEY_SKIPPED,
                    format_args!("container {name:?} skipped: {reason}"),
                );
            }
        }
        for name in self.skipped.keys() {
            if !skipped.contains_key(name) {
                log_limited(
                    KEY_SKIPPED,
                    format_args!("container {name:?} is no longer skipped"),
                );
            }
        }
        self.status.counters.skipped = skipped
            .iter()
            .map(|(name, reason)| SkippedContainer {
                name: name.clone(),
                reason: reason.clone(),
            })
            .collect();
        self.skipped = skipped;
        self.status_dirty = true;
    }

    /// Pushes the table to the router when it differs from what the router has.
    fn sync_table(&mut self) {
        if self.router.is_none() {
            return;
        }
        // Rebuilt for a new snapshot, a router that has no table yet, a push to retry, and
        // every NETNS_RECHECK for namespaces that came or went; not at every wake-up.
        let calm = self.pushed.is_some()
            && self.last_attempt.is_none()
            && self
                .table_built
                .is_some_and(|at| at.elapsed() < NETNS_RECHECK);
        if calm {
            return;
        }
        self.table_built = Some(Instant::now());
        let Some((entries, generation)) = self.table() else {
            return;
        };
        if self.pushed.as_ref() == Some(&entries) {
            if self.status.counters.registry_generation != Some(generation) {
                self.status.counters.registry_generation = Some(generation);
                self.status_dirty = true;
            }
            return;
        }
        if let Some((last, at)) = &self.last_attempt {
            if *last == entries && at.elapsed() < PUSH_RETRY {
                return;
            }
        }
        let generation_number = self.next_table_generation;
        self.next_table_generation += 1;
        let failure = self.push(&entries, generation_number);
        match failure {
            None => {
                log(format_args!(
                    "router table: {} container(s), {} overlay address(es), {} peer host(s) \
                     (registry generation {generation})",
                    entries.containers.len(),
                    entries.network.overlay.len(),
                    entries.network.hosts.len()
                ));
                self.status.counters.containers_pushed = Some(entries.containers.len());
                self.status.counters.overlay_pushed = Some(entries.network.overlay.len());
                self.status.counters.peer_hosts_pushed = Some(entries.network.hosts.len());
                self.status.counters.registry_generation = Some(generation);
                self.status.counters.last_push_unix_ms = Some(unix_ms_now());
                if self.registry_error.is_none() {
                    self.status.counters.last_error = None;
                }
                self.pushed = Some(entries);
                self.pushed_generation = Some(generation_number);
                self.last_attempt = None;
            }
            Some(message) => {
                log_limited(
                    KEY_PUSH,
                    format_args!("pushing the container table failed: {message}"),
                );
                self.status.counters.last_error = Some(format!("push failed: {message}"));
                // The router may or may not have taken it: the next push is whole.
                self.pushed_generation = None;
                self.last_attempt = Some((entries, Instant::now()));
            }
        }
        self.status_dirty = true;
    }

    /// Gives the router table `entries`, numbered `number`: the changes since the table it
    /// has when the daemon knows that table (`pushed`, numbered `pushed_generation`), else (or
    /// if it refuses them: it restarted, another daemon or a command pushed) the whole table.
    /// The failure's message if it took neither.
    fn push(&mut self, entries: &RouterTable, number: u64) -> Option<String> {
        if let (Some(old), Some(base)) = (&self.pushed, self.pushed_generation) {
            let delta = TableDelta::between(
                (&old.containers, Some(&old.network)),
                (&entries.containers, Some(&entries.network)),
                base,
                number,
            );
            match self.call_router(&ControlRequest::UpdateContainers(delta)) {
                None => {
                    self.status.counters.table_pushes_delta += 1;
                    return None;
                }
                Some(message) => log_limited(
                    KEY_PUSH,
                    format_args!(
                        "the router did not take the table's changes ({message}); \
                         pushing the whole table"
                    ),
                ),
            }
        }
        let request = ControlRequest::SetContainers {
            containers: entries.containers.clone(),
            network: Some(entries.network.clone()),
            generation: Some(number),
        };
        let failure = self.call_router(&request);
        if failure.is_none() {
            self.status.counters.table_pushes_full += 1;
        }
        failure
    }

    /// One request on the router's control socket that must be answered `Ok`; the problem
    /// otherwise.
    fn call_router(&self, request: &ControlRequest) -> Option<String> {
        match control::call(&self.dir.control_socket(), request, CONTROL_TIMEOUT) {
            Ok(ControlResponse::Ok) => None,
            Ok(ControlResponse::Error { message }) => Some(format!("the router said: {message}")),
            Ok(other) => Some(format!("unexpected answer from the router: {other:?}")),
            Err(e) => Some(format!("{}: {e}", self.dir.control_socket().display())),
        }
    }

    fn write_status(&mut self) {
        if !self.status_dirty {
            return;
        }
        let mut bytes = match serde_json::to_vec_pretty(&self.status) {
            Ok(bytes) => bytes,
            Err(e) => {
                log(format_args!("cannot encode the status: {e}"));
                return;
            }
        };
        bytes.push(b'\n');
        match config::write_atomic(&self.dir.status_file(), &bytes, 0o644) {
            Ok(()) => self.status_dirty = false,
            Err(e) => log(format_args!("cannot write the status file: {e}")),
        }
    }

    /// Stops the router (SIGTERM, then SIGKILL after the grace period).
    fn shutdown(&mut self) {
        self.status.state = STATE_STOPPING.to_owned();
        self.status_dirty = true;
        self.write_status();
        if let Some(mut router) = self.router.take() {
            log(format_args!("stopping router pid {}", router.pid));
            let (exit, killed) = router.stop(ROUTER_STOP_GRACE);
            let how = exit
                .map(|exit| exit.reason())
                .unwrap_or_else(|| "did not go away".to_owned());
            if exit.is_some() {
                let _ = fs::remove_file(self.dir.router_pid_file());
            }
            if killed {
                log(format_args!(
                    "router pid {} ignored SIGTERM for {}, killed: {how}",
                    router.pid,
                    format_duration(ROUTER_STOP_GRACE)
                ));
                // A killed router leaves its sockets behind; nobody serves them now.
                let _ = fs::remove_file(self.dir.router_socket());
                let _ = fs::remove_file(self.dir.control_socket());
            } else {
                log(format_args!("router pid {} {how}", router.pid));
            }
        }
        log("stopped");
    }
}

/// The cluster as this host's router needs it for TCP mode: the other hosts' routers and every
/// overlay address.
fn network_view(config: &Config, snapshot: &Snapshot) -> NetworkView {
    NetworkView {
        host_ip: config.host_ip,
        peer_port: config.peer_port,
        hosts: snapshot
            .hosts
            .iter()
            .filter(|h| h.host_ip != config.host_ip)
            .map(|h| PeerHost {
                host_ip: h.host_ip,
                peer_port: h.peer_port,
            })
            .collect(),
        overlay: snapshot
            .containers
            .iter()
            .map(|c| OverlayEntry {
                ip: c.ip,
                tenant: c.tenant.clone(),
                host_ip: c.host_ip,
            })
            .collect(),
    }
}
