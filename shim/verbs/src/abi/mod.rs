//! The C ABI of libibverbs (rdma-core 44, `<infiniband/verbs.h>`), written by hand from the
//! header: the structures this library hands out or fills in, and the enum values it uses.
//! `layout_tests::layout_matches_the_installed_headers` compiles a C program against the installed
//! headers and compares every size, alignment and offset here with the C compiler's.
//!
//! Function-pointer slots this library does not fill yet are [`OpaqueFn`]: NULL, of pointer size.
//! Objects that do not exist here (SRQ, AH, MW, ...) are passed around as `*mut c_void`.

use std::ffi::{c_char, c_int, c_uint, c_void};

/// The structures librdmacm.so.1 passes too: one definition for both libraries.
pub use freeflow_verbs_abi::{IbvAhAttr, IbvGid, IbvQpAttr, IbvQpCap};

/// An unused function-pointer slot (always NULL here).
pub type OpaqueFn = Option<unsafe extern "C" fn()>;

pub const IBV_SYSFS_NAME_MAX: usize = 64;
pub const IBV_SYSFS_PATH_MAX: usize = 256;

// enum ibv_node_type
pub const IBV_NODE_CA: c_int = 1;
// enum ibv_transport_type
pub const IBV_TRANSPORT_IB: c_int = 0;
// enum ibv_port_state
pub const IBV_PORT_ACTIVE: u32 = 4;
// enum ibv_mtu
pub const IBV_MTU_1024: u32 = 3;
pub const IBV_MTU_4096: u32 = 5;
// link layers
pub const IBV_LINK_LAYER_ETHERNET: u8 = 2;
// enum ibv_atomic_cap
pub const IBV_ATOMIC_HCA: u32 = 1;
// enum ibv_device_cap_flags
pub const IBV_DEVICE_SYS_IMAGE_GUID: u32 = 1 << 11;
pub const IBV_DEVICE_RC_RNR_NAK_GEN: u32 = 1 << 12;
// enum ibv_port_cap_flags
pub const IBV_PORT_IP_BASED_GIDS: u32 = 1 << 26;
// enum ibv_gid_type (struct ibv_gid_entry.gid_type)
pub const IBV_GID_TYPE_ROCE_V2: u32 = 2;
/// `enum ibv_gid_type_sysfs` (rdma-core's private `driver.h`, used by `ibv_query_gid_type`).
pub const IBV_GID_TYPE_SYSFS_ROCE_V2: c_int = 1;
// enum ibv_fork_status
pub const IBV_FORK_DISABLED: c_int = 0;
pub const IBV_FORK_ENABLED: c_int = 1;
/// `enum ibv_rereg_mr_err_code`: old MR still valid, bad input.
pub const IBV_REREG_MR_ERR_INPUT: c_int = -1;
/// `struct ibv_pd`. The library allocates it; `handle` is the router's (virtual) handle.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvPd {
    pub context: *mut IbvContext,
    pub handle: u32,
}

/// `struct ibv_mr`. The library allocates it; `handle`, `lkey` and `rkey` are the router's.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvMr {
    pub context: *mut IbvContext,
    pub pd: *mut IbvPd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// `struct _ibv_device_ops`: obsolete, never used, kept for the layout.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvDeviceOpsCompat {
    pub dummy1: OpaqueFn,
    pub dummy2: OpaqueFn,
}

/// `struct ibv_device`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvDevice {
    pub ops: IbvDeviceOpsCompat,
    pub node_type: c_int,
    pub transport_type: c_int,
    /// Name of the device, e.g. "ffv0".
    pub name: [c_char; IBV_SYSFS_NAME_MAX],
    /// Name of the uverbs device (a kernel character device for real hardware).
    pub dev_name: [c_char; IBV_SYSFS_NAME_MAX],
    pub dev_path: [c_char; IBV_SYSFS_PATH_MAX],
    pub ibdev_path: [c_char; IBV_SYSFS_PATH_MAX],
}

