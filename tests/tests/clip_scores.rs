//! CS, CIS, CPS and CPIS of `ragar evaluate` against transformers: the tiny
//! CLIP checkpoint (real tokenizer, random weights) scores a run folder of
//! real image files (a photo, an RGBA PNG, drawn PNGs) on a JSONL dataset;
//! scripts/fixtures/make_clip_scores.py computed the same scores with
//! transformers' CLIPModel. Both CPS variants (`evaluation.cps`) are checked.
//!
//! Tolerance: 0.01 on the 100-point scale. Measured: at most 2e-5 where
//! only PNGs are involved, 0.0025 where the JPEG photo is (JPEG decoders may
//! differ by one 8-bit level; tests/clip_stage.rs).

use ragar_tests::*;
use std::process::Command;

const TOLERANCE: f64 = 0.01;

fn evaluate(cps: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let data = cache().join("data/clip-scores");
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(run_dir.join("images")).unwrap();
    for f in ["samples.jsonl", "images/gen-u1.png", "images/gen-u2.png"] {
        std::fs::copy(data.join("run").join(f), run_dir.join(f)).unwrap();
    }
    let config = tmp.path().join("scores.yaml");
    std::fs::write(
        &config,
        format!(
            "stage_cache: {}\ndataset: {{format: jsonl, items: {d}/items.jsonl, users: {d}/users.jsonl}}\n\
             encoder: {{name: clip, backend: candle, params: {{model_dir: {m}}}}}\n\
             evaluation: {{cps: {cps}}}\n",
            tmp.path().join("stage.redb").display(),
            d = data.join("dataset").display(),
            m = cache().join("models/clip-tiny-e2e").display(),
        ),
    )
    .unwrap();
    let o = run(Command::new(ragar()).current_dir(root()).args([
        "evaluate",
        config.to_str().unwrap(),
        "--run",
        run_dir.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("reference.json")).unwrap()).unwrap();
    let lines = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (reference, lines)
}

fn check(cps: &str, cps_key: &str) {
    let (reference, lines) = evaluate(cps);
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let user = l["user"].as_str().unwrap();
        let want = &reference[user];
        for (ours, theirs) in [("cs", "cs"), ("cis", "cis"), ("cps", cps_key), ("cpis", "cpis")] {
            let (g, w) = (l["metrics"][ours].as_f64(), want[theirs].as_f64().unwrap());
            let g = g.unwrap_or_else(|| panic!("{user}: no {ours} in {l}"));
            assert!(
                (g - w).abs() <= TOLERANCE,
                "{user} {ours}: ragar {g:.4}, transformers {w:.4}"
            );
        }
    }
}

#[test]
fn clip_scores_match_transformers_with_keyword_cps() {
    check("keywords", "cps");
}

#[test]
fn clip_scores_match_transformers_with_history_cps() {
    check("history", "cps_history");
}
