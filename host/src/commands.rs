//! The user's surface: `ragar stage`, `validate`, `print-config`, `plugins`.

use crate::config::{self, stage_key, Loaded, Overrides};
use crate::io::{read_lines, write_matrix};
use crate::registry::{check_device, Registry};
use ragar_core::{DType, Device, Error, Result, Stage};
use std::path::Path;

/// Load a config and the registry it asks for.
pub fn open(config: Option<&Path>, overrides: &[String]) -> Result<(Loaded, Registry)> {
    let loaded = config::load(config, &Overrides::parse(overrides)?)?;
    let registry = Registry::discover(&loaded.config.plugins, &loaded.base_dir());
    Ok((loaded, registry))
}

/// `ragar stage encoder --text-file F --out OUT`: embed one text per line.
pub fn stage_encoder(loaded: &Loaded, registry: &Registry, text_file: &Path, out: &Path) -> Result<usize> {
    registry.ensure_loaded()?;
    let texts = read_lines(text_file)?;
    let encoder = registry.encoder(loaded)?;
    let emb = encoder.embed_text(&texts)?;
    for i in emb.truncated.iter() {
        eprintln!(
            "note: {}:{} is longer than {} tokens and was truncated",
            text_file.display(),
            i + 1,
            encoder.info().max_tokens
        );
    }
    write_matrix(out, "embeddings", &emb.vectors)?;
    Ok(texts.len())
}

/// `ragar stage encoder --image-file F --out OUT`: embed one image per line
/// of F (paths relative to F's folder). Conversions (grayscale, alpha,
/// 16-bit) are reported; an unreadable image is an error naming it and its line.
pub fn stage_encoder_images(loaded: &Loaded, registry: &Registry, list: &Path, out: &Path) -> Result<usize> {
    registry.ensure_loaded()?;
    let images = read_images(list)?;
    let encoder = registry.encoder(loaded)?;
    let vectors = encoder.embed_image(&images)?;
    write_matrix(out, "embeddings", &vectors)?;
    Ok(images.len())
}

/// Decode every image listed in `list` (one path per line).
pub fn read_images(list: &Path) -> Result<Vec<ragar_core::Image>> {
    let base = list.parent().unwrap_or(Path::new("."));
    read_lines(list)?
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let path = base.join(line.trim());
            let decoded =
                ragar_core::vision::decode(&path).map_err(|e| e.context(format!("{}:{}", list.display(), i + 1)))?;
            for note in &decoded.notes {
                eprintln!("note: {note}");
            }
            Ok(decoded.image)
        })
        .collect()
}

/// `ragar stage keyword-llm --text-file F --out OUT.json`: one generation per
/// prompt line (Eq. 6), written as `[{"text", "tokens", "prompt_truncated"}]`.
pub fn stage_keyword_llm(
    loaded: &Loaded,
    registry: &Registry,
    prompts: &Path,
    opts: &ragar_core::stage::GenerateOptions,
    out: &Path,
) -> Result<usize> {
    registry.ensure_loaded()?;
    let prompts = read_lines(prompts)?;
    let llm = registry.keyword_llm(loaded)?;
    let gens = llm.generate(&prompts, opts)?;
    for (i, g) in gens.iter().enumerate() {
        if g.prompt_truncated {
            eprintln!(
                "note: prompt {} is longer than the context ({} tokens) and was cut from the front",
                i + 1,
                llm.info().context
            );
        }
    }
    let rows: Vec<serde_json::Value> = gens
        .iter()
        .map(|g| serde_json::json!({"text": g.text.as_str(), "tokens": g.tokens, "prompt_truncated": g.prompt_truncated}))
        .collect();
    crate::io::write_json(out, &rows)?;
    Ok(rows.len())
}

/// `ragar stage keyword-llm --img-states`: the [IMG] hidden states and the
/// text-related embedding of each preference prompt (Eq. 7), written as
/// safetensors `img_states` `[n, n_img, d]` and `text_embedding` `[n, d]`.
pub fn stage_preference_states(loaded: &Loaded, registry: &Registry, prompts: &Path, out: &Path) -> Result<usize> {
    registry.ensure_loaded()?;
    let prompts = read_lines(prompts)?;
    let llm = registry.keyword_llm(loaded)?;
    let states = llm.preference_states(&prompts)?;
    let (n, k, d) = (
        states.len(),
        llm.info().n_img_tokens as usize,
        llm.info().hidden_size as usize,
    );
    let img: Vec<f32> = states.iter().flat_map(|s| s.img_states.to_f32_vec()).collect();
    let txt: Vec<f32> = states.iter().flat_map(|s| s.text_embedding.to_f32_vec()).collect();
    crate::io::write_tensors(
        out,
        &[
            ("img_states", ragar_core::Tensor::from_f32(&[n, k, d], img)?),
            ("text_embedding", ragar_core::Tensor::from_f32(&[n, d], txt)?),
        ],
    )?;
    Ok(n)
}

