//! The KeywordLLM on libtorch, from the TorchScript modules
//! `scripts/export_llm.py` writes into an HF causal-LM folder: `model.ts`
//! ((input_ids, attention_mask, position_ids, *past) -> (logits, *present),
//! the key/value cache as a flat list of tensors, layer by layer, key then
//! value) and `hidden_states.ts` ((input_ids, img_embeddings) ->
//! hidden_states). Chat template, sampling and the default [IMG] rows are
//! shared with candle (`ragar_core::llm`). The cache stays on the device
//! between steps. `dtype: f16` reads the half-precision exports
//! (`model.f16.ts`, `hidden_states.f16.ts`; `export_llm.py --dtype f16`):
//! the cache and the [IMG] rows in f16, logits and states back in f32.

use crate::{forward, forward_tuple, load_module_as, module_file, placement, to_host};
use ragar_core::llm::{ExportedLlm, LlmDir, LlmGraphs};
use ragar_core::model::Fetch;
use ragar_core::{ComponentSpec, Error, Result};
use std::sync::Mutex;
use tch::{CModule, Kind, Tensor};

/// The modules, in the model folder.
pub const GRAPHS: [&str; 2] = ["model.ts", "hidden_states.ts"];

/// The keyword LLM on libtorch.
pub type TchKeywordLlm = ExportedLlm<TchGraphs>;

/// The two modules.
pub struct TchGraphs {
    // CModule is not Sync; the contract is `&self`.
    decoder: Mutex<CModule>,
    hidden: Mutex<CModule>,
    device: tch::Device,
    /// The modules' float kind (the config's dtype): the cache's and the [IMG] rows'.
    kind: Kind,
}

/// The modules the spec's dtype reads: [`GRAPHS`], or their `.f16.ts` exports.
fn graphs(spec: &ComponentSpec) -> [String; 2] {
    GRAPHS.map(|g| module_file(spec, g))
}

/// Build from `params: { model_dir, n_img_tokens, img_embeddings }`.
pub fn load(spec: &ComponentSpec) -> Result<TchKeywordLlm> {
    let dir = LlmDir::open(spec, Fetch::IfMissing)?;
    let (device, kind) = placement(spec)?;
    let load = |g: &str| -> Result<Mutex<CModule>> { load_module_as(&dir.exported(g)?, device, kind).map(Mutex::new) };
    let [decoder, hidden] = graphs(spec);
    let graphs = TchGraphs {
        decoder: load(&decoder)?,
        hidden: load(&hidden)?,
        device,
        kind,
    };
    ExportedLlm::new(graphs, dir)
}

/// Params and modules without loading them.
pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
    let [decoder, hidden] = graphs(spec);
    LlmDir::probe(spec, &[&decoder, &hidden])
}

impl TchGraphs {
    fn ids(&self, ids: &[u32]) -> Tensor {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::from_slice(&ids)
            .reshape([1, ids.len() as i64])
            .to_device(self.device)
    }
}

impl LlmGraphs for TchGraphs {
    type Cache = Vec<Tensor>;

    fn empty_cache(&self, dir: &LlmDir) -> Result<Vec<Tensor>> {
        let shape = [1, dir.kv_heads as i64, 0, dir.head_dim as i64];
        Ok((0..2 * dir.layers)
            .map(|_| Tensor::zeros(shape, (self.kind, self.device)))
            .collect())
    }

    fn step(&self, cache: &mut Vec<Tensor>, len: usize, ids: &[u32]) -> Result<Vec<f32>> {
        let (t, len) = (ids.len() as i64, len as i64);
        let layers = cache.len();
        let mut inputs = vec![
            self.ids(ids),
            Tensor::ones([1, len + t], (Kind::Int64, self.device)),
            Tensor::arange_start(len, len + t, (Kind::Int64, self.device)).unsqueeze(0),
        ];
        inputs.append(cache);
        let mut out = forward_tuple(&self.decoder, inputs, "LLM decoder")?;
        if out.len() != 1 + layers {
            return Err(Error::model(format!(
                "LLM decoder (TorchScript) returned {} tensors, expected logits + {layers} cache tensors",
                out.len()
            )));
        }
        *cache = out.split_off(1);
        // Every new position's logits, or only the last's (export_llm.py).
        let positions = out[0].size().get(1).copied().unwrap_or(t);
        to_host(&out[0].select(1, positions - 1))
    }

    fn hidden_states(&self, ids: &[u32], img: &[f32], n: usize, h: usize) -> Result<Vec<f32>> {
        let img = Tensor::from_slice(img)
            .reshape([n as i64, h as i64])
            .to_device(self.device)
            .to_kind(self.kind);
        to_host(&forward(&self.hidden, &[self.ids(ids), img], "LLM hidden states")?)
    }
}
