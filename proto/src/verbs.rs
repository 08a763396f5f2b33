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

use crate::msg::HEADER_LEN;

pub mod qp;
pub mod srq;
pub mod work;

/// Request opcodes of the verbs shim (`0x0100..0x0200`, see [`crate::msg::op`]).
pub mod op {
    /// Allocate a protection domain. Body empty; reply [`super::PdCreated`].
    pub const ALLOC_PD: u16 = 0x0101;
    /// Free a protection domain. Body [`super::DeallocPd`]; reply empty.
    pub const DEALLOC_PD: u16 = 0x0102;
    /// Register a memory region. Body [`super::RegMr`]; reply [`super::MrCreated`].
    pub const REG_MR: u16 = 0x0103;
    /// Deregister a memory region. Body [`super::DeregMr`]; reply empty.
    pub const DEREG_MR: u16 = 0x0104;
    /// Create a completion channel. Body empty; reply [`super::ObjectHandle`]. Before the
    /// reply, the channel's file (the read end of a pipe the router writes the handle of each
    /// notified CQ to) comes on the attach connection ([`super::QueueFileMsg`]).
    pub const CREATE_COMP_CHANNEL: u16 = 0x0105;
    /// Destroy a completion channel. Body [`super::ObjectHandle`]; reply empty (Busy while CQs
    /// use it).
    pub const DESTROY_COMP_CHANNEL: u16 = 0x0106;
    /// Create a completion queue. Body [`super::CreateCq`]; reply [`super::CqCreated`]. The CQ's
    /// region (one ring of [`super::work::Cqe`], router to shim) comes on the attach connection
    /// before the reply.
    pub const CREATE_CQ: u16 = 0x0107;
    /// Destroy a completion queue. Body [`super::ObjectHandle`]; reply empty (Busy while QPs
    /// use it).
    pub const DESTROY_CQ: u16 = 0x0108;
    /// Create an RC queue pair. Body [`super::qp::CreateQp`]; reply [`super::qp::QpCreated`].
    /// The QP's region (send and receive rings, shim to router) comes on the attach connection
    /// before the reply.
    pub const CREATE_QP: u16 = 0x0109;
    /// Modify a QP. Body [`super::qp::ModifyQp`]; reply [`super::ObjectHandle`] holding the new
    /// state.
    pub const MODIFY_QP: u16 = 0x010a;
    /// Query a QP. Body [`super::ObjectHandle`]; reply [`super::qp::QpQueried`].
    pub const QUERY_QP: u16 = 0x010b;
    /// Destroy a QP. Body [`super::ObjectHandle`]; reply empty.
    pub const DESTROY_QP: u16 = 0x010c;
    /// Resize a completion queue. Body [`super::ResizeCq`]; reply [`super::CqCreated`] (the
    /// entries the CQ has now). The CQ's new region comes on the attach connection before the
    /// reply, holding the completions not yet polled from the old one, in order; the router
    /// produces into the new ring only from then on. The shim holds the CQ's ring lock across
    /// the call, so nothing is taken from the old ring while the router copies it.
    pub const RESIZE_CQ: u16 = 0x010d;
    /// Create a shared receive queue. Body [`super::srq::CreateSrq`]; reply
    /// [`super::srq::SrqCreated`]. The SRQ's region (one ring of receive WQEs, shim to router)
    /// comes on the attach connection before the reply.
    pub const CREATE_SRQ: u16 = 0x010e;
    /// Modify an SRQ. Body [`super::srq::ModifySrq`]; reply empty.
    pub const MODIFY_SRQ: u16 = 0x010f;
    /// Query an SRQ. Body [`super::ObjectHandle`]; reply [`super::srq::SrqAttr`].
    pub const QUERY_SRQ: u16 = 0x0110;
    /// Destroy an SRQ. Body [`super::ObjectHandle`]; reply empty (Busy while QPs use it).
    pub const DESTROY_SRQ: u16 = 0x0111;
    /// Test hook, served only by a router started with `FREEFLOW_TEST_HOOKS=1`: the router
    /// reads a range of a region through its own mapping, the way the engine will, and replies
    /// with a digest. Body [`super::TestRead`]; reply [`super::TestDigest`].
    pub const TEST_READ: u16 = 0x01f0;
    /// Test hook (as [`TEST_READ`]): the router writes bytes into a region through its own
    /// mapping. Body [`super::TestWrite`]; reply empty.
    pub const TEST_WRITE: u16 = 0x01f1;

