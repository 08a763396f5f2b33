//! What the CNI specification (1.0 and 1.1, with the 0.3/0.4 result format) fixes for a chained
//! plugin, and freeflow's choices on top of it: the environment a runtime sets, the network
//! configuration on stdin (freeflow's keys included), the error object and its codes, the
//! supported versions, the container's IPv4 address in `prevResult`, and the registry name a
//! container gets.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::registry;

/// The versions whose configuration and result formats this plugin reads, oldest first. 0.3.0
/// is the first with `prevResult`'s `ips` list; CHECK needs 0.4.0, GC and STATUS 1.1.0.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version: what VERSION answers when asked with no usable version.
pub const NEWEST_VERSION: &str = "1.1.0";

/// The default `freeflowDir`: the runtime directory `freeflow up` uses without `--dir`.
pub const DEFAULT_FREEFLOW_DIR: &str = "/freeflow";

/// The default `tenantFromArgs`: the CNI_ARGS key Kubernetes sets to the pod's namespace.
pub const DEFAULT_TENANT_ARG: &str = "K8S_POD_NAMESPACE";

/// The tenant of a container that neither the configuration nor CNI_ARGS names one for.
pub const DEFAULT_TENANT: &str = "default";

/// Error codes: 1 to 99 are the specification's, 100 and up freeflow's own.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Freeflow is not set up for the configured directory (no `freeflow up` ever ran there).
    pub const NOT_SET_UP: u32 = 100;
    /// The container's address lies outside the host's overlay prefix (VNET_PREFIX).
    pub const OUTSIDE_OVERLAY: u32 = 101;
    /// The registry refused the change (a name, address or namespace already taken) or failed.
    pub const REGISTRY: u32 = 102;
    /// Freeflow refused the container (its namespace, a name).
    pub const REJECTED: u32 = 103;
    /// The daemon does not serve the container (it skips it; CHECK: the registration differs).
    pub const NOT_SERVED: u32 = 104;
}

/// A CNI error: printed on stdout as the specification's error object, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    /// One of [`code`].
    pub code: u32,
    /// A short summary.
    pub msg: String,
    /// The whole story: what was wrong and what to do.
    pub details: String,
}

impl CniError {
    /// An error with `code`, summary `msg` and `details`.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object, for a runtime that asked in `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The CNI operation a runtime asks for (CNI_COMMAND).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach: register the container.
    Add,
    /// Detach: unregister it.
    Del,
    /// Verify the registration.
    Check,
    /// List the supported versions.
    Version,
    /// Forget attachments the runtime no longer knows (1.1).
    Gc,
    /// Say whether ADD can succeed now (1.1).
    Status,
}

impl Command {
    /// The command CNI_COMMAND names, exactly as the specification spells it.
    pub fn parse(value: &str) -> Option<Command> {
        Some(match value {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

/// Which source of the tenant wins when both name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantPrecedence {
    /// CNI_ARGS (`tenantFromArgs`, e.g. the Kubernetes namespace), then `tenant`.
    #[default]
    Args,
    /// `tenant`, then CNI_ARGS.
    Config,
}

/// The network configuration on stdin: the specification's keys this plugin reads, and
/// freeflow's own. Other keys (`runtimeConfig`, `capabilities`, `args`...) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The version the runtime speaks.
    pub cni_version: String,
    /// The network's name.
    #[serde(default)]
    pub name: String,
    /// The plugin's name (`freeflow-cni`).
    #[serde(default, rename = "type")]
    pub plugin: String,
    /// The result of the plugins before this one in the chain.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The tenant of the containers of this network (see [`TenantPrecedence`]).
    #[serde(default)]
    pub tenant: Option<String>,
    /// The CNI_ARGS key that names the tenant; empty: CNI_ARGS never does.
    #[serde(default)]
    pub tenant_from_args: Option<String>,
    /// Which of the two wins.
    #[serde(default)]
    pub tenant_precedence: TenantPrecedence,
    /// Freeflow's runtime directory on this host (`freeflow up --dir`).
    #[serde(default)]
    pub freeflow_dir: Option<PathBuf>,
    /// Freeflow's state directory, when `up` was given a `--state-dir` it did not record.
    #[serde(default)]
    pub freeflow_state_dir: Option<PathBuf>,
}

impl NetConf {
    /// Parses the configuration and checks that its version is one this plugin speaks.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                "cannot decode the network configuration",
                format!("stdin is not a CNI network configuration: {e}"),
            )
        })?;
        check_version(&conf.cni_version)?;
        Ok(conf)
    }

    /// The runtime directory.
    pub fn freeflow_dir(&self) -> PathBuf {
        self.freeflow_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_FREEFLOW_DIR))
    }

    /// The tenant for a container whose CNI_ARGS are `args`.
    pub fn tenant(&self, args: &HashMap<String, String>) -> String {
        let key = self
            .tenant_from_args
            .as_deref()
            .unwrap_or(DEFAULT_TENANT_ARG);
        let from_args = (!key.is_empty())
            .then(|| args.get(key).filter(|v| !v.is_empty()))
            .flatten();
        let from_config = self.tenant.as_ref().filter(|v| !v.is_empty());
        let chosen = match self.tenant_precedence {
            TenantPrecedence::Args => from_args.or(from_config),
            TenantPrecedence::Config => from_config.or(from_args),
        };
        chosen.cloned().unwrap_or_else(|| DEFAULT_TENANT.to_owned())
    }
}

/// Fails with code 1 unless `version` is one of [`SUPPORTED_VERSIONS`].
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        "incompatible CNI version",
        format!(
            "the configuration's cniVersion is {version:?}; freeflow-cni supports {}",
            SUPPORTED_VERSIONS.join(", ")
        ),
    ))
}

