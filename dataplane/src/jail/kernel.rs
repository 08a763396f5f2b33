//! The system calls of the jail: `bpf(2)` (load a program, link it to a cgroup) and SO_MARK.
//! No libbpf: the programs are a few hand-written instructions (see [`super::programs`]), and
//! `union bpf_attr` is laid out here only for the two commands used, per
//! include/uapi/linux/bpf.h.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `enum bpf_cmd`: BPF_PROG_LOAD.
const BPF_PROG_LOAD: libc::c_long = 5;
/// `enum bpf_cmd`: BPF_LINK_CREATE.
const BPF_LINK_CREATE: libc::c_long = 28;
/// Room for the verifier's log of a refused program (logged once, at start).
const VERIFIER_LOG_BYTES: usize = 16 * 1024;

/// One eBPF instruction, as `struct bpf_insn` lays it out: opcode, then destination register
/// in the low nibble and source register in the high one, a signed 16-bit offset and a signed
/// 32-bit immediate.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// The BPF_PROG_LOAD member of `union bpf_attr` (fields up to `expected_attach_type`), padded
/// to the union's size as this kernel generation knows it; the kernel requires the bytes past
/// what it knows to be zero, and they are.
#[repr(C, align(8))]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u8; 72],
}

/// The BPF_LINK_CREATE member of `union bpf_attr` (no attach-type specific part).
#[repr(C, align(8))]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    rest: [u8; 48],
}

/// Loads `insns` as a program of `prog_type` for `attach_type`; on a refusal, the error
/// carries the verifier's log.
pub fn load_program(
    prog_type: u32,
    attach_type: u32,
    insns: &[Insn],
    name: &str,
) -> Result<OwnedFd, (io::Error, String)> {
    const LICENSE: &CStr = c"MIT";
    let mut log = vec![0u8; VERIFIER_LOG_BYTES];
    let mut prog_name = [0u8; 16];
    for (to, from) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *to = from;
    }
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach_type,
        rest: [0; 72],
    };
    // SAFETY: attr is a valid BPF_PROG_LOAD attribute whose pointers (instructions, license,
    // log buffer) outlive the call; the kernel writes at most log_size bytes into log.
    let fd = unsafe {
        bpf(
            BPF_PROG_LOAD,
            (&attr as *const ProgLoadAttr).cast(),
            size_of_val(&attr),
        )
    };
    fd.map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        (e, String::from_utf8_lossy(&log[..end]).trim().to_string())
    })
}

/// Links program `prog` to cgroup `cgroup` at `attach_type`: the link (and so the attachment)
/// lasts as long as the returned descriptor.
pub fn link_to_cgroup(prog: &OwnedFd, cgroup: &OwnedFd, attach_type: u32) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        rest: [0; 48],
    };
    // SAFETY: attr is a valid BPF_LINK_CREATE attribute without pointers.
    unsafe {
        bpf(
            BPF_LINK_CREATE,
            (&attr as *const LinkCreateAttr).cast(),
            size_of_val(&attr),
        )
    }
}

/// The bpf(2) system call for a command that returns a new descriptor.
///
/// # Safety
/// `attr` points to `size` readable bytes laid out as `union bpf_attr` for `cmd`, and every
/// pointer inside is valid for the kernel's use during the call.
unsafe fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<OwnedFd> {
    // SAFETY: per this function's contract.
    let raw = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the command returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Sets SO_MARK on `socket` (needs CAP_NET_ADMIN or CAP_NET_RAW in the socket's namespace).
pub fn set_mark(socket: &impl AsRawFd, mark: u32) -> io::Result<()> {
    // SAFETY: plain setsockopt with a u32 option value that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts a cgroup v2 hierarchy on directory `dir`, opens its root and detaches the mount
/// again (the descriptor keeps the cgroup): for a router whose mount namespace shows no
/// cgroup2 mount. Needs CAP_SYS_ADMIN.
pub fn open_cgroup2_by_mounting(dir: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: all strings are NUL-terminated and outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            path.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let opened = std::fs::File::open(dir).map(OwnedFd::from);
    // SAFETY: path is NUL-terminated; a lazy unmount of the mount made above.
    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    opened
}

/// The SO_MARK of `socket`.
pub fn mark_of(socket: &impl AsRawFd) -> io::Result<u32> {
    let mut mark: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mark`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mut mark as *mut u32).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mark)
}
