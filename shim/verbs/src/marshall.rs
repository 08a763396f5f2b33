//! The kernel-structure converters `ibv_copy_{qp,ah}_attr_from_kern` and
//! `ibv_copy_path_rec_{from,to}_kern`: pure field copies between the kernel's uverbs/SA ABI
//! structures (`rdma/ib_user_verbs.h`, `rdma/ib_user_sa.h`) and libibverbs' own. No device is
//! involved.
//! rdma-core's `librdmacm.so.1` imports them and is linked with BIND_NOW, so a program that
//! links librdmacm (perftest's `ib_*` tools) does not even start without them.
#![allow(unsafe_code)]

use crate::abi::{IbvAhAttr, IbvGid, IbvQpAttr, IbvSaPathRec};

symbol_versions! {
    "IBVERBS_1.1": [ibv_copy_ah_attr_from_kern],
    "IBVERBS_1.0": [
        ibv_copy_qp_attr_from_kern, ibv_copy_path_rec_from_kern, ibv_copy_path_rec_to_kern,
    ],
}

/// `struct ib_uverbs_global_route`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KernGlobalRoute {
    pub dgid: [u8; 16],
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub reserved: u8,
}

/// `struct ib_uverbs_ah_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KernAhAttr {
    pub grh: KernGlobalRoute,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
    pub reserved: u8,
}

/// `struct ib_uverbs_qp_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KernQpAttr {
    pub qp_attr_mask: u32,
    pub qp_state: u32,
    pub cur_qp_state: u32,
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: u32,
    pub ah_attr: KernAhAttr,
    pub alt_ah_attr: KernAhAttr,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub reserved: [u8; 5],
}

/// `struct ib_user_path_rec` (the big-endian fields stay in network order, as in the
/// destination).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KernPathRec {
    pub dgid: [u8; 16],
    pub sgid: [u8; 16],
    pub dlid: u16,
    pub slid: u16,
    pub raw_traffic: u32,
    pub flow_label: u32,
    pub reversible: u32,
    pub mtu: u32,
    pub pkey: u16,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub numb_path: u8,
    pub sl: u8,
    pub mtu_selector: u8,
    pub rate_selector: u8,
    pub rate: u8,
    pub packet_life_time_selector: u8,
    pub packet_life_time: u8,
    pub preference: u8,
}

/// The address vector of a kernel AH attribute.
fn ah_from_kern(src: &KernAhAttr) -> IbvAhAttr {
    let mut dst = IbvAhAttr::default();
    dst.grh.dgid = IbvGid { raw: src.grh.dgid };
    dst.grh.flow_label = src.grh.flow_label;
    dst.grh.sgid_index = src.grh.sgid_index;
    dst.grh.hop_limit = src.grh.hop_limit;
    dst.grh.traffic_class = src.grh.traffic_class;
    dst.dlid = src.dlid;
    dst.sl = src.sl;
    dst.src_path_bits = src.src_path_bits;
    dst.static_rate = src.static_rate;
    dst.is_global = src.is_global;
    dst.port_num = src.port_num;
    dst
}

/// Every field the kernel structure carries; `dst.rate_limit`, which it does not, is kept.
fn qp_from_kern(dst: &mut IbvQpAttr, src: &KernQpAttr) {
    dst.qp_state = src.qp_state;
    dst.cur_qp_state = src.cur_qp_state;
    dst.path_mtu = src.path_mtu;
    dst.path_mig_state = src.path_mig_state;
    dst.qkey = src.qkey;
    dst.rq_psn = src.rq_psn;
    dst.sq_psn = src.sq_psn;
    dst.dest_qp_num = src.dest_qp_num;
    dst.qp_access_flags = src.qp_access_flags;
    dst.cap.max_send_wr = src.max_send_wr;
    dst.cap.max_recv_wr = src.max_recv_wr;
    dst.cap.max_send_sge = src.max_send_sge;
    dst.cap.max_recv_sge = src.max_recv_sge;
    dst.cap.max_inline_data = src.max_inline_data;
    dst.ah_attr = ah_from_kern(&src.ah_attr);
    dst.alt_ah_attr = ah_from_kern(&src.alt_ah_attr);
    dst.pkey_index = src.pkey_index;
    dst.alt_pkey_index = src.alt_pkey_index;
    dst.en_sqd_async_notify = src.en_sqd_async_notify;
    dst.sq_draining = src.sq_draining;
    dst.max_rd_atomic = src.max_rd_atomic;
    dst.max_dest_rd_atomic = src.max_dest_rd_atomic;
    dst.min_rnr_timer = src.min_rnr_timer;
    dst.port_num = src.port_num;
    dst.timeout = src.timeout;
    dst.retry_cnt = src.retry_cnt;
    dst.rnr_retry = src.rnr_retry;
    dst.alt_port_num = src.alt_port_num;
    dst.alt_timeout = src.alt_timeout;
}

/// The path record; the kernel's 32-bit `mtu` and `reversible` narrow to the library's types.
fn path_from_kern(src: &KernPathRec) -> IbvSaPathRec {
    IbvSaPathRec {
        dgid: IbvGid { raw: src.dgid },
        sgid: IbvGid { raw: src.sgid },
        dlid: src.dlid,
        slid: src.slid,
        raw_traffic: src.raw_traffic as i32,
        flow_label: src.flow_label,
        hop_limit: src.hop_limit,
        traffic_class: src.traffic_class,
        reversible: src.reversible as i32,
        numb_path: src.numb_path,
        pkey: src.pkey,
        sl: src.sl,
        mtu_selector: src.mtu_selector,
        mtu: src.mtu as u8,
        rate_selector: src.rate_selector,
        rate: src.rate,
        packet_life_time_selector: src.packet_life_time_selector,
        packet_life_time: src.packet_life_time,
        preference: src.preference,
    }
}

