//! Work requests and completions in the queues' shared memory (RDMA mode's fast path).
//!
//! Each QP has a region (created by the router, passed to the shim on the attach connection)
//! with two rings the shim produces into: the send queue ([`SendWqe`] per slot) and the receive
//! queue ([`RecvWqe`] per slot). Each CQ has a region with one ring the router produces into,
//! one [`Cqe`] per slot. Posting and polling are ring pushes and pops: no system call, except
//! a doorbell when the router's shard is parked (the ring's park/wake protocol).
//!
//! The router reads WQEs from a private copy of the slot and checks every field (counts against
//! the QP's capacities, lengths against the slot); keys and addresses are checked when the work
//! request executes, against the container's own tables. A CQE is written by the router in the
//! layout of rdma-core's `struct ibv_wc` on x86-64, so the shim copies a slot straight into the
//! program's array (the shim trusts its router, not the other way round).

use crate::codec::{self, sequential_body, DecodeError};

/// `enum ibv_wr_opcode` as [`WrOpcode`], and its numbers as `u8` constants for code that
/// keeps the raw byte.
pub mod wr_opcode {
    use crate::codec::wire_enum;

    wire_enum! {
        /// `enum ibv_wr_opcode`: the opcodes the engine executes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum WrOpcode: u8, from u8, u32 {
            RdmaWrite = 0 => RDMA_WRITE,
            RdmaWriteWithImm = 1 => RDMA_WRITE_WITH_IMM,
            Send = 2 => SEND,
            SendWithImm = 3 => SEND_WITH_IMM,
            RdmaRead = 4 => RDMA_READ,
            AtomicCmpAndSwp = 5 => ATOMIC_CMP_AND_SWP,
            AtomicFetchAndAdd = 6 => ATOMIC_FETCH_AND_ADD,
        }
    }

    /// True for the opcodes above.
    pub fn is_supported(op: u32) -> bool {
        WrOpcode::try_from(op).is_ok()
    }
}

pub use wr_opcode::WrOpcode;

/// `enum ibv_send_flags`, as [`SendFlags`] and as `u32` constants.
pub mod send_flags {
    use crate::codec::wire_flags;

    wire_flags! {
        /// `enum ibv_send_flags`.
        pub struct SendFlags: u32 {
            const FENCE = 1;
            const SIGNALED = 1 << 1;
            const SOLICITED = 1 << 2;
            const INLINE = 1 << 3;
            const IP_CSUM = 1 << 4;
        }
    }

    /// The flags a WQE carries.
    pub const KNOWN: u32 = FENCE | SIGNALED | SOLICITED | INLINE;
}

pub use send_flags::SendFlags;

/// `enum ibv_wc_opcode` as [`WcOpcode`], and its numbers as `u32` constants for code that
/// keeps the raw word (as a [`Cqe`] does).
pub mod wc_opcode {
    use crate::codec::wire_enum;

    wire_enum! {
        /// `enum ibv_wc_opcode`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum WcOpcode: u32, from u32 {
            Send = 0 => SEND,
            RdmaWrite = 1 => RDMA_WRITE,
            RdmaRead = 2 => RDMA_READ,
            CompSwap = 3 => COMP_SWAP,
            FetchAdd = 4 => FETCH_ADD,
            Recv = 128 => RECV,
            RecvRdmaWithImm = 129 => RECV_RDMA_WITH_IMM,
        }
    }
}

pub use wc_opcode::WcOpcode;

/// `enum ibv_wc_flags`, as [`WcFlags`] and as `u32` constants.
pub mod wc_flags {
    use crate::codec::wire_flags;

    wire_flags! {
        /// `enum ibv_wc_flags` (the flags this device sets).
        pub struct WcFlags: u32 {
            /// A UD receive starts with the 40 bytes of the packet's global route header.
            const GRH = 1;
            const WITH_IMM = 1 << 1;
        }
    }
}

pub use wc_flags::WcFlags;

