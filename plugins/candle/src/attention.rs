//! Scaled dot-product attention, `softmax(q kᵀ · scale + bias) v` per
//! batch and head, in one op on the CPU.
//!
//! Composed from candle's ops, attention is a dozen passes, each with its
//! own allocation: the heads split out of `[b, s, heads * d]` by three
//! copies, kᵀ made contiguous, q scaled, the scores by candle's matmul (the
//! `gemm` crate packs both operands on every call), the mask added, the
//! softmax, the second matmul, and a last copy to merge the heads again. On
//! SD's UNet at 64 px, a tiny CLIP or one sentence through MiniLM, those
//! passes over small tensors cost more than the arithmetic. Here a CPU f32
//! call reads q, k and v where they are (any strides, so the head split is
//! a view), and each task — one batch row, one head, a block of query rows
//! — packs its head's kᵀ and v once, computes a block of scores in
//! registers (4 query rows x 64 keys on AVX-512, x 16 on AVX2), adds the
//! bias, takes the softmax, and multiplies by v before normalising (the
//! division moves to the `d` outputs), writing its rows straight into
//! `[b, sq, heads, d]`. A task of at most 4 query rows (a decoding step)
//! reads k and v where they lie instead of packing them: a copy of the
//! whole cache to serve one row cost more than the row's arithmetic.
//! The softmax uses `activation`'s vectorised `exp`; a fully masked row
//! gives NaN, as torch does.
//!
//! Other devices and dtypes, heads wider than 256, graphs that track
//! gradients, and every call when `CANDLE_ATTENTION=0` is set (for A/B
//! timing), run the same formula on candle's ops.

use crate::activation::{exp, reduce};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Query rows per task, at most (a multiple of [`ROWS`]): each task packs
/// its head's kᵀ and v once, so long blocks spread that copy thin.
const BLOCK: usize = 256;
/// The widest head the fused op takes: a task holds kᵀ (`d x sk`) while
/// it streams past every 4 query rows, which must stay in L2 (SD's VAE
/// attends with one 512-wide head over 4,096 pixels: candle's matmul).
const MAX_D: usize = 256;
/// Query rows the score and output kernels hold in registers at once.
const ROWS: usize = 4;
/// Multiply-adds below which a call stays on the calling thread.
const TASK_WORK: usize = 1 << 16;

/// `softmax(q kᵀ · scale + bias) v` for q `[b, heads, sq, d]`, k and v
/// `[b, kv_heads, sk, d]` and a bias broadcastable to `[b, heads, sq, sk]`
/// (an additive mask: 0 or -inf / a large negative number). With fewer
/// key / value heads than query heads (grouped-query attention), kv head
/// `j` serves query heads `j * g .. (j + 1) * g`, `g = heads / kv_heads`,
/// as transformers' `repeat_kv` has it. Returns
/// `[b, heads, sq, d]` in v's dtype, laid out as `[b, sq, heads, d]` on the
/// CPU path, so `transpose(1, 2)` and a reshape merge the heads for free.
/// Softmax in f32 whatever the dtype, as the references do.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    if fused(q, k, v, bias) {
        let (b, h, sq, _) = q.dims4()?;
        let sk = k.dim(2)?;
        let bias = bias.map(|m| m.broadcast_as((b, h, sq, sk))).transpose()?;
        let op = Attention {
            scale: scale as f32,
            bias: bias.as_ref(),
        };
        return q.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2);
    }
    let (k, v) = (repeat_kv(k, q.dim(1)?)?, repeat_kv(v, q.dim(1)?)?);
    // q scaled before the product, as CLIP and diffusers do: in f16 the
    // unscaled q kᵀ of a large model can overflow.
    let mut w = (q.contiguous()? * scale)?.matmul(&k.t()?.contiguous()?)?;
    if let Some(m) = bias {
        w = w.broadcast_add(m)?;
    }
    let p = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    p.matmul(&v.contiguous()?)
}

