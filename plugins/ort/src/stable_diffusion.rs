//! Stable Diffusion from the three ONNX graphs `scripts/export_sd.py` writes
//! into a diffusers folder (`text_encoder/model.onnx`, `unet/model.onnx`,
//! `vae_decoder/model.onnx`). Only the networks run here; the pipeline —
//! tokenisation, seeded noise, sampler loop, guidance, post-processing — is
//! [`ragar_core::diffusion`], the same code candle and tch run.

use crate::runtime::{check_io, ort_err as err, run_f32 as run, session};
use ort::session::Session;
use ort::value::Tensor;
use ragar_core::diffusion::{Denoiser, Pipeline, SdPipelineDir};
use ragar_core::model::Fetch;
use ragar_core::stage::{GenerationRequest, Generator, GeneratorInfo};
use ragar_core::text::SentenceTokenizer;
use ragar_core::{ComponentSpec, Image, Result};
use std::sync::Mutex;

/// The graphs, relative to the pipeline folder.
pub const GRAPHS: [&str; 3] = ["text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx"];

/// The Stable Diffusion generator on ONNX Runtime.
pub struct StableDiffusion {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    text: Mutex<Session>,
    unet: Mutex<Session>,
    vae: Mutex<Session>,
    tokenizer: SentenceTokenizer,
    dir: SdPipelineDir,
    batch_size: usize,
}

fn graphs() -> Vec<String> {
    GRAPHS.iter().map(|g| g.to_string()).collect()
}

impl StableDiffusion {
    /// Build from `params: { model_dir, scheduler, batch_size }`.
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let (params, dir) = SdPipelineDir::open(spec, &graphs(), Fetch::IfMissing)?;
        let open = |rel: &str, inputs: &[&str], output: &str| -> Result<Mutex<Session>> {
            let path = dir.root.join(rel);
            let s = session(spec, &path)?;
            check_io(&s, &path, inputs, inputs, output)?;
            Ok(Mutex::new(s))
        };
        Ok(StableDiffusion {
            text: open(GRAPHS[0], &["input_ids"], "last_hidden_state")?,
            unet: open(
                GRAPHS[1],
                &["sample", "timestep", "encoder_hidden_states"],
                "out_sample",
            )?,
            vae: open(GRAPHS[2], &["latent_sample"], "sample")?,
            tokenizer: dir.tokenizer()?,
            dir,
            batch_size: params.batch_size,
        })
    }

    /// Params, graphs and the conditioning shape without loading them.
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        SdPipelineDir::probe(spec, &graphs())
    }
}

fn shape(s: &[usize]) -> Vec<i64> {
    s.iter().map(|&d| d as i64).collect()
}

impl Denoiser for StableDiffusion {
    fn encode_text(&self, ids: Vec<i64>, n: usize, len: usize) -> Result<Vec<f32>> {
        let ids = Tensor::from_array((shape(&[n, len]), ids)).map_err(err)?;
        run(&self.text, vec![("input_ids", ids.into_dyn())], "last_hidden_state")
    }

    fn unet(&self, sample: Vec<f32>, s: [usize; 4], t: f64, context: &[f32]) -> Result<Vec<f32>> {
        let b = s[0];
        let x = Tensor::from_array((shape(&s), sample)).map_err(err)?;
        let ts = Tensor::from_array((vec![b as i64], vec![t as f32; b])).map_err(err)?;
        let ctx = Tensor::from_array((
            shape(&[b, self.dir.context_len, self.dir.context_dim]),
            context.to_vec(),
        ))
        .map_err(err)?;
        run(
            &self.unet,
            vec![
                ("sample", x.into_dyn()),
                ("timestep", ts.into_dyn()),
                ("encoder_hidden_states", ctx.into_dyn()),
            ],
            "out_sample",
        )
    }

    fn decode(&self, latents: Vec<f32>, s: [usize; 4]) -> Result<Vec<f32>> {
        let z = Tensor::from_array((shape(&s), latents)).map_err(err)?;
        run(&self.vae, vec![("latent_sample", z.into_dyn())], "sample")
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