/// One scatter/gather entry (`struct ibv_sge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

sequential_body!(Sge {
    addr: u64,
    length: u32,
    lkey: u32,
} with inherent codec);

/// Most scatter/gather entries in one work request (the device's `max_sge`).
pub const MAX_SGE: u32 = 16;

/// The fixed part of a send WQE, before its scatter/gather entries or inline data:
///
/// ```text
///  0 wr_id u64        8 opcode u8   9 flags u8   10 num_sge u16   12 imm_data u32 (as posted)
/// 16 remote_addr u64 24 rkey u32   28 inline_len u32
/// 32 compare_add u64 40 swap u64   48 sges (16 bytes each) or inline bytes
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendWqeHeader {
    pub wr_id: u64,
    pub opcode: u8,
    /// `send_flags`, limited to [`send_flags::KNOWN`].
    pub flags: u8,
    pub num_sge: u16,
    /// `imm_data`, in the byte order the program wrote it (network order); passed through.
    pub imm_data: u32,
    pub remote_addr: u64,
    pub rkey: u32,
    /// Bytes of inline data following the header (with [`send_flags::INLINE`]).
    pub inline_len: u32,
    pub compare_add: u64,
    pub swap: u64,
}

sequential_body!(SendWqeHeader {
    wr_id: u64,
    opcode: u8,
    flags: u8,
    num_sge: u16,
    imm_data: u32,
    remote_addr: u64,
    rkey: u32,
    inline_len: u32,
    compare_add: u64,
    swap: u64,
} with inherent codec);

impl SendWqeHeader {
    pub fn has(&self, flag: u32) -> bool {
        u32::from(self.flags) & flag != 0
    }
}

/// Bytes of the global route header in front of every UD receive (`struct ibv_grh`).
pub const GRH_LEN: usize = 40;

/// A UD send's destination. UD has no remote address, rkey or atomic operands, so the header
/// fields of those carry it: `rkey` the address handle (the sender's context's handle),
/// `remote_addr` the remote QP number (low 32 bits) and the remote qkey (high 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdDest {
    pub ah: u32,
    pub remote_qpn: u32,
    pub remote_qkey: u32,
}

impl UdDest {
    /// The destination a UD send's header carries.
    pub fn of(h: &SendWqeHeader) -> UdDest {
        UdDest {
            ah: h.rkey,
            remote_qpn: h.remote_addr as u32,
            remote_qkey: (h.remote_addr >> 32) as u32,
        }
    }

    /// Stores the destination in a UD send's header.
    pub fn put(self, h: &mut SendWqeHeader) {
        h.rkey = self.ah;
        h.remote_addr = u64::from(self.remote_qpn) | (u64::from(self.remote_qkey) << 32);
    }
}

/// A send WQE as the router decoded it from its copy of a slot: the checked header. Its
/// scatter/gather entries and inline data stay in the slot copy ([`SendWqe::sges`],
/// [`SendWqe::inline`]), so the WQE is small to move and the fast path allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWqe {
    pub header: SendWqeHeader,
}

impl SendWqe {
    /// Bytes a WQE with `num_sge` entries or `inline_len` inline bytes needs in a slot.
    pub fn slot_bytes(num_sge: u32, inline_len: u32) -> usize {
        SendWqeHeader::LEN + (num_sge as usize * Sge::LEN).max(inline_len as usize)
    }

