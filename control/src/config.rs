//! The directories of one Freeflow host and the settings `freeflow up` records (`config.json`),
//! so that later commands need nothing but the runtime directory. Two directories, split by
//! who may see them (see `freeflow_proto::paths`, which derives STATE from DIR):
//!
//! ```text
//! DIR (--dir, $FREEFLOW_DIR, /freeflow): what containers see, mounted read-only
//!   DIR/router.sock             the attach socket (freeflow-router)
//!   DIR/libfsocket.so           the TCP-mode shim, mode 0444, installed by freeflow up
//!   DIR/verbs/libibverbs.so.1   the verbs shim and its provider stand-ins, likewise
//! STATE (--state-dir, $FREEFLOW_STATE_DIR, /run/freeflow/state/<DIR escaped>): root only, 0700
//!   config.json                 host ip, overlay prefix, registry URL, cores, peer port
//!   registry.json               the default file registry (unless --registry points elsewhere)
//!   daemon.lock                 flock held by the running daemon for its whole life
//!   freeflow.pid                the daemon's pid (written under the lock, removed on exit)
//!   daemon-status.json          the daemon's counters: router pid, restarts, last exit, push
//!   freeflow.log                the daemon's log (background mode; rotated to freeflow.log.1)
//!   router.pid                  the supervised router's pid (kept if the daemon dies: adoption)
//!   router.log                  the router's stderr, appended across restarts
//!   router.lock, router.ctl     owned by freeflow-router
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use freeflow_proto::paths;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Runtime directory used when neither `--dir` nor `$FREEFLOW_DIR` is given.
pub const DEFAULT_DIR: &str = freeflow_proto::DEFAULT_DIR;
/// Port routers use for router-to-router connections unless `--peer-port` says otherwise.
pub const DEFAULT_PEER_PORT: u16 = 7471;
/// Version of the `config.json` layout this build writes and reads.
pub const CONFIG_VERSION: u32 = 1;

/// Errors about the runtime directory and its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `freeflow up` never ran for this directory.
    #[error(
        "{} has no config.json (in its state directory {}): run `freeflow up --dir {}` first \
         (or pass the right --dir / $FREEFLOW_DIR, --state-dir / $FREEFLOW_STATE_DIR)",
        dir.display(),
        state.display(),
        dir.display()
    )]
    Missing {
        /// The runtime directory.
        dir: PathBuf,
        /// Its state directory.
        state: PathBuf,
    },
    /// A file in the runtime directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// `config.json` exists but cannot be used.
    #[error(
        "{} is corrupt ({detail}); run `freeflow up` again with all options to rewrite it",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Control files of an earlier version in DIR cannot be moved out (see `crate::legacy`).
    #[error("{0}")]
    Legacy(String),
    /// `--host-ip-prefix` matched no address or several.
    #[error("{0}")]
    HostIp(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The paths of one runtime directory and its state directory. Both are always absolute, so
/// they can be handed to the daemon and the router whatever their working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    path: PathBuf,
    state: PathBuf,
}

impl RuntimeDir {
    /// The runtime directory at `path`, made absolute against the current directory, with the
    /// state directory `freeflow_proto::paths::state_dir` derives for it. Touches nothing on
    /// disk.
    pub fn new(path: &Path) -> Result<RuntimeDir, ConfigError> {
        RuntimeDir::with_state(path, None)
    }