/// `struct ibv_context_ops`. Programs call `poll_cq`, `req_notify_cq`, `post_srq_recv`,
/// `post_send` and `post_recv` (and the memory-window ops) through it from inline functions
/// in `verbs.h`, so these offsets are ABI.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvContextOps {
    pub compat_query_device:
        Option<unsafe extern "C" fn(*mut IbvContext, *mut IbvDeviceAttr) -> c_int>,
    /// Takes `struct _compat_ibv_port_attr`: the first [`COMPAT_PORT_ATTR_LEN`] bytes of
    /// [`IbvPortAttr`].
    pub compat_query_port:
        Option<unsafe extern "C" fn(*mut IbvContext, u8, *mut IbvPortAttr) -> c_int>,
    pub compat_alloc_pd: OpaqueFn,
    pub compat_dealloc_pd: OpaqueFn,
    pub compat_reg_mr: OpaqueFn,
    pub compat_rereg_mr: OpaqueFn,
    pub compat_dereg_mr: OpaqueFn,
    /// NULL makes the inline `ibv_alloc_mw` fail with EOPNOTSUPP.
    pub alloc_mw: OpaqueFn,
    pub bind_mw: OpaqueFn,
    pub dealloc_mw: OpaqueFn,
    pub compat_create_cq: OpaqueFn,
    pub poll_cq: Option<unsafe extern "C" fn(*mut IbvCq, c_int, *mut IbvWc) -> c_int>,
    pub req_notify_cq: Option<unsafe extern "C" fn(*mut IbvCq, c_int) -> c_int>,
    pub compat_cq_event: OpaqueFn,
    pub compat_resize_cq: OpaqueFn,
    pub compat_destroy_cq: OpaqueFn,
    pub compat_create_srq: OpaqueFn,
    pub compat_modify_srq: OpaqueFn,
    pub compat_query_srq: OpaqueFn,
    pub compat_destroy_srq: OpaqueFn,
    pub post_srq_recv: Option<PostSrqRecvFn>,
    pub compat_create_qp: OpaqueFn,
    pub compat_query_qp: OpaqueFn,
    pub compat_modify_qp: OpaqueFn,
    pub compat_destroy_qp: OpaqueFn,
    pub post_send: Option<PostSendFn>,
    pub post_recv: Option<PostRecvFn>,
    pub compat_create_ah: OpaqueFn,
    pub compat_destroy_ah: OpaqueFn,
    pub compat_attach_mcast: OpaqueFn,
    pub compat_detach_mcast: OpaqueFn,
    pub compat_async_event: OpaqueFn,
}

