//! From the config's device and dtype strings to candle's.

use candle_core::{DType, Device};
use ragar_core::{ComponentSpec, Error, Result};

/// The candle device a spec asks for. `cuda` without a CUDA build or driver
/// is an error; only `auto` falls back to the CPU.
pub fn device(spec: &ComponentSpec) -> Result<Device> {
    match spec.device()? {
        ragar_core::Device::Cpu => Ok(Device::Cpu),
        ragar_core::Device::Cuda(n) => cuda(n),
        ragar_core::Device::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
    }
}

fn cuda(n: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::device(
            "CUDA was asked for but this ragar-candle was built without the `cuda` feature \
             (build ragar with `--features cuda`), or say `device: auto` to allow the CPU",
        ));
    }
    Device::new_cuda(n).map_err(|e| Error::device(format!("cuda:{n}: {e}")))
}

/// The candle dtype for a spec's dtype on `device`. candle's CPU matmul has
/// no bf16 kernel, so bf16 on the CPU is refused here rather than failing
/// mid-run.
pub fn dtype(spec: &ComponentSpec, device: &Device) -> Result<DType> {
    Ok(match spec.dtype {
        ragar_core::DType::F32 => DType::F32,
        ragar_core::DType::F16 => DType::F16,
        ragar_core::DType::BF16 if device.is_cpu() => {
            return Err(Error::unsupported(format!(
                "{}.dtype: bf16 runs on CUDA with candle; on the CPU use f32 or f16",
                spec.key
            )))
        }
        ragar_core::DType::BF16 => DType::BF16,
    })
}

/// A candle error as a model error with context (usable many times).
pub fn model_err(context: impl std::fmt::Display) -> impl Fn(candle_core::Error) -> Error + Clone {
    let context = context.to_string();
    move |mut e| {
        // The message only: a backtrace (RUST_BACKTRACE) is for developers.
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::model(format!("{context}: {e}"))
    }
}

/// Fixes candle's CPU thread count for the process: call it at the start of
/// `main`, before any other thread exists (it sets an environment
/// variable). candle 0.11's matmul asks for its thread count on every call,
/// and unless `RAYON_NUM_THREADS` is set that means counting physical cores
/// by reading `/proc/cpuinfo` (tens of microseconds, more than a small
/// model's matmul: CLIP's tiny text tower at batch 1 ran 3x slower for it).
/// Sets `RAYON_NUM_THREADS` to the count candle computes, so candle's ops
/// use the threads they did; rayon's global pool, not yet built, gets the
/// same count (physical cores rather than logical ones on an SMT machine,
/// which is what these f32 kernels want). A value the user set is kept.
pub fn settle_thread_count() {
    let set = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    if !set {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Runs a stage call on a worker of rayon's global pool. Called from any
/// other thread, every parallel op inside (candle's, [`crate::linear`]'s)
/// would hand its work to the pool and put the caller to sleep until done:
/// a thread switch each way per op, which for a small model at batch 1 costs
/// as much as the arithmetic (MiniLM, one sentence: 6.5 -> 4.3 ms). On a
/// worker, the op runs on the calling thread and idle workers steal from it.
pub fn on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}
