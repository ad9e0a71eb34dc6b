//! The RAGAR method end to end through the `ragar` binary, on a small real
//! image dataset made here (PNG files of coloured patterns with titles) and
//! the project's test models: BLIP (tiny) captions, CLIP (tiny) features,
//! the real SmolLM2-135M keywords and [IMG] states, the Mapper, Stable
//! Diffusion (tiny) and the content ranker. Checks: `train-ranker` trains
//! and saves; `train` logs one line per sample and checkpoints; an
//! interrupted-then-resumed training ends bit-identical to an uninterrupted
//! one, with no duplicate or missing samples; `run` writes one PNG and one
//! JSONL line per user with the retrieved items and their weights.

use ragar_tests::*;
use std::path::Path;
use std::process::Command;

const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("blue", [40, 60, 220]),
    ("green", [40, 180, 60]),
    ("yellow", [230, 210, 40]),
];
const SHAPES: [&str; 3] = ["stripes", "dots", "square"];

fn dataset(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut items = String::new();
    for (ci, (cname, rgb)) in COLOURS.iter().enumerate() {
        for (si, shape) in SHAPES.iter().enumerate() {
            let img = image::RgbImage::from_fn(48, 40, |x, y| {
                let on = match si {
                    0 => (x / 6) % 2 == 0,
                    1 => (x % 12 < 5) && (y % 12 < 5),
                    _ => (12..36).contains(&x) && (10..30).contains(&y),
                };
                if on {
                    image::Rgb(*rgb)
                } else {
                    image::Rgb([250, 250, 245])
                }
            });
            let id = format!("{cname}-{shape}");
            img.save(dir.join(format!("images/{id}.png"))).unwrap();
            items += &format!(
                "{{\"id\": \"{id}\", \"image\": \"images/{id}.png\", \"text\": \"a {cname} {shape} pattern\"}}\n"
            );
            let _ = ci;
        }
    }
    std::fs::write(dir.join("items.jsonl"), items).unwrap();
    let mut users = String::new();
    for u in 0..6 {
        let (a, b) = (COLOURS[u % 4].0, COLOURS[(u + 1) % 4].0);
        let hist = [
            format!("{a}-stripes"),
            format!("{b}-dots"),
            format!("{a}-dots"),
            format!("{b}-square"),
            format!("{a}-square"),
        ];
        let reference = format!("{}-stripes", COLOURS[(u + 2) % 4].0);
        users += &format!(
            "{{\"user\": \"u{u}\", \"history\": {:?}, \"reference\": \"{reference}\"}}\n",
            hist
        );
    }
    std::fs::write(dir.join("users.jsonl"), users).unwrap();
}

