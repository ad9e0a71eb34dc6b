//! The Llama decoder against transformers' LlamaForCausalLM on the same tiny
//! random weights (tests/fixtures/llama-tiny, scripts/fixtures/make_llama.py),
//! loaded through the safetensors path real checkpoints use.
//! Tolerance: max |candle - torch| <= 1e-4 on hidden states and logits.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use ragar_candle::llama::{Cache, Config, Llama};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-tiny")
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

fn load() -> (Llama, std::collections::HashMap<String, Tensor>) {
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let weights = candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    let model = Llama::from_safetensors(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), &cfg).unwrap();
    (
        model,
        candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu).unwrap(),
    )
}

#[test]
fn hidden_states_and_logits_match_transformers() {
    let (model, r) = load();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let hidden = model.forward(&ids, &mut Cache::default()).unwrap();
    assert!(
        max_diff(&hidden, &r["hidden"]) <= 1e-4,
        "hidden {}",
        max_diff(&hidden, &r["hidden"])
    );
    let logits = model.logits(&hidden).unwrap();
    assert!(
        max_diff(&logits, &r["logits"]) <= 1e-4,
        "logits {}",
        max_diff(&logits, &r["logits"])
    );
}

#[test]
fn incremental_decoding_with_the_cache_equals_one_pass() {
    let (model, r) = load();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let n = ids.dim(1).unwrap();
    let mut cache = Cache::default();
    // A 6-token prefix, then one token at a time.
    let mut parts = vec![model.forward(&ids.i((.., ..6)).unwrap(), &mut cache).unwrap()];
    for t in 6..n {
        parts.push(model.forward(&ids.i((.., t..t + 1)).unwrap(), &mut cache).unwrap());
    }
    assert_eq!(cache.len(), n);
    let stepwise = Tensor::cat(&parts, 1).unwrap();
    assert!(max_diff(&stepwise, &r["hidden"]) <= 1e-4);
}
