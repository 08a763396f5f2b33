//! The layout test of the C ABI: compiles a C program against the installed rdma-core headers
//! and compares every size, alignment, offset and enum value of [`super`] with the C
//! compiler's.

use super::*;
use freeflow_verbs_abi::IbvGlobalRoute;
use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::process::Command;

/// One fact to compare: the C expression and what Rust says it is.
struct Fact {
    c_expr: String,
    rust: usize,
}

macro_rules! layout {
    ($facts:ident, $rty:ty, $cty:literal, [$($field:ident $(= $cfield:literal)?),* $(,)?]) => {
        $facts.push(Fact {
            c_expr: format!("sizeof({})", $cty),
            rust: size_of::<$rty>(),
        });
        $facts.push(Fact {
            c_expr: format!("_Alignof({})", $cty),
            rust: align_of::<$rty>(),
        });
        $(
            $facts.push(Fact {
                c_expr: format!("offsetof({}, {})", $cty, layout!(@c $field $(= $cfield)?)),
                rust: offset_of!($rty, $field),
            });
        )*
    };
    (@c $field:ident = $cfield:literal) => { $cfield };
    (@c $field:ident) => { stringify!($field) };
}

// The wire format's numbers are rdma-core's (what the shim passes through unchanged).
// enum ibv_access_flags
const IBV_ACCESS_LOCAL_WRITE: u32 = freeflow_proto::verbs::access::LOCAL_WRITE;
const IBV_ACCESS_REMOTE_WRITE: u32 = freeflow_proto::verbs::access::REMOTE_WRITE;
const IBV_ACCESS_REMOTE_READ: u32 = freeflow_proto::verbs::access::REMOTE_READ;
const IBV_ACCESS_REMOTE_ATOMIC: u32 = freeflow_proto::verbs::access::REMOTE_ATOMIC;
const IBV_ACCESS_MW_BIND: u32 = freeflow_proto::verbs::access::MW_BIND;
const IBV_ACCESS_ZERO_BASED: u32 = freeflow_proto::verbs::access::ZERO_BASED;
const IBV_ACCESS_ON_DEMAND: u32 = freeflow_proto::verbs::access::ON_DEMAND;
const IBV_ACCESS_HUGETLB: u32 = freeflow_proto::verbs::access::HUGETLB;
const IBV_ACCESS_OPTIONAL_RANGE: u32 = freeflow_proto::verbs::access::OPTIONAL_RANGE;
// enum ibv_wc_status: the completion statuses the router's memory checks produce.
const IBV_WC_LOC_PROT_ERR: u32 = freeflow_proto::verbs::wc_status::LOC_PROT_ERR;
const IBV_WC_REM_ACCESS_ERR: u32 = freeflow_proto::verbs::wc_status::REM_ACCESS_ERR;
// enum ibv_qp_type and enum ibv_wc_flags: the transports and the GRH flag.
const IBV_QPT_UC: u32 = freeflow_proto::verbs::qp::QPT_UC;
const IBV_QPT_UD: u32 = freeflow_proto::verbs::qp::QPT_UD;
const IBV_WC_GRH: u32 = freeflow_proto::verbs::work::wc_flags::GRH;

// The extended verbs' values this library refuses (EOPNOTSUPP), checked all the same.
const IBV_WC_EX_WITH_CVLAN: u64 = 1 << 8;
const IBV_WC_EX_WITH_FLOW_TAG: u64 = 1 << 9;
const IBV_WC_EX_WITH_TM_INFO: u64 = 1 << 10;
const IBV_WC_EX_WITH_COMPLETION_TIMESTAMP_WALLCLOCK: u64 = 1 << 11;
const IBV_QP_EX_WITH_LOCAL_INV: u64 = 1 << 7;
const IBV_QP_EX_WITH_BIND_MW: u64 = 1 << 8;
const IBV_QP_EX_WITH_SEND_WITH_INV: u64 = 1 << 9;
const IBV_QP_EX_WITH_TSO: u64 = 1 << 10;
const IBV_QP_EX_WITH_ATOMIC_WRITE: u64 = 1 << 12;

