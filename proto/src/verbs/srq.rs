//! Shared receive queues on the wire: the bodies of the SRQ requests and replies, and the
//! attribute mask of `ibv_modify_srq` (rdma-core's numbers, `enum ibv_srq_attr_mask`).
//!
//! An SRQ is a ring of receive WQEs ([`super::work::RecvWqe`], shim to router) in a region of
//! its own; RC QPs created with it take their receives from it instead of their own receive
//! queue. The router checks every WQE it pops against the SRQ's capacities, and the keys of
//! its scatter/gather entries against the SRQ's protection domain, when a message consumes it.

use crate::codec::sequential_body;

/// `enum ibv_srq_attr_mask`, as [`SrqAttrMask`] and as `u32` constants.
pub mod mask {
    use crate::codec::wire_flags;

    wire_flags! {
        /// `enum ibv_srq_attr_mask`.
        pub struct SrqAttrMask: u32 {
            /// Resize the SRQ (a device without IBV_DEVICE_SRQ_RESIZE refuses it).
            const MAX_WR = 1;
            /// Arm the SRQ limit event (IBV_EVENT_SRQ_LIMIT_REACHED).
            const LIMIT = 1 << 1;
        }
    }

    /// Every bit of the mask.
    pub const KNOWN: u32 = SrqAttrMask::all().bits();
}

pub use mask::SrqAttrMask;

/// Body of [`super::op::CREATE_SRQ`]: at least `max_wr` receives of up to `max_sge` entries,
/// in protection domain `pd`. `srq_limit` is carried for completeness; creation ignores it,
/// as rdma-core documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreateSrq {
    pub pd: u32,
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

sequential_body!(CreateSrq {
    pd: u32,
    max_wr: u32,
    max_sge: u32,
    srq_limit: u32,
});

/// The attributes of an SRQ (`struct ibv_srq_attr`): the reply to [`super::op::QUERY_SRQ`],
/// and with the handle, the reply to [`super::op::CREATE_SRQ`] ([`SrqCreated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SrqAttr {
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

sequential_body!(SrqAttr {
    max_wr: u32,
    max_sge: u32,
    srq_limit: u32,
});

/// Reply to [`super::op::CREATE_SRQ`]: the handle and the capacities the SRQ really has (at
/// least those asked for). The SRQ's ring comes on the attach connection before the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SrqCreated {
    pub srq: u32,
    pub attr: SrqAttr,
}

sequential_body!(SrqCreated {
    srq: u32,
    attr: SrqAttr,
});

/// Body of [`super::op::MODIFY_SRQ`]: the attributes `attr_mask` ([`mask`]) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModifySrq {
    pub srq: u32,
    pub attr_mask: u32,
    pub max_wr: u32,
    pub srq_limit: u32,
}

sequential_body!(ModifySrq {
    srq: u32,
    attr_mask: u32,
    max_wr: u32,
    srq_limit: u32,
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Body;

    #[test]
    fn bodies_round_trip_at_their_length() {
        let mut buf = [0u8; 64];
        let c = CreateSrq {
            pd: 1,
            max_wr: 500,
            max_sge: 2,
            srq_limit: 9,
        };
        let n = c.encode(&mut buf);
        assert_eq!(CreateSrq::decode(&buf[..n]), Ok(c));
        assert!(CreateSrq::decode(&buf[..n - 1]).is_err());
        let r = SrqCreated {
            srq: 3,
            attr: SrqAttr {
                max_wr: 512,
                max_sge: 3,
                srq_limit: 0,
            },
        };
        let n = r.encode(&mut buf);
        assert_eq!(SrqCreated::decode(&buf[..n]), Ok(r));
        let m = ModifySrq {
            srq: 3,
            attr_mask: mask::LIMIT,
            max_wr: 0,
            srq_limit: 10,
        };
        let n = m.encode(&mut buf);
        assert_eq!(ModifySrq::decode(&buf[..n]), Ok(m));
        assert!(ModifySrq::decode(&buf[..n + 1]).is_err());
        let n = r.attr.encode(&mut buf);
        assert_eq!(SrqAttr::decode(&buf[..n]), Ok(r.attr));
    }
}