/// `ragar stage captioner --image-file F --out OUT.json`: one caption per
/// image listed in F (Eq. 2), written as a JSON array of strings.
pub fn stage_captioner(
    loaded: &Loaded,
    registry: &Registry,
    list: &Path,
    opts: &ragar_core::stage::CaptionOptions,
    out: &Path,
) -> Result<usize> {
    registry.ensure_loaded()?;
    let images = read_images(list)?;
    let captioner = registry.captioner(loaded)?;
    let captions = captioner.caption(&images, opts)?;
    if captions.len() != images.len() {
        return Err(Error::model(format!(
            "captioner returned {} captions for {} images",
            captions.len(),
            images.len()
        )));
    }
    crate::io::write_json(out, &captions)?;
    Ok(captions.len())
}

/// What `ragar stage generator` draws.
pub struct GenerateArgs {
    /// One prompt per line.
    pub text_file: Option<std::path::PathBuf>,
    /// safetensors with `prompt_embeds` `[n, tokens, d]` (or `[tokens, d]`)
    /// and optionally `negative_embeds` (one, or one per prompt).
    pub prompt_embeds: Option<std::path::PathBuf>,
    /// Negative prompt for every text prompt.
    pub negative: Option<String>,
    /// Seed of image i is `seed + i`.
    pub seed: u64,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance: f32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// `ragar stage generator`: one PNG per prompt (or per embedding row) in
/// the `out` folder, `000000.png`, ..., plus `generations.json` saying what
/// each was made from. Returns the number of images.
pub fn stage_generator(loaded: &Loaded, registry: &Registry, args: &GenerateArgs, out: &Path) -> Result<usize> {
    use ragar_core::abi_stable::std_types::ROption;
    use ragar_core::stage::{Conditioning, GenerationRequest};
    registry.ensure_loaded()?;
    let (conds, negs, sources): (Vec<Conditioning>, Vec<Option<Conditioning>>, Vec<String>) = match (
        &args.text_file,
        &args.prompt_embeds,
    ) {
        (Some(f), None) => {
            let lines = read_lines(f)?;
            let neg = args.negative.as_ref().map(|n| Conditioning::Text(n.as_str().into()));
            (
                lines.iter().map(|l| Conditioning::Text(l.as_str().into())).collect(),
                vec![neg; lines.len()],
                lines,
            )
        }
        (None, Some(f)) => {
            if args.negative.is_some() {
                return Err(Error::invalid_input(
                    "--negative is a text prompt; with --prompt-embeds put `negative_embeds` in the file",
                ));
            }
            let (pos, neg) = crate::io::read_prompt_embeds(f)?;
            let n = pos.len();
            let sources = (0..n).map(|i| format!("{}[{i}]", f.display())).collect();
            let negs = match neg {
                None => vec![None; n],
                Some(v) if v.len() == 1 => vec![Some(Conditioning::Embeddings(v[0].clone())); n],
                Some(v) if v.len() == n => v.into_iter().map(|t| Some(Conditioning::Embeddings(t))).collect(),
                Some(v) => {
                    return Err(Error::invalid_input(format!(
                        "{}: {} negative_embeds rows for {n} prompt_embeds rows (give 1 or {n})",
                        f.display(),
                        v.len()
                    )))
                }
            };
            (pos.into_iter().map(Conditioning::Embeddings).collect(), negs, sources)
        }
        _ => return Err(Error::invalid_input(
            "`ragar stage generator` needs --text-file FILE (one prompt per line) or --prompt-embeds FILE.safetensors",
        )),
    };
    let requests: Vec<GenerationRequest> = conds
        .into_iter()
        .zip(negs)
        .enumerate()
        .map(|(i, (cond, neg))| GenerationRequest {
            cond,
            negative: neg.map_or(ROption::RNone, ROption::RSome),
            seed: args.seed + i as u64,
            steps: args.steps,
            guidance: args.guidance,
            width: args.width,
            height: args.height,
        })
        .collect();
    let generator = registry.generator(loaded)?;
    let mut manifest = Vec::with_capacity(requests.len());
    // One request at a time so that each finished image is on disk at once.
    for (i, req) in requests.iter().enumerate() {
        let t = std::time::Instant::now();
        let img = generator.generate(std::slice::from_ref(req))?.remove(0);
        let name = format!("{i:06}.png");
        crate::io::write_atomic(&out.join(&name), &ragar_core::vision::encode_png(&img)?)?;
        eprintln!("{name} ({:.1} s)", t.elapsed().as_secs_f64());
        manifest.push(serde_json::json!({
            "file": name, "from": sources[i], "seed": req.seed, "steps": req.steps,
            "guidance": req.guidance, "width": req.width, "height": req.height,
        }));
    }
    crate::io::write_json(&out.join("generations.json"), &manifest)?;
    Ok(manifest.len())
}

/// `ragar validate`: everything checkable without loading weights — plugin
/// loading, names, backends, devices, dtypes, each component's params and
/// files (its probe), and the shape facts wired between stages. Returns the
/// problems (empty = valid).
pub fn validate(loaded: &Loaded, registry: &Registry) -> Vec<String> {
    let mut problems: Vec<String> = registry.failures().iter().map(|f| format!("plugin {f}")).collect();
    let mut probes = Vec::new();
    for stage in Stage::ALL {
        let Some(c) = loaded.config.component(stage) else {
            continue;
        };
        let key = stage_key(stage);
        let before = problems.len();
        if let Err(e) = DType::parse(&c.dtype) {
            problems.push(format!("{key}.dtype: {e}"));
        }
        if let Err(e) = Device::parse(&c.device) {
            problems.push(format!("{key}.device: {e}"));
        }
        let entry = match registry.find(stage, &c.name, &c.backend) {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(format!("{key}: {e}"));
                continue;
            }
        };
        if let Err(e) = check_device(&entry.component.descriptor, &c.device) {
            problems.push(format!("{key}.device: {e}"));
        }
        if problems.len() > before {
            continue;
        }
        match loaded
            .spec(stage)
            .and_then(|spec| (entry.component.probe)(&spec).into_result())
        {
            Ok(p) => probes.push((stage, p)),
            Err(e) => problems.push(format!("{key}: {e}")),
        }
    }
    if let Some(c) = &loaded.config.image_encoder {
        match registry.find(Stage::Encoder, &c.name, &c.backend).and_then(|entry| {
            check_device(&entry.component.descriptor, &c.device)?;
            loaded
                .block_spec("image_encoder", c)
                .and_then(|spec| (entry.component.probe)(&spec).into_result())
        }) {
            // Image facts (image_dim) come from the image encoder: put it first.
            Ok(p) => probes.insert(0, (Stage::Encoder, p)),
            Err(e) => problems.push(format!("image_encoder: {e}")),
        }
    }
    if loaded.config.component_count() == 0 {
        problems
            .push("the config configures no stage (captioner, encoder, keyword_llm, mapper, generator, ranker)".into());
    }
    problems.extend(check_wiring(&probes));
    problems
}

