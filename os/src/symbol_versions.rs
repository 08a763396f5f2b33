//! The `symbol_versions!` macro of the shims' C libraries (libibverbs.so.1 and the provider
//! stand-ins).

/// Binds exported functions to their version nodes (the library's version script, e.g.
/// `libibverbs.map`): `name@@NODE` makes NODE the version that binaries linking against `name`
/// record, as with rdma-core's libraries.
///
/// ```ignore
/// freeflow_os::symbol_versions! {
///     "IBVERBS_1.1": [ibv_get_device_list, ibv_free_device_list],
/// }
/// ```
///
/// Unit-test builds of the calling crate link no version script, so they leave the directives
/// out (the `cfg(test)` is the caller's: attributes of expanded items are evaluated in the crate
/// that expands the macro).
#[macro_export]
macro_rules! symbol_versions {
    ($($node:literal: [$($name:ident),* $(,)?]),* $(,)?) => {
        $($(
            #[cfg(not(test))]
            ::core::arch::global_asm!(concat!(
                ".symver ", stringify!($name), ", ", stringify!($name), "@@", $node
            ));
        )*)*
    };
}