/// Key / value heads repeated to `heads` (each `heads / kv_heads` times).
fn repeat_kv(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, kv, s, d) = x.dims4()?;
    match heads / kv.max(1) {
        1 => Ok(x.clone()),
        g => x.unsqueeze(2)?.expand((b, kv, g, s, d))?.reshape((b, heads, s, d)),
    }
}

/// Whether [`attend`] runs the fused CPU op for these inputs: CPU f32
/// tensors that track no gradient, matching `[b, heads, s, d]` shapes with
/// `d <= 256`, the last dimension of q, k and v contiguous.
pub fn fused(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> bool {
    let host = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !t.track_op();
    let rows = |t: &Tensor| t.rank() == 4 && (t.dim(3).unwrap_or(0) <= 1 || t.stride()[3] == 1);
    let (Ok((b, h, sq, d)), Ok((kb, kh, sk, kd))) = (q.dims4(), k.dims4()) else {
        return false;
    };
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("CANDLE_ATTENTION").is_ok_and(|v| v == "0")) {
        return false;
    }
    [q, k, v].into_iter().all(|t| host(t) && rows(t))
        && (kb, kd) == (b, d)
        && kh > 0
        && h % kh == 0
        && d <= MAX_D
        && v.dims() == [b, kh, sk, d]
        && bias.is_none_or(|m| host(m) && m.broadcast_as((b, h, sq, sk)).is_ok())
}

struct Attention<'a> {
    scale: f32,
    /// Broadcast to `[b, heads, sq, sk]` (stride 0 where it repeats).
    bias: Option<&'a Tensor>,
}

/// A `[b, heads, s, d]` operand: values and the element strides of its
/// first three dimensions (the last is 1).
#[derive(Clone, Copy)]
struct Operand<'a> {
    x: &'a [f32],
    start: usize,
    stride: [usize; 3],
}

impl<'a> Operand<'a> {
    fn of(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("attention-f32: f32 only");
        };
        let st = l.stride();
        Ok(Operand {
            x,
            start: l.start_offset(),
            stride: [st[0], st[1], st[2]],
        })
    }

    /// Row `i` of batch `b`, head `h`: `d` values.
    #[inline(always)]
    fn row(&self, b: usize, h: usize, i: usize, d: usize) -> &'a [f32] {
        let at = self.start + b * self.stride[0] + h * self.stride[1] + i * self.stride[2];
        &self.x[at..at + d]
    }
}

/// One task's shape and inputs.
#[derive(Clone, Copy)]
struct Head<'a> {
    q: Operand<'a>,
    k: Operand<'a>,
    v: Operand<'a>,
    /// Values, start and strides of the broadcast bias.
    bias: Option<(&'a [f32], usize, [usize; 4])>,
    scale: f32,
    sq: usize,
    sk: usize,
    d: usize,
    heads: usize,
    /// Query heads per key / value head.
    group: usize,
}

