//! Stable Diffusion as a ragar Generator: text or prompt embeddings (the
//! Mapper's 77 x 768 general preference, Eq. 9) -> image. RAGAR generates
//! with SD 1.5.
//!
//! Reference implementation: diffusers' `StableDiffusionPipeline.__call__`:
//! prompts padded to 77 tokens and encoded by the CLIP text tower (last
//! hidden state, final LayerNorm applied, no attention mask); initial
//! latents `torch.randn` from the request's seed times the sampler's initial
//! sigma; classifier-free guidance `uncond + g * (cond - uncond)` when
//! g > 1, the unconditional branch being the negative prompt / embedding or
//! the empty prompt; the VAE decode, then `(x / 2 + 0.5).clamp(0, 1)`,
//! `* 255`, rounded. Noise comes from [`ragar_core::rng::TorchGenerator`],
//! so a seed gives diffusers' image for `generator=torch.Generator().manual_seed(seed)`
//! on any device; the sampler arithmetic is [`ragar_core::schedulers`],
//! shared by every backend. Models: `unet.rs`, `vae.rs`, `clip.rs`.
//!
//! Reads a diffusers pipeline folder (local or `hf:org/name`):
//! `unet/`, `vae/`, `text_encoder/` (config.json + safetensors, the
//! `variant` picking e.g. `*.fp16.safetensors`), `tokenizer/` (tokenizer.json,
//! or vocab.json + merges.txt), `scheduler/scheduler_config.json` (the noise
//! schedule; optional, SD 1.5's otherwise).

use crate::clip::{TextConfig, TextTransformer};
use crate::device::{device, dtype, model_err};
use crate::unet::{self, UNet};
use crate::vae::{self, VaeDecoder};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ragar_core::component::Probe;
use ragar_core::files::read_json;
use ragar_core::model::{Fetch, ModelSource};
use ragar_core::rng::TorchGenerator;
use ragar_core::schedulers::{self, ScheduleConfig, SchedulerKind};
use ragar_core::stage::{Conditioning, GenerationRequest, Generator, GeneratorInfo};
use ragar_core::text::SentenceTokenizer;
use ragar_core::{ComponentSpec, Error, Image, Result};
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Pipeline folder or `hf:org/name[@rev]`.
    model_dir: String,
    /// `ddim`, `euler-a` or `dpm++` (DPM-Solver++ 2M).
    #[serde(default = "default_scheduler")]
    scheduler: String,
    /// Weight file variant: `fp16` reads `*.fp16.safetensors`.
    #[serde(default)]
    variant: Option<String>,
    /// Requests denoised together (same size and steps), each with its own
    /// seed and sampler state.
    #[serde(default = "one")]
    batch_size: usize,
}

fn default_scheduler() -> String {
    "dpm++".into()
}
fn one() -> usize {
    1
}

/// `scheduler/scheduler_config.json`: only the noise schedule is read; the
/// sampler and its timestep spacing come from `params.scheduler`.
#[derive(serde::Deserialize)]
struct SchedulerFile {
    #[serde(default = "thousand")]
    num_train_timesteps: usize,
    #[serde(default = "b0")]
    beta_start: f64,
    #[serde(default = "b1")]
    beta_end: f64,
    #[serde(default = "scaled")]
    beta_schedule: String,
    #[serde(default)]
    steps_offset: usize,
    #[serde(default = "eps")]
    prediction_type: String,
}

fn thousand() -> usize {
    1000
}
fn b0() -> f64 {
    0.00085
}
fn b1() -> f64 {
    0.012
}
fn scaled() -> String {
    "scaled_linear".into()
}
fn eps() -> String {
    "epsilon".into()
}

fn schedule(path: &Path) -> Result<ScheduleConfig> {
    if !path.is_file() {
        return Ok(ScheduleConfig::default());
    }
    let f: SchedulerFile = read_json(path)?;
    let bad = |key: &str, v: &str| Error::config(format!("{}: {key} '{v}' is not supported", path.display()));
    Ok(ScheduleConfig {
        num_train_timesteps: f.num_train_timesteps,
        beta_start: f.beta_start,
        beta_end: f.beta_end,
        scaled_linear: match f.beta_schedule.as_str() {
            "scaled_linear" => true,
            "linear" => false,
            other => return Err(bad("beta_schedule", other)),
        },
        steps_offset: f.steps_offset,
        v_prediction: match f.prediction_type.as_str() {
            "epsilon" => false,
            "v_prediction" => true,
            other => return Err(bad("prediction_type", other)),
        },
    })
}

