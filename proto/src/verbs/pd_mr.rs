//! Protection domains and memory regions on the wire: the bodies of their requests and replies.

use crate::codec::sequential_body;

/// Reply to [`super::op::ALLOC_PD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdCreated {
    pub pd: u32,
}
sequential_body!(PdCreated { pd: u32 });

/// Body of [`super::op::DEALLOC_PD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeallocPd {
    pub pd: u32,
}
sequential_body!(DeallocPd { pd: u32 });

/// Body of [`super::op::REG_MR`]: `length` bytes at the process's virtual address `addr`, known to
/// work requests as `iova` (equal to `addr` unless registered with `ibv_reg_mr_iova2`), whose
/// pages lie in memory file `file` from `file_offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegMr {
    pub pd: u32,
    pub access: u32,
    pub addr: u64,
    pub length: u64,
    pub iova: u64,
    /// [`super::OWN_MEMORY_FILE`] (the process's own memory file, where `file_offset` is the
    /// address of the first page), or the number of a further file the shim sent (a shared
    /// mapping of a memory file the program mapped itself).
    pub file: u16,
    /// File offset of the page that holds `addr`.
    pub file_offset: u64,
}
sequential_body!(RegMr {
    pd: u32,
    access: u32,
    addr: u64,
    length: u64,
    iova: u64,
    file: u16,
    file_offset: u64,
});

/// Reply to [`super::op::REG_MR`]: the region's handle and keys, all virtual (the router's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MrCreated {
    pub mr: u32,
    pub lkey: u32,
    pub rkey: u32,
}
sequential_body!(MrCreated {
    mr: u32,
    lkey: u32,
    rkey: u32,
});

/// Body of [`super::op::DEREG_MR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeregMr {
    pub mr: u32,
}
sequential_body!(DeregMr { mr: u32 });
