//! Accelerated sockets across exec. The fds survive exec (unless close-on-exec) but the shim's
//! table does not: after exec, getpeername would give host addresses. So the exec wrappers pass
//! the table for the inherited fds to the new image in the environment (`FREEFLOW_FDS`), and the
//! shim there takes it back when it loads, trusting an entry only if the fd still refers to the
//! same socket (same inode). Listeners among them are claimed with the router at once: the
//! exec closed the old image's router connection, and an unclaimed listener is dropped after a
//! short grace.

use crate::real;
use crate::state::{self, Accelerated, Role};
use libc::{c_char, c_int};
use std::ffi::{CStr, CString};
use std::net::Ipv4Addr;

const VAR: &str = "FREEFLOW_FDS";

/// `FREEFLOW_FDS=...` describing the accelerated fds an exec passes on, or None if there are none
/// (then the exec goes through untouched).
pub fn exported() -> Option<CString> {
    let mut parts = Vec::new();
    for (fd, s) in state::snapshot() {
        let fd_flags = real::fcntl_get(fd, libc::F_GETFD);
        if fd_flags < 0 || fd_flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        let Some(ino) = real::socket_inode(fd) else {
            continue;
        };
        parts.push(encode(fd, &s, ino));
    }
    if parts.is_empty() {
        return None;
    }
    CString::new(format!("{VAR}={}", parts.join(";"))).ok()
}

fn encode(fd: c_int, s: &Accelerated, ino: u64) -> String {
    let role = match s.role {
        Role::Listener => 'L',
        Role::Connection => 'C',
    };
    let (peer_ip, peer_port) = s.peer.unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
    format!(
        "{fd},{role},{},{},{peer_ip},{peer_port},{},{ino},{}",
        s.local.0,
        s.local.1,
        u8::from(s.v6),
        u8::from(s.wildcard)
    )
}

fn decode(entry: &str) -> Option<(c_int, Accelerated, u64)> {
    let f: Vec<&str> = entry.split(',').collect();
    // Eight fields from a shim that knew no `wildcard`.
    if f.len() != 8 && f.len() != 9 {
        return None;
    }
    let role = match f[1] {
        "L" => Role::Listener,
        "C" => Role::Connection,
        _ => return None,
    };
    let peer = (f[4].parse::<Ipv4Addr>().ok()?, f[5].parse::<u16>().ok()?);
    Some((
        f[0].parse().ok()?,
        Accelerated {
            role,
            local: (f[2].parse().ok()?, f[3].parse().ok()?),
            peer: (role == Role::Connection).then_some(peer),
            v6: f[6] == "1",
            wildcard: f.get(8) == Some(&"1"),
        },
        f[7].parse().ok()?,
    ))
}

/// Calls `exec` (an exec or spawn of the C library) with `envp`, plus the table of the
/// accelerated fds the new program inherits if there are any (else `envp` unchanged).
///
/// # Safety
/// `envp` is NULL or a NULL-terminated array of NUL-terminated strings.
pub unsafe fn with_inherited_fds(
    envp: *const *const c_char,
    exec: impl FnOnce(*const *const c_char) -> c_int,
) -> c_int {
    let Some(ours) = exported() else {
        return exec(envp);
    };
    // SAFETY: the caller's contract.
    let env = unsafe { environment_with(envp, &ours) };
    // `env` (and the strings it points to) lives across the call.
    exec(env.as_ptr())
}

/// `envp` with our variable replaced by `ours`: the pointers the new environment array holds
/// (NULL-terminated). The strings stay owned by the caller's `envp` and by `ours`.
///
/// # Safety
/// `envp` is NULL or a NULL-terminated array of NUL-terminated strings.
unsafe fn environment_with(envp: *const *const c_char, ours: &CString) -> Vec<*const c_char> {
    let prefix = format!("{VAR}=");
    let mut env = Vec::new();
    if !envp.is_null() {
        let mut i = 0;
        loop {
            // SAFETY: within the NULL-terminated array (the caller's contract).
            let entry = unsafe { *envp.add(i) };
            if entry.is_null() {
                break;
            }
            // SAFETY: each entry is a NUL-terminated string.
            let bytes = unsafe { CStr::from_ptr(entry) }.to_bytes();
            if !bytes.starts_with(prefix.as_bytes()) {
                env.push(entry);
            }
            i += 1;
        }
    }
    env.push(ours.as_ptr());
    env.push(std::ptr::null());
    env
}

/// At load: takes back the table an exec passed on, and claims its listeners.
pub fn adopt() {
    let Some(value) = std::env::var_os(VAR) else {
        return;
    };
    // Consumed: programs this one starts get a fresh description from our own exec wrappers.
    std::env::remove_var(VAR);
    let mut ports = Vec::new();
    for entry in value.to_string_lossy().split(';') {
        let Some((fd, s, ino)) = decode(entry) else {
            continue;
        };
        if real::socket_inode(fd) != Some(ino) {
            continue; // not the same socket any more
        }
        if s.role == Role::Listener {
            ports.push(s.local.1);
        }
        state::insert(fd, s);
    }
    if !ports.is_empty() {
        ports.sort_unstable();
        ports.dedup();
        crate::session::claim_inherited_listeners(&ports);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_ignored() {
        let s = Accelerated {
            role: Role::Connection,
            local: (Ipv4Addr::new(10, 32, 0, 2), 40000),
            peer: Some((Ipv4Addr::new(10, 32, 0, 4), 5000)),
            v6: true,
            wildcard: false,
        };
        let (fd, back, ino) = decode(&encode(7, &s, 1234)).unwrap();
        assert_eq!((fd, ino), (7, 1234));
        assert_eq!(back.role, Role::Connection);
        assert_eq!(back.local, s.local);
        assert_eq!(back.peer, s.peer);
        assert!(back.v6);
        let l = Accelerated {
            role: Role::Listener,
            local: (Ipv4Addr::new(10, 32, 0, 2), 80),
            peer: None,
            v6: false,
            wildcard: true,
        };
        let (_, back, _) = decode(&encode(3, &l, 9)).unwrap();
        assert_eq!(back.peer, None);
        assert!(back.wildcard);
        let (_, old, _) = decode("3,L,10.32.0.2,80,0.0.0.0,0,0,9").unwrap();
        assert!(!old.wildcard, "an entry of an older shim");
        for bad in [
            "",
            "1,X,1.2.3.4,1,0.0.0.0,0,0,1",
            "a,b",
            "1,C,1.2.3.4,99999,0.0.0.0,0,0,1",
        ] {
            assert!(decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_environment_gets_exactly_one_description() {
        let a = CString::new("PATH=/bin").unwrap();
        let old = CString::new("FREEFLOW_FDS=stale").unwrap();
        let envp = [a.as_ptr(), old.as_ptr(), std::ptr::null()];
        let ours = CString::new("FREEFLOW_FDS=3,L,0.0.0.0,80,0.0.0.0,0,0,9").unwrap();
        // SAFETY: a NULL-terminated array of C strings that outlive the call.
        let env = unsafe { environment_with(envp.as_ptr(), &ours) };
        assert_eq!(env.len(), 3);
        assert_eq!(env[0], a.as_ptr());
        assert_eq!(env[1], ours.as_ptr());
        assert!(env[2].is_null());
    }
}
