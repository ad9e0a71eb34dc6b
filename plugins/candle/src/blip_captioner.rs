//! BLIP and BLIP-2 as a ragar Captioner (Eq. 2: each history item's image
//! becomes a caption before encoding; the paper uses BLIP-2). Models in
//! `blip.rs` and `blip2.rs`; `config.json`'s `model_type` picks one.
//!
//! The folder, preprocessing (transformers' `BlipImageProcessor`) and
//! tokenizer are `ragar_core::blip`, the decode loops
//! `ragar_core::decoding` (transformers' `generate`), shared with the ort
//! and tch captioners. BLIP: the prefix is `[DEC]`
//! plus the optional text prompt (tokenised without its `[CLS]`/`[SEP]`),
//! ending at `[SEP]`. BLIP-2: the projected Q-Former queries in place of the
//! `<image>` tokens, then BOS or the tokenised prompt, ending at the
//! language model's EOS. The caption is the decoded sequence without special
//! tokens, prompt included, as `processor.decode` gives.

use crate::blip::{Blip, DecoderCache};
use crate::blip2::{Blip2, OptCache};
use crate::checkpoint;
use crate::decoding::{last_position, row_index, Host, Stepper};
use crate::device::{device, dtype, model_err};
use candle_core::{Device, IndexOp, Tensor};
use ragar_core::blip::{caption, BlipDir, BlipParams};
use ragar_core::component::Probe;
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Which architecture a checkpoint is.
enum Arch {
    Blip(crate::blip::Config),
    Blip2(crate::blip2::Config),
}

struct Files {
    arch: Arch,
    weights: Vec<PathBuf>,
    dir: BlipDir,
}

fn files(spec: &ComponentSpec, fetch: Fetch) -> Result<(BlipParams, Files)> {
    let (params, dir) = BlipDir::open(spec, fetch)?;
    let weights = dir.source.safetensors_files("", "model", fetch)?;
    let cfg_path = dir.root.join("config.json");
    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &Path) -> Result<T> {
        serde_json::from_value(v).map_err(|e| Error::model(format!("{}: {e}", path.display())))
    }
    let arch = match dir.model_type.as_str() {
        "blip" => Arch::Blip(parse(dir.config.clone(), &cfg_path)?),
        "blip-2" => Arch::Blip2(parse(dir.config.clone(), &cfg_path)?),
        other => {
            return Err(Error::unsupported(format!(
                "{}: model_type '{other}' is not a captioner ragar knows (blip, blip-2)",
                cfg_path.display()
            )))
        }
    };
    Ok((params, Files { arch, weights, dir }))
}

enum Model {
    Blip(Blip),
    Blip2(Blip2),
}

/// The BLIP / BLIP-2 captioner component.
pub struct BlipCaptioner {
    model: Model,
    tokenizer: Tokenizer,
    files: Files,
    batch_size: usize,
    device: Device,
}

impl BlipCaptioner {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, files) = files(spec, Fetch::IfMissing)?;
        let device = device(spec)?;
        let what = files.weights[0].display().to_string();
        let vb = checkpoint::var_builder(&files.weights, dtype(spec, &device)?, &device)?;
        let model = match &files.arch {
            Arch::Blip(c) => Model::Blip(Blip::load(vb, c).map_err(model_err(&what))?),
            Arch::Blip2(c) => Model::Blip2(Blip2::load(vb, c).map_err(model_err(&what))?),
        };
        let tokenizer = files.dir.tokenizer()?;
        Ok(BlipCaptioner {
            model,
            tokenizer,
            files,
            batch_size: params.batch_size,
            device,
        })
    }

    /// Params and files without loading weights.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        let (_, f) = files(spec, Fetch::Never)?;
        f.weights
            .iter()
            .try_fold(Probe::default(), |p, w| p.file(w))?
            .file(&f.dir.root.join("tokenizer.json"))
    }

    /// The processor's pixel values `[n, 3, h, w]`.
    pub fn pixel_values(&self, images: &[Image]) -> Result<Tensor> {
        let (w, h) = self.files.dir.size;
        Tensor::from_vec(
            self.files.dir.pixel_values(images)?,
            (images.len(), 3, h as usize, w as usize),
            &self.device,
        )
        .map_err(model_err("BLIP pixels"))
    }

    /// Token ids (prompt included) for each image of a batch.
    pub fn generate_ids(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<Vec<u32>>> {
        let prefix = self
            .files
            .dir
            .prefix(&self.tokenizer, opts.prompt.as_str(), opts.max_tokens)?;
        let (prompt, lim, skip) = (prefix.ids, prefix.lim, prefix.placeholders);
        let pixels = self.pixel_values(images)?;
        // What the decoder reads from the images: BLIP's image embeddings or
        // BLIP-2's projected queries, `[n, tokens, w]`.
        let image = match &self.model {
            Model::Blip(m) => m.vision.forward(&pixels).map_err(model_err("BLIP vision"))?,
            Model::Blip2(m) => m.image_prefix(&pixels).map_err(model_err("BLIP-2 image queries"))?,
        };
        let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
            let image = match i {
                Some(i) => image.i(i..i + 1).map_err(model_err("selecting an image"))?,
                None => image.clone(),
            };
            Ok(match &self.model {
                Model::Blip(blip) => Box::new(BlipStep {
                    blip,
                    image,
                    prompt: &prompt,
                    cache: DecoderCache::default(),
                }),
                Model::Blip2(blip2) => Box::new(Blip2Step {
                    blip2,
                    queries: image,
                    prompt: &prompt,
                    skip,
                    cache: OptCache::default(),
                }),
            })
        };
        ragar_core::decoding::generate(
            |i| stepper(i).map(|s| Box::new(Host(s)) as Box<dyn ragar_core::decoding::Stepper>),
            &prompt,
            images.len(),
            opts.beams,
            lim,
        )
    }
}

