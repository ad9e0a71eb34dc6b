//! The KeywordLLM on ONNX Runtime, from the graphs `scripts/export_llm.py`
//! writes into an HF causal-LM folder: `model.onnx`, the decoder with a
//! key/value cache in Optimum's `text-generation-with-past` names
//! (`attention_mask` and `position_ids` are fed when the graph has them;
//! an Optimum export itself is not tested here), and `hidden_states.onnx`
//! for Eq. 7's [IMG] states. Chat template,
//! sampling and the default [IMG] rows are shared with candle
//! (`ragar_core::llm`).
//!
//! The cache stays in ONNX Runtime values between steps: each step's
//! `present.*` outputs are fed back as the next step's `past_key_values.*`.

use crate::runtime::{check_io, empty_cache, lock, ort_err as err, run_f32, session, take_outputs};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use ragar_core::decoding::last_position;
use ragar_core::llm::{ExportedLlm, LlmDir, LlmGraphs};
use ragar_core::model::Fetch;
use ragar_core::{ComponentSpec, Result};
use std::sync::Mutex;

/// The graphs, in the model folder.
pub const GRAPHS: [&str; 2] = ["model.onnx", "hidden_states.onnx"];

/// The keyword LLM on ONNX Runtime.
pub type OrtKeywordLlm = ExportedLlm<OrtGraphs>;

/// The two sessions.
pub struct OrtGraphs {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    decoder: Mutex<Session>,
    hidden: Mutex<Session>,
    /// Whether the decoder graph takes these (Optimum's do).
    has_mask: bool,
    has_positions: bool,
    /// Cache input and output names, layer by layer.
    names: Vec<(String, String)>,
}

/// Build from `params: { model_dir, n_img_tokens, img_embeddings }`.
pub fn load(spec: &ComponentSpec) -> Result<OrtKeywordLlm> {
    let dir = LlmDir::open(spec, Fetch::IfMissing)?;
    let names = dir.cache_names();
    let path = dir.exported(GRAPHS[0])?;
    let decoder = session(spec, &path)?;
    let mut required = vec!["input_ids"];
    required.extend(names.iter().map(|n| n.0.as_str()));
    let mut allowed = required.clone();
    allowed.extend(["attention_mask", "position_ids"]);
    check_io(&decoder, &path, &required, &allowed, "logits")?;
    let has = |n: &str| decoder.inputs().iter().any(|i| i.name() == n);
    let (has_mask, has_positions) = (has("attention_mask"), has("position_ids"));
    let path = dir.exported(GRAPHS[1])?;
    let hidden = session(spec, &path)?;
    let inputs = ["input_ids", "img_embeddings"];
    check_io(&hidden, &path, &inputs, &inputs, "hidden_states")?;
    let graphs = OrtGraphs {
        decoder: Mutex::new(decoder),
        hidden: Mutex::new(hidden),
        has_mask,
        has_positions,
        names,
    };
    ExportedLlm::new(graphs, dir)
}

/// Params and graphs without loading them.
pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
    LlmDir::probe(spec, &GRAPHS)
}

fn ids_tensor(shape: Vec<i64>, data: Vec<i64>) -> Result<DynValue> {
    Ok(Tensor::from_array((shape, data)).map_err(err)?.into_dyn())
}

impl LlmGraphs for OrtGraphs {
    type Cache = Vec<DynValue>;

    fn empty_cache(&self, dir: &LlmDir) -> Result<Vec<DynValue>> {
        empty_cache(self.names.len(), 1, dir.kv_heads, dir.head_dim)
    }

    fn step(&self, cache: &mut Vec<DynValue>, len: usize, ids: &[u32]) -> Result<Vec<f32>> {
        let t = ids.len();
        let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(3 + cache.len());
        let ids = ids.iter().map(|&i| i as i64).collect();
        inputs.push(("input_ids".into(), ids_tensor(vec![1, t as i64], ids)?));
        if self.has_mask {
            let mask = vec![1i64; len + t];
            inputs.push(("attention_mask".into(), ids_tensor(vec![1, (len + t) as i64], mask)?));
        }
        if self.has_positions {
            let pos = (len as i64..(len + t) as i64).collect();
            inputs.push(("position_ids".into(), ids_tensor(vec![1, t as i64], pos)?));
        }
        for ((name, _), v) in self.names.iter().zip(cache.drain(..)) {
            inputs.push((name.clone(), v));
        }
        let mut s = lock(&self.decoder)?;
        let mut out = s.run(inputs).map_err(err)?;
        *cache = take_outputs(&mut out, self.names.iter().map(|n| n.1.as_str()), GRAPHS[0])?;
        // [1, t, vocab] as Optimum exports it, or [1, 1, vocab] (the last
        // position only, as scripts/export_llm.py does).
        let (shape, logits) = out["logits"].try_extract_tensor::<f32>().map_err(err)?;
        let positions = match shape.len() {
            3 => shape[1] as usize,
            _ => t,
        };
        last_position(logits, 1, positions)
    }

    fn hidden_states(&self, ids: &[u32], img: &[f32], n: usize, h: usize) -> Result<Vec<f32>> {
        let ids = ids_tensor(vec![1, ids.len() as i64], ids.iter().map(|&i| i as i64).collect())?;
        let img = Tensor::from_array((vec![n as i64, h as i64], img.to_vec())).map_err(err)?;
        run_f32(
            &self.hidden,
            vec![("input_ids", ids), ("img_embeddings", img.into_dyn())],
            "hidden_states",
        )
    }
}
