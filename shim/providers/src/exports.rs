//! The providers' exported entry points, each bound to its provider's version node. They are
//! `#[no_mangle]` (the reason this module allows `unsafe_code`) but contain no unsafe block.

use freeflow_os::errno::set_errno;
use std::ffi::{c_int, c_void};

// Binds the exported functions to their version nodes (providers.map), as shim/verbs does.
freeflow_os::symbol_versions! {
    "MLX5_1.0": [mlx5dv_query_device],
    "MLX5_1.3": [mlx5dv_create_qp],
    "MLX5_1.7": [mlx5dv_open_device, mlx5dv_devx_general_cmd],
    "MLX5_1.8": [mlx5dv_is_supported],
    "MLX5_1.10": [mlx5dv_qp_ex_from_ibv_qp_ex, mlx5dv_create_mkey, mlx5dv_destroy_mkey],
    "MLX5_1.21": [mlx5dv_crypto_login, mlx5dv_dek_create, mlx5dv_dek_destroy],
    "EFA_1.1": [efadv_query_device, efadv_create_qp_ex],
}

/// What every stand-in reports: the device is not one of this provider's.
const NOT_OURS: c_int = libc::EOPNOTSUPP;

/// NULL with `errno` = [`NOT_OURS`], for the calls that return an object.
fn none<T>() -> *mut T {
    set_errno(NOT_OURS);
    std::ptr::null_mut()
}

/// `mlx5dv_is_supported(device)`: false, no device is an mlx5 device here.
#[no_mangle]
pub extern "C" fn mlx5dv_is_supported(_device: *mut c_void) -> bool {
    false
}

/// `mlx5dv_query_device(context, attrs)`.
#[no_mangle]
pub extern "C" fn mlx5dv_query_device(_context: *mut c_void, _attrs: *mut c_void) -> c_int {
    NOT_OURS
}

/// `mlx5dv_open_device(device, attr)`.
#[no_mangle]
pub extern "C" fn mlx5dv_open_device(_device: *mut c_void, _attr: *mut c_void) -> *mut c_void {
    none()
}

/// `mlx5dv_create_qp(context, qp_attr, mlx5_qp_attr)`.
#[no_mangle]
pub extern "C" fn mlx5dv_create_qp(
    _context: *mut c_void,
    _qp_attr: *mut c_void,
    _mlx5_qp_attr: *mut c_void,
) -> *mut c_void {
    none()
}

/// `mlx5dv_qp_ex_from_ibv_qp_ex(qp)`: only meaningful for a QP from `mlx5dv_create_qp`, of which
/// there are none.
#[no_mangle]
pub extern "C" fn mlx5dv_qp_ex_from_ibv_qp_ex(_qp: *mut c_void) -> *mut c_void {
    none()
}

/// `mlx5dv_devx_general_cmd(context, in, inlen, out, outlen)`.
#[no_mangle]
pub extern "C" fn mlx5dv_devx_general_cmd(
    _context: *mut c_void,
    _input: *const c_void,
    _input_len: usize,
    _output: *mut c_void,
    _output_len: usize,
) -> c_int {
    NOT_OURS
}

/// `mlx5dv_create_mkey(attr)`.
#[no_mangle]
pub extern "C" fn mlx5dv_create_mkey(_attr: *mut c_void) -> *mut c_void {
    none()
}

/// `mlx5dv_destroy_mkey(mkey)`: there are no mkeys to destroy.
#[no_mangle]
pub extern "C" fn mlx5dv_destroy_mkey(_mkey: *mut c_void) -> c_int {
    NOT_OURS
}

/// `mlx5dv_crypto_login(context, attr)`.
#[no_mangle]
pub extern "C" fn mlx5dv_crypto_login(_context: *mut c_void, _attr: *mut c_void) -> c_int {
    NOT_OURS
}

/// `mlx5dv_dek_create(context, attr)`.
#[no_mangle]
pub extern "C" fn mlx5dv_dek_create(_context: *mut c_void, _attr: *mut c_void) -> *mut c_void {
    none()
}

/// `mlx5dv_dek_destroy(dek)`: there are no DEKs to destroy.
#[no_mangle]
pub extern "C" fn mlx5dv_dek_destroy(_dek: *mut c_void) -> c_int {
    NOT_OURS
}

/// `efadv_query_device(context, attr, inlen)`.
#[no_mangle]
pub extern "C" fn efadv_query_device(
    _context: *mut c_void,
    _attr: *mut c_void,
    _attr_len: u32,
) -> c_int {
    NOT_OURS
}

/// `efadv_create_qp_ex(context, qp_attr, efa_attr, inlen)`.
#[no_mangle]
pub extern "C" fn efadv_create_qp_ex(
    _context: *mut c_void,
    _qp_attr: *mut c_void,
    _efa_attr: *mut c_void,
    _efa_attr_len: u32,
) -> *mut c_void {
    none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_claimed() {
        assert!(!mlx5dv_is_supported(std::ptr::null_mut()));
        let null = std::ptr::null_mut();
        assert!(mlx5dv_open_device(null, null).is_null());
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EOPNOTSUPP)
        );
        assert!(efadv_create_qp_ex(null, null, null, 0).is_null());
        assert_eq!(efadv_query_device(null, null, 0), libc::EOPNOTSUPP);
        assert_eq!(mlx5dv_crypto_login(null, null), libc::EOPNOTSUPP);
    }
}
