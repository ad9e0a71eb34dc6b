//! What every backend's BLIP / BLIP-2 captioner shares: the folder (HF
//! layout: `config.json`, `tokenizer.json`, `preprocessor_config.json` or
//! transformers 5's `processor_config.json`), the image preprocessing
//! (transformers' `BlipImageProcessor`, PIL backend: bicubic resize of the
//! whole image to the square input, no crop, scale to [0, 1], normalise with
//! the checkpoint's mean/std), the tokenizer (prompts tokenised alone: no
//! padding, no truncation) and the caption text. The decode loops are
//! [`crate::decoding`]; the networks are each backend's.

use crate::files::read_json;
use crate::model::{Fetch, ModelSource};
use crate::stage::{CaptionOptions, Captioner};
use crate::vision::{normalize_chw, resize_bicubic, CLIP_MEAN, CLIP_STD};
use crate::{ComponentSpec, Error, Image, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The `params:` of a captioner, the same for every backend.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlipParams {
    /// HF layout: config.json, weights (candle: model.safetensors or shards;
    /// ort / tch: the graphs of `scripts/export_blip.py`), tokenizer.json,
    /// preprocessor_config.json (or processor_config.json).
    pub model_dir: String,
    /// Images encoded and decoded together.
    #[serde(default = "eight")]
    pub batch_size: usize,
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

/// A resolved captioner folder.
pub struct BlipDir {
    /// Where the folder came from (to resolve the backend's weight files).
    pub source: ModelSource,
    /// The folder.
    pub root: PathBuf,
    /// `config.json` as read.
    pub config: serde_json::Value,
    /// `model_type` (`blip`, `blip-2`).
    pub model_type: String,
    /// Input image (width, height).
    pub size: (u32, u32),
    /// Per-channel normalisation.
    pub mean: [f32; 3],
    /// Per-channel normalisation.
    pub std: [f32; 3],
}

impl BlipDir {
    /// Parse the params and read the folder's configs; the processor must
    /// resize with bicubic (BLIP's) to the vision model's input size.
    pub fn open(spec: &ComponentSpec, fetch: Fetch) -> Result<(BlipParams, BlipDir)> {
        let params: BlipParams = spec.params()?;
        if params.batch_size == 0 {
            return Err(Error::config(format!(
                "{}.params.batch_size must be at least 1",
                spec.key
            )));
        }
        let source = ModelSource::parse(&params.model_dir, |p| spec.resolve_path(p))?;
        let root = source.resolve(
            &["config.json", "tokenizer.json"],
            &[
                "preprocessor_config.json",
                "processor_config.json",
                "tokenizer_config.json",
            ],
            fetch,
        )?;
        let cfg_path = root.join("config.json");
        let config: serde_json::Value = read_json(&cfg_path)?;
        let model_type = config["model_type"].as_str().unwrap_or("blip").to_string();
        let side = config["vision_config"]["image_size"]
            .as_u64()
            .ok_or_else(|| Error::model(format!("{}: no vision_config.image_size", cfg_path.display())))?
            as u32;
        let pre = preprocessor(&root)?;
        if let Some(r) = pre.resample.filter(|&r| r != 3) {
            return Err(Error::unsupported(format!(
                "{}: resample {r} (only 3 = bicubic, BLIP's, is implemented)",
                root.display()
            )));
        }
        let size = pre.size.map_or((side, side), |s| (s.width, s.height));
        if size != (side, side) {
            return Err(Error::model(format!(
                "{}: the image processor resizes to {}x{} but the vision model takes {side}x{side}",
                root.display(),
                size.0,
                size.1
            )));
        }
        Ok((
            params,
            BlipDir {
                source,
                root,
                config,
                model_type,
                size,
                mean: pre.image_mean.unwrap_or(CLIP_MEAN),
                std: pre.image_std.unwrap_or(CLIP_STD),
            },
        ))
    }

    /// The folder's tokenizer, for prompts and captions: no padding, and a
    /// too-long prompt is an error, not cut.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.root.join("tokenizer.json");
        let mut t = Tokenizer::from_file(&path).map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        t.with_padding(None);
        t.with_truncation(None)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        Ok(t)
    }

    /// The processor's pixel values `[n, 3, h, w]`, row-major.
    pub fn pixel_values(&self, images: &[Image]) -> Result<Vec<f32>> {
        let (w, h) = self.size;
        let mut flat = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
        for (i, img) in images.iter().enumerate() {
            let resized = resize_bicubic(img, w, h).map_err(|e| e.context(format!("image {i}")))?;
            flat.extend(normalize_chw(&resized, self.mean, self.std));
        }
        Ok(flat)
    }
}

impl BlipDir {
    /// Whether the folder is BLIP-2 (`model_type` `blip-2`).
    pub fn is_blip2(&self) -> bool {
        self.model_type == "blip-2"
    }

    /// Params, the exported graphs of the folder's architecture (`blip` or
    /// `blip2`) and the tokenizer, without loading anything.
    pub fn probe(spec: &ComponentSpec, blip: &[&str], blip2: &[&str]) -> Result<crate::component::Probe> {
        let (_, dir) = BlipDir::open(spec, Fetch::Never)?;
        let graphs = if dir.is_blip2() { blip2 } else { blip };
        graphs
            .iter()
            .try_fold(crate::component::Probe::default(), |p, g| p.file(&dir.root.join(g)))?
            .file(&dir.root.join("tokenizer.json"))
    }

    /// The path of an exported graph (`scripts/export_blip.py`), which must exist.
    pub fn exported(&self, graph: &str) -> Result<PathBuf> {
        let path = self.root.join(graph);
        if !path.is_file() {
            return Err(Error::not_found(format!(
                "missing {} (export it with: python scripts/export_blip.py {}{})",
                path.display(),
                self.root.display(),
                crate::DType::of_exported_file(graph).export_flag()
            )));
        }
        Ok(path)
    }

    /// The decoder prefix and limits, as the processors build them. BLIP:
    /// `[DEC]` + the prompt's word pieces; `[SEP]` ends, `[PAD]` fills.
    /// BLIP-2: the `<image>` placeholders (where the checkpoint has an
    /// image token) + BOS, or + the tokenised prompt (its tokenizer adds
    /// BOS); OPT's eos ends, its pad fills. Prompt + `max_tokens` must fit
    /// the decoder's positions (BLIP-2 without placeholders: minus the
    /// queries, which go first).
    pub fn prefix(&self, tokenizer: &Tokenizer, prompt: &str, max_tokens: u32) -> Result<Prefix> {
        let cfg_path = self.root.join("config.json");
        let num = |v: &serde_json::Value, k: &str| -> Result<u32> {
            v[k].as_u64()
                .map(|v| v as u32)
                .ok_or_else(|| Error::model(format!("{}: {k} missing", cfg_path.display())))
        };
        let t = &self.config["text_config"];
        let (ids, eos, pad, positions, placeholders) = if self.is_blip2() {
            let q = num(&self.config, "num_query_tokens")? as usize;
            let image_token = self.config["image_token_index"].as_u64().map(|v| v as u32);
            let text = if prompt.is_empty() {
                vec![num(t, "bos_token_id")?]
            } else {
                prompt_pieces(tokenizer, prompt, true)?
            };
            let images = image_token.map_or(Vec::new(), |tok| vec![tok; q]);
            let room = num(t, "max_position_embeddings")? as usize;
            let (room, placeholders) = match image_token {
                Some(_) => (room, q),
                None => (room.saturating_sub(q), 0),
            };
            (
                [images, text].concat(),
                num(t, "eos_token_id")?,
                num(t, "pad_token_id")?,
                room,
                placeholders,
            )
        } else {
            let ids = [vec![num(t, "bos_token_id")?], prompt_pieces(tokenizer, prompt, false)?].concat();
            let positions = num(t, "max_position_embeddings")? as usize;
            (ids, num(t, "sep_token_id")?, num(t, "pad_token_id")?, positions, 0)
        };
        let lim = crate::decoding::Limits {
            eos,
            pad,
            max_len: ids.len() + max_tokens as usize,
        };
        if lim.max_len > positions {
            return Err(Error::invalid_input(format!(
                "prompt ({} tokens) + max_tokens ({max_tokens}) exceeds the decoder's {positions} positions",
                ids.len()
            )));
        }
        Ok(Prefix { ids, lim, placeholders })
    }
}

/// A captioner's decoder prefix.
pub struct Prefix {
    /// Token ids the decoding starts from.
    pub ids: Vec<u32>,
    /// What ends and fills.
    pub lim: crate::decoding::Limits,
    /// BLIP-2: the leading ids that stand for the image queries (the
    /// queries' embeddings replace theirs); 0 when the queries go before
    /// the ids (older checkpoints) or for BLIP (cross-attention).
    pub placeholders: usize,
}

/// BLIP or BLIP-2, as the folder's `model_type` says: how a backend with
/// one type per architecture offers both under the `blip` / `blip2` names.
pub enum AnyBlip<A, B> {
    /// BLIP: vision model + text decoder with cross-attention.
    Blip(A),
    /// BLIP-2: image queries + OPT.
    Blip2(B),
}

impl<A: Captioner, B: Captioner> AnyBlip<A, B> {
    /// Load the folder's architecture with `blip` or `blip2`.
    pub fn load(
        spec: &ComponentSpec,
        blip: impl FnOnce(&ComponentSpec) -> Result<A>,
        blip2: impl FnOnce(&ComponentSpec) -> Result<B>,
    ) -> Result<Self> {
        let (_, dir) = BlipDir::open(spec, Fetch::IfMissing)?;
        Ok(if dir.is_blip2() {
            AnyBlip::Blip2(blip2(spec)?)
        } else {
            AnyBlip::Blip(blip(spec)?)
        })
    }
}

impl<A: Captioner, B: Captioner> Captioner for AnyBlip<A, B> {
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
        match self {
            AnyBlip::Blip(c) => c.caption(images, opts),
            AnyBlip::Blip2(c) => c.caption(images, opts),
        }
    }
}

