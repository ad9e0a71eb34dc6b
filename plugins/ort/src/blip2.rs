//! The BLIP-2 (OPT) captioner from the ONNX graphs `scripts/export_blip.py`
//! writes into an HF Blip2ForConditionalGeneration folder:
//! `image_queries.onnx` (pixel_values -> the projected Q-Former queries,
//! the language model's input embeddings for the image), `embed_tokens.onnx`
//! (input_ids -> inputs_embeds) and `language_model_with_past.onnx` (OPT on
//! its key/value cache, from input embeddings). The prefix is the queries
//! in place of the `<image>` placeholders (or before the text), then the
//! prompt, as transformers' `generate` builds it; preprocessing, tokenizer,
//! prefix and decode loops are shared with candle (`ragar_core::blip`,
//! `ragar_core::decoding`).

use crate::runtime::{check_io, empty_cache, lock, ort_err as err, run_f32, session, take_outputs, take_rows};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use ragar_core::blip::{caption_chunks, BlipDir};
use ragar_core::decoding::{generate, kv_names, last_position, Cached, KvDecoder, Stepper};
use ragar_core::model::Fetch;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::sync::Mutex;
use tokenizers::Tokenizer;

/// The graphs, in the model folder.
pub const GRAPHS: [&str; 3] = [
    "image_queries.onnx",
    "embed_tokens.onnx",
    "language_model_with_past.onnx",
];

/// The BLIP-2 captioner on ONNX Runtime.
pub struct Blip2Captioner {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    queries: Mutex<Session>,
    embed: Mutex<Session>,
    lm: Mutex<Session>,
    /// Cache input and output names, layer by layer: (past, present).
    names: Vec<(String, String)>,
    heads: usize,
    head_dim: usize,
    tokenizer: Tokenizer,
    dir: BlipDir,
    batch_size: usize,
}

impl Blip2Captioner {
    /// Build from `params: { model_dir, batch_size }` (a BLIP-2 folder).
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = BlipDir::open(spec, Fetch::IfMissing)?;
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
        let names = kv_names(layers, "past_key_values", "present");
        let open = |g: &str, inputs: &[&str], output: &str| -> Result<Mutex<Session>> {
            let path = dir.exported(g)?;
            let s = session(spec, &path)?;
            check_io(&s, &path, inputs, inputs, output)?;
            Ok(Mutex::new(s))
        };
        let mut lm_inputs = vec!["inputs_embeds", "attention_mask"];
        lm_inputs.extend(names.iter().map(|n| n.0.as_str()));
        Ok(Blip2Captioner {
            queries: open(GRAPHS[0], &["pixel_values"], "image_queries")?,
            embed: open(GRAPHS[1], &["input_ids"], "inputs_embeds")?,
            lm: open(GRAPHS[2], &lm_inputs, "logits")?,
            names,
            heads,
            head_dim: hidden / heads.max(1),
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    /// The projected queries of `images`: `[n, q, d]` values, q, d.
    fn image_queries(&self, images: &[Image]) -> Result<(Vec<f32>, usize, usize)> {
        let (w, h) = self.dir.size;
        let px = Tensor::from_array((
            vec![images.len() as i64, 3, h as i64, w as i64],
            self.dir.pixel_values(images)?,
        ))
        .map_err(err)?;
        let mut s = lock(&self.queries)?;
        let out = s.run(ort::inputs!["pixel_values" => px]).map_err(err)?;
        let (shape, data) = out["image_queries"].try_extract_tensor::<f32>().map_err(err)?;
        if shape.len() != 3 || shape[0] as usize != images.len() {
            return Err(Error::model(format!(
                "image_queries of shape {shape:?} for {} images, expected [n, queries, width]",
                images.len()
            )));
        }
        Ok((data.to_vec(), shape[1] as usize, shape[2] as usize))
    }

    fn embed_tokens(&self, ids: Vec<i64>, rows: usize) -> Result<Vec<f32>> {
        let t = ids.len() / rows.max(1);
        let ids = Tensor::from_array((vec![rows as i64, t as i64], ids)).map_err(err)?;
        run_f32(&self.embed, vec![("input_ids", ids.into_dyn())], "inputs_embeds")
    }
}

/// One decode: the language model's cache, and the rows' image queries
/// (used once, in the prefix).
struct Decode<'a> {
    cap: &'a Blip2Captioner,
    /// `[rows, q, d]`.
    queries: Vec<f32>,
    q: usize,
    d: usize,
    /// Leading prefix ids the queries replace.
    skip: usize,
    past: Vec<DynValue>,
    len: usize,
}

impl KvDecoder for Decode<'_> {
    fn start(&mut self, rows: usize) -> Result<()> {
        if self.queries.len() != rows * self.q * self.d {
            return Err(Error::model(format!(
                "{} image query rows for {rows} decoding rows",
                self.queries.len() / (self.q * self.d).max(1)
            )));
        }
        self.past = empty_cache(self.cap.names.len(), rows, self.cap.heads, self.cap.head_dim)?;
        self.len = 0;
        Ok(())
    }