macro_rules! values {
    ($facts:ident, [$($name:ident),* $(,)?]) => {
        $(
            $facts.push(Fact {
                c_expr: format!("(size_t)({})", stringify!($name)),
                rust: $name as usize,
            });
        )*
    };
}

fn facts() -> Vec<Fact> {
    let mut f = Vec::new();
    layout!(
        f,
        IbvDevice,
        "struct ibv_device",
        [
            ops = "_ops",
            node_type,
            transport_type,
            name,
            dev_name,
            dev_path,
            ibdev_path
        ]
    );
    layout!(
        f,
        IbvContextOps,
        "struct ibv_context_ops",
        [
            compat_query_device = "_compat_query_device",
            compat_query_port = "_compat_query_port",
            alloc_mw,
            bind_mw,
            dealloc_mw,
            poll_cq,
            req_notify_cq,
            post_srq_recv,
            post_send,
            post_recv,
            compat_async_event = "_compat_async_event"
        ]
    );
    layout!(
        f,
        IbvContext,
        "struct ibv_context",
        [
            device,
            ops,
            cmd_fd,
            async_fd,
            num_comp_vectors,
            mutex,
            abi_compat
        ]
    );
    layout!(
        f,
        VerbsContext,
        "struct verbs_context",
        [
            query_port,
            advise_mr,
            create_cq_ex,
            priv_ = "priv",
            query_device_ex,
            ibv_destroy_flow,
            abi_placeholder2 = "ABI_placeholder2",
            ibv_create_flow,
            abi_placeholder1 = "ABI_placeholder1",
            open_qp,
            create_qp_ex,
            get_srq_num,
            create_srq_ex,
            open_xrcd,
            close_xrcd,
            abi_placeholder3 = "_ABI_placeholder3",
            sz,
            context
        ]
    );
    layout!(
        f,
        IbvDeviceAttr,
        "struct ibv_device_attr",
        [
            fw_ver,
            node_guid,
            sys_image_guid,
            max_mr_size,
            page_size_cap,
            vendor_id,
            vendor_part_id,
            hw_ver,
            max_qp,
            max_qp_wr,
            device_cap_flags,
            max_sge,
            max_sge_rd,
            max_cq,
            max_cqe,
            max_mr,
            max_pd,
            max_qp_rd_atom,
            max_ee_rd_atom,
            max_res_rd_atom,
            max_qp_init_rd_atom,
            max_ee_init_rd_atom,
            atomic_cap,
            max_ee,
            max_rdd,
            max_mw,
            max_raw_ipv6_qp,
            max_raw_ethy_qp,
            max_mcast_grp,
            max_mcast_qp_attach,
            max_total_mcast_qp_attach,
            max_ah,
            max_fmr,
            max_map_per_fmr,
            max_srq,
            max_srq_wr,
            max_srq_sge,
            max_pkeys,
            local_ca_ack_delay,
            phys_port_cnt
        ]
    );
    layout!(
        f,
        IbvQueryDeviceExInput,
        "struct ibv_query_device_ex_input",
        [comp_mask]
    );
    layout!(
        f,
        IbvOdpCaps,
        "struct ibv_odp_caps",
        [
            general_caps,
            rc_odp_caps = "per_transport_caps.rc_odp_caps",
            uc_odp_caps = "per_transport_caps.uc_odp_caps",
            ud_odp_caps = "per_transport_caps.ud_odp_caps"
        ]
    );
    layout!(
        f,
        IbvTsoCaps,
        "struct ibv_tso_caps",
        [max_tso, supported_qpts]
    );
    layout!(
        f,
        IbvRssCaps,
        "struct ibv_rss_caps",
        [
            supported_qpts,
            max_rwq_indirection_tables,
            max_rwq_indirection_table_size,
            rx_hash_fields_mask,
            rx_hash_function
        ]
    );
    layout!(
        f,
        IbvPacketPacingCaps,
        "struct ibv_packet_pacing_caps",
        [qp_rate_limit_min, qp_rate_limit_max, supported_qpts]
    );
    layout!(
        f,
        IbvTmCaps,
        "struct ibv_tm_caps",
        [max_rndv_hdr_size, max_num_tags, flags, max_ops, max_sge]
    );
    layout!(
        f,
        IbvCqModerationCaps,
        "struct ibv_cq_moderation_caps",
        [max_cq_count, max_cq_period]
    );
    layout!(
        f,
        IbvPciAtomicCaps,
        "struct ibv_pci_atomic_caps",
        [fetch_add, swap, compare_swap]
    );
    layout!(
        f,
        IbvDeviceAttrEx,
        "struct ibv_device_attr_ex",
        [
            orig_attr,
            comp_mask,
            odp_caps,
            completion_timestamp_mask,
            hca_core_clock,
            device_cap_flags_ex,
            tso_caps,
            rss_caps,
            max_wq_type_rq,
            packet_pacing_caps,
            raw_packet_caps,
            tm_caps,
            cq_mod_caps,
            max_dm_size,
            pci_atomic_caps,
            xrc_odp_caps,
            phys_port_cnt_ex
        ]
    );
    layout!(
        f,
        IbvPortAttr,
        "struct ibv_port_attr",
        [
            state,
            max_mtu,
            active_mtu,
            gid_tbl_len,
            port_cap_flags,
            max_msg_sz,
            bad_pkey_cntr,
            qkey_viol_cntr,
            pkey_tbl_len,
            lid,
            sm_lid,
            lmc,
            max_vl_num,
            sm_sl,
            subnet_timeout,
            init_type_reply,
            active_width,
            active_speed,
            phys_state,
            link_layer,
            flags,
            port_cap_flags2
        ]
    );
    layout!(f, IbvGid, "union ibv_gid", [raw]);
    layout!(
        f,
        IbvSaPathRec,
        "struct ibv_sa_path_rec",
        [
            dgid,
            sgid,
            dlid,
            slid,
            raw_traffic,
            flow_label,
            hop_limit,
            traffic_class,
            reversible,
            numb_path,
            pkey,
            sl,
            mtu_selector,
            mtu,
            rate_selector,
            rate,
            packet_life_time_selector,
            packet_life_time,
            preference
        ]
    );
    // The kernel structures `ibv_copy_*_from_kern` read (crate::marshall).
    layout!(
        f,
        crate::marshall::KernAhAttr,
        "struct ib_uverbs_ah_attr",
        [
            grh,
            dlid,
            sl,
            src_path_bits,
            static_rate,
            is_global,
            port_num
        ]
    );
    layout!(
        f,
        crate::marshall::KernGlobalRoute,
        "struct ib_uverbs_global_route",
        [dgid, flow_label, sgid_index, hop_limit, traffic_class]
    );
    layout!(
        f,
        crate::marshall::KernQpAttr,
        "struct ib_uverbs_qp_attr",
        [
            qp_attr_mask,
            qp_state,
            cur_qp_state,
            path_mtu,
            path_mig_state,
            qkey,
            rq_psn,
            sq_psn,
            dest_qp_num,
            qp_access_flags,
            ah_attr,
            alt_ah_attr,
            max_send_wr,
            max_recv_wr,
            max_send_sge,
            max_recv_sge,
            max_inline_data,
            pkey_index,
            alt_pkey_index,
            en_sqd_async_notify,
            sq_draining,
            max_rd_atomic,
            max_dest_rd_atomic,
            min_rnr_timer,
            port_num,
            timeout,
            retry_cnt,
            rnr_retry,
            alt_port_num,
            alt_timeout
        ]
    );
    layout!(
        f,
        crate::marshall::KernPathRec,
        "struct ib_user_path_rec",
        [
            dgid,
            sgid,
            dlid,
            slid,
            raw_traffic,
            flow_label,
            reversible,
            mtu,
            pkey,
            hop_limit,
            traffic_class,
            numb_path,
            sl,
            mtu_selector,
            rate_selector,
            rate,
            packet_life_time_selector,
            packet_life_time,
            preference
        ]
    );
    layout!(f, IbvPd, "struct ibv_pd", [context, handle]);
    layout!(
        f,
        IbvMr,
        "struct ibv_mr",
        [context, pd, addr, length, handle, lkey, rkey]
    );
    layout!(
        f,
        IbvGidEntry,
        "struct ibv_gid_entry",
        [gid, gid_index, port_num, gid_type, ndev_ifindex]
    );
    layout!(
        f,
        IbvCompChannel,
        "struct ibv_comp_channel",
        [context, fd, refcnt]
    );
    layout!(
        f,
        IbvCq,
        "struct ibv_cq",
        [
            context,
            channel,
            cq_context,
            handle,
            cqe,
            mutex,
            cond,
            comp_events_completed,
            async_events_completed
        ]
    );
    layout!(
        f,
        IbvQp,
        "struct ibv_qp",
        [
            context,
            qp_context,
            pd,
            send_cq,
            recv_cq,
            srq,
            handle,
            qp_num,
            state,
            qp_type,
            mutex,
            cond,
            events_completed
        ]
    );
    layout!(
        f,
        IbvCqEx,
        "struct ibv_cq_ex",
        [
            cq = "context",
            comp_mask,
            status,
            wr_id,
            start_poll,
            next_poll,
            end_poll,
            read_opcode,
            read_vendor_err,
            read_byte_len,
            read_imm_data,
            read_qp_num,
            read_src_qp,
            read_wc_flags,
            read_slid,
            read_sl,
            read_dlid_path_bits,
            read_completion_ts,
            read_cvlan,
            read_flow_tag,
            read_tm_info,
            read_completion_wallclock_ns
        ]
    );
    layout!(f, IbvPollCqAttr, "struct ibv_poll_cq_attr", [comp_mask]);
    layout!(
        f,
        IbvValuesEx,
        "struct ibv_values_ex",
        [comp_mask, raw_clock]
    );
    layout!(
        f,
        IbvCqInitAttrEx,
        "struct ibv_cq_init_attr_ex",
        [
            cqe,
            cq_context,
            channel,
            comp_vector,
            wc_flags,
            comp_mask,
            flags,
            parent_domain
        ]
    );
    layout!(
        f,
        IbvRxHashConf,
        "struct ibv_rx_hash_conf",
        [
            rx_hash_function,
            rx_hash_key_len,
            rx_hash_key,
            rx_hash_fields_mask
        ]
    );
    layout!(
        f,
        IbvQpInitAttrEx,
        "struct ibv_qp_init_attr_ex",
        [
            qp_context,
            send_cq,
            recv_cq,
            srq,
            cap,
            qp_type,
            sq_sig_all,
            comp_mask,
            pd,
            xrcd,
            create_flags,
            max_tso_header,
            rwq_ind_tbl,
            rx_hash_conf,
            source_qpn,
            send_ops_flags
        ]
    );
    layout!(f, IbvDataBuf, "struct ibv_data_buf", [addr, length]);
    layout!(
        f,
        IbvQpEx,
        "struct ibv_qp_ex",
        [
            qp_base,
            comp_mask,
            wr_id,
            wr_flags,
            wr_atomic_cmp_swp,
            wr_atomic_fetch_add,
            wr_bind_mw,
            wr_local_inv,
            wr_rdma_read,
            wr_rdma_write,
            wr_rdma_write_imm,
            wr_send,
            wr_send_imm,
            wr_send_inv,
            wr_send_tso,
            wr_set_ud_addr,
            wr_set_xrc_srqn,
            wr_set_inline_data,
            wr_set_inline_data_list,
            wr_set_sge,
            wr_set_sge_list,
            wr_start,
            wr_complete,
            wr_abort,
            wr_atomic_write
        ]
    );
    layout!(
        f,
        IbvSrq,
        "struct ibv_srq",
        [
            context,
            srq_context,
            pd,
            handle,
            mutex,
            cond,
            events_completed
        ]
    );
    layout!(f, IbvAh, "struct ibv_ah", [context, pd, handle]);
    layout!(
        f,
        IbvGrh,
        "struct ibv_grh",
        [version_tclass_flow, paylen, next_hdr, hop_limit, sgid, dgid]
    );
    layout!(
        f,
        IbvSrqAttr,
        "struct ibv_srq_attr",
        [max_wr, max_sge, srq_limit]
    );
    layout!(
        f,
        IbvSrqInitAttr,
        "struct ibv_srq_init_attr",
        [srq_context, attr]
    );
    layout!(
        f,
        IbvQpCap,
        "struct ibv_qp_cap",
        [
            max_send_wr,
            max_recv_wr,
            max_send_sge,
            max_recv_sge,
            max_inline_data
        ]
    );
    layout!(
        f,
        IbvQpInitAttr,
        "struct ibv_qp_init_attr",
        [qp_context, send_cq, recv_cq, srq, cap, qp_type, sq_sig_all]
    );
    layout!(
        f,
        IbvGlobalRoute,
        "struct ibv_global_route",
        [dgid, flow_label, sgid_index, hop_limit, traffic_class]
    );
    layout!(
        f,
        IbvAhAttr,
        "struct ibv_ah_attr",
        [
            grh,
            dlid,
            sl,
            src_path_bits,
            static_rate,
            is_global,
            port_num
        ]
    );
    layout!(
        f,
        IbvQpAttr,
        "struct ibv_qp_attr",
        [
            qp_state,
            cur_qp_state,
            path_mtu,
            path_mig_state,
            qkey,
            rq_psn,
            sq_psn,
            dest_qp_num,
            qp_access_flags,
            cap,
            ah_attr,
            alt_ah_attr,
            pkey_index,
            alt_pkey_index,
            en_sqd_async_notify,
            sq_draining,
            max_rd_atomic,
            max_dest_rd_atomic,
            min_rnr_timer,
            port_num,
            timeout,
            retry_cnt,
            rnr_retry,
            alt_port_num,
            alt_timeout,
            rate_limit
        ]
    );
    layout!(f, IbvSge, "struct ibv_sge", [addr, length, lkey]);
    layout!(
        f,
        IbvSendWr,
        "struct ibv_send_wr",
        [wr_id, next, sg_list, num_sge, opcode, send_flags, imm_data, wr, qp_type, bind_mw]
    );
    for (c_field, rust) in [
        (
            "wr.rdma.remote_addr",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvRdmaWr, remote_addr),
        ),
        (
            "wr.rdma.rkey",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvRdmaWr, rkey),
        ),
        (
            "wr.atomic.remote_addr",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvAtomicWr, remote_addr),
        ),
        (
            "wr.atomic.compare_add",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvAtomicWr, compare_add),
        ),
        (
            "wr.atomic.swap",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvAtomicWr, swap),
        ),
        (
            "wr.atomic.rkey",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvAtomicWr, rkey),
        ),
        (
            "wr.ud.ah",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvUdWr, ah),
        ),
        (
            "wr.ud.remote_qpn",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvUdWr, remote_qpn),
        ),
        (
            "wr.ud.remote_qkey",
            offset_of!(IbvSendWr, wr) + offset_of!(IbvUdWr, remote_qkey),
        ),
    ] {
        f.push(Fact {
            c_expr: format!("offsetof(struct ibv_send_wr, {c_field})"),
            rust,
        });
    }
    layout!(
        f,
        IbvRecvWr,
        "struct ibv_recv_wr",
        [wr_id, next, sg_list, num_sge]
    );
    layout!(
        f,
        IbvWc,
        "struct ibv_wc",
        [
            wr_id,
            status,
            opcode,
            vendor_err,
            byte_len,
            imm_data,
            qp_num,
            src_qp,
            wc_flags,
            pkey_index,
            slid,
            sl,
            dlid_path_bits
        ]
    );
    {
        use freeflow_proto::verbs::qp::{mask, QpState, MTU_MAX, QPT_RC};
        use freeflow_proto::verbs::wc_status as st;
        use freeflow_proto::verbs::work::{send_flags, wc_flags, wc_opcode, wr_opcode, Cqe};
        let wire = [
            ("IBV_QPS_RESET", QpState::Reset as usize),
            ("IBV_QPS_INIT", QpState::Init as usize),
            ("IBV_QPS_RTR", QpState::Rtr as usize),
            ("IBV_QPS_RTS", QpState::Rts as usize),
            ("IBV_QPS_SQD", QpState::Sqd as usize),
            ("IBV_QPS_SQE", QpState::Sqe as usize),
            ("IBV_QPS_ERR", QpState::Err as usize),
            ("IBV_QPT_RC", QPT_RC as usize),
            ("IBV_MTU_4096", MTU_MAX as usize),
            ("IBV_QP_STATE", mask::STATE as usize),
            ("IBV_QP_CUR_STATE", mask::CUR_STATE as usize),
            (
                "IBV_QP_EN_SQD_ASYNC_NOTIFY",
                mask::EN_SQD_ASYNC_NOTIFY as usize,
            ),
            ("IBV_QP_ACCESS_FLAGS", mask::ACCESS_FLAGS as usize),
            ("IBV_QP_PKEY_INDEX", mask::PKEY_INDEX as usize),
            ("IBV_QP_PORT", mask::PORT as usize),
            ("IBV_QP_QKEY", mask::QKEY as usize),
            ("IBV_QP_AV", mask::AV as usize),
            ("IBV_QP_PATH_MTU", mask::PATH_MTU as usize),
            ("IBV_QP_TIMEOUT", mask::TIMEOUT as usize),
            ("IBV_QP_RETRY_CNT", mask::RETRY_CNT as usize),
            ("IBV_QP_RNR_RETRY", mask::RNR_RETRY as usize),
            ("IBV_QP_RQ_PSN", mask::RQ_PSN as usize),
            ("IBV_QP_MAX_QP_RD_ATOMIC", mask::MAX_QP_RD_ATOMIC as usize),
            ("IBV_QP_ALT_PATH", mask::ALT_PATH as usize),
            ("IBV_QP_MIN_RNR_TIMER", mask::MIN_RNR_TIMER as usize),
            ("IBV_QP_SQ_PSN", mask::SQ_PSN as usize),
            (
                "IBV_QP_MAX_DEST_RD_ATOMIC",
                mask::MAX_DEST_RD_ATOMIC as usize,
            ),
            ("IBV_QP_PATH_MIG_STATE", mask::PATH_MIG_STATE as usize),
            ("IBV_QP_CAP", mask::CAP as usize),
            ("IBV_QP_DEST_QPN", mask::DEST_QPN as usize),
            ("IBV_QP_RATE_LIMIT", mask::RATE_LIMIT as usize),
            ("IBV_WR_RDMA_WRITE", wr_opcode::RDMA_WRITE as usize),
            (
                "IBV_WR_RDMA_WRITE_WITH_IMM",
                wr_opcode::RDMA_WRITE_WITH_IMM as usize,
            ),
            ("IBV_WR_SEND", wr_opcode::SEND as usize),
            ("IBV_WR_SEND_WITH_IMM", wr_opcode::SEND_WITH_IMM as usize),
            ("IBV_WR_RDMA_READ", wr_opcode::RDMA_READ as usize),
            (
                "IBV_WR_ATOMIC_CMP_AND_SWP",
                wr_opcode::ATOMIC_CMP_AND_SWP as usize,
            ),
            (
                "IBV_WR_ATOMIC_FETCH_AND_ADD",
                wr_opcode::ATOMIC_FETCH_AND_ADD as usize,
            ),
            ("IBV_SEND_FENCE", send_flags::FENCE as usize),
            ("IBV_SEND_SIGNALED", send_flags::SIGNALED as usize),
            ("IBV_SEND_SOLICITED", send_flags::SOLICITED as usize),
            ("IBV_SEND_INLINE", send_flags::INLINE as usize),
            ("IBV_SEND_IP_CSUM", send_flags::IP_CSUM as usize),
            ("IBV_WC_SEND", wc_opcode::SEND as usize),
            ("IBV_WC_RDMA_WRITE", wc_opcode::RDMA_WRITE as usize),
            ("IBV_WC_RDMA_READ", wc_opcode::RDMA_READ as usize),
            ("IBV_WC_COMP_SWAP", wc_opcode::COMP_SWAP as usize),
            ("IBV_WC_FETCH_ADD", wc_opcode::FETCH_ADD as usize),
            ("IBV_WC_RECV", wc_opcode::RECV as usize),
            (
                "IBV_WC_RECV_RDMA_WITH_IMM",
                wc_opcode::RECV_RDMA_WITH_IMM as usize,
            ),
            ("IBV_WC_WITH_IMM", wc_flags::WITH_IMM as usize),
            ("IBV_WC_SUCCESS", st::SUCCESS as usize),
            ("IBV_WC_LOC_LEN_ERR", st::LOC_LEN_ERR as usize),
            ("IBV_WC_LOC_QP_OP_ERR", st::LOC_QP_OP_ERR as usize),
            ("IBV_WC_WR_FLUSH_ERR", st::WR_FLUSH_ERR as usize),
            ("IBV_WC_REM_INV_REQ_ERR", st::REM_INV_REQ_ERR as usize),
            ("IBV_WC_REM_OP_ERR", st::REM_OP_ERR as usize),
            ("IBV_WC_RETRY_EXC_ERR", st::RETRY_EXC_ERR as usize),
            ("IBV_WC_RNR_RETRY_EXC_ERR", st::RNR_RETRY_EXC_ERR as usize),
            ("sizeof(struct ibv_wc)", Cqe::LEN),
            (
                "IBV_SRQ_MAX_WR",
                freeflow_proto::verbs::srq::mask::MAX_WR as usize,
            ),
            (
                "IBV_SRQ_LIMIT",
                freeflow_proto::verbs::srq::mask::LIMIT as usize,
            ),
        ];
        for (c_expr, rust) in wire {
            f.push(Fact {
                c_expr: format!("(size_t)({c_expr})"),
                rust,
            });
        }
    }
    values!(f, [IBV_QPT_UC, IBV_QPT_UD, IBV_WC_GRH]);
    values!(
        f,
        [
            IBV_VALUES_MASK_RAW_CLOCK,
            IBV_CQ_INIT_ATTR_MASK_FLAGS,
            IBV_CQ_INIT_ATTR_MASK_PD,
            IBV_CREATE_CQ_ATTR_SINGLE_THREADED,
            IBV_CREATE_CQ_ATTR_IGNORE_OVERRUN,
            IBV_WC_EX_WITH_BYTE_LEN,
            IBV_WC_EX_WITH_IMM,
            IBV_WC_EX_WITH_QP_NUM,
            IBV_WC_EX_WITH_SRC_QP,
            IBV_WC_EX_WITH_SLID,
            IBV_WC_EX_WITH_SL,
            IBV_WC_EX_WITH_DLID_PATH_BITS,
            IBV_WC_EX_WITH_COMPLETION_TIMESTAMP,
            IBV_WC_EX_WITH_CVLAN,
            IBV_WC_EX_WITH_FLOW_TAG,
            IBV_WC_EX_WITH_TM_INFO,
            IBV_WC_EX_WITH_COMPLETION_TIMESTAMP_WALLCLOCK,
            IBV_QP_INIT_ATTR_PD,
            IBV_QP_INIT_ATTR_XRCD,
            IBV_QP_INIT_ATTR_CREATE_FLAGS,
            IBV_QP_INIT_ATTR_MAX_TSO_HEADER,
            IBV_QP_INIT_ATTR_IND_TABLE,
            IBV_QP_INIT_ATTR_RX_HASH,
            IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
            IBV_QP_EX_WITH_RDMA_WRITE,
            IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM,
            IBV_QP_EX_WITH_SEND,
            IBV_QP_EX_WITH_SEND_WITH_IMM,
            IBV_QP_EX_WITH_RDMA_READ,
            IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP,
            IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD,
            IBV_QP_EX_WITH_LOCAL_INV,
            IBV_QP_EX_WITH_BIND_MW,
            IBV_QP_EX_WITH_SEND_WITH_INV,
            IBV_QP_EX_WITH_TSO,
            IBV_QP_EX_WITH_ATOMIC_WRITE,
            IBV_QPT_XRC_SEND,
            IBV_QPT_XRC_RECV,
        ]
    );
    values!(
        f,
        [
            IBV_SYSFS_NAME_MAX,
            IBV_SYSFS_PATH_MAX,
            IBV_NODE_CA,
            IBV_TRANSPORT_IB,
            IBV_PORT_ACTIVE,
            IBV_MTU_1024,
            IBV_MTU_4096,
            IBV_LINK_LAYER_ETHERNET,
            IBV_ATOMIC_HCA,
            IBV_DEVICE_SYS_IMAGE_GUID,
            IBV_DEVICE_RC_RNR_NAK_GEN,
            IBV_PORT_IP_BASED_GIDS,
            IBV_GID_TYPE_ROCE_V2,
            IBV_FORK_DISABLED,
            IBV_FORK_ENABLED,
            IBV_ACCESS_LOCAL_WRITE,
            IBV_ACCESS_REMOTE_WRITE,
            IBV_ACCESS_REMOTE_READ,
            IBV_ACCESS_REMOTE_ATOMIC,
            IBV_ACCESS_MW_BIND,
            IBV_ACCESS_ZERO_BASED,
            IBV_ACCESS_ON_DEMAND,
            IBV_ACCESS_HUGETLB,
            IBV_ACCESS_OPTIONAL_RANGE,
            IBV_WC_LOC_PROT_ERR,
            IBV_WC_REM_ACCESS_ERR
        ]
    );
    f.push(Fact {
        c_expr: "(size_t)__VERBS_ABI_IS_EXTENDED".into(),
        rust: VERBS_ABI_IS_EXTENDED,
    });
    f.push(Fact {
        c_expr: "(size_t)(IBV_REREG_MR_ERR_INPUT + 100)".into(),
        rust: (IBV_REREG_MR_ERR_INPUT + 100) as usize,
    });
    f
}

