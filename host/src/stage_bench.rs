//! `ragar stage-bench`: one stage's throughput and latency as configured
//! (component, backend, device, dtype), the unit of the backends matrix
//! (`configs/bench/backends.yaml`, run by `ragar bench`).
//!
//! A call is what the pipeline makes: `batch` texts or images to the
//! Encoder, `batch` generation requests to the Generator, `batch` images to
//! the Captioner (greedy, at most `tokens` new tokens), `batch` keyword
//! prompts to the KeywordLLM (greedy, chat template, at most `tokens` new
//! tokens each). `warmup` calls
//! are made first and not counted (first-call costs: graph optimisation,
//! allocator growth, CUDA context); then `iters` calls are timed one by
//! one. Reported: per-call latency percentiles (NumPy's linear method) and
//! items per second over the timed calls; the parent `ragar bench` adds
//! the process's peak memory. Inputs are fixed and made here: product
//! titles by a fixed rule, images as seeded noise over a colour gradient
//! (decoding is not the stage's cost), prompts of the same titles. `scripts/bench_reference.py`
//! times the PyTorch reference on the same inputs and writes the same file.

use crate::config::Loaded;
use crate::registry::Registry;
use ragar_core::metrics::latency::Latency;
use ragar_core::{Error, Image, Result};
use serde::{Deserialize, Serialize};

/// Which stage call is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchStage {
    /// `Encoder::embed_text`.
    EncoderText,
    /// `Encoder::embed_image`.
    EncoderImage,
    /// `Generator::generate`.
    Generator,
    /// `Captioner::caption` (greedy, `tokens` new tokens at most).
    Captioner,
    /// `KeywordLlm::generate` (greedy, `tokens` new tokens at most).
    KeywordLlm,
}

/// The stage names `bench.stage` takes.
pub const STAGES: &str = "encoder-text, encoder-image, generator, captioner, keyword-llm";

impl BenchStage {
    /// Parse one of [`STAGES`].
    pub fn parse(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.into()))
            .map_err(|_| Error::config(format!("unknown bench stage '{s}' ({STAGES})")))
    }

    /// The stage contract the call belongs to.
    pub fn contract(self) -> ragar_core::Stage {
        match self {
            BenchStage::Generator => ragar_core::Stage::Generator,
            BenchStage::Captioner => ragar_core::Stage::Captioner,
            BenchStage::KeywordLlm => ragar_core::Stage::KeywordLlm,
            _ => ragar_core::Stage::Encoder,
        }
    }

    fn name(self) -> &'static str {
        match self {
            BenchStage::EncoderText => "encoder-text",
            BenchStage::EncoderImage => "encoder-image",
            BenchStage::Generator => "generator",
            BenchStage::Captioner => "captioner",
            BenchStage::KeywordLlm => "keyword-llm",
        }
    }
}

/// What to time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageBenchArgs {
    /// The call.
    pub stage: BenchStage,
    /// Inputs per call.
    pub batch: usize,
    /// Timed calls (at the least).
    pub iters: usize,
    /// Seconds of timed calls (at the least): calls go on past `iters`
    /// until their total reaches this, so a stage taking 0.1 ms gets
    /// thousands of samples and one scheduler hiccup does not move its mean.
    #[serde(default)]
    pub min_time: f64,
    /// Untimed calls first.
    pub warmup: usize,
    /// Generator: denoising steps.
    pub steps: u32,
    /// Generator: image side in pixels; encoder-image, captioner: input image side.
    pub size: u32,
    /// Captioner, keyword LLM: most new tokens per caption / answer.
    #[serde(default = "twenty")]
    pub tokens: u32,
}

fn twenty() -> u32 {
    20
}

/// What `ragar stage-bench` writes (and `scripts/bench_reference.py`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageBenchResult {
    /// `ragar` or `pytorch`.
    pub runner: String,
    /// The timed call.
    pub stage: BenchStage,
    /// Component name (`clip`, `minilm`, `stable-diffusion`).
    pub component: String,
    /// The weights: the name of the component's `model_dir` folder
    /// (`clip-tiny-e2e`, `clip-vit-b32-random`), empty for a component
    /// without one. Two rows compare only on the same weights.
    #[serde(default)]
    pub model: String,
    /// Backend (`candle`, `ort`, `tch`; the reference: `pytorch`).
    pub backend: String,
    /// Device as configured.
    pub device: String,
    /// Dtype as configured.
    pub dtype: String,
    /// The arguments.
    pub args: StageBenchArgs,
    /// Per-call seconds over the timed calls.
    pub latency: Latency,
    /// Inputs per second over the timed calls.
    pub items_per_s: f64,
    /// Threads the process could use.
    pub threads: usize,
}

/// `n` product titles, the same for every runner (seeded).
pub fn texts(n: usize) -> Vec<String> {
    const ADJ: [&str; 8] = [
        "oversized",
        "embroidered",
        "relaxed",
        "slim",
        "vintage",
        "pleated",
        "cropped",
        "quilted",
    ];
    const COLOUR: [&str; 8] = [
        "navy", "burgundy", "beige", "olive", "ivory", "charcoal", "coral", "mustard",
    ];
    const STUFF: [&str; 6] = ["silk", "suede", "cashmere", "denim", "linen", "wool"];
    const ITEM: [&str; 8] = [
        "sandals", "shorts", "hoodie", "blazer", "dress", "sneakers", "scarf", "cardigan",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{} {} {} {}, size {}",
                ADJ[i % 8],
                COLOUR[(i / 8) % 8],
                STUFF[(i / 64) % 6],
                ITEM[(i * 7 + 3) % 8],
                ["XS", "S", "M", "L", "XL"][i % 5]
            )
        })
        .collect()
}

