//! The container registry: which containers exist (name, tenant, overlay IP, network namespace)
//! and which host's router serves each of them.
//!
//! Users see only the [`Registry`] trait and [`open`]: a URL picks the backend. Two backends:
//! a JSON file that several daemons on one machine share ([`FileRegistry`], the default), and
//! etcd for many hosts ([`EtcdRegistry`], where each host's records live on a lease its daemon
//! keeps alive).
//!
//! The data model is a [`Snapshot`]: a generation number plus the host and container records.
//! Changes go through [`Registry::update`], a read-modify-write that runs under mutual exclusion
//! across processes and either publishes a new, fully valid snapshot with the generation one
//! higher, or changes nothing.

mod etcd;
mod file;

pub use etcd::{EtcdRegistry, LEASE_TTL};
pub use file::FileRegistry;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The backends this build can open, as their URL schemes.
pub const SUPPORTED_BACKENDS: &[&str] = &["file", "etcd"];

/// Longest container or tenant name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// One container: its identity, its place on the overlay, and the host whose router serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Unique name, `[A-Za-z0-9_.-]{1,63}`.
    pub name: String,
    /// Tenant the container belongs to, same alphabet as names.
    pub tenant: String,
    /// Overlay IP address, unique in the registry.
    pub ip: Ipv4Addr,
    /// Path of the container's network namespace (absolute, unique in the registry). The router
    /// matches an attaching process's `/proc/<pid>/ns/net` against it.
    pub netns: PathBuf,
    /// Host-network address of the host whose router serves this container.
    pub host_ip: Ipv4Addr,
}

/// One host running a Freeflow router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host-network address; identifies the host record.
    pub host_ip: Ipv4Addr,
    /// Port on which the router accepts router-to-router connections.
    pub peer_port: u16,
    /// Overlay prefix served by this host's containers.
    pub vnet_prefix: ipnet::Ipv4Net,
    /// The host's Freeflow runtime directory (`router.sock`, shims).
    pub dir: PathBuf,
}

/// The registry's whole contents at one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Incremented by one by every successful [`Registry::update`]; 0 for an empty registry that
    /// was never written.
    pub generation: u64,
    /// Host records, at most one per `host_ip`.
    pub hosts: Vec<HostRecord>,
    /// Container records, in the order they were added.
    pub containers: Vec<ContainerRecord>,
}

