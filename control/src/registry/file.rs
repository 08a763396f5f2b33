//! The embedded registry backend: one pretty-printed JSON file shared by every daemon on the
//! machine.
//!
//! Writers serialise on an exclusive `flock` of the sibling `<file>.lock` (never deleted: removing
//! a lock file lets two writers lock two different inodes). Under the lock a writer reads the
//! file, applies the change, writes the result to `<file>.tmp.<pid>.<n>`, fsyncs it, renames it
//! over the file and fsyncs the directory. Readers take no lock: `rename` replaces the directory
//! entry atomically and no published file is ever modified in place, so a reader sees either the
//! old or the new contents, never a mixture. A file that cannot be parsed is never overwritten.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{
    ContainerRecord, Fingerprint, FingerprintRepr, HostRecord, Registry, RegistryError, Snapshot,
};
use crate::os;

/// The `format` field of every registry file.
pub(super) const FORMAT_NAME: &str = "freeflow-registry";
/// The only file format version this build reads and writes.
pub(super) const FORMAT_VERSION: u64 = 1;
/// Mode of the registry file, applied with `fchmod` so the umask does not narrow it.
const FILE_MODE: u32 = 0o644;
/// Mode of the lock file; only writers (root, in practice) need it.
const LOCK_MODE: u32 = 0o600;
/// How many leading bytes of the file go into a fingerprint; the generation is within them.
const FINGERPRINT_HEAD: u64 = 128;
/// Attempts at finding an unused temporary file name before giving up.
const TEMP_NAME_ATTEMPTS: u32 = 16;

/// Distinguishes the temporary files of concurrent updates from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A registry stored in one JSON file (see the module documentation for the protocol).
#[derive(Debug, Clone)]
pub struct FileRegistry {
    /// Absolute path of the registry file.
    path: PathBuf,
    /// Its directory.
    dir: PathBuf,
    /// Its file name, the stem of the lock and temporary file names.
    file_name: OsString,
}

/// The on-disk layout, written.
#[derive(Serialize)]
struct FileOut<'a> {
    format: &'static str,
    version: u64,
    generation: u64,
    hosts: &'a [HostRecord],
    containers: &'a [ContainerRecord],
}

/// The on-disk layout, first pass: identify the file before trusting the rest of it.
#[derive(Deserialize)]
struct FileHeader {
    format: String,
    version: u64,
}

/// The on-disk layout, second pass (version 1). Unknown fields are ignored here and in the
/// records so that later versions can add fields older readers skip.
#[derive(Deserialize)]
struct FileBody {
    generation: u64,
    #[serde(default)]
    hosts: Vec<HostRecord>,
    #[serde(default)]
    containers: Vec<ContainerRecord>,
}

