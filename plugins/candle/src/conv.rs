//! 2-d convolution with weights packed once for the CPU.
//!
//! candle's CPU conv2d builds im2col tiles and hands each to its matmul,
//! which packs the (unchanging) kernel again for every tile. Here a CPU f32
//! kernel `[c_out, c_in, kh, kw]` is packed at load time as the weight of a
//! [`PackedWeights`] product with `k = c_in * kh * kw` (the kernel's own
//! row-major order, so packing is a plain transpose into panels); the
//! im2col is written a block of pixels at a time, in parallel. Small
//! kernels (3x3, 1x1) write it by columns (one copy per run of pixels
//! along an input line) and multiply it with the weight on the left
//! ([`PackedWeights::left_product`]), so the result rows are output
//! channels and land in NCHW as they are; wide ones (a ViT's patch
//! embedding) write it by rows (one copy per patch row) for the row
//! product, whose `[pixels, c_out]` result the op lays out as NCHW.
//! Grouped convolutions, CUDA, f16 / bf16 and graphs
//! that track gradients stay on candle's `Conv2d`; the packed copy replaces
//! the loaded kernel, which such an input gets unpacked for its call.
//!
//! Drop-in for `candle_nn::{Conv2d, conv2d, conv2d_no_bias}`: same weight
//! names, same `Module`.

use crate::linear::{PackedWeights, LEFT_COLS, LEFT_KC};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;
use std::sync::Arc;

/// A 2-d convolution over NCHW input.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// The layer as loaded; `None` once packed (the packed copy replaces it).
    plain: Option<candle_nn::Conv2d>,
    packed: Option<Arc<PackedWeights>>,
    /// `[c_out, c_in / groups, kh, kw]`.
    shape: [usize; 4],
    config: Conv2dConfig,
}

impl Conv2d {
    /// From a kernel `[c_out, c_in / groups, kh, kw]`, an optional bias
    /// `[c_out]` and the stride / padding / dilation / groups.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        let shape = weight.dims4().map(|(a, b, c, d)| [a, b, c, d]).unwrap_or_default();
        let packed = match config.groups {
            1 => weight
                .reshape((shape[0], shape[1] * shape[2] * shape[3]))
                .ok()
                .and_then(|w| PackedWeights::of(&w, bias.as_ref()))
                .map(Arc::new),
            _ => None,
        };
        let plain = match packed {
            Some(_) => None,
            None => Some(candle_nn::Conv2d::new(weight, bias, config)),
        };
        Self {
            plain,
            packed,
            shape,
            config,
        }
    }

    /// `[c_out, c_in / groups, kh, kw]`.
    pub fn kernel_shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The layer as candle's, unpacked if need be.
    fn plain(&self) -> Result<std::borrow::Cow<'_, candle_nn::Conv2d>> {
        use std::borrow::Cow;
        match (&self.plain, &self.packed) {
            (Some(c), _) => Ok(Cow::Borrowed(c)),
            (None, Some(p)) => {
                let (w, b) = p.unpack(&Device::Cpu)?;
                Ok(Cow::Owned(candle_nn::Conv2d::new(
                    w.reshape(self.shape.to_vec())?,
                    b,
                    self.config,
                )))
            }
            (None, None) => unreachable!("a Conv2d is plain or packed"),
        }
    }
}

/// `weight` `[c_out, c_in, k, k]` and `bias` `[c_out]` under `vb`.
pub fn conv2d(c_in: usize, c_out: usize, k: usize, config: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let c = candle_nn::conv2d(c_in, c_out, k, config, vb)?;
    Ok(Conv2d::new(c.weight().clone(), c.bias().cloned(), config))
}

/// `weight` `[c_out, c_in, k, k]` under `vb`, no bias.
pub fn conv2d_no_bias(c_in: usize, c_out: usize, k: usize, config: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let c = candle_nn::conv2d_no_bias(c_in, c_out, k, config, vb)?;
    Ok(Conv2d::new(c.weight().clone(), None, config))
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(p) = &self.packed else {
            return self.plain()?.forward(x);
        };
        let [_, c_in, kh, kw] = self.shape;
        let applies = matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() == 4 && !x.track_op();
        if !applies || x.dim(1)? != c_in {
            // candle's conv gives the error for a wrong channel count.
            return self.plain()?.forward(x);
        }
        let cfg = &self.config;
        let (_, _, h, w) = x.dims4()?;
        let span = |size: usize, k: usize| (size + 2 * cfg.padding).checked_sub(cfg.dilation * (k - 1) + 1);
        let (Some(oh), Some(ow)) = (span(h, kh), span(w, kw)) else {
            return self.plain()?.forward(x);
        };
        let (oh, ow) = (oh / cfg.stride + 1, ow / cfg.stride + 1);
        let geo = Geometry {
            c_in,
            h,
            w,
            kh,
            kw,
            oh,
            ow,
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
        };
        x.contiguous()?.apply_op1_no_bwd(&PackedConv { packed: p.clone(), geo })
    }
}

