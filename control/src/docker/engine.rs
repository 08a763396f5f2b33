//! What the daemon reads from the Docker engine, parsed defensively from its JSON: a
//! container as `GET /containers/{id}/json` describes it, the ids of `GET /containers/json`,
//! and the container events of `GET /events`. Fields the engine leaves out, or sends with the
//! wrong type, make the container "not ours" or the event malformed, never a panic.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::Value;

/// Most networks, mounts and labels read from one container (more are ignored).
const MAX_ITEMS: usize = 256;

/// A container id: 64 lowercase hex digits, as the engine makes them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId(String);

impl ContainerId {
    /// `s` if it is a full container id.
    pub fn parse(s: &str) -> Option<ContainerId> {
        (s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| ContainerId(s.to_owned()))
    }

    /// The first 12 digits, as `docker ps` shows them.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    /// The full id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the daemon needs of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    /// The engine's id.
    pub id: ContainerId,
    /// Its name without the leading `/` (may be empty).
    pub name: String,
    /// `State.Running`.
    pub running: bool,
    /// `State.Pid` (0 when not running).
    pub pid: u32,
    /// `NetworkSettings.SandboxKey`: its network namespace file, as the engine sees it.
    pub sandbox_key: Option<PathBuf>,
    /// IPv4 addresses of `NetworkSettings.Networks`, by network name.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// `Mounts`.
    pub mounts: Vec<Mount>,
    /// `Config.Labels`.
    pub labels: BTreeMap<String, String>,
}

/// One of a container's mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Its source on the host.
    pub source: PathBuf,
    /// Where the container sees it.
    pub destination: PathBuf,
    /// `RW`: the container may write it (also when the engine does not say).
    pub writable: bool,
}

/// Why the engine's JSON could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not JSON at all.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON, but a field that must be there is missing or has the wrong type.
    #[error("{0}")]
    Shape(String),
}