    fn feed(&mut self, ids: &[i64], rows: usize, t: usize) -> Result<Vec<f32>> {
        let (q, d) = (self.q, self.d);
        // The prefix: each row's queries, then the embeddings of its ids
        // after the placeholders.
        let (embeds, positions) = if self.len == 0 {
            let text: Vec<i64> = ids.chunks(t).flat_map(|r| r[self.skip..].to_vec()).collect();
            let tt = t - self.skip;
            let emb = self.cap.embed_tokens(text, rows)?;
            let rows_of = (0..rows).flat_map(|r| {
                self.queries[r * q * d..(r + 1) * q * d]
                    .iter()
                    .chain(&emb[r * tt * d..(r + 1) * tt * d])
                    .copied()
            });
            (rows_of.collect::<Vec<f32>>(), q + tt)
        } else {
            (self.cap.embed_tokens(ids.to_vec(), rows)?, t)
        };
        let x = Tensor::from_array((vec![rows as i64, positions as i64, d as i64], embeds)).map_err(err)?;
        let total = self.len + positions;
        let mask = Tensor::from_array((vec![rows as i64, total as i64], vec![1i64; rows * total])).map_err(err)?;
        let mut inputs: Vec<(String, DynValue)> = vec![
            ("inputs_embeds".into(), x.into_dyn()),
            ("attention_mask".into(), mask.into_dyn()),
        ];
        for ((p, _), v) in self.cap.names.iter().zip(self.past.drain(..)) {
            inputs.push((p.clone(), v));
        }
        let mut s = lock(&self.cap.lm)?;
        let mut out = s.run(inputs).map_err(err)?;
        self.past = take_outputs(&mut out, self.cap.names.iter().map(|n| n.1.as_str()), GRAPHS[2])?;
        self.len = total;
        let (_, logits) = out["logits"].try_extract_tensor::<f32>().map_err(err)?;
        last_position(logits, rows, positions)
    }

    fn reorder(&mut self, rows: &[u32]) -> Result<()> {
        self.past = self.past.iter().map(|v| take_rows(v, rows)).collect::<Result<_>>()?;
        Ok(())
    }
}

impl Captioner for Blip2Captioner {
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
        let prefix = self
            .dir
            .prefix(&self.tokenizer, opts.prompt.as_str(), opts.max_tokens)?;
        caption_chunks(images, self.batch_size, &self.tokenizer, |chunk| {
            let (queries, q, d) = self.image_queries(chunk)?;
            let stepper = |i: Option<usize>| -> Result<Box<dyn Stepper + '_>> {
                let queries = match i {
                    None => queries.clone(),
                    Some(i) => queries[i * q * d..(i + 1) * q * d].repeat(opts.beams as usize),
                };
                let decode = Decode {
                    cap: self,
                    queries,
                    q,
                    d,
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
