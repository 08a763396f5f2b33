//! Messages carried in ring slots: a 16-byte header and a body that fills the rest of the slot.
//!
//! All fields are little-endian and decoded from a private copy of the slot, never read in
//! place. `len` is checked against the slot size by whoever decodes it.

use crate::codec;

/// Bytes of the header at the start of every slot.
pub const HEADER_LEN: usize = field::COOKIE.end;

/// Set in the opcode of every reply.
pub const REPLY: u16 = 0x8000;

/// Request opcodes: [`op::MsgOp`] for the ring's own, numbers as constants, and the range of
/// the verbs shim's.
pub mod op {
    use crate::codec::wire_enum;

    wire_enum! {
        /// A request the router answers for any attachment.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MsgOp: u16, from u16 {
            /// Echo the body back (latency measurements, liveness).
            Ping = 1 => PING,
            /// Consume without reply (one-way throughput measurements).
            Nop = 2 => NOP,
            /// Reply with the number of NOPs consumed since the previous FLUSH (body: u64).
            Flush = 3 => FLUSH,
        }
    }

    /// First opcode of the verbs shim's requests (RDMA mode, see [`crate::verbs::op`]).
    pub const VERBS_FIRST: u16 = 0x0100;
    /// End (exclusive) of the verbs opcodes.
    pub const VERBS_END: u16 = 0x0200;
}

/// Reply status codes: [`status::MsgStatus`] and its numbers as constants (the verbs statuses,
/// [`crate::verbs::VerbsStatus`], follow them).
pub mod status {
    use crate::codec::wire_enum;

    wire_enum! {
        /// The status of a reply, for any opcode.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MsgStatus: u16, from u16 {
            Ok = 0 => OK,
            /// The router does not know this opcode.
            UnknownOp = 1 => UNKNOWN_OP,
            /// `len` does not fit the slot or the opcode's body.
            BadLength = 2 => BAD_LENGTH,
        }
    }
}

/// Offsets of a [`MsgHeader`].
mod field {
    use std::ops::Range;
    pub const OPCODE: Range<usize> = 0..2;
    pub const STATUS: Range<usize> = 2..4;
    pub const LEN: Range<usize> = 4..8;
    pub const COOKIE: Range<usize> = 8..16;
}

/// The fixed header of a slot message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsgHeader {
    pub opcode: u16,
    pub status: u16,
    /// Body bytes following the header.
    pub len: u32,
    /// Chosen by the requester, echoed in the reply.
    pub cookie: u64,
}

impl MsgHeader {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn encode(&self, buf: &mut [u8]) {
        codec::put(buf, field::OPCODE, self.opcode);
        codec::put(buf, field::STATUS, self.status);
        codec::put(buf, field::LEN, self.len);
        codec::put(buf, field::COOKIE, self.cookie);
    }

    /// Reads a header from the first [`HEADER_LEN`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> MsgHeader {
        MsgHeader {
            opcode: codec::get(buf, field::OPCODE),
            status: codec::get(buf, field::STATUS),
            len: codec::get(buf, field::LEN),
            cookie: codec::get(buf, field::COOKIE),
        }
    }

    /// The body of a message of this header inside `slot`, if its length fits.
    pub fn body<'a>(&self, slot: &'a [u8]) -> Option<&'a [u8]> {
        let end = HEADER_LEN.checked_add(self.len as usize)?;
        slot.get(HEADER_LEN..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_bounds_body() {
        let h = MsgHeader {
            opcode: op::PING,
            status: 7,
            len: 5,
            cookie: u64::MAX - 3,
        };
        let mut slot = [0u8; 64];
        h.encode(&mut slot);
        assert_eq!(MsgHeader::decode(&slot), h);
        assert_eq!(h.body(&slot).map(<[u8]>::len), Some(5));
        let too_long = MsgHeader { len: 49, ..h };
        assert!(too_long.body(&slot).is_none());
        let huge = MsgHeader { len: u32::MAX, ..h };
        assert!(huge.body(&slot).is_none());
    }
}
