//! The distributed registry backend: etcd (3.4 or later, the v3 API) through its JSON gateway.
//!
//! URL: `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (port 2379 when left out, prefix `/freeflow`
//! when left out). Every key lives under `PREFIX/v1/`, the layout's version:
//!
//! | key                      | value                             | lease                 |
//! |--------------------------|-----------------------------------|-----------------------|
//! | `generation`             | the snapshot generation, decimal  | none                  |
//! | `hosts/<host_ip>`        | the [`HostRecord`], JSON          | the host's            |
//! | `containers/<name>`      | the [`ContainerRecord`], JSON     | its serving host's    |
//! | `ips/<overlay ip>`       | the container's name              | its serving host's    |
//! | `netns/<netns path>`     | the container's name              | its serving host's    |
//!
//! The `ips/` and `netns/` keys are uniqueness indexes: a write that creates one compares its
//! create revision with 0, so no two writers can ever claim one overlay address, namespace or
//! container name, whatever else they do. An update reads everything under the prefix at one
//! revision, applies the caller's change, validates the result and writes the difference in one
//! transaction that compares the mod revision of every key it changes (create revision 0 for new
//! keys) and of the generation key, which every update changes: any concurrent update makes the
//! transaction fail, and the update starts again from a fresh read (bounded).
//!
//! Liveness: a host record is written on a lease of its own ([`LEASE_TTL`]); the containers that
//! host serves are written on the same lease. The host's daemon keeps the lease alive
//! ([`Registry::hold_host`], a thread here); when the daemon dies, etcd deletes the host and its
//! containers in one revision after the TTL. Containers registered while their host had no
//! record are written without a lease and stay until removed.
//!
//! The fingerprint is the number of keys under the prefix and their largest mod revision, from
//! one keys-only range with limit 1: any put that survives raises the largest mod revision, and
//! changes that are only deletions lower the count.

mod http;
mod watch;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::{
    ContainerRecord, Fingerprint, FingerprintRepr, HostRecord, Registry, RegistryError,
    RegistryWatch, Snapshot,
};
use http::ExchangeError;

/// Port used when the URL names a host without one.
pub const DEFAULT_PORT: u16 = 2379;
/// Prefix used when the URL has no path.
pub const DEFAULT_PREFIX: &str = "/freeflow";
/// The layout version, the first component under the prefix.
const LAYOUT: &str = "v1";
/// Time to live of a host's lease, in seconds: a host whose daemon died disappears after this.
pub const LEASE_TTL: u64 = 10;
/// How often the lease is renewed: three chances before it expires.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(LEASE_TTL * 1000 / 3);
/// Wait before retrying a failed renewal.
const KEEPALIVE_RETRY: Duration = Duration::from_secs(1);
/// Deadline of one HTTP exchange (connection included).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of an update that keeps conflicting with other writers.
const UPDATE_ATTEMPTS: u32 = 100;
/// Longest pause between two attempts of a conflicting update.
const MAX_BACKOFF_MS: u64 = 64;

/// A registry stored in etcd (see the module documentation for the layout).
#[derive(Debug)]
pub struct EtcdRegistry {
    client: Arc<Client>,
    /// The thread keeping a host's lease alive, once [`Registry::hold_host`] was called.
    keeper: Mutex<Option<Keeper>>,
}

#[derive(Debug)]
struct Keeper {
    stop: Arc<AtomicBool>,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // The thread notices within its sleep step (or after the exchange under way).
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the registry needs to talk to etcd; shared with the keeper thread.
#[derive(Debug)]
struct Client {
    /// `host:port` of each endpoint, in the URL's order.
    endpoints: Vec<String>,
    /// The endpoint that answered last, tried first.
    preferred: AtomicUsize,
    /// `PREFIX/v1/`.
    root: String,
    /// The normalised URL, for messages and [`Registry::url`].
    url: String,
    /// What the keeper thread saw last: `None` while the lease is held.
    lease_problem: Mutex<Option<String>>,
    /// The host the keeper thread holds.
    held_host: Mutex<Option<Ipv4Addr>>,
    /// The held host's containers as this handle's watch last saw them (`None` while no watch
    /// runs or nothing is held): what the keeper restores after a lost lease, known without
    /// reading the registry.
    watched_served: Mutex<Option<Vec<ContainerRecord>>>,
}

/// Splits `//HOST:PORT[,HOST:PORT...][/PREFIX]` (the URL after `etcd:`) into endpoints and prefix.
pub(super) fn parse_target(url: &str, rest: &str) -> Result<(Vec<String>, String), RegistryError> {
    let invalid = || RegistryError::InvalidUrl(url.to_owned());
    let rest = rest.strip_prefix("//").ok_or_else(invalid)?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, ""),
    };
    let mut endpoints = Vec::new();
    for endpoint in authority.split(',') {
        let (host, port) = match endpoint.rsplit_once(':') {
            // A bracketed IPv6 address without a port ends with ']'.
            Some((host, port)) if !port.ends_with(']') => (host, Some(port)),
            _ => (endpoint, None),
        };
        let host_ok = !host.is_empty()
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
            });
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(invalid)?,
            None => DEFAULT_PORT,
        };
        if !host_ok {
            return Err(invalid());
        }
        endpoints.push(format!("{host}:{port}"));
    }
    let prefix = path.trim_end_matches('/');
    let prefix = if prefix.is_empty() {
        DEFAULT_PREFIX.to_owned()
    } else {
        let segments_ok = prefix[1..].split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        });
        if !segments_ok {
            return Err(invalid());
        }
        prefix.to_owned()
    };
    Ok((endpoints, prefix))
}