    /// Decodes the WQE in `slot` (the router's copy), checking its shape against the QP's
    /// capacities: opcode known, flags known, at most `max_sge` entries and at most
    /// `max_inline` inline bytes, all inside the slot.
    pub fn decode(slot: &[u8], max_sge: u32, max_inline: u32) -> Result<SendWqe, DecodeError> {
        let invalid = |why| DecodeError::Invalid {
            what: "SendWqe",
            why,
        };
        if slot.len() < SendWqeHeader::LEN {
            return Err(invalid("slot shorter than the header"));
        }
        let header = SendWqeHeader::read(slot);
        WrOpcode::try_from(header.opcode)?;
        if u32::from(header.flags) & !send_flags::KNOWN != 0 {
            return Err(invalid("unknown flags"));
        }
        let body = &slot[SendWqeHeader::LEN..];
        let wqe = SendWqe { header };
        if header.has(send_flags::INLINE) {
            if header.inline_len > max_inline
                || header.inline_len as usize > body.len()
                || header.num_sge != 0
            {
                return Err(invalid("inline data longer than the QP allows"));
            }
            return Ok(wqe);
        }
        let n = usize::from(header.num_sge);
        if u32::from(header.num_sge) > max_sge.min(MAX_SGE) || n * Sge::LEN > body.len() {
            return Err(invalid("more scatter/gather entries than the QP allows"));
        }
        Ok(wqe)
    }

    /// The scatter/gather entries in `slot`, the copy the WQE was decoded from (none for
    /// inline data).
    pub fn sges<'a>(&self, slot: &'a [u8]) -> impl Iterator<Item = Sge> + 'a {
        let body = &slot[SendWqeHeader::LEN..];
        (0..usize::from(self.header.num_sge)).map(move |i| Sge::read(&body[i * Sge::LEN..]))
    }

    /// The inline data of this WQE in `slot`, the copy it was decoded from (empty without
    /// [`send_flags::INLINE`]).
    pub fn inline<'a>(&self, slot: &'a [u8]) -> &'a [u8] {
        if !self.header.has(send_flags::INLINE) {
            return &[];
        }
        let start = SendWqeHeader::LEN;
        &slot[start..start + self.header.inline_len as usize]
    }
}

/// The fixed part of a receive WQE: `wr_id u64, num_sge u32, reserved u32`, then the entries.
pub const RECV_WQE_HEADER: usize = recv_field::RESERVED.end;

/// Offsets of a receive WQE's fixed part.
mod recv_field {
    use std::ops::Range;
    pub const WR_ID: Range<usize> = 0..8;
    pub const NUM_SGE: Range<usize> = 8..12;
    /// Zero.
    pub const RESERVED: Range<usize> = 12..16;
}

/// A receive WQE as the router decoded it: its scatter/gather entries stay in the slot copy
/// ([`RecvWqe::sges`]), like [`SendWqe`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvWqe {
    pub wr_id: u64,
    pub num_sge: u32,
}

impl RecvWqe {
    pub fn slot_bytes(num_sge: u32) -> usize {
        RECV_WQE_HEADER + num_sge as usize * Sge::LEN
    }

    /// Writes the header of a receive WQE with `num_sge` entries (the entries follow, written by
    /// the caller with [`Sge::write`]).
    pub fn write_header(wr_id: u64, num_sge: u32, o: &mut [u8]) {
        codec::put(o, recv_field::WR_ID, wr_id);
        codec::put(o, recv_field::NUM_SGE, num_sge);
        codec::put(o, recv_field::RESERVED, 0u32);
    }

    pub fn decode(slot: &[u8], max_sge: u32) -> Result<RecvWqe, DecodeError> {
        if slot.len() < RECV_WQE_HEADER {
            return Err(DecodeError::Invalid {
                what: "RecvWqe",
                why: "slot shorter than the header",
            });
        }
        let num_sge: u32 = codec::get(slot, recv_field::NUM_SGE);
        let n = num_sge as usize;
        if num_sge > max_sge.min(MAX_SGE) || RECV_WQE_HEADER + n * Sge::LEN > slot.len() {
            return Err(DecodeError::Invalid {
                what: "RecvWqe",
                why: "more scatter/gather entries than the QP allows",
            });
        }
        Ok(RecvWqe {
            wr_id: codec::get(slot, recv_field::WR_ID),
            num_sge,
        })
    }

