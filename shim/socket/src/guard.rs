//! The panic guard of the exported functions. A panic must not unwind into the application's C
//! frames (leaving an `extern "C"` function, it aborts the program): the call takes the C
//! library's path instead, or fails with an errno where that path is not open any more.

use crate::session::debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set at the first panic caught, so that it is logged once.
static CAUGHT: AtomicBool = AtomicBool::new(false);

/// Runs `body`; if it panics, runs `fallback` instead. Costs nothing while nothing panics (the
/// unwinding tables are all of it). The shim's locks are released by the unwinding.
pub fn or_else<R>(call: &str, body: impl FnOnce() -> R, fallback: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(|| {
        test_point();
        body()
    })) {
        Ok(done) => done,
        Err(_) => {
            if !CAUGHT.swap(true, Ordering::Relaxed) {
                debug(format_args!(
                    "a panic in {call}(): the call took the C library's path (logged once)"
                ));
            }
            fallback()
        }
    }
}

/// Replaces the default panic hook of this library's own standard library (a preloaded
/// library has its own): the default would print into the application's stderr. Under
/// FREEFLOW_DEBUG the first panic is described.
#[cfg(not(test))]
pub fn quiet_panics() {
    static DESCRIBED: AtomicBool = AtomicBool::new(false);
    std::panic::set_hook(Box::new(|info| {
        if crate::session::config().debug && !DESCRIBED.swap(true, Ordering::Relaxed) {
            eprintln!("libfsocket[{}]: {info}", crate::real::getpid());
        }
    }));
}

#[cfg(test)]
thread_local! {
    /// Tests set it to make the next guarded body on this thread panic.
    static PANIC_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Where tests provoke a panic (nothing in the library).
#[inline(always)]
fn test_point() {
    #[cfg(test)]
    if PANIC_HERE.with(|p| p.replace(false)) {
        panic!("provoked by a test");
    }
}

#[cfg(test)]
mod tests {
    use super::{or_else, PANIC_HERE};

    #[test]
    fn a_panicking_body_yields_the_fallback() {
        assert_eq!(or_else("test", || -> i32 { panic!("inside") }, || 7), 7);
        assert_eq!(or_else("test", || 1, || 7), 1);
    }

    /// The exported connect, made to panic inside: the application gets the C library's
    /// connect (here EBADF for a bad fd), not an abort.
    #[test]
    #[allow(unsafe_code)]
    fn a_panic_inside_connect_takes_the_c_librarys_path() {
        // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = 80u16.to_be();
        addr.sin_addr.s_addr = u32::from_be_bytes([10, 32, 0, 9]).to_be();
        PANIC_HERE.with(|p| p.set(true));
        // SAFETY: a valid sockaddr_in of the length given.
        let rc = unsafe {
            crate::abi::connect(
                -1,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let errno = std::io::Error::last_os_error().raw_os_error();
        PANIC_HERE.with(|p| p.set(false));
        assert_eq!((rc, errno), (-1, Some(libc::EBADF)));
    }
}
