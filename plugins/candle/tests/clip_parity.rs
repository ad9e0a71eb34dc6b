//! CLIP towers against transformers' CLIPModel on the same tiny random
//! weights (tests/fixtures/clip-tiny, made by scripts/fixtures/make_clip.py),
//! loaded through the same code path as real checkpoints.
//! Tolerance: max |candle - torch| <= 1e-4 (fp32).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ragar_candle::clip::{ClipModel, Config};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip-tiny")
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

fn load() -> (ClipModel, HashMap<String, Tensor>) {
    let dir = fixture();
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = VarBuilder::from_tensors(
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap(),
        DType::F32,
        &Device::Cpu,
    );
    let model = ClipModel::load(vb, &cfg).unwrap();
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (model, reference)
}

#[test]
fn text_tower_matches_transformers() {
    let (model, r) = load();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = r["attention_mask"].to_dtype(DType::U32).unwrap();
    let (hidden, pooled) = model.text.forward(&ids, Some(&mask)).unwrap();
    // Padded positions are not compared: their values depend on how a
    // fully masked row is normalised, which no caller reads.
    let keep = r["attention_mask"].to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let masked = |t: &Tensor| t.broadcast_mul(&keep).unwrap();
    assert!(max_diff(&masked(&hidden), &masked(&r["text_last_hidden_state"])) <= 1e-4);
    assert!(max_diff(&pooled, &r["text_pooled"]) <= 1e-4);
    let embeds = model.text_features(&ids, Some(&mask)).unwrap();
    assert!(max_diff(&embeds, &r["text_embeds"]) <= 1e-4);
}

#[test]
fn vision_tower_matches_transformers() {
    let (model, r) = load();
    let (hidden, pooled) = model.vision.forward(&r["pixel_values"]).unwrap();
    assert!(max_diff(&hidden, &r["vision_last_hidden_state"]) <= 1e-4);
    assert!(max_diff(&pooled, &r["vision_pooled"]) <= 1e-4);
    let embeds = model.image_features(&r["pixel_values"]).unwrap();
    assert!(max_diff(&embeds, &r["image_embeds"]) <= 1e-4);
}

#[test]
fn wrong_input_size_is_an_error() {
    let (model, _) = load();
    let pixels = Tensor::zeros((1, 3, 30, 30), DType::F32, &Device::Cpu).unwrap();
    let err = model.vision.forward(&pixels).unwrap_err().to_string();
    assert!(err.contains("30x30") && err.contains("32x32"), "{err}");
}

#[test]
fn a_checkpoint_that_does_not_match_its_config_names_the_tensor() {
    let dir = fixture();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["intermediate_size"] = serde_json::json!(40);
    let cfg: Config = serde_json::from_value(cfg).unwrap();
    let vb = VarBuilder::from_tensors(
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap(),
        DType::F32,
        &Device::Cpu,
    );
    let err = ClipModel::load(vb, &cfg).err().expect("must fail").to_string();
    assert!(err.contains("text_model.encoder.layers.0.mlp.fc1.weight"), "{err}");
}