/// Whether `version` is at least `minimum` (both of [`SUPPORTED_VERSIONS`]).
pub fn version_at_least(version: &str, minimum: &str) -> bool {
    let index = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
    matches!((index(version), index(minimum)), (Some(v), Some(m)) if v >= m)
}

/// CNI_ARGS (`KEY=VALUE;KEY=VALUE`) as a map; pieces without `=` are ignored.
pub fn parse_cni_args(value: &str) -> HashMap<String, String> {
    value
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The IPv4 addresses `prevResult` gives the container's interface `ifname`, in order.
///
/// An address whose `interface` index names an interface of another name, or one outside the
/// container (no `sandbox`), is left out; addresses without an `interface` count as the
/// container's. IPv6 addresses are left out (the overlay is IPv4).
pub fn container_ipv4s(prev_result: &Value, ifname: &str) -> Result<Vec<Ipv4Addr>, CniError> {
    let bad =
        |details: String| CniError::new(code::DECODING_FAILURE, "cannot read prevResult", details);
    let interfaces = prev_result
        .get("interfaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let ips = match prev_result.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(ips)) => ips,
        Some(other) => return Err(bad(format!("prevResult.ips is not a list: {other}"))),
    };
    let mut found = Vec::new();
    for ip in ips {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("an entry of prevResult.ips has no address: {ip}")))?;
        if address.contains(':') {
            continue;
        }
        let net: Ipv4Net = address
            .parse()
            .map_err(|e| bad(format!("prevResult address {address:?}: {e}")))?;
        if let Some(index) = ip.get("interface").and_then(Value::as_u64) {
            let interface = usize::try_from(index).ok().and_then(|i| interfaces.get(i));
            let in_container = interface.is_some_and(|i| {
                i.get("name").and_then(Value::as_str) == Some(ifname)
                    && i.get("sandbox")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
            });
            if !in_container {
                continue;
            }
        }
        found.push(net.addr());
    }
    Ok(found)
}

/// The registry name of the attachment (`container_id`, `ifname`): `cni-ID.IFNAME` when that
/// is a valid container name (at most 63 of `A-Z a-z 0-9 _ . -`), else `cni-` + the first 30
/// valid characters of the ID + `-` + 16 hex digits of a hash of both (a Kubernetes sandbox ID
/// has 64 characters). The same inputs always give the same name, so DEL finds what ADD made.
pub fn container_name(container_id: &str, ifname: &str) -> String {
    let plain = format!("cni-{container_id}.{ifname}");
    if registry::is_valid_name(&plain) {
        return plain;
    }
    let prefix: String = container_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(30)
        .collect();
    format!("cni-{prefix}-{:016x}", fnv1a(&[container_id, ifname]))
}

/// FNV-1a (64 bit) of the parts, each followed by a 0 byte: stable across builds and machines,
/// unlike std's hasher, which is what a name that must be found again needs.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_stable_and_distinct() {
        assert_eq!(container_name("abc123", "eth0"), "cni-abc123.eth0");
        let long = "f".repeat(64);
        let a = container_name(&long, "eth0");
        let b = container_name(&long, "eth1");
        assert!(
            registry::is_valid_name(&a) && registry::is_valid_name(&b),
            "{a} {b}"
        );
        assert_ne!(a, b);
        assert_eq!(a, container_name(&long, "eth0"));
        assert!(a.starts_with(&format!("cni-{}-", "f".repeat(30))), "{a}");
        let odd = container_name("id", "if@x");
        assert!(registry::is_valid_name(&odd), "{odd}");
    }

    #[test]
    fn tenant_precedence_is_configurable() {
        let args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1");
        let conf = |extra: Value| {
            let mut v = json!({"cniVersion": "1.0.0", "name": "n", "type": "freeflow-cni"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            NetConf::parse(v.to_string().as_bytes()).unwrap()
        };
        assert_eq!(conf(json!({})).tenant(&args), "shop");
        assert_eq!(conf(json!({})).tenant(&HashMap::new()), DEFAULT_TENANT);
        assert_eq!(conf(json!({"tenant": "blue"})).tenant(&args), "shop");
        assert_eq!(
            conf(json!({"tenant": "blue", "tenantPrecedence": "config"})).tenant(&args),
            "blue"
        );
        assert_eq!(
            conf(json!({"tenant": "blue", "tenantFromArgs": ""})).tenant(&args),
            "blue"
        );
        assert_eq!(
            conf(json!({"tenantFromArgs": "K8S_POD_NAME"})).tenant(&args),
            "web-1"
        );
    }

    #[test]
    fn versions_are_checked() {
        assert!(NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).is_ok());
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert_eq!(
            NetConf::parse(b"{").unwrap_err().code,
            code::DECODING_FAILURE
        );
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }

    #[test]
    fn picks_the_container_interfaces_ipv4() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/run/netns/x"}
            ],
            "ips": [
                {"address": "10.1.0.1/24", "interface": 0},
                {"address": "fd00::5/64", "interface": 1},
                {"address": "10.33.0.5/24", "gateway": "10.33.0.1", "interface": 1},
                {"address": "10.34.0.5/24"}
            ]
        });
        assert_eq!(
            container_ipv4s(&prev, "eth0").unwrap(),
            vec![
                "10.33.0.5".parse::<Ipv4Addr>().unwrap(),
                "10.34.0.5".parse().unwrap()
            ]
        );
        assert!(container_ipv4s(&json!({"ips": [{"address": "x"}]}), "eth0").is_err());
        assert!(container_ipv4s(&json!({}), "eth0").unwrap().is_empty());
    }
}