    /// The scatter/gather entries in `slot`, the copy the WQE was decoded from.
    pub fn sges<'a>(&self, slot: &'a [u8]) -> impl Iterator<Item = Sge> + 'a {
        (0..self.num_sge as usize).map(move |i| Sge::read(&slot[RECV_WQE_HEADER + i * Sge::LEN..]))
    }
}

/// A work completion in the layout of `struct ibv_wc` (48 bytes on x86-64). `#[repr(C)]`: the
/// verbs shim's `IbvWc` is this type, so the layout test of the shim checks it against the C
/// header, and [`Cqe::encode`] writes a slot in this same layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cqe {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// `imm_data` as the sender posted it (network order).
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

impl Cqe {
    /// Bytes of `struct ibv_wc`.
    pub const LEN: usize = 48;

    pub fn encode(&self) -> [u8; Cqe::LEN] {
        let mut o = [0u8; Cqe::LEN];
        o[0..8].copy_from_slice(&self.wr_id.to_ne_bytes());
        for (i, v) in [
            self.status,
            self.opcode,
            self.vendor_err,
            self.byte_len,
            self.imm_data,
            self.qp_num,
            self.src_qp,
            self.wc_flags,
        ]
        .into_iter()
        .enumerate()
        {
            o[8 + i * 4..12 + i * 4].copy_from_slice(&v.to_ne_bytes());
        }
        o[40..42].copy_from_slice(&self.pkey_index.to_ne_bytes());
        o[42..44].copy_from_slice(&self.slid.to_ne_bytes());
        o[44] = self.sl;
        o[45] = self.dlid_path_bits;
        o
    }

    /// Bytes of a CQ slot's message: the completion, then the engine's timestamp.
    pub const STAMPED_LEN: usize = Cqe::LEN + 8;

    /// The completion as the engine pushes it into a CQ ring: [`Cqe::encode`], then the time it
    /// was produced (CLOCK_MONOTONIC nanoseconds, native order), which `ibv_poll_cq` does not
    /// copy (it takes the first 48 bytes) and `ibv_wc_read_completion_ts` reads.
    pub fn encode_stamped(&self, timestamp_ns: u64) -> [u8; Cqe::STAMPED_LEN] {
        let mut o = [0u8; Cqe::STAMPED_LEN];
        o[..Cqe::LEN].copy_from_slice(&self.encode());
        o[Cqe::LEN..].copy_from_slice(&timestamp_ns.to_ne_bytes());
        o
    }

    /// The timestamp of a slot written by [`Cqe::encode_stamped`].
    pub fn timestamp(slot: &[u8; Cqe::STAMPED_LEN]) -> u64 {
        u64::from_ne_bytes(slot[Cqe::LEN..].try_into().expect("8 bytes"))
    }

