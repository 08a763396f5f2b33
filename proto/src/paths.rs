//! Where one Freeflow host's files live: two directories, split by who may see them.
//!
//! ```text
//! DIR (--dir, $FREEFLOW_DIR, /freeflow)   mounted read-only into every container
//!   router.sock                           the attach socket
//!   libfsocket.so, verbs/                 the shims (mode 0444)
//! STATE (--state-dir, $FREEFLOW_STATE_DIR, /run/freeflow/state/<DIR escaped>)   root only, never mounted
//!   config.json, registry.json            settings of `freeflow up`, the default registry
//!   daemon.lock, freeflow.pid, daemon-status.json, freeflow.log    the daemon's
//!   router.lock, router.ctl, router.log   the router's
//! ```
//!
//! The control plane stays out of DIR because a container that mounts DIR must not reach it:
//! root in a container ignores file modes. The default state directory is derived from DIR
//! alone, so that several hosts on one machine (tests, the demo) never share one and every
//! command finds it from `--dir`. `freeflow up --state-dir X` records X as a symlink at the
//! derived place, so that later commands that get only `--dir` find X too.
//!
//! This module is the one place that derives the state directory: the router, the daemon, the
//! CLI, bench and the tests all call it.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Where the derived state directories live, one per runtime directory.
pub const STATE_ROOT: &str = "/run/freeflow/state";
/// Environment variable that overrides the state directory (like `--state-dir`).
pub const STATE_DIR_ENV: &str = "FREEFLOW_STATE_DIR";

/// The router's lock file in the state directory: held by the router serving DIR.
pub const ROUTER_LOCK: &str = "router.lock";
/// The router's log (its stderr, appended across restarts) in the state directory.
pub const ROUTER_LOG: &str = "router.log";

/// Longest escaped name used as is; longer ones are cut and end with a hash of the whole.
const MAX_NAME: usize = 200;
/// How much of a too-long name is kept before its hash.
const KEPT_OF_LONG_NAME: usize = 150;

/// The state directory of runtime directory `dir`: `$FREEFLOW_STATE_DIR` if set and not empty,
/// else [`default_state_dir`].
pub fn state_dir(dir: &Path) -> PathBuf {
    let env = std::env::var_os(STATE_DIR_ENV).filter(|v| !v.is_empty());
    state_dir_with(dir, env.as_deref().map(Path::new))
}

/// The state directory of `dir`: `explicit` (made absolute) if given, else
/// [`default_state_dir`].
pub fn state_dir_with(dir: &Path, explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(path) => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        None => default_state_dir(dir),
    }
}

/// `STATE_ROOT/<escaped key of dir>` (see [`dir_key`], [`escape`]): the same for every
/// spelling of one directory, different for different directories.
pub fn default_state_dir(dir: &Path) -> PathBuf {
    Path::new(STATE_ROOT).join(escape(&dir_key(dir)))
}

/// `dir` as one name per directory: absolute, `.` and `..` resolved, and the longest part of it
/// that exists resolved by the file system (symlinks), so that `/freeflow` and a symlink to it
/// share one state directory whether or not `dir` exists yet.
pub fn dir_key(dir: &Path) -> PathBuf {
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let lexical = normalize(&absolute);
    let mut missing: Vec<OsString> = Vec::new();
    let mut existing = lexical.as_path();
    loop {
        if let Ok(mut real) = std::fs::canonicalize(existing) {
            real.extend(missing.iter().rev());
            return real;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

/// `path` with `.` dropped and `..` taking away the component before it.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// An absolute path as one file name: the leading `/` dropped, `%` written `%25` and `/`
/// written `%2F` (so no two paths share a name), `/` itself `%2F`. A name longer than 200
/// bytes keeps its first 150 and ends with `~` and a 64-bit hash of the whole.
pub fn escape(path: &Path) -> OsString {
    let bytes = path.as_os_str().as_bytes();
    let bytes = bytes.strip_prefix(b"/").unwrap_or(bytes);
    if bytes.is_empty() {
        return OsString::from("%2F");
    }
    let mut name = Vec::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'%' => name.extend_from_slice(b"%25"),
            b'/' => name.extend_from_slice(b"%2F"),
            _ => name.push(b),
        }
    }
    if name.len() > MAX_NAME {
        let hash = fnv1a64(bytes);
        name.truncate(KEPT_OF_LONG_NAME);
        name.extend_from_slice(format!("~{hash:016x}").as_bytes());
    }
    OsString::from_vec(name)
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike std's hasher).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Creates the state directory `state` and whatever it lacks above it, each mode 0700, and
/// makes `state` itself 0700 if it already existed.
pub fn create_state_dir(state: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)?;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_one_name_and_tells_paths_apart() {
        assert_eq!(escape(Path::new("/freeflow")), "freeflow");
        assert_eq!(escape(Path::new("/tmp/x/h0")), "tmp%2Fx%2Fh0");
        assert_eq!(escape(Path::new("/")), "%2F");
        // `%` is escaped too, so a name with "%2F" in it is not a path with a slash.
        assert_ne!(escape(Path::new("/a%2Fb")), escape(Path::new("/a/b")));
        assert_eq!(escape(Path::new("/a%2Fb")), "a%252Fb");
        let long = PathBuf::from(format!("/{}", "d/".repeat(200)));
        let name = escape(&long);
        assert!(name.len() < 255, "{}", name.len());
        let longer = PathBuf::from(format!("/{}x", "d/".repeat(200)));
        assert_ne!(name, escape(&longer));
    }

    #[test]
    fn every_spelling_of_a_directory_has_one_state_directory() {
        let tmp = std::env::temp_dir().join(format!("ff-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("real")).unwrap();
        std::os::unix::fs::symlink(tmp.join("real"), tmp.join("link")).unwrap();
        let real = std::fs::canonicalize(tmp.join("real")).unwrap();
        assert_eq!(dir_key(&tmp.join("link")), real);
        assert_eq!(dir_key(&tmp.join("real/./../real")), real);
        // Not there yet: the existing part is resolved, the rest appended.
        assert_eq!(dir_key(&tmp.join("link/new/h0")), real.join("new/h0"));
        assert_eq!(
            default_state_dir(&tmp.join("link")),
            default_state_dir(&tmp.join("real"))
        );
        assert_ne!(
            default_state_dir(&tmp.join("real/h0")),
            default_state_dir(&tmp.join("real/h1"))
        );
        assert!(default_state_dir(&real).starts_with(STATE_ROOT));
        // A relative override is made absolute; without one the default is used.
        let explicit = state_dir_with(&real, Some(Path::new("rel/state")));
        assert!(explicit.is_absolute() && explicit.ends_with("rel/state"));
        assert_eq!(state_dir_with(&real, None), default_state_dir(&real));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn the_state_directory_is_private() {
        let tmp = std::env::temp_dir().join(format!("ff-paths-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let state = tmp.join("a/b");
        create_state_dir(&state).unwrap();
        for dir in [tmp.join("a"), state.clone()] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        }
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_state_dir(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
