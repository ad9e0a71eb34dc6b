//! Model resolution: `hf:org/name[@revision]` through the standard Hugging
//! Face cache layout (refs/, snapshots/), offline mode, and `ragar models`.

use ragar_tests::*;
use std::path::Path;
use std::process::Command;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "hf:sentence-transformers/all-MiniLM-L6-v2";

/// An HF cache holding the MiniLM files the way `huggingface_hub` lays them out.
fn hf_cache(dir: &Path) {
    let repo = dir.join("models--sentence-transformers--all-MiniLM-L6-v2");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(snap.join("1_Pooling")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let src = cache().join("models/all-MiniLM-L6-v2");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "sentence_bert_config.json",
        "modules.json",
        "1_Pooling/config.json",
        "model.safetensors",
        "model.onnx",
    ] {
        std::os::unix::fs::symlink(src.join(f), snap.join(f)).unwrap();
    }
}

fn ragar_with(cache_dir: &Path, args: &[&str]) -> (bool, String) {
    let o = run(Command::new(ragar())
        .current_dir(root())
        .env("HF_HUB_CACHE", cache_dir)
        .env("HF_HUB_OFFLINE", "1")
        .args(args));
    (o.status.success(), text(&o))
}

#[test]
fn hub_references_resolve_from_the_hf_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    hf_cache(dir.path());
    for (backend, revision) in [("candle", "".to_string()), ("ort", format!("@{COMMIT}"))] {
        let out = dir.path().join(format!("{backend}.json"));
        let o = run(minilm_stage(&ragar(), &out)
            .env("HF_HUB_CACHE", dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .arg(format!("encoder.backend={backend}"))
            .arg(format!("encoder.params.model_dir={REPO}{revision}")));
        let (ok, log) = (o.status.success(), text(&o));
        assert!(ok, "{backend}: {log}");
        for (g, w) in read_matrix(&out).iter().zip(reference()) {
            assert!(cosine(g, &w) >= 0.9999);
        }
    }
    let (ok, report) = ragar_with(
        dir.path(),
        &[
            "models",
            "configs/minilm.yaml",
            &format!("encoder.params.model_dir={REPO}"),
        ],
    );
    assert!(ok, "{report}");
    assert!(
        report.contains("encoder: minilm (candle) ready") && report.contains(COMMIT),
        "{report}"
    );
}

#[test]
fn offline_mode_names_the_missing_files_and_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let (ok, report) = ragar_with(
        empty.path(),
        &[
            "models",
            "configs/minilm.yaml",
            &format!("encoder.params.model_dir={REPO}"),
        ],
    );
    assert!(!ok, "{report}");
    assert!(report.contains("NOT ready"), "{report}");
    assert!(
        report.contains("config.json, tokenizer.json not in the Hugging Face cache"),
        "{report}"
    );
    assert!(
        report.contains("offline mode is on") && report.contains("huggingface-cli download"),
        "{report}"
    );

    let (ok, msg) = ragar_with(
        empty.path(),
        &[
            "validate",
            "configs/minilm.yaml",
            "encoder.params.model_dir=hf:not a repo",
        ],
    );
    assert!(!ok && msg.contains("not a Hub reference"), "{msg}");
}