/// Everything that can go wrong with the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A system call on a registry file or directory failed.
    #[error("registry I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// The error the system returned.
        #[source]
        source: std::io::Error,
    },
    /// The registry file cannot be parsed or holds contradictory records.
    #[error(
        "registry file {} is corrupt: {detail}; nothing was changed: fix the file by hand or \
         move it aside (a missing file is an empty registry)",
        path.display()
    )]
    Corrupt {
        /// The registry file.
        path: PathBuf,
        /// What is wrong, with line and column when the JSON parser found it.
        detail: String,
    },
    /// The file is valid JSON but not a Freeflow registry.
    #[error(
        "{} is not a freeflow registry (its \"format\" is {found:?}, expected \"{}\"); nothing \
         was changed: check the path or move the file aside",
        path.display(),
        file::FORMAT_NAME
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// The `format` field found in it.
        found: String,
    },
    /// The registry file was written by a newer (or unknown) version of Freeflow.
    #[error(
        "registry file {} has format version {found}, this build reads only version \
         {supported}; nothing was changed: use a matching freeflow or move the file aside",
        path.display()
    )]
    UnsupportedVersion {
        /// The registry file.
        path: PathBuf,
        /// The version found in it.
        found: u64,
        /// The version this build reads and writes.
        supported: u64,
    },
    /// The URL names a backend this build does not have.
    #[error(
        "registry backend {0:?} is not available in this build; available: file \
         (file:/path/to/registry.json, file:relative/path, or a bare path) and etcd \
         (etcd://HOST:PORT[,HOST:PORT...][/PREFIX])"
    )]
    UnsupportedBackend(String),
    /// The registry URL cannot be understood at all.
    #[error(
        "invalid registry URL {0:?}: expected file:/path/to/registry.json, a bare path, or \
         etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (prefix components from A-Z a-z 0-9 _ . -)"
    )]
    InvalidUrl(String),
    /// A container or tenant name outside the allowed alphabet or length.
    #[error(
        "invalid {what} {value:?}: use 1 to 63 characters from A-Z a-z 0-9 _ . - \
         (and not \".\" or \"..\")"
    )]
    InvalidName {
        /// Which name: "container name" or "tenant".
        what: &'static str,
        /// The rejected value.
        value: String,
    },
    /// A container with this name is already registered.
    #[error("a container named {0:?} is already registered")]
    DuplicateName(String),
    /// The overlay IP is already taken.
    #[error("overlay IP {ip} of container {name:?} is already used by container {existing:?}")]
    DuplicateIp {
        /// The overlay address.
        ip: Ipv4Addr,
        /// The container being added.
        name: String,
        /// The container that already has it.
        existing: String,
    },
    /// The network namespace is already registered to another container.
    #[error(
        "network namespace {} of container {name:?} is already registered to container \
         {existing:?}",
        netns.display()
    )]
    DuplicateNetns {
        /// The namespace path.
        netns: PathBuf,
        /// The container being added.
        name: String,
        /// The container that already has it.
        existing: String,
    },
    /// Two host records with the same address (only possible when records are pushed directly
    /// into [`Snapshot::hosts`] or a file was edited by hand).
    #[error("host {0} is registered twice")]
    DuplicateHost(Ipv4Addr),
    /// No container with this name is registered.
    #[error("no container named {0:?} is registered")]
    NotFound(String),
    /// An address that cannot belong to a container or host.
    #[error("container {name:?}: {field} {ip} is not usable: {reason}")]
    InvalidAddress {
        /// The container whose record holds the address.
        name: String,
        /// Which field: "overlay ip" or "host_ip".
        field: &'static str,
        /// The rejected address.
        ip: Ipv4Addr,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// No etcd endpoint answered a request (refused, unreachable, timed out).
    #[error(
        "etcd registry {url}: no endpoint answered ({detail}); check that etcd runs and is \
         reachable; nothing was changed"
    )]
    EtcdUnreachable {
        /// The registry URL.
        url: String,
        /// What happened at each endpoint.
        detail: String,
    },
    /// A change was sent to etcd but its answer never came.
    #[error(
        "etcd registry {url}: the change was sent but no answer came ({detail}); it may or may \
         not have been applied: look with `freeflow container ls` before trying again"
    )]
    EtcdOutcomeUnknown {
        /// The registry URL.
        url: String,
        /// What happened.
        detail: String,
    },
    /// etcd answered with an error.
    #[error("etcd registry {url}: etcd refused the request: {message}")]
    EtcdRefused {
        /// The registry URL.
        url: String,
        /// etcd's message.
        message: String,
    },
    /// A key under the registry's prefix cannot be understood, or the records contradict each
    /// other.
    #[error(
        "etcd registry {url}: key {key:?} is corrupt: {detail}; nothing was changed: fix or \
         delete it with etcdctl"
    )]
    EtcdCorrupt {
        /// The registry URL.
        url: String,
        /// The key (or the prefix, when records contradict each other).
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// Other writers changed the registry between every read and write of an update.
    #[error(
        "etcd registry {url}: {attempts} attempts of this update all conflicted with other \
         writers; nothing was changed: try again"
    )]
    EtcdContention {
        /// The registry URL.
        url: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The thread that keeps a host's lease alive cannot be started.
    #[error("cannot start a registry thread (lease keeper or watch): {0}")]
    Thread(#[source] std::io::Error),
    /// A path in a record that cannot be stored or used.
    #[error("{record}: path {} is not usable: {reason}", path.display())]
    InvalidPath {
        /// The record holding the path ("container NAME" or "host IP").
        record: String,
        /// The rejected path.
        path: PathBuf,
        /// Why it is rejected.
        reason: &'static str,
    },
}

impl RegistryError {
    /// The registry file the error is about, if it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            RegistryError::Io { path, .. }
            | RegistryError::Corrupt { path, .. }
            | RegistryError::UnknownFormat { path, .. }
            | RegistryError::UnsupportedVersion { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Whether the registry was there to read but its contents cannot be used (a corrupt
    /// file, another format, a newer version), rather than not readable at all.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            RegistryError::Corrupt { .. }
                | RegistryError::UnknownFormat { .. }
                | RegistryError::UnsupportedVersion { .. }
                | RegistryError::EtcdCorrupt { .. }
        )
    }
}

/// Opaque token that changes whenever a registry's contents may have changed.
///
/// Compare two fingerprints taken at different times: equal means nothing changed in between
/// (for changes made through [`Registry::update`]), different means reload. A spurious
/// difference costs one reload; a missed change is what the token exists to prevent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(FingerprintRepr);

#[derive(Clone, Debug, PartialEq, Eq)]
enum FingerprintRepr {
    /// The registry file does not exist.
    FileMissing,
    /// Identity and timestamps of the registry file, plus its first bytes: the generation is
    /// near the start, and it tells apart two versions that an inode number reused within one
    /// coarse timestamp tick would otherwise make look identical.
    File {
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
        head: Vec<u8>,
    },
    /// How many keys are under an etcd registry's prefix, and the largest mod revision among
    /// them.
    Etcd { count: i64, max_mod_revision: i64 },
}

/// A shared registry of hosts and containers.
///
/// Implementations are cheap handles: open as many as needed, from any number of threads and
/// processes; [`Registry::update`] serialises writers across all of them.
pub trait Registry: Send + Sync + std::fmt::Debug {
    /// The current contents. An empty registry that was never written loads as
    /// `Snapshot::default()` (generation 0).
    fn load(&self) -> Result<Snapshot, RegistryError>;

    /// Read-modify-write under mutual exclusion across processes.
    ///
    /// `f` receives the current snapshot and edits it in place. If it returns `Ok`, the result is
    /// validated ([`Snapshot::validate`]), stored with `generation` one higher than before
    /// (whatever `f` did to `generation`) and returned. If `f` or the validation errs, nothing
    /// is written and the error is returned.
    ///
    /// Backends built on optimistic concurrency may call `f` more than once (each time on a
    /// fresh snapshot), so `f` should not have side effects beyond editing its argument.
    fn update(
        &self,
        f: &mut dyn FnMut(&mut Snapshot) -> Result<(), RegistryError>,
    ) -> Result<Snapshot, RegistryError>;

    /// A cheap token that changes whenever the contents may have changed; meant for polling
    /// (the daemon looks every ~250 ms and reloads when it differs from the last one).
    fn fingerprint(&self) -> Result<Fingerprint, RegistryError>;

    /// The URL this registry was opened with, normalised (for a file: `file:` and an absolute
    /// path), so that it can be handed to another process.
    fn url(&self) -> String;

    /// Keeps `host`'s record, and the records of the containers it serves, alive for as long as
    /// this handle lives (the daemon of that host calls it once, after its host was
    /// registered). Where records live on a lease (etcd), a thread renews it, and writes the
    /// host record again if it is missing; when the process dies, the records go after the
    /// lease's time to live. Where records are permanent (the file), it does nothing.
    fn hold_host(&self, host: &HostRecord) -> Result<(), RegistryError> {
        let _ = host;
        Ok(())
    }

    /// Why the host held with [`Registry::hold_host`] is not known to be alive right now (its
    /// lease could not be renewed, or was lost); `None` when it is, or when nothing is held.
    fn liveness_problem(&self) -> Option<String> {
        None
    }

    /// Starts following the registry's changes as the store pushes them (etcd: one watch,
    /// started from the revision of a snapshot read; a full read again only after a compaction
    /// or a lost connection). `None` where the backend pushes nothing (the file): poll
    /// [`Registry::fingerprint`] instead.
    fn watch(&self) -> Result<Option<RegistryWatch>, RegistryError> {
        Ok(None)
    }

    /// Registers one container, as [`Registry::update`] with [`Snapshot::add_container`] does
    /// (same checks, same errors), and returns the generation it was stored at. Backends may do
    /// it without reading the whole registry (etcd: the host's key and the generation only).
    fn add_container(&self, rec: &ContainerRecord) -> Result<u64, RegistryError> {
        self.update(&mut |s| s.add_container(rec.clone()))
            .map(|s| s.generation)
    }

    /// Unregisters the container `name`, as [`Registry::update`] with
    /// [`Snapshot::remove_container`] does (`Err(NotFound)` when there is none, and then nothing
    /// is written), and returns its record and the generation the removal was stored at.
    /// Backends may do it without reading the whole registry (etcd: the generation and the
    /// container's key only).
    fn remove_container(&self, name: &str) -> Result<(ContainerRecord, u64), RegistryError> {
        let mut removed = None;
        let snapshot = self.update(&mut |s| {
            removed = Some(s.remove_container(name)?);
            Ok(())
        })?;
        let removed = removed.ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        Ok((removed, snapshot.generation))
    }
}

/// The registry's contents as a thread that follows the store's changes last saw them.
///
/// Its [`RegistryWatch::wake_fd`] becomes readable when there is something new to
/// [`RegistryWatch::take`]; dropping the handle stops the thread (within a second).
#[derive(Debug)]
pub struct RegistryWatch {
    shared: Arc<WatchShared>,
    /// Read end of the wake-up socket pair; the thread writes a byte per news.
    wake: UnixStream,
}

/// What the watching thread and the handle share.
#[derive(Debug)]
struct WatchShared {
    /// The newest snapshot, or why there is none right now; taken by the handle.
    latest: Mutex<Option<Result<Snapshot, RegistryError>>>,
    /// Full reads made after the first one (after a compaction, a lost connection, a gap).
    resyncs: AtomicU64,
    /// Set when the handle is dropped.
    stop: AtomicBool,
    /// Write end of the wake-up socket pair (non-blocking: a full pipe already means "wake").
    wake: UnixStream,
}

impl RegistryWatch {
    /// A handle and the sender half the watching thread publishes through.
    fn new() -> Result<(RegistryWatch, WatchPublisher), RegistryError> {
        let (reader, writer) = UnixStream::pair().map_err(RegistryError::Thread)?;
        reader
            .set_nonblocking(true)
            .map_err(RegistryError::Thread)?;
        writer
            .set_nonblocking(true)
            .map_err(RegistryError::Thread)?;
        let shared = Arc::new(WatchShared {
            latest: Mutex::new(None),
            resyncs: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            wake: writer,
        });
        Ok((
            RegistryWatch {
                shared: Arc::clone(&shared),
                wake: reader,
            },
            WatchPublisher { shared },
        ))
    }

    /// Readable when [`RegistryWatch::take`] has something.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The newest snapshot (or the error that keeps the watch from having one) since the last
    /// call; `None` when nothing changed.
    pub fn take(&self) -> Option<Result<Snapshot, RegistryError>> {
        let mut sink = [0u8; 64];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        self.shared
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// How many times the watch started over from a full read.
    pub fn resyncs(&self) -> u64 {
        self.shared.resyncs.load(Ordering::Relaxed)
    }
}

impl Drop for RegistryWatch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// The watching thread's side of a [`RegistryWatch`].
#[derive(Debug)]
struct WatchPublisher {
    shared: Arc<WatchShared>,
}

impl WatchPublisher {
    /// Replaces what the handle will take next, and wakes it.
    fn publish(&self, news: Result<Snapshot, RegistryError>) {
        *self.shared.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(news);
        // A full socket buffer means a wake-up is pending already.
        let _ = (&self.shared.wake).write(&[1]);
    }

    fn count_resync(&self) {
        self.shared.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the handle was dropped.
    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }
}

/// Opens the registry a URL names.
///
/// - `file:/abs/path`, `file:rel/path` (relative to the current directory, made absolute now),
///   `file:///abs/path`, or a bare path without a scheme: the JSON file backend. Nothing is
///   created until the first update.
/// - `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`: etcd's v3 API (port 2379 and prefix
///   `/freeflow` by default). Nothing is contacted until the first use.
/// - Any other scheme is [`RegistryError::UnsupportedBackend`].
pub fn open(url: &str) -> Result<Box<dyn Registry>, RegistryError> {
    match parse_url(url)? {
        Backend::File(path) => Ok(Box::new(FileRegistry::new(path)?)),
        Backend::Etcd { endpoints, prefix } => Ok(Box::new(EtcdRegistry::new(endpoints, &prefix))),
    }
}

enum Backend {
    File(PathBuf),
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

fn parse_url(url: &str) -> Result<Backend, RegistryError> {
    if url.is_empty() {
        return Err(RegistryError::InvalidUrl(url.to_owned()));
    }
    let Some(scheme) = url_scheme(url) else {
        return Ok(Backend::File(PathBuf::from(url)));
    };
    let rest = &url[scheme.len() + 1..];
    if scheme.eq_ignore_ascii_case("etcd") {
        let (endpoints, prefix) = etcd::parse_target(url, rest)?;
        return Ok(Backend::Etcd { endpoints, prefix });
    }
    if !scheme.eq_ignore_ascii_case("file") {
        return Err(RegistryError::UnsupportedBackend(scheme.to_owned()));
    }
    let path = match rest.strip_prefix("//") {
        // `file:///abs` (empty authority) or `file://localhost/abs`; any other authority
        // names a remote machine, which a file backend cannot reach.
        Some(after) => {
            let after = after.strip_prefix("localhost").unwrap_or(after);
            if !after.starts_with('/') {
                return Err(RegistryError::InvalidUrl(url.to_owned()));
            }
            after
        }
        None => rest,
    };
    if path.is_empty() {
        return Err(RegistryError::InvalidUrl(url.to_owned()));
    }
    Ok(Backend::File(PathBuf::from(path)))
}

/// The scheme of `url` if it starts with one (`[A-Za-z][A-Za-z0-9+.-]*:`), else `None` (a bare
/// path). A bare relative path that happens to contain a colon early, like `a:b.json`, reads
/// as a scheme; write `file:a:b.json` or `./a:b.json` for it.
fn url_scheme(url: &str) -> Option<&str> {
    let colon = url.find(':')?;
    let scheme = &url[..colon];
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    if bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-')) {
        Some(scheme)
    } else {
        None
    }
}

impl Snapshot {
    /// The container with this name.
    pub fn container(&self, name: &str) -> Option<&ContainerRecord> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The container with this overlay IP.
    pub fn container_by_ip(&self, ip: Ipv4Addr) -> Option<&ContainerRecord> {
        self.containers.iter().find(|c| c.ip == ip)
    }

    /// The container registered with this network namespace path.
    pub fn container_by_netns(&self, netns: &Path) -> Option<&ContainerRecord> {
        self.containers.iter().find(|c| c.netns == netns)
    }

    /// The containers served by the router of the host at `host_ip`.
    pub fn containers_on(&self, host_ip: Ipv4Addr) -> impl Iterator<Item = &ContainerRecord> + '_ {
        self.containers.iter().filter(move |c| c.host_ip == host_ip)
    }

    /// The host record for `host_ip`.
    pub fn host(&self, host_ip: Ipv4Addr) -> Option<&HostRecord> {
        self.hosts.iter().find(|h| h.host_ip == host_ip)
    }

    /// Adds a container after checking its names, addresses and namespace path, and that its
    /// name, overlay IP and namespace are not registered yet. On error nothing changes.
    ///
    /// The serving host need not have a host record yet (containers may be registered before
    /// their host's daemon comes up).
    pub fn add_container(&mut self, rec: ContainerRecord) -> Result<(), RegistryError> {
        check_record(&rec)?;
        for existing in &self.containers {
            check_conflict(&rec, existing)?;
        }
        self.containers.push(rec);
        Ok(())
    }

    /// Removes the container with this name and returns its record.
    pub fn remove_container(&mut self, name: &str) -> Result<ContainerRecord, RegistryError> {
        let index = self
            .containers
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        Ok(self.containers.remove(index))
    }

    /// Adds the host record, or replaces the one with the same `host_ip`.
    pub fn upsert_host(&mut self, rec: HostRecord) {
        match self.hosts.iter_mut().find(|h| h.host_ip == rec.host_ip) {
            Some(slot) => *slot = rec,
            None => self.hosts.push(rec),
        }
    }

    /// Removes the host record for `host_ip` and returns it (`None` if there was none).
    /// Containers served by that host stay registered.
    pub fn remove_host(&mut self, host_ip: Ipv4Addr) -> Option<HostRecord> {
        let index = self.hosts.iter().position(|h| h.host_ip == host_ip)?;
        Some(self.hosts.remove(index))
    }

    /// Checks every invariant [`Snapshot::add_container`] and [`Snapshot::upsert_host`] keep:
    /// valid records, unique container names, overlay IPs and namespaces, one record per host,
    /// paths that can be stored. Used on every load and before every write, so records pushed
    /// directly into the public vectors cannot slip past the checks.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let mut names: HashSet<&str> = HashSet::with_capacity(self.containers.len());
        let mut ips: HashMap<Ipv4Addr, &str> = HashMap::with_capacity(self.containers.len());
        let mut netns: HashMap<&Path, &str> = HashMap::with_capacity(self.containers.len());
        for rec in &self.containers {
            check_record(rec)?;
            if !names.insert(&rec.name) {
                return Err(RegistryError::DuplicateName(rec.name.clone()));
            }
            if let Some(existing) = ips.insert(rec.ip, &rec.name) {
                return Err(RegistryError::DuplicateIp {
                    ip: rec.ip,
                    name: rec.name.clone(),
                    existing: existing.to_owned(),
                });
            }
            if let Some(existing) = netns.insert(&rec.netns, &rec.name) {
                return Err(RegistryError::DuplicateNetns {
                    netns: rec.netns.clone(),
                    name: rec.name.clone(),
                    existing: existing.to_owned(),
                });
            }
        }
        let mut hosts: HashSet<Ipv4Addr> = HashSet::with_capacity(self.hosts.len());
        for host in &self.hosts {
            if !hosts.insert(host.host_ip) {
                return Err(RegistryError::DuplicateHost(host.host_ip));
            }
            if host.dir.to_str().is_none() {
                return Err(RegistryError::InvalidPath {
                    record: format!("host {}", host.host_ip),
                    path: host.dir.clone(),
                    reason: "not valid UTF-8",
                });
            }
        }
        Ok(())
    }
}

