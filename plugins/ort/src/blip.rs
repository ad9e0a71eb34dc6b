//! The BLIP captioner from the ONNX graphs `scripts/export_blip.py` writes
//! into an HF BLIP folder: `vision_model.onnx` (pixel_values ->
//! image_embeds), `text_decoder_cross.onnx` (image_embeds -> each layer's
//! cross-attention keys / values, once per image) and
//! `text_decoder_with_past.onnx` (new tokens on top of the self-attention
//! cache). Preprocessing, tokenizer and decode loops are shared with candle
//! (`ragar_core::blip`, `ragar_core::decoding`). The caches stay ONNX
//! Runtime values between steps; only beam reordering reads them back.

use crate::runtime::{check_io, empty_cache, lock, ort_err as err, session, take_outputs, take_rows};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use ragar_core::blip::{caption_chunks, AnyBlip, BlipDir};
use ragar_core::decoding::{generate, kv_names, last_position, Cached, KvDecoder, Stepper};
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::sync::Mutex;
use tokenizers::Tokenizer;

/// The graphs, in the model folder.
pub const GRAPHS: [&str; 3] = [
    "vision_model.onnx",
    "text_decoder_cross.onnx",
    "text_decoder_with_past.onnx",
];

/// The BLIP captioner on ONNX Runtime.
pub struct BlipCaptioner {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    vision: Mutex<Session>,
    cross: Mutex<Session>,
    decoder: Mutex<Session>,
    /// Self-attention cache input and output names, layer by layer.
    names: Vec<(String, String)>,
    /// Cross-attention keys / values, layer by layer.
    cross_names: Vec<String>,
    tokenizer: Tokenizer,
    dir: BlipDir,
    batch_size: usize,
}

impl BlipCaptioner {
    /// Build from `params: { model_dir, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = BlipDir::open(spec, Fetch::IfMissing)?;
        let layers = dir.config["text_config"]["num_hidden_layers"]
            .as_u64()
            .ok_or_else(|| Error::model(format!("{}: no text_config.num_hidden_layers", dir.root.display())))?;
        let names = kv_names(layers as usize, "past_key_values", "present");
        let cross: Vec<String> = kv_names(layers as usize, "cross", "")
            .into_iter()
            .map(|n| n.0)
            .collect();
        let open = |g: &str, inputs: &[&str], output: &str| -> Result<Mutex<Session>> {
            let path = dir.exported(g)?;
            let s = session(spec, &path)?;
            check_io(&s, &path, inputs, inputs, output)?;
            Ok(Mutex::new(s))
        };
        let mut dec_inputs = vec!["input_ids"];
        dec_inputs.extend(names.iter().map(|n| n.0.as_str()));
        dec_inputs.extend(cross.iter().map(String::as_str));
        Ok(BlipCaptioner {
            vision: open(GRAPHS[0], &["pixel_values"], "image_embeds")?,
            cross: open(GRAPHS[1], &["image_embeds"], &cross[0])?,
            decoder: open(GRAPHS[2], &dec_inputs, "logits")?,
            names,
            cross_names: cross,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
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

    /// Each layer's cross-attention keys and values of `[n, tokens, width]` image embeddings.
    fn cross(&self, emb: Vec<f32>, n: usize, tokens: usize, width: usize) -> Result<Vec<DynValue>> {
        let emb = Tensor::from_array((vec![n as i64, tokens as i64, width as i64], emb)).map_err(err)?;
        let mut s = lock(&self.cross)?;
        let mut out = s.run(ort::inputs!["image_embeds" => emb]).map_err(err)?;
        take_outputs(&mut out, self.cross_names.iter().map(String::as_str), GRAPHS[1])
    }
}

/// Cross-attention keys / values: the chunk's (rows = images), or owned
/// (one image's repeated for its beams, or reordered).
enum Cross<'a> {
    Chunk(&'a [DynValue]),
    Owned(Vec<DynValue>),
}

impl Cross<'_> {
    fn values(&self) -> &[DynValue] {
        match self {
            Cross::Chunk(v) => v,
            Cross::Owned(v) => v,
        }
    }
}

/// One decode: the self-attention cache, and the rows' cross-attention
/// keys / values (the chunk's, or one image's repeated for its beams).
struct Decode<'a> {
    cap: &'a BlipCaptioner,
    cross: Cross<'a>,
    past: Vec<DynValue>,
    /// Every row decodes the same image (beam search): reordering leaves
    /// the cross keys / values as they are.
    one_image: bool,
}

impl KvDecoder for Decode<'_> {
    fn start(&mut self, rows: usize) -> Result<()> {
        let first = self
            .cross
            .values()
            .first()
            .ok_or_else(|| Error::model("BLIP decoder without layers"))?;
        let (shape, _) = first.try_extract_tensor::<f32>().map_err(err)?;
        if shape[0] as usize != rows {
            return Err(Error::model(format!(
                "{} image rows for {rows} decoding rows",
                shape[0]
            )));
        }
        self.past = empty_cache(self.cap.names.len(), rows, shape[1] as usize, shape[3] as usize)?;
        Ok(())
    }

    fn feed(&mut self, ids: &[i64], rows: usize, t: usize) -> Result<Vec<f32>> {
        let names = &self.cap.names;
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(1 + 2 * names.len());
        let ids = Tensor::from_array((vec![rows as i64, t as i64], ids.to_vec())).map_err(err)?;
        inputs.push(("input_ids".into(), ids.into_dyn().into()));
        for ((p, _), v) in names.iter().zip(self.past.drain(..)) {
            inputs.push((p.clone(), v.into()));
        }
        for (c, v) in self.cap.cross_names.iter().zip(self.cross.values().iter()) {
            inputs.push((c.clone(), v.into()));
        }
        let mut s = lock(&self.cap.decoder)?;
        let mut out = s.run(inputs).map_err(err)?;
        self.past = take_outputs(&mut out, names.iter().map(|n| n.1.as_str()), GRAPHS[2])?;
        let (_, logits) = out["logits"].try_extract_tensor::<f32>().map_err(err)?;
        last_position(logits, rows, t)
    }

    fn reorder(&mut self, rows: &[u32]) -> Result<()> {
        self.past = self.past.iter().map(|v| take_rows(v, rows)).collect::<Result<_>>()?;
        if !self.one_image {
            let cross: Vec<DynValue> = self
                .cross
                .values()
                .iter()
                .map(|v| take_rows(v, rows))
                .collect::<Result<_>>()?;
            self.cross = Cross::Owned(cross);
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
            let (emb, n, d) = self.embed(chunk)?;
            let cross = self.cross(emb, chunk.len(), n, d)?;
            let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
                let (cross, one_image) = match i {
                    None => (Cross::Chunk(&cross), false),
                    Some(i) => {
                        let beams = vec![i as u32; opts.beams as usize];
                        let c = cross.iter().map(|v| take_rows(v, &beams)).collect::<Result<Vec<_>>>()?;
                        (Cross::Owned(c), true)
                    }
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

/// The `blip` / `blip2` components on ONNX Runtime: BLIP or BLIP-2, as the
/// folder's `model_type` says.
pub type AnyBlipCaptioner = AnyBlip<BlipCaptioner, crate::blip2::Blip2Captioner>;

/// Load the folder's architecture.
pub fn load(spec: &ComponentSpec) -> Result<AnyBlipCaptioner> {
    AnyBlip::load(spec, BlipCaptioner::load, crate::blip2::Blip2Captioner::load)
}

/// Params and the architecture's graphs without loading them.
pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
    BlipDir::probe(spec, &GRAPHS, &crate::blip2::GRAPHS)
}
