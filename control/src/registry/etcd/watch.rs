//! The etcd registry followed as it changes: one thread per [`RegistryWatch`] reads everything
//! under the prefix once, then opens one watch (`POST /v3/watch`, a stream of JSON lines) from
//! the next revision and applies its events to the keys it holds: no read per change.
//!
//! It starts over from a full read when the watch is cancelled because etcd compacted the
//! revisions it still needed, when the connection ends (etcd restarted, an endpoint went away),
//! and when a probe finds the keys it holds differ from etcd's: after [`SILENCE_PROBE`] without
//! a message it compares its count and newest mod revision with a fingerprint read, which
//! catches a connection that died without a word. Each start over waits [`RECONNECT_FIRST`],
//! doubling up to [`RECONNECT_MAX`] while no watch gets created.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::http::{ExchangeError, LineStream};
use super::{
    error_message, int, prefix_range, Client, Entry, ErrorBody, KeyValue, RangeResponse, Retry,
    EXCHANGE_TIMEOUT,
};
use crate::registry::{
    Fingerprint, FingerprintRepr, RegistryError, RegistryWatch, Snapshot, WatchPublisher,
};

/// First pause before starting over after a failure.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between two failed starts (etcd down).
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Silence after which the keys held are checked against etcd's.
const SILENCE_PROBE: Duration = Duration::from_secs(10);
/// Longest wait for a line, so that a dropped handle stops the thread soon.
const LINE_WAIT: Duration = Duration::from_millis(500);

/// Starts the thread following `client`'s prefix.
pub(super) fn start(client: Arc<Client>) -> Result<RegistryWatch, RegistryError> {
    let (watch, publisher) = RegistryWatch::new()?;
    thread::Builder::new()
        .name("registry-watch".to_owned())
        .spawn(move || run(&client, &publisher))
        .map_err(RegistryError::Thread)?;
    Ok(watch)
}

/// Why following ended without an error to report.
enum Ended {
    /// The handle was dropped.
    Stopped,
    /// etcd compacted revisions the watch needed, or the keys held differ from etcd's.
    Behind,
    /// The connection ended or broke.
    Lost,
}