impl CustomOp3 for Attention<'_> {
    fn name(&self) -> &'static str {
        "attention-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, heads, sq, d) = l1.shape().dims4()?;
        let (kv_heads, sk) = (l2.shape().dims()[1], l2.shape().dims()[2]);
        let guard = self.bias.map(|m| m.storage_and_layout());
        let bias = match &guard {
            Some((storage, layout)) => {
                let Storage::Cpu(CpuStorage::F32(m)) = &**storage else {
                    candle_core::bail!("attention-f32: the bias is not CPU f32");
                };
                let st = layout.stride();
                Some((m.as_slice(), layout.start_offset(), [st[0], st[1], st[2], st[3]]))
            }
            None => None,
        };
        let head = Head {
            q: Operand::of(s1, l1)?,
            k: Operand::of(s2, l2)?,
            v: Operand::of(s3, l3)?,
            bias,
            scale: self.scale,
            sq,
            sk,
            d,
            heads,
            group: heads / kv_heads,
        };
        let shape = Shape::from((b, sq, heads, d));
        let len = b * sq * heads * d;
        if len == 0 {
            return Ok((CpuStorage::F32(Vec::new()), shape));
        }
        // Every value is written once by the tasks below: no zero-fill.
        let mut out = Vec::<f32>::with_capacity(len);
        // Blocks of query rows: enough tasks to keep the pool busy when
        // there are few (batch, head) pairs, whole blocks otherwise.
        let threads = rayon::current_num_threads();
        let per_head = (2 * threads).div_ceil(b * heads).clamp(1, sq.div_ceil(ROWS));
        let block = sq.div_ceil(per_head).next_multiple_of(ROWS).min(BLOCK);
        let blocks = sq.div_ceil(block);
        let tasks = b * heads * blocks;
        let dst = Out(out.as_mut_ptr());
        let task = |t: usize| {
            let (bh, blk) = (t / blocks, t % blocks);
            let (i0, i1) = (blk * block, (blk * block + block).min(sq));
            // SAFETY: each task writes rows i0..i1 of its own (batch, head)
            // into `out`, which outlives the loop; no two tasks share one.
            unsafe { run(&head, bh / heads, bh % heads, i0, i1, dst) };
        };
        if 2 * b * heads * sq * sk * d < TASK_WORK || tasks == 1 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
        // SAFETY: the tasks cover every (batch, head, query row) and each
        // writes all `d` values of its rows.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), shape))
    }
}

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint rows (see `cpu_fwd`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Query rows `i0..i1` of batch `b`, head `h`, with the widest kernel this
/// CPU runs.
unsafe fn run(head: &Head, b: usize, h: usize, i0: usize, i1: usize, out: Out) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { run_avx512(head, b, h, i0, i1, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { run_avx2(head, b, h, i0, i1, out) };
        }
    }
    unsafe { block::<16, 16, false>(head, b, h, i0, i1, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(head: &Head, b: usize, h: usize, i0: usize, i1: usize, out: Out) {
    unsafe { block::<64, 64, true>(head, b, h, i0, i1, out) }
}

// 16 keys per score tile: with 32, the 4 rows' accumulators alone take
// all 16 ymm registers and the tile spills (a 64-wide head took 4x as long
// on an AVX2-only EPYC).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(head: &Head, b: usize, h: usize, i0: usize, i1: usize, out: Out) {
    unsafe { block::<16, 16, true>(head, b, h, i0, i1, out) }
}

/// Lanes of the output kernel's narrowest tile (one zmm); v's rows are
/// padded to a multiple of it.
const LANES: usize = 16;

/// `a * b + c`, in one rounding (an FMA instruction) where `FMA` says the
/// calling kernel's CPU has them; Rust never fuses `a * b + c` itself, and
/// without the instruction `mul_add` is a library call.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The task: `W` keys per score tile (`ROWS x W` accumulators), output
/// tiles up to `V` of the head's `d` values wide (`ROWS x V` accumulators),
/// multiply-adds fused where `FMA`.
#[inline(always)]
unsafe fn block<const W: usize, const V: usize, const FMA: bool>(
    head: &Head,
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    out: Out,
) {
    let Head {
        q,
        k,
        v,
        sq,
        sk,
        d,
        heads,
        group,
        ..
    } = *head;
    let hk = h / group;
    if d <= NARROW_D && i1 - i0 >= QL / 2 {
        return match d {
            0..=4 => unsafe { narrow::<4, FMA>(head, b, h, i0, i1, out) },
            5..=8 => unsafe { narrow::<8, FMA>(head, b, h, i0, i1, out) },
            _ => unsafe { narrow::<16, FMA>(head, b, h, i0, i1, out) },
        };
    }
    if i1 - i0 <= ROWS {
        return unsafe { few_rows::<FMA>(head, b, h, i0, i1, out) };
    }
    // kᵀ as `d` rows of `skp` keys (zero past sk), and v as `sk` rows of
    // `dp` values (zero past d), so every tile loads whole vectors.
    let (skp, dp) = (sk.next_multiple_of(W), d.next_multiple_of(LANES));
    // Transposed 16 keys at a time: their rows stay in L1 while each of
    // the `d` destination rows gets 16 adjacent values. Key by key, every
    // key's `d` values went to `d` rows `skp` apart, a quarter of a BLIP-
    // base attention's time.
    let mut kt = vec![0.0f32; d * skp];
    for j0 in (0..sk).step_by(16) {
        let n = (sk - j0).min(16);
        let mut keys: [&[f32]; 16] = [&[]; 16];
        for (slot, j) in keys.iter_mut().zip(j0..j0 + n) {
            *slot = k.row(b, hk, j, d);
        }
        for t in 0..d {
            for (o, key) in kt[t * skp + j0..].iter_mut().zip(&keys[..n]) {
                *o = key[t];
            }
        }
    }
    let mut vp = vec![0.0f32; sk * dp];
    for (j, row) in vp.chunks_exact_mut(dp).enumerate() {
        row[..d].copy_from_slice(v.row(b, hk, j, d));
    }
    let mut qs = vec![0.0f32; ROWS * d];
    let mut s = vec![0.0f32; ROWS * skp];
    let mut i = i0;
    while i < i1 {
        let rows = (i1 - i).min(ROWS);
        // The rows' queries, scaled (rows past i1 stay zero).
        qs.iter_mut().for_each(|x| *x = 0.0);
        for r in 0..rows {
            for (o, &x) in qs[r * d..(r + 1) * d].iter_mut().zip(q.row(b, h, i + r, d)) {
                *o = x * head.scale;
            }
        }
        scores::<W, FMA>(&qs, &kt, d, skp, &mut s);
        let mut inv = [0.0f32; ROWS];
        for r in 0..rows {
            let row = &mut s[r * skp..r * skp + sk];
            if let Some((m, start, st)) = head.bias {
                let at = start + b * st[0] + h * st[1] + (i + r) * st[2];
                row.iter_mut().enumerate().for_each(|(j, x)| *x += m[at + j * st[3]]);
            }
            // NaN is passed over here and comes back through exp.
            let max = reduce(row, f32::NEG_INFINITY, |a, x| if x > a { x } else { a });
            // A row of -inf (fully masked) gives NaN, as torch does.
            row.iter_mut().for_each(|x| *x = exp(*x - max));
            inv[r] = 1.0 / reduce(row, 0.0, |a, x| a + x);
        }
        // The widest tiles that fit what is left of `dp`: a 64-wide head is
        // one 4 x 64 tile on AVX-512 (16 accumulators, each key's weights
        // and values loaded once for 16 products) where 16-wide tiles did
        // 4 products per load, one dependent chain per row.
        let mut dc = 0;
        while dc < dp {
            let tile = Tile {
                s: &s,
                skp,
                vp: &vp,
                dp,
                dc,
                sk,
                rows,
                inv: &inv,
                d,
                // SAFETY: row i of head h lies inside `out` ([b, sq, heads,
                // d]) and only this task writes rows i..i + rows.
                dst: unsafe { out.0.add(((b * sq + i) * heads + h) * d) },
                row_stride: heads * d,
            };
            dc += match dp - dc {
                left if V >= 64 && left >= 64 => unsafe { tile.weighted::<64, FMA>() },
                left if V >= 32 && left >= 32 => unsafe { tile.weighted::<32, FMA>() },
                _ => unsafe { tile.weighted::<LANES, FMA>() },
            };
        }
        i += rows;
    }
}

/// One output tile: [`ROWS`] query rows' softmax weights `s` times v's
/// values `dc..dc + C`, normalised, written to `dst`.
struct Tile<'a> {
    s: &'a [f32],
    skp: usize,
    vp: &'a [f32],
    dp: usize,
    dc: usize,
    sk: usize,
    rows: usize,
    inv: &'a [f32; ROWS],
    d: usize,
    /// The first row's output values; rows are `row_stride` apart.
    dst: *mut f32,
    row_stride: usize,
}

impl Tile<'_> {
    /// The tile `C` values wide; returns `C`.
    #[inline(always)]
    unsafe fn weighted<const C: usize, const FMA: bool>(&self) -> usize {
        let Tile {
            s, skp, vp, dp, dc, sk, ..
        } = *self;
        // Checked once here: a bounds check per load in the loop below made
        // LLVM keep the accumulators in memory, a store per product.
        assert!(sk <= skp && s.len() >= ROWS * skp && dc + C <= dp && vp.len() >= sk * dp);
        let mut acc = [[0.0f32; C]; ROWS];
        for j in 0..sk {
            // SAFETY: j < sk and dc + C <= dp (asserted above).
            let vv = unsafe { &*vp.as_ptr().add(j * dp + dc).cast::<[f32; C]>() };
            for r in 0..ROWS {
                // SAFETY: r * skp + j < ROWS * skp <= s.len().
                let p = unsafe { *s.get_unchecked(r * skp + j) };
                for c in 0..C {
                    acc[r][c] = madd::<FMA>(p, vv[c], acc[r][c]);
                }
            }
        }
        let cols = C.min(self.d - dc.min(self.d));
        for r in 0..self.rows {
            for c in 0..cols {
                // SAFETY: value dc + c < d of row r of the caller's rows.
                unsafe { *self.dst.add(r * self.row_stride + dc + c) = acc[r][c] * self.inv[r] };
            }
        }
        C
    }
}

