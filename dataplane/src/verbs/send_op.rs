//! The operation of a send work request, decoded once from its WQE's opcode byte
//! (`freeflow_proto::verbs::work::wr_opcode`, the values of `enum ibv_wr_opcode`), with what
//! the engine needs to know about each.

use super::Need;
use freeflow_proto::verbs::work::{wc_opcode, wr_opcode};

/// An operation of a send WQE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendOp {
    Send,
    SendWithImm,
    Write,
    WriteWithImm,
    Read,
    CompareSwap,
    FetchAdd,
}

impl SendOp {
    /// The operation of a WQE's opcode byte, if it is one this device executes.
    pub(crate) fn decode(opcode: u8) -> Option<SendOp> {
        Some(match opcode {
            wr_opcode::SEND => SendOp::Send,
            wr_opcode::SEND_WITH_IMM => SendOp::SendWithImm,
            wr_opcode::RDMA_WRITE => SendOp::Write,
            wr_opcode::RDMA_WRITE_WITH_IMM => SendOp::WriteWithImm,
            wr_opcode::RDMA_READ => SendOp::Read,
            wr_opcode::ATOMIC_CMP_AND_SWP => SendOp::CompareSwap,
            wr_opcode::ATOMIC_FETCH_AND_ADD => SendOp::FetchAdd,
            _ => return None,
        })
    }

    /// The opcode of its completion at the requester.
    pub(crate) fn wc_opcode(self) -> u32 {
        match self {
            SendOp::Send | SendOp::SendWithImm => wc_opcode::SEND,
            SendOp::Write | SendOp::WriteWithImm => wc_opcode::RDMA_WRITE,
            SendOp::Read => wc_opcode::RDMA_READ,
            SendOp::CompareSwap => wc_opcode::COMP_SWAP,
            SendOp::FetchAdd => wc_opcode::FETCH_ADD,
        }
    }

    /// Whether it consumes a receive WQE of the responder.
    pub(crate) fn consumes_receive(self) -> bool {
        matches!(
            self,
            SendOp::Send | SendOp::SendWithImm | SendOp::WriteWithImm
        )
    }

    pub(crate) fn is_atomic(self) -> bool {
        matches!(self, SendOp::CompareSwap | SendOp::FetchAdd)
    }

    /// What it does with the local memory of its scatter/gather list: the source of a send or
    /// write is read, the destination of a read or an atomic's result is written.
    pub(crate) fn local_need(self) -> Need {
        if self == SendOp::Read || self.is_atomic() {
            Need::LocalWrite
        } else {
            Need::LocalRead
        }
    }
}

/// The completion opcode of a raw send opcode (flushes of garbage report SEND).
pub(crate) fn wc_opcode_of(opcode: u8) -> u32 {
    SendOp::decode(opcode).map_or(wc_opcode::SEND, SendOp::wc_opcode)
}
