//! The operation of a send work request, decoded once from its WQE's opcode byte through
//! proto's [`WrOpcode`] (`enum ibv_wr_opcode`), with what the engine needs to know about each.

use super::Need;
use freeflow_proto::verbs::work::{wc_opcode, WrOpcode};

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
        WrOpcode::try_from(opcode).ok().map(SendOp::from)
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

impl From<WrOpcode> for SendOp {
    fn from(op: WrOpcode) -> SendOp {
        match op {
            WrOpcode::Send => SendOp::Send,
            WrOpcode::SendWithImm => SendOp::SendWithImm,
            WrOpcode::RdmaWrite => SendOp::Write,
            WrOpcode::RdmaWriteWithImm => SendOp::WriteWithImm,
            WrOpcode::RdmaRead => SendOp::Read,
            WrOpcode::AtomicCmpAndSwp => SendOp::CompareSwap,
            WrOpcode::AtomicFetchAndAdd => SendOp::FetchAdd,
        }
    }
}

/// The completion opcode of a raw send opcode (flushes of garbage report SEND).
pub(crate) fn wc_opcode_of(opcode: u8) -> u32 {
    SendOp::decode(opcode).map_or(wc_opcode::SEND, SendOp::wc_opcode)
}
