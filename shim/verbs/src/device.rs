//! The virtual device a registered container sees: its name, GUIDs, GID and the attributes the
//! query verbs report. Everything here follows from the container's identity (its overlay
//! address), which the router told us at attach time.

use crate::abi::*;
use std::ffi::c_char;
use std::net::Ipv4Addr;

/// Name of the one device (`ibv_devices`, `ibv_devinfo -d`).
pub const DEVICE_NAME: &str = "ffv0";
/// Name of its (virtual) uverbs device.
pub const UVERBS_NAME: &str = "ffuverbs0";
/// Where `ibv_read_sysfs_file` finds the device's attributes (served by [`crate::sysfs`]; no
/// such directory exists in the container).
pub const IBDEV_PATH: &str = "/sys/class/infiniband/ffv0";
pub const DEV_PATH: &str = "/sys/class/infiniband_verbs/ffuverbs0";
/// The one port. Verbs number ports from 1.
pub const PORT: u8 = 1;
/// `board_id` in sysfs (printed by `ibv_devinfo`).
pub const BOARD_ID: &str = "FREEFLOW_VIRTUAL";

/// The maxima the device reports. The router's verbs engine enforces the same numbers, per
/// container: every container has its own virtual device.
pub mod limits {
    use freeflow_proto::verbs::limits as router;
    /// Largest memory region: 4 GiB (the router enforces it).
    pub const MAX_MR_SIZE: u64 = router::MAX_MR_SIZE;
    /// Registered memory is handled in 4 KiB pages.
    pub const PAGE_SIZE_CAP: u64 = 4096;
    pub const MAX_QP: i32 = 1024;
    /// Work requests per send or receive queue.
    pub const MAX_QP_WR: i32 = 4096;
    /// Scatter/gather entries per work request.
    pub const MAX_SGE: i32 = 16;
    pub const MAX_CQ: i32 = 1024;
    pub const MAX_CQE: i32 = 65535;
    pub const MAX_MR: i32 = router::MAX_MR as i32;
    pub const MAX_PD: i32 = router::MAX_PD as i32;
    /// Outstanding RDMA reads and atomics per QP, as responder and as initiator.
    pub const MAX_QP_RD_ATOM: i32 = 16;
    pub const MAX_SRQ: i32 = 1024;
    pub const MAX_SRQ_WR: i32 = 4096;
    pub const MAX_SRQ_SGE: i32 = 16;
    /// Largest message: 2 GiB, RoCE's limit.
    pub const MAX_MSG_SZ: u32 = 1 << 31;
}

/// Who this process is, as the router said at attach time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub ip: Ipv4Addr,
    pub container: String,
    pub tenant: String,
}

