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
//! The same panels also serve the product with the weight on the left,
//! `W x` ([`PackedWeights::left_product`], a tile of 8 weight rows x 32
//! columns of `x`, `k` in L2-sized passes), which small convolutions use.
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

    /// `y = W x (+ b)`, the product with the weight on the left, for `x`
    /// as `k` rows of `cols` values at row stride `ld` (a multiple of
    /// [`LEFT_COLS`]; the values past `cols` up to it are read, and their
    /// results dropped), written as `n` rows of `cols` values at row stride
    /// `ldy` from `y`. A small convolution's im2col block stored by
    /// columns is such an `x` and its result rows are output channels: the
    /// block lands in NCHW without a transposition, and the tiles span
    /// pixels, so 3- to 16-channel convolutions fill their vectors.
    ///
    /// # Safety
    /// `y` must be valid for writes of `cols` values at each of `y + c *
    /// ldy`, `c < n`, that nothing else reads or writes meanwhile.
    pub unsafe fn left_product(&self, x: &[f32], ld: usize, cols: usize, y: *mut f32, ldy: usize) {
        unsafe { self.left_product_with(Isa::detect(), x, ld, cols, y, ldy) }
    }

    unsafe fn left_product_with(&self, isa: Isa, x: &[f32], ld: usize, cols: usize, y: *mut f32, ldy: usize) {
        let k = self.k;
        assert!(
            ld % LEFT_COLS == 0 && cols <= ld && (k == 0 || x.len() >= (k - 1) * ld + cols.next_multiple_of(LEFT_COLS)),
            "left product: x is not k rows of ld >= cols values"
        );
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: the kernels' ISAs were detected on this CPU.
            Isa::Avx512 => return unsafe { self.left_tiles::<8, 32>(x, ld, cols, y, ldy, x86::left_avx512) },
            Isa::Avx2 => return unsafe { self.left_tiles::<4, 16>(x, ld, cols, y, ldy, x86::left_avx2) },
            Isa::Portable => {}
        }
        let _ = isa;
        unsafe { self.left_tiles::<4, 16>(x, ld, cols, y, ldy, left_portable) }
    }

    /// Tiles of `MR` weight rows x `NP` columns of `x`, each by `tile`.
    unsafe fn left_tiles<const MR: usize, const NP: usize>(
        &self,
        x: &[f32],
        ld: usize,
        cols: usize,
        y: *mut f32,
        ldy: usize,
        tile: LeftTile,
    ) {
        let (n, k, nr) = (self.n, self.k, self.isa.cols());
        // A group of MR rows lies in one panel (MR divides every panel width).
        debug_assert!(nr % MR == 0 && LEFT_COLS % NP == 0);
        let mut acc = [0.0f32; LEFT_TILE];
        // `k` in passes of LEFT_KC: the first writes `y` (with the bias),
        // the others add to it.
        for k0 in (0..k.max(1)).step_by(LEFT_KC) {
            let kc = LEFT_KC.min(k - k0);
            for c0 in (0..n).step_by(MR) {
                let panel = match k {
                    0 => &[][..],
                    _ => &self.panels[(c0 / nr) * k * nr + k0 * nr + c0 % nr..],
                };
                for p0 in (0..cols).step_by(NP) {
                    // SAFETY: the panel holds kc rows of nr from column c0 %
                    // nr, x kc rows of ld from row k0 and column p0 + NP <= ld
                    // (asserted above).
                    unsafe { tile(panel.as_ptr(), nr, kc, x.as_ptr().add(k0 * ld + p0), ld, &mut acc) };
                    for c in 0..MR.min(n - c0) {
                        let b = self.bias.as_ref().map_or(0.0, |b| b[c0 + c]);
                        let dst = unsafe { y.add((c0 + c) * ldy + p0) };
                        for (l, v) in acc[c * NP..c * NP + NP.min(cols - p0)].iter().enumerate() {
                            match k0 {
                                0 => unsafe { *dst.add(l) = v + b },
                                _ => unsafe { *dst.add(l) += v },
                            }
                        }
                    }
                }
            }
        }
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
            // Many rows: blocks of rows in parallel, each against every
            // panel. As many blocks as would hold MC rows each, rounded up
            // to a multiple of the threads, with the kernel's row groups
            // dealt out evenly (a block holds at most one row group more
            // than another, so about MC rows): 400 rows (CLIP ViT-B/32 at batch 8) in
            // blocks of 96 left one core 208 rows and the other 192, and
            // their products ran 4-8 % slower than with 204 and 196.
            let mr = self.isa.rows();
            let groups = m.div_ceil(mr);
            let blocks = m.div_ceil(MC * threads).max(1) * threads;
            let out = OutPtr(y.as_mut_ptr());
            (0..blocks).into_par_iter().for_each(|b| {
                let (i0, i1) = ((b * groups / blocks) * mr, ((b + 1) * groups / blocks * mr).min(m));
                if i0 >= i1 {
                    return;
                }
                let mut buf = Vec::new();
                let rows = x.rows(i0, i1, k, &mut buf);
                // SAFETY: blocks write disjoint rows i0..i1 of `y`, which
                // outlives the parallel loop.
                unsafe { self.block(rows, 0, panels_n, out.at(i0 * n)) };
            });
            // SAFETY: the blocks cover rows 0..m (group ranges b * groups /
            // blocks tile 0..groups), every column of each.
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
                    let dst = out.0.add(i * n + p * nr);
                    if cols == nr {
                        // A whole panel: the kernel stores its sums (with
                        // the bias) straight into y.
                        kernel(isa, x.from_row(i), rows, k, panel, Dst { y: dst, ld: n, bias });
                    } else {
                        // The last, narrower panel: through the tile.
                        kernel(
                            isa,
                            x.from_row(i),
                            rows,
                            k,
                            panel,
                            Dst {
                                y: tile.as_mut_ptr(),
                                ld: nr,
                                bias: None,
                            },
                        );
                        for r in 0..rows {
                            let (dst, t) = (dst.add(r * n), &tile[r * nr..r * nr + cols]);
                            match bias {
                                Some(b) => (0..cols).for_each(|c| *dst.add(c) = t[c] + b[c]),
                                None => std::ptr::copy_nonoverlapping(t.as_ptr(), dst, cols),
                            }
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
}

impl<'a> Rows<'a> {
    /// Rows `i0..i1`, borrowed or written into `buf`.
    fn rows<'b>(self, i0: usize, i1: usize, k: usize, buf: &'b mut Vec<f32>) -> XView<'b>
    where
        'a: 'b,
    {
        let rows = i1 - i0;
        let fill = match self {
            Rows::Given(x) => {
                return XView {
                    x: &x[i0 * k..i1 * k],
                    rows,
                    ld: k,
                }
            }
            Rows::Filled(fill) => fill,
        };
        buf.clear();
        buf.resize(rows * k, 0.0);
        fill(i0, i1, buf);
        XView { x: buf, rows, ld: k }
    }
}

/// A block of rows of `x`: value `t` of row `r` is `x[r * ld + t]`.
#[derive(Clone, Copy)]
struct XView<'a> {
    x: &'a [f32],
    rows: usize,
    ld: usize,
}

