//! The providers' exported entry points, each bound to its provider's version node: every
//! function of rdma-core 44's `libmlx5.so.1` and `libefa.so.1` that a Debian 12 binary or library
//! imports (checked with `objdump -T` over libfabric1, libucx0's `libuct_ib`, perftest, openmpi,
//! python3-pyverbs and the rest of rdma-core; see docs/verbs-engine.md). The loader resolves
//! them at load time (libfabric is linked with immediate binding, Python loads extension
//! modules with `RTLD_NOW`), so a missing one stops the program before it can ask for a device.
//!
//! The signatures are the headers' (mlx5dv.h, efadv.h), reduced to their ABI: any pointer is
//! [`Ptr`], an enum is a C `int`. No stand-in reads its arguments. What each returns follows its
//! C return type, the answer the real providers give for a device of another vendor:
//! - `Object` (a pointer): NULL with `errno` = `EOPNOTSUPP`;
//! - `Status` (an `int` that is 0 on success): `EOPNOTSUPP`, with `errno` set too, since the real
//!   functions differ in which of the two they use;
//! - `Fd` (`int`, a descriptor) and `Count` (`ssize_t`): -1 with `errno` = `EOPNOTSUPP`;
//! - `False` (`bool`, `mlx5dv_is_supported`): false;
//! - `Nothing` (`void`, the release calls): no effect, there is nothing to release.
//!
//! They are `#[no_mangle]` (the reason this module allows `unsafe_code`) but contain no unsafe
//! block.

use freeflow_os::errno::set_errno;
use std::ffi::{c_int, c_void};

/// Any pointer argument (the stand-ins never dereference one).
type Ptr = *mut c_void;

/// What every stand-in reports: the device is not one of this provider's.
const NOT_OURS: c_int = libc::EOPNOTSUPP;

/// NULL with `errno` = [`NOT_OURS`], for the calls that return an object.
fn none<T>() -> *mut T {
    set_errno(NOT_OURS);
    std::ptr::null_mut()
}

/// [`NOT_OURS`] as the result and in `errno`, for the calls that return a status.
fn refused() -> c_int {
    set_errno(NOT_OURS);
    NOT_OURS
}

/// One exported stand-in; its last token says what it returns (see the module docs).
macro_rules! stand_in {
    ($name:ident ($($arg:ident: $ty:ty),*) Object) => {
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) -> Ptr {
            none()
        }
    };
    ($name:ident ($($arg:ident: $ty:ty),*) Status) => {
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) -> c_int {
            refused()
        }
    };
    ($name:ident ($($arg:ident: $ty:ty),*) Fd) => {
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) -> c_int {
            set_errno(NOT_OURS);
            -1
        }
    };
    ($name:ident ($($arg:ident: $ty:ty),*) Count) => {
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) -> isize {
            set_errno(NOT_OURS);
            -1
        }
    };
    ($name:ident ($($arg:ident: $ty:ty),*) False) => {
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) -> bool {
            false
        }
    };
    ($name:ident ($($arg:ident: $ty:ty),*) Nothing) => {
        #[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) {}
    };
}

/// The stand-ins grouped by version node: binds each to its node (providers.map) as shim/verbs
/// does, and defines it with [`stand_in!`].
macro_rules! stand_ins {
    ($($node:literal: {
        $(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $kind:ident;)*
    })*) => {
        freeflow_os::symbol_versions! { $($node: [$($name),*]),* }
        $($(stand_in!($name ($($arg: $ty),*) $kind);)*)*
    };
}

