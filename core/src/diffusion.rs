//! Stable Diffusion's pipeline around the networks, framework-free and the
//! same for every backend: the pipeline folder, the prompt tokenisation,
//! the request checks and batching, the initial noise, the sampler loop
//! with classifier-free guidance, and the pixel post-processing. A backend
//! supplies only the three networks ([`Denoiser`]): the CLIP text encoder,
//! the UNet and the VAE decoder.
//!
//! Reference implementation: diffusers' `StableDiffusionPipeline.__call__`:
//! prompts padded to 77 tokens and encoded by the CLIP text tower (last
//! hidden state, final LayerNorm applied, no attention mask); initial
//! latents `torch.randn` from the request's seed times the sampler's initial
//! sigma; classifier-free guidance `uncond + g * (cond - uncond)` when
//! g > 1, the unconditional branch being the negative prompt / embedding or
//! the empty prompt; the VAE decode of `latents / scaling_factor`, then
//! `(x / 2 + 0.5).clamp(0, 1)`, `* 255`, rounded. Noise comes from
//! [`crate::rng::TorchGenerator`], so a seed gives diffusers' image for
//! `generator=torch.Generator().manual_seed(seed)` on any backend and device;
//! the sampler arithmetic is [`crate::schedulers`].
//!
//! The folder is a diffusers pipeline (local or `hf:org/name`): `unet/`,
//! `vae/` (or `vae_decoder/`), `text_encoder/` with their `config.json`,
//! `tokenizer/` (tokenizer.json, or vocab.json + merges.txt),
//! `scheduler/scheduler_config.json` (the noise schedule; optional, SD 1.5's
//! otherwise), and each backend's network files (safetensors for candle,
//! graphs exported by `scripts/export_sd.py` for ort and tch).

use crate::component::Probe;
use crate::files::read_json;
use crate::model::{Fetch, ModelSource};
use crate::rng::TorchGenerator;
use crate::schedulers::{self, ScheduleConfig, SchedulerKind};
use crate::stage::{Conditioning, GenerationRequest, GeneratorInfo};
use crate::text::SentenceTokenizer;
use crate::{ComponentSpec, DType, Error, Image, Result};
use std::path::{Path, PathBuf};

/// The `params:` of a Stable Diffusion generator, the same for every backend.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdParams {
    /// Pipeline folder or `hf:org/name[@rev]`.
    pub model_dir: String,
    /// `ddim`, `euler-a` or `dpm++` (DPM-Solver++ 2M).
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    /// Weight file variant (candle): `fp16` reads `*.fp16.safetensors`.
    #[serde(default)]
    pub variant: Option<String>,
    /// Requests denoised together (same size and steps), each with its own
    /// seed and sampler state.
    #[serde(default = "one")]
    pub batch_size: usize,
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

#[derive(serde::Deserialize)]
struct TextConfig {
    hidden_size: usize,
    #[serde(default = "seventy_seven")]
    max_position_embeddings: usize,
}
fn seventy_seven() -> usize {
    77
}

#[derive(serde::Deserialize)]
struct UnetConfig {
    #[serde(default = "four")]
    in_channels: usize,
    cross_attention_dim: usize,
}
fn four() -> usize {
    4
}

#[derive(serde::Deserialize)]
struct VaeConfig {
    block_out_channels: Vec<usize>,
    #[serde(default = "sd_scaling")]
    scaling_factor: f64,
    #[serde(default)]
    force_upcast: bool,
}
fn sd_scaling() -> f64 {
    0.18215
}

/// A resolved pipeline folder: what the loop needs to know of it.
#[derive(Clone, Debug)]
pub struct SdPipelineDir {
    /// The folder.
    pub root: PathBuf,
    /// The noise schedule.
    pub schedule: ScheduleConfig,
    /// The sampler.
    pub scheduler: SchedulerKind,
    /// Prompt tokens (77).
    pub context_len: usize,
    /// Width of the text encoder's states = the UNet's cross-attention width.
    pub context_dim: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Pixels per latent cell (8).
    pub vae_scale: usize,
    /// Latents are divided by this before the VAE decoder.
    pub scaling_factor: f64,
    /// diffusers keeps the VAE in float32 even when the pipeline runs in f16.
    pub vae_force_upcast: bool,
    /// `vae/` or, in exported folders, `vae_decoder/`.
    pub vae_dir: PathBuf,
}

