//! Control files that versions before the state directory kept in DIR, where every container
//! that mounts DIR could read them and, with a writable mount, change them. `freeflow up`
//! moves them out once ([`move_old_control_files`]): settings, the default registry and the
//! logs to the state directory, the rest (locks, pid, status, the control socket) removed.
//! A daemon or router of the earlier version that still runs stops it with a clear error.

use std::fs;
use std::io;
use std::path::Path;

use crate::config::{Config, ConfigError, RuntimeDir};
use crate::os;

/// Files an earlier version kept in DIR that carry data: moved to the state directory; both
/// there and in DIR is an error (which one is right is the user's call).
const KEPT: &[&str] = &["config.json", "registry.json"];
/// Logs: moved, unless the state directory has its own (then the old one is dropped).
const LOGS: &[&str] = &["freeflow.log", "router.log"];
/// Meaningless without the process that wrote them: removed.
const STALE: &[&str] = &[
    "daemon.lock",
    "router.lock",
    "freeflow.pid",
    "daemon-status.json",
    "router.ctl",
    "registry.json.lock",
];
/// Locks a running daemon or router of the earlier version holds.
const LOCKS: &[&str] = &["daemon.lock", "router.lock"];

/// Moves the control files an earlier version left in DIR to the state directory (see the
/// module doc). Returns one line per file moved or removed, empty if there were none.
pub fn move_old_control_files(dir: &RuntimeDir) -> Result<Vec<String>, ConfigError> {
    let old = |name: &str| dir.path().join(name);
    let present = |names: &[&'static str]| -> Vec<&'static str> {
        names
            .iter()
            .copied()
            .filter(|name| fs::symlink_metadata(old(name)).is_ok())
            .collect()
    };
    let (kept, logs, stale) = (present(KEPT), present(LOGS), present(STALE));
    if kept.is_empty() && logs.is_empty() && stale.is_empty() {
        return Ok(Vec::new());
    }
    for lock in present(LOCKS) {
        if lock_held(&old(lock))? {
            return Err(legacy_error(format!(
                "a daemon or router of an earlier freeflow version still runs for {} (it holds \
                 {}): stop it with that version's `freeflow down`, then run `up` again",
                dir.path().display(),
                old(lock).display()
            )));
        }
    }
    for name in &kept {
        if dir.state().join(name).exists() {
            return Err(legacy_error(format!(
                "both {} (from an earlier version) and {} exist: remove the one you do not \
                 want, then run `up` again",
                old(name).display(),
                dir.state().join(name).display()
            )));
        }
    }
    freeflow_proto::paths::create_state_dir(dir.state()).map_err(io_error(dir.state()))?;
    let mut done = Vec::new();
    for name in kept.iter().chain(&logs) {
        let to = dir.state().join(name);
        if to.exists() {
            fs::remove_file(old(name)).map_err(io_error(&old(name)))?;
            done.push(format!("removed {}", old(name).display()));
        } else {
            move_file(&old(name), &to)?;
            done.push(format!("moved {} to {}", old(name).display(), to.display()));
        }
    }
    for name in &stale {
        fs::remove_file(old(name)).map_err(io_error(&old(name)))?;
        done.push(format!("removed {}", old(name).display()));
    }
    repoint_default_registry(dir)?;
    Ok(done)
}

/// A moved `config.json` that names the old default registry (`file:DIR/registry.json`) is made
/// to name the new one, where that file was moved.
fn repoint_default_registry(dir: &RuntimeDir) -> Result<(), ConfigError> {
    let Some(mut config) = Config::load_if_present(dir)? else {
        return Ok(());
    };
    let old_default = format!("file:{}", dir.path().join("registry.json").display());
    if config.registry == old_default {
        config.registry = dir.default_registry_url();
        config.save(dir)?;
    }
    Ok(())
}

/// Whether some process holds the flock on `path`.
fn lock_held(path: &Path) -> Result<bool, ConfigError> {
    let file = fs::File::open(path).map_err(io_error(path))?;
    Ok(!os::try_lock_exclusive(&file).map_err(io_error(path))?)
}

/// Renames `from` to `to`; across file systems (DIR on disk, the state directory on /run),
/// copies and removes.
fn move_file(from: &Path, to: &Path) -> Result<(), ConfigError> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to).map_err(io_error(to))?;
            fs::remove_file(from).map_err(io_error(from))
        }
        Err(e) => Err(io_error(from)(e)),
    }
}

fn legacy_error(message: String) -> ConfigError {
    ConfigError::Legacy(message)
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CONFIG_VERSION;

    fn config(registry: String) -> Config {
        Config {
            metrics: None,
            docker: None,
            version: CONFIG_VERSION,
            host_ip: "192.168.1.1".parse().unwrap(),
            vnet_prefix: "10.32.0.0/12".parse().unwrap(),
            registry,
            cores: None,
            rdma_device: None,
            peer_port: 7471,
        }
    }

    #[test]
    fn an_earlier_layout_is_moved_to_the_state_directory_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir =
            RuntimeDir::with_state(&tmp.path().join("dir"), Some(&tmp.path().join("st"))).unwrap();
        fs::create_dir(dir.path()).unwrap();
        let old = |n: &str| dir.path().join(n);
        let old_registry = format!("file:{}", old("registry.json").display());
        let mut bytes = serde_json::to_vec(&config(old_registry)).unwrap();
        bytes.push(b'\n');
        fs::write(old("config.json"), bytes).unwrap();
        fs::write(old("registry.json"), b"{}").unwrap();
        fs::write(old("router.log"), b"old log").unwrap();
        fs::write(old("daemon.lock"), b"").unwrap();
        fs::write(old("libfsocket.so"), b"shim").unwrap();

        let done = move_old_control_files(&dir).unwrap();
        assert_eq!(done.len(), 4, "{done:?}");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["libfsocket.so"], "only the shim stays in DIR");
        assert_eq!(fs::read(dir.state().join("registry.json")).unwrap(), b"{}");
        assert_eq!(fs::read(dir.router_log()).unwrap(), b"old log");
        // The moved settings name the moved registry.
        let moved = Config::load(&dir).unwrap();
        assert_eq!(moved.registry, dir.default_registry_url());
        // Nothing left to move: a second `up` does nothing.
        assert!(move_old_control_files(&dir).unwrap().is_empty());
    }

    #[test]
    fn settings_in_both_places_or_a_running_old_daemon_stop_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir =
            RuntimeDir::with_state(&tmp.path().join("dir"), Some(&tmp.path().join("st"))).unwrap();
        fs::create_dir(dir.path()).unwrap();
        crate::config::write_atomic(&dir.path().join("config.json"), b"{}", 0o644).unwrap();
        freeflow_proto::paths::create_state_dir(dir.state()).unwrap();
        fs::write(dir.config(), b"{}").unwrap();
        let both = move_old_control_files(&dir).unwrap_err().to_string();
        assert!(both.contains("both"), "{both}");
        fs::remove_file(dir.config()).unwrap();

        let lock_path = dir.path().join("daemon.lock");
        let lock = os::open_lock_file(&lock_path, 0o644).unwrap();
        assert!(os::try_lock_exclusive(&lock).unwrap());
        let running = move_old_control_files(&dir).unwrap_err().to_string();
        assert!(
            running.contains("earlier freeflow version still runs"),
            "{running}"
        );
        assert!(dir.path().join("config.json").exists(), "nothing moved");
    }
}
