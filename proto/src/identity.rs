//! How the router knows who is calling: the network namespace of the peer process.

use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A network namespace, identified as the kernel does: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// The namespace a path refers to (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn of_path(path: &Path) -> io::Result<NetnsId> {
        let meta = std::fs::metadata(path)?;
        Ok(NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The namespace process `pid` lives in.
    pub fn of_pid(pid: i32) -> io::Result<NetnsId> {
        Self::of_path(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    /// The caller's own namespace.
    pub fn current() -> io::Result<NetnsId> {
        Self::of_path(Path::new("/proc/self/ns/net"))
    }
}