/// The packed convolution as a candle op on the input's own storage.
struct PackedConv {
    packed: Arc<PackedWeights>,
    geo: Geometry,
}

impl CustomOp1 for PackedConv {
    fn name(&self) -> &'static str {
        "packed-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((a, z))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("packed-conv2d: contiguous f32 input only");
        };
        let (x, g) = (&v[a..z], &self.geo);
        let b = l.dims()[0];
        let pixels = g.oh * g.ow;
        let c_out = self.packed.out_dim();
        let shape = Shape::from((b, c_out, g.oh, g.ow));
        if g.kw < 16 || g.dilation != 1 {
            return Ok((CpuStorage::F32(self.small(x, b)), shape));
        }
        let y = self
            .packed
            .matmul_with(b * pixels, &|i0, i1, rows| g.im2col_runs(x, i0, i1, rows));
        // [b, pixels, c_out] -> NCHW, a 32 x 32 block at a time.
        let mut out = vec![0.0f32; y.len()];
        for (yb, ob) in y.chunks_exact(pixels * c_out).zip(out.chunks_exact_mut(pixels * c_out)) {
            for p0 in (0..pixels).step_by(32) {
                for c0 in (0..c_out).step_by(32) {
                    for p in p0..(p0 + 32).min(pixels) {
                        for c in c0..(c0 + 32).min(c_out) {
                            ob[c * pixels + p] = yb[p * c_out + c];
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), shape))
    }
}

/// A pass of the left product over an im2col block (`LEFT_KC` of its rows),
/// at most this many bytes, so that it stays in L2 while each group of
/// output channels goes over it.
const BLOCK_BYTES: usize = 256 << 10;

impl PackedConv {
    /// Small kernels (3 x 3, 1 x 1, strided, dilated): blocks of output
    /// pixels (across images), each written as im2col by columns and
    /// multiplied with the weight on the left, so the result rows are
    /// output channels and land in NCHW as they are.
    fn small(&self, x: &[f32], b: usize) -> Vec<f32> {
        let (g, w) = (&self.geo, &self.packed);
        let (pixels, c_out) = (g.oh * g.ow, w.out_dim());
        let (total, k) = (b * pixels, g.c_in * g.kh * g.kw);
        if total == 0 {
            return Vec::new();
        }
        let threads = rayon::current_num_threads();
        // Pixels per block: a pass within BLOCK_BYTES, and two blocks per
        // thread where there are pixels enough.
        let by_cache = (BLOCK_BYTES / 4 / k.clamp(1, LEFT_KC)).max(LEFT_COLS) / LEFT_COLS * LEFT_COLS;
        let nb = total.div_ceil(2 * threads).next_multiple_of(LEFT_COLS).min(by_cache);
        let blocks = total.div_ceil(nb);
        let mut out = Vec::<f32>::with_capacity(b * c_out * pixels);
        let dst = Out(out.as_mut_ptr());
        let block = |blk: usize| {
            let (i0, i1) = (blk * nb, (blk * nb + nb).min(total));
            let (cols, ld) = (i1 - i0, (i1 - i0).next_multiple_of(LEFT_COLS));
            // Zero past `cols`: those columns are multiplied too (and dropped).
            let mut cols_x = vec![0.0f32; k * ld];
            g.im2col_columns(x, i0, i1, &mut cols_x, ld);
            let (first, last) = (i0 / pixels, (i1 - 1) / pixels);
            if first == last {
                // One image: straight into its planes.
                // SAFETY: rows c of image `first` from pixel i0 % pixels, cols
                // values each, lie inside `out` and only this block writes them.
                unsafe {
                    let y = dst.at(first * c_out * pixels + i0 % pixels);
                    w.left_product(&cols_x, ld, cols, y, pixels);
                }
                return;
            }
            // Across images: the block's rows, then each image's part.
            let mut y = vec![0.0f32; c_out * cols];
            // SAFETY: y holds c_out rows of cols values.
            unsafe { w.left_product(&cols_x, ld, cols, y.as_mut_ptr(), cols) };
            for img in first..=last {
                let (a, z) = ((img * pixels).max(i0), ((img + 1) * pixels).min(i1));
                for (c, row) in y.chunks_exact(cols).enumerate() {
                    // SAFETY: as above, this block's pixels a..z of image img.
                    unsafe {
                        let at = dst.at((img * c_out + c) * pixels + a - img * pixels);
                        std::ptr::copy_nonoverlapping(row[a - i0..z - i0].as_ptr(), at, z - a);
                    }
                }
            }
        };
        if blocks == 1 || c_out * k * total < TASK_WORK {
            (0..blocks).for_each(block);
        } else {
            (0..blocks).into_par_iter().for_each(block);
        }
        // SAFETY: the blocks cover every pixel of every image, and each
        // writes all c_out channels of its pixels.
        unsafe { out.set_len(b * c_out * pixels) };
        out
    }
}

