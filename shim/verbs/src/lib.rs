//! The drop-in `libibverbs.so.1` of Freeflow's fully-isolated RDMA mode (installed by
//! `freeflow up` as `$FREEFLOW_DIR/verbs/libibverbs.so.1`).
//!
//! Status: this build exports no verbs yet; the verbs forwarding over the shared-memory rings
//! is the RDMA-mode work item. Do not point `LD_LIBRARY_PATH` at it before then: programs that
//! need libibverbs will fail to resolve its symbols.

/// Version of the shim.
#[no_mangle]
#[used]
pub static FREEFLOW_VERBS_VERSION: [u8; 6] = *b"0.1.0\0";