/// Caption `images` in chunks of `batch_size`: `decode(chunk, first)`
/// gives each image's token ids (prompt included); errors name the chunk's
/// images; captions are the ids decoded without special tokens.
pub fn caption_chunks(
    images: &[Image],
    batch_size: usize,
    tokenizer: &Tokenizer,
    mut decode: impl FnMut(&[Image]) -> Result<Vec<Vec<u32>>>,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(images.len());
    for (c, chunk) in images.chunks(batch_size.max(1)).enumerate() {
        let first = c * batch_size.max(1);
        let ids = decode(chunk).map_err(|e| e.context(format!("images {first}..{}", first + chunk.len())))?;
        for seq in ids {
            out.push(caption(tokenizer, &seq)?);
        }
    }
    Ok(out)
}

/// A prompt's word pieces, without special tokens (BLIP's decoder prefix
/// is `[DEC]` + these).
pub fn prompt_pieces(tokenizer: &Tokenizer, prompt: &str, special: bool) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(prompt, special)
        .map_err(|e| Error::invalid_input(format!("tokenising the prompt {prompt:?}: {e}")))?
        .get_ids()
        .to_vec())
}

/// The caption of a decoded sequence, without special tokens (prompt
/// included), as `processor.decode(..., skip_special_tokens=True)` gives.
pub fn caption(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| Error::model(format!("decoding a caption: {e}")))
}
