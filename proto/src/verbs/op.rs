//! Request opcodes of the verbs shim (`0x0100..0x0200`, see [`crate::msg::op`]): the
//! [`VerbsOp`] enum, decoded once with `TryFrom<u16>`, and its numbers as constants for
//! `match` arms on a raw header.

use crate::codec::wire_enum;

wire_enum! {
    /// A verbs request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum VerbsOp: u16, from u16 {
        /// Allocate a protection domain. Body empty; reply [`super::PdCreated`].
        AllocPd = 0x0101,
        /// Free a protection domain. Body [`super::DeallocPd`]; reply empty.
        DeallocPd = 0x0102,
        /// Register a memory region. Body [`super::RegMr`]; reply [`super::MrCreated`].
        RegMr = 0x0103,
        /// Deregister a memory region. Body [`super::DeregMr`]; reply empty.
        DeregMr = 0x0104,
        /// Create a completion channel. Body empty; reply [`super::ObjectHandle`]. Before the
        /// reply, the channel's file (the read end of a pipe the router writes the handle of each
        /// notified CQ to) comes on the attach connection ([`super::QueueFileMsg`]).
        CreateCompChannel = 0x0105,
        /// Destroy a completion channel. Body [`super::ObjectHandle`]; reply empty (Busy while CQs
        /// use it).
        DestroyCompChannel = 0x0106,
        /// Create a completion queue. Body [`super::CreateCq`]; reply [`super::CqCreated`]. The CQ's
        /// region (one ring of [`super::work::Cqe`], router to shim) comes on the attach connection
        /// before the reply.
        CreateCq = 0x0107,
        /// Destroy a completion queue. Body [`super::ObjectHandle`]; reply empty (Busy while QPs
        /// use it).
        DestroyCq = 0x0108,
        /// Create an RC queue pair. Body [`super::qp::CreateQp`]; reply [`super::qp::QpCreated`].
        /// The QP's region (send and receive rings, shim to router) comes on the attach connection
        /// before the reply.
        CreateQp = 0x0109,
        /// Modify a QP. Body [`super::qp::ModifyQp`]; reply [`super::ObjectHandle`] holding the new
        /// state.
        ModifyQp = 0x010a,
        /// Query a QP. Body [`super::ObjectHandle`]; reply [`super::qp::QpQueried`].
        QueryQp = 0x010b,
        /// Destroy a QP. Body [`super::ObjectHandle`]; reply empty.
        DestroyQp = 0x010c,
        /// Resize a completion queue. Body [`super::ResizeCq`]; reply [`super::CqCreated`] (the
        /// entries the CQ has now). The CQ's new region comes on the attach connection before the
        /// reply, holding the completions not yet polled from the old one, in order; the router
        /// produces into the new ring only from then on. The shim holds the CQ's ring lock across
        /// the call, so nothing is taken from the old ring while the router copies it.
        ResizeCq = 0x010d,
        /// Create a shared receive queue. Body [`super::srq::CreateSrq`]; reply
        /// [`super::srq::SrqCreated`]. The SRQ's region (one ring of receive WQEs, shim to router)
        /// comes on the attach connection before the reply.
        CreateSrq = 0x010e,
        /// Modify an SRQ. Body [`super::srq::ModifySrq`]; reply empty.
        ModifySrq = 0x010f,
        /// Query an SRQ. Body [`super::ObjectHandle`]; reply [`super::srq::SrqAttr`].
        QuerySrq = 0x0110,
        /// Destroy an SRQ. Body [`super::ObjectHandle`]; reply empty (Busy while QPs use it).
        DestroySrq = 0x0111,
        /// Test hook, served only by a router started with `FREEFLOW_TEST_HOOKS=1`: the router
        /// reads a range of a region through its own mapping, the way the engine will, and replies
        /// with a digest. Body [`super::TestRead`]; reply [`super::TestDigest`].
        TestRead = 0x01f0,
        /// Test hook (as [`TEST_READ`]): the router writes bytes into a region through its own
        /// mapping. Body [`super::TestWrite`]; reply empty.
        TestWrite = 0x01f1,
    }
}

/// [`VerbsOp::AllocPd`].
pub const ALLOC_PD: u16 = VerbsOp::AllocPd as u16;
/// [`VerbsOp::DeallocPd`].
pub const DEALLOC_PD: u16 = VerbsOp::DeallocPd as u16;
/// [`VerbsOp::RegMr`].
pub const REG_MR: u16 = VerbsOp::RegMr as u16;
/// [`VerbsOp::DeregMr`].
pub const DEREG_MR: u16 = VerbsOp::DeregMr as u16;
/// [`VerbsOp::CreateCompChannel`].
pub const CREATE_COMP_CHANNEL: u16 = VerbsOp::CreateCompChannel as u16;
/// [`VerbsOp::DestroyCompChannel`].
pub const DESTROY_COMP_CHANNEL: u16 = VerbsOp::DestroyCompChannel as u16;
/// [`VerbsOp::CreateCq`].
pub const CREATE_CQ: u16 = VerbsOp::CreateCq as u16;
/// [`VerbsOp::DestroyCq`].
pub const DESTROY_CQ: u16 = VerbsOp::DestroyCq as u16;
/// [`VerbsOp::CreateQp`].
pub const CREATE_QP: u16 = VerbsOp::CreateQp as u16;
/// [`VerbsOp::ModifyQp`].
pub const MODIFY_QP: u16 = VerbsOp::ModifyQp as u16;
/// [`VerbsOp::QueryQp`].
pub const QUERY_QP: u16 = VerbsOp::QueryQp as u16;
/// [`VerbsOp::DestroyQp`].
pub const DESTROY_QP: u16 = VerbsOp::DestroyQp as u16;
/// [`VerbsOp::ResizeCq`].
pub const RESIZE_CQ: u16 = VerbsOp::ResizeCq as u16;
/// [`VerbsOp::CreateSrq`].
pub const CREATE_SRQ: u16 = VerbsOp::CreateSrq as u16;
/// [`VerbsOp::ModifySrq`].
pub const MODIFY_SRQ: u16 = VerbsOp::ModifySrq as u16;
/// [`VerbsOp::QuerySrq`].
pub const QUERY_SRQ: u16 = VerbsOp::QuerySrq as u16;
/// [`VerbsOp::DestroySrq`].
pub const DESTROY_SRQ: u16 = VerbsOp::DestroySrq as u16;
/// [`VerbsOp::TestRead`].
pub const TEST_READ: u16 = VerbsOp::TestRead as u16;
/// [`VerbsOp::TestWrite`].
pub const TEST_WRITE: u16 = VerbsOp::TestWrite as u16;

/// True for the opcodes of this module's range.
pub fn is_verbs(opcode: u16) -> bool {
    (crate::msg::op::VERBS_FIRST..crate::msg::op::VERBS_END).contains(&opcode)
}
