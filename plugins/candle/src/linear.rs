//! `y = x Wᵀ + b` with weights packed once for the CPU.
//!
//! candle's CPU matmul (the `gemm` crate) packs both operands into panels on
//! every call. A linear layer's weights never change, so that work is done
//! again on every call: with few rows of `x` (an LLM's or caption decoder's
//! step has one row per sequence) it costs about as much as the product, and
//! SmolLM2's 49,152 x 576 output head took ~3x longer than reading its
//! weights once. ONNX Runtime (MLAS) packs weights when the session is made.
//! Here too: on the CPU, f32 weights are laid out at load time as panels of
//! output columns, each `k x width` contiguous, and [`PackedWeights::matmul`]
//! streams every panel once per block of rows through a kernel that holds
//! a tile of rows x columns in registers: AVX-512 (12 x 32) where the CPU
//! has it, which candle's `gemm` uses only on nightly Rust, else AVX2 + FMA
//! (6 x 16), else portable code; the panels are split across the rayon pool.
//! Everything else (CUDA, f16 / bf16, a graph that tracks gradients) is
//! candle's `Linear`.
//!
//! Drop-in for `candle_nn::{Linear, linear, linear_no_bias}`: same weight
//! names, same `Module`. The packed copy replaces the loaded weight (memory
//! stays 1x); the rare path that needs the plain weight back (an input that
//! tracks gradients) unpacks it for that call.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::sync::Arc;

/// Rows of `x` per block, kept in L2 while the panels stream past (a
/// multiple of every kernel's rows).
const MC: usize = 96;
/// The widest tile: 12 rows x 32 columns.
const TILE: usize = 12 * 32;
/// A weight read from memory costs about as long as this many fused
/// multiply-adds (~15 GB/s against ~80 G FMA/s per core).
const BYTES_AS_FMAS: usize = 20;
/// Work (in fused multiply-adds) worth a task of its own, ~2 us: only
/// products smaller than this stay on the calling thread. (MiniLM at batch
/// 1 measured best with its 384 x 384 products split across both cores,
/// wake-ups included; a threshold of 2^21 cost it ~5 %.)
const TASK_WORK: usize = 1 << 17;

/// The kernel this CPU runs, with its tile: `rows` x `cols` (the panel
/// width) accumulators held in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// 12 x 32: 24 of the 32 zmm registers, 2 weight loads and 12
    /// broadcasts feeding 24 fused multiply-adds per step of `k`.
    Avx512,
    /// 6 x 16: 12 of the 16 ymm registers, 2 weight loads feeding 12.
    Avx2,
    /// 4 x 16 in plain Rust.
    Portable,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// The kernel for a product of `n` output columns. At `n <= 16` (a
    /// VAE's 8- and 16-channel convolutions) AVX-512's 32-column tile would
    /// compute half or more of its columns for nothing, AVX2's 16-column
    /// one none: on AMD's Zen 4, which runs a zmm multiply-add as two ymm
    /// halves, that halves the time; on Intel the useful multiply-adds per
    /// instruction are the same either way.
    fn for_columns(n: usize) -> Self {
        match Isa::detect() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if n <= 16 && std::arch::is_x86_feature_detected!("fma") => Isa::Avx2,
            isa => isa,
        }
    }

    fn rows(self) -> usize {
        match self {
            Isa::Avx512 => 12,
            Isa::Avx2 => 6,
            Isa::Portable => 4,
        }
    }

    fn cols(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 | Isa::Portable => 16,
        }
    }
}

/// A linear layer, `y = x Wᵀ + b` over the last dimension of `x`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The layer as loaded; `None` once packed (the packed copy replaces it).
    plain: Option<candle_nn::Linear>,
    packed: Option<Arc<PackedWeights>>,
}

