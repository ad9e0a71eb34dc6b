//! The BLIP-2 (OPT) captioner from the TorchScript modules
//! `scripts/export_blip.py` writes into an HF Blip2ForConditionalGeneration
//! folder: `image_queries.ts` (pixel_values -> the projected Q-Former
//! queries), `embed_tokens.ts` (input_ids -> inputs_embeds) and
//! `language_model_with_past.ts` ((inputs_embeds, attention_mask, *past) ->
//! (logits, *present)). The prefix is the queries in place of the `<image>`
//! placeholders (or before the text), then the prompt; preprocessing,
//! tokenizer, prefix and decode loops are shared with candle
//! (`ragar_core::blip`, `ragar_core::decoding`); the cache stays on the
//! device.

use crate::blip::{pixels, repeat_row};
use crate::{forward, forward_tuple, load_module_as, module_file, placement, to_host};
use ragar_core::blip::{caption_chunks, BlipDir};
use ragar_core::decoding::{generate, Cached, KvDecoder, Stepper};
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::sync::Mutex;
use tch::{CModule, Kind, Tensor};
use tokenizers::Tokenizer;

/// The modules, in the model folder.
pub const GRAPHS: [&str; 3] = ["image_queries.ts", "embed_tokens.ts", "language_model_with_past.ts"];

/// The BLIP-2 captioner on libtorch.
pub struct Blip2Captioner {
    // CModule is not Sync; the contract is `&self`.
    queries: Mutex<CModule>,
    embed: Mutex<CModule>,
    lm: Mutex<CModule>,
    layers: usize,
    heads: usize,
    head_dim: usize,
    device: tch::Device,
    /// The modules' float kind (the config's dtype): the pixels'.
    kind: tch::Kind,
    tokenizer: Tokenizer,
    dir: BlipDir,
    batch_size: usize,
}

impl Blip2Captioner {
    /// Build from `params: { model_dir, batch_size }` (a BLIP-2 folder).
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = BlipDir::open(spec, Fetch::IfMissing)?;
        let (device, kind) = placement(spec)?;
        let t = &dir.config["text_config"];
        let num = |k: &str| {
            t[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::model(format!("{}: no text_config.{k}", dir.root.display())))
        };
        let (layers, heads, hidden) = (
            num("num_hidden_layers")?,
            num("num_attention_heads")?,
            num("hidden_size")?,
        );
        let load = |g: &str| -> Result<Mutex<CModule>> {
            load_module_as(&dir.exported(&module_file(spec, g))?, device, kind).map(Mutex::new)
        };
        Ok(Blip2Captioner {
            queries: load(GRAPHS[0])?,
            embed: load(GRAPHS[1])?,
            lm: load(GRAPHS[2])?,
            layers,
            heads,
            head_dim: hidden / heads.max(1),
            device,
            kind,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    fn embed_tokens(&self, ids: &[i64], rows: usize) -> Result<Tensor> {
        let t = (ids.len() / rows.max(1)) as i64;
        let ids = Tensor::from_slice(ids).reshape([rows as i64, t]).to_device(self.device);
        forward(&self.embed, &[ids], "BLIP-2 token embeddings")
    }
}

/// One decode: the language model's cache on the device, and the rows'
/// image queries (used once, in the prefix).
struct Decode<'a> {
    cap: &'a Blip2Captioner,
    /// `[rows, q, d]`.
    queries: Tensor,
    /// Leading prefix ids the queries replace.
    skip: usize,
    past: Vec<Tensor>,
    len: i64,
}

impl KvDecoder for Decode<'_> {
    fn start(&mut self, rows: usize) -> Result<()> {
        if self.queries.size().first().copied() != Some(rows as i64) {
            return Err(Error::model(format!(
                "image queries of shape {:?} for {rows} decoding rows",
                self.queries.size()
            )));
        }
        let c = self.cap;
        let empty = [rows as i64, c.heads as i64, 0, c.head_dim as i64];
        self.past = (0..2 * c.layers)
            .map(|_| Tensor::zeros(empty, (self.queries.kind(), c.device)))
            .collect();
        self.len = 0;
        Ok(())
    }

    fn feed(&mut self, ids: &[i64], rows: usize, t: usize) -> Result<Vec<f32>> {
        let x = if self.len == 0 {
            // The prefix: each row's queries, then its ids after the placeholders.
            let text: Vec<i64> = ids.chunks(t).flat_map(|r| r[self.skip..].to_vec()).collect();
            Tensor::cat(&[&self.queries, &self.cap.embed_tokens(&text, rows)?], 1)
        } else {
            self.cap.embed_tokens(ids, rows)?
        };
        let positions = x.size()[1];
        let total = self.len + positions;
        let mut inputs = vec![x, Tensor::ones([rows as i64, total], (Kind::Int64, self.cap.device))];
        inputs.append(&mut self.past);
        let mut out = forward_tuple(&self.cap.lm, inputs, "BLIP-2 language model")?;
        if out.len() != 1 + 2 * self.cap.layers {
            return Err(Error::model(format!(
                "BLIP-2 language model (TorchScript) returned {} tensors, expected logits + {}",
                out.len(),
                2 * self.cap.layers
            )));
        }
        self.past = out.split_off(1);
        self.len = total;
        to_host(&out[0].select(1, positions - 1))
    }

    fn reorder(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(self.cap.device);
        self.past = self.past.iter().map(|p| p.index_select(0, &idx)).collect();
        Ok(())
    }
}

impl Captioner for Blip2Captioner {
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
        let prefix = self
            .dir
            .prefix(&self.tokenizer, opts.prompt.as_str(), opts.max_tokens)?;
        caption_chunks(images, self.batch_size, &self.tokenizer, |chunk| {
            let px = pixels(&self.dir, chunk, self.device, self.kind)?;
            let queries = forward(&self.queries, &[px], "BLIP-2 image queries")?;
            if queries.dim() != 3 {
                return Err(Error::model(format!(
                    "image_queries of shape {:?}, expected [n, queries, width]",
                    queries.size()
                )));
            }
            let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
                let queries = match i {
                    None => queries.shallow_clone(),
                    Some(i) => repeat_row(std::slice::from_ref(&queries), i, opts.beams).remove(0),
                };
                let decode = Decode {
                    cap: self,
                    queries,
                    skip: prefix.placeholders,
                    past: Vec::new(),
                    len: 0,
                };
                Ok(Box::new(Cached::new(decode, &prefix.ids)))
            };
            generate(stepper, &prefix.ids, chunk.len(), opts.beams, prefix.lim)
        })
    }
}
