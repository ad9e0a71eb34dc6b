//! `ragar demo`: the whole method on one config, start to finish, with
//! every step's output kept in one folder:
//!
//! 1. `ranker/`: MICRO trained on the dataset's interactions, with held-out
//!    Recall@10 / NDCG@10 next to the popularity and random rankers;
//! 2. `train/`: reflection training of the Mapper (Eq. 10-15) on the first
//!    training users, the ranker's ranks as rewards;
//! 3. `ragar/` and `untrained/`: personalized images for test users, with
//!    the trained Mapper and with the Mapper before training (what the
//!    reflection module changed);
//! 4. Table 1's metrics for both (`ragar evaluate`);
//! 5. Table 4 (`ragar table4`): the ranker retrained with each run's
//!    generated images in place of the reference images;
//! 6. `report.html`.
//!
//! Each step is an ordinary command on the same config plus overrides, so
//! the demo shows exactly what a user would type; a step that finished in
//! an earlier demo into the same folder is resumed, not redone.

use crate::commands::{self, MethodArgs};
use crate::dataset::Split;
use ragar_core::Result;
use std::path::{Path, PathBuf};

/// What `ragar demo` runs.
pub struct DemoArgs {
    /// The config (default `configs/demo.yaml`).
    pub config: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Training users.
    pub train_users: usize,
    /// Test users generated for.
    pub test_users: usize,
    /// A trained ranker state to use instead of training one.
    pub ranker: Option<PathBuf>,
    /// Extra `key=value` overrides for every step.
    pub overrides: Vec<String>,
}

fn step(n: usize, what: &str) {
    eprintln!("\n== {n}/6 {what}");
}

fn with(base: &[String], extra: &[String]) -> Vec<String> {
    base.iter().chain(extra).cloned().collect()
}

fn open(args: &DemoArgs, extra: &[String]) -> Result<(crate::config::Loaded, crate::registry::Registry)> {
    commands::open(Some(&args.config), &with(&args.overrides, extra))
}

