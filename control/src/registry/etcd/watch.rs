//! The etcd registry followed as it changes: one thread per [`RegistryWatch`] reads everything
//! under the prefix once, then opens one watch (`POST /v3/watch`, a stream of JSON lines) from
//! the next revision and applies its events to the keys it holds: no read per change.
//!
//! It starts over from a full read when the watch is cancelled because etcd compacted the
//! revisions it still needed, when the connection ends (etcd restarted, an endpoint went away),
//! and when a probe finds the keys it holds differ from etcd's: after [`SILENCE_PROBE`] without
//! a message it compares its count and newest mod revision with a fingerprint read, which
//! catches a connection that died without a word. Failed starts wait [`RECONNECT_FIRST`],
//! doubling up to [`RECONNECT_MAX`].

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
            Ok(Ended::Stopped) => return,
            // Nothing is wrong with etcd: catch up at once.
            Ok(Ended::Behind) => continue,
            Ok(Ended::Lost) => {}
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
    publisher.publish(view.snapshot(client));
    let request = json!({ "create_request": {
        "key": start, "range_end": end, "start_revision": (revision + 1).to_string(),
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
        publisher.publish(view.snapshot(client));
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