    /// True for the opcodes of this module's range.
    pub fn is_verbs(opcode: u16) -> bool {
        (crate::msg::op::VERBS_FIRST..crate::msg::op::VERBS_END).contains(&opcode)
    }
}

/// Statuses of verbs replies, beyond [`crate::msg::status`]. The shim turns each into the
/// errno value rdma-core reports for the same failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum VerbsStatus {
    /// An argument the verb does not accept (EINVAL).
    Invalid = 16,
    /// No such PD or MR in this container's table (EINVAL).
    BadHandle = 17,
    /// The PD still has memory regions (EBUSY).
    Busy = 18,
    /// A limit of the virtual device was reached (ENOMEM).
    NoResources = 19,
    /// The memory is not backed by the memory file the shim passed (EFAULT).
    Fault = 20,
    /// Valid, but this device does not do it (EOPNOTSUPP).
    NotSupported = 21,
    /// A registration arrived before the shim's memory file (EIO: a shim bug).
    NoMemoryFile = 22,
    /// The test hook's key, range or access did not resolve (the completion of a work request
    /// would be IBV_WC_LOC_PROT_ERR).
    Protection = 23,
    /// Test hooks are off in this router (EOPNOTSUPP).
    TestHooksOff = 24,
    /// The destination of a connection is no container this router can reach (ENETUNREACH).
    Unreachable = 25,
}

impl VerbsStatus {
    pub fn from_u16(v: u16) -> Option<VerbsStatus> {
        use VerbsStatus::*;
        [
            Invalid,
            BadHandle,
            Busy,
            NoResources,
            Fault,
            NotSupported,
            NoMemoryFile,
            Protection,
            TestHooksOff,
            Unreachable,
        ]
        .into_iter()
        .find(|s| *s as u16 == v)
    }
}

/// Access flags of a memory region: the numbers of rdma-core's `enum ibv_access_flags`, which
/// the shim passes through unchanged.
pub mod access {
    pub const LOCAL_WRITE: u32 = 1;
    pub const REMOTE_WRITE: u32 = 1 << 1;
    pub const REMOTE_READ: u32 = 1 << 2;
    pub const REMOTE_ATOMIC: u32 = 1 << 3;
    pub const MW_BIND: u32 = 1 << 4;
    pub const ZERO_BASED: u32 = 1 << 5;
    pub const ON_DEMAND: u32 = 1 << 6;
    pub const HUGETLB: u32 = 1 << 7;
    /// Flags a device that does not know them ignores (relaxed ordering is the first).
    pub const OPTIONAL_RANGE: u32 = 0x3ff0_0000;
    /// Every flag a registration may name.
    pub const KNOWN: u32 = LOCAL_WRITE
        | REMOTE_WRITE
        | REMOTE_READ
        | REMOTE_ATOMIC
        | MW_BIND
        | ZERO_BASED
        | ON_DEMAND
        | HUGETLB
        | OPTIONAL_RANGE;
}

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
    if flags & !access::KNOWN != 0 {
        return Err(AccessFlagsError::Unknown(flags & !access::KNOWN));
    }
    if flags & (access::REMOTE_WRITE | access::REMOTE_ATOMIC) != 0
        && flags & access::LOCAL_WRITE == 0
    {
        return Err(AccessFlagsError::RemoteWriteNeedsLocalWrite);
    }
    let unsupported = flags & (access::ON_DEMAND | access::ZERO_BASED);
    if unsupported != 0 {
        return Err(AccessFlagsError::NotSupported(unsupported));
    }
    Ok(flags & !access::OPTIONAL_RANGE)
}

