//! The BLIP captioner from the two ONNX graphs `scripts/export_blip.py`
//! writes into an HF BLIP folder (`vision_model.onnx`: pixel_values ->
//! image_embeds; `text_decoder.onnx`: input_ids, image_embeds -> logits).
//! Preprocessing, tokenizer and decode loops are shared with candle
//! (`ragar_core::blip`, `ragar_core::decoding`); the decoder graph has no
//! key/value cache, so each step re-runs the prefix (`Recompute`).

use crate::runtime::{check_io, lock, ort_err as err, run_f32, session};
use ort::session::Session;
use ort::value::Tensor;
use ragar_core::blip::{caption, BlipDir};
use ragar_core::decoding::{generate, Recompute, Stepper};
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::sync::Mutex;
use tokenizers::Tokenizer;

/// The graphs, in the model folder.
pub const GRAPHS: [&str; 2] = ["vision_model.onnx", "text_decoder.onnx"];

/// The BLIP captioner on ONNX Runtime.
pub struct BlipCaptioner {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    vision: Mutex<Session>,
    decoder: Mutex<Session>,
    tokenizer: Tokenizer,
    dir: BlipDir,
    batch_size: usize,
}

impl BlipCaptioner {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = BlipDir::open(spec, Fetch::IfMissing)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let open = |g: &str, inputs: &[&str], output: &str| -> Result<Mutex<Session>> {
            let path = dir.exported("ort", g)?;
            let s = session(spec, &path, threads)?;
            check_io(&s, &path, inputs, inputs, output)?;
            Ok(Mutex::new(s))
        };
        Ok(BlipCaptioner {
            vision: open(GRAPHS[0], &["pixel_values"], "image_embeds")?,
            decoder: open(GRAPHS[1], &["input_ids", "image_embeds"], "logits")?,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    /// Params and graphs without loading them.
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        let (_, dir) = BlipDir::open(spec, Fetch::Never)?;
        GRAPHS
            .iter()
            .try_fold(ragar_core::component::Probe::default(), |p, g| {
                p.file(&dir.root.join(g))
            })?
            .file(&dir.root.join("tokenizer.json"))
    }

    /// `[n, tokens, width]` image embeddings, and (tokens, width).
    fn embed(&self, images: &[Image]) -> Result<(Vec<f32>, usize, usize)> {
        let (w, h) = self.dir.size;
        let px = Tensor::from_array((
            vec![images.len() as i64, 3, h as i64, w as i64],
            self.dir.pixel_values(images)?,
        ))
        .map_err(err)?;
        let mut s = lock(&self.vision)?;
        let out = s.run(ort::inputs!["pixel_values" => px]).map_err(err)?;
        let (shape, data) = out["image_embeds"].try_extract_tensor::<f32>().map_err(err)?;
        if shape.len() != 3 {
            return Err(Error::model(format!(
                "image_embeds of shape {shape:?}, expected [n, tokens, width]"
            )));
        }
        Ok((data.to_vec(), shape[1] as usize, shape[2] as usize))
    }

    fn decode(&self, ids: &[i64], rows: usize, len: usize, context: &[f32], n: usize, d: usize) -> Result<Vec<f32>> {
        let ids = Tensor::from_array((vec![rows as i64, len as i64], ids.to_vec())).map_err(err)?;
        let emb = Tensor::from_array((vec![rows as i64, n as i64, d as i64], context.to_vec())).map_err(err)?;
        run_f32(
            &self.decoder,
            vec![("input_ids", ids.into_dyn()), ("image_embeds", emb.into_dyn())],
            "logits",
        )
    }
}

impl Captioner for BlipCaptioner {
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
        let (prompt, lim) = self
            .dir
            .blip_prefix(&self.tokenizer, opts.prompt.as_str(), opts.max_tokens)?;
        let mut out = Vec::with_capacity(images.len());
        for (c, chunk) in images.chunks(self.batch_size).enumerate() {
            let at = |e: Error| {
                e.context(format!(
                    "images {}..{}",
                    c * self.batch_size,
                    c * self.batch_size + chunk.len()
                ))
            };
            let (emb, n, d) = self.embed(chunk).map_err(at)?;
            let w = n * d;
            let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
                let context = match i {
                    Some(i) => emb[i * w..(i + 1) * w].to_vec(),
                    None => emb.clone(),
                };
                Ok(Box::new(Recompute::new(
                    move |ids: &[i64], rows, len, ctx: &[f32]| self.decode(ids, rows, len, ctx, n, d),
                    &prompt,
                    context,
                    w,
                )))
            };
            let ids = generate(stepper, &prompt, chunk.len(), opts.beams, lim).map_err(at)?;
            for seq in ids {
                out.push(caption(&self.tokenizer, &seq)?);
            }
        }
        Ok(out)
    }
}