/// Run the demo; returns the report's path.
pub fn demo(args: &DemoArgs) -> Result<PathBuf> {
    std::fs::create_dir_all(&args.out).map_err(|e| ragar_core::Error::io(&args.out, e))?;
    // Checkpoint overrides resolve against the config's folder: pass absolute paths.
    let root = args
        .out
        .canonicalize()
        .map_err(|e| ragar_core::Error::io(&args.out, e))?;
    let out = |p: &str| root.join(p);
    let ranker = match &args.ranker {
        Some(r) => r.canonicalize().map_err(|e| ragar_core::Error::io(r, e))?,
        None => out("ranker/micro.safetensors"),
    };

    step(1, "training the ranker (MICRO) on the interactions");
    if args.ranker.is_some() {
        eprintln!("using the trained ranker {}", ranker.display());
    } else if ranker.is_file() {
        eprintln!("{} exists: kept", ranker.display());
    } else {
        std::fs::create_dir_all(out("ranker")).map_err(|e| ragar_core::Error::io(&out("ranker"), e))?;
        let (loaded, registry) = open(args, &[])?;
        let r = commands::train_ranker(&loaded, &registry, &ranker, None)?;
        let t = &r.test;
        eprintln!(
            "test recall@10 / ndcg@10: MICRO {:.4} / {:.4}, popularity {:.4} / {:.4}, random {:.4} / {:.4}",
            t.ranker.recall, t.ranker.ndcg, t.popularity.recall, t.popularity.ndcg, t.random.recall, t.random.ndcg
        );
    }
    let with_ranker = format!("ranker.params.checkpoint={}", ranker.display());

    step(2, "reflection training of the Mapper (rank rewards, Eq. 10-15)");
    let train = out("train");
    let (loaded, registry) = open(args, std::slice::from_ref(&with_ranker))?;
    commands::train(
        &loaded,
        &registry,
        &MethodArgs {
            out: Some(train.clone()),
            resume: train.join("train.jsonl").exists(),
            limit: Some(args.train_users),
            split: Split::Train,
        },
    )?;
    let with_mapper = format!(
        "mapper.params.checkpoint={}",
        train.join("mapper.safetensors").display()
    );

    step(3, "generating for test users: trained and untrained Mapper");
    let mut runs = Vec::new();
    for (name, extra) in [
        ("ragar", vec![with_ranker.clone(), with_mapper.clone()]),
        ("untrained", vec![with_ranker.clone()]),
    ] {
        let dir = out(name);
        let (loaded, registry) = open(args, &extra)?;
        let (_, failed) = commands::run(
            &loaded,
            &registry,
            &MethodArgs {
                out: Some(dir.clone()),
                resume: dir.join("samples.jsonl").exists(),
                limit: Some(args.test_users),
                split: Split::Test,
            },
        )?;
        if failed > 0 {
            eprintln!(
                "{name}: {failed} samples failed (recorded in {}/samples.jsonl)",
                dir.display()
            );
        }
        runs.push((dir, extra));
    }

    step(4, "evaluating (Table 1 metrics)");
    let mut rows = Vec::new();
    for (dir, extra) in &runs {
        let (loaded, registry) = open(args, extra)?;
        let summary = crate::evaluate::evaluate(&loaded, &registry, dir)?;
        let label = dir
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy().to_string());
        rows.push((label, summary));
    }
    let (loaded, _) = open(args, &[])?;
    let dataset = loaded
        .config
        .dataset
        .as_ref()
        .map_or("-", |d| d.format.name())
        .to_string();
    let table: Vec<(String, String, &crate::evaluate::Summary)> =
        rows.iter().map(|(l, s)| (dataset.clone(), l.clone(), s)).collect();
    let md = crate::evaluate::table(&table);
    crate::io::write_atomic(&out("metrics.md"), md.as_bytes())?;
    println!("{md}");
    for n in rows.iter().flat_map(|(_, s)| &s.notes) {
        eprintln!("note: {n}");
    }

    step(
        5,
        "Table 4: the ranker trained with generated images in place of the references",
    );
    let (loaded, registry) = open(args, &[])?;
    let mut ori = ranker.as_os_str().to_owned();
    ori.push(".eval.json");
    let ori = PathBuf::from(ori);
    let dirs: Vec<PathBuf> = runs.iter().map(|(d, _)| d.clone()).collect();
    let t4 = commands::table4(
        &loaded,
        &registry,
        &dirs,
        ori.is_file().then_some(ori.as_path()),
        &out("table4"),
    )?;
    println!("{t4}");

    step(6, "writing the report");
    let report = out("report.html");
    let n = commands::report(&loaded, &dirs, args.test_users, &report)?;
    eprintln!("report of {n} users -> {}", report.display());
    Ok(report)
}

/// The closing words: where things are, what was real, how to go full size.
pub fn epilogue(report: &Path, config: &Path) -> String {
    format!(
        "\nDone. Open {report} in a browser.\n\
         Real weights in this run: all-MiniLM-L6-v2 (texts) and SmolLM2-135M-Instruct (keywords, [IMG] states);\n\
         item images are described by colour histograms; LPIPS runs its real heads on a random-weight AlexNet.\n\
         NO REAL IMAGE GENERATOR WEIGHTS are available offline:\n\
         the generator is a tiny random-weight Stable Diffusion, so the generated pictures are noise.\n\
         For the paper's setup on full-size checkpoints (downloaded from the Hugging Face Hub on first use):\n\
         \x20 ragar demo --config configs/ragar.yaml            (CLIP ViT-L/14, Qwen2.5-7B, BLIP-2, SD 1.5; a dataset block of your own)\n\
         or override single stages of {config}, e.g.\n\
         \x20 generator.params.model_dir=hf:stable-diffusion-v1-5/stable-diffusion-v1-5 mapper.params.output_dim=768\n",
        report = report.display(),
        config = config.display()
    )
}
