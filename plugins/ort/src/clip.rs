//! CLIP text and image encoder from two ONNX graphs exported by
//! `scripts/export_clip.py` from an HF `CLIPModel` folder:
//! `text_model.onnx` (`input_ids`, `attention_mask` int64 `[batch, seq]` ->
//! `text_embeds`) and `vision_model.onnx` (`pixel_values` f32
//! `[batch, 3, size, size]` -> `image_embeds`), both projected and not yet
//! normalised. Tokenisation, preprocessing and normalisation are shared with
//! the other backends (`ragar_core::clip`).

use crate::runtime::{check_io, ort_err as err, run_f32, session};
use ort::session::Session;
use ort::value::Tensor;
use ragar_core::clip::ClipDir;
use ragar_core::model::Fetch;
use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::text::{SentenceTokenizer, TokenBatch};
use ragar_core::{ComponentSpec, Image, Result};
use std::sync::Mutex;

/// The graphs this encoder reads.
pub const GRAPHS: [&str; 2] = ["text_model.onnx", "vision_model.onnx"];

/// The CLIP encoder on ONNX Runtime.
pub struct ClipEncoder {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    text: Mutex<Session>,
    vision: Mutex<Session>,
    tokenizer: SentenceTokenizer,
    dir: ClipDir,
    batch_size: usize,
}

impl ClipEncoder {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = ClipDir::open(spec, &GRAPHS, Fetch::IfMissing)?;
        let (tp, vp) = (dir.root.join(GRAPHS[0]), dir.root.join(GRAPHS[1]));
        let text = session(spec, &tp)?;
        check_io(
            &text,
            &tp,
            &["input_ids", "attention_mask"],
            &["input_ids", "attention_mask"],
            "text_embeds",
        )?;
        let vision = session(spec, &vp)?;
        check_io(&vision, &vp, &["pixel_values"], &["pixel_values"], "image_embeds")?;
        Ok(ClipEncoder {
            text: Mutex::new(text),
            vision: Mutex::new(vision),
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    fn text_forward(&self, b: &TokenBatch) -> Result<Vec<f32>> {
        let shape = vec![b.batch as i64, b.seq_len as i64];
        let ids = Tensor::from_array((shape.clone(), b.ids.clone())).map_err(err)?;
        let mask = Tensor::from_array((shape, b.mask.clone())).map_err(err)?;
        run_f32(
            &self.text,
            vec![("input_ids", ids.into_dyn()), ("attention_mask", mask.into_dyn())],
            "text_embeds",
        )
    }

    fn image_forward(&self, n: usize, pixels: Vec<f32>) -> Result<Vec<f32>> {
        let size = self.dir.image_size as i64;
        let x = Tensor::from_array((vec![n as i64, 3, size, size], pixels)).map_err(err)?;
        run_f32(&self.vision, vec![("pixel_values", x.into_dyn())], "image_embeds")
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
