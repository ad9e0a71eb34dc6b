//! The BLIP captioner from the TorchScript modules `scripts/export_blip.py`
//! writes into an HF BLIP folder: `vision_model.ts` (pixel_values ->
//! image_embeds), `text_decoder_cross.ts` (image_embeds -> each layer's
//! cross-attention keys / values, once per image) and
//! `text_decoder_with_past.ts` ((input_ids, *past, *cross) -> (logits,
//! *present)). Preprocessing, tokenizer and decode loops are shared with
//! candle (`ragar_core::blip`, `ragar_core::decoding`); the caches stay on
//! the device.

use crate::{device, first_line, forward, load_module, to_host};
use ragar_core::blip::{caption, BlipDir};
use ragar_core::decoding::{generate, Cached, KvDecoder, Stepper};
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::sync::Mutex;
use tch::{CModule, IValue, Tensor};
use tokenizers::Tokenizer;

/// The modules, in the model folder.
pub const GRAPHS: [&str; 3] = ["vision_model.ts", "text_decoder_cross.ts", "text_decoder_with_past.ts"];

/// The BLIP captioner on libtorch.
pub struct BlipCaptioner {
    // CModule is not Sync; the contract is `&self`.
    vision: Mutex<CModule>,
    cross: Mutex<CModule>,
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
            cross: load(GRAPHS[1])?,
            decoder: load(GRAPHS[2])?,
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

    /// Run a module of tensors to a tuple of tensors.
    fn tuple(&self, module: &Mutex<CModule>, inputs: Vec<Tensor>, what: &str) -> Result<Vec<Tensor>> {
        let m = module
            .lock()
            .map_err(|_| Error::model("TorchScript module poisoned by an earlier panic"))?;
        let inputs: Vec<IValue> = inputs.into_iter().map(IValue::Tensor).collect();
        let out = tch::no_grad(|| m.forward_is(&inputs))
            .map_err(|e| Error::model(format!("{what} (TorchScript): {}", first_line(&e.to_string()))))?;
        let IValue::Tuple(out) = out else {
            return Err(Error::model(format!(
                "{what} (TorchScript): expected a tuple of tensors"
            )));
        };
        out.into_iter()
            .map(|v| match v {
                IValue::Tensor(t) => Ok(t),
                _ => Err(Error::model(format!("{what} (TorchScript): an output is not a tensor"))),
            })
            .collect()
    }
}

/// One decode: the self-attention cache and the rows' cross-attention
/// keys / values, on the device.
struct Decode<'a> {
    cap: &'a BlipCaptioner,
    cross: Vec<Tensor>,
    past: Vec<Tensor>,
    /// Every row decodes the same image (beam search): reordering leaves
    /// the cross keys / values as they are.
    one_image: bool,
}

impl KvDecoder for Decode<'_> {
    fn start(&mut self, rows: usize) -> Result<()> {
        let size = self.cross.first().map(Tensor::size).unwrap_or_default();
        if size.len() != 4 || size[0] as usize != rows {
            return Err(Error::model(format!(
                "cross keys of shape {size:?} for {rows} decoding rows"
            )));
        }
        let empty = [rows as i64, size[1], 0, size[3]];
        self.past = self
            .cross
            .iter()
            .map(|c| Tensor::zeros(empty, (c.kind(), c.device())))
            .collect();
        Ok(())
    }

    fn feed(&mut self, ids: &[i64], rows: usize, t: usize) -> Result<Vec<f32>> {
        let ids = Tensor::from_slice(ids)
            .reshape([rows as i64, t as i64])
            .to_device(self.cap.device);
        let mut inputs = vec![ids];
        inputs.append(&mut self.past);
        inputs.extend(self.cross.iter().map(Tensor::shallow_clone));
        let mut out = self.cap.tuple(&self.cap.decoder, inputs, "BLIP text decoder")?;
        if out.len() != 1 + self.cross.len() {
            return Err(Error::model(format!(
                "BLIP text decoder (TorchScript) returned {} tensors, expected logits + {}",
                out.len(),
                self.cross.len()
            )));
        }
        self.past = out.split_off(1);
        to_host(&out[0])
    }

    fn reorder(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(self.cap.device);
        self.past = self.past.iter().map(|p| p.index_select(0, &idx)).collect();
        if !self.one_image {
            self.cross = self.cross.iter().map(|c| c.index_select(0, &idx)).collect();
        }
        Ok(())
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
            if emb.dim() != 3 {
                return Err(Error::model(format!(
                    "image_embeds of shape {:?}, expected [n, tokens, width]",
                    emb.size()
                )));
            }
            let cross = self.tuple(&self.cross, vec![emb], "BLIP cross keys").map_err(at)?;
            let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
                let (cross, one_image) = match i {
                    None => (cross.iter().map(Tensor::shallow_clone).collect(), false),
                    Some(i) => {
                        let beams = [opts.beams as i64, 1, 1, 1];
                        (
                            cross.iter().map(|c| c.narrow(0, i as i64, 1).repeat(beams)).collect(),
                            true,
                        )
                    }
                };
                let decode = Decode {
                    cap: self,
                    cross,
                    past: Vec::new(),
                    one_image,
                };
                Ok(Box::new(Cached::new(decode, &prompt)))
            };
            let ids = generate(stepper, &prompt, chunk.len(), opts.beams, lim).map_err(at)?;
            for seq in ids {
                out.push(caption(&self.tokenizer, &seq)?);
            }
        }
        Ok(out)
    }
}