fn config(dir: &Path) -> std::path::PathBuf {
    let c = cache();
    let yaml = format!(
        r#"stage_cache: store.redb
dataset:
  items: data/items.jsonl
  users: data/users.jsonl
  valid: 0.0
  test: 0.0
captioner: {{name: blip, backend: candle, params: {{model_dir: {blip}}}}}
encoder: {{name: clip, backend: candle, params: {{model_dir: {clip}}}}}
keyword_llm:
  name: llama
  backend: candle
  params: {{model_dir: {llm}, gguf: SmolLM2-135M-Instruct.Q4_1.gguf, n_img_tokens: 4}}
mapper:
  name: ragar
  backend: candle
  params: {{input_dim: 576, n_img_tokens: 4, keyword_dim: 16, retrieval_dim: 16, semantic_dim: 16,
            hidden_dim: 16, layers: 1, heads: 2, ffn_dim: 32, n_queries: 77, output_dim: 32,
            calibrator_heads: 2, keyword_tokens: 2}}
generator: {{name: stable-diffusion, backend: candle, params: {{model_dir: {sd}, scheduler: ddim}}}}
ranker: {{name: content, backend: candle, params: {{dim: 8, epochs: 5, batch_size: 8}}}}
method:
  retrieval: {{k: 3}}
  caption_max_tokens: 5
  caption_beams: 1
  keyword_max_tokens: 12
  top_m: 5
  generation: {{steps: 2, guidance: 3.0, width: 64, height: 64, seed: 11}}
  reflection: {{noises: 2, sigma: 0.2}}
  train: {{epochs: 1, lr: 0.001, checkpoint_every: 1}}
"#,
        blip = c.join("models/blip-tiny").display(),
        clip = c.join("models/clip-tiny-e2e").display(),
        llm = c.join("models/smollm2-135m-instruct").display(),
        sd = c.join("models/sd-tiny").display(),
    );
    let p = dir.join("ragar.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

fn ragar_ok(args: &[&str]) -> String {
    let o = run(Command::new(ragar()).current_dir(root()).args(args));
    let t = text(&o);
    assert!(o.status.success(), "ragar {args:?} failed:\n{t}");
    t
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_ranker_train_resume_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(&tmp.path().join("data"));
    let cfg = config(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let ranker = tmp.path().join("ranker.safetensors");
    let out = ragar_ok(&["train-ranker", cfg, "--out", ranker.to_str().unwrap()]);
    assert!(out.contains("recall@10"), "{out}");
    assert!(ranker.is_file());
    let with_ranker = format!("ranker.params.checkpoint={}", ranker.display());

    // Uninterrupted: 2 epochs over 2 users.
    let full = tmp.path().join("full");
    ragar_ok(&[
        "train",
        cfg,
        "--out",
        full.to_str().unwrap(),
        "--limit",
        "2",
        "method.train.epochs=2",
        &with_ranker,
    ]);
    let log = lines(&full.join("train.jsonl"));
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log
        .iter()
        .all(|l| l["error"].is_null() && l["stats"]["loss"].is_number()));
    assert_eq!(log[0]["prepared"]["retrieved_items"].as_array().unwrap().len(), 3);

    // Interrupted after epoch 0, then resumed to 2 epochs: same weights, no duplicates.
    let part = tmp.path().join("part");
    ragar_ok(&[
        "train",
        cfg,
        "--out",
        part.to_str().unwrap(),
        "--limit",
        "2",
        "method.train.epochs=1",
        &with_ranker,
    ]);
    ragar_ok(&[
        "train",
        cfg,
        "--out",
        part.to_str().unwrap(),
        "--limit",
        "2",
        "--resume",
        "method.train.epochs=2",
        &with_ranker,
    ]);
    let log = lines(&part.join("train.jsonl"));
    let keys: Vec<(String, u64)> = log
        .iter()
        .map(|l| (l["user"].as_str().unwrap().to_string(), l["epoch"].as_u64().unwrap()))
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(
        std::fs::read(full.join("mapper.safetensors")).unwrap(),
        std::fs::read(part.join("mapper.safetensors")).unwrap()
    );

    // Generation for every user with the trained mapper.
    let gen = tmp.path().join("gen");
    let with_mapper = format!("mapper.params.checkpoint={}", full.join("mapper.safetensors").display());
    ragar_ok(&[
        "run",
        cfg,
        "--out",
        gen.to_str().unwrap(),
        "--split",
        "all",
        "--limit",
        "3",
        &with_mapper,
    ]);
    let log = lines(&gen.join("samples.jsonl"));
    assert_eq!(log.len(), 3);
    for l in &log {
        let img = gen.join(l["image"].as_str().unwrap());
        assert_eq!(image::open(&img).unwrap().width(), 64);
        let w: Vec<f64> = serde_json::from_value(l["prepared"]["retrieved"]["weights"].clone()).unwrap();
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{w:?}");
    }
    // A second run in a new folder: every item is known, so the cache serves
    // captions, embeddings and keyword answers with zero model calls.
    let again = tmp.path().join("again");
    ragar_ok(&[
        "run",
        cfg,
        "--out",
        again.to_str().unwrap(),
        "--split",
        "all",
        "--limit",
        "3",
        &with_mapper,
    ]);
    let timing: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("timing.json")).unwrap()).unwrap();
    for stage in [
        "captioner",
        "encoder (text)",
        "encoder (image)",
        "keyword llm",
        "keyword llm [IMG]",
    ] {
        assert!(timing.get(stage).is_none(), "second run called the {stage}: {timing}");
    }
    assert!(timing.get("generator").is_some(), "{timing}");

    // A second run into the same folder without --resume is refused; with it, nothing is redone.
    let o =
        run(Command::new(ragar())
            .current_dir(root())
            .args(["run", cfg, "--out", gen.to_str().unwrap(), &with_mapper]));
    assert!(!o.status.success() && text(&o).contains("--resume"), "{}", text(&o));
    ragar_ok(&[
        "run",
        cfg,
        "--out",
        gen.to_str().unwrap(),
        "--split",
        "all",
        "--limit",
        "3",
        "--resume",
        &with_mapper,
    ]);
    assert_eq!(lines(&gen.join("samples.jsonl")).len(), 3);

    // Table 1's metrics for the run: every column, for every sample.
    let refs = cache().join("data/metrics-ref");
    let table = ragar_ok(&[
        "evaluate",
        cfg,
        "--run",
        gen.to_str().unwrap(),
        &with_ranker,
        "evaluation.lpips.net=alex",
        &format!(
            "evaluation.lpips.backbone={}",
            refs.join("alexnet-random.safetensors").display()
        ),
        &format!(
            "evaluation.lpips.heads={}",
            refs.join("lpips-alex-lin.safetensors").display()
        ),
    ]);
    assert!(
        table.contains("| dataset | method | CPS↑ | CPIS↑ | LPIPS↓ | SSIM↑ | ΔR↑ | CS↑ | CIS↑ | LPIPS↓ | SSIM↑ |"),
        "{table}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gen.join("metrics.json")).unwrap()).unwrap();
    for k in [
        "cps",
        "cpis",
        "lpips_personal",
        "ssim_personal",
        "rank_change",
        "cs",
        "cis",
        "lpips_reference",
        "ssim_reference",
    ] {
        assert_eq!(summary["counts"][k], 3, "{k}: {summary}");
    }
    for l in lines(&gen.join("metrics.jsonl")) {
        let m = &l["metrics"];
        let f = |k: &str| m[k].as_f64().unwrap();
        for k in ["ssim_reference", "ssim_personal"] {
            assert!((-1.0..=1.0).contains(&f(k)), "{l}");
        }
        for k in ["lpips_reference", "lpips_personal"] {
            assert!(f(k) >= 0.0, "{l}");
        }
        for k in ["cs", "cis", "cps", "cpis"] {
            assert!((-100.0..=100.0).contains(&f(k)), "{l}");
        }
        // 12 items, 5 in the history: 7 candidates.
        let (ro, rg) = (f("rank_original"), f("rank_generated"));
        assert!((1.0..=7.0).contains(&ro) && (1.0..=7.0).contains(&rg), "{l}");
        assert!((f("rank_change") - (ro - rg) / (1.0 + ro).log2()).abs() < 1e-9, "{l}");
    }

    // The report over both runs, rendered by headless Chromium.
    let page = tmp.path().join("report.html");
    ragar_ok(&[
        "report",
        cfg,
        "--run",
        gen.to_str().unwrap(),
        "--run",
        again.to_str().unwrap(),
        "--out",
        page.to_str().unwrap(),
    ]);
    let shot = tmp.path().join("report.png");
    let dom = chromium(&page, &shot);
    for u in ["u0", "u1", "u2"] {
        assert!(
            dom.contains(&format!("data-user=\"{u}\"")),
            "user {u} missing from the rendered page"
        );
    }
    // Every image decoded in the browser: 5 history + reference + 2 runs per user.
    assert!(
        dom.contains("data-images=\"24\" data-decoded=\"24\""),
        "{}",
        &dom[dom.find("<body").unwrap()..][..200]
    );
    assert_eq!(
        dom.matches("class=\"item retrieved\"").count(),
        9,
        "k = 3 outlined per user"
    );
    assert!(dom.contains("ΔR↑") && dom.contains("data-run=\"again\""));
    let png = image::open(&shot).unwrap().to_rgb8();
    let colours: std::collections::HashSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 50,
        "the screenshot looks blank ({} colours)",
        colours.len()
    );
    std::fs::copy(&shot, root().join("target/report-screenshot.png")).ok();
}