/// `n` keyword prompts (Eq. 6's kind) over the same titles.
pub fn keyword_prompts(n: usize) -> Vec<String> {
    texts(n)
        .into_iter()
        .map(|t| format!("Give three comma-separated keywords for this item: {t}"))
        .collect()
}

/// `n` images of `size` x `size`: a colour gradient with seeded noise.
pub fn images(n: usize, size: u32) -> Result<Vec<Image>> {
    let mut g = ragar_core::rng::TorchGenerator::new(7);
    (0..n)
        .map(|k| {
            let s = size as usize;
            let noise = g.randn(s * s)?;
            let rgb = (0..s * s)
                .flat_map(|p| {
                    let (x, y) = ((p % s) as f32 / s as f32, (p / s) as f32 / s as f32);
                    let z = noise[p] * 20.0;
                    [x * 255.0 + z, y * 255.0 - z, ((k * 37) % 256) as f32 + z]
                })
                .map(|v| v.clamp(0.0, 255.0) as u8)
                .collect();
            Image::new(size, size, rgb)
        })
        .collect()
}

fn time(args: &StageBenchArgs, mut call: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..args.warmup {
        call()?;
    }
    let mut seconds = Vec::with_capacity(args.iters);
    let mut total = 0.0;
    while seconds.len() < args.iters || total < args.min_time {
        let t = std::time::Instant::now();
        call()?;
        let s = t.elapsed().as_secs_f64();
        total += s;
        seconds.push(s);
    }
    Ok(seconds)
}

/// `min_time` is a number of seconds, finite and not negative (the matrix's
/// settings and the CLI both check it here).
pub(crate) fn valid_min_time(seconds: f64) -> bool {
    seconds.is_finite() && seconds >= 0.0
}

/// Time the configured stage.
pub fn run(loaded: &Loaded, registry: &Registry, args: &StageBenchArgs) -> Result<StageBenchResult> {
    use ragar_core::stage::{Conditioning, GenerationRequest};
    registry.ensure_loaded()?;
    if args.batch == 0 || args.iters == 0 {
        return Err(Error::config("stage-bench: batch and iters must be at least 1"));
    }
    if !valid_min_time(args.min_time) {
        return Err(Error::config(format!(
            "stage-bench: min_time {} is not a number of seconds >= 0",
            args.min_time
        )));
    }
    let stage = args.stage.contract();
    let block = loaded
        .config
        .component(stage)
        .ok_or_else(|| Error::config(format!("the config has no `{}` block", crate::config::stage_key(stage))))?
        .clone();
    let seconds = match args.stage {
        BenchStage::EncoderText => {
            let enc = registry.encoder(loaded)?;
            let t = texts(args.batch);
            time(args, || enc.embed_text(&t).map(|_| ()))?
        }
        BenchStage::EncoderImage => {
            let enc = registry.encoder(loaded)?;
            let im = images(args.batch, args.size)?;
            time(args, || enc.embed_image(&im).map(|_| ()))?
        }
        BenchStage::Captioner => {
            let cap = registry.captioner(loaded)?;
            let im = images(args.batch, args.size)?;
            let opts = ragar_core::stage::CaptionOptions {
                max_tokens: args.tokens,
                beams: 1,
                prompt: Default::default(),
            };
            time(args, || cap.caption(&im, &opts).map(|_| ()))?
        }
        BenchStage::KeywordLlm => {
            let llm = registry.keyword_llm(loaded)?;
            let prompts = keyword_prompts(args.batch);
            let opts = ragar_core::stage::GenerateOptions {
                max_tokens: args.tokens,
                ..Default::default()
            };
            time(args, || llm.generate(&prompts, &opts).map(|_| ()))?
        }
        BenchStage::Generator => {
            let gen = registry.generator(loaded)?;
            let reqs: Vec<GenerationRequest> = texts(args.batch)
                .into_iter()
                .enumerate()
                .map(|(i, t)| GenerationRequest {
                    cond: Conditioning::Text(t.as_str().into()),
                    negative: ragar_core::abi_stable::std_types::ROption::RNone,
                    seed: i as u64,
                    steps: args.steps,
                    guidance: 7.5,
                    width: args.size,
                    height: args.size,
                })
                .collect();
            time(args, || gen.generate(&reqs).map(|_| ()))?
        }
    };
    let latency = Latency::of(&seconds).ok_or_else(|| Error::model("stage-bench: no valid timing"))?;
    Ok(StageBenchResult {
        runner: "ragar".into(),
        stage: args.stage,
        component: block.name.clone(),
        model: model_name(&block.params),
        backend: block.backend.clone(),
        device: block.device.clone(),
        dtype: block.dtype.clone(),
        items_per_s: latency.per_second * args.batch as f64,
        latency,
        args: args.clone(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// The weights' name for a table row: the last part of `params.model_dir`
/// (scripts/bench_reference.py names the PyTorch row the same way).
pub fn model_name(params: &serde_json::Map<String, serde_json::Value>) -> String {
    params
        .get("model_dir")
        .and_then(|v| v.as_str())
        .and_then(|d| std::path::Path::new(d.trim_end_matches('/')).file_name())
        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
}

impl StageBenchResult {
    /// A row label: `stage component[:model] backend device dtype batch`.
    pub fn label(&self) -> String {
        let model = if self.model.is_empty() {
            String::new()
        } else {
            format!(":{}", self.model)
        };
        format!(
            "{} {}{model} {} {} {} b{}",
            self.stage.name(),
            self.component,
            self.backend,
            self.device,
            self.dtype,
            self.args.batch
        )
    }
}
