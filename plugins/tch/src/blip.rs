//! The BLIP captioner from the TorchScript modules `scripts/export_blip.py`
//! writes into an HF BLIP folder: `vision_model.ts` (pixel_values ->
//! image_embeds), `text_decoder_cross.ts` (image_embeds -> each layer's
//! cross-attention keys / values, once per image) and
//! `text_decoder_with_past.ts` ((input_ids, *past, *cross) -> (logits,
//! *present)). Preprocessing, tokenizer and decode loops are shared with
//! candle (`ragar_core::blip`, `ragar_core::decoding`); the caches stay on
//! the device. `dtype: f16` reads the `*.f16.ts` exports
//! (`export_blip.py --dtype f16`): pixels in f16, the caches in the
//! modules' kind, logits back in f32.

use crate::{forward, forward_tuple, load_module_as, module_file, placement, to_host};
use ragar_core::blip::{caption_chunks, AnyBlip, BlipDir};
use ragar_core::decoding::{generate, Cached, KvDecoder, Stepper};
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::sync::Mutex;
use tch::{CModule, Tensor};
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
    /// The modules' float kind (the config's dtype).
    kind: tch::Kind,
    tokenizer: Tokenizer,
    dir: BlipDir,
    batch_size: usize,
}

impl BlipCaptioner {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = BlipDir::open(spec, Fetch::IfMissing)?;
        let (device, kind) = placement(spec)?;
        let load = |g: &str| -> Result<Mutex<CModule>> {
            let path = dir.exported(&module_file(spec, g))?;
            load_module_as(&path, device, kind).map(Mutex::new)
        };
        Ok(BlipCaptioner {
            vision: load(GRAPHS[0])?,
            cross: load(GRAPHS[1])?,
            decoder: load(GRAPHS[2])?,
            device,
            kind,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    /// The processor's pixels of `images` on the device.
    fn pixels(&self, images: &[Image]) -> Result<Tensor> {
        pixels(&self.dir, images, self.device, self.kind)
    }
}

/// The processor's pixel values `[n, 3, h, w]` on `device`, in `kind`.
pub(crate) fn pixels(dir: &BlipDir, images: &[Image], device: tch::Device, kind: tch::Kind) -> Result<Tensor> {
    let (w, h) = dir.size;
    Ok(Tensor::from_slice(&dir.pixel_values(images)?)
        .reshape([images.len() as i64, 3, h as i64, w as i64])
        .to_device(device)
        .to_kind(kind))
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
        let mut out = forward_tuple(&self.cap.decoder, inputs, "BLIP text decoder")?;
        if out.len() != 1 + self.cross.len() {
            return Err(Error::model(format!(
                "BLIP text decoder (TorchScript) returned {} tensors, expected logits + {}",
                out.len(),
                self.cross.len()
            )));
        }
        self.past = out.split_off(1);
        to_host(&out[0].select(1, t as i64 - 1))
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
        let prefix = self
            .dir
            .prefix(&self.tokenizer, opts.prompt.as_str(), opts.max_tokens)?;
        caption_chunks(images, self.batch_size, &self.tokenizer, |chunk| {
            let emb = forward(&self.vision, &[self.pixels(chunk)?], "BLIP vision model")?;
            if emb.dim() != 3 {
                return Err(Error::model(format!(
                    "image_embeds of shape {:?}, expected [n, tokens, width]",
                    emb.size()
                )));
            }
            let cross = forward_tuple(&self.cross, vec![emb], "BLIP cross keys")?;
            let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
                let (cross, one_image) = match i {
                    None => (cross.iter().map(Tensor::shallow_clone).collect(), false),
                    Some(i) => (repeat_row(&cross, i, opts.beams), true),
                };
                let decode = Decode {
                    cap: self,
                    cross,
                    past: Vec::new(),
                    one_image,
                };
                Ok(Box::new(Cached::new(decode, &prefix.ids)))
            };
            generate(stepper, &prefix.ids, chunk.len(), opts.beams, prefix.lim)
        })
    }
}

/// Row `i` of each tensor, repeated `times` (one image's beams).
pub(crate) fn repeat_row(tensors: &[Tensor], i: usize, times: u32) -> Vec<Tensor> {
    tensors
        .iter()
        .map(|t| {
            let mut reps = vec![1i64; t.dim()];
            reps[0] = times as i64;
            t.narrow(0, i as i64, 1).repeat(&reps)
        })
        .collect()
}

/// The `blip` / `blip2` components on libtorch: BLIP or BLIP-2, as the
/// folder's `model_type` says.
pub type AnyBlipCaptioner = AnyBlip<BlipCaptioner, crate::blip2::Blip2Captioner>;

/// Load the folder's architecture.
pub fn load(spec: &ComponentSpec) -> Result<AnyBlipCaptioner> {
    AnyBlip::load(spec, BlipCaptioner::load, crate::blip2::Blip2Captioner::load)
}

/// Params and the architecture's graphs without loading them.
pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
    let (blip, blip2) = (
        GRAPHS.map(|g| module_file(spec, g)),
        crate::blip2::GRAPHS.map(|g| module_file(spec, g)),
    );
    BlipDir::probe(
        spec,
        &blip.each_ref().map(String::as_str),
        &blip2.each_ref().map(String::as_str),
    )
}
