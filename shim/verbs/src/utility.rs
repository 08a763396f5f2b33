//! Exported helpers that need no device: enum descriptions, rate conversions, and the fork
//! settings.
#![allow(unsafe_code)]

use crate::abi::{IBV_FORK_DISABLED, IBV_FORK_ENABLED};
use crate::strings;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

symbol_versions! {
    "IBVERBS_1.0": [ibv_rate_to_mult, mult_to_ibv_rate],
    "IBVERBS_1.1": [
        ibv_node_type_str, ibv_port_state_str, ibv_event_type_str, ibv_wc_status_str,
        ibv_rate_to_mbps, mbps_to_ibv_rate, ibv_fork_init, ibv_dontfork_range, ibv_dofork_range,
    ],
    "IBVERBS_1.13": [ibv_is_fork_initialized],
}

#[no_mangle]
pub extern "C" fn ibv_node_type_str(node_type: c_int) -> *const c_char {
    strings::node_type(node_type).as_ptr()
}

#[no_mangle]
pub extern "C" fn ibv_port_state_str(port_state: c_int) -> *const c_char {
    strings::port_state(port_state as u32).as_ptr()
}

#[no_mangle]
pub extern "C" fn ibv_event_type_str(event: c_int) -> *const c_char {
    strings::event_type(event as u32).as_ptr()
}

#[no_mangle]
pub extern "C" fn ibv_wc_status_str(status: c_int) -> *const c_char {
    strings::wc_status(status as u32).as_ptr()
}

#[no_mangle]
pub extern "C" fn ibv_rate_to_mult(rate: c_int) -> c_int {
    strings::rate_to_mult(rate)
}

#[no_mangle]
pub extern "C" fn mult_to_ibv_rate(mult: c_int) -> c_int {
    strings::mult_to_rate(mult)
}

#[no_mangle]
pub extern "C" fn ibv_rate_to_mbps(rate: c_int) -> c_int {
    strings::rate_to_mbps(rate)
}

#[no_mangle]
pub extern "C" fn mbps_to_ibv_rate(mbps: c_int) -> c_int {
    strings::mbps_to_rate(mbps)
}

/// Set by `ibv_fork_init`.
static FORK_SAFE: AtomicBool = AtomicBool::new(false);

/// `ibv_fork_init`: 0. From then on `ibv_dontfork_range` marks ranges MADV_DONTFORK. Registered
/// memory needs no call: registration always keeps its pages out of forked children (they are a
/// shared mapping of the memory file, which a child must not inherit).
#[no_mangle]
pub extern "C" fn ibv_fork_init() -> c_int {
    FORK_SAFE.store(true, Ordering::Relaxed);
    0
}

/// `ibv_is_fork_initialized`.
#[no_mangle]
pub extern "C" fn ibv_is_fork_initialized() -> c_int {
    if FORK_SAFE.load(Ordering::Relaxed) {
        IBV_FORK_ENABLED
    } else {
        IBV_FORK_DISABLED
    }
}

/// `madvise(advice)` on the pages covering `[base, base + size)`: 0 or an errno value.
fn advise_range(base: *mut c_void, size: usize, advice: c_int) -> c_int {
    if !FORK_SAFE.load(Ordering::Relaxed) || size == 0 {
        return 0;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let start = base as usize & !(page - 1);
    let Some(end) = (base as usize)
        .checked_add(size)
        .and_then(|e| e.checked_add(page - 1))
        .map(|e| e & !(page - 1))
    else {
        return libc::EINVAL;
    };
    // SAFETY: madvise with DONTFORK/DOFORK only changes how fork treats these pages; the kernel
    // checks the range and reports unmapped or invalid ranges as errors.
    if unsafe { libc::madvise(start as *mut c_void, end - start, advice) } == 0 {
        0
    } else {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }
}

/// `ibv_dontfork_range`: after `ibv_fork_init`, keeps the range out of forked children (as
/// registered memory must be); otherwise nothing.
#[no_mangle]
pub extern "C" fn ibv_dontfork_range(base: *mut c_void, size: usize) -> c_int {
    advise_range(base, size, libc::MADV_DONTFORK)
}

/// `ibv_dofork_range`: undoes `ibv_dontfork_range`.
#[no_mangle]
pub extern "C" fn ibv_dofork_range(base: *mut c_void, size: usize) -> c_int {
    advise_range(base, size, libc::MADV_DOFORK)
}
