//! `ragar`: run, train and evaluate RAGAR pipelines composed from YAML.

use clap::{Parser, Subcommand};
use ragar_core::Stage;
use ragar_host::commands;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ragar",
    version,
    about = "Retrieval-augmented personalized image generation guided by recommendation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one stage on given inputs (the debugging and parity tool).
    Stage {
        /// captioner | encoder | keyword-llm | mapper | generator | ranker
        stage: String,
        /// Config file.
        #[arg(long)]
        config: PathBuf,
        /// One text per line (empty lines are embedded as the empty string).
        #[arg(long, conflicts_with = "image_file")]
        text_file: Option<PathBuf>,
        /// One image path per line (relative to this file's folder).
        #[arg(long)]
        image_file: Option<PathBuf>,
        /// generator: prompt embeddings (safetensors `prompt_embeds` [n, 77, d],
        /// optional `negative_embeds`), e.g. the Mapper's output.
        #[arg(long, conflicts_with_all = ["text_file", "image_file"])]
        prompt_embeds: Option<PathBuf>,
        /// Output: .json (array of arrays) or .safetensors; generator: a folder of PNGs.
        #[arg(long)]
        out: PathBuf,
        /// keyword-llm, captioner: most new tokens (default 64 and 30).
        #[arg(long)]
        max_tokens: Option<u32>,
        /// captioner: beam width (1 = greedy).
        #[arg(long, default_value_t = 1)]
        beams: u32,
        /// captioner: text the caption starts with (e.g. "a picture of").
        #[arg(long, default_value = "")]
        prompt: String,
        /// keyword-llm: 0 = greedy, else sampling temperature.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// keyword-llm: nucleus threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// keyword-llm: sampling seed; generator: seed of the first image (image i: seed + i).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// generator: denoising steps.
        #[arg(long, default_value_t = 30)]
        steps: u32,
        /// generator: classifier-free guidance scale (1 = off).
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        /// generator: negative prompt (text prompts only).
        #[arg(long)]
        negative: Option<String>,
        /// generator: image width in pixels.
        #[arg(long, default_value_t = 512)]
        width: u32,
        /// generator: image height in pixels.
        #[arg(long, default_value_t = 512)]
        height: u32,
        /// keyword-llm: stop before this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// keyword-llm: write the [IMG] hidden states (Eq. 7) instead of generating.
        #[arg(long)]
        img_states: bool,
        /// key.path=value overrides, applied last.
        overrides: Vec<String>,
    },
    /// Reflection training of the Mapper (Eq. 10-15) on the dataset's training users.
    Train {
        /// Config file.
        config: PathBuf,
        /// Run folder (default runs/<config>/<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out: load its checkpoint, skip logged samples.
        #[arg(long, requires = "out")]
        resume: bool,
        /// At most this many users.
        #[arg(long)]
        limit: Option<usize>,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// Personalised images for the users of a split.
    Run {
        /// Config file.
        config: PathBuf,
        /// Run folder (default runs/<config>/<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out, skipping finished users.
        #[arg(long, requires = "out")]
        resume: bool,
        /// train | valid | test | all.
        #[arg(long, default_value = "test")]
        split: String,
        /// At most this many users.
        #[arg(long)]
        limit: Option<usize>,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// Train the configured ranker on the dataset; prints Recall@10 / NDCG@10.
    TrainRanker {
        /// Config file.
        config: PathBuf,
        /// Where to save the trained ranker.
        #[arg(long)]
        out: PathBuf,
        /// A run folder whose generated images replace the reference items'
        /// own images during training (the paper's Table 4).
        #[arg(long)]
        generated: Option<PathBuf>,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// Time one stage as configured (the unit of configs/bench/backends.yaml):
    /// per-call latency percentiles and items/s after warm-up calls.
    StageBench {
        /// Config file.
        config: PathBuf,
        /// encoder-text, encoder-image, generator, captioner or keyword-llm.
        #[arg(long)]
        stage: String,
        /// Inputs per call.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed calls (at the least).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Seconds of timed calls (at the least): more calls than --iters
        /// until their total reaches this.
        #[arg(long, default_value_t = 0.0)]
        min_time: f64,
        /// Untimed calls first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Generator: denoising steps.
        #[arg(long, default_value_t = 4)]
        steps: u32,
        /// Image side (generator output, encoder-image and captioner input).
        #[arg(long, default_value_t = 224)]
        size: u32,
        /// Captioner, keyword-llm: most new tokens per caption / answer.
        #[arg(long, default_value_t = 20)]
        tokens: u32,
        /// Write the result here (JSON) as well as printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// The paper's Table 4: Recall@10 / NDCG@10 of the ranker trained with
    /// the original images (ORI) and with each run's generated images in
    /// place of the reference images; writes table4.{json,md} into --out.
    Table4 {
        /// Config file (dataset, encoders, ranker).
        config: PathBuf,
        /// Run folders (one row each); repeat the flag.
        #[arg(long, required = true)]
        run: Vec<PathBuf>,
        /// An existing ORI report (`<ranker>.eval.json`) to reuse.
        #[arg(long)]
        ori: Option<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// The paper's Table 1 metrics for a run folder (CS, CIS, CPS, CPIS,
    /// LPIPS, SSIM, rank change): writes metrics.jsonl, metrics.json and
    /// metrics.md into it.
    Evaluate {
        /// Config file (the run's own config.yaml works).
        config: PathBuf,
        /// The run folder (holds samples.jsonl and images/).
        #[arg(long)]
        run: PathBuf,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// report.html: for sampled users, the history with the retrieved items
    /// and weights, keywords, reference and each run's image and metrics.
    Report {
        /// Config file (for the dataset).
        config: PathBuf,
        /// Run folders to compare (one per method); repeat the flag.
        #[arg(long = "run", required = true)]
        runs: Vec<PathBuf>,
        /// Users shown.
        #[arg(long, default_value_t = 20)]
        users: usize,
        /// Output file (default: report.html in the first run folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// The whole method on the embedded sticker set (or CONFIG): ranker,
    /// reflection training, generation, metrics, report.html.
    Demo {
        /// Config file.
        #[arg(long, default_value = "configs/demo.yaml")]
        config: PathBuf,
        /// Output folder (a finished step in it is kept, not redone).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Training users for the reflection module.
        #[arg(long, default_value_t = 6)]
        train_users: usize,
        /// Test users to generate for.
        #[arg(long, default_value_t = 6)]
        test_users: usize,
        /// Use this trained ranker state instead of training one.
        #[arg(long)]
        ranker: Option<PathBuf>,
        /// key.path=value overrides for every step.
        overrides: Vec<String>,
    },
    /// A benchmark matrix: every variant x sweep combination as a job
    /// (`ragar demo` + overrides), results tables over all jobs.
    /// `ragar bench merge OUT SHARD...` joins shard folders.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        /// `merge`.
        #[command(subcommand)]
        action: Option<BenchAction>,
        /// The matrix file.
        matrix: Option<PathBuf>,
        /// Output folder.
        #[arg(long, default_value = "runs/bench")]
        out: PathBuf,
        /// Skip jobs that finished.
        #[arg(long)]
        resume: bool,
        /// Stop at the first failed job.
        #[arg(long)]
        fail_fast: bool,
        /// Run the jobs i, i+N, ... of the matrix (0-based).
        #[arg(long, default_value = "0/1")]
        shard: String,
        /// Run every job this many times, round after round (the matrix's
        /// `rounds`); stage tables give each variant's median round.
        #[arg(long)]
        rounds: Option<usize>,
        /// Extra sweeps: key.path=a,b,c.
        sweeps: Vec<String>,
    },
    /// Check a config without loading weights.
    Validate {
        /// Config file.
        config: PathBuf,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// Show the resolved config and where each value came from.
    PrintConfig {
        /// Config file.
        config: PathBuf,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// What each configured component needs and whether it is present
    /// (local folders, the Hugging Face cache); downloads nothing.
    Models {
        /// Config file.
        config: PathBuf,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// List every component (static and dynamic) and plugin load failures.
    Plugins {
        /// Also load the plugins this config lists.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchAction {
    /// Join shard folders of one matrix into OUT.
    Merge {
        /// Output folder.
        out: PathBuf,
        /// Shard folders.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    // Before any thread: it sets an environment variable.
    #[cfg(feature = "candle")]
    ragar_candle::device::settle_thread_count();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> ragar_core::Result<ExitCode> {
    match cli.command {
        Command::Stage {
            stage,
            config,
            text_file,
            image_file,
            out,
            overrides,
            max_tokens,
            beams,
            prompt,
            temperature,
            top_p,
            seed,
            stop,
            img_states,
            prompt_embeds,
            steps,
            guidance,
            negative,
            width,
            height,
        } => {
            let stage = Stage::parse(&stage)?;
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            match stage {
                Stage::Encoder => {
                    let n = match (text_file, image_file) {
                        (Some(f), _) => commands::stage_encoder(&loaded, &registry, &f, &out)?,
                        (None, Some(f)) => commands::stage_encoder_images(&loaded, &registry, &f, &out)?,
                        (None, None) => {
                            return Err(ragar_core::Error::invalid_input(
                                "`ragar stage encoder` needs --text-file FILE or --image-file FILE",
                            ))
                        }
                    };
                    eprintln!("embedded {n} inputs -> {}", out.display());
                }
                Stage::KeywordLlm => {
                    let file = text_file.ok_or_else(|| {
                        ragar_core::Error::invalid_input(
                            "`ragar stage keyword-llm` needs --text-file FILE (one prompt per line)",
                        )
                    })?;
                    let n = if img_states {
                        commands::stage_preference_states(&loaded, &registry, &file, &out)?
                    } else {
                        let opts = ragar_core::stage::GenerateOptions {
                            max_tokens: max_tokens.unwrap_or(64),
                            temperature,
                            top_p,
                            seed,
                            stop: stop.into_iter().map(Into::into).collect(),
                            chat_template: true,
                        };
                        commands::stage_keyword_llm(&loaded, &registry, &file, &opts, &out)?
                    };
                    eprintln!("{n} prompts -> {}", out.display());
                }
                Stage::Captioner => {
                    let file = image_file.ok_or_else(|| {
                        ragar_core::Error::invalid_input(
                            "`ragar stage captioner` needs --image-file FILE (one image path per line)",
                        )
                    })?;
                    let opts = ragar_core::stage::CaptionOptions {
                        max_tokens: max_tokens.unwrap_or(30),
                        beams,
                        prompt: prompt.into(),
                    };
                    let n = commands::stage_captioner(&loaded, &registry, &file, &opts, &out)?;
                    eprintln!("{n} captions -> {}", out.display());
                }
                Stage::Generator => {
                    let args = commands::GenerateArgs {
                        text_file,
                        prompt_embeds,
                        negative,
                        seed,
                        steps,
                        guidance,
                        width,
                        height,
                    };
                    let n = commands::stage_generator(&loaded, &registry, &args, &out)?;
                    eprintln!("{n} images -> {}", out.display());
                }
                other => return Err(commands::stage_not_available(other)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train {
            config,
            out,
            resume,
            limit,
            overrides,
        } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            let args = commands::MethodArgs {
                out,
                resume,
                limit,
                split: ragar_host::dataset::Split::Train,
            };
            let dir = commands::train(&loaded, &registry, &args)?;
            eprintln!("trained -> {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            out,
            resume,
            split,
            limit,
            overrides,
        } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            let split = ragar_host::dataset::Split::parse(&split)?;
            let args = commands::MethodArgs {
                out,
                resume,
                limit,
                split,
            };
            let (dir, failures) = commands::run(&loaded, &registry, &args)?;
            eprintln!("run -> {} ({failures} failed)", dir.display());
            Ok(if failures == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::StageBench {
            config,
            stage,
            batch,
            iters,
            min_time,
            warmup,
            steps,
            size,
            tokens,
            out,
            overrides,
        } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            let args = ragar_host::stage_bench::StageBenchArgs {
                stage: ragar_host::stage_bench::BenchStage::parse(&stage)?,
                batch,
                iters,
                min_time,
                warmup,
                steps,
                size,
                tokens,
            };
            let r = ragar_host::stage_bench::run(&loaded, &registry, &args)?;
            println!(
                "{}: {:.2} items/s, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms ({} calls)",
                r.label(),
                r.items_per_s,
                r.latency.p50 * 1e3,
                r.latency.p90 * 1e3,
                r.latency.p99 * 1e3,
                r.latency.n
            );
            if let Some(o) = out {
                ragar_host::io::write_json(&o, &r)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Table4 {
            config,
            run,
            ori,
            out,
            overrides,
        } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            print!("{}", commands::table4(&loaded, &registry, &run, ori.as_deref(), &out)?);
            eprintln!("-> {}", out.join("table4.md").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::TrainRanker {
            config,
            out,
            generated,
            overrides,
        } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            let r = commands::train_ranker(&loaded, &registry, &out, generated.as_deref())?;
            if let Some(g) = &r.replaced {
                eprintln!(
                    "generated images replaced {} reference items ({} images, {} samples skipped)",
                    g.items,
                    g.images,
                    g.skipped.len()
                );
            }
            for (k, v) in &r.fit {
                println!("valid {k}\t{v:.4}");
            }
            let t = &r.test;
            println!("test ({} users)\trecall@{k}\tndcg@{k}", t.ranker.users, k = t.k);
            for (name, m) in [
                ("ranker", &t.ranker),
                ("popularity", &t.popularity),
                ("random", &t.random),
            ] {
                println!("{name}\t{:.4}\t{:.4}", m.recall, m.ndcg);
            }
            eprintln!("ranker -> {} (report: {}.eval.json)", out.display(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Evaluate { config, run, overrides } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            let summary = ragar_host::evaluate::evaluate(&loaded, &registry, &run)?;
            print!(
                "{}",
                std::fs::read_to_string(run.join("metrics.md")).unwrap_or_default()
            );
            for n in &summary.notes {
                eprintln!("note: {n}");
            }
            eprintln!(
                "{} samples evaluated, {} failed -> {}",
                summary.samples - summary.failed,
                summary.failed,
                run.join("metrics.json").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            config,
            runs,
            users,
            out,
            overrides,
        } => {
            let (loaded, _) = commands::open(Some(&config), &overrides)?;
            let out = out.unwrap_or_else(|| runs[0].join("report.html"));
            let n = commands::report(&loaded, &runs, users, &out)?;
            eprintln!("report of {n} users -> {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            config,
            out,
            train_users,
            test_users,
            ranker,
            overrides,
        } => {
            let args = ragar_host::demo::DemoArgs {
                config: config.clone(),
                out,
                train_users,
                test_users,
                ranker,
                overrides,
            };
            let report = ragar_host::demo::demo(&args)?;
            eprint!("{}", ragar_host::demo::epilogue(&report, &config));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            action: Some(BenchAction::Merge { out, shards }),
            ..
        } => {
            let n = ragar_host::bench::merge(&out, &shards)?;
            eprintln!("{n} jobs -> {}", out.join("results.md").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            action: None,
            matrix,
            out,
            resume,
            fail_fast,
            shard,
            rounds,
            sweeps,
        } => {
            let matrix = matrix.ok_or_else(|| {
                ragar_core::Error::config("ragar bench: give a MATRIX.yaml (or `merge OUT SHARD...`)")
            })?;
            let mut m = ragar_host::bench::Matrix::load(&matrix)?.with_sweeps(&sweeps)?;
            m.rounds = rounds.unwrap_or(m.rounds);
            let args = ragar_host::bench::BenchArgs {
                out: out.clone(),
                resume,
                fail_fast,
                shard: ragar_host::bench::parse_shard(&shard)?,
            };
            let (ok, failed) = ragar_host::bench::run(&m, &args)?;
            print!(
                "{}",
                std::fs::read_to_string(out.join("results.md")).unwrap_or_default()
            );
            eprintln!("{ok} jobs ok, {failed} failed -> {}", out.display());
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Validate { config, overrides } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            let problems = commands::validate(&loaded, &registry);
            if let Some(w) = loaded.config.cuda_backends_clash() {
                eprintln!("warning: {w}");
            }
            if problems.is_empty() {
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("{}: {} problem(s)", config.display(), problems.len());
                for p in problems {
                    eprintln!("- {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Command::PrintConfig { config, overrides } => {
            let (loaded, _) = commands::open(Some(&config), &overrides)?;
            print!("{}", commands::print_config(&loaded));
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { config, overrides } => {
            let (loaded, registry) = commands::open(Some(&config), &overrides)?;
            let (report, ready) = commands::models(&loaded, &registry);
            print!("{report}");
            Ok(if ready { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Plugins { config } => {
            let (_, registry) = commands::open(config.as_deref(), &[])?;
            print!("{}", commands::plugins(&registry));
            Ok(if registry.failures().is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
