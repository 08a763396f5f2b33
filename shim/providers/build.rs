//! The version nodes of rdma-core 44's `libmlx5.so.1` and `libefa.so.1` (providers.map), which
//! binaries linked against them require; `.symver` directives in the code bind each function to
//! its node (the technique of shim/verbs/build.rs, where the linker requirement is explained).
//! No SONAME: `freeflow up` installs this one file as both `libmlx5.so.1` and `libefa.so.1`, and
//! the loader then knows each copy by its file name.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let map = dir.join("providers.map");
    println!("cargo:rerun-if-changed=providers.map");
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
}