impl Linear {
    /// From a weight `[out, in]` and an optional bias `[out]`; CPU f32
    /// weights are packed here, once.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        match PackedWeights::of(&weight, bias.as_ref()) {
            Some(p) => Self {
                plain: None,
                packed: Some(Arc::new(p)),
            },
            None => Self {
                plain: Some(candle_nn::Linear::new(weight, bias)),
                packed: None,
            },
        }
    }

    /// The layer as candle's, unpacked if need be.
    fn plain(&self) -> Result<std::borrow::Cow<'_, candle_nn::Linear>> {
        use std::borrow::Cow;
        match (&self.plain, &self.packed) {
            (Some(l), _) => Ok(Cow::Borrowed(l)),
            (None, Some(p)) => {
                let (w, b) = p.unpack(&Device::Cpu)?;
                Ok(Cow::Owned(candle_nn::Linear::new(w, b)))
            }
            (None, None) => unreachable!("a Linear is plain or packed"),
        }
    }
}

/// `weight` `[out, in]` and `bias` `[out]` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// `weight` `[out, in]` under `vb`, no bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), None))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(p) = &self.packed else {
            return self.plain()?.forward(x);
        };
        let k = p.k;
        let applies = matches!(x.device(), Device::Cpu)
            && x.dtype() == DType::F32
            && x.rank() >= 1
            && x.dim(candle_core::D::Minus1)? == k
            && !x.track_op();
        if !applies {
            return self.plain()?.forward(x);
        }
        let m = x.elem_count() / k.max(1);
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("x has a last dimension") = p.n;
        x.contiguous()?
            .reshape((m, k))?
            .apply_op1_no_bwd(&Packed(p.clone()))?
            .reshape(out_dims)
    }
}

/// A weight `[n, k]` (and bias) as panels of `nr` output columns (the
/// kernel's width), each `k x nr` with column `c` of panel `p` holding row
/// `p * nr + c` of the weight (zero past `n`).
pub struct PackedWeights {
    n: usize,
    k: usize,
    isa: Isa,
    panels: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedWeights {
    // The shape, not the millions of packed values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl PackedWeights {
    /// Packs a CPU f32 weight that does not track gradients; `None` for any
    /// other (those stay on candle's matmul).
    pub fn of(weight: &Tensor, bias: Option<&Tensor>) -> Option<Self> {
        if !matches!(weight.device(), Device::Cpu) || weight.dtype() != DType::F32 || weight.track_op() {
            return None;
        }
        if bias.is_some_and(|b| b.dtype() != DType::F32 || b.track_op()) {
            return None;
        }
        let (n, k) = weight.dims2().ok()?;
        let w = weight.flatten_all().ok()?.to_vec1::<f32>().ok()?;
        let bias = match bias {
            Some(b) => Some(b.flatten_all().ok()?.to_vec1::<f32>().ok()?).filter(|b| b.len() == n),
            None => None,
        };
        Some(Self::pack(&w, bias, n, k))
    }

    /// Packs `w` `[n, k]` (row-major) with an optional bias of `n`.
    pub fn pack(w: &[f32], bias: Option<Vec<f32>>, n: usize, k: usize) -> Self {
        Self::pack_for(Isa::for_columns(n), w, bias, n, k)
    }

    fn pack_for(isa: Isa, w: &[f32], bias: Option<Vec<f32>>, n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "the weight is not [n, k]");
        let nr = isa.cols();
        let panels_n = n.div_ceil(nr);
        let mut panels = vec![0.0f32; panels_n * k * nr];
        if k > 0 {
            panels.par_chunks_mut(k * nr).enumerate().for_each(|(p, panel)| {
                for c in 0..nr.min(n - p * nr) {
                    let row = &w[(p * nr + c) * k..(p * nr + c + 1) * k];
                    for (t, v) in row.iter().enumerate() {
                        panel[t * nr + c] = *v;
                    }
                }
            });
        }
        Self {
            n,
            k,
            isa,
            panels,
            bias,
        }
    }

