//! The content ranker (trained on candle) scoring from the TorchScript
//! module that `scripts/export_content_ranker.py` writes next to its state
//! (`content.safetensors` -> `content.ts`). The state's item features and
//! the query layout are `ragar_core::content`, the same as candle's.
//! `dtype: f16` reads the half-precision export (`content.f16.ts`;
//! `export_content_ranker.py --dtype f16`) and feeds it f16.

use crate::{forward, load_module_as, module_beside, placement, to_host};
use ragar_core::component::Probe;
use ragar_core::content::{checkpoint, ContentState};
use ragar_core::stage::{RankQuery, Ranker};
use ragar_core::{ComponentSpec, DType, Result};
use std::path::Path;
use std::sync::Mutex;
use tch::{CModule, Tensor};

/// The content ranker on libtorch.
pub struct TchContentRanker {
    // CModule is not Sync; the contract is `&self`.
    module: Mutex<CModule>,
    device: tch::Device,
    kind: tch::Kind,
    dtype: DType,
    state: ContentState,
}

impl TchContentRanker {
    /// Build from the params' `checkpoint` (the trained state).
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        probe(spec)?;
        let state = checkpoint(spec, "tch")?;
        let (device, kind) = placement(spec)?;
        Ok(TchContentRanker {
            module: Mutex::new(load_module_as(&module_beside(spec.dtype, &state), device, kind)?),
            device,
            kind,
            dtype: spec.dtype,
            state: ContentState::open(&state)?,
        })
    }

    fn tensor(&self, v: &[f32], shape: [usize; 3]) -> Tensor {
        Tensor::from_slice(v)
            .reshape(shape.map(|d| d as i64))
            .to_device(self.device)
            .to_kind(self.kind)
    }
}

/// The probe: the state and the module the dtype reads (a missing one is
/// named with its export command; loading asks it first for that message).
pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
    ragar_core::content::probe(spec, "tch", |s| module_beside(spec.dtype, s))
}

impl Ranker for TchContentRanker {
    fn score(&self, queries: &[RankQuery]) -> Result<Vec<Vec<f32>>> {
        let (dv, dt) = self.state.dims;
        let l = self.state.max_len;
        queries
            .iter()
            .enumerate()
            .map(|(qi, q)| {
                let x = self.state.inputs(qi, q)?;
                let mask = Tensor::from_slice(&x.mask)
                    .reshape([1, l as i64])
                    .to_device(self.device)
                    .to_kind(self.kind);
                let inputs = [
                    self.tensor(&x.hist_visual, [1, l, dv]),
                    self.tensor(&x.hist_text, [1, l, dt]),
                    mask,
                    self.tensor(&x.cand_visual, [1, x.n, dv]),
                    self.tensor(&x.cand_text, [1, x.n, dt]),
                ];
                to_host(&forward(&self.module, &inputs, "content ranker")?)
            })
            .collect()
    }

    fn load(&mut self, path: &str) -> Result<()> {
        let p = Path::new(path);
        self.module = Mutex::new(load_module_as(&module_beside(self.dtype, p), self.device, self.kind)?);
        self.state = ContentState::open(p)?;
        Ok(())
    }
}