/// `post_send`: (QP, first work request, where to put the first failed one).
pub type PostSendFn =
    unsafe extern "C" fn(*mut IbvQp, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int;
/// `post_recv`.
pub type PostRecvFn =
    unsafe extern "C" fn(*mut IbvQp, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int;
/// `post_srq_recv`.
pub type PostSrqRecvFn =
    unsafe extern "C" fn(*mut IbvSrq, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int;

/// `struct ibv_context`.
#[repr(C)]
pub struct IbvContext {
    pub device: *mut IbvDevice,
    pub ops: IbvContextOps,
    pub cmd_fd: c_int,
    pub async_fd: c_int,
    pub num_comp_vectors: c_int,
    pub mutex: libc::pthread_mutex_t,
    /// `(void *)UINTPTR_MAX` marks a context that is the tail of a [`VerbsContext`].
    pub abi_compat: *mut c_void,
}

/// `__VERBS_ABI_IS_EXTENDED`: the `abi_compat` value of an extended context.
pub const VERBS_ABI_IS_EXTENDED: usize = usize::MAX;

/// `verbs_context.query_port`.
pub type QueryPortFn = unsafe extern "C" fn(*mut IbvContext, u8, *mut IbvPortAttr, usize) -> c_int;
/// `verbs_context.query_device_ex`.
pub type QueryDeviceExFn = unsafe extern "C" fn(
    *mut IbvContext,
    *const IbvQueryDeviceExInput,
    *mut IbvDeviceAttrEx,
    usize,
) -> c_int;

/// `struct verbs_context`: the extended operations that `verbs.h` reaches with
/// `verbs_get_ctx_op` (an op counts as present if it is non-NULL and `sz` covers it), followed by
/// the `ibv_context` that programs hold. NULL ops make the inline wrappers fail with EOPNOTSUPP
/// (or fall back to the plain verb, as `ibv_query_device_ex` and `ibv_query_port` do).
#[repr(C)]
pub struct VerbsContext {
    pub query_port: Option<QueryPortFn>,
    pub advise_mr: OpaqueFn,
    pub alloc_null_mr: OpaqueFn,
    pub read_counters: OpaqueFn,
    pub attach_counters_point_flow: OpaqueFn,
    pub create_counters: OpaqueFn,
    pub destroy_counters: OpaqueFn,
    pub reg_dm_mr: OpaqueFn,
    pub alloc_dm: OpaqueFn,
    pub free_dm: OpaqueFn,
    pub modify_flow_action_esp: OpaqueFn,
    pub destroy_flow_action: OpaqueFn,
    pub create_flow_action_esp: OpaqueFn,
    pub modify_qp_rate_limit: OpaqueFn,
    pub alloc_parent_domain: OpaqueFn,
    pub dealloc_td: OpaqueFn,
    pub alloc_td: OpaqueFn,
    pub modify_cq: OpaqueFn,
    pub post_srq_ops: OpaqueFn,
    pub destroy_rwq_ind_table: OpaqueFn,
    pub create_rwq_ind_table: OpaqueFn,
    pub destroy_wq: OpaqueFn,
    pub modify_wq: OpaqueFn,
    pub create_wq: OpaqueFn,
    pub query_rt_values: Option<QueryRtValuesFn>,
    pub create_cq_ex: Option<CreateCqExFn>,
    /// `struct verbs_ex_private *priv`: rdma-core's own bookkeeping, unused here.
    pub priv_: *mut c_void,
    pub query_device_ex: Option<QueryDeviceExFn>,
    pub ibv_destroy_flow: OpaqueFn,
    pub abi_placeholder2: OpaqueFn,
    pub ibv_create_flow: OpaqueFn,
    pub abi_placeholder1: OpaqueFn,
    pub open_qp: OpaqueFn,
    pub create_qp_ex: Option<CreateQpExFn>,
    pub get_srq_num: OpaqueFn,
    pub create_srq_ex: OpaqueFn,
    pub open_xrcd: OpaqueFn,
    pub close_xrcd: OpaqueFn,
    pub abi_placeholder3: u64,
    /// Bytes of this structure that are valid, counted from the first op (so `size_of`).
    pub sz: usize,
    pub context: IbvContext,
}

/// `struct ibv_device_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvDeviceAttr {
    pub fw_ver: [c_char; 64],
    /// Network byte order.
    pub node_guid: u64,
    /// Network byte order.
    pub sys_image_guid: u64,
    pub max_mr_size: u64,
    pub page_size_cap: u64,
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    pub hw_ver: u32,
    pub max_qp: c_int,
    pub max_qp_wr: c_int,
    pub device_cap_flags: u32,
    pub max_sge: c_int,
    pub max_sge_rd: c_int,
    pub max_cq: c_int,
    pub max_cqe: c_int,
    pub max_mr: c_int,
    pub max_pd: c_int,
    pub max_qp_rd_atom: c_int,
    pub max_ee_rd_atom: c_int,
    pub max_res_rd_atom: c_int,
    pub max_qp_init_rd_atom: c_int,
    pub max_ee_init_rd_atom: c_int,
    pub atomic_cap: u32,
    pub max_ee: c_int,
    pub max_rdd: c_int,
    pub max_mw: c_int,
    pub max_raw_ipv6_qp: c_int,
    pub max_raw_ethy_qp: c_int,
    pub max_mcast_grp: c_int,
    pub max_mcast_qp_attach: c_int,
    pub max_total_mcast_qp_attach: c_int,
    pub max_ah: c_int,
    pub max_fmr: c_int,
    pub max_map_per_fmr: c_int,
    pub max_srq: c_int,
    pub max_srq_wr: c_int,
    pub max_srq_sge: c_int,
    pub max_pkeys: u16,
    pub local_ca_ack_delay: u8,
    pub phys_port_cnt: u8,
}

/// `struct ibv_query_device_ex_input`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvQueryDeviceExInput {
    pub comp_mask: u32,
}

/// `struct ibv_odp_caps` (with its anonymous `per_transport_caps` flattened: same layout).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvOdpCaps {
    pub general_caps: u64,
    pub rc_odp_caps: u32,
    pub uc_odp_caps: u32,
    pub ud_odp_caps: u32,
}

