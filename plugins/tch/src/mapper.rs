//! RAGAR's Mapper (Eq. 8-9) for inference from the TorchScript module that
//! `scripts/export_mapper.py` writes next to a `ragar train` checkpoint
//! (`mapper.safetensors` -> `mapper.ts`: `(x, kw)` -> `(mapped,
//! preference)`). The params are candle's (`mapper.backend=tch` switches
//! nothing else); training stays on candle, where autograd is.

use crate::{device, first_line, load_module, to_host};
use ragar_core::mapper::{exported_params, split_outputs, stack_inputs, MapperConfig};
use ragar_core::stage::{LossConfig, Mapper, MapperInfo, MapperInput, MapperOutput, ReflectionSample, TrainStats};
use ragar_core::{ComponentSpec, Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{CModule, IValue, Tensor};

/// The Mapper on libtorch.
pub struct TchMapper {
    // CModule is not Sync; the contract is `&self`.
    module: Mutex<CModule>,
    device: tch::Device,
    cfg: MapperConfig,
}

/// The exported module of a checkpoint: same folder and stem, `.ts`.
pub fn module_of(checkpoint: &str) -> PathBuf {
    Path::new(checkpoint).with_extension("ts")
}

impl TchMapper {
    /// Build from candle's params; `checkpoint` is required (its `.ts`).
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        let (cfg, ckpt) = exported_params(spec, "tch")?;
        let device = device(spec)?;
        Ok(TchMapper {
            module: Mutex::new(load_module(&module_of(&ckpt), device)?),
            device,
            cfg,
        })
    }
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
            .to_device(self.device);
        let kw = Tensor::from_slice(&kws)
            .reshape([b, c.keyword_dim as i64])
            .to_device(self.device);
        let m = self
            .module
            .lock()
            .map_err(|_| Error::model("TorchScript module poisoned by an earlier panic"))?;
        let out = crate::inference_mode(|| m.forward_is(&[IValue::Tensor(x), IValue::Tensor(kw)]))
            .map_err(|e| Error::model(format!("Mapper (TorchScript): {}", first_line(&e.to_string()))))?;
        let (mapped, pref) = match out {
            IValue::Tuple(v) if v.len() == 2 => match (&v[0], &v[1]) {
                (IValue::Tensor(a), IValue::Tensor(p)) => (to_host(a)?, to_host(p)?),
                _ => return Err(Error::model("Mapper module: expected a tuple of two tensors")),
            },
            _ => return Err(Error::model("Mapper module: expected (mapped, preference)")),
        };
        split_outputs(c, inputs.len(), &mapped, &pref)
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
        self.module = Mutex::new(load_module(&module_of(path), self.device)?);
        Ok(())
    }
}
