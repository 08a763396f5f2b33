//! Stand-ins for rdma-core's hardware providers `libmlx5.so.1` (Mellanox/NVIDIA ConnectX) and
//! `libefa.so.1` (AWS EFA), installed by `freeflow up` next to Freeflow's `libibverbs.so.1` in
//! `$FREEFLOW_DIR/verbs`.
//!
//! Why: perftest's `ib_*` tools link both providers for their direct-verbs extras (DC and
//! crypto on mlx5, SRD on EFA). The real providers import the private libibverbs interface
//! (IBVERBS_PRIVATE_34: `ibv_cmd_*`, `verbs_register_driver_34`, ...) with immediate binding,
//! so with Freeflow's library they stop the program before `main`. These stand-ins carry the
//! providers' version nodes and the entry points those tools import, claim no device and
//! register no driver: every call reports that the device is not theirs, exactly what the real
//! providers answer for a device of another vendor (EOPNOTSUPP, or NULL with errno set).
//! perftest only calls them for the connection types that need the hardware (`-c DC`,
//! `-c SRD`, `--aes_xts`), which Freeflow's virtual device does not offer.
//!
//! Unsafe code: none but the `#[no_mangle]` exports, which the compiler counts as unsafe code;
//! they are confined (by `#![deny(unsafe_code)]` here) to `exports`, the only module that
//! allows it. `errno` is set through `freeflow-os`.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod exports;