fn parse_json(bytes: &[u8]) -> Result<Value, ParseError> {
    serde_json::from_slice(bytes).map_err(|e| ParseError::NotJson(e.to_string()))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Parses the answer of `GET /containers/{id}/json`.
pub fn parse_inspect(bytes: &[u8]) -> Result<ContainerView, ParseError> {
    let v = parse_json(bytes)?;
    let id = str_at(&v, "/Id")
        .and_then(ContainerId::parse)
        .ok_or_else(|| ParseError::Shape("no valid Id".into()))?;
    let name = str_at(&v, "/Name")
        .unwrap_or("")
        .trim_start_matches('/')
        .to_owned();
    let running = v
        .pointer("/State/Running")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let pid = v
        .pointer("/State/Pid")
        .and_then(Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    let sandbox_key = str_at(&v, "/NetworkSettings/SandboxKey")
        .filter(|s| s.starts_with('/'))
        .map(PathBuf::from);
    let mut addresses = BTreeMap::new();
    if let Some(networks) = v
        .pointer("/NetworkSettings/Networks")
        .and_then(Value::as_object)
    {
        for (net, settings) in networks.iter().take(MAX_ITEMS) {
            if let Some(ip) = str_at(settings, "/IPAddress").and_then(|s| s.parse().ok()) {
                addresses.insert(net.clone(), ip);
            }
        }
    }
    let mut mounts = Vec::new();
    if let Some(list) = v.pointer("/Mounts").and_then(Value::as_array) {
        for m in list.iter().take(MAX_ITEMS) {
            if let (Some(src), Some(dst)) = (str_at(m, "/Source"), str_at(m, "/Destination")) {
                mounts.push(Mount {
                    source: PathBuf::from(src),
                    destination: PathBuf::from(dst),
                    writable: m.pointer("/RW").and_then(Value::as_bool).unwrap_or(true),
                });
            }
        }
    }
    let mut labels = BTreeMap::new();
    if let Some(map) = v.pointer("/Config/Labels").and_then(Value::as_object) {
        for (k, val) in map.iter().take(MAX_ITEMS) {
            if let Some(s) = val.as_str() {
                labels.insert(k.clone(), s.to_owned());
            }
        }
    }
    Ok(ContainerView {
        id,
        name,
        running,
        pid,
        sandbox_key,
        addresses,
        mounts,
        labels,
    })
}

/// Parses the answer of `GET /containers/json`: the ids of the running containers (entries
/// without a valid id are left out).
pub fn parse_list(bytes: &[u8]) -> Result<Vec<ContainerId>, ParseError> {
    let v = parse_json(bytes)?;
    let list = v
        .as_array()
        .ok_or_else(|| ParseError::Shape("the container list is not an array".into()))?;
    Ok(list
        .iter()
        .filter_map(|c| str_at(c, "/Id").and_then(ContainerId::parse))
        .collect())
}

/// A container event that changes what is registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The container started (or was unpaused into running).
    Start(ContainerId),
    /// The container's process ended (stop, kill, exit).
    Die(ContainerId),
    /// Any other event (ignored).
    Other,
}

/// Parses one line of `GET /events`.
pub fn parse_event(bytes: &[u8]) -> Result<Event, ParseError> {
    let v = parse_json(bytes)?;
    if !v.is_object() {
        return Err(ParseError::Shape("an event that is not an object".into()));
    }
    let kind = str_at(&v, "/Type").unwrap_or("container");
    if kind != "container" {
        return Ok(Event::Other);
    }
    let action = str_at(&v, "/Action")
        .or_else(|| str_at(&v, "/status"))
        .ok_or_else(|| ParseError::Shape("an event without Action".into()))?;
    let id = || {
        str_at(&v, "/Actor/ID")
            .or_else(|| str_at(&v, "/id"))
            .and_then(ContainerId::parse)
            .ok_or_else(|| ParseError::Shape(format!("a {action:?} event without a valid id")))
    };
    Ok(match action {
        "start" => Event::Start(id()?),
        "die" => Event::Die(id()?),
        _ => Event::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn reads_what_docker_inspect_says() {
        let body = json!({
            "Id": ID, "Name": "/iperf",
            "State": {"Running": true, "Pid": 4242},
            "Mounts": [{"Type": "bind", "Source": "/srv/ff", "Destination": "/freeflow", "RW": false},
                {"Source": "/x", "Destination": "/y"}],
            "Config": {"Labels": {"freeflow.tenant": "blue", "n": 3}},
            "NetworkSettings": {"SandboxKey": "/var/run/docker/netns/abc",
                "Networks": {"ffnet": {"IPAddress": "10.32.1.2"}, "none": {"IPAddress": ""}}}
        });
        let c = parse_inspect(body.to_string().as_bytes()).unwrap();
        assert_eq!(c.name, "iperf");
        assert_eq!(c.id.short(), "0123456789ab");
        assert!(c.running);
        assert_eq!(c.pid, 4242);
        assert_eq!(
            c.sandbox_key,
            Some(PathBuf::from("/var/run/docker/netns/abc"))
        );
        assert_eq!(c.addresses.len(), 1);
        assert_eq!(c.addresses["ffnet"], Ipv4Addr::new(10, 32, 1, 2));
        assert_eq!(c.mounts[0].destination, PathBuf::from("/freeflow"));
        assert!(!c.mounts[0].writable);
        assert!(
            c.mounts[1].writable,
            "a mount the engine does not say is read-only"
        );
        assert_eq!(c.labels.len(), 1);
    }

    #[test]
    fn hostile_json_is_an_error_or_ignored() {
        for bad in [
            &b"nonsense"[..],
            b"[]",
            b"{\"Id\": 5}",
            b"{\"Id\": \"../../etc\"}",
        ] {
            assert!(
                parse_inspect(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let odd = json!({"Id": ID, "State": "running", "Mounts": {"a": 1},
            "NetworkSettings": {"SandboxKey": "relative/path", "Networks": [1, 2]}});
        let c = parse_inspect(odd.to_string().as_bytes()).unwrap();
        assert!(!c.running && c.sandbox_key.is_none() && c.addresses.is_empty());
        assert!(parse_event(b"{\"Type\":\"container\",\"Action\":\"start\"}").is_err());
        assert!(parse_event(b"17").is_err());
        assert_eq!(
            parse_event(b"{\"Type\":\"network\",\"Action\":\"connect\"}"),
            Ok(Event::Other)
        );
        let die = json!({"Type": "container", "Action": "die", "Actor": {"ID": ID}});
        assert!(matches!(
            parse_event(die.to_string().as_bytes()),
            Ok(Event::Die(_))
        ));
        let list = json!([{"Id": ID}, {"Id": 3}, "x"]);
        assert_eq!(parse_list(list.to_string().as_bytes()).unwrap().len(), 1);
    }
}
