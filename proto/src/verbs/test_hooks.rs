//! The router's test hooks on the wire ([`super::op::TEST_READ`], [`super::op::TEST_WRITE`]),
//! served only by a router started with `FREEFLOW_TEST_HOOKS=1`, and [`Fnv1a`], their digest.

use crate::codec::{self, sequential_body, DecodeError};
use crate::msg::HEADER_LEN;

/// Body of [`super::op::TEST_READ`]: `length` bytes at `addr` (in the region's iova space, as in
/// a scatter/gather entry) of the region with local key `lkey` in protection domain `pd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRead {
    pub pd: u32,
    pub lkey: u32,
    pub addr: u64,
    pub length: u64,
}
sequential_body!(TestRead {
    pd: u32,
    lkey: u32,
    addr: u64,
    length: u64,
});

/// Reply to [`super::op::TEST_READ`]: the [`Fnv1a`] digest of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestDigest {
    pub digest: u64,
}
sequential_body!(TestDigest { digest: u64 });

/// Most data bytes in one [`TestWrite`] (fits the smallest slot of 64 bytes).
pub const MAX_TEST_WRITE: usize = 64 - HEADER_LEN - TestWrite::FIXED_LEN;

/// Body of [`super::op::TEST_WRITE`]: `data` to write at `addr` (iova space) of the region with
/// local key `lkey` in protection domain `pd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestWrite {
    pub pd: u32,
    pub lkey: u32,
    pub addr: u64,
    pub data: Vec<u8>,
}

/// Offsets of a [`TestWrite`]; the data follows the fixed part.
mod field {
    use std::ops::Range;
    pub const PD: Range<usize> = 0..4;
    pub const LKEY: Range<usize> = 4..8;
    pub const ADDR: Range<usize> = 8..16;
}

impl TestWrite {
    /// Bytes before the data.
    pub const FIXED_LEN: usize = field::ADDR.end;

    /// Encodes into `out`; None if the data is longer than [`MAX_TEST_WRITE`] or `out` is short.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let len = Self::FIXED_LEN + self.data.len();
        if self.data.len() > MAX_TEST_WRITE || out.len() < len {
            return None;
        }
        codec::put(out, field::PD, self.pd);
        codec::put(out, field::LKEY, self.lkey);
        codec::put(out, field::ADDR, self.addr);
        out[Self::FIXED_LEN..len].copy_from_slice(&self.data);
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
            pd: codec::get(body, field::PD),
            lkey: codec::get(body, field::LKEY),
            addr: codec::get(body, field::ADDR),
            data: body[Self::FIXED_LEN..].to_vec(),
        })
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
