//! The structures of rdma-core 44's `verbs.h` that both of Freeflow's drop-in libraries pass
//! across the C boundary: `libibverbs.so.1` (shim/verbs) implements the verbs that take them,
//! `librdmacm.so.1` (shim/rdmacm) fills them in for those verbs (`ibv_modify_qp` with the
//! attributes of `rdma_init_qp_attr`, the address vector of an RDMA_PS_UDP event). One
//! definition, so that the two cannot drift apart; hand-written, plain data, no dependencies.
//! shim/verbs's layout test checks every size and offset against the installed headers.
//!
//! Structures that hold pointers to objects of one library (`struct ibv_qp_init_attr` names
//! `struct ibv_cq` pointers, which librdmacm only passes on) stay in that library.
#![no_std]
#![deny(unsafe_code)]

/// `union ibv_gid` (16 bytes; 8-aligned because of its `__be64` view).
#[repr(C, align(8))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IbvGid {
    pub raw: [u8; 16],
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvQpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvGlobalRoute {
    pub dgid: IbvGid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvAhAttr {
    pub grh: IbvGlobalRoute,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvQpAttr {
    pub qp_state: u32,
    pub cur_qp_state: u32,
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: u32,
    pub cap: IbvQpCap,
    pub ah_attr: IbvAhAttr,
    pub alt_ah_attr: IbvAhAttr,
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
    pub rate_limit: u32,
}
