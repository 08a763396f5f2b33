//! Link arguments that make the cdylib a drop-in `librdmacm.so.1`: its SONAME and the version
//! nodes RDMACM_1.0 ... RDMACM_1.3 of rdma-core 44's library (librdmacm.map), with `.symver`
//! directives in the code binding each function to its node (the technique and the linker
//! requirement of shim/verbs/build.rs).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let map = dir.join("librdmacm.map");
    println!("cargo:rerun-if-changed=librdmacm.map");
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librdmacm.so.1");
}