struct Files {
    root: PathBuf,
    unet: PathBuf,
    vae: PathBuf,
    text_encoder: PathBuf,
}

fn weights(sub: &str, stem: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{sub}/{stem}.{v}.safetensors"),
        None => format!("{sub}/{stem}.safetensors"),
    }
}

fn files(spec: &ComponentSpec, fetch: Fetch) -> Result<(Params, Files)> {
    let params: Params = spec.params()?;
    if params.batch_size == 0 {
        return Err(Error::config(format!(
            "{}.params.batch_size must be at least 1",
            spec.key
        )));
    }
    SchedulerKind::parse(&params.scheduler).map_err(|e| e.context(format!("{}.params.scheduler", spec.key)))?;
    let v = params.variant.as_deref();
    let unet = weights("unet", "diffusion_pytorch_model", v);
    let vae = weights("vae", "diffusion_pytorch_model", v);
    let text_encoder = weights("text_encoder", "model", v);
    let root = ModelSource::parse(&params.model_dir, |p| spec.resolve_path(p))?.resolve(
        &[
            "unet/config.json",
            &unet,
            "vae/config.json",
            &vae,
            "text_encoder/config.json",
            &text_encoder,
        ],
        &[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/tokenizer.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
        ],
        fetch,
    )?;
    // Hub repos ship vocab.json + merges.txt; transformers 5 saves tokenizer.json alone.
    let tok = root.join("tokenizer");
    if !tok.join("tokenizer.json").is_file() && !(tok.join("vocab.json").is_file() && tok.join("merges.txt").is_file())
    {
        return Err(Error::not_found(format!(
            "{}: neither tokenizer.json nor vocab.json + merges.txt",
            tok.display()
        )));
    }
    let files = Files {
        unet: root.join(unet),
        vae: root.join(vae),
        text_encoder: root.join(text_encoder),
        root,
    };
    Ok((params, files))
}

/// The Stable Diffusion generator component.
pub struct StableDiffusion {
    text_encoder: TextTransformer,
    tokenizer: SentenceTokenizer,
    unet: UNet,
    vae: VaeDecoder,
    schedule: ScheduleConfig,
    scheduler: SchedulerKind,
    batch_size: usize,
    context_len: usize,
    dtype: DType,
    vae_dtype: DType,
    device: Device,
}

fn load_vb(path: &Path, dtype: DType, dev: &Device) -> Result<VarBuilder<'static>> {
    // Safety: read-only memory map of a file ragar does not modify.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, dev) }.map_err(model_err(path.display()))
}

