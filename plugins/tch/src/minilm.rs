//! Sentence-transformers text encoder (all-MiniLM-L6-v2) from a TorchScript
//! module taking `(input_ids, attention_mask, token_type_ids)` int64
//! `[batch, seq]` and returning `last_hidden_state` `[batch, seq, hidden]`
//! (`scripts/export_minilm.py`). Tokenisation and pooling are shared
//! (`ragar_core::text`). `dtype: f16` reads `model.f16.ts`
//! (`export_minilm.py --dtype f16`).

use crate::{forward, load_module_as, module_file, placement, to_host};
use ragar_core::model::Fetch;
use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::text::{
    embed_in_batches, encoder_info, SentenceEncoderParams, SentenceModelDir, SentenceTokenizer, TokenBatch,
};
use ragar_core::{ComponentSpec, Result};
use std::sync::Mutex;
use tch::{CModule, Tensor};

/// A BERT sentence encoder on libtorch.
pub struct SentenceEncoder {
    // CModule is not Sync; the contract is `&self`.
    module: Mutex<CModule>,
    device: tch::Device,
    tokenizer: SentenceTokenizer,
    dir: SentenceModelDir,
    batch_size: usize,
}

impl SentenceEncoder {
    /// Build from a spec: `params: { model_dir, batch_size, file }`, the
    /// module being `file` (default `model.ts`, `model.f16.ts` for dtype
    /// f16) inside the folder.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir, path) = SentenceEncoderParams::open(spec, &module_file(spec, "model.ts"), Fetch::IfMissing)?;
        let (device, kind) = placement(spec)?;
        let module = load_module_as(&path, device, kind)?;
        Ok(SentenceEncoder {
            module: Mutex::new(module),
            device,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    fn forward(&self, b: &TokenBatch) -> Result<Vec<f32>> {
        let shape = [b.batch as i64, b.seq_len as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).reshape(shape).to_device(self.device);
        to_host(&forward(
            &self.module,
            &[t(&b.ids), t(&b.mask), t(&b.type_ids)],
            "MiniLM",
        )?)
    }
}

impl Encoder for SentenceEncoder {
    fn info(&self) -> EncoderInfo {
        encoder_info(&self.dir)
    }

    fn embed_text(&self, texts: &[String]) -> Result<TextEmbeddings> {
        embed_in_batches(texts, self.batch_size, &self.tokenizer, &self.dir, |b| self.forward(b))
    }
}