/// Shape facts that must agree between two stages' components.
const WIRING: [(Stage, &str, Stage, &str); 6] = [
    // The keyword feature (Eq. 9) comes from the text encoder.
    (Stage::Encoder, "text_dim", Stage::Mapper, "keyword_dim"),
    // The Modal Mapper reads the LLM's [IMG] hidden states (Eq. 7-8).
    (Stage::KeywordLlm, "hidden_size", Stage::Mapper, "input_dim"),
    // The general preference conditions the generator (Eq. 9).
    (Stage::Mapper, "output_tokens", Stage::Generator, "embedding_tokens"),
    (Stage::Mapper, "output_dim", Stage::Generator, "embedding_dim"),
    // The retrieval-augmented preference fuses image features (Eq. 5, 13),
    // and the semantic target is the reference image's feature (Eq. 14).
    (Stage::Encoder, "image_dim", Stage::Mapper, "retrieval_dim"),
    (Stage::Encoder, "image_dim", Stage::Mapper, "semantic_dim"),
];

/// Compare every wired pair of facts that both components report.
pub fn check_wiring(probes: &[(Stage, ragar_core::component::Probe)]) -> Vec<String> {
    // The first probe of a stage that reports the fact (the image encoder's
    // image_dim before the text encoder's).
    let fact = |stage: Stage, name: &str| {
        probes
            .iter()
            .filter(|(s, _)| *s == stage)
            .find_map(|(_, p)| p.get(name))
    };
    WIRING
        .iter()
        .filter_map(|&(a, fa, b, fb)| match (fact(a, fa), fact(b, fb)) {
            (Some(x), Some(y)) if x != y => Some(format!(
                "wiring: {} {fa} is {x} but {} {fb} is {y}",
                stage_key(a),
                stage_key(b)
            )),
            _ => None,
        })
        .collect()
}

