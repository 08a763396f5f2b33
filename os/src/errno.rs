//! The calling thread's `errno`: how the shims' exported C functions report a failure to their
//! caller (the one place errno is set; inside, errors are typed).
#![allow(unsafe_code)]

use std::ffi::c_int;

/// The calling thread's `errno`.
pub fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot, valid for the thread's
    // lifetime.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's `errno`.
pub fn set_errno(value: c_int) {
    // SAFETY: as in `errno`; the slot is the calling thread's own, so nothing else writes it.
    unsafe { *libc::__errno_location() = value };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_errno_is_what_the_c_library_reports() {
        set_errno(libc::EOPNOTSUPP);
        assert_eq!(errno(), libc::EOPNOTSUPP);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EOPNOTSUPP)
        );
    }
}
