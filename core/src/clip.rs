//! What every backend's CLIP encoder shares: the model folder (HF
//! `CLIPModel` layout: `config.json`, `tokenizer.json`, optional
//! `preprocessor_config.json`, plus each backend's graph files), the
//! tokenisation, the image preprocessing and the L2 normalisation. A backend
//! supplies only the two towers' forward passes (projected features), so
//! `encoder.backend=candle|ort|tch` switches the towers and nothing else.

use crate::component::Probe;
use crate::files::read_json;
use crate::model::{Fetch, ModelSource};
use crate::stage::{EncoderInfo, TextEmbeddings};
use crate::text::{SentenceTokenizer, TokenBatch};
use crate::vision::{clip_preprocess, CLIP_MEAN, CLIP_STD};
use crate::{ComponentSpec, DType, Error, Image, Result, Tensor};
use std::path::PathBuf;

/// The `params:` of a CLIP encoder, the same for every backend.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipParams {
    /// The model folder (`${RAGAR_CACHE}`, config-relative paths and
    /// `hf:org/name@rev` allowed).
    pub model_dir: String,
    /// Texts or images per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_batch() -> usize {
    32
}

#[derive(serde::Deserialize)]
struct TextConfig {
    max_position_embeddings: usize,
}

#[derive(serde::Deserialize)]
struct VisionConfig {
    image_size: usize,
}

#[derive(serde::Deserialize)]
struct ConfigJson {
    projection_dim: usize,
    text_config: TextConfig,
    vision_config: VisionConfig,
}

/// Mean/std from `preprocessor_config.json` when present.
#[derive(serde::Deserialize)]
struct Preprocessor {
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

/// A resolved CLIP model folder.
#[derive(Clone, Debug)]
pub struct ClipDir {
    /// The folder.
    pub root: PathBuf,
    /// Size of the shared feature space.
    pub projection_dim: usize,
    /// Token limit of the text tower (77).
    pub max_tokens: usize,
    /// Side of the square input image.
    pub image_size: usize,
    /// Per-channel normalisation.
    pub mean: [f32; 3],
    /// Per-channel normalisation.
    pub std: [f32; 3],
}

impl ClipDir {
    /// Parse the spec's params, resolve the folder and check that `graphs`
    /// (the backend's files, e.g. `text_model.onnx`) are in it; a missing
    /// graph names the export script.
    pub fn open(spec: &ComponentSpec, graphs: &[&str], fetch: Fetch) -> Result<(ClipParams, ClipDir)> {
        let params: ClipParams = spec.params()?;
        if params.batch_size == 0 {
            return Err(Error::config(format!(
                "{}.params.batch_size must be at least 1",
                spec.key
            )));
        }
        let source = ModelSource::parse(&params.model_dir, |p| spec.resolve_path(p))?;
        let root = source.resolve(
            &["config.json", "tokenizer.json"],
            &["preprocessor_config.json", "tokenizer_config.json"],
            fetch,
        )?;
        for g in graphs {
            if source.resolve(&[g], &[], fetch).is_err() {
                return Err(Error::not_found(format!(
                    "missing model file {} (export it from the checkpoint with: python scripts/export_clip.py {}{})",
                    root.join(g).display(),
                    root.display(),
                    DType::of_exported_file(g).export_flag()
                )));
            }
        }
        let config: ConfigJson = read_json(&root.join("config.json"))?;
        let pre = root.join("preprocessor_config.json");
        let (mean, std) = if pre.is_file() {
            let p: Preprocessor = read_json(&pre)?;
            (p.image_mean.unwrap_or(CLIP_MEAN), p.image_std.unwrap_or(CLIP_STD))
        } else {
            (CLIP_MEAN, CLIP_STD)
        };
        Ok((
            params,
            ClipDir {
                root,
                projection_dim: config.projection_dim,
                max_tokens: config.text_config.max_position_embeddings,
                image_size: config.vision_config.image_size,
                mean,
                std,
            },
        ))
    }

