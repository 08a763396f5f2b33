//! The jail: host sockets the router hands to containers must not become a way onto the host
//! network. A container holding a host-namespace TCP socket could otherwise disconnect it
//! (connect with AF_UNSPEC, or shutdown a listener) and connect it anywhere the host reaches,
//! or listen on it and take connections from the host network, past every tenant check.
//!
//! The router marks every socket it hands out (SO_MARK: [`CONNECTION_MARK`] after its own
//! connect, [`LISTENER_MARK`] on listeners; a container cannot change a mark without
//! CAP_NET_ADMIN or CAP_NET_RAW in the host's user namespace), and at start:
//! - links two cgroup programs ([`programs::CONNECT_GUARD`]) to the cgroup v2 root at
//!   BPF_CGROUP_INET4_CONNECT and INET6_CONNECT: a connect on a marked socket gets EPERM;
//! - links [`programs::MARK_GUARD`] at BPF_CGROUP_SETSOCKOPT: SO_MARK on a marked socket gets
//!   EPERM (for containers that kept CAP_NET_RAW);
//! - inserts an iptables rule in its network namespace dropping TCP SYNs that reach a socket
//!   with the connection mark (a disconnected connection socket made to listen).
//!
//! The links are bpf_links: they go when the router's descriptors close, at exit or crash.
//! The rule is removed at exit if this router inserted it (one left by a router that was
//! killed is found and kept: it concerns only sockets with Freeflow's mark). Without the
//! jail (no cgroup2, no CAP_SYS_ADMIN, an old kernel, no iptables) the router logs why and
//! works on; `freeflow status` shows whether it is active.

#[allow(unsafe_code)]
mod kernel;
mod programs;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// SO_MARK of connection sockets handed to containers ("FF" 1).
pub const CONNECTION_MARK: u32 = 0x4646_0001;
/// SO_MARK of listening sockets handed to containers ("FF" 2).
pub const LISTENER_MARK: u32 = 0x4646_0002;

/// Whether the connect guard is linked (then sockets are marked).
static MARKING: AtomicBool = AtomicBool::new(false);
/// Whether the whole jail is up (connect and mark guards linked, SYN rule present).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Why the jail (or a part of it) is not up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("this kernel has no cgroup v2")]
    NoCgroup2,
    #[error("cannot open the cgroup v2 root {path}: {source}")]
    CgroupRoot {
        path: String,
        source: std::io::Error,
    },
    #[error("the kernel refused program {name}: {source}{}", log_suffix(.log))]
    Load {
        name: &'static str,
        source: std::io::Error,
        log: String,
    },
    #[error("cannot link program {name} to the cgroup root: {source}")]
    Link {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("iptables: {0}")]
    Iptables(String),
}

fn log_suffix(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (verifier: {log})")
    }
}

/// The jail while the router runs: dropping it unlinks the programs and removes the rule.
pub struct Jail {
    links: Vec<OwnedFd>,
    rule_inserted: bool,
}

impl Drop for Jail {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::Relaxed);
        MARKING.store(false, Ordering::Relaxed);
        if self.rule_inserted {
            if let Err(e) = iptables("-D") {
                log::warn!("jail: could not remove the SYN rule: {e}");
            }
        }
        self.links.clear();
    }
}

/// Sets up the jail and logs one line saying it is active, or why not (then returns `None`
/// and the router works on without it, or with the part that could be set up).
pub fn set_up() -> Option<Jail> {
    let links = match link_guards() {
        Ok(links) => links,
        Err(e) => {
            log::warn!(
                "jail: not active ({e}); containers could reuse host sockets they are handed"
            );
            return None;
        }
    };
    MARKING.store(true, Ordering::Relaxed);
    let mut jail = Jail {
        links,
        rule_inserted: false,
    };
    match ensure_syn_rule() {
        Ok(inserted) => {
            jail.rule_inserted = inserted;
            ACTIVE.store(true, Ordering::Relaxed);
            log::info!(
                "jail: active (marks {CONNECTION_MARK:#x}/{LISTENER_MARK:#x}: connect and SO_MARK refused, SYNs to connection sockets dropped)"
            );
        }
        Err(e) => log::warn!(
            "jail: not active ({e}); connects on handed sockets are refused, but a connection socket made to listen is not guarded"
        ),
    }
    Some(jail)
}

/// Whether the whole jail is up (for `freeflow status`).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Marks a connection socket handed to a container (after the router's own connect, which
/// the mark would refuse).
pub fn mark_connection(socket: &impl AsRawFd) {
    mark(socket, CONNECTION_MARK);
}

