//! The C ABI of rdma-core 44's `rdma_cma.h` and the parts of `verbs.h` this library fills in,
//! hand-written; sizes and offsets are the ones `gcc` reports for the installed headers (the
//! tests below pin them, the e2e tests check them from C).

use std::ffi::{c_int, c_void};

/// The verbs structures this library fills in for libibverbs: shared with shim/verbs (one
/// definition, checked there against the installed headers).
pub use freeflow_verbs_abi::{IbvAhAttr, IbvGid, IbvGlobalRoute, IbvQpAttr, IbvQpCap};

/// Opaque verbs objects (this library only passes their pointers to libibverbs).
pub type Ptr = *mut c_void;

/// `struct rdma_event_channel`.
#[repr(C)]
pub struct RdmaEventChannel {
    pub fd: c_int,
}

/// `struct rdma_ib_addr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct RdmaIbAddr {
    pub sgid: [u8; 16],
    pub dgid: [u8; 16],
    pub pkey: u16,
}

/// `struct rdma_addr`: source and destination as `sockaddr_storage`, then the GIDs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RdmaAddr {
    pub src: libc::sockaddr_storage,
    pub dst: libc::sockaddr_storage,
    pub ib: RdmaIbAddr,
}

/// `struct rdma_route`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RdmaRoute {
    pub addr: RdmaAddr,
    pub path_rec: Ptr,
    pub num_paths: c_int,
}

/// `struct rdma_cm_id`.
#[repr(C)]
pub struct RdmaCmId {
    pub verbs: Ptr,
    pub channel: *mut RdmaEventChannel,
    pub context: Ptr,
    pub qp: *mut IbvQpHead,
    pub route: RdmaRoute,
    pub ps: c_int,
    pub port_num: u8,
    pub event: *mut RdmaCmEvent,
    pub send_cq_channel: Ptr,
    pub send_cq: Ptr,
    pub recv_cq_channel: Ptr,
    pub recv_cq: Ptr,
    pub srq: Ptr,
    pub pd: Ptr,
    pub qp_type: c_int,
}

/// `struct rdma_conn_param`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RdmaConnParam {
    pub private_data: *const c_void,
    pub private_data_len: u8,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub flow_control: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    pub srq: u8,
    pub qp_num: u32,
}

/// `struct rdma_cm_event`; `param` is the union of `rdma_conn_param` and `rdma_ud_param`
/// (56 bytes, the larger).
#[repr(C)]
pub struct RdmaCmEvent {
    pub id: *mut RdmaCmId,
    pub listen_id: *mut RdmaCmId,
    pub event: c_int,
    pub status: c_int,
    pub param: EventParam,
}

#[repr(C)]
pub union EventParam {
    pub conn: RdmaConnParam,
    pub ud: RdmaUdParam,
}

/// `struct rdma_ud_param`: what RDMA_PS_UDP's CONNECT_REQUEST and ESTABLISHED carry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RdmaUdParam {
    pub private_data: *const c_void,
    pub private_data_len: u8,
    pub ah_attr: IbvAhAttr,
    pub qp_num: u32,
    pub qkey: u32,
}

/// `RDMA_UDP_QKEY`: the qkey of every RDMA_PS_UDP QP (rdma_init_qp_attr's, and the one the
/// answers carry).
pub const RDMA_UDP_QKEY: u32 = 0x0123_4567;

/// `struct rdma_addrinfo`.
#[repr(C)]
pub struct RdmaAddrinfo {
    pub ai_flags: c_int,
    pub ai_family: c_int,
    pub ai_qp_type: c_int,
    pub ai_port_space: c_int,
    pub ai_src_len: libc::socklen_t,
    pub ai_dst_len: libc::socklen_t,
    pub ai_src_addr: *mut libc::sockaddr,
    pub ai_dst_addr: *mut libc::sockaddr,
    pub ai_src_canonname: *mut libc::c_char,
    pub ai_dst_canonname: *mut libc::c_char,
    pub ai_route_len: usize,
    pub ai_route: Ptr,
    pub ai_connect_len: usize,
    pub ai_connect: Ptr,
    pub ai_next: *mut RdmaAddrinfo,
}

/// `rdma_addrinfo.ai_flags`.
pub const RAI_PASSIVE: c_int = 1;
pub const RAI_NUMERICHOST: c_int = 2;

/// The first fields of `struct ibv_qp` (the library reads the QP number and context).
#[repr(C)]
pub struct IbvQpHead {
    pub context: Ptr,
    pub qp_context: Ptr,
    pub pd: Ptr,
    pub send_cq: Ptr,
    pub recv_cq: Ptr,
    pub srq: Ptr,
    pub handle: u32,
    pub qp_num: u32,
}

/// `struct ibv_qp_init_attr` (also the first 60 bytes of `ibv_qp_init_attr_ex`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IbvQpInitAttr {
    pub qp_context: Ptr,
    pub send_cq: Ptr,
    pub recv_cq: Ptr,
    pub srq: Ptr,
    pub cap: IbvQpCap,
    pub qp_type: c_int,
    pub sq_sig_all: c_int,
}

