//! The Mapper's parameters and input layout, shared by every backend's
//! Mapper (candle trains it; ort and tch run exported graphs of it), so
//! that `mapper.backend=...` switches the backend and nothing else.

use crate::stage::{MapperInfo, MapperInput, MapperOutput};
use crate::{ComponentSpec, Error, Result, Tensor};

/// Shapes and hyper-parameters (`params` of the `mapper` component).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MapperConfig {
    /// LLM width of the [IMG] states and the text-related embedding.
    pub input_dim: usize,
    /// [IMG] tokens per sample.
    #[serde(default = "eight")]
    pub n_img_tokens: usize,
    /// Width of the keyword feature.
    pub keyword_dim: usize,
    /// Width of the retrieval-augmented preference (Eq. 5).
    pub retrieval_dim: usize,
    /// Width of a vector semantic target (Eq. 14); 0 = `[n_queries, output_dim]` targets.
    #[serde(default)]
    pub semantic_dim: usize,
    /// Transformer width (GILL: 512).
    #[serde(default = "d512")]
    pub hidden_dim: usize,
    /// Encoder and decoder layers each (GILL: 4).
    #[serde(default = "four")]
    pub layers: usize,
    /// Heads (GILL: 4).
    #[serde(default = "four")]
    pub heads: usize,
    /// Feed-forward width (GILL: 2048).
    #[serde(default = "d2048")]
    pub ffn_dim: usize,
    /// Learned queries = output tokens (77 for SD 1.5).
    #[serde(default = "d77")]
    pub n_queries: usize,
    /// Output width (768 for SD 1.5).
    #[serde(default = "d768")]
    pub output_dim: usize,
    /// Calibrator heads.
    #[serde(default = "eight")]
    pub calibrator_heads: usize,
    /// Tokens the keyword feature is projected into for the calibrator's attention.
    #[serde(default = "four")]
    pub keyword_tokens: usize,
    /// AdamW betas, epsilon and weight decay (torch's defaults but GILL's beta2 0.95).
    #[serde(default = "betas")]
    pub betas: (f64, f64),
    /// AdamW epsilon.
    #[serde(default = "adam_eps")]
    pub adam_eps: f64,
    /// AdamW decoupled weight decay.
    #[serde(default = "wd")]
    pub weight_decay: f64,
    /// Seed of the initial weights.
    #[serde(default)]
    pub seed: u64,
}

fn eight() -> usize {
    8
}
fn four() -> usize {
    4
}
fn d512() -> usize {
    512
}
fn d2048() -> usize {
    2048
}
fn d77() -> usize {
    77
}
fn d768() -> usize {
    768
}
fn betas() -> (f64, f64) {
    (0.9, 0.95)
}
fn adam_eps() -> f64 {
    1e-8
}
fn wd() -> f64 {
    0.01
}

/// The component's params: the [`MapperConfig`] and the optional
/// `checkpoint` (resolved against the config's folder and `${RAGAR_CACHE}`).
pub fn parse_params(spec: &ComponentSpec) -> Result<(MapperConfig, Option<String>)> {
    let mut v: serde_json::Value = spec.params()?;
    let ckpt = match v.as_object_mut().and_then(|o| o.remove("checkpoint")) {
        Some(serde_json::Value::String(p)) => Some(spec.resolve_path(&p).to_string_lossy().into_owned()),
        Some(other) => {
            return Err(Error::config(format!(
                "{}.params.checkpoint: expected a path, got {other}",
                spec.key
            )))
        }
        None => None,
    };
    let cfg: MapperConfig =
        serde_json::from_value(v).map_err(|e| Error::config(format!("{}.params: {e}", spec.key)))?;
    Ok((cfg, ckpt))
}

/// The params of a Mapper that runs a trained checkpoint's export (ort,
/// tch): the config and the required `checkpoint`.
pub fn exported_params(spec: &ComponentSpec, backend: &str) -> Result<(MapperConfig, String)> {
    let (cfg, ckpt) = parse_params(spec)?;
    let ckpt = ckpt.ok_or_else(|| {
        Error::config(format!(
            "{}.params.checkpoint: the {backend} Mapper runs a trained checkpoint (train on candle, then \
             python scripts/export_mapper.py CHECKPOINT)",
            spec.key
        ))
    })?;
    Ok((cfg, ckpt))
}