    /// [`RuntimeDir::new`] with the state directory `state` (`--state-dir`) if given.
    pub fn with_state(path: &Path, state: Option<&Path>) -> Result<RuntimeDir, ConfigError> {
        if path.as_os_str().is_empty() {
            return Err(ConfigError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "empty directory name"),
            });
        }
        let path = std::path::absolute(path).map_err(io_error(path))?;
        let state = match state {
            Some(state) => paths::state_dir_with(&path, Some(state)),
            None => paths::state_dir(&path),
        };
        Ok(RuntimeDir { path, state })
    }

    /// Creates the directory (mode 0755: containers read the shims and reach `router.sock`
    /// through it) unless it exists, and the state directory (0700, see
    /// [`RuntimeDir::create_state`]).
    pub fn create(&self) -> Result<(), ConfigError> {
        if !self.path.is_dir() {
            fs::create_dir_all(&self.path).map_err(io_error(&self.path))?;
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o755))
                .map_err(io_error(&self.path))?;
        }
        self.create_state()
    }

    /// Creates the state directory, mode 0700 with 0700 parents. One that is not the derived
    /// default is recorded as a symlink at the default place, so that later commands that get
    /// only `--dir` find it.
    pub fn create_state(&self) -> Result<(), ConfigError> {
        paths::create_state_dir(&self.state).map_err(io_error(&self.state))?;
        let default = paths::default_state_dir(&self.path);
        if default == self.state {
            return Ok(());
        }
        match fs::symlink_metadata(&default) {
            Ok(meta) if !meta.file_type().is_symlink() => {
                return Err(ConfigError::Io {
                    path: default.clone(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} already has its state here; move it to {} or run without \
                             --state-dir",
                            self.path.display(),
                            self.state.display()
                        ),
                    ),
                })
            }
            _ => {}
        }
        if let Some(parent) = default.parent() {
            paths::create_state_dir(parent).map_err(io_error(parent))?;
        }
        // Replaced by rename, so that a reader sees the old link or the new one.
        let tmp = default.with_extension(format!("link.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&self.state, &tmp)
            .and_then(|()| fs::rename(&tmp, &default))
            .map_err(io_error(&default))
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory: the control plane, root only, never mounted into containers.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.state.join("config.json")
    }
    /// `daemon.lock`, held (flock) by the running daemon.
    pub fn daemon_lock(&self) -> PathBuf {
        self.state.join("daemon.lock")
    }
    /// `freeflow.pid`, the daemon's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.state.join("freeflow.pid")
    }
    /// `daemon-status.json`, the daemon's counters.
    pub fn status_file(&self) -> PathBuf {
        self.state.join("daemon-status.json")
    }
    /// `freeflow.log`, the background daemon's stdout and stderr.
    pub fn log(&self) -> PathBuf {
        self.state.join("freeflow.log")
    }
    /// `router.log`, the router's stderr.
    pub fn router_log(&self) -> PathBuf {
        self.state.join(paths::ROUTER_LOG)
    }
    /// `router.pid`, the pid of the router the daemon supervises; left behind by a daemon that
    /// died, so that the next one can adopt that router.
    pub fn router_pid_file(&self) -> PathBuf {
        self.state.join("router.pid")
    }
    /// `router.lock`, held by a running router.
    pub fn router_lock(&self) -> PathBuf {
        self.state.join(paths::ROUTER_LOCK)
    }
    /// `router.sock`, where shims attach (in DIR).
    pub fn router_socket(&self) -> PathBuf {
        self.path.join(freeflow_proto::ROUTER_SOCKET)
    }
    /// `router.ctl`, the router's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.state.join(freeflow_proto::CONTROL_SOCKET)
    }
    /// Where the TCP-mode shim is installed (`LD_PRELOAD=DIR/libfsocket.so`).
    pub fn socket_shim(&self) -> PathBuf {
        self.path.join("libfsocket.so")
    }
    /// Where the verbs shim is installed (`LD_LIBRARY_PATH=DIR/verbs`).
    pub fn verbs_shim(&self) -> PathBuf {
        self.path.join("verbs").join("libibverbs.so.1")
    }
    /// The registry used when `--registry` is not given.
    pub fn default_registry_url(&self) -> String {
        format!("file:{}", self.state.join("registry.json").display())
    }
}

/// What `freeflow up` recorded for this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Layout version, [`CONFIG_VERSION`].
    pub version: u32,
    /// This host's address on the host network; the registry's key for it.
    pub host_ip: Ipv4Addr,
    /// Overlay addresses Freeflow accelerates; container addresses must lie inside.
    pub vnet_prefix: Ipv4Net,
    /// Registry URL (normalised: `file:/absolute/path`).
    pub registry: String,
    /// Cores handed to the router (`--cores`); `None` lets the router choose.
    pub cores: Option<String>,
    /// RDMA device handed to the router (`--rdma-device`); `None`: the software engine only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma_device: Option<String>,
    /// Router-to-router port, recorded in the host record.
    pub peer_port: u16,
    /// Where the daemon serves Prometheus metrics (`--metrics`); `None`: it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// The Docker engine socket the daemon watches to register containers (`--docker`);
    /// `None`: it does not watch Docker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<PathBuf>,
}