/// Multiply-adds below which a convolution stays on the calling thread.
const TASK_WORK: usize = 1 << 17;

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: blocks write disjoint pixels (see `PackedConv::small`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The output from value `i` (a method, so that closures capture the
    /// whole `Out` rather than its raw pointer).
    unsafe fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}

/// The shapes of one convolution.
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Geometry {
    /// Wide kernels (a ViT's patch embedding): per pixel, each patch row's
    /// part inside the image is one run of the input line, copied whole.
    fn im2col_runs(&self, x: &[f32], i0: usize, i1: usize, rows: &mut [f32]) {
        let g = self;
        let k = g.c_in * g.kh * g.kw;
        for (i, row) in (i0..i1).zip(rows.chunks_exact_mut(k)) {
            let (bi, pix) = (i / (g.oh * g.ow), i % (g.oh * g.ow));
            let (oy, ox) = (pix / g.ow, pix % g.ow);
            let ix0 = (ox * g.stride) as isize - g.padding as isize;
            let lo = (-ix0).clamp(0, g.kw as isize) as usize;
            let hi = (g.w as isize - ix0).clamp(lo as isize, g.kw as isize) as usize;
            for ci in 0..g.c_in {
                let plane = &x[(bi * g.c_in + ci) * g.h * g.w..(bi * g.c_in + ci + 1) * g.h * g.w];
                for ky in 0..g.kh {
                    let dst = &mut row[(ci * g.kh + ky) * g.kw..(ci * g.kh + ky + 1) * g.kw];
                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.h as isize || hi == lo {
                        dst.fill(0.0);
                        continue;
                    }
                    let start = iy as usize * g.w + (ix0 + lo as isize) as usize;
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    dst[lo..hi].copy_from_slice(&plane[start..start + (hi - lo)]);
                }
            }
        }
    }

    /// Small kernels (3 x 3, 1 x 1): the im2col block of pixels `i0..i1`
    /// written by columns (`block[col * ld + r]`), each column a
    /// pass along the input lines under consecutive pixels of an output
    /// row: one copy per row run at stride 1, no per-pixel copies of the
    /// two or three values a small patch row has.
    fn im2col_columns(&self, x: &[f32], i0: usize, i1: usize, block: &mut [f32], ld: usize) {
        let g = self;
        let nb = i1 - i0;
        let plane = g.h * g.w;
        // Runs of the block's pixels that share an image and output row:
        // (first pixel's place in the block, image, oy, first ox, length).
        let mut runs = Vec::new();
        let mut i = i0;
        while i < i1 {
            let (bi, pix) = (i / (g.oh * g.ow), i % (g.oh * g.ow));
            let (oy, ox) = (pix / g.ow, pix % g.ow);
            let len = (g.ow - ox).min(i1 - i);
            runs.push((i - i0, bi, oy, ox, len));
            i += len;
        }
        for ci in 0..g.c_in {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let col = (ci * g.kh + ky) * g.kw + kx;
                    let dst = &mut block[col * ld..col * ld + nb];
                    for &(r0, bi, oy, ox0, len) in &runs {
                        let out = &mut dst[r0..r0 + len];
                        let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                        if iy < 0 || iy >= g.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let line = &x[(bi * g.c_in + ci) * plane + iy as usize * g.w..][..g.w];
                        // ix = ox * stride + kx * dilation - padding over the run.
                        let ix0 = (ox0 * g.stride + kx * g.dilation) as isize - g.padding as isize;
                        if g.stride == 1 {
                            let lo = (-ix0).clamp(0, len as isize) as usize;
                            let hi = (g.w as isize - ix0).clamp(lo as isize, len as isize) as usize;
                            out[..lo].fill(0.0);
                            out[hi..].fill(0.0);
                            if hi > lo {
                                let start = (ix0 + lo as isize) as usize;
                                out[lo..hi].copy_from_slice(&line[start..start + (hi - lo)]);
                            }
                        } else {
                            for (j, o) in out.iter_mut().enumerate() {
                                let ix = ix0 + (j * g.stride) as isize;
                                *o = if ix < 0 || ix >= g.w as isize {
                                    0.0
                                } else {
                                    line[ix as usize]
                                };
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::tests::data;

    #[test]
    fn packed_convolutions_equal_candles() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, c_in, h, w, c_out, k, stride, padding, dilation): SD's 3x3
        // same and 2-stride downsampling, 1x1, a ViT patch embedding, odd
        // sizes, dilation, padding past the kernel's reach, enough pixels to
        // take the row-parallel path, and kernels of 16+ (the run-copying
        // im2col) with and without padding.
        for &(b, ci, h, w, co, k, stride, padding, dilation) in &[
            (2, 4, 8, 8, 8, 3, 1, 1, 1),
            (1, 3, 9, 7, 5, 3, 2, 1, 1),
            (3, 6, 5, 5, 7, 1, 1, 0, 1),
            (2, 3, 32, 32, 16, 8, 8, 0, 1),
            (1, 2, 11, 13, 3, 3, 1, 2, 2),
            (1, 2, 3, 4, 3, 3, 1, 4, 1),
            (1, 3, 64, 64, 8, 16, 16, 0, 1),
            (2, 2, 20, 21, 3, 16, 4, 9, 1),
            (2, 5, 40, 30, 9, 3, 1, 1, 1),
            // Blocks across many tiny images (SD's lowest UNet level), a
            // kernel whose im2col block is capped by the cache (k = 5400),
            // 3 output channels (a VAE's last convolution).
            (16, 32, 2, 2, 32, 3, 1, 1, 1),
            (2, 600, 6, 6, 3, 3, 1, 1, 1),
        ] {
            let cfg = Conv2dConfig {
                padding,
                stride,
                dilation,
                ..Default::default()
            };
            let x = Tensor::new(data(b * ci * h * w, 1), &dev)?.reshape((b, ci, h, w))?;
            let wt = Tensor::new(data(co * ci * k * k, 2), &dev)?.reshape((co, ci, k, k))?;
            let bias = Tensor::new(data(co, 3), &dev)?;
            for bias in [None, Some(bias)] {
                let ours = Conv2d::new(wt.clone(), bias.clone(), cfg);
                assert!(ours.packed.is_some());
                let theirs = candle_nn::Conv2d::new(wt.clone(), bias, cfg);
                let (a, e) = (ours.forward(&x)?, theirs.forward(&x)?);
                assert_eq!(a.dims(), e.dims(), "k{k} s{stride} p{padding} d{dilation}");
                let diff = (a - e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                // f32 sums of c_in * k * k products of values in [-1, 1),
                // both sides: the rounding of each add grows with the partial
                // sums (~sqrt(n) / 3 here), so the error with n.
                let n = (ci * k * k) as f32;
                let tol = 1e-6 * n.sqrt().max(4.0) + 4e-8 * n;
                assert!(diff < tol, "k{k} s{stride} p{padding} d{dilation}: {diff}");
            }
        }
        // An empty batch.
        let ours = Conv2d::new(
            Tensor::zeros((4, 2, 3, 3), DType::F32, &dev)?,
            None,
            Conv2dConfig::default(),
        );
        assert_eq!(
            ours.forward(&Tensor::zeros((0, 2, 5, 5), DType::F32, &dev)?)?.dims(),
            &[0, 4, 3, 3]
        );
        Ok(())
    }

    #[test]
    fn grouped_and_mismatched_inputs_stay_on_candle() -> Result<()> {
        let dev = Device::Cpu;
        let wt = Tensor::new(data(4 * 2 * 9, 1), &dev)?.reshape((4, 2, 3, 3))?;
        let grouped = Conv2d::new(
            wt.clone(),
            None,
            Conv2dConfig {
                groups: 2,
                padding: 1,
                ..Default::default()
            },
        );
        assert!(grouped.packed.is_none());
        let x = Tensor::new(data(4 * 25, 2), &dev)?.reshape((1, 4, 5, 5))?;
        assert_eq!(grouped.forward(&x)?.dims(), &[1, 4, 5, 5]);
        // Three channels into a two-channel kernel: candle's error.
        let plain = Conv2d::new(wt, None, Conv2dConfig::default());
        assert!(plain.forward(&Tensor::zeros((1, 3, 5, 5), DType::F32, &dev)?).is_err());
        // An input that tracks gradients: the unpacked kernel, same result.
        let x = candle_core::Var::from_tensor(&Tensor::new(data(2 * 25, 3), &dev)?.reshape((1, 2, 5, 5))?)?;
        let (a, e) = (plain.forward(x.as_tensor())?, plain.forward(&x.as_tensor().detach())?);
        let diff = (a - e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
