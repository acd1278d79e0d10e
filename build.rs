//! Build script of `aclnn`. The crate needs no CANN, clang or NPU to build: bindings are
//! committed in `aclnn-sys` and libraries are loaded at run time. This script only declares the
//! `docsrs` cfg that docs.rs sets, so that `#[cfg(docsrs)]` does not warn elsewhere.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(docsrs)");
    println!("cargo::rerun-if-changed=build.rs");
}
