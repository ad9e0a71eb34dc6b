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
use candle_core::{DType, Device, IndexOp, Tensor};
use ragar_core::files::read_json;
use ragar_core::llm::{self, LlmText};
use ragar_core::model::{Fetch, ModelSource};
use ragar_core::stage::{GenerateOptions, Generation, KeywordLlm, LlmInfo, PreferenceStates};
use ragar_core::{ComponentSpec, Error, ErrorKind, Result, ResultExt};
use std::path::{Path, PathBuf};

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
    text: LlmText,
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
            &["tokenizer_config.json", "chat_template.jinja"],
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
        let (model, text) = match &p.gguf {
            Some(f) => load_gguf(&dir.join(f), &device, p.dequantize)?,
            None => load_hf(&dir, spec, &device)?,
        };
        let h = model.config().hidden_size;
        let rows = match &p.img_embeddings {
            Some(f) => llm::read_img_embeddings(&spec.resolve_path(f), p.n_img_tokens, h)?,
            None => {
                let emb = model
                    .embedding_matrix()
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map_err(model_err("[IMG] init"))?;
                llm::mean_resized_rows(&emb, h, p.n_img_tokens)?
            }
        };
        let img = Tensor::from_vec(rows, (p.n_img_tokens, h), &device).map_err(model_err("[IMG] rows"))?;
        Ok(LlamaKeywordLlm {
            model,
            text,
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

    /// The decoder step for `LlmText::generate`: the prompt, then one
    /// token at a time, continuing `cache`.
    fn step(&self, cache: &mut Cache, ids: &[u32]) -> Result<Vec<f32>> {
        let mut run = || -> candle_core::Result<Vec<f32>> {
            let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
            let hidden = self.model.forward(&input, cache)?;
            last_logits(&self.model, &hidden)
        };
        run().map_err(model_err("LLM forward"))
    }
}

fn last_logits(model: &Llama, hidden: &Tensor) -> candle_core::Result<Vec<f32>> {
    let t = hidden.dim(1)?;
    model.logits(&hidden.i((.., t - 1..t))?)?.flatten_all()?.to_vec1()
}

type Loaded = (Llama, LlmText);

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
    let context = model.config().max_position_embeddings;
    Ok((model, LlmText::new(tokenizer, template, special, context)))
}

fn load_hf(dir: &Path, spec: &ComponentSpec, device: &Device) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let cfg: Config = serde_json::from_value(read_json::<serde_json::Value>(&cfg_path)?)
        .or_err(ErrorKind::Model, cfg_path.display())?;
    let weights = dir.join("model.safetensors");
    let vb = crate::checkpoint::var_builder(&[&weights], crate::device::dtype(spec, device)?, device)?;
    let model = Llama::from_safetensors(vb, &cfg).map_err(model_err(weights.display()))?;
    let text = LlmText::from_hf_dir(dir, cfg.max_position_embeddings)?;
    Ok((model, text))
}

impl LlamaKeywordLlm {
    /// The chat-rendered prompt and its token ids (for parity tests and `ragar stage`).
    pub fn chat_prompt(&self, prompt: &str) -> Result<(String, Vec<u32>)> {
        let text = self.text.render(prompt, true)?;
        let ids = self.text.encode(&text)?;
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
        crate::device::on_pool(&self.device, || {
            // One sequence at a time; each prompt gets its own seed so a batch
            // and single calls sample the same text.
            prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut cache = Cache::default();
                    let mut step = |ids: &[u32]| self.step(&mut cache, ids);
                    self.text.generate(&mut step, p, opts, opts.seed.wrapping_add(i as u64))
                })
                .collect()
        })
    }

    fn preference_states(&self, prompts: &[String]) -> Result<Vec<PreferenceStates>> {
        crate::device::on_pool(&self.device, || {
            let (n, h) = (self.img.dim(0).unwrap_or(0), self.model.config().hidden_size);
            prompts
                .iter()
                .map(|p| {
                    let (ids, _) = self.text.prompt_ids(p, true, n)?;
                    let run = || -> candle_core::Result<Vec<f32>> {
                        let ids_t = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
                        let prompt = self.model.embed(&ids_t)?.to_dtype(DType::F32)?;
                        let x = Tensor::cat(&[&prompt, &self.img.unsqueeze(0)?], 1)?;
                        self.model
                            .forward_embeds(&x, &mut Cache::default())?
                            .to_dtype(DType::F32)?
                            .flatten_all()?
                            .to_vec1()
                    };
                    let hidden = run().map_err(model_err("LLM forward"))?;
                    llm::preference_states(&hidden, ids.len(), n, h)
                })
                .collect()
        })
    }
}
