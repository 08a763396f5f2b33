//! The 40 bytes in front of every UD receive (`struct ibv_grh`), as a RoCE v2 device writes
//! them for a packet between IPv4 addresses (GIDs `::ffff:a.b.c.d`, this device's only kind):
//! bytes 0..20 are zero and bytes 20..40 are the packet's IPv4 header (version 4, header length
//! 5, the traffic class as TOS, the total length of the UDP/BTH/DETH packet, don't fragment,
//! the hop limit as TTL, protocol UDP, a valid checksum, source and destination address).
//! rdma-core's `ibv_init_ah_from_wc` tells this form from an IPv6 GRH by the valid IPv4 header
//! at offset 20; [`parse`] does the same.

use super::work::GRH_LEN;
use std::net::Ipv4Addr;

/// Where the IPv4 header starts in the GRH area.
const IPV4_AT: usize = 20;
/// IPv4 header, UDP, base transport header, datagram extended header; the invariant CRC after
/// the payload.
const HEADERS: usize = 20 + 8 + 12 + 8;
const ICRC: usize = 4;

/// The GRH area of a UD message of `payload` bytes from `src` to `dst` (with 4 bytes of
/// immediate data if `imm`).
pub fn roce_v2_ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    traffic_class: u8,
    hop_limit: u8,
    payload: usize,
    imm: bool,
) -> [u8; GRH_LEN] {
    let mut g = [0u8; GRH_LEN];
    let total = HEADERS + if imm { 4 } else { 0 } + payload + ICRC;
    let h = &mut g[IPV4_AT..];
    h[0] = 0x45;
    h[1] = traffic_class;
    h[2..4].copy_from_slice(&(total.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    h[8] = hop_limit;
    h[9] = 17;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    g
}

/// The Internet checksum of `bytes` (its checksum field zero, or the sum of a valid header is
/// 0).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a GRH area says about the packet: its source and destination GIDs and its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrhInfo {
    pub sgid: [u8; 16],
    pub dgid: [u8; 16],
    pub traffic_class: u8,
    pub flow_label: u32,
}

/// The IPv4-mapped GID of `ip`.
pub fn mapped_gid(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

/// Reads a GRH area: the IPv4 form (a valid IPv4 header at offset 20), else an IPv6 GRH
/// (version 6 in the first nibble); None for anything else.
pub fn parse(g: &[u8; GRH_LEN]) -> Option<GrhInfo> {
    let h = &g[IPV4_AT..];
    if h[0] == 0x45 && checksum(h) == 0 {
        let ip = |at: usize| Ipv4Addr::new(h[at], h[at + 1], h[at + 2], h[at + 3]);
        return Some(GrhInfo {
            sgid: mapped_gid(ip(12)),
            dgid: mapped_gid(ip(16)),
            traffic_class: h[1],
            flow_label: 0,
        });
    }
    let vtf = u32::from_be_bytes([g[0], g[1], g[2], g[3]]);
    if vtf >> 28 == 6 {
        let mut sgid = [0u8; 16];
        let mut dgid = [0u8; 16];
        sgid.copy_from_slice(&g[8..24]);
        dgid.copy_from_slice(&g[24..40]);
        return Some(GrhInfo {
            sgid,
            dgid,
            traffic_class: (vtf >> 20) as u8,
            flow_label: vtf & 0xf_ffff,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_form_carries_a_valid_header_and_parses_back() {
        let src = Ipv4Addr::new(10, 32, 0, 2);
        let dst = Ipv4Addr::new(10, 32, 0, 3);
        let g = roce_v2_ipv4(src, dst, 3, 64, 100, true);
        assert_eq!(&g[..20], &[0u8; 20]);
        assert_eq!(g[20], 0x45);
        assert_eq!(
            u16::from_be_bytes([g[22], g[23]]),
            (48 + 4 + 100 + 4) as u16
        );
        assert_eq!(g[28], 64);
        assert_eq!(g[29], 17);
        assert_eq!(checksum(&g[20..]), 0);
        let info = parse(&g).unwrap();
        assert_eq!(info.sgid, mapped_gid(src));
        assert_eq!(info.dgid, mapped_gid(dst));
        assert_eq!(info.traffic_class, 3);
        // A corrupt checksum is no IPv4 header, and zeros are no GRH at all.
        let mut bad = g;
        bad[30] ^= 1;
        assert_eq!(parse(&bad), None);
        assert_eq!(parse(&[0u8; GRH_LEN]), None);
    }

    #[test]
    fn an_ipv6_grh_parses_too() {
        let mut g = [0u8; GRH_LEN];
        g[0..4].copy_from_slice(&(6u32 << 28 | 7 << 20 | 0x12345).to_be_bytes());
        g[8..24].copy_from_slice(&[1; 16]);
        g[24..40].copy_from_slice(&[2; 16]);
        let info = parse(&g).unwrap();
        assert_eq!((info.sgid, info.dgid), ([1; 16], [2; 16]));
        assert_eq!((info.traffic_class, info.flow_label), (7, 0x12345));
    }
}