impl SdPipelineDir {
    /// Parse the params, resolve the folder with `files` (the backend's
    /// network files, relative to it) and read the configs. A missing
    /// exported graph names the export script.
    pub fn open(spec: &ComponentSpec, files: &[String], fetch: Fetch) -> Result<(SdParams, SdPipelineDir)> {
        let params: SdParams = spec.params()?;
        if params.batch_size == 0 {
            return Err(Error::config(format!(
                "{}.params.batch_size must be at least 1",
                spec.key
            )));
        }
        let scheduler =
            SchedulerKind::parse(&params.scheduler).map_err(|e| e.context(format!("{}.params.scheduler", spec.key)))?;
        let source = ModelSource::parse(&params.model_dir, |p| spec.resolve_path(p))?;
        let root = source.resolve(
            &["unet/config.json", "text_encoder/config.json"],
            &[
                "model_index.json",
                "vae/config.json",
                "vae_decoder/config.json",
                "scheduler/scheduler_config.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/tokenizer.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
            ],
            fetch,
        )?;
        let wanted: Vec<&str> = files.iter().map(String::as_str).collect();
        if let Err(e) = source.resolve(&wanted, &[], fetch) {
            let missing: Vec<&str> = wanted.iter().copied().filter(|f| !root.join(f).is_file()).collect();
            if missing.iter().any(|f| !f.ends_with(".safetensors")) {
                return Err(Error::not_found(format!(
                    "{}: missing {missing:?} (export them from the pipeline with: python scripts/export_sd.py {}{})",
                    root.display(),
                    root.display(),
                    DType::of_exported_file(missing[0]).export_flag()
                )));
            }
            return Err(e);
        }
        // Hub repos ship vocab.json + merges.txt; transformers 5 saves tokenizer.json alone.
        let tok = root.join("tokenizer");
        if !tok.join("tokenizer.json").is_file()
            && !(tok.join("vocab.json").is_file() && tok.join("merges.txt").is_file())
        {
            return Err(Error::not_found(format!(
                "{}: neither tokenizer.json nor vocab.json + merges.txt",
                tok.display()
            )));
        }
        let text: TextConfig = read_json(&root.join("text_encoder/config.json"))?;
        let unet: UnetConfig = read_json(&root.join("unet/config.json"))?;
        let vae_dir = if root.join("vae/config.json").is_file() {
            root.join("vae")
        } else {
            root.join("vae_decoder")
        };
        let vae: VaeConfig = read_json(&vae_dir.join("config.json"))?;
        if text.hidden_size != unet.cross_attention_dim {
            return Err(Error::model(format!(
                "{}: text encoder width {} but the UNet attends to {}-wide text",
                root.display(),
                text.hidden_size,
                unet.cross_attention_dim
            )));
        }
        let dir = SdPipelineDir {
            schedule: schedule(&root.join("scheduler/scheduler_config.json"))?,
            scheduler,
            context_len: text.max_position_embeddings,
            context_dim: unet.cross_attention_dim,
            latent_channels: unet.in_channels,
            vae_scale: 1 << vae.block_out_channels.len().saturating_sub(1),
            scaling_factor: vae.scaling_factor,
            vae_force_upcast: vae.force_upcast,
            vae_dir,
            root,
        };
        Ok((params, dir))
    }

    /// The probe: files present, the conditioning shape; loads no weights.
    pub fn probe(spec: &ComponentSpec, files: &[String]) -> Result<Probe> {
        let (_, dir) = SdPipelineDir::open(spec, files, Fetch::Never)?;
        let mut p = Probe::default();
        for f in files {
            p = p.file(&dir.root.join(f))?;
        }
        Ok(p.fact("embedding_tokens", dir.context_len as u64)
            .fact("embedding_dim", dir.context_dim as u64))
    }

    /// The pipeline's tokenizer, truncating at the prompt length.
    pub fn tokenizer(&self) -> Result<SentenceTokenizer> {
        SentenceTokenizer::from_dir(&self.root.join("tokenizer"), self.context_len)
    }

    /// What the generator reports.
    pub fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            embedding_shape: vec![self.context_len as u64, self.context_dim as u64].into(),
            accepts_text: true,
            accepts_embeddings: true,
        }
    }
}

/// The three networks, as a backend runs them. Arrays are row-major f32
/// (token ids i64) on the host.
pub trait Denoiser {
    /// CLIP text encoder: `n` prompts of `len` token ids (padded, no mask)
    /// -> last hidden state `[n, len, context_dim]`.
    fn encode_text(&self, ids: Vec<i64>, n: usize, len: usize) -> Result<Vec<f32>>;
    /// UNet: `sample` of `shape` (`[b, c, h, w]`), timestep `t`, text
    /// states `context` (`[b, len, context_dim]`) -> noise prediction of `shape`.
    fn unet(&self, sample: Vec<f32>, shape: [usize; 4], t: f64, context: &[f32]) -> Result<Vec<f32>>;
    /// VAE decoder: latents of `shape` already divided by the scaling factor
    /// -> images `[b, 3, 8h, 8w]` in about [-1, 1].
    fn decode(&self, latents: Vec<f32>, shape: [usize; 4]) -> Result<Vec<f32>>;
}