/// Work completion statuses (`enum ibv_wc_status`) the engine produces.
pub mod wc_status {
    pub const SUCCESS: u32 = 0;
    /// The receive buffers are shorter than the message (`IBV_WC_LOC_LEN_ERR`).
    pub const LOC_LEN_ERR: u32 = 1;
    /// A malformed work request (`IBV_WC_LOC_QP_OP_ERR`).
    pub const LOC_QP_OP_ERR: u32 = 2;
    /// A local key, address range or access right did not match (`IBV_WC_LOC_PROT_ERR`).
    pub const LOC_PROT_ERR: u32 = 4;
    /// Outstanding work requests of a QP in the error state (`IBV_WC_WR_FLUSH_ERR`).
    pub const WR_FLUSH_ERR: u32 = 5;
    /// The responder could not take the message: its receive was too short
    /// (`IBV_WC_REM_INV_REQ_ERR`).
    pub const REM_INV_REQ_ERR: u32 = 9;
    /// A remote key, address range or access right did not match (`IBV_WC_REM_ACCESS_ERR`).
    pub const REM_ACCESS_ERR: u32 = 10;
    /// The responder failed the operation locally (its receive's key) (`IBV_WC_REM_OP_ERR`).
    pub const REM_OP_ERR: u32 = 11;
    /// No answer from the destination within the transport retries (`IBV_WC_RETRY_EXC_ERR`).
    pub const RETRY_EXC_ERR: u32 = 12;
    /// The responder had no receive posted for the QP's RNR retries
    /// (`IBV_WC_RNR_RETRY_EXC_ERR`).
    pub const RNR_RETRY_EXC_ERR: u32 = 13;
}

/// Limits of the virtual device that the router enforces per attachment (the shim's device
/// attributes report the same numbers).
pub mod limits {
    /// Protection domains per context.
    pub const MAX_PD: u32 = 1024;
    /// Memory regions per context.
    pub const MAX_MR: u32 = 4096;
    /// Bytes of one memory region: 4 GiB.
    pub const MAX_MR_SIZE: u64 = 1 << 32;
    /// Page-rounded bytes the router maps for one context's regions together: 1 TiB of its
    /// address space (a sanity bound; memory is only used for pages the container wrote).
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
}

/// Size of a shim's memory file: the whole x86-64 user address space (4-level paging), so a
/// page's file offset can be its virtual address. Sparse: only registered pages hold memory.
pub const MEMORY_FILE_SIZE: u64 = 1 << 47;
/// Registered memory is handled in pages of this size.
pub const PAGE_SIZE: u64 = 4096;
/// Seals a memory file must carry (`F_SEAL_SHRINK | F_SEAL_SEAL`): its size cannot go down and
/// its seals cannot change, so pages the router maps stay there.
pub const REQUIRED_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// Why a body did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what}: body of {got} bytes, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{what}: {why}")]
    Invalid {
        what: &'static str,
        why: &'static str,
    },
}

fn exact(what: &'static str, body: &[u8], expected: usize) -> Result<(), DecodeError> {
    if body.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::Length {
            what,
            got: body.len(),
            expected,
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A fixed-size body: encodes into exactly `LEN` bytes, decodes only from exactly `LEN` bytes.
pub trait Body: Sized {
    const LEN: usize;
    const NAME: &'static str;
    fn write(&self, out: &mut [u8]);
    fn read(b: &[u8]) -> Self;

    /// Encodes into the start of `out`, returning the body length.
    fn encode(&self, out: &mut [u8]) -> usize {
        self.write(&mut out[..Self::LEN]);
        Self::LEN
    }

    /// The encoded body on its own.
    fn to_vec(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::LEN];
        self.write(&mut b);
        b
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        exact(Self::NAME, body, Self::LEN)?;
        Ok(Self::read(body))
    }
}

/// Reply to [`op::ALLOC_PD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdCreated {
    pub pd: u32,
}

impl Body for PdCreated {
    const LEN: usize = 4;
    const NAME: &'static str = "PdCreated";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.pd.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        PdCreated { pd: u32_at(b, 0) }
    }
}

/// Body of [`op::DEALLOC_PD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeallocPd {
    pub pd: u32,
}

impl Body for DeallocPd {
    const LEN: usize = 4;
    const NAME: &'static str = "DeallocPd";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.pd.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        DeallocPd { pd: u32_at(b, 0) }
    }
}

/// Body of [`op::REG_MR`]: `length` bytes at the process's virtual address `addr`, known to
/// work requests as `iova` (equal to `addr` unless registered with `ibv_reg_mr_iova2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegMr {
    pub pd: u32,
    pub access: u32,
    pub addr: u64,
    pub length: u64,
    pub iova: u64,
}

impl Body for RegMr {
    const LEN: usize = 32;
    const NAME: &'static str = "RegMr";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.pd.to_le_bytes());
        out[4..8].copy_from_slice(&self.access.to_le_bytes());
        out[8..16].copy_from_slice(&self.addr.to_le_bytes());
        out[16..24].copy_from_slice(&self.length.to_le_bytes());
        out[24..32].copy_from_slice(&self.iova.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        RegMr {
            pd: u32_at(b, 0),
            access: u32_at(b, 4),
            addr: u64_at(b, 8),
            length: u64_at(b, 16),
            iova: u64_at(b, 24),
        }
    }
}