/// The BLIP-2 language model over one batch of image queries.
struct Blip2Step<'a> {
    blip2: &'a Blip2,
    queries: Tensor,
    prompt: &'a [u32],
    /// Leading prompt ids the queries replace (`Prefix::placeholders`).
    skip: usize,
    cache: OptCache,
}

impl Stepper for Blip2Step<'_> {
    fn prefill(&mut self, rows: usize) -> candle_core::Result<Tensor> {
        if self.queries.dim(0)? != rows {
            self.queries = self.queries.repeat((rows, 1, 1))?;
        }
        // The queries replace the <image> placeholders (or precede the text in older checkpoints).
        let text = Tensor::new(&self.prompt[self.skip..], self.queries.device())?
            .unsqueeze(0)?
            .repeat((rows, 1))?;
        let embeds = Tensor::cat(&[&self.queries, &self.blip2.opt.embed(&text)?], 1)?;
        self.blip2.opt.forward_last(&embeds, &mut self.cache)
    }
    fn step(&mut self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(tokens, self.queries.device())?.unsqueeze(1)?;
        self.blip2
            .opt
            .forward_last(&self.blip2.opt.embed(&ids)?, &mut self.cache)
    }
    fn reorder(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        self.cache.select(&row_index(rows, self.queries.device())?)
    }
}

/// The BLIP decoder over one batch of image embeddings.
struct BlipStep<'a> {
    blip: &'a Blip,
    image: Tensor,
    prompt: &'a [u32],
    cache: DecoderCache,
}

impl Stepper for BlipStep<'_> {
    fn prefill(&mut self, rows: usize) -> candle_core::Result<Tensor> {
        if self.image.dim(0)? != rows {
            self.image = self.image.repeat((rows, 1, 1))?;
        }
        let ids = Tensor::new(self.prompt, self.image.device())?
            .unsqueeze(0)?
            .repeat((rows, 1))?;
        last_position(&self.blip.decoder.forward(&ids, &self.image, &mut self.cache)?)
    }
    fn step(&mut self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(tokens, self.image.device())?.unsqueeze(1)?;
        last_position(&self.blip.decoder.forward(&ids, &self.image, &mut self.cache)?)
    }
    fn reorder(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        self.cache.select(&row_index(rows, self.image.device())?)
    }
}

impl Captioner for BlipCaptioner {
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
        crate::device::on_pool(&self.device, || {
            let mut out = Vec::with_capacity(images.len());
            for (c, chunk) in images.chunks(self.batch_size).enumerate() {
                let ids = self.generate_ids(chunk, opts).map_err(|e| {
                    e.context(format!(
                        "images {}..{}",
                        c * self.batch_size,
                        c * self.batch_size + chunk.len()
                    ))
                })?;
                for seq in ids {
                    out.push(caption(&self.tokenizer, &seq)?);
                }
            }
            Ok(out)
        })
    }
}
