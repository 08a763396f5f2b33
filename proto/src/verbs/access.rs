//! Access flags of a memory region: the numbers of rdma-core's `enum ibv_access_flags`, which
//! the shim passes through unchanged, as [`AccessFlags`] and as `u32` constants, and the check
//! a registration's flags pass.

use crate::codec::wire_flags;

wire_flags! {
    /// `enum ibv_access_flags`.
    pub struct AccessFlags: u32 {
        const LOCAL_WRITE = 1;
        const REMOTE_WRITE = 1 << 1;
        const REMOTE_READ = 1 << 2;
        const REMOTE_ATOMIC = 1 << 3;
        const MW_BIND = 1 << 4;
        const ZERO_BASED = 1 << 5;
        const ON_DEMAND = 1 << 6;
        const HUGETLB = 1 << 7;
        /// Flags a device that does not know them ignores (relaxed ordering is the first).
        const OPTIONAL_RANGE = 0x3ff0_0000;
    }
}

/// Every flag a registration may name.
pub const KNOWN: u32 = AccessFlags::all().bits();

/// Why a set of access flags is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessFlagsError {
    #[error("unknown access flags {0:#x}")]
    Unknown(u32),
    #[error("remote write or remote atomic access needs local write access")]
    RemoteWriteNeedsLocalWrite,
    #[error("access flags {0:#x} are not supported by this device")]
    NotSupported(u32),
}

/// Checks the access flags of a registration the way the kernel's verbs layer does for
/// rdma-core: unknown flags and remote write or atomic access without local write are invalid;
/// optional flags are dropped; on-demand paging and zero-based regions are not supported here.
/// Returns the flags the region gets.
pub fn check_mr_access(flags: u32) -> Result<u32, AccessFlagsError> {
    let flags = AccessFlags::from_bits(flags).ok_or(AccessFlagsError::Unknown(flags & !KNOWN))?;
    if flags.intersects(AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_ATOMIC)
        && !flags.contains(AccessFlags::LOCAL_WRITE)
    {
        return Err(AccessFlagsError::RemoteWriteNeedsLocalWrite);
    }
    let unsupported = flags & (AccessFlags::ON_DEMAND | AccessFlags::ZERO_BASED);
    if !unsupported.is_empty() {
        return Err(AccessFlagsError::NotSupported(unsupported.bits()));
    }
    Ok(flags.difference(AccessFlags::OPTIONAL_RANGE).bits())
}
