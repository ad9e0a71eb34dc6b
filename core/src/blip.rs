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
    /// An error unless the checkpoint is BLIP (model_type `blip`): the
    /// `backend` runs BLIP only, BLIP-2 runs on candle.
    pub fn require_blip(&self, backend: &str) -> Result<()> {
        if self.model_type == "blip" {
            return Ok(());
        }
        Err(Error::unsupported(format!(
            "{}: model_type '{}': the {backend} captioner runs BLIP only; BLIP-2 runs on candle \
             (captioner.backend=candle)",
            self.root.display(),
            self.model_type
        )))
    }

    /// The path of an exported graph (`scripts/export_blip.py`) for
    /// `backend`, after checking the checkpoint is BLIP and the file exists.
    pub fn exported(&self, backend: &str, graph: &str) -> Result<PathBuf> {
        self.require_blip(backend)?;
        let path = self.root.join(graph);
        if !path.is_file() {
            return Err(Error::not_found(format!(
                "missing {} (export it with: python scripts/export_blip.py {})",
                path.display(),
                self.root.display()
            )));
        }
        Ok(path)
    }

    /// BLIP (not BLIP-2): the decoder prefix (`[DEC]` + the prompt's word
    /// pieces) and the limits (`[SEP]` ends, `[PAD]` fills, prompt +
    /// `max_tokens` within the decoder's positions).
    pub fn blip_prefix(
        &self,
        tokenizer: &Tokenizer,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<(Vec<u32>, crate::decoding::Limits)> {
        self.require_blip("this")?;
        let t = &self.config["text_config"];
        let id = |k: &str| -> Result<u32> {
            t[k].as_u64().map(|v| v as u32).ok_or_else(|| {
                Error::model(format!(
                    "{}: text_config.{k} missing",
                    self.root.join("config.json").display()
                ))
            })
        };
        let ids = [vec![id("bos_token_id")?], prompt_pieces(tokenizer, prompt, false)?].concat();
        let lim = crate::decoding::Limits {
            eos: id("sep_token_id")?,
            pad: id("pad_token_id")?,
            max_len: ids.len() + max_tokens as usize,
        };
        let positions = id("max_position_embeddings")? as usize;
        if lim.max_len > positions {
            return Err(Error::invalid_input(format!(
                "prompt ({} tokens) + max_tokens ({max_tokens}) exceeds the decoder's {positions} positions",
                ids.len()
            )));
        }
        Ok((ids, lim))
    }
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
