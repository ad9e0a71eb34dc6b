//! The KeywordLLM on ONNX Runtime, from the graphs `scripts/export_llm.py`
//! writes into an HF causal-LM folder: `model.onnx`, the decoder with a
//! key/value cache in Optimum's names (so an Optimum
//! `text-generation-with-past` export works as well), and
//! `hidden_states.onnx` for Eq. 7's [IMG] states. Chat template, sampling
//! and the default [IMG] rows are shared with candle (`ragar_core::llm`).
//!
//! The cache stays in ONNX Runtime values between steps: each step's
//! `present.*` outputs are fed back as the next step's `past_key_values.*`.

use crate::runtime::{check_io, lock, ort_err as err, run_f32, session};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use ragar_core::decoding::last_position;
use ragar_core::llm::{preference_states, LlmDir, LlmText};
use ragar_core::model::Fetch;
use ragar_core::stage::{GenerateOptions, Generation, KeywordLlm, LlmInfo, PreferenceStates};
use ragar_core::{ComponentSpec, Error, Result};
use std::sync::Mutex;

/// The graphs, in the model folder.
pub const GRAPHS: [&str; 2] = ["model.onnx", "hidden_states.onnx"];

/// The keyword LLM on ONNX Runtime.
pub struct OrtKeywordLlm {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    decoder: Mutex<Session>,
    hidden: Mutex<Session>,
    /// Whether the decoder graph takes these (Optimum's always do).
    has_mask: bool,
    has_positions: bool,
    dir: LlmDir,
    text: LlmText,
    img: Vec<f32>,
}

impl OrtKeywordLlm {
    /// Build from `params: { model_dir, n_img_tokens, img_embeddings }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let dir = LlmDir::open(spec, Fetch::IfMissing)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let path = dir.exported(GRAPHS[0])?;
        let decoder = session(spec, &path, threads)?;
        let past: Vec<String> = dir.cache_names().into_iter().map(|(p, _)| p).collect();
        let mut required = vec!["input_ids"];
        required.extend(past.iter().map(String::as_str));
        let mut allowed = required.clone();
        allowed.extend(["attention_mask", "position_ids"]);
        check_io(&decoder, &path, &required, &allowed, "logits")?;
        let has = |n: &str| decoder.inputs().iter().any(|i| i.name() == n);
        let (has_mask, has_positions) = (has("attention_mask"), has("position_ids"));
        let path = dir.exported(GRAPHS[1])?;
        let hidden = session(spec, &path, threads)?;
        let inputs = ["input_ids", "img_embeddings"];
        check_io(&hidden, &path, &inputs, &inputs, "hidden_states")?;
        Ok(OrtKeywordLlm {
            decoder: Mutex::new(decoder),
            hidden: Mutex::new(hidden),
            has_mask,
            has_positions,
            text: dir.text()?,
            img: dir.img_rows()?,
            dir,
        })
    }

    /// Params and graphs without loading them.
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        LlmDir::probe(spec, &GRAPHS)
    }

    fn generate_one(&self, prompt: &str, o: &GenerateOptions, seed: u64) -> Result<Generation> {
        let d = &self.dir;
        let names = d.cache_names();
        let empty = || -> Result<DynValue> {
            let shape = vec![1i64, d.kv_heads as i64, 0, d.head_dim as i64];
            Ok(Tensor::from_array((shape, Vec::<f32>::new())).map_err(err)?.into_dyn())
        };
        let mut past: Vec<DynValue> = names.iter().map(|_| empty()).collect::<Result<_>>()?;
        let mut len = 0usize;
        let mut session = lock(&self.decoder)?;
        let mut step = |ids: &[u32]| -> Result<Vec<f32>> {
            let t = ids.len();
            let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(3 + past.len());
            let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            inputs.push(("input_ids".into(), tensor(vec![1, t as i64], ids)?));
            if self.has_mask {
                inputs.push((
                    "attention_mask".into(),
                    tensor(vec![1, (len + t) as i64], vec![1i64; len + t])?,
                ));
            }
            if self.has_positions {
                let pos = (len as i64..(len + t) as i64).collect();
                inputs.push(("position_ids".into(), tensor(vec![1, t as i64], pos)?));
            }
            for ((name, _), v) in names.iter().zip(past.drain(..)) {
                inputs.push((name.clone(), v));
            }
            let mut out = session.run(inputs).map_err(err)?;
            for (_, present) in &names {
                past.push(
                    out.remove(present)
                        .ok_or_else(|| Error::model(format!("{}: no output {present}", GRAPHS[0])))?,
                );
            }
            len += t;
            let (_, logits) = out["logits"].try_extract_tensor::<f32>().map_err(err)?;
            last_position(logits, 1, t)
        };
        self.text.generate(&mut step, prompt, o, seed)
    }
}

fn tensor(shape: Vec<i64>, data: Vec<i64>) -> Result<DynValue> {
    Ok(Tensor::from_array((shape, data)).map_err(err)?.into_dyn())
}

impl KeywordLlm for OrtKeywordLlm {
    fn info(&self) -> LlmInfo {
        self.dir.info()
    }

    fn generate(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        // One sequence at a time, each prompt with its own seed (as candle).
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| self.generate_one(p, opts, opts.seed.wrapping_add(i as u64)))
            .collect()
    }

    fn preference_states(&self, prompts: &[String]) -> Result<Vec<PreferenceStates>> {
        let (n, h) = (self.dir.n_img, self.dir.hidden);
        prompts
            .iter()
            .map(|p| {
                let (ids, _) = self.text.prompt_ids(p, true, n)?;
                let t = ids.len();
                let ids = tensor(vec![1, t as i64], ids.iter().map(|&i| i as i64).collect())?;
                let img = Tensor::from_array((vec![n as i64, h as i64], self.img.clone())).map_err(err)?;
                let hidden = run_f32(
                    &self.hidden,
                    vec![("input_ids", ids), ("img_embeddings", img.into_dyn())],
                    "hidden_states",
                )?;
                preference_states(&hidden, t, n, h)
            })
            .collect()
    }
}