/// Reply to [`op::REG_MR`]: the region's handle and keys, all virtual (the router's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MrCreated {
    pub mr: u32,
    pub lkey: u32,
    pub rkey: u32,
}

impl Body for MrCreated {
    const LEN: usize = 12;
    const NAME: &'static str = "MrCreated";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.mr.to_le_bytes());
        out[4..8].copy_from_slice(&self.lkey.to_le_bytes());
        out[8..12].copy_from_slice(&self.rkey.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        MrCreated {
            mr: u32_at(b, 0),
            lkey: u32_at(b, 4),
            rkey: u32_at(b, 8),
        }
    }
}

/// Body of [`op::DEREG_MR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeregMr {
    pub mr: u32,
}

impl Body for DeregMr {
    const LEN: usize = 4;
    const NAME: &'static str = "DeregMr";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.mr.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        DeregMr { mr: u32_at(b, 0) }
    }
}

/// A handle of a CQ, QP or completion channel: the body of the destroy and query requests, and
/// the reply to [`op::CREATE_COMP_CHANNEL`] and [`op::MODIFY_QP`] (the new state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectHandle {
    pub handle: u32,
}

impl Body for ObjectHandle {
    const LEN: usize = 4;
    const NAME: &'static str = "ObjectHandle";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.handle.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        ObjectHandle {
            handle: u32_at(b, 0),
        }
    }
}

/// Body of [`op::CREATE_CQ`]: at least `cqe` entries, notifications to `channel` (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateCq {
    pub cqe: u32,
    pub channel: u32,
    pub comp_vector: u32,
}

impl Body for CreateCq {
    const LEN: usize = 12;
    const NAME: &'static str = "CreateCq";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.cqe.to_le_bytes());
        out[4..8].copy_from_slice(&self.channel.to_le_bytes());
        out[8..12].copy_from_slice(&self.comp_vector.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        CreateCq {
            cqe: u32_at(b, 0),
            channel: u32_at(b, 4),
            comp_vector: u32_at(b, 8),
        }
    }
}

/// Body of [`op::RESIZE_CQ`]: at least `cqe` entries for CQ `cq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeCq {
    pub cq: u32,
    pub cqe: u32,
}

impl Body for ResizeCq {
    const LEN: usize = 8;
    const NAME: &'static str = "ResizeCq";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.cq.to_le_bytes());
        out[4..8].copy_from_slice(&self.cqe.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        ResizeCq {
            cq: u32_at(b, 0),
            cqe: u32_at(b, 4),
        }
    }
}

/// Reply to [`op::CREATE_CQ`]: the handle and the entries the CQ really has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqCreated {
    pub cq: u32,
    pub cqe: u32,
}

impl Body for CqCreated {
    const LEN: usize = 8;
    const NAME: &'static str = "CqCreated";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.cq.to_le_bytes());
        out[4..8].copy_from_slice(&self.cqe.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        CqCreated {
            cq: u32_at(b, 0),
            cqe: u32_at(b, 4),
        }
    }
}

/// What a [`QueueFileMsg`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum QueueFileKind {
    /// A CQ's region: one ring of CQEs (router to shim).
    Cq = 1,
    /// A QP's region: the send ring and the receive ring (shim to router).
    Qp = 2,
    /// A completion channel: the read end of the pipe the router writes notified CQ handles
    /// to, 4 bytes (little-endian) each.
    Channel = 3,
    /// A shared receive queue's region: one ring of receive WQEs (shim to router).
    Srq = 4,
}

/// The message the router sends on the attach connection, with one fd (SCM_RIGHTS), right
/// before the reply to a request that creates a CQ, QP, SRQ or completion channel (or resizes
/// a CQ). Sent without blocking: a shim that does not read its connection gets a refusal, not
/// a stuck router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFileMsg {
    pub kind: QueueFileKind,
    pub handle: u32,
}

const QUEUE_FILE_MAGIC: [u8; 4] = *b"FFQF";

