//! Sentence-transformers text encoder (all-MiniLM-L6-v2) from an ONNX graph
//! with inputs `input_ids`, `attention_mask` (and optionally
//! `token_type_ids`), output `last_hidden_state` — the layout of
//! `scripts/export_minilm.py` and of Optimum / the int8 graph users commonly
//! have. Tokenisation and pooling are shared (`ragar_core::text`).

use crate::runtime::{check_io, ort_err as err, run_f32, session};
use ort::session::Session;
use ort::value::Tensor;
use ragar_core::model::Fetch;
use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::text::{
    embed_in_batches, encoder_info, SentenceEncoderParams, SentenceModelDir, SentenceTokenizer, TokenBatch,
};
use ragar_core::{ComponentSpec, Result};
use std::sync::Mutex;

const INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];
const OUTPUT: &str = "last_hidden_state";

/// A BERT sentence encoder on ONNX Runtime.
pub struct SentenceEncoder {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    session: Mutex<Session>,
    uses_type_ids: bool,
    tokenizer: SentenceTokenizer,
    dir: SentenceModelDir,
    batch_size: usize,
}

impl SentenceEncoder {
    /// Build from a spec: `params: { model_dir, batch_size, file }`; the
    /// graph is `file` inside the folder, default `model.onnx` (the int8
    /// graph installed by the setup is `model_int8.onnx`).
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir, graph) = SentenceEncoderParams::open(spec, "model.onnx", Fetch::IfMissing)?;
        let session = session(spec, &graph)?;
        check_io(&session, &graph, &INPUTS[..2], &INPUTS, OUTPUT)?;
        let uses_type_ids = session.inputs().iter().any(|o| o.name() == "token_type_ids");
        Ok(SentenceEncoder {
            session: Mutex::new(session),
            uses_type_ids,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    fn forward(&self, b: &TokenBatch) -> Result<Vec<f32>> {
        let shape = vec![b.batch as i64, b.seq_len as i64];
        let ids = Tensor::from_array((shape.clone(), b.ids.clone())).map_err(err)?;
        let mask = Tensor::from_array((shape.clone(), b.mask.clone())).map_err(err)?;
        let mut inputs = vec![("input_ids", ids.into_dyn()), ("attention_mask", mask.into_dyn())];
        if self.uses_type_ids {
            let types = Tensor::from_array((shape, b.type_ids.clone())).map_err(err)?;
            inputs.push(("token_type_ids", types.into_dyn()));
        }
        run_f32(&self.session, inputs, OUTPUT)
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