/// The task for at most [`ROWS`] query rows (a decoding step: one new
/// token against the cache, or against the image's cross keys): each
/// score is a dot product of the query with a key row where the keys lie,
/// and the output sums value rows where they lie. Packing kᵀ and v, as
/// [`block`] does for many rows, copied the whole cache to serve one row:
/// with BLIP-base's 577 image keys, a quarter of a caption's attention.
#[inline(always)]
unsafe fn few_rows<const FMA: bool>(head: &Head, b: usize, h: usize, i0: usize, i1: usize, out: Out) {
    let Head {
        q,
        k,
        v,
        sq,
        sk,
        d,
        heads,
        group,
        scale,
        ..
    } = *head;
    let hk = h / group;
    let mut s = vec![0.0f32; sk];
    let mut o = vec![0.0f32; d];
    for i in i0..i1 {
        let qi = q.row(b, h, i, d);
        for (j, x) in s.iter_mut().enumerate() {
            *x = dot::<FMA>(qi, k.row(b, hk, j, d)) * scale;
        }
        if let Some((m, start, st)) = head.bias {
            let at = start + b * st[0] + h * st[1] + i * st[2];
            s.iter_mut().enumerate().for_each(|(j, x)| *x += m[at + j * st[3]]);
        }
        // NaN is passed over here and comes back through exp; a row of
        // -inf (fully masked) gives NaN, as torch does.
        let max = reduce(&s, f32::NEG_INFINITY, |a, x| if x > a { x } else { a });
        s.iter_mut().for_each(|x| *x = exp(*x - max));
        let inv = 1.0 / reduce(&s, 0.0, |a, x| a + x);
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, &p) in s.iter().enumerate() {
            for (x, &y) in o.iter_mut().zip(v.row(b, hk, j, d)) {
                *x = madd::<FMA>(p, y, *x);
            }
        }
        for (c, &x) in o.iter().enumerate() {
            // SAFETY: row i of head h lies inside `out` ([b, sq, heads, d])
            // and only this task writes it.
            unsafe { *out.0.add(((b * sq + i) * heads + h) * d + c) = x * inv };
        }
    }
}