impl EtcdRegistry {
    /// A handle on the registry under `prefix` of the etcd cluster at `endpoints` (`host:port`
    /// each), both as [`parse_target`] checked them. Contacts nobody until used.
    pub(super) fn new(endpoints: Vec<String>, prefix: &str) -> Self {
        let url = format!("etcd://{}{prefix}", endpoints.join(","));
        EtcdRegistry {
            client: Arc::new(Client {
                endpoints,
                preferred: AtomicUsize::new(0),
                root: format!("{prefix}/{LAYOUT}/"),
                url,
                lease_problem: Mutex::new(None),
                held_host: Mutex::new(None),
                watched_served: Mutex::new(None),
            }),
            keeper: Mutex::new(None),
        }
    }
}

impl Registry for EtcdRegistry {
    fn load(&self) -> Result<Snapshot, RegistryError> {
        Ok(self.client.read()?.snapshot)
    }

    fn update(
        &self,
        f: &mut dyn FnMut(&mut Snapshot) -> Result<(), RegistryError>,
    ) -> Result<Snapshot, RegistryError> {
        self.client.update(f)
    }

    fn fingerprint(&self) -> Result<Fingerprint, RegistryError> {
        self.client.fingerprint()
    }

    fn watch(&self) -> Result<Option<RegistryWatch>, RegistryError> {
        watch::start(Arc::clone(&self.client)).map(Some)
    }

    fn add_container(&self, rec: &ContainerRecord) -> Result<u64, RegistryError> {
        self.client.add_container(rec)
    }

    fn remove_container(&self, name: &str) -> Result<(ContainerRecord, u64), RegistryError> {
        self.client.remove_container(name)
    }

    fn url(&self) -> String {
        self.client.url.clone()
    }

    fn hold_host(&self, host: &HostRecord) -> Result<(), RegistryError> {
        let mut keeper = lock(&self.keeper);
        // Dropping the previous keeper stops its thread.
        *keeper = None;
        let stop = Arc::new(AtomicBool::new(false));
        let client = Arc::clone(&self.client);
        let host = host.clone();
        let thread_stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("ff-etcd-lease".to_owned())
            .spawn(move || keep_host_alive(&client, &host, &thread_stop))
            .map_err(RegistryError::Thread)?;
        *keeper = Some(Keeper { stop });
        Ok(())
    }

    fn liveness_problem(&self) -> Option<String> {
        lock(&self.client.lease_problem).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The keeper thread: finds (or writes) the host record, renews its lease every
/// [`KEEPALIVE_EVERY`], and writes the record again on a new lease when the old one is gone.
fn keep_host_alive(client: &Client, host: &HostRecord, stop: &AtomicBool) {
    *lock(&client.held_host) = Some(host.host_ip);
    let mut lease = None;
    let mut served = Served::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        let result = renew(client, host, &mut lease, &mut served);
        let problem = match result {
            Ok(()) => {
                next = Instant::now() + KEEPALIVE_EVERY;
                None
            }
            Err(problem) => {
                next = Instant::now() + KEEPALIVE_RETRY;
                Some(problem)
            }
        };
        *lock(&client.lease_problem) = problem;
    }
}

/// The containers of the held host as the keeper last saw them in etcd, so that a lease that
/// expired while the daemon lived (etcd reachable, the daemon not: a partition, a stall longer
/// than the TTL) costs no registration: they are written again with the host record.
#[derive(Default)]
struct Served {
    containers: Vec<ContainerRecord>,
    /// The registry's fingerprint when `containers` was read.
    seen: Option<Fingerprint>,
}

impl Served {
    /// Takes the host's containers from the watch of the same handle, when one runs (the
    /// daemon's); else reads them again if the registry changed since the last look (a whole
    /// read: every few seconds per host while registrations go on, which is what the watch
    /// spares).
    fn refresh(&mut self, client: &Client, host: Ipv4Addr) -> Result<(), RegistryError> {
        if let Some(watched) = lock(&client.watched_served).clone() {
            self.containers = watched;
            self.seen = None;
            return Ok(());
        }
        let now = client.fingerprint()?;
        if self.seen.as_ref() == Some(&now) {
            return Ok(());
        }
        let stored = client.read()?;
        self.containers = stored
            .snapshot
            .containers
            .into_iter()
            .filter(|c| c.host_ip == host)
            .collect();
        self.seen = Some(now);
        Ok(())
    }

