//! Group normalisation, optionally followed by SiLU, in one op on the CPU.
//!
//! candle_nn's `GroupNorm` is a dozen tensor ops (reshape, sum, subtract,
//! square, sum, add, sqrt, divide, reshape, multiply, add), each a pass over
//! the feature map with its own allocation, and the SiLU after it in every
//! ResNet block of SD's UNet and VAE is one more. On a VAE decoder's
//! full-resolution maps those passes are most of its time. Here a CPU f32
//! input that tracks no gradient is read twice per group (mean, then the
//! variance around it, both accumulated in f64 like PyTorch's two-pass
//! moments) and written once: `x * a + b` per channel, with `a = gamma /
//! sqrt(var + eps)` and `b = beta - mean * a`, SiLU applied in the same
//! loop when asked. CUDA, f16 / bf16 and training use candle_nn's layer.
//!
//! Drop-in for `candle_nn::{GroupNorm, group_norm}`: same weight names,
//! same `Module`.

use crate::activation::exp;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Group normalisation over `[b, c, ...]`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    plain: candle_nn::GroupNorm,
    /// gamma and beta on the host, when they are CPU f32.
    host: Option<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    channels: usize,
    eps: f64,
}

/// candle_nn's `group_norm`: `weight` and `bias` of `channels` under `vb`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, channels, groups, eps)
}

impl GroupNorm {
    /// From gamma and beta `[channels]`; `groups` must divide `channels`.
    pub fn new(weight: Tensor, bias: Tensor, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let host_f32 = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !t.track_op();
        let host = match host_f32(&weight) && host_f32(&bias) {
            true => Some((weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?)),
            false => None,
        };
        Ok(GroupNorm {
            plain: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
            host,
            groups,
            channels,
            eps,
        })
    }

    /// `silu(group_norm(x))`, the pair every ResNet block applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.op(x, true) {
            Some(op) => x.contiguous()?.apply_op1_no_bwd(&op),
            None => crate::activation::silu(&self.plain.forward(x)?),
        }
    }

    /// The fused op for `x`, or `None` where candle_nn's layer runs.
    fn op(&self, x: &Tensor, silu: bool) -> Option<Op<'_>> {
        let (gamma, beta) = self.host.as_ref()?;
        let fast = matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && !x.track_op();
        (fast && x.rank() >= 3 && x.dim(1).ok()? == self.channels).then_some(Op {
            gamma,
            beta,
            groups: self.groups,
            eps: self.eps,
            silu,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.op(x, false) {
            Some(op) => x.contiguous()?.apply_op1_no_bwd(&op),
            None => self.plain.forward(x),
        }
    }
}

struct Op<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        if self.silu {
            "group-norm-silu-f32"
        } else {
            "group-norm-f32"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: contiguous input only", self.name());
        };
        let x = &v[start..end];
        let channels = self.gamma.len();
        let plane = l.dims()[2..].iter().product::<usize>();
        let per_group = channels / self.groups * plane;
        let mut y = vec![0f32; x.len()];
        let job = |(i, (y, x)): (usize, (&mut [f32], &[f32]))| {
            let first = (i % self.groups) * (channels / self.groups);
            self.group(x, y, first, plane);
        };
        // Groups are independent; small maps stay on the calling thread.
        if x.len() < 1 << 16 {
            y.chunks_mut(per_group)
                .zip(x.chunks(per_group))
                .enumerate()
                .for_each(job);
        } else {
            y.par_chunks_mut(per_group)
                .zip(x.par_chunks(per_group))
                .enumerate()
                .for_each(job);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

impl Op<'_> {
    /// One group: channels `first..` of one sample, `plane` values each.
    fn group(&self, x: &[f32], y: &mut [f32], first: usize, plane: usize) {
        let n = x.len() as f64;
        let mean = sum_f64(x, |v| v as f64) / n;
        let var = sum_f64(x, |v| {
            let d = v as f64 - mean;
            d * d
        }) / n;
        let rstd = 1.0 / (var + self.eps).sqrt();
        for (c, (y, x)) in y.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).enumerate() {
            let a = (self.gamma[first + c] as f64 * rstd) as f32;
            let b = (self.beta[first + c] as f64 - mean * self.gamma[first + c] as f64 * rstd) as f32;
            scale_shift(x, y, a, b, self.silu);
        }
    }
}

