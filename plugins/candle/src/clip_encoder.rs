//! CLIP as a ragar Encoder: projected, L2-normalised text and image features
//! in the shared space (what the paper's CS / CIS / CPS / CPIS metrics and
//! the retrieval module's visual features use). Model in `clip.rs`; image
//! preprocessing (PIL bicubic, centre crop, CLIP mean/std) and tokenisation
//! are shared with the other backends (`ragar_core::vision`, `ragar_core::text`).

use crate::clip::{normalize, ClipModel, Config};
use crate::device::{device, dtype, model_err};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ragar_core::component::Probe;
use ragar_core::files::read_json;
use ragar_core::model::{Fetch, ModelSource};
use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::text::SentenceTokenizer;
use ragar_core::vision::{clip_preprocess, CLIP_MEAN, CLIP_STD};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::path::PathBuf;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// HF layout: config.json, model.safetensors, tokenizer.json
    /// (+ optional preprocessor_config.json).
    model_dir: String,
    #[serde(default = "default_batch")]
    batch_size: usize,
}

fn default_batch() -> usize {
    32
}

/// Mean/std from `preprocessor_config.json` when present.
#[derive(serde::Deserialize)]
struct Preprocessor {
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

struct Files {
    config: Config,
    weights: PathBuf,
    tokenizer: PathBuf,
    mean: [f32; 3],
    std: [f32; 3],
}

fn files(spec: &ComponentSpec, fetch: Fetch) -> Result<(Params, Files)> {
    let params: Params = spec.params()?;
    if params.batch_size == 0 {
        return Err(Error::config(format!(
            "{}.params.batch_size must be at least 1",
            spec.key
        )));
    }
    let dir = ModelSource::parse(&params.model_dir, |p| spec.resolve_path(p))?.resolve(
        &["config.json", "model.safetensors", "tokenizer.json"],
        &["preprocessor_config.json", "tokenizer_config.json"],
        fetch,
    )?;
    let config: Config = read_json(&dir.join("config.json"))?;
    let (weights, tokenizer) = (dir.join("model.safetensors"), dir.join("tokenizer.json"));
    let pre = dir.join("preprocessor_config.json");
    let (mean, std) = if pre.is_file() {
        let p: Preprocessor = read_json(&pre)?;
        (p.image_mean.unwrap_or(CLIP_MEAN), p.image_std.unwrap_or(CLIP_STD))
    } else {
        (CLIP_MEAN, CLIP_STD)
    };
    Ok((
        params,
        Files {
            config,
            weights,
            tokenizer,
            mean,
            std,
        },
    ))
}

/// The CLIP encoder component.
pub struct ClipEncoder {
    model: ClipModel,
    tokenizer: SentenceTokenizer,
    files: Files,
    batch_size: usize,
    device: Device,
}

impl ClipEncoder {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, files) = files(spec, Fetch::IfMissing)?;
        let device = device(spec)?;
        // Safety: read-only memory map of a file ragar does not modify.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], dtype(spec, &device)?, &device) }
            .map_err(model_err(files.weights.display()))?;
        let model = ClipModel::load(vb, &files.config).map_err(model_err(files.weights.display()))?;
        let tokenizer =
            SentenceTokenizer::from_file(&files.tokenizer, files.config.text_config.max_position_embeddings)?;
        Ok(ClipEncoder {
            model,
            tokenizer,
            files,
            batch_size: params.batch_size,
            device,
        })
    }

    /// Params, files and `text_dim` / `image_dim` without loading weights.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        let (_, f) = files(spec, Fetch::Never)?;
        let d = f.config.projection_dim as u64;
        Ok(Probe::default()
            .file(&f.weights)?
            .file(&f.tokenizer)?
            .fact("text_dim", d)
            .fact("image_dim", d))
    }

    fn text_batch(&self, texts: &[String]) -> candle_core::Result<(Tensor, Vec<u32>)> {
        let b = self
            .tokenizer
            .encode(texts)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let shape = (b.batch, b.seq_len);
        let ids = Tensor::from_vec(b.ids.iter().map(|&x| x as u32).collect::<Vec<_>>(), shape, &self.device)?;
        let mask = Tensor::from_vec(
            b.mask.iter().map(|&x| x as u32).collect::<Vec<_>>(),
            shape,
            &self.device,
        )?;
        let feats = normalize(&self.model.text_features(&ids, Some(&mask))?)?;
        Ok((feats, b.truncated))
    }
}

fn rows(t: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    t.to_dtype(DType::F32)?.to_vec2()
}

impl Encoder for ClipEncoder {
    fn info(&self) -> EncoderInfo {
        EncoderInfo {
            dim: self.files.config.projection_dim as u32,
            text: true,
            image: true,
            max_tokens: self.tokenizer.max_len() as u32,
            normalized: true,
        }
    }

    fn embed_text(&self, texts: &[String]) -> Result<TextEmbeddings> {
        let mut out = Vec::with_capacity(texts.len());
        let mut truncated = Vec::new();
        for (c, chunk) in texts.chunks(self.batch_size).enumerate() {
            let (feats, t) = self.text_batch(chunk).map_err(model_err("CLIP text"))?;
            out.extend(rows(&feats).map_err(model_err("CLIP text"))?);
            truncated.extend(t.iter().map(|i| i + (c * self.batch_size) as u32));
        }
        let dim = self.files.config.projection_dim;
        let vectors = if out.is_empty() {
            ragar_core::Tensor::from_f32(&[0, dim], vec![])?
        } else {
            ragar_core::Tensor::from_rows(&out)?
        };
        Ok(TextEmbeddings {
            vectors,
            truncated: truncated.into(),
        })
    }

    fn embed_image(&self, images: &[Image]) -> Result<ragar_core::Tensor> {
        let size = self.model.vision.image_size();
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.batch_size) {
            let mut flat = Vec::with_capacity(chunk.len() * 3 * size * size);
            for (i, img) in chunk.iter().enumerate() {
                flat.extend(
                    clip_preprocess(img, size as u32, self.files.mean, self.files.std)
                        .map_err(|e| e.context(format!("image {i}")))?,
                );
            }
            let pixels =
                Tensor::from_vec(flat, (chunk.len(), 3, size, size), &self.device).map_err(model_err("CLIP image"))?;
            let feats = self
                .model
                .image_features(&pixels)
                .and_then(|f| normalize(&f))
                .map_err(model_err("CLIP image"))?;
            out.extend(rows(&feats).map_err(model_err("CLIP image"))?);
        }
        if out.is_empty() {
            return ragar_core::Tensor::from_f32(&[0, self.files.config.projection_dim], vec![]);
        }
        ragar_core::Tensor::from_rows(&out)
    }
}