    /// `x [m, k] · Wᵀ (+ b)` as `[m, n]`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "x is not [m, k]");
        self.product(m, Rows::Given(x))
    }

    /// The product for `m` rows of `x` that `fill(i0, i1, rows)` writes
    /// (rows `i0..i1`, `k` values each) when they are needed, a block at a
    /// time: a convolution's im2col rows never exist all at once.
    pub fn matmul_with(&self, m: usize, fill: &(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> Vec<f32> {
        self.product(m, Rows::Filled(fill))
    }

    /// As [`PackedWeights::matmul_with`], with `fill(i0, i1, block)` writing
    /// the block column-major: `block[t * (i1 - i0) + r]` is value `t` of row
    /// `i0 + r`. A small convolution's im2col is cheap in that order (each
    /// column is a run of pixels along an input line) and costly in rows.
    pub fn matmul_with_columns(&self, m: usize, fill: &(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> Vec<f32> {
        self.product(m, Rows::FilledColumns(fill))
    }

    /// The output width (`n`, the weight's rows).
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// The weight `[n, k]` and bias `[n]` as tensors again.
    pub fn unpack(&self, device: &Device) -> Result<(Tensor, Option<Tensor>)> {
        let (n, k, nr) = (self.n, self.k, self.isa.cols());
        let mut w = vec![0.0f32; n * k];
        for (j, row) in w.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            let panel = &self.panels[(j / nr) * k * nr..];
            for (t, v) in row.iter_mut().enumerate() {
                *v = panel[t * nr + j % nr];
            }
        }
        let bias = self
            .bias
            .as_ref()
            .map(|b| Tensor::new(b.as_slice(), device))
            .transpose()?;
        Ok((Tensor::from_vec(w, (n, k), device)?, bias))
    }

    fn product(&self, m: usize, x: Rows) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        if m == 0 || n == 0 || k == 0 {
            let mut y = vec![0.0f32; m * n];
            if let (Some(b), true) = (&self.bias, n > 0) {
                y.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b));
            }
            return y;
        }
        // Every value of `y` is written once below (each row against every
        // panel, whichever way the work is split): no zero-fill first.
        let mut y = Vec::<f32>::with_capacity(m * n);
        let threads = rayon::current_num_threads();
        let panels_n = n.div_ceil(self.isa.cols());
        if m >= 2 * MC * threads.min(2) {
            // Many rows: blocks of rows in parallel, each against every panel.
            y.spare_capacity_mut()[..m * n]
                .par_chunks_mut(MC * n)
                .enumerate()
                .for_each(|(b, y)| {
                    let (i0, i1) = (b * MC, (b * MC + MC).min(m));
                    let mut buf = Vec::new();
                    let rows = x.rows(i0, i1, k, &mut buf);
                    // SAFETY: `y` is this block's rows, `n` wide.
                    unsafe { self.block(rows, 0, panels_n, OutPtr(y.as_mut_ptr().cast())) };
                });
            // SAFETY: the blocks wrote all m x n values.
            unsafe { y.set_len(m * n) };
            return y;
        }
        // Few rows: runs of whole panels in parallel, each against every
        // row; as many tasks as there is work for (`TASK_WORK` each, so a
        // small product does not pay for waking another thread), at most
        // enough to keep the pool busy.
        let mut buf = Vec::new();
        let rows = x.rows(0, m, k, &mut buf);
        let work = n * k * (m + BYTES_AS_FMAS);
        let tasks = (work / TASK_WORK).clamp(1, 4 * threads).min(panels_n);
        let out = OutPtr(y.as_mut_ptr());
        if tasks == 1 {
            // SAFETY: one task writes all of `y` (its capacity is m x n).
            unsafe { self.block(rows, 0, panels_n, out) };
        } else {
            let per = panels_n.div_ceil(tasks);
            (0..panels_n.div_ceil(per)).into_par_iter().for_each(|task| {
                let (p0, p1) = (task * per, ((task + 1) * per).min(panels_n));
                // SAFETY: tasks write disjoint column ranges (panels p0..p1)
                // of `y`, which outlives the parallel loop.
                unsafe { self.block(rows, p0, p1, out) };
            });
        }
        // SAFETY: the panels 0..panels_n cover every column of every row.
        unsafe { y.set_len(m * n) };
        y
    }

    /// Output columns of panels `p0..p1` for the rows of `x`, written to
    /// `out` (row stride `n`), [`MC`] rows at a time.
    unsafe fn block(&self, x: XView, p0: usize, p1: usize, out: OutPtr) {
        let (n, k, isa, m) = (self.n, self.k, self.isa, x.rows);
        let (mr, nr) = (isa.rows(), isa.cols());
        let mut tile = [0.0f32; TILE];
        for i0 in (0..m).step_by(MC) {
            let i1 = (i0 + MC).min(m);
            for p in p0..p1 {
                let panel = &self.panels[p * k * nr..(p + 1) * k * nr];
                let cols = nr.min(n - p * nr);
                let bias = self.bias.as_ref().map(|b| &b[p * nr..p * nr + cols]);
                let mut i = i0;
                while i < i1 {
                    let rows = (i1 - i).min(mr);
                    kernel(isa, x.from_row(i), rows, k, panel, &mut tile);
                    for r in 0..rows {
                        let dst = out.0.add((i + r) * n + p * nr);
                        let t = &tile[r * nr..r * nr + cols];
                        match bias {
                            Some(b) => (0..cols).for_each(|c| *dst.add(c) = t[c] + b[c]),
                            None => std::ptr::copy_nonoverlapping(t.as_ptr(), dst, cols),
                        }
                    }
                    i += rows;
                }
            }
        }
    }
}