fn run(client: &Client, publisher: &WatchPublisher) {
    let mut delay = RECONNECT_FIRST;
    let mut first = true;
    while !publisher.stopped() {
        if !first {
            publisher.count_resync();
        }
        first = false;
        match follow(client, publisher, &mut delay) {
            Ok(Ended::Stopped) => {
                client.note_watched(None);
                return;
            }
            // Nothing is wrong with etcd, but a store compacting faster than a full read
            // takes must not make this a busy loop: the same growing pause.
            Ok(Ended::Behind | Ended::Lost) => {}
            Err(e) => publisher.publish(Err(e)),
        }
        let until = Instant::now() + delay;
        while !publisher.stopped() && Instant::now() < until {
            thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(LINE_WAIT),
            );
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// One key under the prefix as the watch holds it.
struct Held {
    created: i64,
    modified: i64,
    /// What it means, or why it cannot be understood.
    entry: Result<Entry, String>,
}

/// Every key under the prefix by its base64 form (as the gateway sends keys).
#[derive(Default)]
struct View {
    keys: BTreeMap<String, Held>,
}

impl View {
    fn put(&mut self, client: &Client, kv: &KeyValue) {
        let entry = client.decode(kv).map(|(_, _, e)| e).map_err(|e| match e {
            RegistryError::EtcdCorrupt { key, detail, .. } => format!("{key}\u{0}{detail}"),
            other => format!("{}\u{0}{other}", kv.key),
        });
        self.keys.insert(
            kv.key.clone(),
            Held {
                created: kv.create_revision,
                modified: kv.mod_revision,
                entry,
            },
        );
    }

    fn snapshot(&self, client: &Client) -> Result<Snapshot, RegistryError> {
        let mut entries = Vec::with_capacity(self.keys.len());
        for held in self.keys.values() {
            match &held.entry {
                Ok(entry) => entries.push((held.created, entry)),
                Err(problem) => {
                    let (key, detail) = problem.split_once('\u{0}').unwrap_or(("", problem));
                    return Err(client.corrupt(key, detail.to_owned()));
                }
            }
        }
        client.assemble(entries.into_iter())
    }

    /// What [`Client::fingerprint`] would say if etcd holds exactly these keys.
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint(FingerprintRepr::Etcd {
            count: self.keys.len() as i64,
            max_mod_revision: self.keys.values().map(|h| h.modified).max().unwrap_or(0),
        })
    }
}

/// Publishes the snapshot `view` makes, and tells the handle's keeper (if any) what its host
/// serves in it.
fn publish(client: &Client, publisher: &WatchPublisher, view: &View) {
    let snapshot = view.snapshot(client);
    client.note_watched(snapshot.as_ref().ok());
    publisher.publish(snapshot);
}

/// A full read, then the watch from the next revision until it ends.
fn follow(
    client: &Client,
    publisher: &WatchPublisher,
    delay: &mut Duration,
) -> Result<Ended, RegistryError> {
    let (start, end) = prefix_range(&client.root);
    let range: RangeResponse = client.call(
        "/v3/kv/range",
        &json!({ "key": start, "range_end": end }),
        Retry::Safe,
    )?;
    let revision = range.header.map_or(0, |h| h.revision);
    let mut view = View::default();
    for kv in &range.kvs {
        view.put(client, kv);
    }
    publish(client, publisher, &view);
    watch_from(client, publisher, view, revision + 1, delay)
}

/// Follows the watch from `start_revision` on, applying its events to `view` (which holds
/// what etcd held just before that revision), until it ends.
fn watch_from(
    client: &Client,
    publisher: &WatchPublisher,
    mut view: View,
    start_revision: i64,
    delay: &mut Duration,
) -> Result<Ended, RegistryError> {
    let (start, end) = prefix_range(&client.root);
    let request = json!({ "create_request": {
        "key": start, "range_end": end, "start_revision": start_revision.to_string(),
    }});
    let mut stream = open(client, &serde_json::to_vec(&request).unwrap_or_default())?;
    let mut last_heard = Instant::now();
    loop {
        if publisher.stopped() {
            return Ok(Ended::Stopped);
        }
        let line = match stream.next_line(LINE_WAIT) {
            Ok(Some(line)) => line,
            Ok(None) => {
                if last_heard.elapsed() >= SILENCE_PROBE {
                    last_heard = Instant::now();
                    if client.fingerprint()? != view.fingerprint() {
                        return Ok(Ended::Behind);
                    }
                }
                continue;
            }
            Err(_) => return Ok(Ended::Lost),
        };
        last_heard = Instant::now();
        let message: WatchMessage = serde_json::from_slice(&line)
            .map_err(|e| client.refused(format!("unexpected watch message: {e}")))?;
        if let Some(error) = message.error {
            let text = if error.message.is_empty() {
                error.error
            } else {
                error.message
            };
            return Err(client.refused(format!("the watch failed: {text}")));
        }
        let Some(result) = message.result else {
            continue;
        };
        if result.compact_revision > 0 {
            return Ok(Ended::Behind);
        }
        if result.canceled {
            return Err(client.refused(format!(
                "etcd cancelled the watch: {}",
                result.cancel_reason
            )));
        }
        if result.created {
            // Following again: the next failure starts from a short pause.
            *delay = RECONNECT_FIRST;
        }
        if result.events.is_empty() {
            continue;
        }
        for event in &result.events {
            if event.kind == "DELETE" {
                view.keys.remove(&event.kv.key);
            } else {
                view.put(client, &event.kv);
            }
        }
        // All events of one response are whole revisions: each one a complete update.
        publish(client, publisher, &view);
    }
}

/// Opens the watch stream on the preferred endpoint, or the next one that answers.
fn open(client: &Client, body: &[u8]) -> Result<LineStream, RegistryError> {
    let first = client.preferred.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    for i in 0..client.endpoints.len() {
        let index = (first + i) % client.endpoints.len();
        let endpoint = &client.endpoints[index];
        let deadline = Instant::now() + EXCHANGE_TIMEOUT;
        match LineStream::open(endpoint, "/v3/watch", body, deadline) {
            Ok(stream) => return Ok(stream),
            Err(ExchangeError::Status { code, body }) => {
                let message = error_message(&body)
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                failures.push(format!("{endpoint}: HTTP {code}: {message}"));
            }
            Err(
                ExchangeError::NotSent(detail)
                | ExchangeError::NoAnswer(detail)
                | ExchangeError::Malformed(detail),
            ) => failures.push(format!("{endpoint}: {detail}")),
        }
    }
    Err(RegistryError::EtcdUnreachable {
        url: client.url.clone(),
        detail: failures.join("; "),
    })
}

#[derive(Deserialize)]
struct WatchMessage {
    result: Option<WatchResult>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct WatchResult {
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<WatchEvent>,
}

#[derive(Deserialize)]
struct WatchEvent {
    /// "DELETE", or left out for a put.
    #[serde(rename = "type", default)]
    kind: String,
    kv: KeyValue,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::etcd::EtcdRegistry;
    use crate::registry::Registry;
    use freeflow_testbed::etcd::EtcdServer;

    /// A watch asked for revisions etcd compacted away ends as "behind" (start over from a
    /// full read), and one from a live revision sees the next change.
    #[test]
    fn compacted_start_means_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let server = EtcdServer::start(dir.path());
        let (endpoints, prefix) =
            super::super::parse_target("", &format!("//{}/w", server.endpoint())).unwrap();
        let registry = EtcdRegistry::new(endpoints, &prefix);
        for n in 1..=3u8 {
            registry
                .update(&mut |s| {
                    s.upsert_host(crate::registry::HostRecord {
                        host_ip: std::net::Ipv4Addr::new(192, 168, 7, n),
                        peer_port: 7000,
                        vnet_prefix: "10.32.0.0/24".parse().unwrap(),
                        dir: "/freeflow".into(),
                    });
                    Ok(())
                })
                .unwrap();
        }
        let client = &registry.client;
        let (_, revision) = client.read_at().unwrap();
        let _: serde_json::Value = client
            .call(
                "/v3/kv/compaction",
                &json!({ "revision": revision.to_string() }),
                Retry::Safe,
            )
            .unwrap();
        let (_watch, publisher) = RegistryWatch::new().unwrap();
        let mut delay = RECONNECT_MAX;
        let ended = watch_from(client, &publisher, View::default(), 2, &mut delay).unwrap();
        assert!(matches!(ended, Ended::Behind));

        // From the live revision: the next update arrives as events, and the created watch
        // resets the back-off.
        let (watch, publisher) = RegistryWatch::new().unwrap();
        let follower = {
            let client = Arc::clone(&registry.client);
            thread::spawn(move || {
                let mut delay = RECONNECT_MAX;
                let ended = watch_from(
                    &client,
                    &publisher,
                    View::default(),
                    revision + 1,
                    &mut delay,
                );
                (matches!(ended, Ok(Ended::Stopped)), delay)
            })
        };
        registry
            .update(&mut |s| {
                s.remove_host(std::net::Ipv4Addr::new(192, 168, 7, 1))
                    .map_or(Ok(()), |_| Ok(()))
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = None;
        while seen.is_none() && Instant::now() < deadline {
            seen = watch.take();
            thread::sleep(Duration::from_millis(50));
        }
        // Only the keys changed since the watch's start: the generation (the host's key was
        // deleted, which the empty view had not held).
        let snapshot = seen.expect("no event within 30 s").unwrap();
        assert_eq!(snapshot.generation, 4);
        assert!(snapshot.hosts.is_empty(), "{snapshot:?}");
        drop(watch);
        let (stopped, delay) = follower.join().unwrap();
        assert!(stopped);
        assert_eq!(delay, RECONNECT_FIRST);
    }
}
