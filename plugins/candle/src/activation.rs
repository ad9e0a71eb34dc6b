//! GELU, SiLU, QuickGELU and softmax on the CPU in vectorised f32.
//!
//! candle's CPU versions call libm's scalar `erff` / `expf` per element; in
//! MiniLM at batch 8 GELU's erf alone was 13 % of the time. Here `exp` is
//! a range reduction to `r` in `[-ln 2 / 2, ln 2 / 2]` (rounding by the
//! 1.5 * 2^23 trick, so no call) and the degree-7 Taylor polynomial of
//! `e^r` (truncation error < 6e-9 relative), scaled by `2^n` through the
//! exponent bits; `erf` is a rational `x P(x^2) / Q(x^2)` fitted here by
//! iterated weighted least squares on `[0, 4]` (1.9e-7 in f64, <= 5e-7
//! evaluated in f32; beyond 4, erf is 1 in f32). Both are plain loops that
//! LLVM vectorises, compiled for AVX-512, AVX2 and the baseline and picked
//! at run time. Tolerances against f64 are in the tests; the models' parity
//! tests against transformers / diffusers run through these.
//!
//! Other devices and dtypes, and graphs that track gradients, use candle's
//! ops.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `x Φ(x)` with the exact (erf) Φ, as `torch.nn.functional.gelu`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    match fast(x) {
        true => x.contiguous()?.apply_op1_no_bwd(&Map(Kind::GeluErf)),
        false => x.gelu_erf(),
    }
}

/// `x σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    match fast(x) {
        true => x.contiguous()?.apply_op1_no_bwd(&Map(Kind::Silu)),
        false => x.silu(),
    }
}

/// CLIP's `x σ(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    match fast(x) {
        true => x.contiguous()?.apply_op1_no_bwd(&Map(Kind::QuickGelu)),
        false => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    match fast(x) && x.rank() >= 1 {
        true => x.contiguous()?.apply_op1_no_bwd(&Map(Kind::Softmax)),
        false => candle_nn::ops::softmax_last_dim(x),
    }
}

fn fast(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && !x.track_op()
}

#[derive(Clone, Copy)]
enum Kind {
    GeluErf,
    Silu,
    QuickGelu,
    Softmax,
}

struct Map(Kind);