impl FileRegistry {
    /// A handle on the registry file at `path` (made absolute against the current directory
    /// now). Touches nothing on disk.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        let path = path.into();
        let absolute = std::path::absolute(&path).map_err(|source| RegistryError::Io {
            path: path.clone(),
            source,
        })?;
        let (Some(dir), Some(file_name)) = (absolute.parent(), absolute.file_name()) else {
            return Err(RegistryError::InvalidUrl(path.display().to_string()));
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            file_name: file_name.to_os_string(),
            path: dir.join(file_name),
        })
    }

    /// The registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file writers serialise on.
    pub fn lock_path(&self) -> PathBuf {
        self.sibling(".lock")
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.file_name.clone();
        name.push(suffix);
        self.dir.join(name)
    }

    fn io_error(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
        move |source| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn read(&self) -> Result<Snapshot, RegistryError> {
        match fs::read(&self.path) {
            Ok(bytes) => decode(&self.path, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Snapshot::default()),
            Err(source) => Err(RegistryError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Opens (creating if needed) the lock file and takes the exclusive lock.
    fn lock(&self) -> Result<LockGuard, RegistryError> {
        let lock_path = self.lock_path();
        let file = os::open_lock_file(&lock_path, LOCK_MODE).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                // The only component that can be missing is the directory: say so rather
                // than name a lock file the user never heard of.
                RegistryError::Io {
                    path: self.dir.clone(),
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        "the registry's directory does not exist; create it first",
                    ),
                }
            } else {
                RegistryError::Io {
                    path: lock_path.clone(),
                    source,
                }
            }
        })?;
        LockGuard::acquire(file).map_err(Self::io_error(&lock_path))
    }

    /// Refuses to replace a symbolic link: the rename would turn the link into a plain file
    /// and split the registry in two.
    fn check_not_symlink(&self) -> Result<(), RegistryError> {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_symlink() => Err(RegistryError::Io {
                path: self.path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the registry file is a symbolic link; point freeflow at the real file",
                ),
            }),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RegistryError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Removes temporary files that writers which died mid-update left behind. Only called
    /// under the lock, when no live writer can own one. Best effort: failures are ignored.
    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut prefix = self.file_name.clone();
        prefix.push(".tmp.");
        let prefix = prefix.as_encoded_bytes();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.as_encoded_bytes().strip_prefix(prefix) else {
                continue;
            };
            if is_temp_suffix(rest) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Creates a fresh temporary file next to the registry file.
    fn create_temp(&self) -> Result<(PathBuf, File), RegistryError> {
        let pid = std::process::id();
        let mut last_error = None;
        for _ in 0..TEMP_NAME_ATTEMPTS {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp_path = self.sibling(&format!(".tmp.{pid}.{n}"));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&tmp_path)
            {
                Ok(file) => return Ok((tmp_path, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(source) => {
                    return Err(RegistryError::Io {
                        path: tmp_path,
                        source,
                    })
                }
            }
        }
        Err(RegistryError::Io {
            path: self.sibling(".tmp.*"),
            source: last_error.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()),
        })
    }

    /// Publishes `bytes` as the new registry file: temporary file, fsync, rename, fsync of the
    /// directory. On failure before the rename the old file is untouched and the temporary file
    /// is removed.
    fn replace(&self, bytes: &[u8]) -> Result<(), RegistryError> {
        let (tmp_path, mut file) = self.create_temp()?;
        let written = file
            .write_all(bytes)
            .and_then(|()| file.set_permissions(Permissions::from_mode(FILE_MODE)))
            .and_then(|()| file.sync_all());
        drop(file);
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp_path);
            return Err(RegistryError::Io {
                path: tmp_path,
                source,
            });
        }
        if let Err(source) = fs::rename(&tmp_path, &self.path) {
            let _ = fs::remove_file(&tmp_path);
            return Err(RegistryError::Io {
                path: self.path.clone(),
                source,
            });
        }
        // The rename is only durable once the directory is.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(Self::io_error(&self.dir))
    }
}

impl Registry for FileRegistry {
    fn load(&self) -> Result<Snapshot, RegistryError> {
        self.read()
    }

