//! Completion queues on the wire: the bodies of their requests and replies, and the handle that
//! names any queue object in a request or reply.

use crate::codec::sequential_body;

/// A handle of a CQ, QP or completion channel: the body of the destroy and query requests, and
/// the reply to [`super::op::CREATE_COMP_CHANNEL`] and [`super::op::MODIFY_QP`] (the new state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectHandle {
    pub handle: u32,
}
sequential_body!(ObjectHandle { handle: u32 });

/// Body of [`super::op::CREATE_CQ`]: at least `cqe` entries, notifications to `channel` (0: none),
/// options in `flags` ([`cq_flags`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateCq {
    pub cqe: u32,
    pub channel: u32,
    pub comp_vector: u32,
    pub flags: u32,
}
sequential_body!(CreateCq {
    cqe: u32,
    channel: u32,
    comp_vector: u32,
    flags: u32,
});

/// `CreateCq::flags`.
pub mod cq_flags {
    /// Each completion carries the time the engine produced it (`Cqe::encode_stamped`): a
    /// clock read per completion, paid only by CQs that ask (`ibv_create_cq_ex` with
    /// IBV_WC_EX_WITH_COMPLETION_TIMESTAMP).
    pub const TIMESTAMPS: u32 = 1;
    pub const KNOWN: u32 = TIMESTAMPS;
}

/// Body of [`super::op::RESIZE_CQ`]: at least `cqe` entries for CQ `cq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeCq {
    pub cq: u32,
    pub cqe: u32,
}
sequential_body!(ResizeCq { cq: u32, cqe: u32 });

/// Reply to [`super::op::CREATE_CQ`]: the handle and the entries the CQ really has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqCreated {
    pub cq: u32,
    pub cqe: u32,
}
sequential_body!(CqCreated { cq: u32, cqe: u32 });
