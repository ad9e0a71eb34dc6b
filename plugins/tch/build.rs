// ragar-tch: the link settings shared with the host and the plugin cdylib
// (build_rpath.rs), and the C++ shims for libtorch's inference mode and for
// freezing a module, built against the headers of the libtorch torch-sys
// links (its `libtorch_lib`).
#[path = "build_rpath.rs"]
mod rpath;

fn main() {
    rpath::main();
    println!("cargo:rerun-if-changed=shim/inference_mode.cpp");
    println!("cargo:rerun-if-changed=shim/freeze.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports the libtorch it links");
    let include = std::path::Path::new(&lib).join("../include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("shim/inference_mode.cpp")
        .file("shim/freeze.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .warnings(false)
        .compile("ragar_tch_shim");
}