impl QueueFileMsg {
    pub const LEN: usize = 12;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&QUEUE_FILE_MAGIC);
        b[4..6].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.handle.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<QueueFileMsg, DecodeError> {
        exact("QueueFileMsg", b, Self::LEN)?;
        let invalid = |why| DecodeError::Invalid {
            what: "QueueFileMsg",
            why,
        };
        if b[0..4] != QUEUE_FILE_MAGIC {
            return Err(invalid("bad magic"));
        }
        let kind = match u16::from_le_bytes([b[4], b[5]]) {
            1 => QueueFileKind::Cq,
            2 => QueueFileKind::Qp,
            3 => QueueFileKind::Channel,
            4 => QueueFileKind::Srq,
            _ => return Err(invalid("unknown kind")),
        };
        Ok(QueueFileMsg {
            kind,
            handle: u32_at(b, 8),
        })
    }
}

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

/// Body of [`op::TEST_READ`]: `length` bytes at `addr` (in the region's iova space, as in a
/// scatter/gather entry) of the region with local key `lkey` in protection domain `pd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRead {
    pub pd: u32,
    pub lkey: u32,
    pub addr: u64,
    pub length: u64,
}

impl Body for TestRead {
    const LEN: usize = 24;
    const NAME: &'static str = "TestRead";
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.pd.to_le_bytes());
        out[4..8].copy_from_slice(&self.lkey.to_le_bytes());
        out[8..16].copy_from_slice(&self.addr.to_le_bytes());
        out[16..24].copy_from_slice(&self.length.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        TestRead {
            pd: u32_at(b, 0),
            lkey: u32_at(b, 4),
            addr: u64_at(b, 8),
            length: u64_at(b, 16),
        }
    }
}

/// Reply to [`op::TEST_READ`]: the [`Fnv1a`] digest of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestDigest {
    pub digest: u64,
}

impl Body for TestDigest {
    const LEN: usize = 8;
    const NAME: &'static str = "TestDigest";
    fn write(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.digest.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        TestDigest {
            digest: u64_at(b, 0),
        }
    }
}

/// Most data bytes in one [`TestWrite`] (fits the smallest slot of 64 bytes).
pub const MAX_TEST_WRITE: usize = 64 - HEADER_LEN - TestWrite::FIXED_LEN;

/// Body of [`op::TEST_WRITE`]: `data` to write at `addr` (iova space) of the region with local
/// key `lkey` in protection domain `pd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestWrite {
    pub pd: u32,
    pub lkey: u32,
    pub addr: u64,
    pub data: Vec<u8>,
}

impl TestWrite {
    /// Bytes before the data.
    pub const FIXED_LEN: usize = 16;

    /// Encodes into `out`; None if the data is longer than [`MAX_TEST_WRITE`] or `out` is short.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let len = Self::FIXED_LEN + self.data.len();
        if self.data.len() > MAX_TEST_WRITE || out.len() < len {
            return None;
        }
        out[0..4].copy_from_slice(&self.pd.to_le_bytes());
        out[4..8].copy_from_slice(&self.lkey.to_le_bytes());
        out[8..16].copy_from_slice(&self.addr.to_le_bytes());
        out[16..len].copy_from_slice(&self.data);
        Some(len)
    }

    pub fn decode(body: &[u8]) -> Result<TestWrite, DecodeError> {
        if body.len() < Self::FIXED_LEN || body.len() > Self::FIXED_LEN + MAX_TEST_WRITE {
            return Err(DecodeError::Invalid {
                what: "TestWrite",
                why: "body shorter than its fixed part or data longer than MAX_TEST_WRITE",
            });
        }
        Ok(TestWrite {
            pd: u32_at(body, 0),
            lkey: u32_at(body, 4),
            addr: u64_at(body, 8),
            data: body[Self::FIXED_LEN..].to_vec(),
        })
    }
}

/// The message a verbs shim sends on its attach connection, with its memory file attached by
/// SCM_RIGHTS, before the first registration on that attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFileMsg {
    /// The file's size as the shim made it; the router checks it against the file.
    pub size: u64,
}

const MEMORY_FILE_MAGIC: [u8; 4] = *b"FFMF";
/// Version of [`MemoryFileMsg`].
pub const MEMORY_FILE_VERSION: u16 = 1;