impl<'a> XView<'a> {
    /// The view from row `i` on.
    fn from_row(self, i: usize) -> XView<'a> {
        XView {
            x: &self.x[i * self.ld..],
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

impl OutPtr {
    /// The output from value `offset` on.
    ///
    /// # Safety
    /// `offset` lies within the output.
    unsafe fn at(self, offset: usize) -> OutPtr {
        OutPtr(unsafe { self.0.add(offset) })
    }
}

/// Columns of `x` per tile of [`PackedWeights::left_product`], at most.
pub const LEFT_COLS: usize = 32;
/// Values of `k` per pass of the left product: a tile's weight rows stay in
/// L1 and the pass's `LEFT_KC x cols` block of `x` in L2 while every group
/// of output channels goes over it (a 1280-channel 3 x 3 convolution's
/// whole k = 11,520 did not, and ran at half speed).
pub const LEFT_KC: usize = 256;
/// The widest left tile: 8 weight rows x 32 columns.
const LEFT_TILE: usize = 8 * 32;

/// `acc[c * NP + l] = Σ_t w[t * nr + c] x[t * ld + l]` for the kernel's
/// `MR x NP` tile, from a panel column `w` and a column `x`.
type LeftTile = unsafe fn(w: *const f32, nr: usize, k: usize, x: *const f32, ld: usize, acc: &mut [f32; LEFT_TILE]);

/// The left tile in plain Rust: 4 weight rows x 16 columns.
unsafe fn left_portable(w: *const f32, nr: usize, k: usize, x: *const f32, ld: usize, acc: &mut [f32; LEFT_TILE]) {
    let mut tile = [[0.0f32; 16]; 4];
    for t in 0..k {
        // SAFETY: the caller's bounds (see `left_tiles`).
        let (wt, xt) = unsafe {
            (
                &*(w.add(t * nr) as *const [f32; 4]),
                &*(x.add(t * ld) as *const [f32; 16]),
            )
        };
        for (row, &a) in tile.iter_mut().zip(wt) {
            for (o, &v) in row.iter_mut().zip(xt) {
                *o += a * v;
            }
        }
    }
    for (c, row) in tile.iter().enumerate() {
        acc[c * 16..c * 16 + 16].copy_from_slice(row);
    }
}

/// Where a row kernel stores its tile: row `r`'s `nr` sums at `y + r * ld`,
/// plus `bias` (`nr` values) if given.
#[derive(Clone, Copy)]
struct Dst<'a> {
    y: *mut f32,
    ld: usize,
    bias: Option<&'a [f32]>,
}

impl Dst<'_> {
    fn bias_ptr(&self) -> *const f32 {
        self.bias.map_or(std::ptr::null(), <[f32]>::as_ptr)
    }
}

