//! The numbers of the verbs engine, each a type of its own so that the compiler tells them
//! apart: an attachment's id, a protection domain's handle, a tenant's number, and the indices
//! of CQs, QPs and SRQs in the engine's tables.
//!
//! The numbers a container sees (handles, keys, QP numbers) are chosen by the router and keep
//! their wire type (`u32`); the newtypes only say which table a number belongs to.

/// The router's id of an attachment (one open device context of a container), as the shard
/// numbers its attachments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttachmentId(pub u32);

/// A protection domain's handle in its attachment's [`VerbsTable`](super::VerbsTable): the
/// number the container holds for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PdId(pub u32);

/// A tenant as a number of the engine (compared on every work request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TenantId(pub(crate) u32);

/// A key of one of the engine's object tables (see `engine::objects`).
pub(crate) trait ObjectKey: Copy {
    /// What the table holds, for messages.
    const WHAT: &'static str;
    fn from_index(index: usize) -> Self;
    fn index(self) -> usize;
}

macro_rules! object_key {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) struct $name(usize);

        impl ObjectKey for $name {
            const WHAT: &'static str = $what;
            fn from_index(index: usize) -> Self {
                $name(index)
            }
            fn index(self) -> usize {
                self.0
            }
        }
    };
}

object_key! {
    /// A completion queue's index in the engine (never seen by a container: it holds the CQ's
    /// handle).
    CqId, "completion queue"
}
object_key! {
    /// A queue pair's index in the engine (a container holds the QP's handle and number).
    QpId, "queue pair"
}
object_key! {
    /// A shared receive queue's index in the engine (a container holds the SRQ's handle).
    SrqId, "shared receive queue"
}