impl MemoryFileMsg {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&MEMORY_FILE_MAGIC);
        b[4..6].copy_from_slice(&MEMORY_FILE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<MemoryFileMsg, DecodeError> {
        exact("MemoryFileMsg", b, Self::LEN)?;
        let invalid = |why| DecodeError::Invalid {
            what: "MemoryFileMsg",
            why,
        };
        if b[0..4] != MEMORY_FILE_MAGIC {
            return Err(invalid("bad magic"));
        }
        if u16::from_le_bytes([b[4], b[5]]) != MEMORY_FILE_VERSION {
            return Err(invalid("unknown version"));
        }
        if b[6..8] != [0, 0] {
            return Err(invalid("reserved bytes set"));
        }
        Ok(MemoryFileMsg { size: u64_at(b, 8) })
    }
}

/// 64-bit FNV-1a, the digest of the test hooks: simple enough to compute in a few lines of C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn digest(bytes: &[u8]) -> u64 {
        let mut h = Fnv1a::default();
        h.update(bytes);
        h.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Body + PartialEq + std::fmt::Debug>(value: T) {
        let mut buf = [0xeeu8; 64];
        let n = value.encode(&mut buf);
        assert_eq!(n, T::LEN);
        assert_eq!(T::decode(&buf[..n]).unwrap(), value);
        // One byte short or long is refused, whatever the bytes are.
        assert!(
            matches!(
                T::decode(&buf[..n.saturating_sub(1)]),
                Err(DecodeError::Length { .. })
            ) || n == 0
        );
        assert!(matches!(
            T::decode(&buf[..n + 1]),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn bodies_round_trip_and_decode_only_at_their_length() {
        round_trip(PdCreated { pd: 7 });
        round_trip(DeallocPd { pd: u32::MAX });
        round_trip(RegMr {
            pd: 1,
            access: access::LOCAL_WRITE | access::REMOTE_READ,
            addr: 0x7fff_1234_5678,
            length: u64::MAX,
            iova: 3,
        });
        round_trip(MrCreated {
            mr: 9,
            lkey: 0xdead_beef,
            rkey: 0x1234_5678,
        });
        round_trip(DeregMr { mr: 0 });
        round_trip(TestRead {
            pd: 2,
            lkey: 3,
            addr: u64::MAX,
            length: 1 << 40,
        });
        round_trip(TestDigest { digest: 42 });
    }

    #[test]
    fn every_request_fits_the_smallest_slot() {
        for len in [
            RegMr::LEN,
            DeallocPd::LEN,
            DeregMr::LEN,
            TestRead::LEN,
            TestWrite::FIXED_LEN + MAX_TEST_WRITE,
            MrCreated::LEN,
            TestDigest::LEN,
        ] {
            assert!(HEADER_LEN + len <= 64, "{len}");
        }
    }

    #[test]
    fn queue_bodies_round_trip_and_fit_a_verbs_slot() {
        round_trip(ObjectHandle { handle: 77 });
        round_trip(CreateCq {
            cqe: 500,
            channel: 3,
            comp_vector: 0,
        });
        round_trip(CqCreated { cq: 1, cqe: 512 });
        round_trip(ResizeCq { cq: 2, cqe: 70 });
        for len in [
            qp::ModifyQp::LEN,
            qp::QpQueried::LEN,
            qp::CreateQp::LEN,
            qp::QpCreated::LEN,
            MAX_REPLY_BODY,
        ] {
            assert!(HEADER_LEN + len <= MIN_SLOT_SIZE as usize, "{len}");
        }
        let m = QueueFileMsg {
            kind: QueueFileKind::Qp,
            handle: 9,
        };
        let b = m.encode();
        assert_eq!(QueueFileMsg::decode(&b), Ok(m));
        let mut bad = b;
        bad[4] = 7;
        assert!(QueueFileMsg::decode(&bad).is_err());
        assert!(QueueFileMsg::decode(&b[..11]).is_err());
        let mut bad = b;
        bad[1] = 0;
        assert!(QueueFileMsg::decode(&bad).is_err());
    }

    #[test]
    fn test_write_bounds_its_data() {
        let w = TestWrite {
            pd: 1,
            lkey: 2,
            addr: 3,
            data: vec![7; MAX_TEST_WRITE],
        };
        let mut buf = [0u8; 64];
        let n = w.encode(&mut buf).unwrap();
        assert_eq!(TestWrite::decode(&buf[..n]).unwrap(), w);
        assert!(TestWrite::decode(&buf[..TestWrite::FIXED_LEN - 1]).is_err());
        let empty = TestWrite::decode(&buf[..TestWrite::FIXED_LEN]).unwrap();
        assert!(empty.data.is_empty());
        let long = TestWrite {
            data: vec![0; MAX_TEST_WRITE + 1],
            ..w
        };
        assert!(long.encode(&mut [0u8; 128]).is_none());
        assert!(
            TestWrite::decode(&[0u8; 128][..TestWrite::FIXED_LEN + MAX_TEST_WRITE + 1]).is_err()
        );
    }

    #[test]
    fn access_flags_are_checked_as_rdma_core_reports_them() {
        use access::*;
        assert_eq!(check_mr_access(0), Ok(0));
        assert_eq!(check_mr_access(LOCAL_WRITE), Ok(LOCAL_WRITE));
        assert_eq!(
            check_mr_access(LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ | REMOTE_ATOMIC),
            Ok(LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ | REMOTE_ATOMIC)
        );
        assert_eq!(check_mr_access(REMOTE_READ), Ok(REMOTE_READ));
        assert_eq!(
            check_mr_access(REMOTE_WRITE),
            Err(AccessFlagsError::RemoteWriteNeedsLocalWrite)
        );
        assert_eq!(
            check_mr_access(REMOTE_ATOMIC | REMOTE_READ),
            Err(AccessFlagsError::RemoteWriteNeedsLocalWrite)
        );
        assert_eq!(
            check_mr_access(1 << 8),
            Err(AccessFlagsError::Unknown(1 << 8))
        );
        assert_eq!(
            check_mr_access(LOCAL_WRITE | 1 << 31),
            Err(AccessFlagsError::Unknown(1 << 31))
        );
        // Relaxed ordering (the first optional flag) is dropped, not refused.
        assert_eq!(check_mr_access(LOCAL_WRITE | 1 << 20), Ok(LOCAL_WRITE));
        assert_eq!(
            check_mr_access(LOCAL_WRITE | ON_DEMAND),
            Err(AccessFlagsError::NotSupported(ON_DEMAND))
        );
        assert_eq!(check_mr_access(MW_BIND | HUGETLB), Ok(MW_BIND | HUGETLB));
    }

    #[test]
    fn memory_file_message_is_checked() {
        let m = MemoryFileMsg {
            size: MEMORY_FILE_SIZE,
        };
        let b = m.encode();
        assert_eq!(MemoryFileMsg::decode(&b), Ok(m));
        assert!(MemoryFileMsg::decode(&b[..15]).is_err());
        let mut bad = b;
        bad[0] = b'X';
        assert!(MemoryFileMsg::decode(&bad).is_err());
        let mut bad = b;
        bad[4] = 9;
        assert!(MemoryFileMsg::decode(&bad).is_err());
        let mut bad = b;
        bad[7] = 1;
        assert!(MemoryFileMsg::decode(&bad).is_err());
    }

    #[test]
    fn statuses_round_trip_and_opcodes_are_in_range() {
        for v in 0..64u16 {
            if let Some(s) = VerbsStatus::from_u16(v) {
                assert_eq!(s as u16, v);
            }
        }
        assert_eq!(VerbsStatus::from_u16(16), Some(VerbsStatus::Invalid));
        assert_eq!(VerbsStatus::from_u16(0), None);
        for o in [
            op::ALLOC_PD,
            op::DEALLOC_PD,
            op::REG_MR,
            op::DEREG_MR,
            op::TEST_READ,
            op::TEST_WRITE,
            op::CREATE_COMP_CHANNEL,
            op::DESTROY_COMP_CHANNEL,
            op::CREATE_CQ,
            op::DESTROY_CQ,
            op::CREATE_QP,
            op::MODIFY_QP,
            op::QUERY_QP,
            op::DESTROY_QP,
            op::RESIZE_CQ,
            op::CREATE_SRQ,
            op::MODIFY_SRQ,
            op::QUERY_SRQ,
            op::DESTROY_SRQ,
        ] {
            assert!(op::is_verbs(o));
        }
        assert!(!op::is_verbs(crate::msg::op::PING));
    }

    #[test]
    fn fnv1a_known_values() {
        assert_eq!(Fnv1a::digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv1a::digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv1a::default();
        h.update(b"foo");
        h.update(b"bar");
        assert_eq!(h.0, Fnv1a::digest(b"foobar"));
        assert_eq!(Fnv1a::digest(b"foobar"), 0x85944171f73967e8);
    }
}