impl Identity {
    /// The port's only GID: the overlay address in IPv4-mapped form (`::ffff:10.32.0.5`), as
    /// RoCE v2 derives GIDs from IP addresses. Programs exchange GIDs out of band, and the router
    /// maps a GID back to a container through the registry.
    pub fn gid(&self) -> IbvGid {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&self.ip.octets());
        IbvGid { raw }
    }

    /// Node GUID bytes, most significant first: 02 (locally administered) "FF" 00, then the
    /// overlay address, so `ibv_devinfo` shows e.g. 0246:4600:0a20:0005 for 10.32.0.5.
    pub fn guid_bytes(&self) -> [u8; 8] {
        let ip = self.ip.octets();
        [0x02, b'F', b'F', 0x00, ip[0], ip[1], ip[2], ip[3]]
    }

    /// The GUID as `__be64`: in memory, the bytes of [`Identity::guid_bytes`] in order.
    pub fn guid_be(&self) -> u64 {
        u64::from_ne_bytes(self.guid_bytes())
    }

    /// The GUID as sysfs and `ibv_devinfo` write it: four groups of four hex digits.
    pub fn guid_text(&self) -> String {
        let g = u64::from_be_bytes(self.guid_bytes());
        format!(
            "{:04x}:{:04x}:{:04x}:{:04x}",
            (g >> 48) & 0xffff,
            (g >> 32) & 0xffff,
            (g >> 16) & 0xffff,
            g & 0xffff
        )
    }

    /// The GID as sysfs writes it: eight groups of four hex digits.
    pub fn gid_text(&self) -> String {
        let raw = self.gid().raw;
        raw.chunks(2)
            .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// `struct ibv_device` of the virtual device.
    pub fn ibv_device(&self) -> IbvDevice {
        IbvDevice {
            ops: IbvDeviceOpsCompat::default(),
            node_type: IBV_NODE_CA,
            // RoCE devices are InfiniBand transport over an Ethernet link layer.
            transport_type: IBV_TRANSPORT_IB,
            name: c_chars(DEVICE_NAME),
            dev_name: c_chars(UVERBS_NAME),
            dev_path: c_chars(DEV_PATH),
            ibdev_path: c_chars(IBDEV_PATH),
        }
    }

    /// `ibv_query_device`.
    pub fn device_attr(&self) -> IbvDeviceAttr {
        use limits::*;
        IbvDeviceAttr {
            fw_ver: c_chars(env!("CARGO_PKG_VERSION")),
            node_guid: self.guid_be(),
            sys_image_guid: self.guid_be(),
            max_mr_size: MAX_MR_SIZE,
            page_size_cap: PAGE_SIZE_CAP,
            // No IEEE OUI: rxe's value for a software device (0 reads as "no device" to
            // rdma-core's tests).
            vendor_id: 0x00ff_ffff,
            vendor_part_id: 0,
            hw_ver: 0,
            max_qp: MAX_QP,
            max_qp_wr: MAX_QP_WR,
            device_cap_flags: IBV_DEVICE_SYS_IMAGE_GUID | IBV_DEVICE_RC_RNR_NAK_GEN,
            max_sge: MAX_SGE,
            max_sge_rd: MAX_SGE,
            max_cq: MAX_CQ,
            max_cqe: MAX_CQE,
            max_mr: MAX_MR,
            max_pd: MAX_PD,
            max_qp_rd_atom: MAX_QP_RD_ATOM,
            max_ee_rd_atom: 0,
            max_res_rd_atom: MAX_QP * MAX_QP_RD_ATOM,
            max_qp_init_rd_atom: MAX_QP_RD_ATOM,
            max_ee_init_rd_atom: 0,
            // Atomics are atomic with respect to other atomics through this device (the
            // router's engine), not to the CPU's own accesses.
            atomic_cap: IBV_ATOMIC_HCA,
            max_ee: 0,
            max_rdd: 0,
            // No memory windows, no multicast, no raw QPs.
            max_mw: 0,
            max_raw_ipv6_qp: 0,
            max_raw_ethy_qp: 0,
            max_mcast_grp: 0,
            max_mcast_qp_attach: 0,
            max_total_mcast_qp_attach: 0,
            max_ah: freeflow_proto::verbs::limits::MAX_AH as i32,
            max_fmr: 0,
            max_map_per_fmr: 0,
            max_srq: MAX_SRQ,
            max_srq_wr: MAX_SRQ_WR,
            max_srq_sge: MAX_SRQ_SGE,
            max_pkeys: 1,
            local_ca_ack_delay: 0,
            phys_port_cnt: 1,
        }
    }

    /// `ibv_query_device_ex`: the plain attributes, and completion timestamps (the router's
    /// CLOCK_MONOTONIC in nanoseconds: a 1 GHz clock of 64 bits); no other extended capability.
    pub fn device_attr_ex(&self) -> IbvDeviceAttrEx {
        IbvDeviceAttrEx {
            orig_attr: self.device_attr(),
            comp_mask: 0,
            odp_caps: IbvOdpCaps::default(),
            completion_timestamp_mask: u64::MAX,
            // In kHz: one tick a nanosecond.
            hca_core_clock: 1_000_000,
            device_cap_flags_ex: u64::from(self.device_attr().device_cap_flags),
            tso_caps: IbvTsoCaps::default(),
            rss_caps: IbvRssCaps::default(),
            max_wq_type_rq: 0,
            packet_pacing_caps: IbvPacketPacingCaps::default(),
            raw_packet_caps: 0,
            tm_caps: IbvTmCaps::default(),
            cq_mod_caps: IbvCqModerationCaps::default(),
            max_dm_size: 0,
            pci_atomic_caps: IbvPciAtomicCaps::default(),
            xrc_odp_caps: 0,
            phys_port_cnt_ex: 1,
        }
    }

    /// `ibv_query_port` of port 1: active, RoCE-like (Ethernet link layer, LID 0, addressed by
    /// GID), one GID and one P_Key.
    pub fn port_attr(&self) -> IbvPortAttr {
        IbvPortAttr {
            state: IBV_PORT_ACTIVE,
            max_mtu: IBV_MTU_4096,
            // What RoCE derives from an Ethernet MTU of 1500 (and from the overlay's 1450).
            active_mtu: IBV_MTU_1024,
            gid_tbl_len: 1,
            port_cap_flags: IBV_PORT_IP_BASED_GIDS,
            max_msg_sz: limits::MAX_MSG_SZ,
            bad_pkey_cntr: 0,
            qkey_viol_cntr: 0,
            pkey_tbl_len: 1,
            lid: 0,
            sm_lid: 0,
            lmc: 0,
            // Encoded: 1 means one data VL.
            max_vl_num: 1,
            sm_sl: 0,
            subnet_timeout: 0,
            init_type_reply: 0,
            // Nominal (1X, 25 Gbit/s): the engine's speed is memory bandwidth, not a link rate.
            active_width: 1,
            active_speed: 32,
            // LinkUp.
            phys_state: 5,
            link_layer: IBV_LINK_LAYER_ETHERNET,
            flags: 0,
            port_cap_flags2: 0,
        }
    }

    /// The GID entry of `ibv_query_gid_ex` / `ibv_query_gid_table`.
    pub fn gid_entry(&self) -> IbvGidEntry {
        IbvGidEntry {
            gid: self.gid(),
            gid_index: 0,
            port_num: u32::from(PORT),
            gid_type: IBV_GID_TYPE_ROCE_V2,
            // No network device in the container stands for this port.
            ndev_ifindex: 0,
        }
    }
}

