// Shared build script (ragar-tch, ragar-tch-plugin, ragar-host with `tch`):
// find libtorch at run time without LD_LIBRARY_PATH, by an rpath to
// $LIBTORCH/lib (LIBTORCH is set by .cargo/config.toml to the cache's link),
// and with the `cuda` feature link libtorch's CUDA library for real.
pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let host = std::env::var("CARGO_PKG_NAME").is_ok_and(|n| n == "ragar-host");
    if host && std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    // The `ragar` executable answers MKL's vendor check (ragar-tch's mkl.rs):
    // pull the definition in and put it in the dynamic symbol table, where
    // libtorch_cpu.so's call finds it before MKL's own.
    if host {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--undefined=mkl_serv_intel_cpu_true,\
             --export-dynamic-symbol=mkl_serv_intel_cpu_true"
        );
    }
    // With `cuda`, keep libtorch_cuda.so: nothing references its symbols
    // directly, so `--as-needed` would drop it and libtorch would then see
    // no CUDA device (notes/native-backends.md).
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