/// `ragar models`: for each configured component, the files it needs and
/// whether they are present (local folders and the Hugging Face cache are
/// looked at; nothing is downloaded). Returns the report and whether all
/// components are ready.
pub fn models(loaded: &Loaded, registry: &Registry) -> (String, bool) {
    let mut out = String::new();
    let mut ready = true;
    for stage in Stage::ALL {
        let Some(c) = loaded.config.component(stage) else {
            continue;
        };
        let key = stage_key(stage);
        let result = registry.find(stage, &c.name, &c.backend).and_then(|entry| {
            loaded
                .spec(stage)
                .and_then(|spec| (entry.component.probe)(&spec).into_result())
        });
        match result {
            Ok(p) => {
                out.push_str(&format!(
                    "{key}: {} ({}) ready
",
                    c.name, c.backend
                ));
                for f in p.files.iter() {
                    out.push_str(&format!(
                        "  {f}
"
                    ));
                }
            }
            Err(e) => {
                ready = false;
                out.push_str(&format!(
                    "{key}: {} ({}) NOT ready: {e}
",
                    c.name, c.backend
                ));
            }
        }
    }
    (out, ready)
}

/// `ragar print-config`: the resolved config, one `key = value  # source` per line.
pub fn print_config(loaded: &Loaded) -> String {
    let rows = loaded.provenance();
    let width = rows
        .iter()
        .map(|(k, v, _)| k.len() + v.to_string().len() + 3)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v, src) in rows {
        let kv = format!("{k} = {v}");
        out.push_str(&format!("{kv:<width$}  # {src}\n"));
    }
    out.push_str(&format!("# cache_dir (resolved) = {}\n", loaded.cache_dir().display()));
    out
}