/// Whether `name` is an acceptable container or tenant name. "." and ".." are refused on top of
/// the alphabet rule because names may end up as path components.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && name != ".."
}

/// Checks one record on its own.
fn check_record(rec: &ContainerRecord) -> Result<(), RegistryError> {
    if !is_valid_name(&rec.name) {
        return Err(RegistryError::InvalidName {
            what: "container name",
            value: rec.name.clone(),
        });
    }
    if !is_valid_name(&rec.tenant) {
        return Err(RegistryError::InvalidName {
            what: "tenant",
            value: rec.tenant.clone(),
        });
    }
    let bad_address = |field, ip, reason| RegistryError::InvalidAddress {
        name: rec.name.clone(),
        field,
        ip,
        reason,
    };
    if let Some(reason) = unusable_overlay_ip(rec.ip) {
        return Err(bad_address("overlay ip", rec.ip, reason));
    }
    if let Some(reason) = unusable_host_ip(rec.host_ip) {
        return Err(bad_address("host_ip", rec.host_ip, reason));
    }
    let bad_path = |reason| RegistryError::InvalidPath {
        record: format!("container {:?}", rec.name),
        path: rec.netns.clone(),
        reason,
    };
    if rec.netns.to_str().is_none() {
        return Err(bad_path("not valid UTF-8"));
    }
    if !rec.netns.is_absolute() {
        return Err(bad_path("network namespace paths must be absolute"));
    }
    Ok(())
}

