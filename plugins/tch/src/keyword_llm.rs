//! The KeywordLLM on libtorch, from the TorchScript modules
//! `scripts/export_llm.py` writes into an HF causal-LM folder: `model.ts`
//! ((input_ids, attention_mask, position_ids, *past) -> (logits, *present),
//! the key/value cache as a flat list of tensors, layer by layer, key then
//! value) and `hidden_states.ts` ((input_ids, img_embeddings) ->
//! hidden_states). Chat template, sampling and the default [IMG] rows are
//! shared with candle (`ragar_core::llm`). The cache stays on the device
//! between steps.

use crate::{device, forward, forward_tuple, load_module, to_host};
use ragar_core::llm::{preference_states, LlmDir, LlmText};
use ragar_core::model::Fetch;
use ragar_core::stage::{GenerateOptions, Generation, KeywordLlm, LlmInfo, PreferenceStates};
use ragar_core::{ComponentSpec, Error, Result};
use std::sync::Mutex;
use tch::{CModule, Kind, Tensor};

/// The modules, in the model folder.
pub const GRAPHS: [&str; 2] = ["model.ts", "hidden_states.ts"];

/// The keyword LLM on libtorch.
pub struct TchKeywordLlm {
    // CModule is not Sync; the contract is `&self`.
    decoder: Mutex<CModule>,
    hidden: Mutex<CModule>,
    device: tch::Device,
    dir: LlmDir,
    text: LlmText,
    img: Vec<f32>,
}

impl TchKeywordLlm {
    /// Build from `params: { model_dir, n_img_tokens, img_embeddings }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let dir = LlmDir::open(spec, Fetch::IfMissing)?;
        let device = device(spec)?;
        let load = |g: &str| -> Result<Mutex<CModule>> { load_module(&dir.exported(g)?, device).map(Mutex::new) };
        Ok(TchKeywordLlm {
            decoder: load(GRAPHS[0])?,
            hidden: load(GRAPHS[1])?,
            device,
            text: dir.text()?,
            img: dir.img_rows()?,
            dir,
        })
    }

    /// Params and modules without loading them.
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        LlmDir::probe(spec, &GRAPHS)
    }

    fn ids(&self, ids: &[i64]) -> Tensor {
        Tensor::from_slice(ids)
            .reshape([1, ids.len() as i64])
            .to_device(self.device)
    }

    fn generate_one(&self, prompt: &str, o: &GenerateOptions, seed: u64) -> Result<Generation> {
        let d = &self.dir;
        let opts = (Kind::Float, self.device);
        let shape = [1, d.kv_heads as i64, 0, d.head_dim as i64];
        let mut past: Vec<Tensor> = (0..2 * d.layers).map(|_| Tensor::zeros(shape, opts)).collect();
        let mut len = 0i64;
        let mut step = |ids: &[u32]| -> Result<Vec<f32>> {
            let t = ids.len() as i64;
            let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            let mut inputs = vec![
                self.ids(&ids),
                Tensor::ones([1, len + t], (Kind::Int64, self.device)),
                Tensor::arange_start(len, len + t, (Kind::Int64, self.device)).unsqueeze(0),
            ];
            inputs.append(&mut past);
            let mut out = forward_tuple(&self.decoder, inputs, "LLM decoder")?;
            if out.len() != 1 + 2 * d.layers {
                return Err(Error::model(format!(
                    "LLM decoder (TorchScript) returned {} tensors, expected logits + {} cache tensors",
                    out.len(),
                    2 * d.layers
                )));
            }
            past = out.split_off(1);
            len += t;
            to_host(&out[0].select(1, t - 1))
        };
        self.text.generate(&mut step, prompt, o, seed)
    }
}

impl KeywordLlm for TchKeywordLlm {
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
                let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                let img = Tensor::from_slice(&self.img)
                    .reshape([n as i64, h as i64])
                    .to_device(self.device);
                let hidden = forward(&self.hidden, &[self.ids(&ids64), img], "LLM hidden states")?;
                preference_states(&to_host(&hidden)?, ids.len(), n, h)
            })
            .collect()
    }
}