/// Where the rows of `x` come from.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Given(&'a [f32]),
    Filled(&'a (dyn Fn(usize, usize, &mut [f32]) + Sync)),
    FilledColumns(&'a (dyn Fn(usize, usize, &mut [f32]) + Sync)),
}

impl<'a> Rows<'a> {
    /// Rows `i0..i1`, borrowed or written into `buf`.
    fn rows<'b>(self, i0: usize, i1: usize, k: usize, buf: &'b mut Vec<f32>) -> XView<'b>
    where
        'a: 'b,
    {
        let rows = i1 - i0;
        let (fill, by_columns) = match self {
            Rows::Given(x) => {
                return XView {
                    x: &x[i0 * k..i1 * k],
                    rows,
                    ld: k,
                    by_columns: false,
                }
            }
            Rows::Filled(fill) => (fill, false),
            Rows::FilledColumns(fill) => (fill, true),
        };
        buf.clear();
        buf.resize(rows * k, 0.0);
        fill(i0, i1, buf);
        XView {
            x: buf,
            rows,
            ld: if by_columns { rows } else { k },
            by_columns,
        }
    }
}

/// A block of rows of `x`: value `t` of row `r` is `x[r * ld + t]`, or
/// `x[t * ld + r]` when stored by columns.
#[derive(Clone, Copy)]
struct XView<'a> {
    x: &'a [f32],
    rows: usize,
    ld: usize,
    by_columns: bool,
}

impl<'a> XView<'a> {
    /// The view from row `i` on.
    fn from_row(self, i: usize) -> XView<'a> {
        let start = if self.by_columns { i } else { i * self.ld };
        XView {
            x: &self.x[start..],
            rows: self.rows - i,
            ..self
        }
    }
}

