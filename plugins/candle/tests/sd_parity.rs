//! Stable Diffusion against diffusers on the same tiny random-weight
//! pipeline (built by scripts/setup.sh with scripts/fixtures/make_sd.py into
//! `.ragar/models/sd-tiny`, in the folder layout of a real SD 1.5 repo, with
//! the real CLIP tokenizer given as vocab.json + merges.txt only), loaded
//! through the component's own loader.
//!
//! Tolerances (float32, CPU): prompt encoding, one UNet call and one VAE
//! decode within max |candle - torch| <= 1e-4 (relative to the output's
//! scale where it exceeds 1); the full 2-step pipelines, started from the
//! same seed (the noise itself is torch's, see core/tests/rng.rs), give the
//! same 8-bit pixels up to one level, with at least 99% identical.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ragar_candle::stable_diffusion::StableDiffusion;
use ragar_candle::{unet, vae};
use ragar_core::stage::{Conditioning, GenerationRequest, Generator};
use ragar_core::ComponentSpec;
use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ragar"));
    let d = cache.join("models/sd-tiny");
    assert!(d.is_dir(), "{} missing: run scripts/setup.sh", d.display());
    d
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn sd(scheduler: &str) -> StableDiffusion {
    StableDiffusion::load(&ComponentSpec::new(
        "generator",
        serde_json::json!({"model_dir": dir(), "scheduler": scheduler}),
    ))
    .unwrap()
}

/// Max |a - b| divided by max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let scalar = |t: Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    scalar((a - b).unwrap()) / scalar(b.clone()).max(1.0)
}

fn json<T: serde::de::DeserializeOwned>(path: PathBuf) -> T {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn weights(sub: &str) -> VarBuilder<'static> {
    let p = dir().join(sub).join("diffusion_pytorch_model.safetensors");
    VarBuilder::from_tensors(
        candle_core::safetensors::load(p, &Device::Cpu).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
}

#[test]
fn prompt_encoding_matches_the_pipeline() {
    let (r, meta) = (reference(), json::<serde_json::Value>(dir().join("reference.json")));
    let sd = sd("ddim");
    let texts = [
        meta["prompt"].as_str().unwrap().to_string(),
        meta["negative"].as_str().unwrap().to_string(),
    ];
    let got = sd.encode_text(&texts).unwrap();
    let want = Tensor::cat(&[&r["text_embeds.prompt"], &r["text_embeds.negative"]], 0).unwrap();
    let d = rel_diff(&got, &want);
    assert!(d <= 1e-4, "prompt embeddings differ by {d}");
}

#[test]
fn one_unet_call_matches_diffusers() {
    let r = reference();
    let cfg: unet::Config = json(dir().join("unet/config.json"));
    let model = unet::UNet::load(weights("unet"), &cfg).unwrap();
    for (t, key) in [(981.0, "unet.out_t981"), (500.5, "unet.out_t500_5")] {
        let out = model
            .forward(&r["unet.sample"], t, &r["unet.encoder_hidden_states"])
            .unwrap();
        let d = rel_diff(&out, &r[key]);
        assert!(d <= 1e-4, "UNet at t = {t}: {d}");
    }
}

#[test]
fn one_vae_decode_matches_diffusers() {
    let r = reference();
    let cfg: vae::Config = json(dir().join("vae/config.json"));
    let model = vae::VaeDecoder::load(weights("vae"), &cfg).unwrap();
    let d = rel_diff(&model.decode(&r["vae.latents"]).unwrap(), &r["vae.decoded"]);
    assert!(d <= 1e-4, "VAE decode: {d}");
}

fn pixels(t: &Tensor) -> Vec<u8> {
    let v = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v.iter().map(|&x| x as u8).collect()
}

fn compare_pixels(name: &str, got: &ragar_core::Image, want: &[u8]) {
    assert_eq!(got.rgb.len(), want.len(), "{name}: image size");
    let diffs: Vec<i32> = got
        .rgb
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .collect();
    let worst = diffs.iter().copied().max().unwrap();
    let same = diffs.iter().filter(|&&d| d == 0).count() as f64 / diffs.len() as f64;
    assert!(
        worst <= 1 && same >= 0.99,
        "{name}: worst {worst} levels, {:.2}% identical",
        same * 100.0
    );
}

fn request(cond: Conditioning, negative: Conditioning, meta: &serde_json::Value) -> GenerationRequest {
    let size = meta["size"].as_u64().unwrap() as u32;
    GenerationRequest {
        cond,
        negative: ragar_core::abi_stable::std_types::ROption::RSome(negative),
        seed: meta["seed"].as_u64().unwrap(),
        steps: meta["steps"].as_u64().unwrap() as u32,
        guidance: meta["guidance"].as_f64().unwrap() as f32,
        width: size,
        height: size,
    }
}

#[test]
fn two_step_pipelines_from_a_seed_match_diffusers() {
    let (r, meta) = (reference(), json::<serde_json::Value>(dir().join("reference.json")));
    let text = |k: &str| Conditioning::Text(meta[k].as_str().unwrap().into());
    for (sampler, key) in [("ddim", "ddim"), ("dpm++", "dpmpp"), ("euler-a", "euler_a")] {
        let img = sd(sampler)
            .generate(&[request(text("prompt"), text("negative"), &meta)])
            .unwrap();
        compare_pixels(sampler, &img[0], &pixels(&r[&format!("pipe.{key}.pixels")]));
    }
}

#[test]
fn prompt_embeddings_condition_like_the_pipeline() {
    let (r, meta) = (reference(), json::<serde_json::Value>(dir().join("reference.json")));
    let emb = |k: &str| {
        let t = &r[k];
        Conditioning::Embeddings(
            ragar_core::Tensor::from_f32(t.dims(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap(),
        )
    };
    let sd = sd("ddim");
    let req = request(
        emb("pipe.embeds.prompt_embeds"),
        emb("pipe.embeds.negative_embeds"),
        &meta,
    );
    // Twice in one batch: batching must not change either image.
    let imgs = sd.generate(&[req.clone(), req]).unwrap();
    // The pipeline's own rounding: (image * 255).round() as uint8.
    let want = pixels(&(&r["pipe.embeds.image"] * 255.0).unwrap().round().unwrap());
    compare_pixels("embeddings", &imgs[0], &want);
    assert_eq!(imgs[0], imgs[1]);
}

#[test]
fn half_precision_stays_close_to_float32() {
    let (r, meta) = (reference(), json::<serde_json::Value>(dir().join("reference.json")));
    let text = |k: &str| Conditioning::Text(meta[k].as_str().unwrap().into());
    let want = pixels(&r["pipe.ddim.pixels"]);
    let spec = |dtype| {
        let mut s = ComponentSpec::new(
            "generator",
            serde_json::json!({"model_dir": dir(), "scheduler": "ddim"}),
        );
        s.dtype = dtype;
        s
    };
    let img = StableDiffusion::load(&spec(ragar_core::DType::F16))
        .unwrap()
        .generate(&[request(text("prompt"), text("negative"), &meta)])
        .unwrap();
    let mean = img[0]
        .rgb
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / want.len() as f64;
    assert!(mean <= 1.0, "f16: mean {mean:.3} levels from float32 diffusers");
    // candle has no CPU bf16 matmul: refused at load, naming the key.
    let err = StableDiffusion::load(&spec(ragar_core::DType::BF16))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("generator.dtype: bf16 runs on CUDA"), "{err}");
}