/// Checks a new record against one already registered.
fn check_conflict(rec: &ContainerRecord, existing: &ContainerRecord) -> Result<(), RegistryError> {
    if existing.name == rec.name {
        return Err(RegistryError::DuplicateName(rec.name.clone()));
    }
    if existing.ip == rec.ip {
        return Err(RegistryError::DuplicateIp {
            ip: rec.ip,
            name: rec.name.clone(),
            existing: existing.name.clone(),
        });
    }
    if existing.netns == rec.netns {
        return Err(RegistryError::DuplicateNetns {
            netns: rec.netns.clone(),
            name: rec.name.clone(),
            existing: existing.name.clone(),
        });
    }
    Ok(())
}

fn unusable_host_ip(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address 0.0.0.0")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

fn unusable_overlay_ip(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else {
        unusable_host_ip(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, ip: [u8; 4]) -> ContainerRecord {
        ContainerRecord {
            name: name.to_owned(),
            tenant: "t1".to_owned(),
            ip: Ipv4Addr::from(ip),
            netns: PathBuf::from(format!("/run/netns/{name}")),
            host_ip: Ipv4Addr::new(192, 168, 0, 1),
        }
    }

    #[test]
    fn names() {
        assert!(is_valid_name("a"));
        assert!(is_valid_name("web-1.tenant_A"));
        assert!(is_valid_name(&"x".repeat(63)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(&"x".repeat(64)));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("é"));
        assert!(!is_valid_name("."));
        assert!(!is_valid_name(".."));
    }

    #[test]
    fn url_parsing() {
        let file = |u: &str| match parse_url(u) {
            Ok(Backend::File(p)) => p,
            Ok(Backend::Etcd { .. }) => panic!("{u}: etcd"),
            Err(e) => panic!("{u}: {e}"),
        };
        assert_eq!(file("file:/a/b.json"), PathBuf::from("/a/b.json"));
        assert_eq!(file("file:rel/b.json"), PathBuf::from("rel/b.json"));
        assert_eq!(file("file:///a/b.json"), PathBuf::from("/a/b.json"));
        assert_eq!(file("file://localhost/a"), PathBuf::from("/a"));
        assert_eq!(file("FILE:/a"), PathBuf::from("/a"));
        assert_eq!(file("/a/b.json"), PathBuf::from("/a/b.json"));
        assert_eq!(file("b.json"), PathBuf::from("b.json"));
        assert_eq!(file("./a:b.json"), PathBuf::from("./a:b.json"));
        assert_eq!(file("1a:b"), PathBuf::from("1a:b"));
        for bad in ["", "file:", "file://", "file://otherhost/a"] {
            assert!(
                matches!(parse_url(bad), Err(RegistryError::InvalidUrl(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_url("etcd://x:2379/p"),
            Ok(Backend::Etcd { endpoints, prefix }) if endpoints == ["x:2379"] && prefix == "/p"
        ));
        for other in ["consul://x:8500", "http://x", "a:b.json"] {
            assert!(
                matches!(parse_url(other), Err(RegistryError::UnsupportedBackend(_))),
                "{other}"
            );
        }
    }

    #[test]
    fn add_remove_and_lookups() {
        let mut s = Snapshot::default();
        s.add_container(rec("a", [10, 32, 0, 1])).unwrap();
        s.add_container(rec("b", [10, 32, 0, 2])).unwrap();
        assert_eq!(s.container("b").unwrap().ip, Ipv4Addr::new(10, 32, 0, 2));
        assert_eq!(
            s.container_by_ip(Ipv4Addr::new(10, 32, 0, 1)).unwrap().name,
            "a"
        );
        assert_eq!(
            s.container_by_netns(Path::new("/run/netns/b"))
                .unwrap()
                .name,
            "b"
        );
        assert_eq!(s.containers_on(Ipv4Addr::new(192, 168, 0, 1)).count(), 2);
        assert_eq!(s.containers_on(Ipv4Addr::new(192, 168, 0, 2)).count(), 0);
        assert_eq!(s.remove_container("a").unwrap().name, "a");
        assert!(matches!(
            s.remove_container("a"),
            Err(RegistryError::NotFound(n)) if n == "a"
        ));
        s.validate().unwrap();
    }

    #[test]
    fn conflicts_name_the_existing_record() {
        let mut s = Snapshot::default();
        s.add_container(rec("a", [10, 32, 0, 1])).unwrap();
        let err = s.add_container(rec("b", [10, 32, 0, 1])).unwrap_err();
        assert!(err.to_string().contains("\"a\""), "{err}");
        let mut dup_ns = rec("c", [10, 32, 0, 3]);
        dup_ns.netns = PathBuf::from("/run/netns/a");
        let err = s.add_container(dup_ns).unwrap_err();
        assert!(
            matches!(&err, RegistryError::DuplicateNetns { existing, .. } if existing == "a"),
            "{err}"
        );
        assert_eq!(s.containers.len(), 1);
    }

    #[test]
    fn addresses() {
        let mut s = Snapshot::default();
        for ip in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [224, 0, 0, 1],
            [127, 0, 0, 2],
        ] {
            assert!(matches!(
                s.add_container(rec("a", ip)),
                Err(RegistryError::InvalidAddress {
                    field: "overlay ip",
                    ..
                })
            ));
        }
        let mut r = rec("a", [10, 32, 0, 1]);
        r.host_ip = Ipv4Addr::UNSPECIFIED;
        assert!(matches!(
            s.add_container(r.clone()),
            Err(RegistryError::InvalidAddress {
                field: "host_ip",
                ..
            })
        ));
        // A loopback host address is fine: routers on one machine may share it.
        r.host_ip = Ipv4Addr::LOCALHOST;
        s.add_container(r).unwrap();
    }

    #[test]
    fn validate_catches_direct_pushes() {
        let mut s = Snapshot::default();
        s.containers.push(rec("a", [10, 32, 0, 1]));
        s.containers.push(rec("a", [10, 32, 0, 2]));
        assert!(matches!(s.validate(), Err(RegistryError::DuplicateName(_))));
        let host = HostRecord {
            host_ip: Ipv4Addr::new(192, 168, 0, 1),
            peer_port: 7000,
            vnet_prefix: "10.32.0.0/16".parse().unwrap(),
            dir: PathBuf::from("/freeflow"),
        };
        let mut s = Snapshot::default();
        s.upsert_host(host.clone());
        s.upsert_host(HostRecord {
            peer_port: 7001,
            ..host.clone()
        });
        assert_eq!(s.hosts.len(), 1);
        assert_eq!(s.host(host.host_ip).unwrap().peer_port, 7001);
        s.hosts.push(host.clone());
        assert!(matches!(s.validate(), Err(RegistryError::DuplicateHost(_))));
        assert!(s.remove_host(host.host_ip).is_some());
        s.validate().unwrap();
    }
}