/// `struct ibv_tso_caps`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvTsoCaps {
    pub max_tso: u32,
    pub supported_qpts: u32,
}

/// `struct ibv_rss_caps`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvRssCaps {
    pub supported_qpts: u32,
    pub max_rwq_indirection_tables: u32,
    pub max_rwq_indirection_table_size: u32,
    pub rx_hash_fields_mask: u64,
    pub rx_hash_function: u8,
}

/// `struct ibv_packet_pacing_caps`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvPacketPacingCaps {
    pub qp_rate_limit_min: u32,
    pub qp_rate_limit_max: u32,
    pub supported_qpts: u32,
}

/// `struct ibv_tm_caps`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvTmCaps {
    pub max_rndv_hdr_size: u32,
    pub max_num_tags: u32,
    pub flags: u32,
    pub max_ops: u32,
    pub max_sge: u32,
}

/// `struct ibv_cq_moderation_caps`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvCqModerationCaps {
    pub max_cq_count: u16,
    pub max_cq_period: u16,
}

/// `struct ibv_pci_atomic_caps`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvPciAtomicCaps {
    pub fetch_add: u16,
    pub swap: u16,
    pub compare_swap: u16,
}

/// `struct ibv_device_attr_ex`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvDeviceAttrEx {
    pub orig_attr: IbvDeviceAttr,
    pub comp_mask: u32,
    pub odp_caps: IbvOdpCaps,
    pub completion_timestamp_mask: u64,
    pub hca_core_clock: u64,
    pub device_cap_flags_ex: u64,
    pub tso_caps: IbvTsoCaps,
    pub rss_caps: IbvRssCaps,
    pub max_wq_type_rq: u32,
    pub packet_pacing_caps: IbvPacketPacingCaps,
    pub raw_packet_caps: u32,
    pub tm_caps: IbvTmCaps,
    pub cq_mod_caps: IbvCqModerationCaps,
    pub max_dm_size: u64,
    pub pci_atomic_caps: IbvPciAtomicCaps,
    pub xrc_odp_caps: u32,
    pub phys_port_cnt_ex: u32,
}

/// `struct ibv_port_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvPortAttr {
    pub state: u32,
    pub max_mtu: u32,
    pub active_mtu: u32,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
}

/// Bytes of `struct _compat_ibv_port_attr`, what the exported `ibv_query_port` fills: the
/// port attributes as they were before `port_cap_flags2` was appended (everything up to and
/// including `flags`, once a reserved byte). Binaries built against those headers pass a buffer
/// of this size; current ones call the `verbs_context` op, which is told the size.
pub const COMPAT_PORT_ATTR_LEN: usize = std::mem::offset_of!(IbvPortAttr, port_cap_flags2);

/// `struct ibv_gid_entry`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvGidEntry {
    pub gid: IbvGid,
    pub gid_index: u32,
    pub port_num: u32,
    pub gid_type: u32,
    pub ndev_ifindex: u32,
}

/// `struct ibv_comp_channel`. The library allocates it (inside its own object); `fd` is the
/// read end of the channel's pipe.
#[repr(C)]
#[derive(Debug)]
pub struct IbvCompChannel {
    pub context: *mut IbvContext,
    pub fd: c_int,
    pub refcnt: c_int,
}

