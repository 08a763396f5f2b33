//! Small helpers for the C boundary: errno, panics, and copying results into the caller's
//! structures.
#![allow(unsafe_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};

pub use freeflow_os::errno::set_errno;

/// Runs `f`, turning a panic (a bug in this library) into `on_panic` with errno EIO instead of
/// aborting the program: a verb fails, the program decides.
pub fn guard<R>(on_panic: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            set_errno(libc::EIO);
            on_panic
        }
    }
}

/// Copies `value` into the caller's `dst`, writing exactly `len` bytes: the first
/// `min(len, size_of::<T>())` from `value`, zeros after that (fields newer than this library
/// know nothing to report).
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes (its alignment does not matter).
pub unsafe fn copy_out<T: Copy>(dst: *mut T, value: &T, len: usize) {
    let size = std::mem::size_of::<T>();
    let from = len.min(size);
    // SAFETY: `value` is a live T of `size` bytes and `from <= size`; the caller guarantees `dst`
    // is writable for `len >= from` bytes; the two cannot overlap (`value` is ours).
    unsafe {
        std::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), dst.cast::<u8>(), from)
    };
    if len > from {
        // SAFETY: bytes from..len of `dst` are writable, as above.
        unsafe { std::ptr::write_bytes(dst.cast::<u8>().add(from), 0, len - from) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_out_truncates_and_zero_fills() {
        let value: [u8; 4] = [1, 2, 3, 4];
        let mut buf = [0xaau8; 8];
        // SAFETY: buf has 8 writable bytes.
        unsafe { copy_out(buf.as_mut_ptr().cast::<[u8; 4]>(), &value, 2) };
        assert_eq!(buf, [1, 2, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa]);
        // SAFETY: as above.
        unsafe { copy_out(buf.as_mut_ptr().cast::<[u8; 4]>(), &value, 6) };
        assert_eq!(buf, [1, 2, 3, 4, 0, 0, 0xaa, 0xaa]);
    }

    #[test]
    fn guard_turns_panics_into_failures() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = guard(-1, || -> i32 { panic!("bug") });
        std::panic::set_hook(prev);
        assert_eq!(r, -1);
        // SAFETY: reads this thread's errno.
        assert_eq!(unsafe { *libc::__errno_location() }, libc::EIO);
    }
}