stand_ins! {
    "MLX5_1.0": {
        fn mlx5dv_query_device(_ctx_in: Ptr, _attrs_out: Ptr) -> Status;
    }
    "MLX5_1.1": {
        fn mlx5dv_create_cq(_context: Ptr, _cq_attr: Ptr, _mlx5_cq_attr: Ptr) -> Object;
    }
    "MLX5_1.2": {
        fn mlx5dv_init_obj(_obj: Ptr, _obj_type: u64) -> Status;
    }
    "MLX5_1.3": {
        fn mlx5dv_create_qp(_context: Ptr, _qp_attr: Ptr, _mlx5_qp_attr: Ptr) -> Object;
    }
    "MLX5_1.4": {
        fn mlx5dv_get_clock_info(_context: Ptr, _clock_info: Ptr) -> Status;
    }
    "MLX5_1.6": {
        fn mlx5dv_create_flow(
            _matcher: Ptr,
            _match_value: Ptr,
            _num_actions: usize,
            _actions_attr: Ptr,
        ) -> Object;
        fn mlx5dv_create_flow_matcher(_context: Ptr, _matcher_attr: Ptr) -> Object;
        fn mlx5dv_destroy_flow_matcher(_matcher: Ptr) -> Status;
    }
    "MLX5_1.7": {
        fn mlx5dv_create_flow_action_packet_reformat(
            _ctx: Ptr,
            _data_sz: usize,
            _data: Ptr,
            _reformat_type: c_int,
            _ft_type: c_int,
        ) -> Object;
        fn mlx5dv_devx_alloc_uar(_context: Ptr, _flags: u32) -> Object;
        fn mlx5dv_devx_free_uar(_devx_uar: Ptr) -> Nothing;
        fn mlx5dv_devx_general_cmd(
            _context: Ptr,
            _in: Ptr,
            _inlen: usize,
            _out: Ptr,
            _outlen: usize,
        ) -> Status;
        fn mlx5dv_devx_obj_create(
            _context: Ptr,
            _in: Ptr,
            _inlen: usize,
            _out: Ptr,
            _outlen: usize,
        ) -> Object;
        fn mlx5dv_devx_obj_destroy(_obj: Ptr) -> Status;
        fn mlx5dv_devx_obj_modify(
            _obj: Ptr,
            _in: Ptr,
            _inlen: usize,
            _out: Ptr,
            _outlen: usize,
        ) -> Status;
        fn mlx5dv_devx_obj_query(
            _obj: Ptr,
            _in: Ptr,
            _inlen: usize,
            _out: Ptr,
            _outlen: usize,
        ) -> Status;
        fn mlx5dv_devx_query_eqn(_context: Ptr, _vector: u32, _eqn: Ptr) -> Status;
        fn mlx5dv_devx_umem_dereg(_umem: Ptr) -> Status;
        fn mlx5dv_devx_umem_reg(_ctx: Ptr, _addr: Ptr, _size: usize, _access: u32) -> Object;
        fn mlx5dv_open_device(_device: Ptr, _attr: Ptr) -> Object;
    }
    "MLX5_1.8": {
        fn mlx5dv_devx_qp_modify(
            _qp: Ptr,
            _in: Ptr,
            _inlen: usize,
            _out: Ptr,
            _outlen: usize,
        ) -> Status;
        fn mlx5dv_devx_qp_query(
            _qp: Ptr,
            _in: Ptr,
            _inlen: usize,
            _out: Ptr,
            _outlen: usize,
        ) -> Status;
        fn mlx5dv_is_supported(_device: Ptr) -> False;
    }
    "MLX5_1.10": {
        fn mlx5dv_create_mkey(_mkey_init_attr: Ptr) -> Object;
        fn mlx5dv_destroy_mkey(_mkey: Ptr) -> Status;
        fn mlx5dv_dr_action_create_dest_ibv_qp(_ibqp: Ptr) -> Object;
        fn mlx5dv_dr_action_create_dest_table(_table: Ptr) -> Object;
        fn mlx5dv_dr_action_create_dest_vport(_domain: Ptr, _vport: u32) -> Object;
        fn mlx5dv_dr_action_create_drop() -> Object;
        fn mlx5dv_dr_action_create_flow_counter(_devx_obj: Ptr, _offset: u32) -> Object;
        fn mlx5dv_dr_action_create_modify_header(
            _domain: Ptr,
            _flags: u32,
            _actions_sz: usize,
            _actions: Ptr,
        ) -> Object;
        fn mlx5dv_dr_action_create_packet_reformat(
            _domain: Ptr,
            _flags: u32,
            _reformat_type: c_int,
            _data_sz: usize,
            _data: Ptr,
        ) -> Object;
        fn mlx5dv_dr_action_create_tag(_tag_value: u32) -> Object;
        fn mlx5dv_dr_action_destroy(_action: Ptr) -> Status;
        fn mlx5dv_dr_domain_create(_ctx: Ptr, _type: c_int) -> Object;
        fn mlx5dv_dr_domain_destroy(_domain: Ptr) -> Status;
        fn mlx5dv_dr_domain_sync(_domain: Ptr, _flags: u32) -> Status;
        fn mlx5dv_dr_matcher_create(
            _table: Ptr,
            _priority: u16,
            _match_criteria_enable: u8,
            _mask: Ptr,
        ) -> Object;
        fn mlx5dv_dr_matcher_destroy(_matcher: Ptr) -> Status;
        fn mlx5dv_dr_rule_create(
            _matcher: Ptr,
            _value: Ptr,
            _num_actions: usize,
            _actions: Ptr,
        ) -> Object;
        fn mlx5dv_dr_rule_destroy(_rule: Ptr) -> Status;
        fn mlx5dv_dr_table_create(_domain: Ptr, _level: u32) -> Object;
        fn mlx5dv_dr_table_destroy(_table: Ptr) -> Status;
        fn mlx5dv_qp_ex_from_ibv_qp_ex(_qp: Ptr) -> Object;
    }
    "MLX5_1.11": {
        fn mlx5dv_devx_create_event_channel(_context: Ptr, _flags: c_int) -> Object;
        fn mlx5dv_devx_destroy_event_channel(_event_channel: Ptr) -> Nothing;
        fn mlx5dv_devx_get_event(
            _event_channel: Ptr,
            _event_data: Ptr,
            _event_resp_len: usize,
        ) -> Count;
        fn mlx5dv_devx_subscribe_devx_event(
            _event_channel: Ptr,
            _obj: Ptr,
            _events_sz: u16,
            _events_num: Ptr,
            _cookie: u64,
        ) -> Status;
    }
    "MLX5_1.12": {
        fn mlx5dv_alloc_var(_context: Ptr, _flags: u32) -> Object;
        fn mlx5dv_dump_dr_domain(_fout: Ptr, _domain: Ptr) -> Status;
        fn mlx5dv_free_var(_dv_var: Ptr) -> Nothing;
    }
    "MLX5_1.13": {
        fn mlx5dv_pp_alloc(
            _context: Ptr,
            _pp_context_sz: usize,
            _pp_context: Ptr,
            _flags: u32,
        ) -> Object;
        fn mlx5dv_pp_free(_pp: Ptr) -> Nothing;
    }
    "MLX5_1.14": {
        fn mlx5dv_dr_action_create_default_miss() -> Object;
        fn mlx5dv_modify_qp_lag_port(_qp: Ptr, _port_num: u8) -> Status;
        fn mlx5dv_query_qp_lag_port(_qp: Ptr, _port_num: Ptr, _active_port_num: Ptr) -> Status;
    }
    "MLX5_1.15": {
        fn mlx5dv_dr_action_create_dest_devx_tir(_devx_obj: Ptr) -> Object;
    }
    "MLX5_1.16": {
        fn mlx5dv_dr_action_create_dest_array(
            _domain: Ptr,
            _num_dest: usize,
            _dests: Ptr,
        ) -> Object;
        fn mlx5dv_dr_action_create_flow_sampler(_attr: Ptr) -> Object;
    }
    "MLX5_1.17": {
        fn mlx5dv_dr_action_create_pop_vlan() -> Object;
        fn mlx5dv_dr_action_create_push_vlan(_domain: Ptr, _vlan_hdr: u32) -> Object;
        fn mlx5dv_modify_qp_sched_elem(_qp: Ptr, _requestor: Ptr, _responder: Ptr) -> Status;
        fn mlx5dv_modify_qp_udp_sport(_qp: Ptr, _udp_sport: u16) -> Status;
        fn mlx5dv_sched_leaf_create(_context: Ptr, _sched_attr: Ptr) -> Object;
        fn mlx5dv_sched_leaf_destroy(_leaf: Ptr) -> Status;
        fn mlx5dv_sched_leaf_modify(_leaf: Ptr, _sched_attr: Ptr) -> Status;
        fn mlx5dv_sched_node_create(_context: Ptr, _sched_attr: Ptr) -> Object;
        fn mlx5dv_sched_node_destroy(_node: Ptr) -> Status;
        fn mlx5dv_sched_node_modify(_node: Ptr, _sched_attr: Ptr) -> Status;
    }
    "MLX5_1.18": {
        fn mlx5dv_reserved_qpn_alloc(_ctx: Ptr, _qpn: Ptr) -> Status;
        fn mlx5dv_reserved_qpn_dealloc(_ctx: Ptr, _qpn: u32) -> Status;
    }
    "MLX5_1.19": {
        fn _mlx5dv_query_port(
            _context: Ptr,
            _port_num: u32,
            _info: Ptr,
            _info_len: usize,
        ) -> Status;
        fn mlx5dv_devx_umem_reg_ex(_ctx: Ptr, _umem_in: Ptr) -> Object;
        fn mlx5dv_dm_map_op_addr(_dm: Ptr, _op: u8) -> Object;
    }
    "MLX5_1.20": {
        fn _mlx5dv_mkey_check(_mkey: Ptr, _err_info: Ptr, _err_info_size: usize) -> Status;
        fn mlx5dv_dr_domain_allow_duplicate_rules(_domain: Ptr, _allow: bool) -> Nothing;
        fn mlx5dv_map_ah_to_qp(_ah: Ptr, _qp_num: u32) -> Status;
        fn mlx5dv_qp_cancel_posted_send_wrs(_mqp: Ptr, _wr_id: u64) -> Status;
    }
    "MLX5_1.21": {
        fn mlx5dv_crypto_login(_context: Ptr, _login_attr: Ptr) -> Status;
        fn mlx5dv_crypto_login_query_state(_context: Ptr, _state: Ptr) -> Status;
        fn mlx5dv_crypto_logout(_context: Ptr) -> Status;
        fn mlx5dv_dci_stream_id_reset(_qp: Ptr, _stream_id: u16) -> Status;
        fn mlx5dv_dek_create(_context: Ptr, _init_attr: Ptr) -> Object;
        fn mlx5dv_dek_destroy(_dek: Ptr) -> Status;
        fn mlx5dv_dek_query(_dek: Ptr, _attr: Ptr) -> Status;
        fn mlx5dv_dr_action_create_dest_ib_port(_domain: Ptr, _ib_port: u32) -> Object;
        fn mlx5dv_dr_matcher_set_layout(_matcher: Ptr, _layout: Ptr) -> Status;
        fn mlx5dv_get_vfio_device_list(_attr: Ptr) -> Object;
        fn mlx5dv_vfio_get_events_fd(_ibctx: Ptr) -> Fd;
        fn mlx5dv_vfio_process_events(_context: Ptr) -> Status;
    }
    "MLX5_1.23": {
        fn mlx5dv_devx_alloc_msi_vector(_ibctx: Ptr) -> Object;
        fn mlx5dv_devx_create_eq(
            _ibctx: Ptr,
            _in: Ptr,
            _inlen: usize,
            _out: Ptr,
            _outlen: usize,
        ) -> Object;
        fn mlx5dv_devx_destroy_eq(_eq: Ptr) -> Status;
        fn mlx5dv_devx_free_msi_vector(_msi: Ptr) -> Status;
    }
    "MLX5_1.24": {
        fn mlx5dv_crypto_login_create(_context: Ptr, _login_attr: Ptr) -> Object;
        fn mlx5dv_crypto_login_destroy(_crypto_login: Ptr) -> Status;
        fn mlx5dv_crypto_login_query(_crypto_login: Ptr, _query_attr: Ptr) -> Status;
    }
    "EFA_1.0": {
        fn efadv_create_driver_qp(_ibvpd: Ptr, _attr: Ptr, _driver_qp_type: u32) -> Object;
    }
    "EFA_1.1": {
        fn efadv_create_qp_ex(_ibvctx: Ptr, _attr_ex: Ptr, _efa_attr: Ptr, _inlen: u32) -> Object;
        fn efadv_query_ah(_ibvah: Ptr, _attr: Ptr, _inlen: u32) -> Status;
        fn efadv_query_device(_ibvctx: Ptr, _attr: Ptr, _inlen: u32) -> Status;
    }
    "EFA_1.2": {
        fn efadv_cq_from_ibv_cq_ex(_ibvcqx: Ptr) -> Object;
        fn efadv_create_cq(_ibvctx: Ptr, _attr_ex: Ptr, _efa_attr: Ptr, _inlen: u32) -> Object;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno() -> Option<i32> {
        std::io::Error::last_os_error().raw_os_error()
    }

    #[test]
    fn nothing_is_claimed() {
        let null = std::ptr::null_mut();
        assert!(!mlx5dv_is_supported(null));
        assert!(mlx5dv_open_device(null, null).is_null());
        assert_eq!(errno(), Some(libc::EOPNOTSUPP));
        assert!(efadv_create_qp_ex(null, null, null, 0).is_null());
        assert_eq!(efadv_query_device(null, null, 0), libc::EOPNOTSUPP);
        assert_eq!(mlx5dv_crypto_login(null, null), libc::EOPNOTSUPP);
    }

    #[test]
    fn every_return_kind_fails_cleanly() {
        let null = std::ptr::null_mut();
        set_errno(0);
        assert!(efadv_create_cq(null, null, null, 0).is_null());
        assert_eq!(errno(), Some(libc::EOPNOTSUPP));
        set_errno(0);
        assert_eq!(efadv_query_ah(null, null, 0), libc::EOPNOTSUPP);
        assert_eq!(errno(), Some(libc::EOPNOTSUPP));
        set_errno(0);
        assert_eq!(mlx5dv_vfio_get_events_fd(null), -1);
        assert_eq!(errno(), Some(libc::EOPNOTSUPP));
        set_errno(0);
        assert_eq!(mlx5dv_devx_get_event(null, null, 0), -1);
        assert_eq!(errno(), Some(libc::EOPNOTSUPP));
        assert!(mlx5dv_dr_action_create_drop().is_null());
        mlx5dv_devx_free_uar(null);
    }
}
