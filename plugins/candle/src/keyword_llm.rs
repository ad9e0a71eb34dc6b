//! The KeywordLLM stage on the candle Llama decoder (`llama.rs`): keyword
//! generation (Eq. 6) and the [IMG] hidden states of the preference prompt
//! (Eq. 7), from a GGUF file (quantized, tokenizer and chat template from its
//! metadata) or an HF folder (config.json, model.safetensors, tokenizer.json,
//! chat template from tokenizer_config.json).
//!
//! [IMG] tokens (GILL): `n_img_tokens` rows appended to the vocabulary. Their
//! embeddings come from `img_embeddings` (a safetensors file with an
//! `img_embeddings` `[n, hidden]` tensor, e.g. trained ones) or, by default,
//! are drawn once from N(mean, var) of the existing embedding rows with a
//! fixed seed — transformers' `resize_token_embeddings` mean-resizing rule —
//! so they are reproducible without a file.

use crate::device::{device, model_err};
use crate::llama::{Cache, Config, Llama};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use ragar_core::files::read_json;
use ragar_core::model::{Fetch, ModelSource};
use ragar_core::stage::{GenerateOptions, Generation, KeywordLlm, LlmInfo, PreferenceStates};
use ragar_core::{ComponentSpec, Error, ErrorKind, Result, ResultExt};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Folder (local or `hf:org/name`) holding the model.
    model_dir: String,
    /// A GGUF file inside `model_dir`; without it the folder's safetensors are used.
    #[serde(default)]
    gguf: Option<String>,
    /// Convert a GGUF's quantized matrices to f32 at load: 4-8x the memory,
    /// but candle's f32 matmuls beat its portable kernels for quant types
    /// without a SIMD path (Q4_1: ~3x faster prompts on a 2-core CPU).
    #[serde(default)]
    dequantize: bool,
    /// Number of [IMG] tokens (GILL uses 8).
    #[serde(default = "eight")]
    n_img_tokens: usize,
    /// Trained [IMG] embeddings (safetensors, tensor `img_embeddings`).
    #[serde(default)]
    img_embeddings: Option<String>,
}

fn eight() -> usize {
    8
}

/// The keyword LLM component.
pub struct LlamaKeywordLlm {
    model: Llama,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    eos: Vec<u32>,
    bos_token: String,
    eos_token: String,
    img: Tensor,
    device: Device,
}

fn locate(spec: &ComponentSpec, fetch: Fetch) -> Result<(Params, PathBuf)> {
    let p: Params = spec.params()?;
    if p.n_img_tokens == 0 {
        return Err(Error::config(format!(
            "{}.params.n_img_tokens must be at least 1",
            spec.key
        )));
    }
    let source = ModelSource::parse(&p.model_dir, |s| spec.resolve_path(s))?;
    let dir = match &p.gguf {
        Some(f) => source.resolve(&[f.as_str()], &[], fetch)?,
        None => source.resolve(
            &["config.json", "model.safetensors", "tokenizer.json"],
            &["tokenizer_config.json"],
            fetch,
        )?,
    };
    Ok((p, dir))
}

impl LlamaKeywordLlm {
    /// Build from `params: { model_dir, gguf, n_img_tokens, img_embeddings }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (p, dir) = locate(spec, Fetch::IfMissing)?;
        let device = device(spec)?;
        let (model, tokenizer, chat_template, special) = match &p.gguf {
            Some(f) => load_gguf(&dir.join(f), &device, p.dequantize)?,
            None => load_hf(&dir, spec, &device)?,
        };
        let [bos_token, eos_token] = special;
        let mut eos: Vec<u32> = [eos_token.as_str(), "<|im_end|>", "<|eot_id|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        eos.dedup();
        let img = match &p.img_embeddings {
            Some(f) => {
                let path = spec.resolve_path(f);
                let t = candle_core::safetensors::load(&path, &device).map_err(model_err(path.display()))?;
                let t = t
                    .get("img_embeddings")
                    .cloned()
                    .ok_or_else(|| Error::model(format!("{}: no tensor named img_embeddings", path.display())))?;
                let want = [p.n_img_tokens, model.config().hidden_size];
                if t.dims() != want {
                    return Err(Error::model(format!(
                        "{}: img_embeddings has shape {:?}, expected {want:?}",
                        path.display(),
                        t.dims()
                    )));
                }
                t.to_dtype(DType::F32).map_err(model_err("img_embeddings"))?
            }
            None => mean_resized_rows(model.embedding_matrix(), p.n_img_tokens).map_err(model_err("[IMG] init"))?,
        };
        Ok(LlamaKeywordLlm {
            model,
            tokenizer,
            chat_template,
            eos,
            bos_token,
            eos_token,
            img,
            device,
        })
    }

