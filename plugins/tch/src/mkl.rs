//! MKL's vendor check, answered by the CPU's instructions instead of its maker.
//!
//! libtorch's CPU matrix products (every `Linear`, so most of a transformer's
//! time) are MKL's sgemm, linked into `libtorch_cpu.so`. Before choosing a
//! kernel MKL asks `mkl_serv_intel_cpu_true()`, which answers no on any CPU
//! not made by Intel, and MKL then takes a generic path even where the CPU has
//! AVX2 / AVX-512. On this project's AMD EPYC (AVX-512, 2 cores) that made a
//! `[9 x 512] x [512 x 2048]` product, a CLIP text layer's MLP at batch 1,
//! 297 µs instead of 111 µs, and tch's CLIP ViT-B/32 text tower ran 1.8x
//! slower than with the check answered yes.
//!
//! `libtorch_cpu.so` exports the function and calls it through its PLT, so a
//! definition earlier in the symbol lookup order wins: the `ragar` executable
//! (its build script exports this symbol) or, for the dynamically loaded tch
//! plugin, the plugin library, which comes before its own libtorch in its
//! lookup scope. MKL still picks the kernel by what CPUID reports (AVX2,
//! AVX-512), so the answer changes which of the CPU's own instructions are
//! used, not which exist; the tch parity tests run with it.
//!
//! `RAGAR_MKL_VENDOR_CHECK=1` keeps MKL's own answer (the next definition,
//! libtorch's), for comparing or for a CPU where the fast path misbehaves.

use std::ffi::c_int;
use std::sync::OnceLock;

/// The environment variable that keeps MKL's own vendor check.
pub const KEEP_ENV: &str = "RAGAR_MKL_VENDOR_CHECK";

/// MKL's "is this an Intel CPU" question: yes, unless [`KEEP_ENV`] is set to
/// `1`, when MKL's own answer is returned.
#[no_mangle]
pub extern "C" fn mkl_serv_intel_cpu_true() -> c_int {
    static ANSWER: OnceLock<c_int> = OnceLock::new();
    *ANSWER.get_or_init(|| if keeps_vendor_check() { mkl_own_answer() } else { 1 })
}

/// Whether [`KEEP_ENV`] asks for MKL's own vendor check.
pub fn keeps_vendor_check() -> bool {
    std::env::var(KEEP_ENV).is_ok_and(|v| v.trim() == "1")
}

/// The definition after this one in the lookup order (libtorch's MKL), or
/// 0 (no) where there is none.
fn mkl_own_answer() -> c_int {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks a
    // symbol up; a non-null result is MKL's `int mkl_serv_intel_cpu_true(void)`.
    unsafe {
        let f = libc::dlsym(libc::RTLD_NEXT, c"mkl_serv_intel_cpu_true".as_ptr());
        if f.is_null() {
            return 0;
        }
        let f: extern "C" fn() -> c_int = std::mem::transmute(f);
        f()
    }
}
