//! Statuses: those of verbs replies (beyond [`crate::msg::status`]) and those of work
//! completions.

use crate::codec::wire_enum;

wire_enum! {
    /// Statuses of verbs replies, beyond [`crate::msg::status`]. The shim turns each into the
    /// errno value rdma-core reports for the same failure.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum VerbsStatus: u16, from u16; fn from_u16(u16) {
        /// An argument the verb does not accept (EINVAL).
        Invalid = 16,
        /// No such PD or MR in this container's table (EINVAL).
        BadHandle = 17,
        /// The PD still has memory regions (EBUSY).
        Busy = 18,
        /// A limit of the virtual device was reached (ENOMEM).
        NoResources = 19,
        /// The memory is not backed by the memory file the shim passed (EFAULT).
        Fault = 20,
        /// Valid, but this device does not do it (EOPNOTSUPP).
        NotSupported = 21,
        /// A registration arrived before the shim's memory file (EIO: a shim bug).
        NoMemoryFile = 22,
        /// The test hook's key, range or access did not resolve (the completion of a work request
        /// would be IBV_WC_LOC_PROT_ERR).
        Protection = 23,
        /// Test hooks are off in this router (EOPNOTSUPP).
        TestHooksOff = 24,
        /// The destination of a connection is no container this router can reach (ENETUNREACH).
        Unreachable = 25,
        /// The caller may not do this (EPERM): a privileged qkey.
        Permission = 30,
    }
}

/// Work completion statuses (`enum ibv_wc_status`) the engine produces.
pub mod wc_status {
    pub const SUCCESS: u32 = 0;
    /// The receive buffers are shorter than the message (`IBV_WC_LOC_LEN_ERR`).
    pub const LOC_LEN_ERR: u32 = 1;
    /// A malformed work request (`IBV_WC_LOC_QP_OP_ERR`).
    pub const LOC_QP_OP_ERR: u32 = 2;
    /// A local key, address range or access right did not match (`IBV_WC_LOC_PROT_ERR`).
    pub const LOC_PROT_ERR: u32 = 4;
    /// Outstanding work requests of a QP in the error state (`IBV_WC_WR_FLUSH_ERR`).
    pub const WR_FLUSH_ERR: u32 = 5;
    /// A response that does not fit its request (another host's router misbehaved)
    /// (`IBV_WC_BAD_RESP_ERR`).
    pub const BAD_RESP_ERR: u32 = 8;
    /// The responder could not take the message: its receive was too short
    /// (`IBV_WC_REM_INV_REQ_ERR`).
    pub const REM_INV_REQ_ERR: u32 = 9;
    /// A remote key, address range or access right did not match (`IBV_WC_REM_ACCESS_ERR`).
    pub const REM_ACCESS_ERR: u32 = 10;
    /// The responder failed the operation locally (its receive's key) (`IBV_WC_REM_OP_ERR`).
    pub const REM_OP_ERR: u32 = 11;
    /// No answer from the destination within the transport retries (`IBV_WC_RETRY_EXC_ERR`).
    pub const RETRY_EXC_ERR: u32 = 12;
    /// The responder had no receive posted for the QP's RNR retries
    /// (`IBV_WC_RNR_RETRY_EXC_ERR`).
    pub const RNR_RETRY_EXC_ERR: u32 = 13;
}
