//! BLIP as a ragar Captioner (Eq. 2: each history item's image becomes a
//! caption before encoding). Model in `blip.rs`.
//!
//! Preprocessing is transformers' `BlipImageProcessor` (PIL backend):
//! bicubic resize of the whole image to the square input (no crop), scale to
//! [0, 1], normalise with the checkpoint's mean/std. Decoding follows
//! transformers' `generate`: the prompt is `[DEC]` plus the optional text
//! prefix (tokenised without its `[CLS]`/`[SEP]`); greedy takes the arg-max
//! until `[SEP]`; beam search is transformers' (top 2k candidates per step,
//! finished hypotheses scored by log-probability / generated length, the
//! default `early_stopping=False` stopping rule). The caption is the decoded
//! sequence without special tokens, prompt included, as `processor.decode` gives.

use crate::blip::{Blip, Config, DecoderCache};
use crate::device::{device, dtype, model_err};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use ragar_core::component::Probe;
use ragar_core::files::read_json;
use ragar_core::model::{Fetch, ModelSource};
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::vision::{normalize_chw, resize_bicubic, CLIP_MEAN, CLIP_STD};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// HF layout: config.json, model.safetensors, tokenizer.json,
    /// preprocessor_config.json (or processor_config.json).
    model_dir: String,
    /// Images encoded and decoded together.
    #[serde(default = "eight")]
    batch_size: usize,
}

fn eight() -> usize {
    8
}

/// The image-processor keys ragar reads.
#[derive(serde::Deserialize, Default)]
struct Preprocessor {
    size: Option<Size>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    resample: Option<u32>,
}

#[derive(serde::Deserialize)]
struct Size {
    height: u32,
    width: u32,
}

/// `preprocessor_config.json` (hub checkpoints) or the `image_processor`
/// block of `processor_config.json` (written by transformers 5).
fn preprocessor(dir: &Path) -> Result<Preprocessor> {
    let flat = dir.join("preprocessor_config.json");
    if flat.is_file() {
        return read_json(&flat);
    }
    let nested = dir.join("processor_config.json");
    if nested.is_file() {
        let v: serde_json::Value = read_json(&nested)?;
        return serde_json::from_value(v["image_processor"].clone())
            .map_err(|e| Error::model(format!("{}: image_processor: {e}", nested.display())));
    }
    Ok(Preprocessor::default())
}

struct Files {
    config: Config,
    weights: PathBuf,
    tokenizer: PathBuf,
    size: (u32, u32),
    mean: [f32; 3],
    std: [f32; 3],
}

fn files(spec: &ComponentSpec, fetch: Fetch) -> Result<(Params, Files)> {
    let params: Params = spec.params()?;
    if params.batch_size == 0 {
        return Err(Error::config(format!(
            "{}.params.batch_size must be at least 1",
            spec.key
        )));
    }
    let dir = ModelSource::parse(&params.model_dir, |p| spec.resolve_path(p))?.resolve(
        &["config.json", "model.safetensors", "tokenizer.json"],
        &[
            "preprocessor_config.json",
            "processor_config.json",
            "tokenizer_config.json",
        ],
        fetch,
    )?;
    let config: Config = read_json(&dir.join("config.json"))?;
    let pre = preprocessor(&dir)?;
    if let Some(r) = pre.resample.filter(|&r| r != 3) {
        return Err(Error::unsupported(format!(
            "{}: resample {r} (only 3 = bicubic, BLIP's, is implemented)",
            dir.display()
        )));
    }
    let side = config.vision_config.image_size as u32;
    let size = pre.size.map_or((side, side), |s| (s.width, s.height));
    if size != (side, side) {
        return Err(Error::model(format!(
            "{}: the image processor resizes to {}x{} but the vision model takes {side}x{side}",
            dir.display(),
            size.0,
            size.1
        )));
    }
    Ok((
        params,
        Files {
            config,
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
            size,
            mean: pre.image_mean.unwrap_or(CLIP_MEAN),
            std: pre.image_std.unwrap_or(CLIP_STD),
        },
    ))
}

