//! RAGAR's Mapper (Eq. 8-9) for inference from the ONNX graph that
//! `scripts/export_mapper.py` writes next to a `ragar train` checkpoint
//! (`mapper.safetensors` -> `mapper.onnx`: `x`, `kw` -> `mapped`,
//! `preference`). The params are candle's (`mapper.backend=ort` switches
//! nothing else); training stays on candle, where autograd is.

use crate::runtime::{check_io, lock, ort_err as err, session};
use ort::session::Session;
use ort::value::Tensor;
use ragar_core::component::Probe;
use ragar_core::mapper::{exported_params, split_outputs, stack_inputs, MapperConfig};
use ragar_core::stage::{LossConfig, Mapper, MapperInfo, MapperInput, MapperOutput, ReflectionSample, TrainStats};
use ragar_core::{ComponentSpec, Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The Mapper on ONNX Runtime.
pub struct OrtMapper {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    session: Mutex<Session>,
    cfg: MapperConfig,
    spec: ComponentSpec,
}

/// The exported graph of a checkpoint: same folder and stem, `.onnx`.
pub fn graph_of(checkpoint: &str) -> PathBuf {
    Path::new(checkpoint).with_extension("onnx")
}

fn open(spec: &ComponentSpec, graph: &Path) -> Result<Session> {
    let s = session(spec, graph).map_err(|e| {
        e.context("the ort Mapper runs a checkpoint exported by: python scripts/export_mapper.py CHECKPOINT")
    })?;
    check_io(&s, graph, &["x", "kw"], &["x", "kw"], "preference")?;
    Ok(s)
}

impl OrtMapper {
    /// Build from candle's params; `checkpoint` is required (its `.onnx`).
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        probe(spec)?;
        let (cfg, ckpt) = exported_params(spec, "ort")?;
        Ok(OrtMapper {
            session: Mutex::new(open(spec, &graph_of(&ckpt))?),
            cfg,
            spec: spec.clone(),
        })
    }
}

/// The probe: the shapes, and the exported graph (a missing one is named
/// with its export command; loading asks it first for that message).
pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
    ragar_core::mapper::probe(spec, graph_of)
}

impl Mapper for OrtMapper {
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
        let x = Tensor::from_array((vec![b, 1 + c.n_img_tokens as i64, c.input_dim as i64], xs)).map_err(err)?;
        let kw = Tensor::from_array((vec![b, c.keyword_dim as i64], kws)).map_err(err)?;
        let mut s = lock(&self.session)?;
        let out = s.run(ort::inputs!["x" => x, "kw" => kw]).map_err(err)?;
        let (_, mapped) = out["mapped"].try_extract_tensor::<f32>().map_err(err)?;
        let (_, pref) = out["preference"].try_extract_tensor::<f32>().map_err(err)?;
        split_outputs(c, inputs.len(), mapped, pref)
    }

    fn train_step(&mut self, _: &[ReflectionSample], _: &LossConfig) -> Result<TrainStats> {
        Err(Error::unsupported(
            "the ort Mapper runs inference only: train with mapper.backend=candle",
        ))
    }

    fn save(&self, _: &str) -> Result<()> {
        Err(Error::unsupported(
            "the ort Mapper has no trainable state to save (train with mapper.backend=candle)",
        ))
    }

    fn load(&mut self, path: &str) -> Result<()> {
        let s = open(&self.spec, &graph_of(path))?;
        self.session = Mutex::new(s);
        Ok(())
    }
}
