//! How the router knows who is calling: the network namespace of the peer process; and who may
//! use its control socket ([`check_control_peer`]).

use crate::fdpass::{peer_credentials, PeerCredentials};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::BorrowedFd;
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

    /// The namespace of the process that connected `conn` (pid `pid`, from SO_PEERCRED), held
    /// by a pidfd so that a pid reused since the connect cannot lend another process's
    /// namespace (see [`crate::fdpass::peer_netns`]). An error if that process has exited.
    pub fn of_peer(conn: BorrowedFd<'_>, pid: i32) -> io::Result<NetnsId> {
        crate::fdpass::peer_netns(conn, pid).map(|(dev, ino)| NetnsId { dev, ino })
    }

    /// The caller's own namespace.
    pub fn current() -> io::Result<NetnsId> {
        Self::of_path(Path::new("/proc/self/ns/net"))
    }
}

/// Why the router refuses a connection on its control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlPeerError {
    /// SO_PEERCRED failed.
    #[error("cannot read the caller's credentials: {0}")]
    Credentials(#[source] io::Error),
    /// The caller is not root (in the router's user namespace).
    #[error("pid {pid} runs as uid {uid}, not root")]
    NotRoot { pid: i32, uid: u32 },
    /// The caller's network namespace is not the router's: a container's, or another host's
    /// of a simulated cluster.
    #[error(
        "pid {pid} is in network namespace net:[{}], not the router's net:[{}]",
        peer.ino,
        own.ino
    )]
    OtherNetns {
        pid: i32,
        peer: NetnsId,
        own: NetnsId,
    },
    /// The caller's or the router's network namespace cannot be read (the caller may be gone).
    #[error("cannot read the network namespace of pid {pid}: {source}")]
    Netns {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// Whether a caller may use the router's control socket: only root (uid 0 as the kernel
/// reports it to the router, so root in a user namespace of a container is not) in the
/// router's own network namespace (a container has its own). Who can reach the socket's path
/// is not enough: root ignores file modes, and a read-only mount does not stop connect(2).
pub fn judge_control_peer(
    cred: PeerCredentials,
    peer_netns: io::Result<NetnsId>,
    own_netns: io::Result<NetnsId>,
) -> Result<(), ControlPeerError> {
    if cred.uid != 0 {
        return Err(ControlPeerError::NotRoot {
            pid: cred.pid,
            uid: cred.uid,
        });
    }
    let pid = cred.pid;
    let peer = peer_netns.map_err(|source| ControlPeerError::Netns { pid, source })?;
    let own = own_netns.map_err(|source| ControlPeerError::Netns {
        pid: std::process::id() as i32,
        source,
    })?;
    if peer != own {
        return Err(ControlPeerError::OtherNetns { pid, peer, own });
    }
    Ok(())
}

/// [`judge_control_peer`] for the caller at the other end of `conn` (SO_PEERCRED, then
/// `/proc/PID/ns/net` against this process's).
pub fn check_control_peer(conn: BorrowedFd<'_>) -> Result<PeerCredentials, ControlPeerError> {
    let cred = peer_credentials(conn).map_err(ControlPeerError::Credentials)?;
    judge_control_peer(cred, NetnsId::of_peer(conn, cred.pid), NetnsId::current())?;
    Ok(cred)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const ROOT: PeerCredentials = PeerCredentials {
        pid: 42,
        uid: 0,
        gid: 0,
    };
    const HOST: NetnsId = NetnsId { dev: 4, ino: 100 };
    const CONTAINER: NetnsId = NetnsId { dev: 4, ino: 200 };

    #[test]
    fn only_root_in_the_routers_network_namespace_may_control_it() {
        assert!(judge_control_peer(ROOT, Ok(HOST), Ok(HOST)).is_ok());
        let other = judge_control_peer(ROOT, Ok(CONTAINER), Ok(HOST)).unwrap_err();
        assert!(matches!(
            other,
            ControlPeerError::OtherNetns { pid: 42, .. }
        ));
        assert!(other.to_string().contains("net:[200]"), "{other}");
        let user = PeerCredentials { uid: 1000, ..ROOT };
        assert!(matches!(
            judge_control_peer(user, Ok(HOST), Ok(HOST)),
            Err(ControlPeerError::NotRoot { uid: 1000, .. })
        ));
        // A caller whose namespace cannot be read (it exited) is refused, not trusted.
        let gone = || io::Error::from(io::ErrorKind::NotFound);
        assert!(matches!(
            judge_control_peer(ROOT, Err(gone()), Ok(HOST)),
            Err(ControlPeerError::Netns { pid: 42, .. })
        ));
        // Nothing to compare with: refused.
        assert!(judge_control_peer(ROOT, Ok(HOST), Err(gone())).is_err());
    }

    #[test]
    fn a_connection_from_this_process_is_judged_by_its_real_credentials() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let result = check_control_peer(a.as_fd());
        if freeflow_os::process::effective_uid() == 0 {
            assert_eq!(result.unwrap().pid, std::process::id() as i32);
        } else {
            assert!(matches!(result, Err(ControlPeerError::NotRoot { .. })));
        }
    }

    #[test]
    fn the_peer_namespace_is_that_of_the_live_process_that_connected() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = std::process::id() as i32;
        assert_eq!(
            NetnsId::of_peer(a.as_fd(), me).unwrap(),
            NetnsId::current().unwrap()
        );
        // A process that connected and exited: its pid proves nothing any more.
        let dir = std::env::temp_dir().join(format!("ff-peer-netns-{me}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let status = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
            ])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let (conn, _) = listener.accept().unwrap();
        let cred = peer_credentials(conn.as_fd()).unwrap();
        assert_ne!(cred.pid, me);
        let gone = NetnsId::of_peer(conn.as_fd(), cred.pid);
        assert!(gone.is_err(), "{gone:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
