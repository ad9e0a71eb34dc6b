//! CLIP text and image encoder from two TorchScript modules exported by
//! `scripts/export_clip.py` from an HF `CLIPModel` folder: `text_model.ts`
//! (`input_ids`, `attention_mask` int64 `[batch, seq]` -> projected text
//! features) and `vision_model.ts` (`pixel_values` f32 `[batch, 3, size,
//! size]` -> projected image features). Tokenisation, preprocessing and
//! normalisation are shared with the other backends (`ragar_core::clip`).
//! `dtype: f16` reads the half-precision exports (`text_model.f16.ts`,
//! `vision_model.f16.ts`; `export_clip.py --dtype f16`) and feeds them f16
//! pixels; features come back as f32.

use crate::{forward, load_module_as, module_file, placement, to_host};
use ragar_core::clip::ClipDir;
use ragar_core::model::Fetch;
use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::text::{SentenceTokenizer, TokenBatch};
use ragar_core::{ComponentSpec, Image, Result};
use std::sync::Mutex;
use tch::{CModule, Tensor};

/// The modules this encoder reads.
pub const GRAPHS: [&str; 2] = ["text_model.ts", "vision_model.ts"];

/// The modules the spec's dtype reads: [`GRAPHS`], or their `.f16.ts` exports.
pub fn graphs(spec: &ComponentSpec) -> [String; 2] {
    GRAPHS.map(|g| module_file(spec, g))
}

/// The CLIP encoder on libtorch.
pub struct ClipEncoder {
    // CModule is not Sync; the contract is `&self`.
    text: Mutex<CModule>,
    vision: Mutex<CModule>,
    device: tch::Device,
    /// The modules' float kind (the config's dtype).
    kind: tch::Kind,
    tokenizer: SentenceTokenizer,
    dir: ClipDir,
    batch_size: usize,
}

impl ClipEncoder {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let graphs = graphs(spec);
        let (params, dir) = ClipDir::open(spec, &[&graphs[0], &graphs[1]], Fetch::IfMissing)?;
        let (device, kind) = placement(spec)?;
        let load = |g: &str| load_module_as(&dir.root.join(g), device, kind).map(Mutex::new);
        Ok(ClipEncoder {
            text: load(&graphs[0])?,
            vision: load(&graphs[1])?,
            device,
            kind,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    fn run(&self, module: &Mutex<CModule>, inputs: &[Tensor], what: &str) -> Result<Vec<f32>> {
        to_host(&forward(module, inputs, &format!("CLIP {what}"))?)
    }

    fn text_forward(&self, b: &TokenBatch) -> Result<Vec<f32>> {
        let shape = [b.batch as i64, b.seq_len as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).reshape(shape).to_device(self.device);
        self.run(&self.text, &[t(&b.ids), t(&b.mask)], "text")
    }

    fn image_forward(&self, n: usize, pixels: Vec<f32>) -> Result<Vec<f32>> {
        let s = self.dir.image_size as i64;
        let x = Tensor::from_slice(&pixels)
            .reshape([n as i64, 3, s, s])
            .to_device(self.device)
            .to_kind(self.kind);
        self.run(&self.vision, &[x], "image")
    }
}

impl Encoder for ClipEncoder {
    fn info(&self) -> EncoderInfo {
        self.dir.info()
    }

    fn embed_text(&self, texts: &[String]) -> Result<TextEmbeddings> {
        self.dir
            .embed_text(texts, self.batch_size, &self.tokenizer, |b| self.text_forward(b))
    }

    fn embed_image(&self, images: &[Image]) -> Result<ragar_core::Tensor> {
        self.dir
            .embed_image(images, self.batch_size, |n, px| self.image_forward(n, px))
    }
}