/// Marks a listening socket handed to a container.
pub fn mark_listener(socket: &impl AsRawFd) {
    mark(socket, LISTENER_MARK);
}

/// Marks a listener a process handed back after a router restart, unless it has the mark
/// already (the usual case; a router without the jail handed it out otherwise).
pub fn mark_handed_back_listener(socket: &impl AsRawFd) {
    if kernel::mark_of(socket).is_ok_and(|m| m != LISTENER_MARK) {
        mark(socket, LISTENER_MARK);
    }
}

fn mark(socket: &impl AsRawFd, mark: u32) {
    if MARKING.load(Ordering::Relaxed) {
        if let Err(e) = kernel::set_mark(socket, mark) {
            log::warn!("jail: cannot mark a socket: {e}");
        }
    }
}

/// Loads and links the guards to the cgroup v2 root; the links.
fn link_guards() -> Result<Vec<OwnedFd>, JailError> {
    let cgroup = open_cgroup2_root()?;
    let guards: [(&'static str, u32, u32, &[kernel::Insn]); 3] = [
        (
            "ff_connect4",
            programs::PROG_TYPE_CGROUP_SOCK_ADDR,
            programs::ATTACH_INET4_CONNECT,
            &programs::CONNECT_GUARD,
        ),
        (
            "ff_connect6",
            programs::PROG_TYPE_CGROUP_SOCK_ADDR,
            programs::ATTACH_INET6_CONNECT,
            &programs::CONNECT_GUARD,
        ),
        (
            "ff_mark",
            programs::PROG_TYPE_CGROUP_SOCKOPT,
            programs::ATTACH_SETSOCKOPT,
            &programs::MARK_GUARD,
        ),
    ];
    let mut links = Vec::new();
    for (name, prog_type, attach_type, insns) in guards {
        let prog = kernel::load_program(prog_type, attach_type, insns, name)
            .map_err(|(source, log)| JailError::Load { name, source, log })?;
        let link = kernel::link_to_cgroup(&prog, &cgroup, attach_type)
            .map_err(|source| JailError::Link { name, source })?;
        links.push(link);
    }
    Ok(links)
}

/// The root of the cgroup v2 hierarchy: where /proc/self/mountinfo says it is mounted, else
/// (a router started by `ip netns exec` runs in a mount namespace whose /sys was remounted
/// for its network namespace, without the cgroup mounts) mounted for a moment on a fresh
/// directory.
fn open_cgroup2_root() -> Result<OwnedFd, JailError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(path) = cgroup2_in_mountinfo(&mountinfo) {
        return std::fs::File::open(&path)
            .map(OwnedFd::from)
            .map_err(|source| JailError::CgroupRoot { path, source });
    }
    let dir = std::env::temp_dir().join(format!("freeflow-cgroup2-{}", std::process::id()));
    let path = format!("cgroup2 mounted on {}", dir.display());
    std::fs::create_dir_all(&dir).map_err(|source| JailError::CgroupRoot {
        path: path.clone(),
        source,
    })?;
    let opened = kernel::open_cgroup2_by_mounting(&dir);
    let _ = std::fs::remove_dir(&dir);
    opened.map_err(|source| match source.raw_os_error() {
        Some(libc::ENODEV) => JailError::NoCgroup2,
        _ => JailError::CgroupRoot { path, source },
    })
}

/// The mount point (fifth field) of the first line whose file system type (the first field
/// after " - ") is cgroup2.
fn cgroup2_in_mountinfo(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        mount.split_whitespace().nth(4).map(str::to_string)
    })
}

/// The SYN rule's match and target, after the chain.
const SYN_RULE: &[&str] = &[
    "-p",
    "tcp",
    "--syn",
    "-m",
    "socket",
    "--restore-skmark",
    "-m",
    "mark",
    "--mark",
    "0x46460001",
    "-m",
    "comment",
    "--comment",
    "freeflow-jail",
    "-j",
    "DROP",
];
const _: () = assert!(CONNECTION_MARK == 0x4646_0001);

/// Inserts the SYN rule unless it is there; whether this call inserted it.
fn ensure_syn_rule() -> Result<bool, JailError> {
    if iptables("-C").is_ok() {
        return Ok(false);
    }
    iptables("-I").map(|()| true)
}

/// `iptables -w 5 <action> INPUT <SYN_RULE>` in the router's network namespace.
fn iptables(action: &str) -> Result<(), JailError> {
    let out = Command::new("iptables")
        .args(["-w", "5", action, "INPUT"])
        .args(SYN_RULE)
        .output()
        .map_err(|e| JailError::Iptables(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(JailError::Iptables(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_in_mountinfo(info).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            cgroup2_in_mountinfo("32 31 0:29 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }
}