/// `sum f(x)` in f64 over eight independent lanes (vectorised; a single
/// running sum would be one dependent add per value).
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&v| f(v)).sum::<f64>()
}

/// `y = x * a + b`, then SiLU if asked, with the CPU's widest vectors.
fn scale_shift(x: &[f32], y: &mut [f32], a: f32, b: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { scale_shift_avx512(x, y, a, b, silu) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { scale_shift_avx2(x, y, a, b, silu) };
        }
    }
    scale_shift_any(x, y, a, b, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_shift_avx512(x: &[f32], y: &mut [f32], a: f32, b: f32, silu: bool) {
    scale_shift_any(x, y, a, b, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_shift_avx2(x: &[f32], y: &mut [f32], a: f32, b: f32, silu: bool) {
    scale_shift_any(x, y, a, b, silu)
}

#[inline(always)]
fn scale_shift_any(x: &[f32], y: &mut [f32], a: f32, b: f32, silu: bool) {
    if silu {
        y.iter_mut().zip(x).for_each(|(o, &v)| {
            let t = v * a + b;
            *o = t / (1.0 + exp(-t));
        });
    } else {
        y.iter_mut().zip(x).for_each(|(o, &v)| *o = v * a + b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn layer(c: usize, groups: usize, dev: &Device) -> Result<GroupNorm> {
        let w = Tensor::randn(1f32, 0.5, c, dev)?;
        let b = Tensor::randn(0f32, 0.5, c, dev)?;
        GroupNorm::new(w, b, c, groups, 1e-5)
    }

    #[test]
    fn group_norm_matches_candle_nn_with_and_without_silu() -> Result<()> {
        let dev = Device::Cpu;
        // (b, c, groups, spatial): the tiny VAE's 4 groups, SD's 32, one
        // channel per group, a 1-d input, a parallel-sized map, and values
        // far from zero (a mean of 100: a one-pass variance would cancel).
        for (b, c, g, dims, offset) in [
            (2, 8, 4, vec![8, 8], 0f32),
            (1, 64, 32, vec![16, 16], 0.0),
            (3, 6, 6, vec![5, 7], 0.0),
            (2, 16, 4, vec![33], 0.0),
            (2, 32, 8, vec![64, 64], 0.0),
            (1, 8, 2, vec![9, 9], 100.0),
        ] {
            let norm = layer(c, g, &dev)?;
            let mut shape = vec![b, c];
            shape.extend(&dims);
            let x = (Tensor::randn(0f32, 2.0, shape, &dev)? + offset as f64)?;
            let want = norm.plain.forward(&x)?;
            let tol = 2e-5 * (1.0 + offset / 10.0);
            assert!(max_diff(&norm.forward(&x)?, &want) < tol, "{:?}", (b, c, g, &dims));
            let want = candle_nn::ops::silu(&want)?;
            assert!(
                max_diff(&norm.forward_silu(&x)?, &want) < tol,
                "silu {:?}",
                (b, c, g, &dims)
            );
        }
        // A non-contiguous input (a transposed map) is made contiguous first.
        let norm = layer(8, 4, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 8, 6, 5), &dev)?.transpose(2, 3)?;
        assert!(max_diff(&norm.forward(&x)?, &norm.plain.forward(&x)?) < 2e-5);
        Ok(())
    }

    #[test]
    fn wrong_channels_f16_and_gradients_use_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        let norm = layer(8, 4, &dev)?;
        // candle_nn's error, naming both channel counts.
        let err = norm
            .forward(&Tensor::zeros((1, 6, 4, 4), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("num-channels"), "{err}");
        let half = Tensor::randn(0f32, 1.0, (1, 8, 4, 4), &dev)?.to_dtype(DType::F16)?;
        assert!(norm.op(&half, false).is_none());
        let var = candle_core::Var::randn(0f32, 1.0, (1, 8, 4, 4), &dev)?;
        assert!(norm.op(var.as_tensor(), false).is_none());
        // A gradient flows through the fallback.
        let y = norm.forward_silu(var.as_tensor())?.sqr()?.sum_all()?;
        let grads = y.backward()?;
        assert!(grads.get(var.as_tensor()).is_some());
        Ok(())
    }
}