/// The output of [`PackedWeights::matmul`], shared by tasks that write
/// disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used for disjoint writes inside one parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `tile[r * nr + c] = x_r · w_c` for `rows` (at most the kernel's) rows of
/// `x` and one panel of `nr` (the kernel's width) columns.
fn kernel(isa: Isa, x: XView, rows: usize, k: usize, panel: &[f32], tile: &mut [f32; TILE]) {
    let last = match x.by_columns {
        true => (k - 1) * x.ld + rows - 1,
        false => (rows - 1) * x.ld + k - 1,
    };
    assert!(rows <= isa.rows() && rows <= x.rows && last < x.x.len() && panel.len() >= k * isa.cols());
    let (ld, cols) = (x.ld, x.by_columns);
    let x = x.x;
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_rows {
            ($f:ident, $($r:literal)+) => {
                // SAFETY: `isa` was detected on this CPU; the slices hold
                // rows x k and k x width values (asserted above).
                match (rows, cols) {
                    $(($r, false) => unsafe { x86::$f::<$r, false>(x, ld, k, panel, tile) },)+
                    $(($r, true) => unsafe { x86::$f::<$r, true>(x, ld, k, panel, tile) },)+
                    _ => unreachable!("more rows than the kernel's"),
                }
            };
        }
        match isa {
            Isa::Avx512 => return by_rows!(avx512, 1 2 3 4 5 6 7 8 9 10 11 12),
            Isa::Avx2 => return by_rows!(avx2, 1 2 3 4 5 6),
            Isa::Portable => {}
        }
    }
    // Portable: the same sums, a row of 16 lanes at a time (LLVM vectorises it).
    for r in 0..rows {
        let mut acc = [0.0f32; 16];
        for t in 0..k {
            let a = if cols { x[t * ld + r] } else { x[r * ld + t] };
            for c in 0..16 {
                acc[c] += a * panel[t * 16 + c];
            }
        }
        tile[r * 16..r * 16 + 16].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::TILE;
    use std::arch::x86_64::*;

    /// `R` rows x 16 columns in ymm registers; per step of `k`, two weight
    /// loads feed `2 R` fused multiply-adds.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2<const R: usize, const BY_COLUMNS: bool>(
        x: &[f32],
        ld: usize,
        k: usize,
        panel: &[f32],
        tile: &mut [f32; TILE],
    ) {
        let (x, w) = (x.as_ptr(), panel.as_ptr());
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        for t in 0..k {
            let (w0, w1) = (_mm256_loadu_ps(w.add(t * 16)), _mm256_loadu_ps(w.add(t * 16 + 8)));
            for r in 0..R {
                let a = _mm256_broadcast_ss(&*x.add(if BY_COLUMNS { t * ld + r } else { r * ld + t }));
                lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * 16), lo[r]);
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * 16 + 8), hi[r]);
        }
    }

    /// `R` rows x 32 columns in zmm registers; per step of `k`, two weight
    /// loads feed `2 R` fused multiply-adds.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512<const R: usize, const BY_COLUMNS: bool>(
        x: &[f32],
        ld: usize,
        k: usize,
        panel: &[f32],
        tile: &mut [f32; TILE],
    ) {
        let (x, w) = (x.as_ptr(), panel.as_ptr());
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for t in 0..k {
            let (w0, w1) = (_mm512_loadu_ps(w.add(t * 32)), _mm512_loadu_ps(w.add(t * 32 + 16)));
            for r in 0..R {
                let a = _mm512_set1_ps(*x.add(if BY_COLUMNS { t * ld + r } else { r * ld + t }));
                lo[r] = _mm512_fmadd_ps(a, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(a, w1, hi[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * 32), lo[r]);
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * 32 + 16), hi[r]);
        }
    }
}

