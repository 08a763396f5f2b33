//! The naming scheme: cluster tags, the names of host, switch and container namespaces, host
//! link addresses and container MAC addresses, and the validation of tags and container names.
//! Every namespace of a cluster is named `ff-<tag>-...`, which is what lets a teardown find (and
//! only find) the namespaces of one cluster.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::TopologyError;
use crate::spec::{MAX_CONTAINER_NAME_LEN, MAX_HOSTS, MAX_TAG_LEN, NAME_PREFIX, NETNS_DIR};

/// Validate a cluster tag: 1 to 8 characters out of `[a-z0-9]`.
pub fn validate_tag(tag: &str) -> Result<(), TopologyError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(TopologyError::InvalidSpec(format!(
            "tag {tag:?} must be 1 to {MAX_TAG_LEN} characters long"
        )));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(TopologyError::InvalidSpec(format!(
            "tag {tag:?} may only contain a-z and 0-9"
        )));
    }
    Ok(())
}

/// Validate a container name: 1 to 32 characters out of `[A-Za-z0-9_-]`, starting with a letter
/// or digit.
pub fn validate_container_name(name: &str) -> Result<(), TopologyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CONTAINER_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(TopologyError::InvalidSpec(format!(
            "container name {name:?} must be 1 to {MAX_CONTAINER_NAME_LEN} characters of \
             A-Z a-z 0-9 - _ starting with a letter or digit"
        )))
    }
}

/// A tag that no other cluster is using with overwhelming probability: up to 3 characters of
/// `prefix` (lowercased, other characters dropped) followed by random base-36 characters, 8 in all.
/// The randomness comes from std's per-process hash keys mixed with pid, time and a counter, so it
/// also differs between processes in different PID namespaces.
pub fn fresh_tag(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tag: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .take(3)
        .collect();
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    let mut bits = hasher.finish();
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    while tag.len() < MAX_TAG_LEN {
        tag.push(char::from(DIGITS[(bits % 36) as usize]));
        bits /= 36;
    }
    tag
}

/// Name of host `index`'s namespace.
pub fn host_netns(tag: &str, index: usize) -> String {
    format!("{NAME_PREFIX}{tag}-h{index}")
}

/// Name of the switch namespace (clusters with other than two hosts).
pub fn switch_netns(tag: &str) -> String {
    format!("{NAME_PREFIX}{tag}-sw")
}

/// Name of a container's namespace.
pub fn container_netns(tag: &str, name: &str) -> String {
    format!("{NAME_PREFIX}{tag}-c-{name}")
}

/// `/run/netns/<name>`, the path `ip netns add` binds a namespace to.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// Address of host `index` on the physical link: 192.168.1.(index+1).
pub fn host_ip(index: usize) -> Ipv4Addr {
    assert!(index < MAX_HOSTS, "host index {index} out of range");
    // The assert bounds index + 1 by 253.
    Ipv4Addr::new(192, 168, 1, (index + 1) as u8)
}

/// The MAC address of the container with overlay address `ip`: `02:42:` followed by the four
/// address bytes, Docker's convention. Deriving it from the address keeps the neighbour caches of
/// other containers right when a container is removed and added again with the same address.
pub fn container_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The tag of a cluster namespace name `ff-<tag>-...`, if it is one.
pub(crate) fn tag_of(netns: &str) -> Option<&str> {
    let rest = netns.strip_prefix(NAME_PREFIX)?;
    let (tag, _) = rest.split_once('-')?;
    validate_tag(tag).ok().map(|()| tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert!(validate_tag("a").is_ok());
        assert!(validate_tag("abc12345").is_ok());
        for bad in ["", "abc123456", "A", "a-b", "a_b", "é", "a b"] {
            assert!(validate_tag(bad).is_err(), "{bad:?} accepted");
        }
        for _ in 0..100 {
            let t = fresh_tag("Te-St");
            assert!(validate_tag(&t).is_ok(), "{t}");
            assert!(t.starts_with("tes"), "{t}");
        }
        assert_ne!(fresh_tag("x"), fresh_tag("x"));
    }

    #[test]
    fn names() {
        assert_eq!(host_netns("t1", 0), "ff-t1-h0");
        assert_eq!(container_netns("t1", "web-1"), "ff-t1-c-web-1");
        assert_eq!(tag_of("ff-t1-c-web-1"), Some("t1"));
        assert_eq!(tag_of("ff-t1-sw"), Some("t1"));
        assert_eq!(tag_of("ff-T1-sw"), None);
        assert_eq!(tag_of("other"), None);
        assert_eq!(host_ip(0), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(host_ip(252), Ipv4Addr::new(192, 168, 1, 253));
        assert!(validate_container_name("a").is_ok());
        assert!(validate_container_name("-a").is_err());
        assert!(validate_container_name("a/b").is_err());
        assert!(validate_container_name(&"a".repeat(33)).is_err());
    }
}
