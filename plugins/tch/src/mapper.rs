//! RAGAR's Mapper (Eq. 8-9) for inference from the TorchScript module that
//! `scripts/export_mapper.py` writes next to a `ragar train` checkpoint
//! (`mapper.safetensors` -> `mapper.ts`: `(x, kw)` -> `(mapped,
//! preference)`). The params are candle's (`mapper.backend=tch` switches
//! nothing else); training stays on candle, where autograd is. `dtype: f16`
//! reads the half-precision export (`mapper.f16.ts`; `export_mapper.py
//! --dtype f16`) and feeds it f16.

use crate::{forward_tuple, load_module_as, module_beside, placement, to_host};
use ragar_core::component::Probe;
use ragar_core::mapper::{exported_params, split_outputs, stack_inputs, MapperConfig};
use ragar_core::stage::{LossConfig, Mapper, MapperInfo, MapperInput, MapperOutput, ReflectionSample, TrainStats};
use ragar_core::{ComponentSpec, DType, Error, Result};
use std::path::Path;
use std::sync::Mutex;
use tch::{CModule, Tensor};

/// The Mapper on libtorch.
pub struct TchMapper {
    // CModule is not Sync; the contract is `&self`.
    module: Mutex<CModule>,
    device: tch::Device,
    kind: tch::Kind,
    dtype: DType,
    cfg: MapperConfig,
}

impl TchMapper {
    /// Build from candle's params; `checkpoint` is required (its `.ts`).
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        probe(spec)?;
        let (cfg, ckpt) = exported_params(spec, "tch")?;
        let (device, kind) = placement(spec)?;
        Ok(TchMapper {
            module: Mutex::new(load_module_as(
                &module_beside(spec.dtype, Path::new(&ckpt)),
                device,
                kind,
            )?),
            device,
            kind,
            dtype: spec.dtype,
            cfg,
        })
    }
}

/// The probe: the shapes, and the module the dtype reads (a missing one is
/// named with its export command; loading asks it first for that message).
pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
    ragar_core::mapper::probe(spec, |c| module_beside(spec.dtype, c.as_ref()))
}

impl Mapper for TchMapper {
    fn info(&self) -> MapperInfo {
        self.cfg.info()
    }

    fn forward(&self, inputs: &[MapperInput]) -> Result<Vec<MapperOutput>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let c = &self.cfg;
        let (xs, kws) = stack_inputs(c, inputs)?;
        let b = inputs.len() as i64;
        let x = Tensor::from_slice(&xs)
            .reshape([b, 1 + c.n_img_tokens as i64, c.input_dim as i64])
            .to_device(self.device)
            .to_kind(self.kind);
        let kw = Tensor::from_slice(&kws)
            .reshape([b, c.keyword_dim as i64])
            .to_device(self.device)
            .to_kind(self.kind);
        let [mapped, pref] = <[Tensor; 2]>::try_from(forward_tuple(&self.module, vec![x, kw], "Mapper")?)
            .map_err(|_| Error::model("Mapper (TorchScript): expected (mapped, preference)"))?;
        split_outputs(c, inputs.len(), &to_host(&mapped)?, &to_host(&pref)?)
    }

    fn train_step(&mut self, _: &[ReflectionSample], _: &LossConfig) -> Result<TrainStats> {
        Err(Error::unsupported(
            "the tch Mapper runs inference only: train with mapper.backend=candle",
        ))
    }

    fn save(&self, _: &str) -> Result<()> {
        Err(Error::unsupported(
            "the tch Mapper has no trainable state to save (train with mapper.backend=candle)",
        ))
    }

    fn load(&mut self, path: &str) -> Result<()> {
        self.module = Mutex::new(load_module_as(
            &module_beside(self.dtype, Path::new(path)),
            self.device,
            self.kind,
        )?);
        Ok(())
    }
}
