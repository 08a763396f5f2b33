//! Why a verb failed. Typed inside the library; [`VerbsError::errno`] turns it into the errno
//! value the C API reports (as a return value or in `errno`, per verb), and [`returns_errno`],
//! [`returns_minus_one`] and [`returns_object`] are those conventions of the C API.

use crate::ffi::guard;
use crate::pages::PagesError;
use freeflow_proto::attach::{AttachError, Refusal};
use freeflow_proto::verbs::{AccessFlagsError, VerbsStatus};
use std::ffi::c_int;
use std::ptr::null_mut;

#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("this container is not registered with Freeflow: {0}")]
    NotRegistered(String),
    #[error("router refused the attach ({reason:?}): {message}")]
    Refused { reason: Refusal, message: String },
    #[error("no Freeflow router: {0}")]
    NoRouter(String),
    #[error("attach failed: {0}")]
    Attach(String),
    #[error("the device is no longer this process's (the container's registration changed)")]
    DeviceGone,
    #[error("not a device of this library")]
    UnknownDevice,
    #[error("not an open context of this library")]
    UnknownContext,
    #[error("no port {0} (the device has port 1 only)")]
    NoSuchPort(u32),
    #[error("no {table} entry {index} (the table has one entry)")]
    NoSuchIndex { table: &'static str, index: i64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    #[error("not a {0} of this library (or already freed)")]
    UnknownObject(&'static str),
    #[error("{0}")]
    Access(#[from] AccessFlagsError),
    #[error(transparent)]
    Pages(#[from] PagesError),
    #[error("the router refused: {}", refusal_text(*.0))]
    RouterRefused(VerbsStatus),
    #[error("the router went away (restarted or stopped); open the device again")]
    RouterGone,
    #[error("the router went away: the device is in a fatal state (open it again)")]
    DeviceFatal,
    #[error("protocol error with the router: {0}")]
    Protocol(String),
    #[error("this context belongs to the parent process; open the device in the child")]
    ForkedContext,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("busy: {0}")]
    Busy(&'static str),
    #[error("not supported by this device: {0}")]
    NotSupported(&'static str),
}

/// What a router's refusal means, for `FREEFLOW_DEBUG` lines.
fn refusal_text(status: VerbsStatus) -> &'static str {
    match status {
        VerbsStatus::Invalid => "invalid argument",
        VerbsStatus::BadHandle => "no such object",
        VerbsStatus::Busy => "still in use",
        VerbsStatus::NoResources => "a limit of the device was reached",
        VerbsStatus::Fault => "the memory is not registered",
        VerbsStatus::NotSupported => "not supported by this device",
        VerbsStatus::NoMemoryFile => "no memory file (a shim bug)",
        VerbsStatus::Protection => "protection error",
        VerbsStatus::TestHooksOff => "test hooks are off",
        VerbsStatus::Permission => "not permitted (a privileged qkey needs CAP_NET_RAW)",
        VerbsStatus::Unreachable => {
            "the destination is not reachable: no container of this tenant with RDMA on this \
             host, nor a registered one on another host"
        }
    }
}

impl VerbsError {
    /// The errno value that stands for this error at the C boundary.
    pub fn errno(&self) -> i32 {
        match self {
            VerbsError::NotRegistered(_) => libc::EPERM,
            VerbsError::Refused { .. } => libc::ECONNREFUSED,
            VerbsError::NoRouter(_) | VerbsError::DeviceGone => libc::ENODEV,
            VerbsError::Attach(_) => libc::EIO,
            VerbsError::UnknownDevice
            | VerbsError::UnknownContext
            | VerbsError::NoSuchPort(_)
            | VerbsError::NoSuchIndex { .. }
            | VerbsError::InvalidArgument(_)
            | VerbsError::UnknownObject(_)
            | VerbsError::ForkedContext => libc::EINVAL,
            VerbsError::Access(AccessFlagsError::NotSupported(_)) => libc::EOPNOTSUPP,
            VerbsError::Access(_) => libc::EINVAL,
            VerbsError::Pages(e) => e.errno(),
            VerbsError::RouterRefused(status) => match status {
                VerbsStatus::Invalid | VerbsStatus::BadHandle => libc::EINVAL,
                VerbsStatus::Busy => libc::EBUSY,
                VerbsStatus::NoResources => libc::ENOMEM,
                VerbsStatus::Fault => libc::EFAULT,
                VerbsStatus::NotSupported | VerbsStatus::TestHooksOff => libc::EOPNOTSUPP,
                VerbsStatus::Protection => libc::EACCES,
                VerbsStatus::NoMemoryFile => libc::EIO,
                VerbsStatus::Unreachable => libc::ENETUNREACH,
                VerbsStatus::Permission => libc::EPERM,
            },
            VerbsError::RouterGone => libc::ENODEV,
            VerbsError::Protocol(_) | VerbsError::DeviceFatal => libc::EIO,
            VerbsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            VerbsError::Busy(_) => libc::EBUSY,
            VerbsError::NotSupported(_) => libc::EOPNOTSUPP,
        }
    }
}

impl From<AttachError> for VerbsError {
    fn from(e: AttachError) -> VerbsError {
        match e {
            AttachError::Refused {
                reason: Refusal::NotRegistered,
                message,
            } => VerbsError::NotRegistered(message),
            AttachError::Refused { reason, message } => VerbsError::Refused { reason, message },
            e @ AttachError::Unreachable { .. } => VerbsError::NoRouter(e.to_string()),
            e => VerbsError::Attach(e.to_string()),
        }
    }
}

/// Reports `e` at the C boundary: errno (also returned, for the verbs that return it), and a
/// line under `FREEFLOW_DEBUG`.
pub(crate) fn fail(verb: &str, e: &VerbsError) -> c_int {
    crate::registry::debug(format_args!("{verb}: {e}"));
    let errno = e.errno();
    crate::ffi::set_errno(errno);
    errno
}

// The three ways a verb reports its outcome to C. Each runs the verb's `body` under [`guard`]
// (a panic, a bug of this library, fails the verb with EIO) and reports an error with [`fail`].

/// A verb that returns 0, or an errno value.
pub(crate) fn returns_errno(verb: &str, body: impl FnOnce() -> Result<(), VerbsError>) -> c_int {
    guard(libc::EIO, || body().map_or_else(|e| fail(verb, &e), |()| 0))
}

/// A verb that returns 0, or -1 with errno.
pub(crate) fn returns_minus_one(
    verb: &str,
    body: impl FnOnce() -> Result<(), VerbsError>,
) -> c_int {
    guard(-1, || {
        body().map_or_else(
            |e| {
                fail(verb, &e);
                -1
            },
            |()| 0,
        )
    })
}

/// A verb that returns a new object, or NULL with errno.
pub(crate) fn returns_object<T>(
    verb: &str,
    body: impl FnOnce() -> Result<*mut T, VerbsError>,
) -> *mut T {
    guard(null_mut(), || {
        body().unwrap_or_else(|e| {
            fail(verb, &e);
            null_mut()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_values() {
        assert_eq!(VerbsError::NoSuchPort(2).errno(), libc::EINVAL);
        assert_eq!(
            VerbsError::NotRegistered(String::new()).errno(),
            libc::EPERM
        );
        let unreachable = AttachError::Unreachable {
            path: "/x/router.sock".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(VerbsError::from(unreachable).errno(), libc::ENODEV);
        assert_eq!(
            VerbsError::Io(std::io::Error::from_raw_os_error(libc::EMFILE)).errno(),
            libc::EMFILE
        );
        assert_eq!(
            VerbsError::RouterRefused(VerbsStatus::Busy).errno(),
            libc::EBUSY
        );
        assert_eq!(
            VerbsError::RouterRefused(VerbsStatus::BadHandle).errno(),
            libc::EINVAL
        );
        assert_eq!(
            VerbsError::Access(AccessFlagsError::RemoteWriteNeedsLocalWrite).errno(),
            libc::EINVAL
        );
        assert_eq!(
            VerbsError::Access(AccessFlagsError::NotSupported(64)).errno(),
            libc::EOPNOTSUPP
        );
        assert_eq!(
            VerbsError::Pages(PagesError::Unmapped(0)).errno(),
            libc::EFAULT
        );
    }
}
