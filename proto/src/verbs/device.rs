//! What routers with an RDMA device (`--rdma-device`) ask each other when a container's QP
//! connects to a container of another host: the real QP number behind the destination's virtual
//! one (and the GID of the device it lives on), or the real key, address and bounds behind a
//! virtual rkey of the destination's container. One [`DeviceQuery`] (32 bytes) per TCP
//! connection to the other router's device port (the peer port + [`DEVICE_PORT_OFFSET`]),
//! answered by one [`DeviceAnswer`] (64 bytes), little-endian.
//!
//! The answering router checks the asker: its address must be a registered host, the source
//! container one of that host's, of the tenant of the destination QP's owner; a QP of another
//! tenant and a QP that does not exist get the same answer ([`DeviceStatus::NotFound`]), so an
//! answer never tells one tenant about another's QPs.
//!
//! ```text
//! query:  0 magic "FFDQ"  4 version u16  6 kind u16 (1 QP, 2 key)
//!         8 src_ip [4]  12 dst_ip [4]  16 dst_qpn u32  20 rkey u32  24 reserved [8]
//! answer: 0 magic "FFDA"  4 version u16  6 status u16
//!         8 real_qpn u32  12 real_rkey u32  16 gid [16]  32 iova u64  40 length u64
//!         48 real_addr u64  56 access u32  60 reserved u32
//! ```

use std::net::Ipv4Addr;

/// The device port is the peer port plus this (the verbs port is + 1).
pub const DEVICE_PORT_OFFSET: u16 = 2;
/// Bytes of a [`DeviceQuery`].
pub const QUERY_LEN: usize = 32;
/// Bytes of a [`DeviceAnswer`].
pub const ANSWER_LEN: usize = 64;

const QUERY_MAGIC: [u8; 4] = *b"FFDQ";
const ANSWER_MAGIC: [u8; 4] = *b"FFDA";
const VERSION: u16 = 1;

/// What a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// The real QP number (and the device's GID) behind virtual QP `dst_qpn` of `dst_ip`.
    Qp,
    /// The region behind virtual rkey `rkey` of `dst_ip`, in the PD of its QP `dst_qpn`.
    Key,
}

/// A router's question about a container on the answering router's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceQuery {
    pub kind: QueryKind,
    /// The asking container (on the asking router's host).
    pub src_ip: Ipv4Addr,
    /// The destination container (on the answering router's host).
    pub dst_ip: Ipv4Addr,
    /// The destination's virtual QP number (the one its program told the asker).
    pub dst_qpn: u32,
    /// [`QueryKind::Key`]: the destination container's virtual rkey.
    pub rkey: u32,
}

/// Why a query does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceMsgError {
    #[error("not a device exchange message (bad magic)")]
    Magic,
    #[error("device exchange version {0}, this router speaks 1")]
    Version(u16),
    #[error("unknown device query kind {0}")]
    Kind(u16),
    #[error("unknown device answer status {0}")]
    Status(u16),
}