impl StableDiffusion {
    /// Build from `params: { model_dir, scheduler, variant, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, f) = files(spec, Fetch::IfMissing)?;
        let dev = device(spec)?;
        let dt = dtype(spec, &dev)?;
        let text_cfg: TextConfig = read_json(&f.root.join("text_encoder/config.json"))?;
        let unet_cfg: unet::Config = read_json(&f.root.join("unet/config.json"))?;
        let vae_cfg: vae::Config = read_json(&f.root.join("vae/config.json"))?;
        if text_cfg.hidden_size != unet_cfg.cross_attention_dim {
            return Err(Error::model(format!(
                "{}: text encoder width {} but the UNet attends to {}-wide text",
                f.root.display(),
                text_cfg.hidden_size,
                unet_cfg.cross_attention_dim
            )));
        }
        // diffusers decodes with a float32 VAE when the config says so.
        let vae_dtype = if vae_cfg.force_upcast { DType::F32 } else { dt };
        // Older transformers saved CLIPTextModel under `text_model.`, version 5 without it.
        let te = load_vb(&f.text_encoder, dt, &dev)?;
        let te = if te.contains_tensor("text_model.embeddings.token_embedding.weight") {
            te.pp("text_model")
        } else {
            te
        };
        let text_encoder = TextTransformer::load(te, &text_cfg).map_err(model_err(f.text_encoder.display()))?;
        let unet = UNet::load(load_vb(&f.unet, dt, &dev)?, &unet_cfg).map_err(model_err(f.unet.display()))?;
        let vae = VaeDecoder::load(load_vb(&f.vae, vae_dtype, &dev)?, &vae_cfg).map_err(model_err(f.vae.display()))?;
        let context_len = text_cfg.max_position_embeddings;
        let tokenizer = SentenceTokenizer::from_dir(&f.root.join("tokenizer"), context_len)?;
        Ok(StableDiffusion {
            text_encoder,
            tokenizer,
            unet,
            vae,
            schedule: schedule(&f.root.join("scheduler/scheduler_config.json"))?,
            scheduler: SchedulerKind::parse(&params.scheduler)?,
            batch_size: params.batch_size,
            context_len,
            dtype: dt,
            vae_dtype,
            device: dev,
        })
    }

    /// Params, files and the conditioning shape without loading weights.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        let (_, f) = files(spec, Fetch::Never)?;
        let unet_cfg: unet::Config = read_json(&f.root.join("unet/config.json"))?;
        let text_cfg: TextConfig = read_json(&f.root.join("text_encoder/config.json"))?;
        Ok(Probe::default()
            .file(&f.unet)?
            .file(&f.vae)?
            .file(&f.text_encoder)?
            .fact("embedding_tokens", text_cfg.max_position_embeddings as u64)
            .fact("embedding_dim", unet_cfg.cross_attention_dim as u64))
    }

    /// The pipeline's prompt encoding: `[n, 77, d]` for `n` texts.
    pub fn encode_text(&self, texts: &[String]) -> candle_core::Result<Tensor> {
        let enc = self
            .tokenizer
            .encode_each(texts)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let pad = self.tokenizer.pad_id() as u32;
        let mut ids = Vec::with_capacity(texts.len() * self.context_len);
        for e in &enc {
            ids.extend(e.ids.iter().map(|&t| t as u32));
            ids.extend(std::iter::repeat_n(pad, self.context_len - e.ids.len()));
        }
        let ids = Tensor::from_vec(ids, (texts.len(), self.context_len), &self.device)?;
        Ok(self.text_encoder.forward(&ids, None)?.0)
    }

    /// One conditioning per row: texts are encoded together, embeddings copied.
    fn contexts(&self, conds: &[&Conditioning]) -> candle_core::Result<Tensor> {
        let texts: Vec<String> = conds
            .iter()
            .filter_map(|c| match c {
                Conditioning::Text(t) => Some(t.to_string()),
                Conditioning::Embeddings(_) => None,
            })
            .collect();
        let encoded = if texts.is_empty() {
            None
        } else {
            Some(self.encode_text(&texts)?)
        };
        let mut next_text = 0;
        let d = self.unet.config().cross_attention_dim;
        let rows = conds
            .iter()
            .map(|c| match c {
                Conditioning::Text(_) => {
                    next_text += 1;
                    encoded
                        .as_ref()
                        .expect("texts were encoded")
                        .narrow(0, next_text - 1, 1)
                }
                Conditioning::Embeddings(t) => {
                    Tensor::from_vec(t.to_f32_vec(), (1, self.context_len, d), &self.device)?.to_dtype(self.dtype)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }

    /// Denoise and decode one batch of requests that share steps and size.
    fn run_batch(&self, reqs: &[&GenerationRequest]) -> Result<Vec<Image>> {
        let first = reqs[0];
        let (w, h, steps) = (first.width as usize, first.height as usize, first.steps as usize);
        let scale = self.vae.config().scale_factor();
        let (lh, lw, lc) = (h / scale, w / scale, self.unet.config().in_channels);
        let n = lc * lh * lw;
        let cfg = first.guidance > 1.0;
        let empty = Conditioning::Text("".into());
        let mut conds: Vec<&Conditioning> = Vec::new();
        if cfg {
            conds.extend(reqs.iter().map(|r| r.negative.as_ref().into_option().unwrap_or(&empty)));
        }
        conds.extend(reqs.iter().map(|r| &r.cond));
        let context = self.contexts(&conds).map_err(model_err("encoding the prompts"))?;

        let mut samplers = reqs
            .iter()
            .map(|_| schedulers::build(self.scheduler, &self.schedule, steps))
            .collect::<Result<Vec<_>>>()?;
        let mut noise: Vec<TorchGenerator> = reqs.iter().map(|r| TorchGenerator::new(r.seed)).collect();
        let sigma0 = samplers[0].init_noise_sigma() as f32;
        let mut latents = noise
            .iter_mut()
            .map(|g| Ok(g.randn(n)?.into_iter().map(|x| x * sigma0).collect()))
            .collect::<Result<Vec<Vec<f32>>>>()?;
        let timesteps = samplers[0].timesteps().to_vec();
        let b = reqs.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let mut input: Vec<f32> = Vec::with_capacity(n * conds.len());
            for _ in 0..(if cfg { 2 } else { 1 }) {
                for (s, x) in samplers.iter().zip(&latents) {
                    input.extend(s.scale_model_input(x, i));
                }
            }
            let eps = Tensor::from_vec(input, (conds.len(), lc, lh, lw), &self.device)
                .and_then(|x| x.to_dtype(self.dtype))
                .and_then(|x| self.unet.forward(&x, t, &context))
                .and_then(|e| e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .map_err(model_err(format!("UNet at step {i} (t = {t})")))?;
            for (j, (s, x)) in samplers.iter_mut().zip(latents.iter_mut()).enumerate() {
                let guided: Vec<f32> = if cfg {
                    let (u, c) = (&eps[j * n..(j + 1) * n], &eps[(b + j) * n..(b + j + 1) * n]);
                    let g = reqs[j].guidance;
                    u.iter().zip(c).map(|(u, c)| u + g * (c - u)).collect()
                } else {
                    eps[j * n..(j + 1) * n].to_vec()
                };
                let z = if s.needs_noise() {
                    Some(noise[j].randn(n)?)
                } else {
                    None
                };
                *x = s.step(&guided, i, x, z.as_deref())?;
            }
        }
        let flat: Vec<f32> = latents.concat();
        let pixels = Tensor::from_vec(flat, (b, lc, lh, lw), &self.device)
            .and_then(|x| x.to_dtype(self.vae_dtype))
            .and_then(|x| self.vae.decode(&x))
            .and_then(|x| {
                x.to_dtype(DType::F32)?
                    .permute((0, 2, 3, 1))?
                    .flatten_all()?
                    .to_vec1::<f32>()
            })
            .map_err(model_err("VAE decode"))?;
        let per = h * w * 3;
        (0..b)
            .map(|j| {
                let rgb = pixels[j * per..(j + 1) * per]
                    .iter()
                    .map(|&v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
                    .collect();
                Image::new(w as u32, h as u32, rgb)
            })
            .collect()
    }

    fn check(&self, i: usize, r: &GenerationRequest) -> Result<()> {
        let scale = self.vae.config().scale_factor() as u32;
        let bad = |why: String| Err(Error::invalid_input(format!("request {i}: {why}")));
        if r.width == 0 || r.height == 0 || !r.width.is_multiple_of(scale) || !r.height.is_multiple_of(scale) {
            return bad(format!(
                "size {}x{} must be a positive multiple of {scale}",
                r.width, r.height
            ));
        }
        if r.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if !r.guidance.is_finite() {
            return bad(format!("guidance {} is not a number", r.guidance));
        }
        Ok(())
    }
}

impl Generator for StableDiffusion {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            embedding_shape: vec![self.context_len as u64, self.unet.config().cross_attention_dim as u64].into(),
            accepts_text: true,
            accepts_embeddings: true,
        }
    }

    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Image>> {
        for (i, r) in requests.iter().enumerate() {
            self.check(i, r)?;
        }
        let mut out = Vec::with_capacity(requests.len());
        let mut start = 0;
        while start < requests.len() {
            // Consecutive requests that can share UNet calls.
            let key = |r: &GenerationRequest| (r.width, r.height, r.steps, r.guidance > 1.0);
            let k = key(&requests[start]);
            let mut end = start + 1;
            while end < requests.len() && end - start < self.batch_size && key(&requests[end]) == k {
                end += 1;
            }
            let batch: Vec<&GenerationRequest> = requests[start..end].iter().collect();
            out.extend(
                self.run_batch(&batch)
                    .map_err(|e| e.context(format!("requests {start}..{end}")))?,
            );
            start = end;
        }
        Ok(out)
    }
}