impl MapperConfig {
    /// The contract's shapes.
    pub fn info(&self) -> MapperInfo {
        MapperInfo {
            input_dim: self.input_dim as u32,
            n_img_tokens: self.n_img_tokens as u32,
            keyword_dim: self.keyword_dim as u32,
            n_queries: self.n_queries as u32,
            output_dim: self.output_dim as u32,
        }
    }
}

/// Eq. 8's input of a batch, checked: `x` `[b, 1 + n_img_tokens,
/// input_dim]` (the text-related embedding, then the [IMG] states) and the
/// keyword features `[b, keyword_dim]`, row-major. A wrong shape names the
/// input and what was expected.
pub fn stack_inputs(c: &MapperConfig, inputs: &[MapperInput]) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut xs = Vec::with_capacity(inputs.len() * (1 + c.n_img_tokens) * c.input_dim);
    let mut kws = Vec::with_capacity(inputs.len() * c.keyword_dim);
    for (i, inp) in inputs.iter().enumerate() {
        let bad = |what: &str, got: Vec<usize>, want: String| {
            Error::invalid_input(format!("mapper input {i}: {what} of shape {got:?}, expected {want}"))
        };
        if inp.img_states.dims() != [c.n_img_tokens, c.input_dim] {
            return Err(bad(
                "img_states",
                inp.img_states.dims(),
                format!("[{}, {}]", c.n_img_tokens, c.input_dim),
            ));
        }
        if inp.text_embedding.dims() != [c.input_dim] {
            return Err(bad(
                "text_embedding",
                inp.text_embedding.dims(),
                format!("[{}]", c.input_dim),
            ));
        }
        let kd = inp.keyword_feature.dims();
        if kd != [c.keyword_dim] {
            return Err(bad("keyword_feature", kd, format!("[{}]", c.keyword_dim)));
        }
        xs.extend(inp.text_embedding.to_f32_vec());
        xs.extend(inp.img_states.to_f32_vec());
        kws.extend(inp.keyword_feature.to_f32_vec());
    }
    Ok((xs, kws))
}

/// Split batched `mapped` and `preference` (`[b, n_queries, output_dim]`
/// each, row-major) into the contract's outputs.
pub fn split_outputs(c: &MapperConfig, b: usize, mapped: &[f32], preference: &[f32]) -> Result<Vec<MapperOutput>> {
    let n = c.n_queries * c.output_dim;
    if mapped.len() != b * n || preference.len() != b * n {
        return Err(Error::model(format!(
            "mapper returned {} and {} values, expected {b} x {} x {} each",
            mapped.len(),
            preference.len(),
            c.n_queries,
            c.output_dim
        )));
    }
    let shape = [c.n_queries, c.output_dim];
    (0..b)
        .map(|i| {
            Ok(MapperOutput {
                mapped: Tensor::from_f32(&shape, mapped[i * n..(i + 1) * n].to_vec())?,
                preference: Tensor::from_f32(&shape, preference[i * n..(i + 1) * n].to_vec())?,
            })
        })
        .collect()
}

/// The probe of a Mapper component: its shapes as facts for the wiring
/// checks, and the file it reads — `file_of(checkpoint)` (the checkpoint
/// itself for candle, its exported graph for ort and tch).
pub fn probe(spec: &ComponentSpec, file_of: impl Fn(&str) -> std::path::PathBuf) -> Result<crate::component::Probe> {
    let (c, ckpt) = parse_params(spec)?;
    let mut p = crate::component::Probe::default()
        .fact("input_dim", c.input_dim as u64)
        .fact("keyword_dim", c.keyword_dim as u64)
        .fact("output_tokens", c.n_queries as u64)
        .fact("output_dim", c.output_dim as u64)
        .fact("retrieval_dim", c.retrieval_dim as u64);
    if c.semantic_dim != 0 {
        p = p.fact("semantic_dim", c.semantic_dim as u64);
    }
    if let Some(path) = ckpt {
        let file = file_of(&path);
        p = if file == std::path::Path::new(&path) {
            p.file(&file)?
        } else {
            let export = format!("python scripts/export_mapper.py {path}{}", spec.dtype.export_flag());
            p.exported(&file, &export)?
        };
    }
    Ok(p)
}