/// `a · b` over equal lengths, [`LANES`] partial sums at a time.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let tail = ar.iter().zip(br).fold(0.0, |t, (&x, &y)| madd::<FMA>(x, y, t));
    acc.iter().sum::<f32>() + tail
}

/// Heads this narrow or narrower take [`narrow`] (given enough query rows).
const NARROW_D: usize = 16;
/// Query rows [`narrow`] holds in the lanes of one vector.
const QL: usize = 16;

/// The task for narrow heads (`d <= 16`: the tiny test models' 4- to
/// 10-wide heads). Above, the output tile spans `d` in 16 lanes, so a
/// 4-wide head leaves three quarters of every product empty, and each
/// score row is reduced across lanes. Here [`QL`] query rows lie in the
/// lanes instead: per key, the scores of the 16 rows are `D` products
/// with broadcast key values, the softmax's max and sum are lane-wise, and
/// the outputs are `D` products with broadcast values; `D` (4, 8 or 16) is
/// the head width rounded up, zero-padded.
#[inline(always)]
unsafe fn narrow<const D: usize, const FMA: bool>(head: &Head, b: usize, h: usize, i0: usize, i1: usize, out: Out) {
    let Head {
        q,
        k,
        v,
        sq,
        sk,
        d,
        heads,
        group,
        scale,
        ..
    } = *head;
    let hk = h / group;
    // The head's keys and values as `sk` rows of `D` (zero past d).
    let (mut kp, mut vp) = (vec![[0.0f32; D]; sk], vec![[0.0f32; D]; sk]);
    for j in 0..sk {
        kp[j][..d].copy_from_slice(k.row(b, hk, j, d));
        vp[j][..d].copy_from_slice(v.row(b, hk, j, d));
    }
    // Scores (then weights) and the bias, by key, QL rows in the lanes.
    let mut s = vec![[0.0f32; QL]; sk];
    let mut bias = vec![[0.0f32; QL]; if head.bias.is_some() { sk } else { 0 }];
    let mut i = i0;
    while i < i1 {
        let rows = (i1 - i).min(QL);
        // qᵀ, scaled (lanes past `rows` stay zero).
        let mut qt = [[0.0f32; QL]; D];
        for l in 0..rows {
            for (t, &x) in q.row(b, h, i + l, d).iter().enumerate() {
                qt[t][l] = x * scale;
            }
        }
        if let Some((m, start, st)) = head.bias {
            for l in 0..rows {
                let at = start + b * st[0] + h * st[1] + (i + l) * st[2];
                bias.iter_mut().enumerate().for_each(|(j, x)| x[l] = m[at + j * st[3]]);
            }
        }
        // NaN is passed over by the max and comes back through exp.
        let mut max = [f32::NEG_INFINITY; QL];
        for j in 0..sk {
            let mut acc = [0.0f32; QL];
            for t in 0..D {
                for l in 0..QL {
                    acc[l] = madd::<FMA>(kp[j][t], qt[t][l], acc[l]);
                }
            }
            if !bias.is_empty() {
                for l in 0..QL {
                    acc[l] += bias[j][l];
                }
            }
            for l in 0..QL {
                max[l] = if acc[l] > max[l] { acc[l] } else { max[l] };
            }
            s[j] = acc;
        }
        // A row of -inf (fully masked) gives NaN, as torch does.
        let (mut sum, mut o) = ([0.0f32; QL], [[0.0f32; QL]; D]);
        for j in 0..sk {
            let mut p = [0.0f32; QL];
            for l in 0..QL {
                p[l] = exp(s[j][l] - max[l]);
                sum[l] += p[l];
            }
            for c in 0..D {
                for l in 0..QL {
                    o[c][l] = madd::<FMA>(p[l], vp[j][c], o[c][l]);
                }
            }
        }
        for l in 0..rows {
            let inv = 1.0 / sum[l];
            // SAFETY: row i + l of head h lies inside `out` ([b, sq, heads,
            // d]) and only this task writes it.
            let dst = unsafe { out.0.add(((b * sq + i + l) * heads + h) * d) };
            for (c, oc) in o.iter().enumerate().take(d) {
                unsafe { *dst.add(c) = oc[l] * inv };
            }
        }
        i += rows;
    }
}