impl Config {
    /// Reads `STATE/config.json`.
    pub fn load(dir: &RuntimeDir) -> Result<Config, ConfigError> {
        let path = dir.config();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ConfigError::Missing {
                    dir: dir.path().to_path_buf(),
                    state: dir.state().to_path_buf(),
                })
            }
            Err(source) => return Err(ConfigError::Io { path, source }),
        };
        let config: Config = serde_json::from_slice(&bytes).map_err(|e| ConfigError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if config.version != CONFIG_VERSION {
            return Err(ConfigError::Corrupt {
                path,
                detail: format!(
                    "version {} but this build reads version {CONFIG_VERSION}",
                    config.version
                ),
            });
        }
        Ok(config)
    }

    /// Reads `STATE/config.json`.if there is one.
    pub fn load_if_present(dir: &RuntimeDir) -> Result<Option<Config>, ConfigError> {
        match Config::load(dir) {
            Ok(config) => Ok(Some(config)),
            Err(ConfigError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `STATE/config.json` atomically.
    pub fn save(&self, dir: &RuntimeDir) -> Result<(), ConfigError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| ConfigError::Io {
            path: dir.config(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(&dir.config(), &bytes, 0o644)
    }
}

/// Replaces `path` with `bytes`: temporary file in the same directory, fsync, rename. Readers
/// see the old or the new contents, never a mix; a file some process has mapped (a shim) keeps
/// its old pages.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ConfigError> {
    let file_name = path.file_name().ok_or_else(|| ConfigError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> io::Result<()> {
        let mut file: File = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(ConfigError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// The one IPv4 address of this network namespace's interfaces that lies inside `prefix`
/// (`ip -j -4 addr show`).
pub fn host_ip_in(prefix: Ipv4Net) -> Result<Ipv4Addr, ConfigError> {
    let output = Command::new("ip")
        .args(["-j", "-4", "addr", "show"])
        .output()
        .map_err(|e| {
            ConfigError::HostIp(format!(
                "cannot run `ip -j -4 addr show` to find this host's address in {prefix} (is \
                 iproute2 installed?): {e}; pass --host-ip instead"
            ))
        })?;
    if !output.status.success() {
        return Err(ConfigError::HostIp(format!(
            "`ip -j -4 addr show` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let addresses = parse_ip_addr_json(&output.stdout).map_err(|detail| {
        ConfigError::HostIp(format!(
            "cannot read the output of `ip -j -4 addr show`: {detail}"
        ))
    })?;
    pick_host_ip(&addresses, prefix).map_err(ConfigError::HostIp)
}

/// `(interface, address)` pairs from `ip -j -4 addr show`.
pub fn parse_ip_addr_json(json: &[u8]) -> Result<Vec<(String, Ipv4Addr)>, String> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let links = value.as_array().ok_or("not a JSON array")?;
    let mut out = Vec::new();
    for link in links {
        let ifname = link
            .get("ifname")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned();
        for addr in link
            .get("addr_info")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            if addr.get("family").and_then(|v| v.as_str()) != Some("inet") {
                continue;
            }
            if let Some(ip) = addr
                .get("local")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
            {
                out.push((ifname.clone(), ip));
            }
        }
    }
    Ok(out)
}

/// The single address inside `prefix`, or a message that lists what there is.
pub fn pick_host_ip(addresses: &[(String, Ipv4Addr)], prefix: Ipv4Net) -> Result<Ipv4Addr, String> {
    let matching: Vec<&(String, Ipv4Addr)> = addresses
        .iter()
        .filter(|(_, ip)| prefix.contains(ip))
        .collect();
    let list = |v: &[&(String, Ipv4Addr)]| {
        v.iter()
            .map(|(dev, ip)| format!("{ip} ({dev})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match matching.as_slice() {
        [(_, ip)] => Ok(*ip),
        [] => {
            let all: Vec<&(String, Ipv4Addr)> = addresses.iter().collect();
            Err(format!(
                "no interface of this network namespace has an address in the host prefix \
                 {prefix} (addresses here: {}); fix --host-ip-prefix / $HOST_IP_PREFIX or pass \
                 --host-ip",
                if all.is_empty() {
                    "none".to_owned()
                } else {
                    list(&all)
                }
            ))
        }
        several => Err(format!(
            "several addresses lie in the host prefix {prefix}: {}; use a narrower prefix or \
             pass --host-ip",
            list(several)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP_JSON: &str = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
        {"ifindex":4,"ifname":"eth0","addr_info":[{"family":"inet","local":"192.168.1.2","prefixlen":24},
        {"family":"inet","local":"10.0.0.7","prefixlen":8}]},{"ifindex":5,"ifname":"br0","addr_info":[]}]"#;

    #[test]
    fn picks_the_one_address_in_the_prefix() {
        let addrs = parse_ip_addr_json(IP_JSON.as_bytes()).unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(
            pick_host_ip(&addrs, "192.168.1.0/24".parse().unwrap()).unwrap(),
            Ipv4Addr::new(192, 168, 1, 2)
        );
        let none = pick_host_ip(&addrs, "172.16.0.0/12".parse().unwrap()).unwrap_err();
        assert!(none.contains("192.168.1.2 (eth0)"), "{none}");
        let several = pick_host_ip(&addrs, "0.0.0.0/0".parse().unwrap()).unwrap_err();
        assert!(several.contains("several"), "{several}");
        assert!(parse_ip_addr_json(b"{}").is_err());
    }

    #[test]
    fn control_files_are_in_the_state_directory_and_only_what_containers_need_in_dir() {
        let dir = RuntimeDir::new(Path::new("/srv/ff")).unwrap();
        assert_eq!(dir.state(), paths::default_state_dir(Path::new("/srv/ff")));
        assert!(dir.state().starts_with(paths::STATE_ROOT));
        for in_dir in [dir.router_socket(), dir.socket_shim(), dir.verbs_shim()] {
            assert!(in_dir.starts_with("/srv/ff"), "{}", in_dir.display());
        }
        for control in [
            dir.config(),
            dir.daemon_lock(),
            dir.pid_file(),
            dir.status_file(),
            dir.log(),
            dir.router_log(),
            dir.router_lock(),
            dir.control_socket(),
        ] {
            assert_eq!(control.parent(), Some(dir.state()), "{}", control.display());
        }
        assert!(dir
            .default_registry_url()
            .starts_with(&format!("file:{}/", dir.state().display())));
        let given = RuntimeDir::with_state(Path::new("/srv/ff"), Some(Path::new("/x/st"))).unwrap();
        assert_eq!(given.state(), Path::new("/x/st"));
        assert_eq!(given.control_socket(), Path::new("/x/st/router.ctl"));
    }

    #[test]
    fn config_round_trip_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::with_state(tmp.path(), Some(&tmp.path().join("state"))).unwrap();
        paths::create_state_dir(dir.state()).unwrap();
        assert!(matches!(
            Config::load(&dir),
            Err(ConfigError::Missing { .. })
        ));
        let config = Config {
            version: CONFIG_VERSION,
            host_ip: Ipv4Addr::new(192, 168, 1, 1),
            vnet_prefix: "10.32.0.0/12".parse().unwrap(),
            registry: dir.default_registry_url(),
            cores: Some("1".into()),
            rdma_device: Some("rxe0".into()),
            peer_port: DEFAULT_PEER_PORT,
            metrics: Some("127.0.0.1:9464".parse().unwrap()),
            docker: None,
        };
        config.save(&dir).unwrap();
        assert_eq!(Config::load(&dir).unwrap(), config);
        fs::write(dir.config(), b"{\"version\": 1").unwrap();
        let err = Config::load(&dir).unwrap_err();
        assert!(err.to_string().contains("config.json is corrupt"), "{err}");
    }
}