/// Compiles and runs a C program printing every fact as the installed headers define it.
fn c_values(facts: &[Fact]) -> BTreeMap<String, usize> {
    let header = std::path::Path::new("/usr/include/infiniband/verbs.h");
    assert!(
        header.exists(),
        "{} missing: apt-get install libibverbs-dev (scripts/test.sh does)",
        header.display()
    );
    let dir = std::env::temp_dir().join(format!("ff-verbs-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut program = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <infiniband/verbs.h>\n\
         #include <infiniband/sa.h>\n#include <rdma/ib_user_verbs.h>\n#include <rdma/ib_user_sa.h>\n\
         int main(void) {\n",
    );
    for fact in facts {
        program.push_str(&format!(
            "    printf(\"%s=%zu\\n\", \"{0}\", (size_t)({0}));\n",
            fact.c_expr
        ));
    }
    program.push_str("    return 0;\n}\n");
    let source = dir.join("layout.c");
    let binary = dir.join("layout");
    std::fs::write(&source, program).unwrap();
    let cc = Command::new("cc")
        .arg("-Wall")
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&binary)
        .output()
        .expect("run the layout program");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (k, v) = line.rsplit_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn layout_matches_the_installed_headers() {
    let facts = facts();
    let c = c_values(&facts);
    let mismatches: Vec<String> = facts
        .iter()
        .filter(|f| c.get(&f.c_expr) != Some(&f.rust))
        .map(|f| format!("{}: C {:?}, Rust {}", f.c_expr, c.get(&f.c_expr), f.rust))
        .collect();
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
    assert!(facts.len() > 150, "only {} facts checked", facts.len());
}

/// The numbers DESIGN.md section 7 quotes (also covered by the comparison above).
#[test]
fn design_numbers() {
    assert_eq!(offset_of!(IbvContextOps, poll_cq), 88);
    assert_eq!(offset_of!(IbvContextOps, req_notify_cq), 96);
    assert_eq!(offset_of!(IbvContextOps, post_srq_recv), 160);
    assert_eq!(offset_of!(IbvContextOps, post_send), 200);
    assert_eq!(offset_of!(IbvContextOps, post_recv), 208);
    assert_eq!(size_of::<IbvContextOps>(), 256);
    assert_eq!(size_of::<IbvContext>(), 328);
    assert_eq!(size_of::<VerbsContext>(), 648);
    assert_eq!(offset_of!(VerbsContext, sz), 312);
    assert_eq!(offset_of!(VerbsContext, context), 320);
    assert_eq!(COMPAT_PORT_ATTR_LEN, 48);
}