/// The start of `struct ibv_qp_init_attr_ex`: the plain attributes (declared field by field
/// there, so `comp_mask` takes the padding at the end of `ibv_qp_init_attr`), the mask, the PD.
#[repr(C)]
pub struct IbvQpInitAttrExHead {
    pub qp_context: Ptr,
    pub send_cq: Ptr,
    pub recv_cq: Ptr,
    pub srq: Ptr,
    pub cap: IbvQpCap,
    pub qp_type: c_int,
    pub sq_sig_all: c_int,
    pub comp_mask: u32,
    pub pd: Ptr,
}

/// `ibv_qp_init_attr_ex.comp_mask`: the PD is given.
pub const IBV_QP_INIT_ATTR_PD: u32 = 1;

/// `enum ibv_qp_state`.
pub mod qp_state {
    pub const INIT: u32 = 1;
    pub const RTR: u32 = 2;
    pub const RTS: u32 = 3;
    pub const ERR: u32 = 6;
}

/// `enum ibv_qp_attr_mask`.
pub mod mask {
    use std::ffi::c_int;
    pub const STATE: c_int = 1;
    pub const ACCESS_FLAGS: c_int = 1 << 3;
    pub const PKEY_INDEX: c_int = 1 << 4;
    pub const PORT: c_int = 1 << 5;
    pub const QKEY: c_int = 1 << 6;
    pub const AV: c_int = 1 << 7;
    pub const PATH_MTU: c_int = 1 << 8;
    pub const TIMEOUT: c_int = 1 << 9;
    pub const RETRY_CNT: c_int = 1 << 10;
    pub const RNR_RETRY: c_int = 1 << 11;
    pub const RQ_PSN: c_int = 1 << 12;
    pub const MAX_QP_RD_ATOMIC: c_int = 1 << 13;
    pub const MIN_RNR_TIMER: c_int = 1 << 15;
    pub const SQ_PSN: c_int = 1 << 16;
    pub const MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
    pub const DEST_QPN: c_int = 1 << 20;
}

/// `enum ibv_access_flags`.
pub const IBV_ACCESS_REMOTE_WRITE: u32 = 1 << 1;
pub const IBV_ACCESS_REMOTE_READ: u32 = 1 << 2;
pub const IBV_ACCESS_REMOTE_ATOMIC: u32 = 1 << 3;
/// `IBV_MTU_1024`: the MTU rdma_cm picks for RoCE on a 1500-byte link.
pub const IBV_MTU_1024: u32 = 3;
/// `IBV_QPT_RC`.
pub const IBV_QPT_RC: c_int = 2;
/// `IBV_QPT_UD`: the QPs of RDMA_PS_UDP ids.
pub const IBV_QPT_UD: c_int = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The numbers gcc gives for rdma-core 44's headers on x86-64.
    #[test]
    fn layouts_match_rdma_core_44() {
        assert_eq!(size_of::<RdmaCmId>(), 416);
        assert_eq!(offset_of!(RdmaCmId, route), 32);
        assert_eq!(offset_of!(RdmaCmId, ps), 344);
        assert_eq!(offset_of!(RdmaCmId, port_num), 348);
        assert_eq!(offset_of!(RdmaCmId, event), 352);
        assert_eq!(offset_of!(RdmaCmId, pd), 400);
        assert_eq!(offset_of!(RdmaCmId, qp_type), 408);
        assert_eq!(size_of::<RdmaRoute>(), 312);
        assert_eq!(size_of::<RdmaAddr>(), 296);
        assert_eq!(size_of::<RdmaIbAddr>(), 40);
        assert_eq!(size_of::<RdmaCmEvent>(), 80);
        assert_eq!(offset_of!(RdmaCmEvent, param), 24);
        assert_eq!(size_of::<RdmaConnParam>(), 24);
        assert_eq!(size_of::<RdmaUdParam>(), 56);
        assert_eq!(offset_of!(RdmaUdParam, private_data_len), 8);
        assert_eq!(offset_of!(RdmaUdParam, ah_attr), 16);
        assert_eq!(offset_of!(RdmaUdParam, qp_num), 48);
        assert_eq!(offset_of!(RdmaUdParam, qkey), 52);
        assert_eq!(offset_of!(RdmaConnParam, qp_num), 16);
        assert_eq!(size_of::<RdmaAddrinfo>(), 96);
        assert_eq!(offset_of!(RdmaAddrinfo, ai_next), 88);
        assert_eq!(size_of::<IbvQpInitAttr>(), 64);
        assert_eq!(offset_of!(IbvQpInitAttrExHead, comp_mask), 60);
        assert_eq!(offset_of!(IbvQpInitAttrExHead, pd), 64);
        assert_eq!(size_of::<IbvQpAttr>(), 144);
        assert_eq!(offset_of!(IbvQpAttr, ah_attr), 56);
        assert_eq!(offset_of!(IbvQpAttr, pkey_index), 120);
        assert_eq!(offset_of!(IbvQpAttr, rnr_retry), 132);
        assert_eq!(size_of::<IbvAhAttr>(), 32);
        assert_eq!(offset_of!(IbvAhAttr, is_global), 29);
        assert_eq!(offset_of!(IbvQpHead, qp_num), 52);
        assert_eq!(std::mem::align_of::<IbvQpAttr>(), 8);
        assert_eq!(std::mem::align_of::<RdmaCmId>(), 8);
    }
}
