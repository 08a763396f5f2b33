//! Link arguments that make the cdylib a drop-in `libibverbs.so.1`: its SONAME, and the version
//! nodes (IBVERBS_1.0 ... IBVERBS_1.14, IBVERBS_PRIVATE_34) that binaries built against rdma-core
//! require.
//!
//! rustc hands the linker an anonymous version script of its own (`{ global: <exports>; local:
//! *; };`) before ours. rust-lld, rustc's default linker for x86_64-unknown-linux-gnu since 1.90,
//! merges it with the named nodes of `libibverbs.map`, and `.symver` directives in the code put
//! each verb into its node. GNU ld rejects the combination ("anonymous version tag cannot be
//! combined with other version tags"), so forcing it (`-C linker-features=-lld`) breaks this
//! link.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let map = dir.join("libibverbs.map");
    println!("cargo:rerun-if-changed=libibverbs.map");
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libibverbs.so.1");
}