/// The BLIP captioner component.
pub struct BlipCaptioner {
    model: Blip,
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
        // Safety: read-only memory map of a file ragar does not modify.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], dtype(spec, &device)?, &device) }
            .map_err(model_err(files.weights.display()))?;
        let model = Blip::load(vb, &files.config).map_err(model_err(files.weights.display()))?;
        let mut tokenizer = Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| Error::model(format!("{}: {e}", files.tokenizer.display())))?;
        // A prompt is tokenised alone: no padding, and a too-long one is an error, not cut.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::model(format!("{}: {e}", files.tokenizer.display())))?;
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
        Probe::default().file(&f.weights)?.file(&f.tokenizer)
    }

    /// The processor's pixel values `[n, 3, h, w]`.
    pub fn pixel_values(&self, images: &[Image]) -> Result<Tensor> {
        let (w, h) = self.files.size;
        let mut flat = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
        for (i, img) in images.iter().enumerate() {
            let resized = resize_bicubic(img, w, h).map_err(|e| e.context(format!("image {i}")))?;
            flat.extend(normalize_chw(&resized, self.files.mean, self.files.std));
        }
        Tensor::from_vec(flat, (images.len(), 3, h as usize, w as usize), &self.device)
            .map_err(model_err("BLIP pixels"))
    }

    /// `[DEC]` followed by the prompt's word pieces.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::invalid_input(format!("tokenising the prompt {prompt:?}: {e}")))?;
        let mut ids = vec![self.model.decoder.config().bos_token_id];
        ids.extend(enc.get_ids());
        Ok(ids)
    }

    /// Token ids (prompt included) for each image of a batch.
    pub fn generate_ids(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<Vec<u32>>> {
        let prompt = self.prompt_ids(opts.prompt.as_str())?;
        let limit = prompt.len() + opts.max_tokens as usize;
        let max_pos = self.model.decoder.config().max_position_embeddings;
        if limit > max_pos {
            return Err(Error::invalid_input(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds BLIP's {max_pos} positions",
                prompt.len(),
                opts.max_tokens
            )));
        }
        let pixels = self.pixel_values(images)?;
        let embeds = self.model.vision.forward(&pixels).map_err(model_err("BLIP vision"))?;
        match opts.beams {
            0 => Err(Error::invalid_input("beams must be at least 1")),
            1 => self
                .greedy(&embeds, &prompt, limit)
                .map_err(model_err("BLIP greedy decoding")),
            k => (0..images.len())
                .map(|i| {
                    self.beam_search(
                        &embeds.i(i..i + 1).map_err(model_err("BLIP"))?,
                        &prompt,
                        limit,
                        k as usize,
                    )
                    .map_err(model_err(format!("BLIP beam search, image {i}")))
                })
                .collect(),
        }
    }

    /// All images together; a finished row is padded until every row is.
    fn greedy(&self, embeds: &Tensor, prompt: &[u32], limit: usize) -> candle_core::Result<Vec<Vec<u32>>> {
        let cfg = self.model.decoder.config();
        let n = embeds.dim(0)?;
        let mut seqs: Vec<Vec<u32>> = vec![prompt.to_vec(); n];
        let mut done = vec![false; n];
        let mut cache = DecoderCache::default();
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?.repeat((n, 1))?;
        while seqs[0].len() < limit && !done.iter().all(|&d| d) {
            let logits = self.model.decoder.forward(&input, embeds, &mut cache)?;
            let last = logits.i((.., logits.dim(1)? - 1))?.to_dtype(DType::F32)?;
            let next: Vec<u32> = last.argmax(D::Minus1)?.to_vec1()?;
            for (i, &t) in next.iter().enumerate() {
                seqs[i].push(if done[i] { cfg.pad_token_id } else { t });
                done[i] |= t == cfg.sep_token_id;
            }
            let tokens: Vec<u32> = seqs.iter().map(|s| *s.last().expect("non-empty")).collect();
            input = Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(1)?;
        }
        Ok(seqs)
    }

    /// transformers' beam search for one image.
    fn beam_search(&self, embed: &Tensor, prompt: &[u32], limit: usize, k: usize) -> candle_core::Result<Vec<u32>> {
        const NEG: f32 = -1.0e9;
        let sep = self.model.decoder.config().sep_token_id;
        let embeds = embed.repeat((k, 1, 1))?;
        let mut running: Vec<(Vec<u32>, f32)> = (0..k)
            .map(|b| (prompt.to_vec(), if b == 0 { 0.0 } else { NEG }))
            .collect();
        // Finished hypotheses, best first; empty slots count as -1e9.
        let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
        let mut improvable = true;
        let mut cache = DecoderCache::default();
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?.repeat((k, 1))?;
        let prompt_len = prompt.len();
        loop {
            let cur_len = running[0].0.len();
            let logits = self.model.decoder.forward(&input, &embeds, &mut cache)?;
            let logp =
                candle_nn::ops::log_softmax(&logits.i((.., logits.dim(1)? - 1))?.to_dtype(DType::F32)?, D::Minus1)?
                    .to_vec2::<f32>()?;
            let vocab = logp[0].len();
            // Top 2k continuations over all beams (scores accumulated).
            let mut cands: Vec<(f32, usize, u32)> = Vec::with_capacity(k * vocab);
            for (b, row) in logp.iter().enumerate() {
                cands.extend(row.iter().enumerate().map(|(t, &lp)| (lp + running[b].1, b, t as u32)));
            }
            let keep = 2 * k;
            cands.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0));
            cands.truncate(keep);
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            let at_limit = cur_len + 1 >= limit;
            let stops: Vec<bool> = cands.iter().map(|c| c.2 == sep || at_limit).collect();

            // Finished: among the top k candidates, those that stop.
            let norm = (cur_len + 1 - prompt_len) as f32;
            if improvable {
                for (i, c) in cands.iter().enumerate().take(k) {
                    if stops[i] {
                        let mut seq = running[c.1].0.clone();
                        seq.push(c.2);
                        finished.push((seq, c.0 / norm));
                    }
                }
                finished.sort_by(|a, b| b.1.total_cmp(&a.1));
                finished.truncate(k);
            }

            // Running: the best k that do not stop.
            let mut order: Vec<usize> = (0..keep).collect();
            order.sort_by(|&a, &b| {
                let sa = cands[a].0 + if stops[a] { NEG } else { 0.0 };
                let sb = cands[b].0 + if stops[b] { NEG } else { 0.0 };
                sb.total_cmp(&sa)
            });
            let chosen: Vec<usize> = order[..k].to_vec();
            let rows: Vec<u32> = chosen.iter().map(|&i| cands[i].1 as u32).collect();
            running = chosen
                .iter()
                .map(|&i| {
                    let (score, beam, tok) = cands[i];
                    let mut seq = running[beam].0.clone();
                    seq.push(tok);
                    (seq, score + if stops[i] { NEG } else { 0.0 })
                })
                .collect();

            // transformers' early_stopping=False heuristic: stop once the
            // best running beam, normalised at its current length, cannot
            // beat the worst of k finished hypotheses.
            let best_running = running[0].1 / (cur_len + 1 - prompt_len) as f32;
            let worst = if finished.len() == k { finished[k - 1].1 } else { NEG };
            improvable &= best_running > worst;
            if !improvable || stops.iter().all(|&s| s) {
                break;
            }
            cache.select(&Tensor::new(rows.as_slice(), &self.device)?)?;
            let last: Vec<u32> = running.iter().map(|r| *r.0.last().expect("non-empty")).collect();
            input = Tensor::new(last.as_slice(), &self.device)?.unsqueeze(1)?;
        }
        Ok(finished
            .into_iter()
            .next()
            .map_or_else(|| running[0].0.clone(), |f| f.0))
    }
}

impl Captioner for BlipCaptioner {
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
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
                out.push(
                    self.tokenizer
                        .decode(&seq, true)
                        .map_err(|e| Error::model(format!("decoding a caption: {e}")))?,
                );
            }
        }
        Ok(out)
    }
}
