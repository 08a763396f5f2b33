//! Limits of the virtual device that the router enforces per attachment (the shim's device
//! attributes report the same numbers).

/// Protection domains per context.
pub const MAX_PD: u32 = 1024;
/// Memory regions per context.
pub const MAX_MR: u32 = 4096;
/// Bytes of one memory region: 4 GiB.
pub const MAX_MR_SIZE: u64 = 1 << 32;
/// Page-rounded bytes the router maps for one container's regions together, over all its
/// contexts: 1 TiB of its address space (memory is only used for pages the container wrote or
/// populated, or holes it punched after registration; see the router's `verbs::memory`).
pub const MAX_MAPPED_BYTES: u64 = 1 << 40;
/// Completion queues per context.
pub const MAX_CQ: u32 = 1024;
/// Entries of one completion queue.
pub const MAX_CQE: u32 = 65535;
/// Queue pairs per context.
pub const MAX_QP: u32 = 1024;
/// Work requests per send or receive queue.
pub const MAX_QP_WR: u32 = 4096;
/// Shared receive queues per context.
pub const MAX_SRQ: u32 = 1024;
/// Work requests per shared receive queue.
pub const MAX_SRQ_WR: u32 = 4096;
/// Scatter/gather entries per work request of a shared receive queue.
pub const MAX_SRQ_SGE: u32 = super::work::MAX_SGE;
/// Scatter/gather entries per work request.
pub const MAX_SGE: u32 = super::work::MAX_SGE;
/// Inline data per send work request.
pub const MAX_INLINE_DATA: u32 = 960;
/// Completion channels per context.
pub const MAX_COMP_CHANNELS: u32 = 1024;
/// Outstanding RDMA reads and atomics per QP (accepted in the attributes; the engine
/// executes them at once).
pub const MAX_QP_RD_ATOM: u32 = 16;
/// Largest message: 2 GiB, RoCE's limit.
pub const MAX_MSG_SZ: u64 = 1 << 31;
/// Address handles per context.
pub const MAX_AH: u32 = 65536;
/// The port's active MTU in bytes (`IBV_MTU_1024`, what RoCE gets over a 1500-byte Ethernet
/// MTU): the largest UD message.
pub const UD_MTU: u32 = 1024;