/// The inverse of [`path_from_kern`]; the kernel's reserved bits are zero.
fn path_to_kern(src: &IbvSaPathRec) -> KernPathRec {
    KernPathRec {
        dgid: src.dgid.raw,
        sgid: src.sgid.raw,
        dlid: src.dlid,
        slid: src.slid,
        raw_traffic: src.raw_traffic as u32,
        flow_label: src.flow_label,
        reversible: src.reversible as u32,
        mtu: u32::from(src.mtu),
        pkey: src.pkey,
        hop_limit: src.hop_limit,
        traffic_class: src.traffic_class,
        numb_path: src.numb_path,
        sl: src.sl,
        mtu_selector: src.mtu_selector,
        rate_selector: src.rate_selector,
        rate: src.rate,
        packet_life_time_selector: src.packet_life_time_selector,
        packet_life_time: src.packet_life_time,
        preference: src.preference,
    }
}

/// `ibv_copy_ah_attr_from_kern(dst, src)`. NULL pointers are ignored.
#[no_mangle]
pub unsafe extern "C" fn ibv_copy_ah_attr_from_kern(dst: *mut IbvAhAttr, src: *const KernAhAttr) {
    // SAFETY: the caller passes valid structures of these types (or NULL, refused by as_ref /
    // as_mut); they are plain data.
    if let (Some(dst), Some(src)) = unsafe { (dst.as_mut(), src.as_ref()) } {
        *dst = ah_from_kern(src);
    }
}

/// `ibv_copy_qp_attr_from_kern(dst, src)`. NULL pointers are ignored.
#[no_mangle]
pub unsafe extern "C" fn ibv_copy_qp_attr_from_kern(dst: *mut IbvQpAttr, src: *const KernQpAttr) {
    // SAFETY: as in ibv_copy_ah_attr_from_kern.
    if let (Some(dst), Some(src)) = unsafe { (dst.as_mut(), src.as_ref()) } {
        qp_from_kern(dst, src);
    }
}

/// `ibv_copy_path_rec_from_kern(dst, src)`. NULL pointers are ignored.
#[no_mangle]
pub unsafe extern "C" fn ibv_copy_path_rec_from_kern(
    dst: *mut IbvSaPathRec,
    src: *const KernPathRec,
) {
    // SAFETY: as in ibv_copy_ah_attr_from_kern.
    if let (Some(dst), Some(src)) = unsafe { (dst.as_mut(), src.as_ref()) } {
        *dst = path_from_kern(src);
    }
}

/// `ibv_copy_path_rec_to_kern(dst, src)`. NULL pointers are ignored.
#[no_mangle]
pub unsafe extern "C" fn ibv_copy_path_rec_to_kern(
    dst: *mut KernPathRec,
    src: *const IbvSaPathRec,
) {
    // SAFETY: as in ibv_copy_ah_attr_from_kern.
    if let (Some(dst), Some(src)) = unsafe { (dst.as_mut(), src.as_ref()) } {
        *dst = path_to_kern(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qp_attributes_arrive_field_by_field() {
        let mut src = KernQpAttr {
            qp_state: 3,
            path_mtu: 5,
            dest_qp_num: 0x1234,
            max_send_wr: 64,
            max_inline_data: 220,
            timeout: 14,
            rnr_retry: 7,
            ..KernQpAttr::default()
        };
        src.ah_attr.grh.dgid[15] = 9;
        src.ah_attr.is_global = 1;
        src.ah_attr.port_num = 1;
        let mut dst = IbvQpAttr {
            rate_limit: 77,
            ..IbvQpAttr::default()
        };
        // SAFETY: both point at live structures of the right types.
        unsafe { ibv_copy_qp_attr_from_kern(&mut dst, &src) };
        assert_eq!(
            (dst.qp_state, dst.path_mtu, dst.dest_qp_num),
            (3, 5, 0x1234)
        );
        assert_eq!((dst.cap.max_send_wr, dst.cap.max_inline_data), (64, 220));
        assert_eq!((dst.timeout, dst.rnr_retry, dst.rate_limit), (14, 7, 77));
        assert_eq!(dst.ah_attr.grh.dgid.raw[15], 9);
        assert_eq!((dst.ah_attr.is_global, dst.ah_attr.port_num), (1, 1));
    }

    #[test]
    fn path_records_narrow_mtu_and_keep_network_order() {
        let src = KernPathRec {
            dlid: 0x0100u16.to_be(),
            mtu: 4,
            reversible: 1,
            pkey: 0xffff,
            ..KernPathRec::default()
        };
        let mut dst = IbvSaPathRec::default();
        // SAFETY: both point at live structures of the right types.
        unsafe { ibv_copy_path_rec_from_kern(&mut dst, &src) };
        assert_eq!(
            (dst.dlid, dst.mtu, dst.reversible, dst.pkey),
            (0x0100u16.to_be(), 4, 1, 0xffff)
        );
        let mut back = KernPathRec::default();
        // SAFETY: both point at live structures of the right types.
        unsafe { ibv_copy_path_rec_to_kern(&mut back, &dst) };
        assert_eq!(
            (back.dlid, back.mtu, back.reversible, back.pkey),
            (src.dlid, 4, 1, 0xffff)
        );
        // SAFETY: NULL is accepted and ignored.
        unsafe { ibv_copy_path_rec_from_kern(std::ptr::null_mut(), &src) };
    }
}