/// `s[r * skp + j] = qs_r · kt_j` for [`ROWS`] rows, `W` keys at a time in
/// registers.
#[inline(always)]
fn scores<const W: usize, const FMA: bool>(qs: &[f32], kt: &[f32], d: usize, skp: usize, s: &mut [f32]) {
    // Checked once here, not per load in the loop (see Tile::weighted).
    assert!(skp % W == 0 && kt.len() >= d * skp && qs.len() >= ROWS * d && s.len() >= ROWS * skp);
    for jc in (0..skp).step_by(W) {
        let mut acc = [[0.0f32; W]; ROWS];
        for t in 0..d {
            // SAFETY: jc + W <= skp and t < d (asserted above).
            let kk = unsafe { &*kt.as_ptr().add(t * skp + jc).cast::<[f32; W]>() };
            for r in 0..ROWS {
                // SAFETY: r * d + t < ROWS * d <= qs.len().
                let a = unsafe { *qs.get_unchecked(r * d + t) };
                for c in 0..W {
                    acc[r][c] = madd::<FMA>(a, kk[c], acc[r][c]);
                }
            }
        }
        for r in 0..ROWS {
            s[r * skp + jc..r * skp + jc + W].copy_from_slice(&acc[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::tests::data;

    /// The composition on candle's ops (the fallback), for reference.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut w = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
        if let Some(m) = bias {
            w = w.broadcast_add(m)?;
        }
        candle_nn::ops::softmax_last_dim(&w)?.matmul(&v.contiguous()?)
    }

    fn tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
        Tensor::from_vec(data(shape.iter().product(), seed), shape, &Device::Cpu)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Shapes at every tile edge (query rows around ROWS and the block,
    /// keys around 16 / 32 / 64, head widths around 16), heads split out
    /// of `[b, s, heads * d]` as views, with and without a mask.
    #[test]
    fn fused_attention_equals_the_composition() -> Result<()> {
        for &(b, h, sq, sk, d) in &[
            (1, 1, 1, 1, 1),
            (2, 3, 5, 7, 8),
            (1, 2, 4, 64, 16),
            (2, 2, 13, 77, 40),
            (1, 4, 65, 33, 17),
            (3, 1, 130, 129, 64),
            (1, 8, 1, 20, 64),
            // Output tiles of 64 + 16 and 64 + 32 values.
            (1, 2, 9, 70, 80),
            (2, 1, 6, 33, 96),
            // Narrow heads (query rows in the lanes): 1 / 4 / 8 / 16 wide,
            // rows around the 16 lanes.
            (2, 4, 64, 77, 4),
            (1, 4, 77, 77, 8),
            (2, 2, 33, 20, 10),
            (1, 3, 17, 5, 3),
            (1, 1, 8, 1, 1),
            (1, 2, 40, 130, 16),
        ] {
            let x = tensor(&[b, sq, h * d], (b * sq * d) as u64)?;
            let kv = tensor(&[b, sk, 2 * h * d], (sk * h) as u64 + 1)?;
            let q = x.reshape((b, sq, h, d))?.transpose(1, 2)?;
            // k and v side by side in one tensor (a fused projection).
            let kv4 = kv.reshape((b, sk, 2, h, d))?;
            let k = kv4.narrow(2, 0, 1)?.squeeze(2)?.transpose(1, 2)?;
            let v = kv4.narrow(2, 1, 1)?.squeeze(2)?.transpose(1, 2)?;
            assert!(fused(&q, &k, &v, None), "{b} {h} {sq} {sk} {d}");
            let scale = (d as f64).powf(-0.5);
            let want = composed(&q, &k, &v, scale, None)?;
            let got = attend(&q, &k, &v, scale, None)?;
            assert_eq!(got.dims(), want.dims());
            let e = max_diff(&got, &want)?;
            assert!(e < 2e-5, "{b} {h} {sq} {sk} {d}: {e}");
            // A padding mask per key ([b, 1, 1, sk]) and a causal one
            // ([1, 1, sq, sk], the last sq keys).
            let pad: Vec<f32> = (0..b * sk)
                .map(|i| {
                    if i % sk >= sk - (i / sk) % 3 && sk > 3 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let pad = Tensor::from_vec(pad, (b, 1, 1, sk), &Device::Cpu)?;
            let causal: Vec<f32> = (0..sq * sk)
                .map(|i| {
                    if i % sk > i / sk + sk.saturating_sub(sq) {
                        -1e9
                    } else {
                        0.0
                    }
                })
                .collect();
            let causal = Tensor::from_vec(causal, (1, 1, sq, sk), &Device::Cpu)?;
            for m in [&pad, &causal] {
                let want = composed(&q, &k, &v, scale, Some(m))?;
                let got = attend(&q, &k, &v, scale, Some(m))?;
                let e = max_diff(&got, &want)?;
                assert!(e < 2e-5, "{b} {h} {sq} {sk} {d} masked: {e}");
            }
        }
        Ok(())
    }

    /// Grouped-query attention (3 query heads per key / value head, as
    /// SmolLM2 has) equals attention on the repeated keys and values, for
    /// a prompt under a causal mask and for one decoding step.
    #[test]
    fn grouped_query_heads_share_their_keys() -> Result<()> {
        for &(sq, sk) in &[(7, 7), (1, 12), (20, 20)] {
            let (b, h, kv, d) = (2, 9, 3, 16);
            let q = tensor(&[b, h, sq, d], 11)?;
            let (k, v) = (tensor(&[b, kv, sk, d], 12)?, tensor(&[b, kv, sk, d], 13)?);
            let causal: Vec<f32> = (0..sq * sk)
                .map(|i| {
                    if i % sk > i / sk + sk - sq {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let m = Tensor::from_vec(causal, (1, 1, sq, sk), &Device::Cpu)?;
            assert!(fused(&q, &k, &v, Some(&m)));
            let want = composed(&q, &repeat_kv(&k, h)?, &repeat_kv(&v, h)?, 0.25, Some(&m))?;
            let e = max_diff(&attend(&q, &k, &v, 0.25, Some(&m))?, &want)?;
            assert!(e < 2e-5, "{sq} x {sk}: {e}");
            assert!(!fused(
                &q,
                &tensor(&[b, 4, sk, d], 1)?,
                &tensor(&[b, 4, sk, d], 2)?,
                None
            ));
        }
        Ok(())
    }

    /// A fully masked row gives NaN (torch's softmax of all -inf); the
    /// other rows are unaffected. f64 inputs and gradients take candle's ops.
    #[test]
    fn masked_rows_and_other_inputs() -> Result<()> {
        // 3 query rows (4-row tiles) and 20 (the narrow kernel's lanes).
        for sq in [3, 20] {
            let (q, k, v) = (
                tensor(&[1, 2, sq, 8], 1)?,
                tensor(&[1, 2, 5, 8], 2)?,
                tensor(&[1, 2, 5, 8], 3)?,
            );
            let mut m = vec![0.0f32; sq * 5];
            m[5..10].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
            let m = Tensor::from_vec(m, (1, 1, sq, 5), &Device::Cpu)?;
            let got = attend(&q, &k, &v, 0.5, Some(&m))?;
            let rows = got.contiguous()?.flatten_to(2)?.to_vec2::<f32>()?;
            for (i, row) in rows.iter().enumerate() {
                assert_eq!(row.iter().all(|x| x.is_nan()), i % sq == 1, "{sq}: row {i}: {row:?}");
            }
        }
        let (q, k, v) = (
            tensor(&[1, 2, 3, 8], 1)?,
            tensor(&[1, 2, 5, 8], 2)?,
            tensor(&[1, 2, 5, 8], 3)?,
        );
        let q64 = q.to_dtype(DType::F64)?;
        assert!(!fused(&q64, &k, &v, None));
        let var = candle_core::Var::from_tensor(&q)?;
        assert!(!fused(var.as_tensor(), &k, &v, None));
        let want = composed(&q, &k, &v, 0.5, None)?;
        let via_candle = attend(&q64, &k.to_dtype(DType::F64)?, &v.to_dtype(DType::F64)?, 0.5, None)?;
        assert!(max_diff(&via_candle.to_dtype(DType::F32)?, &want)? < 1e-5);
        Ok(())
    }
}