/// `y[r * ld + c] = x_r · w_c (+ bias_c)` for `rows` (at most the kernel's)
/// rows of `x` and one panel of `nr` (the kernel's width) columns.
///
/// # Safety
/// `dst.y` must be valid for writes of `nr` values at each of `dst.y + r *
/// dst.ld`, `r < rows`, and a bias must hold `nr` values.
unsafe fn kernel(isa: Isa, x: XView, rows: usize, k: usize, panel: &[f32], dst: Dst) {
    let last = (rows - 1) * x.ld + k - 1;
    assert!(rows <= isa.rows() && rows <= x.rows && last < x.x.len() && panel.len() >= k * isa.cols());
    assert!(dst.bias.is_none_or(|b| b.len() >= isa.cols()));
    let (ld, x) = (x.ld, x.x);
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_rows {
            ($f:ident, $($r:literal)+) => {
                // SAFETY: `isa` was detected on this CPU; the slices hold
                // rows x k and k x width values (asserted above), `dst` is
                // the caller's.
                match rows {
                    $($r => unsafe { x86::$f::<$r>(x, ld, k, panel, dst.y, dst.ld, dst.bias_ptr()) },)+
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
        let mut acc = dst.bias.map_or([0.0f32; 16], |b| b[..16].try_into().unwrap());
        for t in 0..k {
            let a = x[r * ld + t];
            for c in 0..16 {
                acc[c] += a * panel[t * 16 + c];
            }
        }
        // SAFETY: the caller's (see above).
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst.y.add(r * dst.ld), 16) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LEFT_TILE;
    use std::arch::x86_64::*;

    /// `R` rows x 16 columns in ymm registers, starting from the bias
    /// (`b`, or zero if null); per step of `k`, two weight loads feed `2 R`
    /// fused multiply-adds; row `r` is stored at `y + r * ldy`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2<const R: usize>(
        x: &[f32],
        ld: usize,
        k: usize,
        panel: &[f32],
        y: *mut f32,
        ldy: usize,
        b: *const f32,
    ) {
        let (x, w) = (x.as_ptr(), panel.as_ptr());
        let (b0, b1) = match b.is_null() {
            true => (_mm256_setzero_ps(), _mm256_setzero_ps()),
            false => (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))),
        };
        let mut lo = [b0; R];
        let mut hi = [b1; R];
        for t in 0..k {
            let (w0, w1) = (_mm256_loadu_ps(w.add(t * 16)), _mm256_loadu_ps(w.add(t * 16 + 8)));
            for r in 0..R {
                let a = _mm256_broadcast_ss(&*x.add(r * ld + t));
                lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(y.add(r * ldy), lo[r]);
            _mm256_storeu_ps(y.add(r * ldy + 8), hi[r]);
        }
    }

    /// `R` rows x 32 columns in zmm registers, as `avx2` (the bias first,
    /// two weight loads feeding `2 R` fused multiply-adds per step of `k`).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512<const R: usize>(
        x: &[f32],
        ld: usize,
        k: usize,
        panel: &[f32],
        y: *mut f32,
        ldy: usize,
        b: *const f32,
    ) {
        let (x, w) = (x.as_ptr(), panel.as_ptr());
        let (b0, b1) = match b.is_null() {
            true => (_mm512_setzero_ps(), _mm512_setzero_ps()),
            false => (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16))),
        };
        let mut lo = [b0; R];
        let mut hi = [b1; R];
        for t in 0..k {
            let (w0, w1) = (_mm512_loadu_ps(w.add(t * 32)), _mm512_loadu_ps(w.add(t * 32 + 16)));
            for r in 0..R {
                let a = _mm512_set1_ps(*x.add(r * ld + t));
                lo[r] = _mm512_fmadd_ps(a, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(a, w1, hi[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(y.add(r * ldy), lo[r]);
            _mm512_storeu_ps(y.add(r * ldy + 16), hi[r]);
        }
    }

    /// The left tile (see `left_tiles`): 8 weight rows x 32 columns in 16
    /// zmm registers; per step of `k`, two loads of `x` and 8 broadcast
    /// weights feed 16 fused multiply-adds.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn left_avx512(
        w: *const f32,
        nr: usize,
        k: usize,
        x: *const f32,
        ld: usize,
        acc: &mut [f32; LEFT_TILE],
    ) {
        let mut lo = [_mm512_setzero_ps(); 8];
        let mut hi = [_mm512_setzero_ps(); 8];
        for t in 0..k {
            let (x0, x1) = (_mm512_loadu_ps(x.add(t * ld)), _mm512_loadu_ps(x.add(t * ld + 16)));
            for c in 0..8 {
                let a = _mm512_set1_ps(*w.add(t * nr + c));
                lo[c] = _mm512_fmadd_ps(a, x0, lo[c]);
                hi[c] = _mm512_fmadd_ps(a, x1, hi[c]);
            }
        }
        for c in 0..8 {
            _mm512_storeu_ps(acc.as_mut_ptr().add(c * 32), lo[c]);
            _mm512_storeu_ps(acc.as_mut_ptr().add(c * 32 + 16), hi[c]);
        }
    }

    /// The left tile on AVX2: 4 weight rows x 16 columns in 8 ymm registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn left_avx2(w: *const f32, nr: usize, k: usize, x: *const f32, ld: usize, acc: &mut [f32; LEFT_TILE]) {
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        for t in 0..k {
            let (x0, x1) = (_mm256_loadu_ps(x.add(t * ld)), _mm256_loadu_ps(x.add(t * ld + 8)));
            for c in 0..4 {
                let a = _mm256_broadcast_ss(&*w.add(t * nr + c));
                lo[c] = _mm256_fmadd_ps(a, x0, lo[c]);
                hi[c] = _mm256_fmadd_ps(a, x1, hi[c]);
            }
        }
        for c in 0..4 {
            _mm256_storeu_ps(acc.as_mut_ptr().add(c * 16), lo[c]);
            _mm256_storeu_ps(acc.as_mut_ptr().add(c * 16 + 8), hi[c]);
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
        // Rows across the kernels' 6 / 12 rows, the 96-row block and the
        // row-block split (a last, partial row group); columns
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
            (401, 33, 9),
            (500, 40, 24),
            (1001, 17, 3),
        ] {
            let (x, w, b) = (data(m * k, 1 + m as u64), data(n * k, 7 + n as u64), data(n, 3));
            for (isa, bias) in isas().into_iter().flat_map(|i| [(i, None), (i, Some(b.clone()))]) {
                let packed = PackedWeights::pack_for(isa, &w, bias.clone(), n, k);
                let got = packed.matmul(&x, m);
                let want = reference(&x, &w, bias.as_deref(), m, n, k);
                let tol = 2e-6 * (k as f32).sqrt().max(1.0) * 4.0;
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol,
                        "{isa:?} m{m} n{n} k{k} bias {} at {idx}: {g} vs {e}",
                        bias.is_some()
                    );
                }
                // The left product of xᵀ (k rows of m, padded to LEFT_COLS)
                // with each left kernel this CPU runs: yᵀ, n rows of m.
                let ld = m.next_multiple_of(LEFT_COLS);
                let mut xt = vec![0.0f32; k * ld];
                for (i, row) in x.chunks_exact(k).enumerate() {
                    row.iter().enumerate().for_each(|(t, &v)| xt[t * ld + i] = v);
                }
                for left in isas() {
                    let mut yt = vec![f32::NAN; n * m];
                    // SAFETY: yt holds n rows of m.
                    unsafe { packed.left_product_with(left, &xt, ld, m, yt.as_mut_ptr(), m) };
                    for (idx, e) in want.iter().enumerate() {
                        let g = yt[(idx % n) * m + idx / n];
                        assert!(
                            (g - e).abs() <= tol,
                            "left {left:?} on {isa:?} m{m} n{n} k{k} bias {} at {idx}: {g} vs {e}",
                            bias.is_some()
                        );
                    }
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