/// `struct ibv_cq`. The library allocates it (inside its own object).
#[repr(C)]
pub struct IbvCq {
    pub context: *mut IbvContext,
    pub channel: *mut IbvCompChannel,
    pub cq_context: *mut c_void,
    pub handle: u32,
    pub cqe: c_int,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub comp_events_completed: u32,
    pub async_events_completed: u32,
}

/// `struct ibv_qp`. The library allocates it (inside its own object).
#[repr(C)]
pub struct IbvQp {
    pub context: *mut IbvContext,
    pub qp_context: *mut c_void,
    pub pd: *mut IbvPd,
    pub send_cq: *mut IbvCq,
    pub recv_cq: *mut IbvCq,
    pub srq: *mut c_void,
    pub handle: u32,
    pub qp_num: u32,
    pub state: u32,
    pub qp_type: u32,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub events_completed: u32,
}

/// `struct ibv_cq_init_attr_ex` (`ibv_create_cq_ex`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvCqInitAttrEx {
    pub cqe: u32,
    pub cq_context: *mut c_void,
    pub channel: *mut IbvCompChannel,
    pub comp_vector: u32,
    pub wc_flags: u64,
    pub comp_mask: u32,
    pub flags: u32,
    pub parent_domain: *mut IbvPd,
}

// enum ibv_cq_init_attr_mask and enum ibv_create_cq_attr_flags
pub const IBV_CQ_INIT_ATTR_MASK_FLAGS: u32 = 1 << 0;
pub const IBV_CQ_INIT_ATTR_MASK_PD: u32 = 1 << 1;
pub const IBV_CREATE_CQ_ATTR_SINGLE_THREADED: u32 = 1 << 0;
pub const IBV_CREATE_CQ_ATTR_IGNORE_OVERRUN: u32 = 1 << 1;

// enum ibv_create_cq_wc_flags
pub const IBV_WC_EX_WITH_BYTE_LEN: u64 = 1 << 0;
pub const IBV_WC_EX_WITH_IMM: u64 = 1 << 1;
pub const IBV_WC_EX_WITH_QP_NUM: u64 = 1 << 2;
pub const IBV_WC_EX_WITH_SRC_QP: u64 = 1 << 3;
pub const IBV_WC_EX_WITH_SLID: u64 = 1 << 4;
pub const IBV_WC_EX_WITH_SL: u64 = 1 << 5;
pub const IBV_WC_EX_WITH_DLID_PATH_BITS: u64 = 1 << 6;
pub const IBV_WC_EX_WITH_COMPLETION_TIMESTAMP: u64 = 1 << 7;

/// `ibv_cq_ex.start_poll`.
pub type StartPollFn = unsafe extern "C" fn(*mut IbvCqEx, *mut IbvPollCqAttr) -> c_int;
/// `ibv_cq_ex.next_poll`.
pub type NextPollFn = unsafe extern "C" fn(*mut IbvCqEx) -> c_int;
/// `ibv_cq_ex.end_poll`.
pub type EndPollFn = unsafe extern "C" fn(*mut IbvCqEx);
/// `ibv_cq_ex.read_*` returning a 32-bit value (opcode, lengths, numbers, flags).
pub type ReadU32Fn = unsafe extern "C" fn(*mut IbvCqEx) -> u32;
/// `ibv_cq_ex.read_*` returning a 64-bit value (timestamps).
pub type ReadU64Fn = unsafe extern "C" fn(*mut IbvCqEx) -> u64;
/// `ibv_cq_ex.read_*` returning an 8-bit value (`sl`, `dlid_path_bits`).
pub type ReadU8Fn = unsafe extern "C" fn(*mut IbvCqEx) -> u8;

/// `struct ibv_poll_cq_attr`.
#[repr(C)]
pub struct IbvPollCqAttr {
    pub comp_mask: u32,
}

