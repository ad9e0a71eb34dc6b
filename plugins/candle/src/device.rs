//! From the config's device and dtype strings to candle's.

use candle_core::{DType, Device};
use ragar_core::{ComponentSpec, Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
///
/// On the CPU the other workers are also kept awake for the call
/// ([`keep_warm`]): an idle rayon worker sleeps after ~32 yields (tens of
/// microseconds), and waking it again for the next op (a futex wake, then
/// the scheduler) cost a fifth of MiniLM's time on one sentence. ONNX
/// Runtime's pool spins between ops the same way. `CANDLE_SPIN=0` turns it
/// off (a machine shared with other work).
pub fn on_pool<T: Send>(device: &Device, f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let spinners = match device.is_cpu() && spin_allowed() {
        true => rayon::current_num_threads().saturating_sub(1),
        false => 0,
    };
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        // Queued on this worker's own deque, which idle workers steal from
        // (oldest first), so the call itself is never run by a spinner: a
        // spinner only ever runs the call's stolen pieces.
        let (owner, done) = (rayon::current_thread_index(), &done);
        for _ in 0..spinners {
            s.spawn(move |_| keep_warm(done, owner));
        }
        // Set when `f` returns or panics: the scope waits for its spinners.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _done = Done(done);
        f()
    })
}

/// Runs whatever work the pool has (stolen halves of the call's parallel
/// ops) until `done`, never sleeping in between. A spinner that the call's
/// own worker picks up (while waiting on a stolen half) returns at once:
/// spinning there would stop the call under it. Elsewhere it also gives up
/// after [`SPIN_IDLE`] without work: a worker can pick a spinner up while it
/// waits inside a piece of someone's parallel op (more than two threads, or
/// calls from several threads at once), and that piece must not stay
/// stopped under the spinner until the whole call ends.
fn keep_warm(done: &AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            _ if idle_since.elapsed() > SPIN_IDLE => return,
            _ => std::hint::spin_loop(),
        }
    }
}

/// How long a spinner waits for work before it lets its worker sleep: well
/// above the gaps between one op's parallel work and the next (tens of
/// microseconds of single-threaded ops), and short as a stall.
const SPIN_IDLE: Duration = Duration::from_millis(1);

fn spin_allowed() -> bool {
    static SPIN: OnceLock<bool> = OnceLock::new();
    *SPIN.get_or_init(|| std::env::var("CANDLE_SPIN").map_or(true, |v| v.trim() != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn stage_calls_finish_from_many_threads_nested_and_panicking() {
        let dev = Device::Cpu;
        // Calls with parallel work inside (nested joins: a sum over a
        // parallel iterator), from several threads at once.
        let sums: Vec<u64> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..4u64)
                .map(|i| {
                    let dev = &dev;
                    s.spawn(move || on_pool(dev, || (0..200_000u64).into_par_iter().map(|x| x * i).sum::<u64>()))
                })
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let one: u64 = (0..200_000u64).sum();
        assert_eq!(sums, (0..4).map(|i| i * one).collect::<Vec<_>>());
        // A call from inside a call runs in place.
        assert!(on_pool(&dev, || on_pool(&dev, || rayon::current_thread_index().is_some())));
        // A panic comes back to the caller, the spinners stop, and the pool
        // works afterwards.
        let r = std::panic::catch_unwind(|| on_pool(&dev, || -> u32 { panic!("a stage failed") }));
        assert!(r.is_err());
        assert_eq!(on_pool(&dev, || (0..1000u64).into_par_iter().sum::<u64>()), 499_500);
    }
}