impl CustomOp1 for Map {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::GeluErf => "gelu-erf-f32",
            Kind::Silu => "silu-f32",
            Kind::QuickGelu => "quick-gelu-f32",
            Kind::Softmax => "softmax-f32",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: contiguous input only", self.name());
        };
        let x = &v[a..b];
        // Written once in full below: no zero-filling pass first.
        let mut y = Vec::<f32>::with_capacity(x.len());
        let out = &mut y.spare_capacity_mut()[..x.len()];
        // Rows for softmax; otherwise any split (big enough to be a task).
        let chunk = match self.0 {
            Kind::Softmax => l.dims().last().copied().unwrap_or(1).max(1),
            _ => 16 * 1024,
        };
        let rows_per_task = match self.0 {
            Kind::Softmax => (16 * 1024 / chunk).max(1),
            _ => 1,
        };
        let kind = self.0;
        if x.len() <= chunk * rows_per_task {
            run(kind, x, out, chunk);
        } else {
            out.par_chunks_mut(chunk * rows_per_task)
                .zip(x.par_chunks(chunk * rows_per_task))
                .for_each(|(y, x)| run(kind, x, y, chunk));
        }
        // SAFETY: `run` wrote every one of the `x.len()` values.
        unsafe { y.set_len(x.len()) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// `kind` over `x` into `y`, every value written (softmax per row of `row`
/// values).
fn run(kind: Kind, x: &[f32], y: &mut [MaybeUninit<f32>], row: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { run_avx512(kind, x, y, row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { run_avx2(kind, x, y, row) };
        }
    }
    run_any(kind, x, y, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(kind: Kind, x: &[f32], y: &mut [MaybeUninit<f32>], row: usize) {
    run_any(kind, x, y, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(kind: Kind, x: &[f32], y: &mut [MaybeUninit<f32>], row: usize) {
    run_any(kind, x, y, row)
}

#[inline(always)]
fn run_any(kind: Kind, x: &[f32], y: &mut [MaybeUninit<f32>], row: usize) {
    match kind {
        Kind::GeluErf => y
            .iter_mut()
            .zip(x)
            .for_each(|(o, &v)| _ = o.write(0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)))),
        Kind::Silu => y.iter_mut().zip(x).for_each(|(o, &v)| _ = o.write(v / (1.0 + exp(-v)))),
        Kind::QuickGelu => y
            .iter_mut()
            .zip(x)
            .for_each(|(o, &v)| _ = o.write(v / (1.0 + exp(-1.702 * v)))),
        Kind::Softmax => {
            for (o, r) in y.chunks_exact_mut(row).zip(x.chunks_exact(row)) {
                // NaN is passed over here and comes back through exp below.
                let max = reduce(r, f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
                // A row of -inf (fully masked) gives NaN, as torch does.
                o.iter_mut().zip(r).for_each(|(o, &v)| _ = o.write(exp(v - max)));
                // SAFETY: every value of the row was written just above.
                let o = unsafe { &mut *(o as *mut [MaybeUninit<f32>] as *mut [f32]) };
                let inv = 1.0 / reduce(o, 0.0, |a, v| a + v);
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}

/// `x` folded by `f` in 16 independent lanes, then across them. A plain
/// fold over floats stays one dependent chain (LLVM keeps the order of
/// float operations), a 4-cycle add or max per value; attention's rows of
/// 64-77 scores spent more time there than in `exp` (SD's UNet: 9% of a
/// step). For a sum the order of additions changes, as in torch's
/// vectorised reductions.
#[inline(always)]
pub(crate) fn reduce(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    if x.len() < 2 * LANES {
        return x.iter().fold(init, |a, &v| f(a, v));
    }
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    acc.iter().fold(tail, |a, &v| f(a, v))
}

/// `e^x` in f32 (<= 2 ulp in the tests), `inf` past 88.73, 0 below -104.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^11.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // max / min (not clamp) so that NaN becomes a number here; it is put
    // back at the end.
    let xc = x.max(-104.0).min(88.73);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r to degree 7, Horner form.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n in two factors so that n down to -150 (subnormal results) and up
    // to 128 stays representable in each.
    // SAFETY: n is an integer in [-151, 128] (xc is finite and bounded);
    // a plain conversion, where `as` would add saturation code that keeps
    // LLVM from vectorising the loop.
    let n: i32 = unsafe { n.to_int_unchecked() };
    let (a, b) = (n / 2, n - n / 2);
    let scale = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * scale(a) * scale(b);
    if x > 88.73 {
        f32::INFINITY
    } else if x < -104.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// erf in f32 (<= 5e-7 absolute in the tests: 4 ulp at 1).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    // x P(x^2) / Q(x^2), fitted on [0, 4] (see the module header).
    const P: [f32; 7] = [
        1.128_378_9,
        0.206_113_62,
        0.051_386_006,
        0.003_965_618,
        0.000_148_224_59,
        -1.977_515_7e-6,
        1.966_793_1e-8,
    ];
    const Q: [f32; 5] = [1.0, 0.515_992_6, 0.117_553_34, 0.014_880_657, 0.001_020_473_9];
    let t = x.max(-4.0).min(4.0);
    let z = t * t;
    let p = P[0] + z * (P[1] + z * (P[2] + z * (P[3] + z * (P[4] + z * (P[5] + z * P[6])))));
    let q = Q[0] + z * (Q[1] + z * (Q[2] + z * (Q[3] + z * Q[4])));
    if x.is_nan() {
        x
    } else {
        // The fit overshoots 1 by an ulp or two near 4; erf never does.
        (t * p / q).max(-1.0).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f64, hi: f64, n: usize) -> Vec<f32> {
        (0..=n).map(|i| (lo + (hi - lo) * i as f64 / n as f64) as f32).collect()
    }

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.abs().to_bits() + 1) - b32.abs()) as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_and_saturates_like_libm() {
        let worst = grid(-87.0, 88.7, 2_000_000)
            .into_iter()
            .map(|x| ulps(exp(x), (x as f64).exp()))
            .fold(0.0, f64::max);
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        // Subnormal results still come out (to their 2^-149 spacing).
        let tiny = exp(-100.0);
        assert!(tiny > 0.0 && ((tiny as f64) - (-100f64).exp()).abs() / (-100f64).exp() < 5e-2);
    }

    #[test]
    fn erf_is_within_5e_7_of_f64() {
        let worst = grid(-6.0, 6.0, 2_000_000)
            .into_iter()
            .map(|x| (erf(x) as f64 - erf64(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 5e-7, "{worst}");
        assert!(erf(f32::NAN).is_nan());
        assert_eq!(erf(f32::INFINITY), 1.0);
    }

    /// erf in f64 by its series / continued fraction (f64 has no erf in std).
    fn erf64(x: f64) -> f64 {
        // Abramowitz & Stegun 7.1.5 series converges fast for |x| <= 3;
        // beyond, 1 - erfc by the Lentz continued fraction.
        let ax = x.abs();
        let v = if ax <= 3.0 {
            let (mut term, mut sum, mut n) = (ax, ax, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -ax * ax / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
            let mut f = ax;
            for k in (1..60).rev() {
                f = ax + (k as f64 / 2.0) / f;
            }
            1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / f
        };
        v.copysign(x)
    }

    #[test]
    fn activations_and_softmax_equal_candles_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(grid(-12.0, 12.0, 40_001), &dev)?;
        let max_abs = |a: Tensor, b: Tensor| -> Result<f32> { (a - b)?.abs()?.max(0)?.to_scalar::<f32>() };
        // Absolute bounds: values reach 12, where an ulp is 9.5e-7.
        assert!(max_abs(gelu_erf(&x)?, x.gelu_erf()?)? < 2e-6);
        assert!(max_abs(silu(&x)?, x.silu()?)? < 2e-6);
        assert!(max_abs(quick_gelu(&x)?, (&x * candle_nn::ops::sigmoid(&(&x * 1.702)?)?)?)? < 2e-6);
        // Softmax over rows of 3 and of 97 (several tasks), and a transposed
        // (strided) input.
        let m = Tensor::new(grid(-30.0, 30.0, 97 * 300 - 1), &dev)?.reshape((300, 97))?;
        for t in [m.clone(), m.reshape((9700, 3))?, m.t()?] {
            let d = (softmax_last_dim(&t)? - candle_nn::ops::softmax_last_dim(&t.contiguous()?)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-7, "{d}");
        }
        // Masked scores (-inf) get 0; a fully masked row and a row with a
        // NaN give NaN throughout, as torch's softmax does.
        let inf = f32::NEG_INFINITY;
        let mut rows = vec![0.5f32; 4 * 37];
        rows[3..37].iter_mut().for_each(|v| *v = inf);
        rows[37..74].iter_mut().for_each(|v| *v = inf);
        rows[74 + 20] = f32::NAN;
        let got = softmax_last_dim(&Tensor::from_vec(rows, (4, 37), &dev)?)?.to_vec2::<f32>()?;
        assert!(got[0][..3].iter().all(|&p| (p - 1.0 / 3.0).abs() < 1e-7) && got[0][3..].iter().all(|&p| p == 0.0));
        assert!(got[1].iter().chain(&got[2]).all(|p| p.is_nan()));
        assert!(got[3].iter().all(|&p| (p - 1.0 / 37.0).abs() < 1e-7));
        Ok(())
    }
}