/// `struct ibv_cq_ex`: a `struct ibv_cq` (its first fields) with the poll API's state and
/// operations, which the inline `ibv_start_poll`, `ibv_next_poll`, `ibv_end_poll` and
/// `ibv_wc_read_*` call. Every CQ of this library is one (a plain `ibv_create_cq` too).
#[repr(C)]
pub struct IbvCqEx {
    pub cq: IbvCq,
    pub comp_mask: u32,
    pub status: u32,
    pub wr_id: u64,
    pub start_poll: Option<StartPollFn>,
    pub next_poll: Option<NextPollFn>,
    pub end_poll: Option<EndPollFn>,
    pub read_opcode: Option<ReadU32Fn>,
    pub read_vendor_err: Option<ReadU32Fn>,
    pub read_byte_len: Option<ReadU32Fn>,
    pub read_imm_data: Option<ReadU32Fn>,
    pub read_qp_num: Option<ReadU32Fn>,
    pub read_src_qp: Option<ReadU32Fn>,
    pub read_wc_flags: Option<ReadU32Fn>,
    pub read_slid: Option<ReadU32Fn>,
    pub read_sl: Option<ReadU8Fn>,
    pub read_dlid_path_bits: Option<ReadU8Fn>,
    pub read_completion_ts: Option<ReadU64Fn>,
    pub read_cvlan: OpaqueFn,
    pub read_flow_tag: OpaqueFn,
    pub read_tm_info: OpaqueFn,
    pub read_completion_wallclock_ns: OpaqueFn,
}

/// `struct ibv_values_ex` (`ibv_query_rt_values_ex`).
#[repr(C)]
pub struct IbvValuesEx {
    pub comp_mask: u32,
    pub raw_clock: libc::timespec,
}

/// `IBV_VALUES_MASK_RAW_CLOCK`: `raw_clock` is asked for (in) or filled (out).
pub const IBV_VALUES_MASK_RAW_CLOCK: u32 = 1 << 0;

/// `verbs_context.query_rt_values`.
pub type QueryRtValuesFn = unsafe extern "C" fn(*mut IbvContext, *mut IbvValuesEx) -> c_int;

/// `verbs_context.create_cq_ex`.
pub type CreateCqExFn = unsafe extern "C" fn(*mut IbvContext, *mut IbvCqInitAttrEx) -> *mut IbvCqEx;
/// `verbs_context.create_qp_ex`.
pub type CreateQpExFn = unsafe extern "C" fn(*mut IbvContext, *mut IbvQpInitAttrEx) -> *mut IbvQp;

/// `struct ibv_rx_hash_conf`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvRxHashConf {
    pub rx_hash_function: u8,
    pub rx_hash_key_len: u8,
    pub rx_hash_key: *mut u8,
    pub rx_hash_fields_mask: u64,
}

/// `struct ibv_qp_init_attr_ex`: a `struct ibv_qp_init_attr` (its first fields), then the
/// extended ones.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvQpInitAttrEx {
    pub qp_context: *mut c_void,
    pub send_cq: *mut IbvCq,
    pub recv_cq: *mut IbvCq,
    pub srq: *mut c_void,
    pub cap: IbvQpCap,
    pub qp_type: u32,
    pub sq_sig_all: c_int,
    pub comp_mask: u32,
    pub pd: *mut IbvPd,
    pub xrcd: *mut c_void,
    pub create_flags: u32,
    pub max_tso_header: u16,
    pub rwq_ind_tbl: *mut c_void,
    pub rx_hash_conf: IbvRxHashConf,
    pub source_qpn: u32,
    pub send_ops_flags: u64,
}

// enum ibv_qp_init_attr_mask
pub const IBV_QP_INIT_ATTR_PD: u32 = 1 << 0;
pub const IBV_QP_INIT_ATTR_XRCD: u32 = 1 << 1;
pub const IBV_QP_INIT_ATTR_CREATE_FLAGS: u32 = 1 << 2;
pub const IBV_QP_INIT_ATTR_MAX_TSO_HEADER: u32 = 1 << 3;
pub const IBV_QP_INIT_ATTR_IND_TABLE: u32 = 1 << 4;
pub const IBV_QP_INIT_ATTR_RX_HASH: u32 = 1 << 5;
pub const IBV_QP_INIT_ATTR_SEND_OPS_FLAGS: u32 = 1 << 6;