    fn update(
        &self,
        f: &mut dyn FnMut(&mut Snapshot) -> Result<(), RegistryError>,
    ) -> Result<Snapshot, RegistryError> {
        let _lock = self.lock()?;
        self.check_not_symlink()?;
        self.remove_stale_temps();
        let current = self.read()?;
        let mut next = current.clone();
        f(&mut next)?;
        next.validate()?;
        next.generation =
            current
                .generation
                .checked_add(1)
                .ok_or_else(|| RegistryError::Corrupt {
                    path: self.path.clone(),
                    detail: "the generation counter is at its maximum".to_owned(),
                })?;
        let bytes = encode(&next).map_err(|e| RegistryError::Io {
            path: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        self.replace(&bytes)?;
        Ok(next)
    }

    fn fingerprint(&self) -> Result<Fingerprint, RegistryError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Fingerprint(FingerprintRepr::FileMissing))
            }
            Err(source) => {
                return Err(RegistryError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        // fstat and read through the same descriptor, so both describe the same version.
        let meta = file.metadata().map_err(Self::io_error(&self.path))?;
        let mut head = Vec::with_capacity(FINGERPRINT_HEAD as usize);
        file.take(FINGERPRINT_HEAD)
            .read_to_end(&mut head)
            .map_err(Self::io_error(&self.path))?;
        Ok(Fingerprint(FingerprintRepr::File {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            head,
        }))
    }

    fn url(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

/// `<digits>.<digits>`: the part of a temporary file name after `<file>.tmp.`.
fn is_temp_suffix(rest: &[u8]) -> bool {
    let mut parts = rest.split(|&b| b == b'.');
    let is_number =
        |p: Option<&[u8]>| p.is_some_and(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit));
    is_number(parts.next()) && is_number(parts.next()) && parts.next().is_none()
}

fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = serde_json::to_vec_pretty(&FileOut {
        format: FORMAT_NAME,
        version: FORMAT_VERSION,
        generation: snapshot.generation,
        hosts: &snapshot.hosts,
        containers: &snapshot.containers,
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Snapshot, RegistryError> {
    let corrupt = |detail: String| RegistryError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    // serde_json's messages carry the line and column of the problem.
    let header: FileHeader = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if header.format != FORMAT_NAME {
        return Err(RegistryError::UnknownFormat {
            path: path.to_path_buf(),
            found: header.format,
        });
    }
    if header.version != FORMAT_VERSION {
        return Err(RegistryError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: header.version,
            supported: FORMAT_VERSION,
        });
    }
    let body: FileBody = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let snapshot = Snapshot {
        generation: body.generation,
        hosts: body.hosts,
        containers: body.containers,
    };
    snapshot
        .validate()
        .map_err(|e| corrupt(format!("invalid contents: {e}")))?;
    Ok(snapshot)
}

/// Holds an exclusive `flock` until dropped.
struct LockGuard {
    file: File,
}

impl LockGuard {
    fn acquire(file: File) -> io::Result<Self> {
        loop {
            // std's lock is flock(LOCK_EX) on Linux: one lock per open file description.
            match file.lock() {
                Ok(()) => return Ok(Self { file }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Unlock explicitly instead of relying on close: a child forked (before exec) while we
        // held the lock shares the open file description, and closing our copy alone would
        // leave the lock held.
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_suffix() {
        assert!(is_temp_suffix(b"12.0"));
        assert!(!is_temp_suffix(b"12"));
        assert!(!is_temp_suffix(b"12.0.1"));
        assert!(!is_temp_suffix(b"12.x"));
        assert!(!is_temp_suffix(b".1"));
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut s = Snapshot {
            generation: 7,
            ..Snapshot::default()
        };
        s.add_container(ContainerRecord {
            name: "c1".into(),
            tenant: "t".into(),
            ip: "10.32.0.5".parse().unwrap(),
            netns: "/run/netns/c1".into(),
            host_ip: "192.168.1.1".parse().unwrap(),
        })
        .unwrap();
        s.upsert_host(HostRecord {
            host_ip: "192.168.1.1".parse().unwrap(),
            peer_port: 7100,
            vnet_prefix: "10.32.0.0/16".parse().unwrap(),
            dir: "/freeflow/h1".into(),
        });
        let bytes = encode(&s).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(
            "{\n  \"format\": \"freeflow-registry\",\n  \"version\": 1,\n  \"generation\": 7,"
        ));
        assert!(text.find("\"generation\"").unwrap() < FINGERPRINT_HEAD as usize - 24);
        assert_eq!(decode(Path::new("/x"), &bytes).unwrap(), s);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let text = r#"{"format": "freeflow-registry", "version": 1, "generation": 3, "future": 1,
            "hosts": [], "containers": [{"name": "a", "tenant": "t", "ip": "10.32.0.1",
            "netns": "/run/netns/a", "host_ip": "10.0.0.1", "mtu": 9000}]}"#;
        let s = decode(Path::new("/x"), text.as_bytes()).unwrap();
        assert_eq!(s.generation, 3);
        assert_eq!(s.containers[0].name, "a");
    }

    #[test]
    fn decode_errors() {
        let p = Path::new("/x");
        let err = decode(
            p,
            b"{\"format\": \"freeflow-registry\",\n \"version\": 1, \"gen",
        )
        .unwrap_err();
        assert!(
            matches!(&err, RegistryError::Corrupt { detail, .. } if detail.contains("line 2")),
            "{err}"
        );
        let err = decode(p, br#"{"format": "other", "version": 1}"#).unwrap_err();
        assert!(matches!(err, RegistryError::UnknownFormat { .. }), "{err}");
        let err = decode(p, br#"{"format": "freeflow-registry", "version": 2}"#).unwrap_err();
        assert!(
            matches!(err, RegistryError::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
        let err = decode(
            p,
            br#"{"format": "freeflow-registry", "version": 1, "generation": "1"}"#,
        )
        .unwrap_err();
        assert!(matches!(err, RegistryError::Corrupt { .. }), "{err}");
    }
}