/// `ragar plugins`: every component, then every load failure.
pub fn plugins(registry: &Registry) -> String {
    let mut rows = vec![[
        "STAGE".to_string(),
        "NAME".into(),
        "BACKEND".into(),
        "VERSION".into(),
        "DEVICES".into(),
        "ORIGIN".into(),
    ]];
    for e in registry.entries() {
        let d = &e.component.descriptor;
        let devs: Vec<&str> = d.devices.iter().map(|s| s.as_str()).collect();
        rows.push([
            d.stage.to_string(),
            d.name.to_string(),
            d.backend.to_string(),
            d.version.to_string(),
            devs.join(","),
            e.origin.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for f in registry.failures() {
        out.push_str(&format!("failed to load {f}\n"));
    }
    out
}

/// An error for a stage the `stage` command does not drive yet.
pub fn stage_not_available(stage: Stage) -> Error {
    Error::unsupported(format!(
        "`ragar stage {stage}` is not available yet: this version drives the encoder and keyword-llm stages"
    ))
}

/// Open the dataset and cache a method command needs.
pub(crate) fn method_inputs(loaded: &Loaded) -> Result<(crate::dataset::Dataset, crate::cache::Cache)> {
    let dc = loaded
        .config
        .dataset
        .as_ref()
        .ok_or_else(|| Error::config("the config has no `dataset` block (see host/src/dataset for the formats)"))?;
    let cache_dir = loaded.config.cache_dir.clone().unwrap_or_else(crate::paths::cache_dir);
    let data = crate::dataset::Dataset::load(dc, &loaded.base_dir(), &cache_dir)?;
    let store = match &loaded.config.stage_cache {
        // `${RAGAR_CACHE}` as in every other path of a config.
        Some(p) => loaded.base_dir().join(
            p.to_string_lossy()
                .replace("${RAGAR_CACHE}", &cache_dir.to_string_lossy()),
        ),
        None => cache_dir.join("stage-outputs.redb"),
    };
    let cache = crate::cache::Cache::open(&store)?;
    Ok((data, cache))
}

/// What `ragar train-ranker` reports.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RankerReport {
    /// The ranker's own figures (validation Recall@10 / NDCG@10, epochs).
    pub fit: Vec<(String, f64)>,
    /// Held-out test figures, with the popularity and random rankers.
    pub test: crate::ranking::Evaluation,
    /// Users and interactions in each part of the split.
    pub counts: serde_json::Value,
    /// What loading the dataset noted.
    pub notes: Vec<String>,
    /// Table 4: the generated images that replaced reference images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<crate::ranking::Replacement>,
}

/// `ragar train-ranker`: fit the configured ranker on the dataset's
/// interactions with Encoder features (hold-out: see `ranking`), save it to
/// `out`, evaluate it on the held-out items against the popularity and
/// random rankers, and write the report next to `out` (`<out>.eval.json`).
/// With `generated`, a run folder's images replace the reference items'
/// own images first (Table 4; `ranking::generated_visuals`).
pub fn train_ranker(
    loaded: &Loaded,
    registry: &Registry,
    out: &Path,
    generated: Option<&Path>,
) -> Result<RankerReport> {
    use crate::pipeline::{build_stages, Pipeline};
    let (data, cache) = method_inputs(loaded)?;
    let holdout = loaded
        .config
        .dataset
        .as_ref()
        .expect("checked by method_inputs")
        .holdout
        .clone();
    for n in &data.notes {
        eprintln!("note: {n}");
    }
    let method = loaded.config.method.clone();
    let seed = method.generation.seed;
    let stages = build_stages(loaded, registry, &[Stage::Encoder, Stage::Ranker], &method)?;
    let mut p = Pipeline {
        timings: Default::default(),
        method,
        data: &data,
        cache: &cache,
        stages,
    };
    let mut replaced = generated
        .map(|run| crate::ranking::generated_visuals(&p, run))
        .transpose()?;
    let split = crate::ranking::ranker_split(&p, &holdout, seed, &replaced.clone().unwrap_or_default())?;
    if let Some(r) = replaced.as_mut() {
        r.changed = split.replaced;
    }
    let ranker = p.stages.ranker.as_mut().expect("built above");
    let fit = ranker.fit(&split.data)?;
    ranker.save(&out.to_string_lossy())?;
    let test = crate::ranking::evaluate(ranker, &split, 10, seed)?;
    let n = |h: &[ragar_core::stage::UserHistory]| h.iter().map(|h| h.items.len()).sum::<usize>();
    let report = RankerReport {
        fit: fit.metrics.iter().map(|t| (t.0.to_string(), t.1)).collect(),
        test,
        counts: serde_json::json!({
            "items": split.data.items.len(),
            "train": {"users": split.data.train.len(), "interactions": n(&split.data.train)},
            "valid": {"users": split.data.valid.len(), "interactions": n(&split.data.valid)},
            "test": {"users": split.test.len(), "interactions": n(&split.test)},
        }),
        notes: data.notes.clone(),
        replaced,
    };
    let mut eval_path = out.as_os_str().to_owned();
    eval_path.push(".eval.json");
    crate::io::write_json(Path::new(&eval_path), &report)?;
    Ok(report)
}

/// `ragar table4`: the paper's Table 4 — the ranker trained with the
/// original images (ORI) and, for each run, with that run's generated
/// images in place of the reference images; held-out Recall@10 / NDCG@10
/// of each on the same split. Writes `<label>.safetensors` (+ `.eval.json`)
/// per row, `table4.json` and `table4.md` into `out`; a row whose
/// `.eval.json` exists is read, not retrained (`ori` may name an existing
/// ORI report, e.g. `ragar demo`'s). Returns the markdown table.
pub fn table4(
    loaded: &Loaded,
    registry: &Registry,
    runs: &[std::path::PathBuf],
    ori: Option<&Path>,
    out: &Path,
) -> Result<String> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut rows: Vec<(String, Option<std::path::PathBuf>)> = vec![("ORI".into(), None)];
    for r in runs {
        let label = r
            .canonicalize()
            .map_err(|e| Error::io(r, e))?
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy().to_string());
        if rows.iter().any(|(l, _)| *l == label) {
            return Err(Error::config(format!(
                "two runs are named '{label}': rows need distinct folder names"
            )));
        }
        rows.push((label, Some(r.clone())));
    }
    let mut table = Vec::new();
    for (label, run) in &rows {
        let state = out.join(format!("{label}.safetensors"));
        let eval = match (run, ori) {
            (None, Some(o)) => o.to_path_buf(),
            _ => out.join(format!("{label}.safetensors.eval.json")),
        };
        let report: RankerReport = if eval.is_file() {
            let text = std::fs::read_to_string(&eval).map_err(|e| Error::io(&eval, e))?;
            serde_json::from_str(&text).map_err(|e| Error::invalid_input(format!("{}: {e}", eval.display())))?
        } else {
            eprintln!("Table 4: training the ranker for {label}");
            train_ranker(loaded, registry, &state, run.as_deref())?
        };
        table.push((label.clone(), report));
    }
    let dataset = loaded.config.dataset.as_ref().map_or("-", |d| d.format.name());
    let k = table[0].1.test.k;
    let mut md = format!("| Methods | {dataset} R@{k} | {dataset} N@{k} |\n|---|---:|---:|\n");
    for (label, r) in &table {
        md += &format!(
            "| {label} | {:.4} | {:.4} |\n",
            r.test.ranker.recall, r.test.ranker.ndcg
        );
    }
    let ori_fig = &table[0].1.test.ranker;
    md += &format!(
        "\nHeld-out test users: {}. Each row trains the config's ranker on the same split and seed; only the visual \
         features of the reference items differ (a run's generated images, averaged per item, in place of the item's own \
         image). ORI: the original images. Change against ORI:",
        ori_fig.users
    );
    for (label, r) in &table[1..] {
        let rel = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:+.1} %", 100.0 * (a - b) / b)
            } else {
                "n/a".into()
            }
        };
        md += &format!(
            " {label} R {} / N {};",
            rel(r.test.ranker.recall, ori_fig.recall),
            rel(r.test.ranker.ndcg, ori_fig.ndcg)
        );
    }
    md = md.trim_end_matches([';', ':']).to_string() + ".\n";
    let json: Vec<serde_json::Value> = table
        .iter()
        .map(|(l, r)| serde_json::json!({"method": l, "test": r.test, "replaced": r.replaced}))
        .collect();
    crate::io::write_json(&out.join("table4.json"), &json)?;
    crate::io::write_atomic(&out.join("table4.md"), md.as_bytes())?;
    Ok(md)
}

