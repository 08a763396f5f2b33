//! The rsocket I/O-mapping calls (riomap, riounmap, riowrite): present at their version, since
//! Debian's binaries bind every import at load, and refused with ENOSYS (and why, with
//! FREEFLOW_DEBUG=1): Freeflow's rsockets carry data by SEND only (docs/rsockets.md). Every one
//! returns -1: as `ssize_t` (all 64 bits set), so a caller that reads an `int`, a `size_t` or
//! an `off_t` sees -1 too.
//!
//! `#[no_mangle]` is why this module allows `unsafe_code`; it has no unsafe block.
#![allow(unsafe_code)]

use freeflow_os::errno::set_errno;

/// One rsocket function: -1 with errno ENOSYS. Arguments are not read (nor named).
macro_rules! rsocket_refused {
    ($($name:ident),* $(,)?) => {
        symbol_versions! { "RDMACM_1.0": [$($name),*] }
        $(
            #[no_mangle]
            pub extern "C" fn $name() -> isize {
                crate::debug(format_args!(
                    concat!(stringify!($name), ": riomap/riowrite are not supported by Freeflow's rsockets (SEND only)")
                ));
                set_errno(libc::ENOSYS);
                -1
            }
        )*
    };
}

rsocket_refused!(riomap, riounmap, riowrite);
