//! candle decoders with their key/value caches, driven by the host-side
//! greedy and beam-search loops every backend shares
//! ([`ragar_core::decoding`], transformers' `generate`).

use candle_core::{DType, Device, IndexOp, Result, Tensor};

/// A decoder with its cache, as the loops drive it.
pub trait Stepper {
    /// Logits `[rows, vocab]` at the last position of the prefix (prompt
    /// tokens, image queries, ...), for `rows` identical rows.
    fn prefill(&mut self, rows: usize) -> Result<Tensor>;
    /// Logits `[rows, vocab]` after one more token per row.
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor>;
    /// Keep cache rows `rows`, in that order (beam reordering).
    fn reorder(&mut self, rows: &[u32]) -> Result<()>;
}

pub use ragar_core::decoding::Limits;

/// A candle [`Stepper`] as the host-side loops drive it.
pub struct Host<'a>(pub Box<dyn Stepper + 'a>);

fn host(t: Tensor) -> ragar_core::Result<Vec<f32>> {
    // One contiguous copy (a view's elements gathered one at a time cost
    // more than the decoder step for OPT's 50k vocabulary); no dtype
    // conversion for f32.
    let t = match t.dtype() {
        DType::F32 => Ok(t),
        _ => t.to_dtype(DType::F32),
    };
    t.and_then(|t| t.contiguous()?.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| ragar_core::Error::model(format!("decoder logits: {e}")))
}

impl ragar_core::decoding::Stepper for Host<'_> {
    fn prefill(&mut self, rows: usize) -> ragar_core::Result<Vec<f32>> {
        host(
            self.0
                .prefill(rows)
                .map_err(|e| ragar_core::Error::model(format!("decoder: {e}")))?,
        )
    }
    fn step(&mut self, tokens: &[u32]) -> ragar_core::Result<Vec<f32>> {
        host(
            self.0
                .step(tokens)
                .map_err(|e| ragar_core::Error::model(format!("decoder: {e}")))?,
        )
    }
    fn reorder(&mut self, rows: &[u32]) -> ragar_core::Result<()> {
        self.0
            .reorder(rows)
            .map_err(|e| ragar_core::Error::model(format!("decoder cache: {e}")))
    }
}

/// The last position's logits of `[rows, s, vocab]`.
pub fn last_position(logits: &Tensor) -> Result<Tensor> {
    logits.i((.., logits.dim(1)? - 1))
}

/// Row indices as a tensor for `index_select`.
pub fn row_index(rows: &[u32], dev: &Device) -> Result<Tensor> {
    Tensor::new(rows, dev)
}