    pub fn decode(b: &[u8]) -> Cqe {
        let u = |at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        Cqe {
            wr_id: u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
            status: u(8),
            opcode: u(12),
            vendor_err: u(16),
            byte_len: u(20),
            imm_data: u(24),
            qp_num: u(28),
            src_qp: u(32),
            wc_flags: u(36),
            pkey_index: u16::from_ne_bytes([b[40], b[41]]),
            slid: u16::from_ne_bytes([b[42], b[43]]),
            sl: b[44],
            dlid_path_bits: b[45],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(opcode: u8, flags: u32, sges: &[Sge], inline: &[u8]) -> Vec<u8> {
        let h = SendWqeHeader {
            wr_id: 77,
            opcode,
            flags: flags as u8,
            num_sge: sges.len() as u16,
            imm_data: 0x0102_0304,
            remote_addr: 0x7f00_0000_1000,
            rkey: 5,
            inline_len: inline.len() as u32,
            compare_add: 9,
            swap: 10,
        };
        let mut slot = vec![0u8; 256];
        h.write(&mut slot);
        for (i, s) in sges.iter().enumerate() {
            s.write(&mut slot[SendWqeHeader::LEN + i * Sge::LEN..]);
        }
        slot[SendWqeHeader::LEN..SendWqeHeader::LEN + inline.len()].copy_from_slice(inline);
        slot
    }

    #[test]
    fn send_wqes_decode_within_the_qp_capacities() {
        let sge = Sge {
            addr: 0x1000,
            length: 64,
            lkey: 3,
        };
        let slot = send(wr_opcode::SEND, send_flags::SIGNALED, &[sge, sge], &[]);
        let w = SendWqe::decode(&slot, 2, 0).unwrap();
        assert_eq!(w.sges(&slot).collect::<Vec<_>>(), vec![sge, sge]);
        assert_eq!(w.header.wr_id, 77);
        assert!(w.header.has(send_flags::SIGNALED));
        // More entries than the QP's max_send_sge, or than the slot holds.
        assert!(SendWqe::decode(&slot, 1, 0).is_err());
        assert!(SendWqe::decode(&slot[..SendWqeHeader::LEN + 16], 2, 0).is_err());
        // Unknown opcode and flags.
        assert!(SendWqe::decode(&send(7, 0, &[], &[]), 2, 0).is_err());
        assert!(SendWqe::decode(&send(0, 1 << 6, &[], &[]), 2, 0).is_err());
        // Inline data within max_inline, and not more.
        let slot = send(wr_opcode::SEND, send_flags::INLINE, &[], b"hello");
        assert_eq!(
            SendWqe::decode(&slot, 1, 5).unwrap().inline(&slot),
            b"hello"
        );
        assert_eq!(SendWqe::decode(&slot, 1, 5).unwrap().sges(&slot).count(), 0);
        assert!(SendWqe::decode(&slot, 1, 4).is_err());
        assert!(SendWqe::decode(&slot[..50], 1, 5).is_err());
        assert_eq!(SendWqe::slot_bytes(1, 0), 64);
        assert_eq!(SendWqe::slot_bytes(1, 100), 148);
    }

    #[test]
    fn recv_wqes_decode_within_the_qp_capacities() {
        let mut slot = [0u8; 64];
        RecvWqe::write_header(5, 2, &mut slot);
        let s = Sge {
            addr: 1,
            length: 2,
            lkey: 3,
        };
        s.write(&mut slot[16..]);
        s.write(&mut slot[32..]);
        let w = RecvWqe::decode(&slot, 2).unwrap();
        assert_eq!(w.wr_id, 5);
        assert_eq!(w.sges(&slot).collect::<Vec<_>>(), vec![s, s]);
        assert!(RecvWqe::decode(&slot, 1).is_err());
        assert!(RecvWqe::decode(&slot[..40], 2).is_err());
        RecvWqe::write_header(5, u32::MAX, &mut slot);
        assert!(RecvWqe::decode(&slot, u32::MAX).is_err());
    }

    #[test]
    fn ud_destinations_ride_in_the_unused_header_fields() {
        let d = UdDest {
            ah: 9,
            remote_qpn: 0xab_cdef,
            remote_qkey: 0x8000_0011,
        };
        let mut h = SendWqeHeader::default();
        d.put(&mut h);
        assert_eq!(UdDest::of(&h), d);
        let mut slot = [0u8; SendWqeHeader::LEN];
        h.write(&mut slot);
        assert_eq!(UdDest::of(&SendWqeHeader::read(&slot)), d);
    }

    #[test]
    fn cqes_round_trip() {
        let c = Cqe {
            wr_id: u64::MAX - 1,
            status: 4,
            opcode: wc_opcode::RECV_RDMA_WITH_IMM,
            vendor_err: 0,
            byte_len: 4096,
            imm_data: 0xdead_beef,
            qp_num: 0x12_3456,
            src_qp: 0x65_4321,
            wc_flags: wc_flags::WITH_IMM,
            pkey_index: 0,
            slid: 0,
            sl: 0,
            dlid_path_bits: 0,
        };
        assert_eq!(Cqe::decode(&c.encode()), c);
    }
}