/// The pipeline over a backend's networks.
pub struct Pipeline<'a, D: Denoiser + ?Sized> {
    /// The networks.
    pub nets: &'a D,
    /// The folder's facts.
    pub dir: &'a SdPipelineDir,
    /// The prompt tokenizer.
    pub tokenizer: &'a SentenceTokenizer,
    /// Requests denoised together.
    pub batch_size: usize,
}

impl<D: Denoiser + ?Sized> Pipeline<'_, D> {
    /// The pipeline's prompt encoding: `[n, 77, d]` for `n` texts.
    pub fn encode_text(&self, texts: &[String]) -> Result<Vec<f32>> {
        let enc = self.tokenizer.encode_each(texts)?;
        let (len, pad) = (self.dir.context_len, self.tokenizer.pad_id());
        let mut ids = Vec::with_capacity(texts.len() * len);
        for e in &enc {
            ids.extend(e.ids.iter().copied());
            ids.extend(std::iter::repeat_n(pad, len - e.ids.len()));
        }
        self.nets.encode_text(ids, texts.len(), len)
    }

    /// One conditioning per row: texts are encoded together, embeddings copied.
    fn contexts(&self, conds: &[&Conditioning]) -> Result<Vec<f32>> {
        let texts: Vec<String> = conds
            .iter()
            .filter_map(|c| match c {
                Conditioning::Text(t) => Some(t.to_string()),
                Conditioning::Embeddings(_) => None,
            })
            .collect();
        let encoded = if texts.is_empty() {
            Vec::new()
        } else {
            self.encode_text(&texts)?
        };
        let row = self.dir.context_len * self.dir.context_dim;
        let mut next_text = 0;
        let mut out = Vec::with_capacity(conds.len() * row);
        for c in conds {
            match c {
                Conditioning::Text(_) => {
                    out.extend_from_slice(&encoded[next_text * row..(next_text + 1) * row]);
                    next_text += 1;
                }
                Conditioning::Embeddings(t) => {
                    let v = t.to_f32_vec();
                    if v.len() != row {
                        return Err(Error::invalid_input(format!(
                            "prompt embeddings of {} values, expected {} x {}",
                            v.len(),
                            self.dir.context_len,
                            self.dir.context_dim
                        )));
                    }
                    out.extend(v);
                }
            }
        }
        Ok(out)
    }

    fn check(&self, i: usize, r: &GenerationRequest) -> Result<()> {
        let scale = self.dir.vae_scale as u32;
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

    /// Generate one image per request, in order.
    pub fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Image>> {
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

    /// Denoise and decode one batch of requests that share steps and size.
    fn run_batch(&self, reqs: &[&GenerationRequest]) -> Result<Vec<Image>> {
        let first = reqs[0];
        let (w, h, steps) = (first.width as usize, first.height as usize, first.steps as usize);
        let scale = self.dir.vae_scale;
        let (lh, lw, lc) = (h / scale, w / scale, self.dir.latent_channels);
        let n = lc * lh * lw;
        let cfg = first.guidance > 1.0;
        let empty = Conditioning::Text("".into());
        let mut conds: Vec<&Conditioning> = Vec::new();
        if cfg {
            conds.extend(reqs.iter().map(|r| r.negative.as_ref().into_option().unwrap_or(&empty)));
        }
        conds.extend(reqs.iter().map(|r| &r.cond));
        let context = self.contexts(&conds).map_err(|e| e.context("encoding the prompts"))?;

        let mut samplers = reqs
            .iter()
            .map(|_| schedulers::build(self.dir.scheduler, &self.dir.schedule, steps))
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
            let eps = self
                .nets
                .unet(input, [conds.len(), lc, lh, lw], t, &context)
                .map_err(|e| e.context(format!("UNet at step {i} (t = {t})")))?;
            if eps.len() != conds.len() * n {
                return Err(Error::model(format!(
                    "UNet returned {} values, expected {} x {lc} x {lh} x {lw}",
                    eps.len(),
                    conds.len()
                )));
            }
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
        let inv = (1.0 / self.dir.scaling_factor) as f32;
        let flat: Vec<f32> = latents.concat().into_iter().map(|v| v * inv).collect();
        let pixels = self
            .nets
            .decode(flat, [b, lc, lh, lw])
            .map_err(|e| e.context("VAE decode"))?;
        let per = h * w * 3;
        if pixels.len() != b * per {
            return Err(Error::model(format!(
                "VAE decoder returned {} values, expected {b} x 3 x {h} x {w}",
                pixels.len()
            )));
        }
        (0..b)
            .map(|j| {
                let img = &pixels[j * per..(j + 1) * per];
                // [3, h, w] -> interleaved RGB.
                let rgb = (0..h * w)
                    .flat_map(|p| (0..3).map(move |c| img[c * h * w + p]))
                    .map(|v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
                    .collect();
                Image::new(w as u32, h as u32, rgb)
            })
            .collect()
    }
}
