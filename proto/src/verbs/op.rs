//! Request opcodes of the verbs shim (`0x0100..0x0200`, see [`crate::msg::op`]): the
//! [`VerbsOp`] enum, decoded once with `TryFrom<u16>`, and its numbers as constants for
//! `match` arms on a raw header.

use crate::codec::wire_enum;

wire_enum! {
    /// A verbs request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum VerbsOp: u16, from u16 {
        /// Allocate a protection domain. Body empty; reply [`super::PdCreated`].
        AllocPd = 0x0101 => ALLOC_PD,
        /// Free a protection domain. Body [`super::DeallocPd`]; reply empty.
        DeallocPd = 0x0102 => DEALLOC_PD,
        /// Register a memory region. Body [`super::RegMr`]; reply [`super::MrCreated`].
        RegMr = 0x0103 => REG_MR,
        /// Deregister a memory region. Body [`super::DeregMr`]; reply empty.
        DeregMr = 0x0104 => DEREG_MR,
        /// Create a completion channel. Body empty; reply [`super::ObjectHandle`]. Before the
        /// reply, the channel's file (the read end of a pipe the router writes the handle of each
        /// notified CQ to) comes on the attach connection ([`super::QueueFileMsg`]).
        CreateCompChannel = 0x0105 => CREATE_COMP_CHANNEL,
        /// Destroy a completion channel. Body [`super::ObjectHandle`]; reply empty (Busy while CQs
        /// use it).
        DestroyCompChannel = 0x0106 => DESTROY_COMP_CHANNEL,
        /// Create a completion queue. Body [`super::CreateCq`]; reply [`super::CqCreated`]. The
        /// CQ's region (one ring of [`super::work::Cqe`], router to shim) comes on the attach
        /// connection before the reply.
        CreateCq = 0x0107 => CREATE_CQ,
        /// Destroy a completion queue. Body [`super::ObjectHandle`]; reply empty (Busy while QPs
        /// use it).
        DestroyCq = 0x0108 => DESTROY_CQ,
        /// Create an RC queue pair. Body [`super::qp::CreateQp`]; reply [`super::qp::QpCreated`].
        /// The QP's region (send and receive rings, shim to router) comes on the attach connection
        /// before the reply.
        CreateQp = 0x0109 => CREATE_QP,
        /// Modify a QP. Body [`super::qp::ModifyQp`]; reply [`super::ObjectHandle`] holding the new
        /// state.
        ModifyQp = 0x010a => MODIFY_QP,
        /// Query a QP. Body [`super::ObjectHandle`]; reply [`super::qp::QpQueried`].
        QueryQp = 0x010b => QUERY_QP,
        /// Destroy a QP. Body [`super::ObjectHandle`]; reply empty.
        DestroyQp = 0x010c => DESTROY_QP,
        /// Resize a completion queue. Body [`super::ResizeCq`]; reply [`super::CqCreated`] (the
        /// entries the CQ has now). The CQ's new region comes on the attach connection before the
        /// reply, holding the completions not yet polled from the old one, in order; the router
        /// produces into the new ring only from then on. The shim holds the CQ's ring lock across
        /// the call, so nothing is taken from the old ring while the router copies it.
        ResizeCq = 0x010d => RESIZE_CQ,
        /// Create a shared receive queue. Body [`super::srq::CreateSrq`]; reply
        /// [`super::srq::SrqCreated`]. The SRQ's region (one ring of receive WQEs, shim to router)
        /// comes on the attach connection before the reply.
        CreateSrq = 0x010e => CREATE_SRQ,
        /// Modify an SRQ. Body [`super::srq::ModifySrq`]; reply empty.
        ModifySrq = 0x010f => MODIFY_SRQ,
        /// Query an SRQ. Body [`super::ObjectHandle`]; reply [`super::srq::SrqAttr`].
        QuerySrq = 0x0110 => QUERY_SRQ,
        /// Destroy an SRQ. Body [`super::ObjectHandle`]; reply empty (Busy while QPs use it).
        DestroySrq = 0x0111 => DESTROY_SRQ,
        /// Open the context's asynchronous event pipe (once per context). Body empty; reply
        /// empty. Before the reply, the pipe's read end comes on the attach connection
        /// ([`super::QueueFileMsg`], kind AsyncEvents, handle 0); the router writes
        /// [`super::AsyncEventRecord`]s to it.
        CreateAsyncEvents = 0x0130 => CREATE_ASYNC_EVENTS,
        /// Create an address handle (UD). Body [`super::ah::CreateAh`]; reply
        /// [`super::ObjectHandle`]. Unreachable for an address that is no container of the
        /// caller's tenant.
        CreateAh = 0x0150 => CREATE_AH,
        /// Destroy an address handle. Body [`super::ObjectHandle`]; reply empty.
        DestroyAh = 0x0151 => DESTROY_AH,
        /// Test hook, served only by a router started with `FREEFLOW_TEST_HOOKS=1`: the router
        /// reads a range of a region through its own mapping, the way the engine will, and replies
        /// with a digest. Body [`super::TestRead`]; reply [`super::TestDigest`].
        TestRead = 0x01f0 => TEST_READ,
        /// Test hook (as [`TEST_READ`]): the router writes bytes into a region through its own
        /// mapping. Body [`super::TestWrite`]; reply empty.
        TestWrite = 0x01f1 => TEST_WRITE,
    }
}

/// True for the opcodes of this module's range.
pub fn is_verbs(opcode: u16) -> bool {
    (crate::msg::op::VERBS_FIRST..crate::msg::op::VERBS_END).contains(&opcode)
}