fn check_head(b: &[u8], magic: [u8; 4]) -> Result<(), DeviceMsgError> {
    if b[0..4] != magic {
        return Err(DeviceMsgError::Magic);
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(DeviceMsgError::Version(version));
    }
    Ok(())
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl DeviceQuery {
    pub fn encode(&self) -> [u8; QUERY_LEN] {
        let mut b = [0u8; QUERY_LEN];
        b[0..4].copy_from_slice(&QUERY_MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let kind: u16 = match self.kind {
            QueryKind::Qp => 1,
            QueryKind::Key => 2,
        };
        b[6..8].copy_from_slice(&kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.src_ip.octets());
        b[12..16].copy_from_slice(&self.dst_ip.octets());
        b[16..20].copy_from_slice(&self.dst_qpn.to_le_bytes());
        b[20..24].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

    /// Decodes (shape only: the answering router checks the addresses and numbers).
    pub fn decode(b: &[u8; QUERY_LEN]) -> Result<DeviceQuery, DeviceMsgError> {
        check_head(b, QUERY_MAGIC)?;
        let kind = match u16::from_le_bytes([b[6], b[7]]) {
            1 => QueryKind::Qp,
            2 => QueryKind::Key,
            other => return Err(DeviceMsgError::Kind(other)),
        };
        Ok(DeviceQuery {
            kind,
            src_ip: ip_at(b, 8),
            dst_ip: ip_at(b, 12),
            dst_qpn: u32_at(b, 16),
            rkey: u32_at(b, 20),
        })
    }
}

/// How a query was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    Found,
    /// No such QP (or key) of a container of the asker's tenant: the same for one that does
    /// not exist and for another tenant's.
    NotFound,
    /// The asker is not a registered host, or the source container is not one of its.
    Refused,
}

/// The answer to a [`DeviceQuery`]: for [`QueryKind::Qp`] `real_qpn` and `gid`; for
/// [`QueryKind::Key`] the region (`real_rkey`, its virtual `iova` and `length`, where the
/// device sees its first byte `real_addr`, and its access flags). Fields a kind does not use
/// are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAnswer {
    pub status: DeviceStatus,
    pub real_qpn: u32,
    pub real_rkey: u32,
    pub gid: [u8; 16],
    pub iova: u64,
    pub length: u64,
    pub real_addr: u64,
    pub access: u32,
}

impl DeviceAnswer {
    /// An answer with nothing in it.
    pub fn empty(status: DeviceStatus) -> DeviceAnswer {
        DeviceAnswer {
            status,
            real_qpn: 0,
            real_rkey: 0,
            gid: [0; 16],
            iova: 0,
            length: 0,
            real_addr: 0,
            access: 0,
        }
    }

    pub fn encode(&self) -> [u8; ANSWER_LEN] {
        let mut b = [0u8; ANSWER_LEN];
        b[0..4].copy_from_slice(&ANSWER_MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let status: u16 = match self.status {
            DeviceStatus::Found => 0,
            DeviceStatus::NotFound => 1,
            DeviceStatus::Refused => 2,
        };
        b[6..8].copy_from_slice(&status.to_le_bytes());
        b[8..12].copy_from_slice(&self.real_qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.real_rkey.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..40].copy_from_slice(&self.iova.to_le_bytes());
        b[40..48].copy_from_slice(&self.length.to_le_bytes());
        b[48..56].copy_from_slice(&self.real_addr.to_le_bytes());
        b[56..60].copy_from_slice(&self.access.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; ANSWER_LEN]) -> Result<DeviceAnswer, DeviceMsgError> {
        check_head(b, ANSWER_MAGIC)?;
        let status = match u16::from_le_bytes([b[6], b[7]]) {
            0 => DeviceStatus::Found,
            1 => DeviceStatus::NotFound,
            2 => DeviceStatus::Refused,
            other => return Err(DeviceMsgError::Status(other)),
        };
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        Ok(DeviceAnswer {
            status,
            real_qpn: u32_at(b, 8),
            real_rkey: u32_at(b, 12),
            gid,
            iova: u64_at(b, 32),
            length: u64_at(b, 40),
            real_addr: u64_at(b, 48),
            access: u32_at(b, 56),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_has_these_bytes() {
        let q = DeviceQuery {
            kind: QueryKind::Key,
            src_ip: Ipv4Addr::new(10, 64, 0, 3),
            dst_ip: Ipv4Addr::new(10, 64, 0, 2),
            dst_qpn: 0x0011_2233,
            rkey: 0xdead_beef,
        };
        let golden: [u8; QUERY_LEN] = [
            b'F', b'F', b'D', b'Q', 1, 0, 2, 0, 10, 64, 0, 3, 10, 64, 0, 2, 0x33, 0x22, 0x11, 0,
            0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(q.encode(), golden);
        assert_eq!(DeviceQuery::decode(&golden), Ok(q));
        let mut bad = golden;
        bad[6] = 3;
        assert_eq!(DeviceQuery::decode(&bad), Err(DeviceMsgError::Kind(3)));
        bad = golden;
        bad[4] = 2;
        assert_eq!(DeviceQuery::decode(&bad), Err(DeviceMsgError::Version(2)));
        bad = golden;
        bad[0] = b'X';
        assert_eq!(DeviceQuery::decode(&bad), Err(DeviceMsgError::Magic));
    }

    #[test]
    fn an_answer_has_these_bytes() {
        let mut gid = [0u8; 16];
        gid[10..].copy_from_slice(&[0xff, 0xff, 10, 32, 0, 11]);
        let a = DeviceAnswer {
            real_qpn: 0x42,
            gid,
            ..DeviceAnswer::empty(DeviceStatus::Found)
        };
        let mut golden = [0u8; ANSWER_LEN];
        golden[..8].copy_from_slice(&[b'F', b'F', b'D', b'A', 1, 0, 0, 0]);
        golden[8] = 0x42;
        golden[26..32].copy_from_slice(&[0xff, 0xff, 10, 32, 0, 11]);
        assert_eq!(a.encode(), golden);
        assert_eq!(DeviceAnswer::decode(&golden), Ok(a));
        let key = DeviceAnswer {
            real_rkey: 0x0102_0304,
            iova: 0x7f00_0000_1000,
            length: 65536,
            real_addr: 0x5555_0000_2000,
            access: 0xf,
            ..DeviceAnswer::empty(DeviceStatus::Found)
        };
        let b = key.encode();
        assert_eq!(&b[12..16], &[4, 3, 2, 1]);
        assert_eq!(&b[32..40], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(&b[40..48], &65536u64.to_le_bytes());
        assert_eq!(&b[48..56], &0x5555_0000_2000u64.to_le_bytes());
        assert_eq!(&b[56..60], &[0xf, 0, 0, 0]);
        assert_eq!(DeviceAnswer::decode(&b), Ok(key));
        let refused = DeviceAnswer::empty(DeviceStatus::Refused).encode();
        assert_eq!(&refused[6..8], &[2, 0]);
        let mut bad = refused;
        bad[6] = 9;
        assert_eq!(DeviceAnswer::decode(&bad), Err(DeviceMsgError::Status(9)));
    }
}