    /// The probe: files present, `text_dim` / `image_dim`; loads no weights.
    pub fn probe(spec: &ComponentSpec, graphs: &[&str]) -> Result<Probe> {
        let (_, dir) = ClipDir::open(spec, graphs, Fetch::Never)?;
        let mut p = Probe::default().file(&dir.root.join("tokenizer.json"))?;
        for g in graphs {
            p = p.file(&dir.root.join(g))?;
        }
        let d = dir.projection_dim as u64;
        Ok(p.fact("text_dim", d).fact("image_dim", d))
    }

    /// The folder's tokenizer, truncating at the text tower's limit.
    pub fn tokenizer(&self) -> Result<SentenceTokenizer> {
        SentenceTokenizer::from_file(&self.root.join("tokenizer.json"), self.max_tokens)
    }

    /// What the encoder reports.
    pub fn info(&self) -> EncoderInfo {
        EncoderInfo {
            dim: self.projection_dim as u32,
            text: true,
            image: true,
            max_tokens: self.max_tokens as u32,
            normalized: true,
        }
    }

    /// Text features: tokenised in chunks of `batch_size`, `forward` maps a
    /// token batch to projected features `[batch, projection_dim]`, rows
    /// L2-normalised here.
    pub fn embed_text(
        &self,
        texts: &[String],
        batch_size: usize,
        tokenizer: &SentenceTokenizer,
        mut forward: impl FnMut(&TokenBatch) -> Result<Vec<f32>>,
    ) -> Result<TextEmbeddings> {
        let mut rows = Vec::with_capacity(texts.len());
        let mut truncated = Vec::new();
        for (c, chunk) in texts.chunks(batch_size.max(1)).enumerate() {
            let b = tokenizer.encode(chunk)?;
            let out = forward(&b)?;
            rows.extend(self.normalized_rows(out, b.batch, "text")?);
            truncated.extend(b.truncated.iter().map(|i| i + (c * batch_size) as u32));
        }
        Ok(TextEmbeddings {
            vectors: self.tensor(rows)?,
            truncated: truncated.into(),
        })
    }

    /// Image features: each image preprocessed (bicubic resize of the
    /// shorter side, centre crop, mean/std), `forward` maps `n` images as
    /// `[n, 3, size, size]` values to projected features, rows normalised.
    pub fn embed_image(
        &self,
        images: &[Image],
        batch_size: usize,
        mut forward: impl FnMut(usize, Vec<f32>) -> Result<Vec<f32>>,
    ) -> Result<Tensor> {
        let size = self.image_size;
        let mut rows = Vec::with_capacity(images.len());
        for (c, chunk) in images.chunks(batch_size.max(1)).enumerate() {
            let mut flat = Vec::with_capacity(chunk.len() * 3 * size * size);
            for (i, img) in chunk.iter().enumerate() {
                flat.extend(
                    clip_preprocess(img, size as u32, self.mean, self.std)
                        .map_err(|e| e.context(format!("image {}", c * batch_size + i)))?,
                );
            }
            let out = forward(chunk.len(), flat)?;
            rows.extend(self.normalized_rows(out, chunk.len(), "image")?);
        }
        self.tensor(rows)
    }

    fn normalized_rows(&self, out: Vec<f32>, n: usize, tower: &str) -> Result<Vec<Vec<f32>>> {
        let d = self.projection_dim;
        if out.len() != n * d {
            return Err(Error::model(format!(
                "CLIP {tower} tower returned {} values, expected {n} x {d}",
                out.len()
            )));
        }
        Ok(out
            .chunks(d)
            .map(|r| {
                let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                r.iter().map(|x| x / norm).collect()
            })
            .collect())
    }

    fn tensor(&self, rows: Vec<Vec<f32>>) -> Result<Tensor> {
        if rows.is_empty() {
            Tensor::from_f32(&[0, self.projection_dim], vec![])
        } else {
            Tensor::from_rows(&rows)
        }
    }
}
