//! Stable Diffusion as a ragar Generator: text or prompt embeddings (the
//! Mapper's 77 x 768 general preference, Eq. 9) -> image. RAGAR generates
//! with SD 1.5. The networks are here (`unet.rs`, `vae.rs`, `clip.rs`);
//! the pipeline around them — folder, tokenisation, noise, sampler loop,
//! guidance, post-processing — is [`ragar_core::diffusion`], shared with the
//! ort and tch generators, so a seed gives the same image on every backend
//! (and diffusers' image for `torch.Generator().manual_seed(seed)`).
//!
//! Reads a diffusers pipeline folder (local or `hf:org/name`): `unet/`,
//! `vae/`, `text_encoder/` (config.json + safetensors, the `variant`
//! picking e.g. `*.fp16.safetensors`), `tokenizer/`, `scheduler/`.

use crate::clip::{TextConfig, TextTransformer};
use crate::device::{device, dtype, model_err};
use crate::unet::{self, UNet};
use crate::vae::{self, VaeDecoder};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ragar_core::component::Probe;
use ragar_core::diffusion::{Denoiser, Pipeline, SdParams, SdPipelineDir};
use ragar_core::files::read_json;
use ragar_core::model::Fetch;
use ragar_core::stage::{GenerationRequest, Generator, GeneratorInfo};
use ragar_core::text::SentenceTokenizer;
use ragar_core::{ComponentSpec, Image, Result};
use std::path::Path;

fn weights(sub: &str, stem: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{sub}/{stem}.{v}.safetensors"),
        None => format!("{sub}/{stem}.safetensors"),
    }
}

/// The safetensors files of the three networks, relative to the folder.
fn files(spec: &ComponentSpec) -> Result<Vec<String>> {
    let params: SdParams = spec.params()?;
    let v = params.variant.as_deref();
    Ok(vec![
        weights("unet", "diffusion_pytorch_model", v),
        weights("vae", "diffusion_pytorch_model", v),
        weights("text_encoder", "model", v),
    ])
}

/// The Stable Diffusion generator component.
pub struct StableDiffusion {
    text_encoder: TextTransformer,
    tokenizer: SentenceTokenizer,
    unet: UNet,
    vae: VaeDecoder,
    dir: SdPipelineDir,
    batch_size: usize,
    dtype: DType,
    vae_dtype: DType,
    device: Device,
}

fn load_vb(path: &Path, dtype: DType, dev: &Device) -> Result<VarBuilder<'static>> {
    crate::checkpoint::var_builder(&[path], dtype, dev)
}

impl StableDiffusion {
    /// Build from `params: { model_dir, scheduler, variant, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let f = files(spec)?;
        let (params, dir) = SdPipelineDir::open(spec, &f, Fetch::IfMissing)?;
        let (unet_w, vae_w, text_w) = (dir.root.join(&f[0]), dir.root.join(&f[1]), dir.root.join(&f[2]));
        let dev = device(spec)?;
        let dt = dtype(spec, &dev)?;
        let text_cfg: TextConfig = read_json(&dir.root.join("text_encoder/config.json"))?;
        let unet_cfg: unet::Config = read_json(&dir.root.join("unet/config.json"))?;
        let vae_cfg: vae::Config = read_json(&dir.root.join("vae/config.json"))?;
        let vae_dtype = if dir.vae_force_upcast { DType::F32 } else { dt };
        // Older transformers saved CLIPTextModel under `text_model.`, version 5 without it.
        let te = load_vb(&text_w, dt, &dev)?;
        let te = if te.contains_tensor("text_model.embeddings.token_embedding.weight") {
            te.pp("text_model")
        } else {
            te
        };
        let text_encoder = TextTransformer::load(te, &text_cfg).map_err(model_err(text_w.display()))?;
        let unet = UNet::load(load_vb(&unet_w, dt, &dev)?, &unet_cfg).map_err(model_err(unet_w.display()))?;
        let vae = VaeDecoder::load(load_vb(&vae_w, vae_dtype, &dev)?, &vae_cfg).map_err(model_err(vae_w.display()))?;
        Ok(StableDiffusion {
            text_encoder,
            tokenizer: dir.tokenizer()?,
            unet,
            vae,
            dir,
            batch_size: params.batch_size,
            dtype: dt,
            vae_dtype,
            device: dev,
        })
    }

    /// Params, files and the conditioning shape without loading weights.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        SdPipelineDir::probe(spec, &files(spec)?)
    }

    fn pipeline(&self) -> Pipeline<'_, Self> {
        Pipeline {
            nets: self,
            dir: &self.dir,
            tokenizer: &self.tokenizer,
            batch_size: self.batch_size,
        }
    }

    /// The pipeline's prompt encoding: `[n, 77, d]` for `n` texts.
    pub fn encode_text(&self, texts: &[String]) -> Result<Tensor> {
        let v = self.pipeline().encode_text(texts)?;
        Tensor::from_vec(
            v,
            (texts.len(), self.dir.context_len, self.dir.context_dim),
            &Device::Cpu,
        )
        .map_err(model_err("prompt embeddings"))
    }
}

fn host(t: Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl Denoiser for StableDiffusion {
    fn encode_text(&self, ids: Vec<i64>, n: usize, len: usize) -> Result<Vec<f32>> {
        let ids: Vec<u32> = ids.into_iter().map(|t| t as u32).collect();
        Tensor::from_vec(ids, (n, len), &self.device)
            .and_then(|ids| host(self.text_encoder.forward(&ids, None)?.0))
            .map_err(model_err("CLIP text encoder"))
    }

    fn unet(&self, sample: Vec<f32>, shape: [usize; 4], t: f64, context: &[f32]) -> Result<Vec<f32>> {
        let ctx = (shape[0], self.dir.context_len, self.dir.context_dim);
        Tensor::from_vec(sample, shape.to_vec(), &self.device)
            .and_then(|x| x.to_dtype(self.dtype))
            .and_then(|x| {
                let c = Tensor::from_slice(context, ctx, &self.device)?.to_dtype(self.dtype)?;
                host(self.unet.forward(&x, t, &c)?)
            })
            .map_err(model_err("UNet"))
    }

    fn decode(&self, latents: Vec<f32>, shape: [usize; 4]) -> Result<Vec<f32>> {
        Tensor::from_vec(latents, shape.to_vec(), &self.device)
            .and_then(|x| x.to_dtype(self.vae_dtype))
            .and_then(|x| host(self.vae.decode_scaled(&x)?))
            .map_err(model_err("VAE decoder"))
    }
}

impl Generator for StableDiffusion {
    fn info(&self) -> GeneratorInfo {
        self.dir.info()
    }

    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Image>> {
        crate::device::on_pool(&self.device, || self.pipeline().generate(requests))
    }
}
