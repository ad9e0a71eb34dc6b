//! CLIP as a ragar Encoder: projected, L2-normalised text and image features
//! in the shared space (what the paper's CS / CIS / CPS / CPIS metrics and
//! the retrieval module's visual features use). Model in `clip.rs`; the
//! folder, tokenisation, image preprocessing (PIL bicubic, centre crop, CLIP
//! mean/std) and normalisation are shared with the other backends
//! (`ragar_core::clip`).

use crate::checkpoint;
use crate::clip::{ClipModel, Config};
use crate::device::{device, dtype, model_err};
use candle_core::{DType, Device, Tensor};
use ragar_core::clip::{ClipDir, ClipParams};
use ragar_core::component::Probe;
use ragar_core::files::read_json;
use ragar_core::model::Fetch;
use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::text::{SentenceTokenizer, TokenBatch};
use ragar_core::{ComponentSpec, Image, Result};

fn files(spec: &ComponentSpec, fetch: Fetch) -> Result<(ClipParams, ClipDir, Config)> {
    let (params, dir) = ClipDir::open(spec, &[WEIGHTS], fetch)?;
    let config: Config = read_json(&dir.root.join("config.json"))?;
    Ok((params, dir, config))
}

const WEIGHTS: &str = "model.safetensors";

/// The CLIP encoder component.
pub struct ClipEncoder {
    model: ClipModel,
    tokenizer: SentenceTokenizer,
    dir: ClipDir,
    batch_size: usize,
    device: Device,
}

impl ClipEncoder {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir, config) = files(spec, Fetch::IfMissing)?;
        let device = device(spec)?;
        let weights = dir.root.join(WEIGHTS);
        let vb = checkpoint::var_builder(&[&weights], dtype(spec, &device)?, &device)?;
        let model = ClipModel::load(vb, &config).map_err(model_err(weights.display()))?;
        Ok(ClipEncoder {
            model,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
            device,
        })
    }

    /// Params, files and `text_dim` / `image_dim` without loading weights.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        ClipDir::probe(spec, &[WEIGHTS])
    }

    fn text_forward(&self, b: &TokenBatch) -> candle_core::Result<Vec<f32>> {
        let shape = (b.batch, b.seq_len);
        let ids = Tensor::from_vec(b.ids.iter().map(|&x| x as u32).collect::<Vec<_>>(), shape, &self.device)?;
        let mask = Tensor::from_vec(
            b.mask.iter().map(|&x| x as u32).collect::<Vec<_>>(),
            shape,
            &self.device,
        )?;
        flat(&self.model.text_features(&ids, Some(&mask))?)
    }

    fn image_forward(&self, n: usize, pixels: Vec<f32>) -> candle_core::Result<Vec<f32>> {
        let size = self.dir.image_size;
        let pixels = Tensor::from_vec(pixels, (n, 3, size, size), &self.device)?;
        flat(&self.model.image_features(&pixels)?)
    }
}

/// Projected features as f32 on the host (normalised by `ClipDir`).
fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

impl Encoder for ClipEncoder {
    fn info(&self) -> EncoderInfo {
        self.dir.info()
    }

    fn embed_text(&self, texts: &[String]) -> Result<TextEmbeddings> {
        crate::device::on_pool(&self.device, || {
            self.dir.embed_text(texts, self.batch_size, &self.tokenizer, |b| {
                self.text_forward(b).map_err(model_err("CLIP text"))
            })
        })
    }

    fn embed_image(&self, images: &[Image]) -> Result<ragar_core::Tensor> {
        crate::device::on_pool(&self.device, || {
            self.dir.embed_image(images, self.batch_size, |n, px| {
                self.image_forward(n, px).map_err(model_err("CLIP image"))
            })
        })
    }
}
