//! RDMA mode on the rings: the verbs requests a verbs shim sends on its context's attachment, the
//! bodies of their replies, the statuses those replies carry, the access flags of memory
//! regions, and the one message a verbs shim sends on its attach connection (its memory file,
//! with SCM_RIGHTS).
//!
//! Every body has a fixed layout, little-endian, and decodes only at its exact length (the test
//! write, whose data follows a fixed part, is the one variable body). Decoding checks shapes;
//! the router's verbs table checks meaning (handles, keys, bounds) against the container's own
//! tables.
//!
//! Registered memory (DESIGN.md section 7): the shim moves the pages of a registered range onto
//! one memory file per process, at the file offset equal to the page's virtual address, so two
//! regions on one page share that page, and the router maps the file range of a region itself.
//! The file is a memfd sized [`MEMORY_FILE_SIZE`] (sparse: only registered pages use memory) and
//! sealed against shrinking ([`REQUIRED_SEALS`]), so nothing the container does later can make
//! the router's accesses fault.
//!
//! One file per concept: [`op`] (the requests), [`status`] (reply and completion statuses),
//! [`access`] (memory region access flags), [`limits`], the bodies of [`pd_mr`], [`cq`],
//! [`qp`] and [`srq`], the router-to-router frames of RDMA between hosts ([`remote`]), the messages that travel with a file ([`files`]), the asynchronous event records
//! ([`async_event`]), the queues' work
//! requests and completions ([`work`]) and the [`test_hooks`]. Every layout follows the
//! convention of [`crate::codec`].

pub mod access;
pub mod ah;
pub mod async_event;
pub mod cq;
pub mod device;
pub mod files;
pub mod grh;
pub mod limits;
pub mod op;
pub mod pd_mr;
pub mod qp;
pub mod remote;
pub mod srq;
pub mod status;
pub mod test_hooks;
pub mod work;

pub use crate::codec::{Body, DecodeError};
pub use access::{check_mr_access, AccessFlags, AccessFlagsError};
pub use async_event::AsyncEventRecord;
pub use cq::{cq_flags, CqCreated, CreateCq, ObjectHandle, ResizeCq};
pub use files::{MemoryFileMsg, QueueFileKind, QueueFileMsg, MEMORY_FILE_VERSION};
pub use op::VerbsOp;
pub use pd_mr::{DeallocPd, DeregMr, MrCreated, PdCreated, RegMr};
pub use status::{wc_status, VerbsStatus};
pub use test_hooks::{Fnv1a, TestDigest, TestRead, TestWrite, MAX_TEST_WRITE};

/// Size of a shim's memory file: the whole x86-64 user address space (4-level paging), so a
/// page's file offset can be its virtual address. Sparse: only registered pages hold memory.
pub const MEMORY_FILE_SIZE: u64 = 1 << 47;
/// [`RegMr::file`] and [`MemoryFileMsg::file`] of the process's own memory file.
pub const OWN_MEMORY_FILE: u16 = 0;
/// Further memory files one attachment may hand the router (shared mappings of memfds the
/// program made or received itself).
pub const MAX_FURTHER_MEMORY_FILES: usize = 64;
/// Registered memory is handled in pages of this size.
pub const PAGE_SIZE: u64 = 4096;
/// Seals a memory file must carry (`F_SEAL_SHRINK | F_SEAL_SEAL`): its size cannot go down and
/// its seals cannot change, so pages the router maps stay there.
pub const REQUIRED_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// Smallest slot of a verbs attachment's request and reply rings: room for the largest body
/// ([`qp::ModifyQp`], [`qp::QpQueried`]). The router gives verbs attachments slots of at least
/// this size whatever its `--slot-size`.
pub const MIN_SLOT_SIZE: u32 = 256;

/// Largest reply body of a verbs request.
pub const MAX_REPLY_BODY: usize = qp::QpQueried::LEN;

/// Ring of a QP's region that carries send WQEs.
pub const SEND_RING: usize = 0;
/// Ring of a QP's region that carries receive WQEs.
pub const RECV_RING: usize = 1;

#[cfg(test)]
mod tests;