/// `ragar report`: the HTML page over run folders.
pub fn report(loaded: &Loaded, runs: &[std::path::PathBuf], users: usize, out: &Path) -> Result<usize> {
    let (data, _cache) = method_inputs(loaded)?;
    let runs = runs
        .iter()
        .map(|r| crate::report::Run::open(r))
        .collect::<Result<Vec<_>>>()?;
    crate::report::write(&data, &runs, users, out)
}

/// Options of `ragar train` and `ragar run`.
pub struct MethodArgs {
    /// Output folder (default runs/<config>/<time>).
    pub out: Option<std::path::PathBuf>,
    /// Continue an interrupted run in `out`.
    pub resume: bool,
    /// At most this many users.
    pub limit: Option<usize>,
    /// Users of this split (run).
    pub split: crate::dataset::Split,
}

/// `ragar train`: reflection training of the Mapper (Eq. 10-15) over the
/// training users; a JSONL line per sample, checkpoints written atomically.
/// Returns the run folder.
pub fn train(loaded: &Loaded, registry: &Registry, args: &MethodArgs) -> Result<std::path::PathBuf> {
    use crate::pipeline::{append_line, build_stages, done, run_dir, sample_seed, users, Pipeline, SampleLine};
    let (data, cache) = method_inputs(loaded)?;
    let dir = run_dir(loaded, args.out.as_deref());
    let log = dir.join("train.jsonl");
    let ckpt = dir.join("mapper.safetensors");
    if !args.resume && log.exists() {
        return Err(Error::config(format!(
            "{} exists: pass --resume to continue it, or another --out",
            log.display()
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    crate::io::write_atomic(&dir.join("config.yaml"), print_config(loaded).as_bytes())?;
    let method = loaded.config.method.clone();
    let need = [
        Stage::Captioner,
        Stage::Encoder,
        Stage::KeywordLlm,
        Stage::Mapper,
        Stage::Generator,
        Stage::Ranker,
    ];
    let stages = build_stages(loaded, registry, &need, &method)?;
    let mut p = Pipeline {
        timings: Default::default(),
        method: method.clone(),
        data: &data,
        cache: &cache,
        stages,
    };
    let finished = if args.resume { done(&log)? } else { Default::default() };
    if args.resume && ckpt.exists() {
        p.stages.mapper.as_mut().expect("built").load(&ckpt.to_string_lossy())?;
    }
    let todo = users(&data, crate::dataset::Split::Train, args.limit);
    let total = todo.len() * method.train.epochs;
    let mut pending: Vec<crate::pipeline::SampleLine> = Vec::new();
    let mut since_ckpt = 0;
    let mut n = 0;
    let bar = progress(total, "training");
    for epoch in 0..method.train.epochs {
        for user in &todo {
            n += 1;
            bar.set_message(format!("epoch {epoch} user {}", user.user));
            bar.inc(1);
            if finished.contains(&(user.user.clone(), epoch)) {
                continue;
            }
            let t = std::time::Instant::now();
            let seed = sample_seed(method.generation.seed, epoch, &user.user);
            let line = match p.train_step(user, seed) {
                Ok((stats, verdict, prepared)) => {
                    bar.suspend(|| {
                        say_notes(&user.user, &prepared);
                        eprintln!(
                            "[{n}/{total}] epoch {epoch} user {}: loss {:.4} (rank {:.4}, calibrator {:.4}, semantic {:.4}), mean reward {:.3}, {:.1} s",
                            user.user, stats.loss, stats.rank_loss, stats.calibrator_loss, stats.semantic_loss, verdict.mean_reward,
                            t.elapsed().as_secs_f64()
                        )
                    });
                    SampleLine {
                        user: user.user.clone(),
                        epoch,
                        image: None,
                        prepared,
                        verdict: Some(verdict),
                        stats: Some(
                            serde_json::json!({"step": stats.step, "loss": stats.loss, "rank_loss": stats.rank_loss,
                            "calibrator_loss": stats.calibrator_loss, "semantic_loss": stats.semantic_loss, "grad_norm": stats.grad_norm}),
                        ),
                        error: None,
                        seconds: t.elapsed().as_secs_f64(),
                    }
                }
                Err(e) => {
                    bar.suspend(|| eprintln!("[{n}/{total}] epoch {epoch} user {}: FAILED: {e}", user.user));
                    failed_line(&user.user, epoch, &e, t)
                }
            };
            // The checkpoint first, then the log line: a line is only ever
            // logged for a step the checkpoint already holds.
            since_ckpt += 1;
            let ok = line.error.is_none();
            if ok && since_ckpt >= method.train.checkpoint_every.max(1) {
                p.stages.mapper.as_ref().expect("built").save(&ckpt.to_string_lossy())?;
                since_ckpt = 0;
                append_line(&log, &line)?;
            } else if !ok {
                append_line(&log, &line)?;
            } else {
                pending.push(line);
            }
            if since_ckpt == 0 {
                for l in pending.drain(..) {
                    append_line(&log, &l)?;
                }
            }
        }
    }
    bar.finish_and_clear();
    p.stages.mapper.as_ref().expect("built").save(&ckpt.to_string_lossy())?;
    for l in pending.drain(..) {
        append_line(&log, &l)?;
    }
    finish_timing(&dir, &p.timings)?;
    Ok(dir)
}

fn failed_line(user: &str, epoch: usize, e: &Error, t: std::time::Instant) -> crate::pipeline::SampleLine {
    crate::pipeline::SampleLine {
        user: user.to_string(),
        epoch,
        image: None,
        prepared: crate::pipeline::Prepared {
            reference: String::new(),
            retrieved: ragar_core::retrieval::Retrieved {
                indices: vec![],
                similarities: vec![],
                weights: vec![],
            },
            retrieved_items: vec![],
            keywords: vec![],
            skipped: vec![],
            notes: vec![],
            prompt: String::new(),
            retrieval_preference: vec![],
            reference_visual: vec![],
            input: None,
        },
        verdict: None,
        stats: None,
        error: Some(e.to_string()),
        seconds: t.elapsed().as_secs_f64(),
    }
}

/// `ragar run`: a personalised image for each user of a split, PNGs in
/// `images/`, one JSONL line per user (retrieved items and weights,
/// keywords, prompt); failures are recorded and the run goes on; `--resume`
/// skips finished users. Returns the run folder and the number of failures.
pub fn run(loaded: &Loaded, registry: &Registry, args: &MethodArgs) -> Result<(std::path::PathBuf, usize)> {
    use crate::pipeline::{append_line, build_stages, done, run_dir, sample_seed, users, Pipeline, SampleLine};
    let (data, cache) = method_inputs(loaded)?;
    let dir = run_dir(loaded, args.out.as_deref());
    let log = dir.join("samples.jsonl");
    if !args.resume && log.exists() {
        return Err(Error::config(format!(
            "{} exists: pass --resume to continue it, or another --out",
            log.display()
        )));
    }
    std::fs::create_dir_all(dir.join("images")).map_err(|e| Error::io(&dir, e))?;
    crate::io::write_atomic(&dir.join("config.yaml"), print_config(loaded).as_bytes())?;
    let method = loaded.config.method.clone();
    let need = [
        Stage::Captioner,
        Stage::Encoder,
        Stage::KeywordLlm,
        Stage::Mapper,
        Stage::Generator,
    ];
    let stages = build_stages(loaded, registry, &need, &method)?;
    let p = Pipeline {
        timings: Default::default(),
        method: method.clone(),
        data: &data,
        cache: &cache,
        stages,
    };
    let finished = if args.resume { done(&log)? } else { Default::default() };
    let todo = users(&data, args.split, args.limit);
    let mut failures = 0;
    let bar = progress(todo.len(), "generating");
    for (n, user) in todo.iter().enumerate() {
        bar.set_message(format!("user {}", user.user));
        bar.inc(1);
        if finished.contains(&(user.user.clone(), 0)) {
            continue;
        }
        let t = std::time::Instant::now();
        let seed = sample_seed(method.generation.seed, 0, &user.user);
        let line = match p.personalise(user, seed) {
            Ok((img, prepared)) => {
                let name = format!("images/{}.png", crate::pipeline::file_safe(&user.user));
                crate::io::write_atomic(&dir.join(&name), &ragar_core::vision::encode_png(&img)?)?;
                bar.suspend(|| {
                    say_notes(&user.user, &prepared);
                    eprintln!(
                        "[{}/{}] user {} -> {name} ({:.1} s)",
                        n + 1,
                        todo.len(),
                        user.user,
                        t.elapsed().as_secs_f64()
                    )
                });
                SampleLine {
                    user: user.user.clone(),
                    epoch: 0,
                    image: Some(name),
                    prepared,
                    verdict: None,
                    stats: None,
                    error: None,
                    seconds: t.elapsed().as_secs_f64(),
                }
            }
            Err(e) => {
                failures += 1;
                bar.suspend(|| eprintln!("[{}/{}] user {}: FAILED: {e}", n + 1, todo.len(), user.user));
                failed_line(&user.user, 0, &e, t)
            }
        };
        append_line(&log, &line)?;
    }
    bar.finish_and_clear();
    finish_timing(&dir, &p.timings)?;
    Ok((dir, failures))
}

/// A progress bar on stderr (hidden when stderr is not a terminal, e.g. in
/// logs and tests, where the per-sample lines carry the progress).
fn progress(total: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} (eta {{eta}})"))
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Print the per-stage timing and keep it in the run folder.
fn finish_timing(dir: &Path, t: &crate::pipeline::Timings) -> Result<()> {
    eprint!("{}", t.table());
    crate::io::write_json(&dir.join("timing.json"), &t.json())
}

fn say_notes(user: &str, p: &crate::pipeline::Prepared) {
    for (id, why) in &p.skipped {
        eprintln!("note: user {user}: skipped history item '{id}': {why}");
    }
    for n in &p.notes {
        eprintln!("note: user {user}: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragar_core::component::Probe;

    #[test]
    fn wiring_reports_mismatched_dimensions_only() {
        let enc = Probe::default().fact("text_dim", 384);
        let mapper = Probe::default().fact("keyword_dim", 512).fact("input_dim", 576);
        let llm = Probe::default().fact("hidden_size", 576);
        let problems = check_wiring(&[(Stage::Encoder, enc), (Stage::Mapper, mapper), (Stage::KeywordLlm, llm)]);
        assert_eq!(
            problems,
            vec!["wiring: encoder text_dim is 384 but mapper keyword_dim is 512".to_string()]
        );
        assert!(check_wiring(&[(Stage::Encoder, Probe::default().fact("text_dim", 384))]).is_empty());
    }
}