// enum ibv_qp_create_send_ops_flags
pub const IBV_QP_EX_WITH_RDMA_WRITE: u64 = 1 << 0;
pub const IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM: u64 = 1 << 1;
pub const IBV_QP_EX_WITH_SEND: u64 = 1 << 2;
pub const IBV_QP_EX_WITH_SEND_WITH_IMM: u64 = 1 << 3;
pub const IBV_QP_EX_WITH_RDMA_READ: u64 = 1 << 4;
pub const IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP: u64 = 1 << 5;
pub const IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD: u64 = 1 << 6;

// enum ibv_qp_type: the XRC transports (refused).
pub const IBV_QPT_XRC_SEND: u32 = 9;
pub const IBV_QPT_XRC_RECV: u32 = 10;

/// `struct ibv_data_buf` (`ibv_wr_set_inline_data_list`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvDataBuf {
    pub addr: *mut c_void,
    pub length: usize,
}

type QpExPtr = *mut IbvQpEx;

/// `struct ibv_qp_ex`: a `struct ibv_qp` (its first field) with the new post API's state
/// (`wr_id`, `wr_flags`, which the program writes before each `ibv_wr_*` operation) and
/// operations. Every QP of this library is one; `ibv_qp_to_qp_ex` hands it out for QPs created
/// with IBV_QP_INIT_ATTR_SEND_OPS_FLAGS.
#[repr(C)]
pub struct IbvQpEx {
    pub qp_base: IbvQp,
    pub comp_mask: u64,
    pub wr_id: u64,
    pub wr_flags: c_uint,
    pub wr_atomic_cmp_swp: Option<unsafe extern "C" fn(QpExPtr, u32, u64, u64, u64)>,
    pub wr_atomic_fetch_add: Option<unsafe extern "C" fn(QpExPtr, u32, u64, u64)>,
    pub wr_bind_mw: Option<unsafe extern "C" fn(QpExPtr, *mut c_void, u32, *const c_void)>,
    pub wr_local_inv: Option<unsafe extern "C" fn(QpExPtr, u32)>,
    pub wr_rdma_read: Option<unsafe extern "C" fn(QpExPtr, u32, u64)>,
    pub wr_rdma_write: Option<unsafe extern "C" fn(QpExPtr, u32, u64)>,
    pub wr_rdma_write_imm: Option<unsafe extern "C" fn(QpExPtr, u32, u64, u32)>,
    pub wr_send: Option<unsafe extern "C" fn(QpExPtr)>,
    pub wr_send_imm: Option<unsafe extern "C" fn(QpExPtr, u32)>,
    pub wr_send_inv: Option<unsafe extern "C" fn(QpExPtr, u32)>,
    pub wr_send_tso: Option<unsafe extern "C" fn(QpExPtr, *mut c_void, u16, u16)>,
    pub wr_set_ud_addr: Option<unsafe extern "C" fn(QpExPtr, *mut IbvAh, u32, u32)>,
    pub wr_set_xrc_srqn: Option<unsafe extern "C" fn(QpExPtr, u32)>,
    pub wr_set_inline_data: Option<unsafe extern "C" fn(QpExPtr, *mut c_void, usize)>,
    pub wr_set_inline_data_list: Option<unsafe extern "C" fn(QpExPtr, usize, *const IbvDataBuf)>,
    pub wr_set_sge: Option<unsafe extern "C" fn(QpExPtr, u32, u64, u32)>,
    pub wr_set_sge_list: Option<unsafe extern "C" fn(QpExPtr, usize, *const IbvSge)>,
    pub wr_start: Option<unsafe extern "C" fn(QpExPtr)>,
    pub wr_complete: Option<unsafe extern "C" fn(QpExPtr) -> c_int>,
    pub wr_abort: Option<unsafe extern "C" fn(QpExPtr)>,
    pub wr_atomic_write: Option<unsafe extern "C" fn(QpExPtr, u32, u64, *const c_void)>,
}

