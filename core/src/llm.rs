//! The KeywordLLM's text side, shared by every backend: the chat template,
//! tokenising and fitting the prompt into the context, the generation loop
//! (greedy or seeded nucleus sampling, end tokens, stop strings) and the
//! default [IMG] embeddings. A backend supplies only the decoder step
//! (`ids -> last-position logits`, keeping its own key/value cache) and the
//! hidden states of Eq. 7, so candle, ONNX Runtime and libtorch write the
//! same keywords from the same weights.

use crate::component::Probe;
use crate::files::read_json;
use crate::model::{Fetch, ModelSource};
use crate::stage::{GenerateOptions, Generation, KeywordLlm, LlmInfo, PreferenceStates};
use crate::Tensor;
use crate::{ComponentSpec, DType, Error, ErrorKind, Result, ResultExt};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The `params:` of the keyword LLM on exported graphs (ort, tch); candle's
/// adds `gguf` and `dequantize`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmParams {
    /// HF folder (local or `hf:org/name`): config.json, tokenizer.json,
    /// tokenizer_config.json, the weights (for the default [IMG] rows) and
    /// the graphs of `scripts/export_llm.py`.
    pub model_dir: String,
    /// Number of [IMG] tokens (GILL uses 8).
    #[serde(default = "eight")]
    pub n_img_tokens: usize,
    /// Trained [IMG] embeddings (safetensors, tensor `img_embeddings`).
    #[serde(default)]
    pub img_embeddings: Option<String>,
    /// candle's GGUF file: accepted only as null here, so a config written
    /// for candle gets a clear error, not an unknown key.
    #[serde(default)]
    pub gguf: Option<String>,
    /// candle's GGUF option; nothing to dequantize in exported graphs.
    #[serde(default)]
    pub dequantize: bool,
}

fn eight() -> usize {
    8
}

