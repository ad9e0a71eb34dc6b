//! Sentence-transformers text encoder (all-MiniLM-L6-v2 and other BERT
//! sentence models) on candle: `model.safetensors` + `tokenizer.json`.
//! Tokenisation and pooling are shared with the other backends
//! (`ragar_core::text`); this file only runs the transformer.

use crate::bert::{BertModel, Config};
use crate::checkpoint;
use crate::device::{device, dtype, model_err};
use candle_core::{DType, Device, Tensor};
use ragar_core::model::Fetch;
use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::text::{
    embed_in_batches, encoder_info, SentenceEncoderParams, SentenceModelDir, SentenceTokenizer, TokenBatch,
};
use ragar_core::{ComponentSpec, Error, ErrorKind, Result, ResultExt};

/// A BERT sentence encoder.
pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: SentenceTokenizer,
    dir: SentenceModelDir,
    batch_size: usize,
    device: Device,
}

impl SentenceEncoder {
    /// Build from a component spec (`params: { model_dir, batch_size }`).
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir, weights) = SentenceEncoderParams::open(spec, "model.safetensors", Fetch::IfMissing)?;
        let device = device(spec)?;
        let cfg_path = dir.file("config.json")?;
        let cfg: Config =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?)
                .or_err(ErrorKind::Model, cfg_path.display())?;
        let vb = checkpoint::var_builder(&[&weights], dtype(spec, &device)?, &device)?;
        let model = BertModel::load(vb, &cfg).map_err(model_err(weights.display()))?;
        let tokenizer = dir.tokenizer()?;
        Ok(SentenceEncoder {
            model,
            tokenizer,
            dir,
            batch_size: params.batch_size,
            device,
        })
    }

    fn forward(&self, b: &TokenBatch) -> candle_core::Result<Vec<f32>> {
        let shape = (b.batch, b.seq_len);
        let as_u32 = |v: &[i64]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
        let ids = Tensor::from_vec(as_u32(&b.ids), shape, &self.device)?;
        let types = Tensor::from_vec(as_u32(&b.type_ids), shape, &self.device)?;
        let mask = Tensor::from_vec(as_u32(&b.mask), shape, &self.device)?;
        let hidden = self.model.forward(&ids, &types, &mask)?;
        hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    }
}

impl Encoder for SentenceEncoder {
    fn info(&self) -> EncoderInfo {
        encoder_info(&self.dir)
    }

    fn embed_text(&self, texts: &[String]) -> Result<TextEmbeddings> {
        crate::device::on_pool(&self.device, || {
            embed_in_batches(texts, self.batch_size, &self.tokenizer, &self.dir, |b| {
                self.forward(b).map_err(model_err("BERT forward"))
            })
        })
    }
}