/// `struct ibv_srq`. The library allocates it (inside its own object).
#[repr(C)]
pub struct IbvSrq {
    pub context: *mut IbvContext,
    pub srq_context: *mut c_void,
    pub pd: *mut IbvPd,
    pub handle: u32,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub events_completed: u32,
}

/// `struct ibv_srq_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvSrqAttr {
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

/// `struct ibv_srq_init_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvSrqInitAttr {
    pub srq_context: *mut c_void,
    pub attr: IbvSrqAttr,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvQpInitAttr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut IbvCq,
    pub recv_cq: *mut IbvCq,
    pub srq: *mut c_void,
    pub cap: IbvQpCap,
    pub qp_type: u32,
    pub sq_sig_all: c_int,
}

/// `struct ibv_ah`. The library allocates it; `handle` is the router's.
#[repr(C)]
pub struct IbvAh {
    pub context: *mut IbvContext,
    pub pd: *mut IbvPd,
    pub handle: u32,
}

/// `struct ibv_grh`, the 40 bytes in front of a UD receive.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvGrh {
    pub version_tclass_flow: u32,
    pub paylen: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub sgid: IbvGid,
    pub dgid: IbvGid,
}

/// `struct ibv_sa_path_rec` (`infiniband/sa.h`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvSaPathRec {
    pub dgid: IbvGid,
    pub sgid: IbvGid,
    pub dlid: u16,
    pub slid: u16,
    pub raw_traffic: i32,
    pub flow_label: u32,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub reversible: i32,
    pub numb_path: u8,
    pub pkey: u16,
    pub sl: u8,
    pub mtu_selector: u8,
    pub mtu: u8,
    pub rate_selector: u8,
    pub rate: u8,
    pub packet_life_time_selector: u8,
    pub packet_life_time: u8,
    pub preference: u8,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvSge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `wr.rdma` of `struct ibv_send_wr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvRdmaWr {
    pub remote_addr: u64,
    pub rkey: u32,
}

/// `wr.atomic` of `struct ibv_send_wr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvAtomicWr {
    pub remote_addr: u64,
    pub compare_add: u64,
    pub swap: u64,
    pub rkey: u32,
}

/// `wr.ud` of `struct ibv_send_wr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvUdWr {
    pub ah: *mut IbvAh,
    pub remote_qpn: u32,
    pub remote_qkey: u32,
}

/// The `wr` union of `struct ibv_send_wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IbvSendWrWr {
    pub rdma: IbvRdmaWr,
    pub atomic: IbvAtomicWr,
    pub ud: IbvUdWr,
}

/// `struct ibv_send_wr`. The program owns it; the library only reads it.
#[repr(C)]
pub struct IbvSendWr {
    pub wr_id: u64,
    pub next: *mut IbvSendWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
    pub opcode: u32,
    pub send_flags: u32,
    /// `imm_data` (network byte order) or `invalidate_rkey`.
    pub imm_data: u32,
    pub wr: IbvSendWrWr,
    /// `qp_type.xrc.remote_srqn`.
    pub qp_type: u32,
    /// The `bind_mw`/`tso` union (not used here).
    pub bind_mw: [u64; 6],
}

/// `struct ibv_recv_wr`. The program owns it; the library only reads it.
#[repr(C)]
pub struct IbvRecvWr {
    pub wr_id: u64,
    pub next: *mut IbvRecvWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
}

/// `struct ibv_wc`: the router writes completions in exactly this layout, so the type is the
/// wire's own [`freeflow_proto::verbs::work::Cqe`] (`#[repr(C)]`), checked by the layout test
/// like every structure here.
pub type IbvWc = freeflow_proto::verbs::work::Cqe;

#[cfg(test)]
mod layout_tests;