/// A resolved LLM folder, with the shape facts a cache needs.
pub struct LlmDir {
    /// The folder.
    pub root: PathBuf,
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_key_value_heads` (grouped-query attention), else the heads.
    pub kv_heads: usize,
    /// `head_dim`, else hidden / heads.
    pub head_dim: usize,
    /// `max_position_embeddings`.
    pub context: usize,
    /// [IMG] tokens.
    pub n_img: usize,
    img_embeddings: Option<PathBuf>,
}

impl LlmDir {
    /// Parse the params and read `config.json`.
    pub fn open(spec: &ComponentSpec, fetch: Fetch) -> Result<LlmDir> {
        let p: LlmParams = spec.params()?;
        if let Some(g) = &p.gguf {
            return Err(Error::config(format!(
                "{}.params.gguf ({g}): GGUF files run on candle only; for ort / tch point model_dir at an HF \
                 folder exported with scripts/export_llm.py (setup makes ${{RAGAR_CACHE}}/models/smollm2-135m-hf) \
                 and set {}.params.gguf=null",
                spec.key, spec.key
            )));
        }
        if p.n_img_tokens == 0 {
            return Err(Error::config(format!(
                "{}.params.n_img_tokens must be at least 1",
                spec.key
            )));
        }
        let source = ModelSource::parse(&p.model_dir, |s| spec.resolve_path(s))?;
        let root = source.resolve(
            &["config.json", "tokenizer.json"],
            &[
                "tokenizer_config.json",
                "model.safetensors",
                "model.safetensors.index.json",
            ],
            fetch,
        )?;
        let cfg_path = root.join("config.json");
        let cfg: serde_json::Value = read_json(&cfg_path)?;
        let get = |k: &str| cfg[k].as_u64().map(|v| v as usize);
        let need = |k: &str| get(k).ok_or_else(|| Error::model(format!("{}: no {k}", cfg_path.display())));
        let (hidden, heads) = (need("hidden_size")?, need("num_attention_heads")?);
        Ok(LlmDir {
            hidden,
            layers: need("num_hidden_layers")?,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim: get("head_dim").unwrap_or(hidden / heads.max(1)),
            context: need("max_position_embeddings")?,
            n_img: p.n_img_tokens,
            img_embeddings: p.img_embeddings.map(|f| spec.resolve_path(&f)),
            root,
        })
    }

    /// Tokenizer and chat template.
    pub fn text(&self) -> Result<LlmText> {
        LlmText::from_hf_dir(&self.root, self.context)
    }

    /// The [IMG] rows `[n, hidden]`: the trained file, else mean-resized
    /// from the folder's embedding matrix (the same rows candle draws).
    pub fn img_rows(&self) -> Result<Vec<f32>> {
        match &self.img_embeddings {
            Some(f) => read_img_embeddings(f, self.n_img, self.hidden),
            None => {
                let (emb, h) = read_embedding_matrix(&self.root)?;
                if h != self.hidden {
                    return Err(Error::model(format!(
                        "{}: embedding width {h} but hidden_size {}",
                        self.root.display(),
                        self.hidden
                    )));
                }
                mean_resized_rows(&emb, h, self.n_img)
            }
        }
    }

    /// The path of an exported graph (`scripts/export_llm.py`), which must exist.
    pub fn exported(&self, graph: &str) -> Result<PathBuf> {
        let path = self.root.join(graph);
        if !path.is_file() {
            return Err(Error::not_found(format!(
                "missing {} (export it with: python scripts/export_llm.py {}{})",
                path.display(),
                self.root.display(),
                DType::of_exported_file(graph).export_flag()
            )));
        }
        Ok(path)
    }

    /// The stage's shape facts.
    pub fn info(&self) -> LlmInfo {
        LlmInfo {
            hidden_size: self.hidden as u32,
            n_img_tokens: self.n_img as u32,
            context: self.context as u32,
        }
    }

    /// Params, graphs and `hidden_size` without loading anything.
    pub fn probe(spec: &ComponentSpec, graphs: &[&str]) -> Result<Probe> {
        let dir = LlmDir::open(spec, Fetch::Never)?;
        graphs
            .iter()
            .try_fold(Probe::default(), |p, g| p.file(&dir.root.join(g)))?
            .file(&dir.root.join("tokenizer.json"))
            .map(|p| p.fact("hidden_size", dir.hidden as u64))
    }

    /// The names of the cache inputs and outputs, layer by layer.
    pub fn cache_names(&self) -> Vec<(String, String)> {
        (0..self.layers)
            .flat_map(|i| ["key", "value"].map(|k| (format!("past_key_values.{i}.{k}"), format!("present.{i}.{k}"))))
            .collect()
    }
}

/// Tokenizer, chat template and end tokens of one LLM.
pub struct LlmText {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    eos: Vec<u32>,
    context: usize,
}

impl LlmText {
    /// From loaded parts; `special` = [bos, eos] token strings, `context`
    /// the model's `max_position_embeddings`. The end tokens are the
    /// checkpoint's eos and the chat formats' turn ends the vocabulary has.
    pub fn new(tokenizer: Tokenizer, chat_template: Option<String>, special: [String; 2], context: usize) -> Self {
        let [bos_token, eos_token] = special;
        let mut eos: Vec<u32> = [eos_token.as_str(), "<|im_end|>", "<|eot_id|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        eos.dedup();
        LlmText {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            eos,
            context,
        }
    }

    /// From an HF folder: `tokenizer.json`, and `tokenizer_config.json`
    /// (bos / eos tokens, the chat template) when present; the template
    /// may instead be in `chat_template.jinja` (transformers 5 saves it
    /// there).
    pub fn from_hf_dir(dir: &Path, context: usize) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).or_err(ErrorKind::Model, tok_path.display())?;
        let tc = dir.join("tokenizer_config.json");
        let tc = if tc.is_file() {
            read_json::<serde_json::Value>(&tc)?
        } else {
            serde_json::Value::Null
        };
        let token = |k: &str| match &tc[k] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let jinja = dir.join("chat_template.jinja");
        let template = match tc["chat_template"].as_str() {
            Some(t) => Some(t.to_string()),
            None if jinja.is_file() => Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?),
            None => None,
        };
        Ok(LlmText::new(
            tokenizer,
            template,
            [token("bos_token"), token("eos_token")],
            context,
        ))
    }

    /// The model's context length.
    pub fn context(&self) -> usize {
        self.context
    }

    /// `prompt` as a user turn of the chat template (when `chat` and the
    /// checkpoint has one), ready for the assistant's answer.
    pub fn render(&self, prompt: &str, chat: bool) -> Result<String> {
        let Some(tpl) = self.chat_template.as_deref().filter(|_| chat) else {
            return Ok(prompt.to_string());
        };
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", tpl)
            .map_err(|e| Error::model(format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => vec![minijinja::context!{ role => "user", content => prompt }],
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::model(format!("chat template: {e}")))
    }

    /// Token ids of `text` (special tokens are the template's business).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::invalid_input(format!("tokenising: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The rendered prompt's ids with room for `reserve` more tokens in the
    /// context: the end is kept when too long (the instruction sits there),
    /// and the flag says it was cut.
    pub fn prompt_ids(&self, prompt: &str, chat: bool, reserve: usize) -> Result<(Vec<u32>, bool)> {
        let ids = self.encode(&self.render(prompt, chat)?)?;
        let room = self.context.saturating_sub(reserve).max(1);
        Ok(if ids.len() > room {
            (ids[ids.len() - room..].to_vec(), true)
        } else {
            (ids, false)
        })
    }

    /// Eq. 6 for one prompt: `step(ids)` feeds tokens to the decoder (the
    /// prompt first, then one token at a time, continuing its cache) and
    /// returns the logits at the last position.
    pub fn generate(
        &self,
        step: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>,
        prompt: &str,
        o: &GenerateOptions,
        seed: u64,
    ) -> Result<Generation> {
        let (ids, prompt_truncated) = self.prompt_ids(prompt, o.chat_template, o.max_tokens as usize)?;
        let mut logits = step(&ids)?;
        let mut rng = SplitMix64(seed);
        let mut out: Vec<u32> = Vec::new();
        let mut text = String::new();
        for _ in 0..o.max_tokens {
            let next = sample(&logits, o.temperature, o.top_p, &mut rng);
            if self.eos.contains(&next) {
                break;
            }
            out.push(next);
            text = self
                .tokenizer
                .decode(&out, true)
                .map_err(|e| Error::model(format!("decoding: {e}")))?;
            if let Some(cut) = o.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
                break;
            }
            logits = step(&[next])?;
        }
        Ok(Generation {
            text: text.into(),
            tokens: out.len() as u32,
            prompt_truncated,
        })
    }
}

/// What a backend runs for the KeywordLLM on exported graphs
/// (`scripts/export_llm.py`): the decoder on a key/value cache it keeps,
/// and Eq. 7's hidden states. [`ExportedLlm`] does the rest.
pub trait LlmGraphs: Send + Sync + 'static {
    /// One sequence's key/value cache, as the backend holds it.
    type Cache;
    /// An empty cache (before the prompt).
    fn empty_cache(&self, dir: &LlmDir) -> Result<Self::Cache>;
    /// Feed `ids` on top of `cache`, which holds `len` tokens, and grow it;
    /// the logits at the last position.
    fn step(&self, cache: &mut Self::Cache, len: usize, ids: &[u32]) -> Result<Vec<f32>>;
    /// Final hidden states `[t + n, h]` of the prompt `ids` (t tokens)
    /// followed by the [IMG] rows `img` (`[n, h]`).
    fn hidden_states(&self, ids: &[u32], img: &[f32], n: usize, h: usize) -> Result<Vec<f32>>;
}

/// The KeywordLLM stage over a backend's exported graphs: one sequence at
/// a time, each prompt with its own seed (as candle), so a batch and
/// single calls give the same text.
pub struct ExportedLlm<G> {
    graphs: G,
    dir: LlmDir,
    text: LlmText,
    img: Vec<f32>,
}

impl<G: LlmGraphs> ExportedLlm<G> {
    /// The stage on `graphs` of the folder `dir` (tokenizer, template and
    /// [IMG] rows read here).
    pub fn new(graphs: G, dir: LlmDir) -> Result<Self> {
        Ok(ExportedLlm {
            text: dir.text()?,
            img: dir.img_rows()?,
            graphs,
            dir,
        })
    }
}

impl<G: LlmGraphs> KeywordLlm for ExportedLlm<G> {
    fn info(&self) -> LlmInfo {
        self.dir.info()
    }

    fn generate(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut cache = self.graphs.empty_cache(&self.dir)?;
                let mut len = 0;
                let mut step = |ids: &[u32]| {
                    let logits = self.graphs.step(&mut cache, len, ids)?;
                    len += ids.len();
                    Ok(logits)
                };
                self.text.generate(&mut step, p, opts, opts.seed.wrapping_add(i as u64))
            })
            .collect()
    }

    fn preference_states(&self, prompts: &[String]) -> Result<Vec<PreferenceStates>> {
        let (n, h) = (self.dir.n_img, self.dir.hidden);
        prompts
            .iter()
            .map(|p| {
                let (ids, _) = self.text.prompt_ids(p, true, n)?;
                let hidden = self.graphs.hidden_states(&ids, &self.img, n, h)?;
                preference_states(&hidden, ids.len(), n, h)
            })
            .collect()
    }
}

/// Eq. 7's outputs from the final hidden states `[t + n, h]` of a prompt
/// of `t` tokens followed by the `n` [IMG] rows: the states at the [IMG]
/// positions, and the mean state over the prompt's own tokens (the
/// text-related embedding).
pub fn preference_states(hidden: &[f32], t: usize, n: usize, h: usize) -> Result<PreferenceStates> {
    if t == 0 || hidden.len() != (t + n) * h {
        return Err(Error::model(format!(
            "LLM returned {} hidden values, expected ({t} prompt + {n} [IMG] tokens) x {h}",
            hidden.len()
        )));
    }
    let mut mean = vec![0f64; h];
    for row in hidden[..t * h].chunks(h) {
        mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
    }
    Ok(PreferenceStates {
        img_states: Tensor::from_f32(&[n, h], hidden[t * h..].to_vec())?,
        text_embedding: Tensor::from_f32(&[h], mean.iter().map(|m| (m / t as f64) as f32).collect())?,
    })
}

/// A small seeded generator: the same seed gives the same samples on every
/// platform and ragar version (no dependence on a crate's RNG choice).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Uniform in [0, 1), 24 bits.
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Greedy when `temperature` is 0 (first of equal maxima), else nucleus
/// sampling at `temperature`.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::MIN, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let cut = probs.iter().position(|p| {
        kept += p.1;
        kept >= top_p.clamp(0.0, 1.0)
    });
    probs.truncate(cut.map_or(probs.len(), |c| c + 1));
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.next_f32() * mass;
    for (id, p) in &probs {
        r -= p;
        if r <= 0.0 {
            return *id;
        }
    }
    probs.last().map_or_else(argmax, |p| p.0)
}

/// The default [IMG] embeddings: `n` rows drawn from N(mean, var) of the
/// embedding matrix `emb` (`[vocab, h]`, row-major), per dimension, seed 0 —
/// transformers' `resize_token_embeddings` mean-resizing rule, made
/// reproducible without a file. Statistics are accumulated in f64.
pub fn mean_resized_rows(emb: &[f32], h: usize, n: usize) -> Result<Vec<f32>> {
    if h == 0 || emb.is_empty() || emb.len() % h != 0 {
        return Err(Error::model(format!(
            "embedding matrix of {} values is not a whole number of rows of {h}",
            emb.len()
        )));
    }
    let rows = (emb.len() / h) as f64;
    let mut mean = vec![0f64; h];
    for row in emb.chunks(h) {
        mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
    }
    mean.iter_mut().for_each(|m| *m /= rows);
    let mut var = vec![0f64; h];
    for row in emb.chunks(h) {
        var.iter_mut()
            .zip(row.iter().zip(&mean))
            .for_each(|(v, (&x, m))| *v += (x as f64 - m).powi(2));
    }
    let std: Vec<f32> = var.iter().map(|v| (v / rows).sqrt() as f32).collect();
    let mut rng = SplitMix64(0);
    // Box-Muller from the same generator, so the rows never change.
    Ok((0..n * h)
        .map(|i| {
            let (u1, u2) = (rng.next_f32().max(1e-7), rng.next_f32());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
            z * std[i % h] + mean[i % h] as f32
        })
        .collect())
}

/// `img_embeddings` `[n, hidden]` from a safetensors file (trained [IMG] rows), as f32.
pub fn read_img_embeddings(path: &Path, n: usize, hidden: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
    let t = st
        .tensor("img_embeddings")
        .map_err(|_| Error::model(format!("{}: no tensor named img_embeddings", path.display())))?;
    if t.shape() != [n, hidden] {
        return Err(Error::model(format!(
            "{}: img_embeddings has shape {:?}, expected {:?}",
            path.display(),
            t.shape(),
            [n, hidden]
        )));
    }
    to_f32(&t).map_err(|e| e.context(path.display().to_string()))
}

/// The token embedding matrix (`model.embed_tokens.weight`, `[vocab, h]`)
/// of an HF folder's `model.safetensors` or sharded `model-*.safetensors`
/// (found through `model.safetensors.index.json`), as f32.
pub fn read_embedding_matrix(dir: &Path) -> Result<(Vec<f32>, usize)> {
    const NAME: &str = "model.embed_tokens.weight";
    let index = dir.join("model.safetensors.index.json");
    let file = if index.is_file() {
        let idx: serde_json::Value = read_json(&index)?;
        let shard = idx["weight_map"][NAME]
            .as_str()
            .ok_or_else(|| Error::model(format!("{}: weight_map has no {NAME}", index.display())))?;
        dir.join(shard)
    } else {
        dir.join("model.safetensors")
    };
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::model(format!("{}: {e}", file.display())))?;
    let t = st
        .tensor(NAME)
        .map_err(|_| Error::model(format!("{}: no tensor named {NAME}", file.display())))?;
    let [_, h] = t.shape() else {
        return Err(Error::model(format!(
            "{}: {NAME} has shape {:?}, expected [vocab, hidden]",
            file.display(),
            t.shape()
        )));
    };
    let h = *h;
    Ok((to_f32(&t).map_err(|e| e.context(file.display().to_string()))?, h))
}

fn to_f32(t: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::model(format!(
                "tensor of dtype {other:?}, expected f32, f16 or bf16"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_sampling_takes_the_first_maximum() {
        let mut rng = SplitMix64(0);
        assert_eq!(sample(&[0.1, 0.7, 0.7, 0.2], 0.0, 1.0, &mut rng), 1);
    }

    #[test]
    fn nucleus_sampling_keeps_to_the_nucleus_and_is_seeded() {
        // Token 2 carries ~99.9 % of the mass: top_p 0.5 can only give it.
        let logits = [0.0, 1.0, 9.0, 0.5];
        for seed in 0..20 {
            assert_eq!(sample(&logits, 1.0, 0.5, &mut SplitMix64(seed)), 2);
        }
        let draws = |seed| {
            let mut rng = SplitMix64(seed);
            (0..50)
                .map(|_| sample(&[1.0, 1.0, 1.0], 1.0, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        let mut rng = SplitMix64(7);
        let seen: std::collections::BTreeSet<u32> =
            (0..200).map(|_| sample(&[1.0, 1.0, 1.0], 1.0, 1.0, &mut rng)).collect();
        assert_eq!(seen.len(), 3, "uniform logits reach every token");
    }

    #[test]
    fn mean_resized_rows_follow_the_embedding_statistics() {
        // Column 0 ~ mean 2, std 0; column 1 ~ mean 0, std 1.
        let emb: Vec<f32> = (0..2000)
            .flat_map(|i| [2.0, if i % 2 == 0 { 1.0 } else { -1.0 }])
            .collect();
        let rows = mean_resized_rows(&emb, 2, 500).unwrap();
        assert_eq!(rows.len(), 1000);
        assert!(rows.iter().step_by(2).all(|&x| (x - 2.0).abs() < 1e-6));
        let col1: Vec<f32> = rows.iter().skip(1).step_by(2).copied().collect();
        let mean = col1.iter().sum::<f32>() / 500.0;
        let var = col1.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 500.0;
        assert!(mean.abs() < 0.15 && (var - 1.0).abs() < 0.2, "mean {mean} var {var}");
        assert_eq!(rows, mean_resized_rows(&emb, 2, 500).unwrap(), "fixed seed");
        assert!(mean_resized_rows(&emb[..3], 2, 1).is_err());
    }
}