#[test]
fn broken_history_images_are_skipped_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    std::fs::write(data.join("images/red-dots.png"), b"not a png").unwrap();
    std::fs::remove_file(data.join("images/blue-dots.png")).unwrap();
    let cfg = config(tmp.path());
    let gen = tmp.path().join("gen");
    // No mapper checkpoint: a fresh mapper is enough to exercise the pipeline.
    let out = ragar_ok(&[
        "run",
        cfg.to_str().unwrap(),
        "--out",
        gen.to_str().unwrap(),
        "--split",
        "all",
        "--limit",
        "1",
        "method.retrieval.k=9",
    ]);
    let l = &lines(&gen.join("samples.jsonl"))[0];
    let skipped: Vec<(String, String)> = serde_json::from_value(l["prepared"]["skipped"].clone()).unwrap();
    let ids: Vec<&str> = skipped.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(ids, vec!["blue-dots", "red-dots"], "{skipped:?}");
    assert!(out.contains("skipped history item 'red-dots'"), "{out}");
    assert!(out.contains("fewer than k = 9"), "{out}");
    assert!(gen.join(l["image"].as_str().unwrap()).is_file());

    // The SD baseline: the reference item's text as the prompt, no Mapper.
    let sd = tmp.path().join("sd");
    ragar_ok(&[
        "run",
        cfg.to_str().unwrap(),
        "--out",
        sd.to_str().unwrap(),
        "--split",
        "all",
        "--limit",
        "1",
        "method.condition=reference-text",
    ]);
    let b = &lines(&sd.join("samples.jsonl"))[0];
    let (ours, base) = (
        std::fs::read(gen.join(l["image"].as_str().unwrap())).unwrap(),
        std::fs::read(sd.join(b["image"].as_str().unwrap())).unwrap(),
    );
    assert!(
        b["error"].is_null() && ours != base,
        "the baseline draws from the text, not the preference"
    );
}