/// The packed product as a candle op (no backward: packed weights are
/// never trained).
struct Packed(Arc<PackedWeights>);

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("packed-linear: f32 only");
        };
        let (m, k) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("packed-linear: contiguous x only");
        };
        if k != self.0.k {
            candle_core::bail!("packed-linear: x has {k} columns, the weight {}", self.0.k);
        }
        Ok((CpuStorage::F32(self.0.matmul(&x[a..b], m)), Shape::from((m, self.0.n))))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Products in f64, the reference.
    fn reference(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                y[i * n + j] = (s + b.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        y
    }

    /// Every kernel this CPU can run.
    fn isas() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .skip_while(|i| *i != best)
            .filter(|i| *i != Isa::Avx2 || std::arch::is_x86_feature_detected!("fma"))
            .collect()
    }

    #[test]
    fn narrow_products_take_the_16_column_kernel() {
        let best = Isa::detect();
        let narrow = Isa::for_columns(16);
        match best {
            Isa::Avx512 if std::arch::is_x86_feature_detected!("fma") => assert_eq!(narrow, Isa::Avx2),
            _ => assert_eq!(narrow, best),
        }
        assert_eq!(Isa::for_columns(17), best);
        // And packs as such: 8 columns in one 16-wide panel, same product.
        let (n, k, m) = (8, 40, 13);
        let (w, x) = (data(n * k, 3), data(m * k, 4));
        let packed = PackedWeights::pack(&w, None, n, k);
        assert_eq!(packed.isa, narrow);
        let want = PackedWeights::pack_for(best, &w, None, n, k).matmul(&x, m);
        let got = packed.matmul(&x, m);
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5));
    }

    /// `len` values in [-1, 1) from a seeded LCG (test inputs).
    pub(crate) fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn packed_products_equal_a_f64_product_at_every_shape_edge() {
        // Rows across the kernels' 6 / 12 rows and the 96-row block; columns
        // inside one panel, at and past panel edges; k from 1 up.
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 15),
            (2, 16, 16),
            (3, 17, 17),
            (6, 33, 64),
            (7, 100, 5),
            (13, 300, 577),
            (97, 48, 40),
            (200, 130, 33),
            (500, 40, 24),
        ] {
            let (x, w, b) = (data(m * k, 1 + m as u64), data(n * k, 7 + n as u64), data(n, 3));
            for (isa, bias) in isas().into_iter().flat_map(|i| [(i, None), (i, Some(b.clone()))]) {
                let packed = PackedWeights::pack_for(isa, &w, bias.clone(), n, k);
                let got = packed.matmul(&x, m);
                // The same rows written by columns, a block at a time.
                let by_columns = packed.matmul_with_columns(m, &|i0, i1, block| {
                    for (r, i) in (i0..i1).enumerate() {
                        for t in 0..k {
                            block[t * (i1 - i0) + r] = x[i * k + t];
                        }
                    }
                });
                assert_eq!(got, by_columns, "{isa:?} m{m} n{n} k{k}");
                let want = reference(&x, &w, bias.as_deref(), m, n, k);
                let tol = 2e-6 * (k as f32).sqrt().max(1.0) * 4.0;
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol,
                        "{isa:?} m{m} n{n} k{k} bias {} at {idx}: {g} vs {e}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn the_layer_equals_candle_linear() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(data(48 * 40, 3), &dev)?.reshape((48, 40))?;
        let b = Tensor::new(data(48, 5), &dev)?;
        let theirs = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        for (ours, biased) in [
            (Linear::new(w.clone(), Some(b.clone())), true),
            (Linear::new(w.clone(), None), false),
        ] {
            assert!(
                ours.packed.is_some() && ours.plain.is_none(),
                "CPU f32 weights are packed, and only packed"
            );
            // 3-d and 2-d inputs, and a transposed (non-contiguous) one.
            for x in [
                Tensor::new(data(3 * 40, 9), &dev)?.reshape((1, 3, 40))?,
                Tensor::new(data(180 * 40, 11), &dev)?.reshape((2, 90, 40))?,
                Tensor::new(data(40 * 2, 13), &dev)?.reshape((40, 2))?.t()?,
            ] {
                let e = match biased {
                    true => theirs.forward(&x)?,
                    false => x.broadcast_matmul(&w.t()?)?,
                };
                let a = ours.forward(&x)?;
                assert_eq!(a.dims(), e.dims());
                let diff = (a - e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn other_dtypes_and_gradients_stay_on_candle() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(data(8 * 4, 1), &dev)?.reshape((8, 4))?;
        assert!(Linear::new(w.to_dtype(DType::F16)?, None).packed.is_none());
        let var = candle_core::Var::from_tensor(&w)?;
        assert!(Linear::new(var.as_tensor().clone(), None).packed.is_none());
        // An f32 layer given f16 input gives candle's error, not a wrong result.
        let l = Linear::new(w.clone(), Some(Tensor::new(data(8, 2), &dev)?));
        assert!(l.forward(&Tensor::ones((1, 4), DType::F16, &dev)?).is_err());
        // An input that tracks gradients goes through the unpacked layer,
        // with the same result and a gradient for the input.
        let x = candle_core::Var::from_tensor(&Tensor::new(data(3 * 4, 5), &dev)?.reshape((3, 4))?)?;
        let (y, plain) = (l.forward(x.as_tensor())?, l.forward(&x.as_tensor().detach())?);
        let diff = (&y - plain)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let grads = y.sum_all()?.backward()?;
        assert_eq!(grads.get(x.as_tensor()).map(|g| g.dims().to_vec()), Some(vec![3, 4]));
        let (uw, _) = l.packed.as_ref().expect("packed").unpack(&dev)?;
        assert_eq!(uw.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
