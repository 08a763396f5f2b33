//! Asynchronous events, router to shim: the records the router writes into a context's event
//! pipe (its write end stays with the router, non-blocking; the shim reads the read end, which
//! comes on the attach connection as [`super::QueueFileKind::AsyncEvents`] before the reply to
//! [`super::op::CREATE_ASYNC_EVENTS`]).
//!
//! A record is 8 bytes, little-endian: the `enum ibv_event_type` value and the handle of the
//! object it is about (an SRQ for [`event_type::SRQ_LIMIT_REACHED`], a QP for the QP events).
//! 8 bytes is below PIPE_BUF, so each write is whole or not at all: a full pipe (a program that
//! does not read its events) loses records, never splits one, and never blocks the router.

use crate::codec::DecodeError;

/// `enum ibv_event_type` values the router raises.
pub mod event_type {
    pub const QP_FATAL: u32 = 1;
    pub const QP_REQ_ERR: u32 = 2;
    pub const QP_ACCESS_ERR: u32 = 3;
    pub const SRQ_LIMIT_REACHED: u32 = 15;
    pub const QP_LAST_WQE_REACHED: u32 = 16;
}

/// One event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEventRecord {
    pub event_type: u32,
    /// The context's handle of the SRQ or QP.
    pub handle: u32,
}

impl AsyncEventRecord {
    pub const LEN: usize = 8;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&self.event_type.to_le_bytes());
        b[4..].copy_from_slice(&self.handle.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<AsyncEventRecord, DecodeError> {
        crate::codec::exact("AsyncEventRecord", b, Self::LEN)?;
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        Ok(AsyncEventRecord {
            event_type: word(0),
            handle: word(4),
        })
    }

    /// Whether the record names an SRQ (else a QP).
    pub fn is_about_srq(&self) -> bool {
        self.event_type == event_type::SRQ_LIMIT_REACHED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_its_exact_length() {
        let r = AsyncEventRecord {
            event_type: event_type::SRQ_LIMIT_REACHED,
            handle: 0x0102_0304,
        };
        let b = r.encode();
        assert_eq!(b, [15, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(AsyncEventRecord::decode(&b).unwrap(), r);
        assert!(r.is_about_srq());
        assert!(AsyncEventRecord::decode(&b[..7]).is_err());
    }
}