    /// Puts back into `s` each remembered container whose name, address and namespace nobody
    /// took meanwhile (a conflicting one stays out: the registry decides).
    fn restore_into(&self, s: &mut Snapshot) {
        for c in &self.containers {
            let taken = s
                .containers
                .iter()
                .any(|o| o.name == c.name || o.ip == c.ip || o.netns == c.netns);
            if !taken {
                s.containers.push(c.clone());
            }
        }
    }
}

/// One round of the keeper: make sure the host record exists on a lease we know (with the
/// containers it served, if they went with an expired lease), then renew it.
fn renew(
    client: &Client,
    host: &HostRecord,
    lease: &mut Option<i64>,
    served: &mut Served,
) -> Result<(), String> {
    let host_key = host_key(&client.root, host.host_ip);
    if lease.is_none() {
        let stored = client.read().map_err(|e| e.to_string())?;
        let mut current = stored.kvs.get(&host_key).map(|kv| kv.lease);
        if current.is_none() || stored.snapshot.host(host.host_ip) != Some(host) {
            // Missing (never written, or its lease expired) or stale: (re)write it. A new host
            // key gets a new lease; a changed one keeps its lease.
            client
                .update(&mut |s| {
                    s.upsert_host(host.clone());
                    served.restore_into(s);
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
            let stored = client.read().map_err(|e| e.to_string())?;
            current = stored.kvs.get(&host_key).map(|kv| kv.lease);
        }
        match current {
            Some(id) if id != 0 => *lease = Some(id),
            Some(_) => {
                return Err(format!(
                    "the host record {host_key} has no lease (written by something else?)"
                ))
            }
            None => {
                return Err(format!(
                    "the host record {host_key} vanished as it was written"
                ))
            }
        }
    }
    let Some(id) = *lease else {
        return Ok(());
    };
    match client.keepalive(id) {
        Ok(ttl) if ttl > 0 => {
            // While the lease holds, what etcd says this host serves is what to restore.
            served
                .refresh(client, host.host_ip)
                .map_err(|e| e.to_string())
        }
        Ok(_) => {
            *lease = None;
            Err(format!(
                "the lease of {host_key} expired (it was not renewed in time): the host record \
                 and the {} containers it served are written again on a new lease",
                served.containers.len()
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// How a failed exchange may be repeated on another endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and lease renewals: repeating them is harmless.
    Safe,
    /// Writes: only when nothing was sent.
    IfNotSent,
}

/// One key-value as read, relative to the layout root.
#[derive(Debug)]
struct StoredKv {
    value: Vec<u8>,
    mod_revision: i64,
    lease: i64,
}

/// Everything under the prefix at one revision.
struct Stored {
    snapshot: Snapshot,
    /// The keys this layout manages (generation, hosts, containers, indexes) by full key.
    kvs: BTreeMap<String, StoredKv>,
}

/// What one key should hold after an update: its value, its lease, and whether it is written
/// even when its value is unchanged but its lease differs (the index keys of a container whose
/// record is rewritten, so that all three keys share one lease).
struct Desired {
    value: Vec<u8>,
    lease: i64,
    rewrite: bool,
}

/// What one key under the prefix holds, decoded.
#[derive(Debug)]
enum Entry {
    Generation(u64),
    Host(HostRecord),
    Container(ContainerRecord),
    /// A uniqueness index key (`ips/`, `netns/`).
    Index,
    /// A key a later version of the layout wrote: counted, never changed.
    Foreign,
}

/// A put or delete of the transaction an update sends.
enum Change {
    Put { value: Vec<u8>, lease: i64 },
    Delete,
}

impl Client {
    /// Sends `body` to `path` on the preferred endpoint, falling over to the others, and decodes
    /// the answer.
    fn call<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &Value,
        retry: Retry,
    ) -> Result<T, RegistryError> {
        let bytes = serde_json::to_vec(body).map_err(|e| self.refused(e.to_string()))?;
        let first = self.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.endpoints.len() {
            let index = (first + i) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            let deadline = Instant::now() + EXCHANGE_TIMEOUT;
            match http::post(endpoint, path, &bytes, deadline) {
                Ok(answer) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return serde_json::from_slice(&answer).map_err(|e| {
                        self.refused(format!("unexpected answer from {endpoint}{path}: {e}"))
                    });
                }
                Err(ExchangeError::Status { code, body }) => {
                    let message = error_message(&body)
                        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                    // 5xx: this member cannot serve (no leader, stopping); another may.
                    if code >= 500 && retry == Retry::Safe {
                        failures.push(format!("{endpoint}: HTTP {code}: {message}"));
                        continue;
                    }
                    return Err(self.refused(message));
                }
                Err(ExchangeError::NotSent(detail)) => {
                    failures.push(format!("{endpoint}: {detail}"))
                }
                Err(ExchangeError::NoAnswer(detail) | ExchangeError::Malformed(detail)) => {
                    if retry == Retry::Safe {
                        failures.push(format!("{endpoint}: {detail}"));
                        continue;
                    }
                    return Err(RegistryError::EtcdOutcomeUnknown {
                        url: self.url.clone(),
                        detail: format!("{endpoint}: {detail}"),
                    });
                }
            }
        }
        Err(RegistryError::EtcdUnreachable {
            url: self.url.clone(),
            detail: failures.join("; "),
        })
    }

    fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Vec<u8>, RegistryError> {
        serde_json::to_vec(value).map_err(|e| self.refused(format!("cannot encode a record: {e}")))
    }

    fn refused(&self, message: String) -> RegistryError {
        RegistryError::EtcdRefused {
            url: self.url.clone(),
            message,
        }
    }

    fn corrupt(&self, key: &str, detail: String) -> RegistryError {
        RegistryError::EtcdCorrupt {
            url: self.url.clone(),
            key: key.to_owned(),
            detail,
        }
    }

    /// The generation after the one `kv` (read from `key`) holds; an absent key counts as 0.
    fn next_generation(&self, key: &str, kv: Option<&KeyValue>) -> Result<u64, RegistryError> {
        let generation = match kv {
            Some(kv) => match self.entry(key, &self.decode(kv)?.1)? {
                Entry::Generation(g) => g,
                _ => 0,
            },
            None => 0,
        };
        generation
            .checked_add(1)
            .ok_or_else(|| self.corrupt(key, "the generation counter is at its maximum".to_owned()))
    }

    /// One keys-only range under the prefix: how many keys, and the newest change among them.
    fn fingerprint(&self) -> Result<Fingerprint, RegistryError> {
        let (start, end) = prefix_range(&self.root);
        let body = json!({
            "key": start,
            "range_end": end,
            "keys_only": true,
            "limit": 1,
            "sort_order": "DESCEND",
            "sort_target": "MOD",
        });
        let range: RangeResponse = self.call("/v3/kv/range", &body, Retry::Safe)?;
        Ok(Fingerprint(FingerprintRepr::Etcd {
            count: range.count,
            max_mod_revision: range.kvs.first().map_or(0, |kv| kv.mod_revision),
        }))
    }

    fn read(&self) -> Result<Stored, RegistryError> {
        self.read_at().map(|(stored, _)| stored)
    }

    /// Everything under the prefix in one range, and the revision it was read at.
    fn read_at(&self) -> Result<(Stored, i64), RegistryError> {
        let (start, end) = prefix_range(&self.root);
        let range: RangeResponse = self.call(
            "/v3/kv/range",
            &json!({ "key": start, "range_end": end }),
            Retry::Safe,
        )?;
        let revision = range.header.map_or(0, |h| h.revision);
        let mut entries = Vec::with_capacity(range.kvs.len());
        let mut kvs = BTreeMap::new();
        for kv in &range.kvs {
            let (key, value, entry) = self.decode(kv)?;
            if !matches!(entry, Entry::Foreign) {
                kvs.insert(
                    key,
                    StoredKv {
                        value,
                        mod_revision: kv.mod_revision,
                        lease: kv.lease,
                    },
                );
            }
            entries.push((kv.create_revision, entry));
        }
        let snapshot = self.assemble(entries.iter().map(|(created, e)| (*created, e)))?;
        Ok((Stored { snapshot, kvs }, revision))
    }

    /// The key, value and meaning of one key-value the gateway sent.
    fn decode(&self, kv: &KeyValue) -> Result<(String, Vec<u8>, Entry), RegistryError> {
        let key_bytes = BASE64
            .decode(&kv.key)
            .map_err(|e| self.corrupt(&kv.key, format!("key not base64: {e}")))?;
        let key = String::from_utf8(key_bytes)
            .map_err(|e| self.corrupt(&kv.key, format!("key not UTF-8: {e}")))?;
        let value = BASE64
            .decode(&kv.value)
            .map_err(|e| self.corrupt(&key, format!("value not base64: {e}")))?;
        let entry = self.entry(&key, &value)?;
        Ok((key, value, entry))
    }

    /// What the key `key` holding `value` means in the layout.
    fn entry(&self, key: &str, value: &[u8]) -> Result<Entry, RegistryError> {
        let Some(relative) = key.strip_prefix(&self.root) else {
            return Ok(Entry::Foreign);
        };
        if relative == "generation" {
            let generation = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| self.corrupt(key, "not a decimal number".to_owned()))?;
            Ok(Entry::Generation(generation))
        } else if let Some(ip) = relative.strip_prefix("hosts/") {
            let rec: HostRecord =
                serde_json::from_slice(value).map_err(|e| self.corrupt(key, e.to_string()))?;
            if ip != rec.host_ip.to_string() {
                return Err(self.corrupt(key, format!("holds host {}", rec.host_ip)));
            }
            Ok(Entry::Host(rec))
        } else if let Some(name) = relative.strip_prefix("containers/") {
            let rec: ContainerRecord =
                serde_json::from_slice(value).map_err(|e| self.corrupt(key, e.to_string()))?;
            if name != rec.name {
                return Err(self.corrupt(key, format!("holds container {:?}", rec.name)));
            }
            Ok(Entry::Container(rec))
        } else if relative.starts_with("ips/") || relative.starts_with("netns/") {
            Ok(Entry::Index)
        } else {
            // Written by a later version of the layout: not ours to change.
            Ok(Entry::Foreign)
        }
    }

    /// The snapshot made of `entries` (each with its create revision), validated.
    fn assemble<'a>(
        &self,
        entries: impl Iterator<Item = (i64, &'a Entry)>,
    ) -> Result<Snapshot, RegistryError> {
        let mut generation = 0;
        let mut hosts = Vec::new();
        let mut containers = Vec::new();
        for (created, entry) in entries {
            match entry {
                Entry::Generation(g) => generation = *g,
                Entry::Host(rec) => hosts.push((created, rec)),
                Entry::Container(rec) => containers.push((created, rec)),
                Entry::Index | Entry::Foreign => {}
            }
        }
        // In the order they were first written, as the file keeps them.
        hosts.sort_by_key(|(created, _)| *created);
        containers.sort_by_key(|(created, _)| *created);
        let snapshot = Snapshot {
            generation,
            hosts: hosts.into_iter().map(|(_, h)| h.clone()).collect(),
            containers: containers.into_iter().map(|(_, c)| c.clone()).collect(),
        };
        snapshot
            .validate()
            .map_err(|e| self.corrupt(&self.root, format!("invalid contents: {e}")))?;
        Ok(snapshot)
    }

    /// Read, apply, validate, write the difference in one transaction; again on conflict.
    fn update(
        &self,
        f: &mut dyn FnMut(&mut Snapshot) -> Result<(), RegistryError>,
    ) -> Result<Snapshot, RegistryError> {
        // Leases granted for hosts that are new in this update, kept across attempts.
        let mut granted: HashMap<Ipv4Addr, i64> = HashMap::new();
        for attempt in 0..UPDATE_ATTEMPTS {
            if attempt > 0 {
                thread::sleep(backoff(attempt));
            }
            let stored = self.read()?;
            let mut next = stored.snapshot.clone();
            f(&mut next)?;
            next.validate()?;
            next.generation = stored.snapshot.generation.checked_add(1).ok_or_else(|| {
                self.corrupt(
                    &format!("{}generation", self.root),
                    "the generation counter is at its maximum".to_owned(),
                )
            })?;
            let desired = self.desired(&stored, &next, &mut granted)?;
            let changes = diff(&stored, desired);
            match self.txn(&stored, &changes) {
                Ok(true) => return Ok(next),
                Ok(false) => {}
                // A lease expired between our read and our write: its keys are going.
                Err(RegistryError::EtcdRefused { message, .. })
                    if message.contains("lease not found") =>
                {
                    granted.clear();
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::EtcdContention {
            url: self.url.clone(),
            attempts: UPDATE_ATTEMPTS,
        })
    }

    /// Registers `rec` reading only the keys it depends on: the generation and its host's
    /// record (for the lease), in one transaction; then one transaction that creates the
    /// container's three keys if all are absent and compares the two keys read. When it fails,
    /// its other branch reads the three keys, which tells a name, address or namespace already
    /// taken from a concurrent writer (then it starts again, bounded).
    fn add_container(&self, rec: &ContainerRecord) -> Result<u64, RegistryError> {
        super::check_record(rec)?;
        let generation_key = format!("{}generation", self.root);
        let host_key = host_key(&self.root, rec.host_ip);
        let name_key = format!("{}containers/{}", self.root, rec.name);
        let ip_key = format!("{}ips/{}", self.root, rec.ip);
        let netns_key = format!("{}netns/{}", self.root, rec.netns.display());
        let value = self.encode(rec)?;
        for attempt in 0..UPDATE_ATTEMPTS {
            if attempt > 0 {
                thread::sleep(backoff(attempt));
            }
            let read: TxnResponse = self.call(
                "/v3/kv/txn",
                &json!({ "success": [txn_range(&generation_key), txn_range(&host_key)] }),
                Retry::Safe,
            )?;
            let [generation_kv, host_kv] = [0, 1].map(|i| read.first_kv(i));
            let next = self.next_generation(&generation_key, generation_kv)?;
            let lease = host_kv.map_or(0, |kv| kv.lease);
            let put = |key: &str, value: &[u8], lease: i64| {
                json!({ "request_put": {
                    "key": BASE64.encode(key), "value": BASE64.encode(value),
                    "lease": lease.to_string(),
                }})
            };
            let body = json!({
                "compare": [
                    txn_unchanged(&generation_key, generation_kv),
                    txn_unchanged(&host_key, host_kv),
                    txn_unchanged(&name_key, None),
                    txn_unchanged(&ip_key, None),
                    txn_unchanged(&netns_key, None),
                ],
                "success": [
                    put(&generation_key, next.to_string().as_bytes(), 0),
                    put(&name_key, &value, lease),
                    put(&ip_key, rec.name.as_bytes(), lease),
                    put(&netns_key, rec.name.as_bytes(), lease),
                ],
                "failure": [txn_range(&name_key), txn_range(&ip_key), txn_range(&netns_key)],
            });
            let answer: TxnResponse = match self.call("/v3/kv/txn", &body, Retry::IfNotSent) {
                // The host's lease expired between the read and the write: read again.
                Err(RegistryError::EtcdRefused { message, .. })
                    if message.contains("lease not found") =>
                {
                    continue;
                }
                other => other?,
            };
            if answer.succeeded {
                return Ok(next);
            }
            let holder = |i: usize| {
                answer.first_kv(i).map(|kv| {
                    let value = BASE64.decode(&kv.value).unwrap_or_default();
                    String::from_utf8_lossy(&value).into_owned()
                })
            };
            if holder(0).is_some() {
                return Err(RegistryError::DuplicateName(rec.name.clone()));
            }
            if let Some(existing) = holder(1) {
                return Err(RegistryError::DuplicateIp {
                    ip: rec.ip,
                    name: rec.name.clone(),
                    existing,
                });
            }
            if let Some(existing) = holder(2) {
                return Err(RegistryError::DuplicateNetns {
                    netns: rec.netns.clone(),
                    name: rec.name.clone(),
                    existing,
                });
            }
            // Another writer changed the generation or the host's record first.
        }
        Err(RegistryError::EtcdContention {
            url: self.url.clone(),
            attempts: UPDATE_ATTEMPTS,
        })
    }

    /// Notes what the watch of this handle sees now (`None`: no watch, or nothing usable), for
    /// the keeper ([`Served::refresh`]).
    fn note_watched(&self, snapshot: Option<&Snapshot>) {
        let held = *lock(&self.held_host);
        *lock(&self.watched_served) = match (snapshot, held) {
            (Some(s), Some(host)) => Some(s.containers_on(host).cloned().collect()),
            _ => None,
        };
    }

    /// Unregisters `name` reading only the generation and the container's key, in one
    /// transaction; then one transaction that deletes the container's three keys and raises the
    /// generation if neither key read changed (else it starts again, bounded). The index keys
    /// are the record's: written and deleted with it, in one transaction each time.
    fn remove_container(&self, name: &str) -> Result<(ContainerRecord, u64), RegistryError> {
        let generation_key = format!("{}generation", self.root);
        let name_key = format!("{}containers/{name}", self.root);
        let delete = |key: &str| json!({ "request_delete_range": { "key": BASE64.encode(key) } });
        for attempt in 0..UPDATE_ATTEMPTS {
            if attempt > 0 {
                thread::sleep(backoff(attempt));
            }
            let read: TxnResponse = self.call(
                "/v3/kv/txn",
                &json!({ "success": [txn_range(&generation_key), txn_range(&name_key)] }),
                Retry::Safe,
            )?;
            let [generation_kv, name_kv] = [0, 1].map(|i| read.first_kv(i));
            let Some(name_kv) = name_kv else {
                return Err(RegistryError::NotFound(name.to_owned()));
            };
            let Entry::Container(rec) = self.decode(name_kv)?.2 else {
                return Err(self.corrupt(&name_key, "not a container record".to_owned()));
            };
            let next = self.next_generation(&generation_key, generation_kv)?;
            let body = json!({
                "compare": [
                    txn_unchanged(&generation_key, generation_kv),
                    txn_unchanged(&name_key, Some(name_kv)),
                ],
                "success": [
                    json!({ "request_put": {
                        "key": BASE64.encode(&generation_key),
                        "value": BASE64.encode(next.to_string()),
                    }}),
                    delete(&name_key),
                    delete(&format!("{}ips/{}", self.root, rec.ip)),
                    delete(&format!("{}netns/{}", self.root, rec.netns.display())),
                ],
            });
            let answer: TxnResponse = self.call("/v3/kv/txn", &body, Retry::IfNotSent)?;
            if answer.succeeded {
                return Ok((rec, next));
            }
            // Another writer changed the generation or the container first.
        }
        Err(RegistryError::EtcdContention {
            url: self.url.clone(),
            attempts: UPDATE_ATTEMPTS,
        })
    }

    /// Every key the snapshot `next` consists of, with its value and lease. A container key
    /// whose record is rewritten drags its index keys along, so all three share a lease.
    fn desired(
        &self,
        stored: &Stored,
        next: &Snapshot,
        granted: &mut HashMap<Ipv4Addr, i64>,
    ) -> Result<BTreeMap<String, Desired>, RegistryError> {
        let mut desired = BTreeMap::new();
        desired.insert(
            format!("{}generation", self.root),
            Desired {
                value: next.generation.to_string().into_bytes(),
                lease: 0,
                rewrite: true,
            },
        );
        let mut leases = HashMap::new();
        for host in &next.hosts {
            let key = host_key(&self.root, host.host_ip);
            let lease = match stored.kvs.get(&key) {
                Some(kv) => kv.lease,
                None => match granted.get(&host.host_ip) {
                    Some(&id) => id,
                    None => {
                        let id = self.grant()?;
                        granted.insert(host.host_ip, id);
                        id
                    }
                },
            };
            leases.insert(host.host_ip, lease);
            desired.insert(
                key,
                Desired {
                    value: self.encode(host)?,
                    lease,
                    rewrite: false,
                },
            );
        }
        for rec in &next.containers {
            let lease = leases.get(&rec.host_ip).copied().unwrap_or(0);
            let key = format!("{}containers/{}", self.root, rec.name);
            let value = self.encode(rec)?;
            let rewritten = stored.kvs.get(&key).is_none_or(|kv| kv.value != value);
            let name = rec.name.clone().into_bytes();
            desired.insert(
                key,
                Desired {
                    value,
                    lease,
                    rewrite: rewritten,
                },
            );
            for index in [
                format!("{}ips/{}", self.root, rec.ip),
                format!("{}netns/{}", self.root, rec.netns.display()),
            ] {
                desired.insert(
                    index,
                    Desired {
                        value: name.clone(),
                        lease,
                        rewrite: rewritten,
                    },
                );
            }
        }
        Ok(desired)
    }

    /// Sends the changes as one transaction guarded by a compare on every key it touches.
    /// `Ok(false)`: a compare failed (someone else wrote first).
    fn txn(
        &self,
        stored: &Stored,
        changes: &BTreeMap<String, Change>,
    ) -> Result<bool, RegistryError> {
        let mut compares = Vec::with_capacity(changes.len());
        let mut ops = Vec::with_capacity(changes.len());
        for (key, change) in changes {
            let key64 = BASE64.encode(key);
            compares.push(match stored.kvs.get(key) {
                Some(kv) => json!({
                    "key": key64, "target": "MOD", "result": "EQUAL",
                    "mod_revision": kv.mod_revision.to_string(),
                }),
                None => json!({
                    "key": key64, "target": "CREATE", "result": "EQUAL", "create_revision": "0",
                }),
            });
            ops.push(match change {
                Change::Put { value, lease } => json!({ "request_put": {
                    "key": key64, "value": BASE64.encode(value), "lease": lease.to_string(),
                }}),
                Change::Delete => json!({ "request_delete_range": { "key": key64 } }),
            });
        }
        let answer: TxnResponse = self.call(
            "/v3/kv/txn",
            &json!({ "compare": compares, "success": ops }),
            Retry::IfNotSent,
        )?;
        Ok(answer.succeeded)
    }

    fn grant(&self) -> Result<i64, RegistryError> {
        let answer: LeaseGrantResponse = self.call(
            "/v3/lease/grant",
            &json!({ "TTL": LEASE_TTL.to_string() }),
            // A grant repeated after a lost answer leaves an unused lease, which expires.
            Retry::Safe,
        )?;
        if answer.id == 0 || !answer.error.is_empty() {
            return Err(self.refused(format!("lease grant failed: {}", answer.error)));
        }
        Ok(answer.id)
    }

    /// Renews a lease once; returns its TTL (0: the lease is gone).
    fn keepalive(&self, id: i64) -> Result<i64, RegistryError> {
        let answer: KeepAliveResponse = self.call(
            "/v3/lease/keepalive",
            &json!({ "ID": id.to_string() }),
            Retry::Safe,
        )?;
        match answer.result {
            Some(result) => Ok(result.ttl),
            None => Err(self.refused(format!(
                "lease keep-alive failed: {}",
                answer.error.map(|e| e.message).unwrap_or_default()
            ))),
        }
    }
}

/// The puts and deletes that turn `stored` into `desired`: new or changed values (and keys
/// marked for rewriting) are put, managed keys not desired are deleted.
fn diff(stored: &Stored, desired: BTreeMap<String, Desired>) -> BTreeMap<String, Change> {
    let mut changes = BTreeMap::new();
    for key in stored.kvs.keys() {
        if !desired.contains_key(key) {
            changes.insert(key.clone(), Change::Delete);
        }
    }
    for (
        key,
        Desired {
            value,
            lease,
            rewrite,
        },
    ) in desired
    {
        let same = stored
            .kvs
            .get(&key)
            .is_some_and(|kv| kv.value == value && (!rewrite || kv.lease == lease));
        if !same {
            changes.insert(key, Change::Put { value, lease });
        }
    }
    changes
}

fn host_key(root: &str, host_ip: Ipv4Addr) -> String {
    format!("{root}hosts/{host_ip}")
}

/// `key` and `range_end` (base64) of every key starting with `prefix` (which ends in `/`, so
/// the end is the prefix with its last byte incremented).
fn prefix_range(prefix: &str) -> (String, String) {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    (BASE64.encode(prefix), BASE64.encode(end))
}

/// A random pause, growing with the attempt, so that conflicting writers spread out.
fn backoff(attempt: u32) -> Duration {
    let ceiling = (1u64 << attempt.min(6)).min(MAX_BACKOFF_MS);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    Duration::from_micros(hasher.finish() % (ceiling * 1000 + 1))
}

/// The `error`/`message` of an error answer from the gateway.
fn error_message(body: &[u8]) -> Option<String> {
    let answer: ErrorBody = serde_json::from_slice(body).ok()?;
    Some(if answer.message.is_empty() {
        answer.error
    } else {
        answer.message
    })
}

/// The gateway writes 64-bit integers as strings, and leaves out zero values.
fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }
    match Int::deserialize(d)? {
        Int::Number(n) => Ok(n),
        Int::Text(text) => text.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int")]
    create_revision: i64,
    #[serde(default, deserialize_with = "int")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "int")]
    lease: i64,
}

#[derive(Deserialize)]
struct ResponseHeader {
    #[serde(default, deserialize_with = "int")]
    revision: i64,
}

#[derive(Deserialize)]
struct RangeResponse {
    header: Option<ResponseHeader>,
    #[serde(default)]
    kvs: Vec<KeyValue>,
    #[serde(default, deserialize_with = "int")]
    count: i64,
}

#[derive(Deserialize)]
struct TxnResponse {
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<TxnOpResponse>,
}

impl TxnResponse {
    /// The first key-value of the transaction's `i`th operation, if it was a read that found one.
    fn first_kv(&self, i: usize) -> Option<&KeyValue> {
        self.responses
            .get(i)
            .and_then(|r| r.response_range.as_ref())
            .and_then(|r| r.kvs.first())
    }
}

#[derive(Deserialize)]
struct TxnOpResponse {
    response_range: Option<RangeResponse>,
}

#[derive(Deserialize)]
struct LeaseGrantResponse {
    #[serde(rename = "ID", default, deserialize_with = "int")]
    id: i64,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct KeepAliveResponse {
    result: Option<KeepAliveResult>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct KeepAliveResult {
    #[serde(rename = "TTL", default, deserialize_with = "int")]
    ttl: i64,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

/// A transaction's read of `key`.
fn txn_range(key: &str) -> serde_json::Value {
    json!({ "request_range": { "key": BASE64.encode(key) } })
}

/// A transaction's comparison: `key` is as `kv` was read (absent when `None`).
fn txn_unchanged(key: &str, kv: Option<&KeyValue>) -> serde_json::Value {
    match kv {
        Some(kv) => json!({
            "key": BASE64.encode(key), "target": "MOD", "result": "EQUAL",
            "mod_revision": kv.mod_revision.to_string(),
        }),
        None => json!({
            "key": BASE64.encode(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": "0",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let parse = |u: &str| parse_target(u, u.strip_prefix("etcd:").unwrap());
        assert_eq!(
            parse("etcd://127.0.0.1:2379").unwrap(),
            (vec!["127.0.0.1:2379".to_owned()], "/freeflow".to_owned())
        );
        assert_eq!(
            parse("etcd://a:1,b,[::1]:3,[::1]/x/y/").unwrap(),
            (
                vec![
                    "a:1".to_owned(),
                    "b:2379".to_owned(),
                    "[::1]:3".to_owned(),
                    "[::1]:2379".to_owned()
                ],
                "/x/y".to_owned()
            )
        );
        for bad in [
            "etcd:x",
            "etcd://",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a,,b",
            "etcd://a b",
            "etcd://a/x//y",
            "etcd://a/x y",
        ] {
            assert!(
                matches!(parse(bad), Err(RegistryError::InvalidUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn prefix_ranges() {
        let (start, end) = prefix_range("/ff/v1/");
        assert_eq!(BASE64.decode(start).unwrap(), b"/ff/v1/");
        assert_eq!(BASE64.decode(end).unwrap(), b"/ff/v10");
    }

    #[test]
    fn gateway_integers() {
        let kv: KeyValue =
            serde_json::from_str(r#"{"key":"YQ==","mod_revision":"12","lease":7}"#).unwrap();
        assert_eq!((kv.mod_revision, kv.lease, kv.create_revision), (12, 7, 0));
        assert!(serde_json::from_str::<KeyValue>(r#"{"key":"","lease":"x"}"#).is_err());
    }
}
