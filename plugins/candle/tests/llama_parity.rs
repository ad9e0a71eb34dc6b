//! The Llama decoder against transformers' LlamaForCausalLM and
//! Qwen2ForCausalLM (q/k/v biases, tied embeddings, rope_theta 1e6) on the
//! same tiny random weights (tests/fixtures/{llama,qwen2}-tiny,
//! scripts/fixtures/make_llama.py), loaded through the safetensors path real
//! checkpoints use. Tolerance: max |candle - torch| <= 1e-4 on hidden states
//! and logits.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use ragar_candle::llama::{Cache, Config, Llama};
use std::collections::HashMap;
use std::path::PathBuf;

const FIXTURES: [&str; 2] = ["llama-tiny", "qwen2-tiny"];

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

fn load(name: &str) -> (Llama, HashMap<String, Tensor>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let model = Llama::from_safetensors(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), &cfg).unwrap();
    (
        model,
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap(),
    )
}

#[test]
fn hidden_states_and_logits_match_transformers() {
    for name in FIXTURES {
        let (model, r) = load(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let hidden = model.forward(&ids, &mut Cache::default()).unwrap();
        let dh = max_diff(&hidden, &r["hidden"]);
        let dl = max_diff(&model.logits(&hidden).unwrap(), &r["logits"]);
        assert!(dh <= 1e-4 && dl <= 1e-4, "{name}: hidden {dh}, logits {dl}");
    }
}

#[test]
fn incremental_decoding_with_the_cache_equals_one_pass() {
    for name in FIXTURES {
        let (model, r) = load(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let n = ids.dim(1).unwrap();
        let mut cache = Cache::default();
        // A 6-token prefix, then one token at a time.
        let mut parts = vec![model.forward(&ids.i((.., ..6)).unwrap(), &mut cache).unwrap()];
        for t in 6..n {
            parts.push(model.forward(&ids.i((.., t..t + 1)).unwrap(), &mut cache).unwrap());
        }
        assert_eq!(cache.len(), n);
        assert!(
            max_diff(&Tensor::cat(&parts, 1).unwrap(), &r["hidden"]) <= 1e-4,
            "{name}"
        );
    }
}
