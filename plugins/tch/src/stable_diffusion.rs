//! Stable Diffusion from the three TorchScript modules `scripts/export_sd.py`
//! writes into a diffusers folder (`text_encoder/model.ts`, `unet/model.ts`,
//! `vae_decoder/model.ts`). Only the networks run here; the pipeline —
//! tokenisation, seeded noise, sampler loop, guidance, post-processing — is
//! [`ragar_core::diffusion`], the same code candle and ort run.
//! `dtype: f16` reads the half-precision exports (`model.f16.ts`;
//! `export_sd.py --dtype f16`): latents, timesteps and text states go in
//! as f16, the sampler's arithmetic between steps stays f32.

use crate::{forward, load_module_as, module_file, placement, to_host};
use ragar_core::diffusion::{Denoiser, Pipeline, SdPipelineDir};
use ragar_core::model::Fetch;
use ragar_core::stage::{GenerationRequest, Generator, GeneratorInfo};
use ragar_core::text::SentenceTokenizer;
use ragar_core::{ComponentSpec, Image, Result};
use std::sync::Mutex;
use tch::{CModule, Tensor};

/// The modules, relative to the pipeline folder.
pub const GRAPHS: [&str; 3] = ["text_encoder/model.ts", "unet/model.ts", "vae_decoder/model.ts"];

/// The Stable Diffusion generator on libtorch.
pub struct StableDiffusion {
    // CModule is not Sync; the contract is `&self`.
    text: Mutex<CModule>,
    unet: Mutex<CModule>,
    vae: Mutex<CModule>,
    device: tch::Device,
    /// The modules' float kind (the config's dtype).
    kind: tch::Kind,
    tokenizer: SentenceTokenizer,
    dir: SdPipelineDir,
    batch_size: usize,
}

/// The modules the spec's dtype reads: [`GRAPHS`], or their `.f16.ts` exports.
fn graphs(spec: &ComponentSpec) -> Vec<String> {
    GRAPHS.iter().map(|g| module_file(spec, g)).collect()
}

impl StableDiffusion {
    /// Build from `params: { model_dir, scheduler, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let graphs = graphs(spec);
        let (params, dir) = SdPipelineDir::open(spec, &graphs, Fetch::IfMissing)?;
        let (device, kind) = placement(spec)?;
        let load = |rel: &str| load_module_as(&dir.root.join(rel), device, kind).map(Mutex::new);
        Ok(StableDiffusion {
            text: load(&graphs[0])?,
            unet: load(&graphs[1])?,
            vae: load(&graphs[2])?,
            device,
            kind,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    /// Params, modules and the conditioning shape without loading them.
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        SdPipelineDir::probe(spec, &graphs(spec))
    }

    fn run(&self, module: &Mutex<CModule>, inputs: &[Tensor], what: &str) -> Result<Vec<f32>> {
        to_host(&forward(module, inputs, what)?)
    }

    fn tensor(&self, v: &[f32], shape: &[usize]) -> Tensor {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_slice(v)
            .reshape(s)
            .to_device(self.device)
            .to_kind(self.kind)
    }
}

impl Denoiser for StableDiffusion {
    fn encode_text(&self, ids: Vec<i64>, n: usize, len: usize) -> Result<Vec<f32>> {
        let ids = Tensor::from_slice(&ids)
            .reshape([n as i64, len as i64])
            .to_device(self.device);
        self.run(&self.text, &[ids], "CLIP text encoder")
    }

    fn unet(&self, sample: Vec<f32>, shape: [usize; 4], t: f64, context: &[f32]) -> Result<Vec<f32>> {
        let b = shape[0];
        let x = self.tensor(&sample, &shape);
        let ts = self.tensor(&vec![t as f32; b], &[b]);
        let ctx = self.tensor(context, &[b, self.dir.context_len, self.dir.context_dim]);
        self.run(&self.unet, &[x, ts, ctx], "UNet")
    }

    fn decode(&self, latents: Vec<f32>, shape: [usize; 4]) -> Result<Vec<f32>> {
        let z = self.tensor(&latents, &shape);
        self.run(&self.vae, &[z], "VAE decoder")
    }
}

impl Generator for StableDiffusion {
    fn info(&self) -> GeneratorInfo {
        self.dir.info()
    }

    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Image>> {
        Pipeline {
            nets: self,
            dir: &self.dir,
            tokenizer: &self.tokenizer,
            batch_size: self.batch_size,
        }
        .generate(requests)
    }
}
