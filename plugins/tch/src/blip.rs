//! The BLIP captioner from the two TorchScript modules
//! `scripts/export_blip.py` writes into an HF BLIP folder
//! (`vision_model.ts`: pixel_values -> image_embeds; `text_decoder.ts`:
//! (input_ids, image_embeds) -> logits). Preprocessing, tokenizer and decode
//! loops are shared with candle (`ragar_core::blip`,
//! `ragar_core::decoding`); the module has no key/value cache, so each step
//! re-runs the prefix (`Recompute`).

use crate::{device, forward, load_module, to_host};
use ragar_core::blip::{caption, BlipDir};
use ragar_core::decoding::{generate, Recompute, Stepper};
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::sync::Mutex;
use tch::{CModule, Tensor};
use tokenizers::Tokenizer;

/// The modules, in the model folder.
pub const GRAPHS: [&str; 2] = ["vision_model.ts", "text_decoder.ts"];

/// The BLIP captioner on libtorch.
pub struct BlipCaptioner {
    // CModule is not Sync; the contract is `&self`.
    vision: Mutex<CModule>,
    decoder: Mutex<CModule>,
    device: tch::Device,
    tokenizer: Tokenizer,
    dir: BlipDir,
    batch_size: usize,
}

impl BlipCaptioner {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = BlipDir::open(spec, Fetch::IfMissing)?;
        let device = device(spec)?;
        let load = |g: &str| -> Result<Mutex<CModule>> {
            let path = dir.exported("tch", g)?;
            load_module(&path, device).map(Mutex::new)
        };
        Ok(BlipCaptioner {
            vision: load(GRAPHS[0])?,
            decoder: load(GRAPHS[1])?,
            device,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    /// Params and modules without loading them.
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        let (_, dir) = BlipDir::open(spec, Fetch::Never)?;
        GRAPHS
            .iter()
            .try_fold(ragar_core::component::Probe::default(), |p, g| {
                p.file(&dir.root.join(g))
            })?
            .file(&dir.root.join("tokenizer.json"))
    }

    fn decode(&self, ids: &[i64], rows: usize, len: usize, context: &[f32], n: usize, d: usize) -> Result<Vec<f32>> {
        let ids = Tensor::from_slice(ids)
            .reshape([rows as i64, len as i64])
            .to_device(self.device);
        let emb = Tensor::from_slice(context)
            .reshape([rows as i64, n as i64, d as i64])
            .to_device(self.device);
        to_host(&forward(&self.decoder, &[ids, emb], "BLIP text decoder")?)
    }
}

impl Captioner for BlipCaptioner {
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
        let (prompt, lim) = self
            .dir
            .blip_prefix(&self.tokenizer, opts.prompt.as_str(), opts.max_tokens)?;
        let (w, h) = self.dir.size;
        let mut out = Vec::with_capacity(images.len());
        for (c, chunk) in images.chunks(self.batch_size).enumerate() {
            let at = |e: Error| {
                e.context(format!(
                    "images {}..{}",
                    c * self.batch_size,
                    c * self.batch_size + chunk.len()
                ))
            };
            let px = Tensor::from_slice(&self.dir.pixel_values(chunk)?)
                .reshape([chunk.len() as i64, 3, h as i64, w as i64])
                .to_device(self.device);
            let emb = forward(&self.vision, &[px], "BLIP vision model").map_err(at)?;
            let (n, d) = match emb.size().as_slice() {
                [_, n, d] => (*n as usize, *d as usize),
                s => {
                    return Err(Error::model(format!(
                        "image_embeds of shape {s:?}, expected [n, tokens, width]"
                    )))
                }
            };
            let emb = to_host(&emb)?;
            let width = n * d;
            let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
                let context = match i {
                    Some(i) => emb[i * width..(i + 1) * width].to_vec(),
                    None => emb.clone(),
                };
                Ok(Box::new(Recompute::new(
                    move |ids: &[i64], rows, len, ctx: &[f32]| self.decode(ids, rows, len, ctx, n, d),
                    &prompt,
                    context,
                    width,
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