/// The only P_Key: the default full-membership key, in network byte order.
pub const PKEY_BE: u16 = 0xffffu16.to_be();

/// `text` as a NUL-terminated, zero-padded C array (truncated to leave room for the NUL).
fn c_chars<const N: usize>(text: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (slot, byte) in out.iter_mut().zip(text.bytes().take(N - 1)) {
        *slot = byte as c_char;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Identity {
        Identity {
            ip: Ipv4Addr::new(10, 32, 0, 5),
            container: "web".into(),
            tenant: "blue".into(),
        }
    }

    #[test]
    fn gid_is_the_ipv4_mapped_overlay_address() {
        let gid = web().gid();
        let v6 = std::net::Ipv6Addr::from(gid.raw);
        assert_eq!(v6.to_string(), "::ffff:10.32.0.5");
        assert_eq!(web().gid_text(), "0000:0000:0000:0000:0000:ffff:0a20:0005");
    }

    #[test]
    fn guid_follows_the_address() {
        assert_eq!(web().guid_text(), "0246:4600:0a20:0005");
        assert_eq!(web().guid_be().to_ne_bytes(), web().guid_bytes());
        assert_eq!(web().device_attr().node_guid, web().guid_be());
    }

    #[test]
    fn names_are_terminated() {
        let dev = web().ibv_device();
        let name: Vec<u8> = dev.name.iter().map(|&c| c as u8).collect();
        assert_eq!(&name[..5], b"ffv0\0");
        let long: [c_char; 4] = c_chars("abcdef");
        assert_eq!(long, [b'a' as c_char, b'b' as c_char, b'c' as c_char, 0]);
    }

    #[test]
    fn port_is_an_active_roce_port() {
        let p = web().port_attr();
        assert_eq!(p.state, IBV_PORT_ACTIVE);
        assert_eq!(p.link_layer, IBV_LINK_LAYER_ETHERNET);
        assert_eq!(p.lid, 0);
        assert_eq!(p.gid_tbl_len, 1);
        assert_eq!(p.active_mtu, IBV_MTU_1024);
        assert_eq!(PKEY_BE.to_ne_bytes(), [0xff, 0xff]);
    }
}