    /// Params and files, and `hidden_size`, without loading weights (GGUF
    /// metadata is read; tensors are not).
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        let (p, dir) = locate(spec, Fetch::Never)?;
        let probe = ragar_core::component::Probe::default();
        let hidden = match &p.gguf {
            Some(f) => {
                let path = dir.join(f);
                let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                let c = gguf_file::Content::read(&mut file).map_err(model_err(path.display()))?;
                let arch = c
                    .metadata
                    .get("general.architecture")
                    .and_then(|v| v.to_string().ok())
                    .cloned()
                    .unwrap_or_default();
                let probe = probe.file(&path)?;
                let h = c
                    .metadata
                    .get(&format!("{arch}.embedding_length"))
                    .and_then(|v| v.to_u32().ok());
                return Ok(match h {
                    Some(h) => probe.fact("hidden_size", h as u64),
                    None => probe,
                });
            }
            None => read_json::<serde_json::Value>(&dir.join("config.json"))?["hidden_size"].as_u64(),
        };
        let probe = probe
            .file(&dir.join("model.safetensors"))?
            .file(&dir.join("tokenizer.json"))?;
        Ok(match hidden {
            Some(h) => probe.fact("hidden_size", h),
            None => probe,
        })
    }

    fn render(&self, prompt: &str, chat: bool) -> Result<String> {
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

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::invalid_input(format!("tokenising: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Prompt ids with room for `reserve` more tokens: keep the end if too long.
    fn fit(&self, ids: Vec<u32>, reserve: usize) -> (Vec<u32>, bool) {
        let ctx = self.model.config().max_position_embeddings;
        let room = ctx.saturating_sub(reserve).max(1);
        if ids.len() > room {
            (ids[ids.len() - room..].to_vec(), true)
        } else {
            (ids, false)
        }
    }

    fn generate_one(&self, prompt: &str, o: &GenerateOptions, seed: u64) -> Result<Generation> {
        let text = self.render(prompt, o.chat_template)?;
        let (ids, prompt_truncated) = self.fit(self.encode(&text)?, o.max_tokens as usize);
        let err = model_err("LLM forward");
        let mut cache = Cache::default();
        let input = Tensor::new(ids.as_slice(), &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(err)?;
        let hidden = self
            .model
            .forward(&input, &mut cache)
            .map_err(model_err("LLM forward"))?;
        let mut logits = last_logits(&self.model, &hidden).map_err(model_err("LLM forward"))?;
        let mut rng = SplitMix64(seed);
        let mut out: Vec<u32> = Vec::new();
        let mut text_out = String::new();
        for _ in 0..o.max_tokens {
            let next = sample(&logits, o.temperature, o.top_p, &mut rng);
            if self.eos.contains(&next) {
                break;
            }
            out.push(next);
            text_out = self
                .tokenizer
                .decode(&out, true)
                .map_err(|e| Error::model(format!("decoding: {e}")))?;
            if let Some(cut) = o.stop.iter().filter_map(|s| text_out.find(s.as_str())).min() {
                text_out.truncate(cut);
                break;
            }
            let step = Tensor::new(&[next], &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(model_err("LLM"))?;
            let hidden = self
                .model
                .forward(&step, &mut cache)
                .map_err(model_err("LLM forward"))?;
            logits = last_logits(&self.model, &hidden).map_err(model_err("LLM forward"))?;
        }
        Ok(Generation {
            text: text_out.into(),
            tokens: out.len() as u32,
            prompt_truncated,
        })
    }
}

fn last_logits(model: &Llama, hidden: &Tensor) -> candle_core::Result<Vec<f32>> {
    let t = hidden.dim(1)?;
    model.logits(&hidden.i((.., t - 1..t))?)?.flatten_all()?.to_vec1()
}

/// A small seeded generator: the same seed gives the same samples on every
/// platform and ragar version (no dependence on a crate's RNG choice).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Greedy when `temperature` is 0, else nucleus sampling at `temperature`.
fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut SplitMix64) -> u32 {
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

/// `n` rows drawn from N(mean, var) of the embedding rows, per dimension, seed 0.
fn mean_resized_rows(emb: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let emb = emb.to_dtype(DType::F32)?;
    let mean = emb.mean(0)?;
    let std = emb.broadcast_sub(&mean)?.sqr()?.mean(0)?.sqrt()?;
    let h = mean.dim(0)?;
    let mut rng = SplitMix64(0);
    // Box-Muller from the same generator, so the rows never change.
    let z: Vec<f32> = (0..n * h)
        .map(|_| {
            let (u1, u2) = (rng.next_f32().max(1e-7), rng.next_f32());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect();
    let z = Tensor::from_vec(z, (n, h), emb.device())?;
    z.broadcast_mul(&std)?.broadcast_add(&mean)
}

type Loaded = (Llama, Tokenizer, Option<String>, [String; 2]);

fn load_gguf(path: &Path, device: &Device, dequantize: bool) -> Result<Loaded> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(model_err(path.display()))?;
    let md = |k: &str| content.metadata.get(k);
    let strings = |k: &str| -> Result<Vec<String>> {
        let arr = md(k).ok_or_else(|| Error::model(format!("{}: GGUF metadata lacks {k}", path.display())))?;
        arr.to_vec()
            .map_err(model_err(k))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(model_err(k)))
            .collect()
    };
    let kind = md("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if kind != "gpt2" {
        return Err(Error::unsupported(format!(
            "{}: GGUF tokenizer '{kind}' is not supported (byte-level BPE 'gpt2' is); put a tokenizer.json beside it",
            path.display()
        )));
    }
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(model_err("token_type"))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = md("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let tokenizer = ragar_core::text::gguf_bpe_tokenizer(&tokens, &types, &merges, &pre)?;
    let tok_at = |k: &str| {
        md(k)
            .and_then(|v| v.to_u32().ok())
            .and_then(|i| tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let special = [
        tok_at("tokenizer.ggml.bos_token_id"),
        tok_at("tokenizer.ggml.eos_token_id"),
    ];
    let template = md("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    let model = Llama::from_gguf(&content, &mut file, device, dequantize).map_err(model_err(path.display()))?;
    Ok((model, tokenizer, template, special))
}

fn load_hf(dir: &Path, spec: &ComponentSpec, device: &Device) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let cfg: Config = serde_json::from_value(read_json::<serde_json::Value>(&cfg_path)?)
        .or_err(ErrorKind::Model, cfg_path.display())?;
    let weights = dir.join("model.safetensors");
    // Safety: read-only memory map of a file ragar does not modify.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], crate::device::dtype(spec, device)?, device) }
        .map_err(model_err(weights.display()))?;
    let model = Llama::from_safetensors(vb, &cfg).map_err(model_err(weights.display()))?;
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
    Ok((
        model,
        tokenizer,
        tc["chat_template"].as_str().map(str::to_string),
        [token("bos_token"), token("eos_token")],
    ))
}

impl LlamaKeywordLlm {
    /// The chat-rendered prompt and its token ids (for parity tests and `ragar stage`).
    pub fn chat_prompt(&self, prompt: &str) -> Result<(String, Vec<u32>)> {
        let text = self.render(prompt, true)?;
        let ids = self.encode(&text)?;
        Ok((text, ids))
    }

    /// Final-position logits for `ids` (for parity tests).
    pub fn final_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let input = Tensor::new(ids, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_err("LLM"))?;
        let hidden = self
            .model
            .forward(&input, &mut Cache::default())
            .map_err(model_err("LLM forward"))?;
        last_logits(&self.model, &hidden).map_err(model_err("LLM forward"))
    }
}

impl KeywordLlm for LlamaKeywordLlm {
    fn info(&self) -> LlmInfo {
        LlmInfo {
            hidden_size: self.model.config().hidden_size as u32,
            n_img_tokens: self.img.dim(0).unwrap_or(0) as u32,
            context: self.model.config().max_position_embeddings as u32,
        }
    }

    fn generate(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        // One sequence at a time; each prompt gets its own seed so a batch
        // and single calls sample the same text.
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| self.generate_one(p, opts, opts.seed.wrapping_add(i as u64)))
            .collect()
    }

    fn preference_states(&self, prompts: &[String]) -> Result<Vec<PreferenceStates>> {
        let n = self.img.dim(0).unwrap_or(0);
        prompts
            .iter()
            .map(|p| {
                let text = self.render(p, true)?;
                let (ids, _) = self.fit(self.encode(&text)?, n);
                let err = model_err("LLM forward");
                let run = || -> candle_core::Result<(Tensor, Tensor)> {
                    let ids_t = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
                    let prompt = self.model.embed(&ids_t)?.to_dtype(DType::F32)?;
                    let x = Tensor::cat(&[&prompt, &self.img.unsqueeze(0)?], 1)?;
                    let hidden = self
                        .model
                        .forward_embeds(&x, &mut Cache::default())?
                        .to_dtype(DType::F32)?;
                    let t = ids.len();
                    // [IMG] positions come last; the text-related embedding is
                    // the mean final hidden state over the prompt's own tokens.
                    Ok((hidden.i((0, t..t + n))?, hidden.i((0, ..t))?.mean(D::Minus2)?))
                };
                let (img, txt) = run().map_err(err)?;
                let to = |t: &Tensor| -> Result<ragar_core::Tensor> {
                    let dims = t.dims().to_vec();
                    let v = t
                        .flatten_all()
                        .and_then(|f| f.to_vec1::<f32>())
                        .map_err(model_err("LLM output"))?;
                    ragar_core::Tensor::from_f32(&dims, v)
                };
                Ok(PreferenceStates {
                    img_states: to(&img)?,
                    text_embedding: to(&txt)?,
                })
            })
            .collect()
    }
}
