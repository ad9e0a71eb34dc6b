//! `ragar evaluate`: the paper's Table 1 metrics for a run folder.
//!
//! For every generated image of `samples.jsonl`, against the reference item
//! (semantic alignment) and against the user's preference (personalization):
//!
//! | group | metric | definition |
//! |---|---|---|
//! | personalization | CPS | 100 cos(image feature of g, text feature of the preference text): the kept keywords joined by ", ", or, when none were kept, the history items' texts joined by ", " (`evaluation.cps: keywords`, default); or the mean over history items of 100 cos(g, text feature of the item's text) (`evaluation.cps: history`) |
//! | personalization | CPIS | mean over history images h of 100 cos(g, h) (image features) |
//! | personalization | LPIPS | mean over history images of LPIPS(g, h) |
//! | personalization | SSIM | mean over history images of SSIM(g, h) |
//! | personalization | ΔR | (r_o - r_g) / log2(1 + r_o): ranks of the reference item and of g in its place |
//! | semantic | CS | 100 cos(g, text feature of the reference item's text) |
//! | semantic | CIS | 100 cos(g, reference image) (image features) |
//! | semantic | LPIPS | LPIPS(g, reference image) |
//! | semantic | SSIM | SSIM(g, reference image) |
//!
//! Features come from the config's Encoder (the paper's CLIP; to score
//! with another, override `encoder.*`, and give a ranker trained on it).
//! LPIPS and SSIM compare g with item images padded to a white square and
//! resized (PIL's LANCZOS) to g's size. Ranks: the config's Ranker scores
//! every catalogue item outside the user's history; r_o is the reference's
//! rank, r_g the rank of g's score among the same candidates with the
//! reference's taken out (1 = first). LPIPS needs `evaluation.lpips`
//! weights, ΔR a trained ranker; a metric that cannot be computed is left
//! out and the reason noted, never guessed.

use crate::config::Loaded;
use crate::pipeline::{Pipeline, SampleLine};
use crate::registry::Registry;
use ragar_core::abi_stable::std_types::{RNone, RSome};
use ragar_core::metrics::{scores, ssim::ssim};
use ragar_core::stage::{Candidate, RankQuery, UserHistory};
use ragar_core::{Error, Image, Result, Stage, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `evaluation:` block.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    /// LPIPS weights; LPIPS is skipped without them.
    #[serde(default)]
    pub lpips: Option<LpipsConfig>,
    /// The text CPS compares with.
    #[serde(default)]
    pub cps: CpsText,
}

/// What "the text description representing user preferences" of CPS is.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpsText {
    /// One text: the kept keywords joined by ", " (the history texts joined
    /// when no keyword was kept).
    #[default]
    Keywords,
    /// Each history item's text: the mean of the scores against them
    /// (Pigeon's evaluation).
    History,
}

/// Where LPIPS's weights are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LpipsConfig {
    /// `alex` or `vgg`.
    pub net: String,
    /// The torchvision backbone (`features.{i}.*`) as safetensors.
    pub backbone: PathBuf,
    /// The lpips package's linear heads (`lin{k}.model.1.weight`) as safetensors.
    pub heads: PathBuf,
}

/// Metrics of one sample (absent = not computable; see the run's notes).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SampleMetrics {
    /// User id.
    pub user: String,
    /// Generated image, relative to the run folder.
    pub image: Option<String>,
    /// Metric name -> value.
    pub metrics: BTreeMap<String, f64>,
    /// Why the sample could not be evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The run's figures: means over the samples that have each metric.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Metric -> mean.
    pub means: BTreeMap<String, f64>,
    /// Metric -> samples that had it.
    pub counts: BTreeMap<String, usize>,
    /// Samples evaluated / failed.
    pub samples: usize,
    /// Samples that could not be evaluated.
    pub failed: usize,
    /// Metrics left out, and why.
    pub notes: Vec<String>,
}

/// Table 1's columns: (group, key in `metrics`, header).
pub const COLUMNS: [(&str, &str, &str); 9] = [
    ("Personalization", "cps", "CPS↑"),
    ("Personalization", "cpis", "CPIS↑"),
    ("Personalization", "lpips_personal", "LPIPS↓"),
    ("Personalization", "ssim_personal", "SSIM↑"),
    ("Personalization", "rank_change", "ΔR↑"),
    ("Semantic alignment", "cs", "CS↑"),
    ("Semantic alignment", "cis", "CIS↑"),
    ("Semantic alignment", "lpips_reference", "LPIPS↓"),
    ("Semantic alignment", "ssim_reference", "SSIM↑"),
];

/// Table 1 as markdown: one row per `(dataset, method, summary)`.
pub fn table(rows: &[(String, String, &Summary)]) -> String {
    let mut s = String::from("| dataset | method |");
    for (_, _, h) in COLUMNS {
        s += &format!(" {h} |");
    }
    s += "\n|---|---|";
    s += &"---:|".repeat(COLUMNS.len());
    s += "\n| | |";
    for (g, _, _) in COLUMNS {
        s += &format!(" {} |", if g == "Personalization" { "pers." } else { "sem." });
    }
    s += "\n";
    for (dataset, method, sum) in rows {
        s += &format!("| {dataset} | {method} |");
        for (_, k, _) in COLUMNS {
            match sum.means.get(k) {
                Some(v) => s += &format!(" {v:.4} |"),
                None => s += " n/a |",
            }
        }
        s += "\n";
    }
    s
}

#[cfg(feature = "candle")]
type Lpips = ragar_candle::lpips::Lpips;

#[cfg(feature = "candle")]
fn load_lpips(cfg: &LpipsConfig, loaded: &Loaded) -> Result<Lpips> {
    let net = match cfg.net.as_str() {
        "alex" => ragar_candle::lpips::Net::Alex,
        "vgg" => ragar_candle::lpips::Net::Vgg,
        other => return Err(Error::config(format!("evaluation.lpips.net: '{other}' (alex or vgg)"))),
    };
    let base = loaded.base_dir();
    let cache = loaded.cache_dir().to_string_lossy().to_string();
    let path = |p: &Path| base.join(p.to_string_lossy().replace("${RAGAR_CACHE}", &cache));
    Lpips::load_cpu(net, &path(&cfg.backbone), &path(&cfg.heads))
}

#[cfg(not(feature = "candle"))]
struct Lpips;

#[cfg(not(feature = "candle"))]
impl Lpips {
    fn distance(&self, _: &Image, _: &Image) -> Result<f32> {
        unreachable!("never built without the candle feature")
    }
}

#[cfg(not(feature = "candle"))]
fn load_lpips(_: &LpipsConfig, _: &Loaded) -> Result<Lpips> {
    Err(Error::unsupported(
        "LPIPS runs on the candle backend; this ragar was built without it",
    ))
}

/// Evaluate `run_dir`; writes `metrics.jsonl`, `metrics.json` and `metrics.md` there.
pub fn evaluate(loaded: &Loaded, registry: &Registry, run_dir: &Path) -> Result<Summary> {
    let log = run_dir.join("samples.jsonl");
    let samples: Vec<SampleLine> = crate::io::read_jsonl(&log)?;
    let (data, cache) = crate::commands::method_inputs(loaded)?;
    let method = loaded.config.method.clone();
    let mut notes = Vec::new();
    let with_ranker = loaded.config.component(Stage::Ranker).is_some();
    let encoder_only = || crate::pipeline::build_stages(loaded, registry, &[Stage::Encoder], &method);
    let stages = if with_ranker {
        match crate::pipeline::build_stages(loaded, registry, &[Stage::Encoder, Stage::Ranker], &method) {
            Ok(s) => s,
            Err(e) => {
                notes.push(format!("ΔR left out: the ranker could not be loaded ({e})"));
                encoder_only()?
            }
        }
    } else {
        encoder_only()?
    };
    if !with_ranker {
        notes.push("ΔR left out: the config has no ranker".into());
    }
    if loaded.config.image_encoder.is_some() {
        notes.push(
            "CS and CPS left out: text and image features come from different encoders (encoder, image_encoder)".into(),
        );
    }
    let p = Pipeline {
        timings: Default::default(),
        method,
        data: &data,
        cache: &cache,
        stages,
    };
    let lpips = match &loaded.config.evaluation.lpips {
        Some(c) => Some(load_lpips(c, loaded)?),
        None => {
            notes.push("LPIPS left out: no evaluation.lpips weights in the config".into());
            None
        }
    };
    let mut lines = Vec::new();
    for s in &samples {
        let mut m = SampleMetrics {
            user: s.user.clone(),
            image: s.image.clone(),
            ..Default::default()
        };
        if let Some(e) = &s.error {
            m.error = Some(format!("the run failed this sample: {e}"));
        } else {
            match sample_metrics(&p, loaded.config.evaluation.cps, lpips.as_ref(), run_dir, s) {
                Ok(v) => m.metrics = v,
                Err(e) => m.error = Some(e.to_string()),
            }
        }
        lines.push(m);
    }
    let summary = summarise(&lines, notes);
    let mut jsonl = String::new();
    for l in &lines {
        jsonl += &serde_json::to_string(l).expect("plain data");
        jsonl.push('\n');
    }
    crate::io::write_atomic(&run_dir.join("metrics.jsonl"), jsonl.as_bytes())?;
    crate::io::write_json(&run_dir.join("metrics.json"), &summary)?;
    let name = loaded
        .file
        .as_ref()
        .and_then(|f| f.file_stem())
        .map_or("run".into(), |s| s.to_string_lossy().to_string());
    let dataset = loaded.config.dataset.as_ref().map_or("-", |d| d.format.name());
    let md = table(&[(dataset.to_string(), name, &summary)]);
    crate::io::write_atomic(&run_dir.join("metrics.md"), md.as_bytes())?;
    Ok(summary)
}

fn summarise(lines: &[SampleMetrics], notes: Vec<String>) -> Summary {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for l in lines {
        for (k, v) in &l.metrics {
            let e = sums.entry(k.clone()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    Summary {
        means: sums.iter().map(|(k, (s, n))| (k.clone(), s / *n as f64)).collect(),
        counts: sums.iter().map(|(k, (_, n))| (k.clone(), *n)).collect(),
        samples: lines.len(),
        failed: lines.iter().filter(|l| l.error.is_some()).count(),
        notes,
    }
}

fn decode(path: &Path) -> Result<Image> {
    ragar_core::vision::decode(path).map(|d| d.image)
}

/// Every metric of one sample.
fn sample_metrics(
    p: &Pipeline,
    cps: CpsText,
    lpips: Option<&Lpips>,
    run_dir: &Path,
    s: &SampleLine,
) -> Result<BTreeMap<String, f64>> {
    let image = s
        .image
        .as_ref()
        .ok_or_else(|| Error::invalid_input("the sample has no image"))?;
    let gen = decode(&run_dir.join(image))?;
    let user = p
        .data
        .users
        .iter()
        .find(|u| u.user == s.user)
        .ok_or_else(|| Error::invalid_input(format!("user '{}' is not in the dataset", s.user)))?;
    let reference = user.reference.as_deref().expect("filled by Dataset::load");
    let history: Vec<&str> = user
        .history
        .iter()
        .map(String::as_str)
        .filter(|id| p.data.items[*id].image.is_some())
        .collect();
    let size = gen.width.max(gen.height);
    let gen_sq = ragar_core::vision::square(&gen, size)?;
    let sq = |id: &str| -> Result<Image> {
        let img = decode(p.data.image_path(id)?).map_err(|e| e.context(format!("item '{id}'")))?;
        ragar_core::vision::square(&img, size)
    };
    let mut m = BTreeMap::new();
    let g = p
        .image_encoder()
        .embed_image(std::slice::from_ref(&gen))?
        .to_rows()?
        .remove(0);

    // Semantic alignment.
    let ref_img = sq(reference)?;
    m.insert("ssim_reference".into(), ssim(&gen_sq, &ref_img)?);
    if let Some(l) = lpips {
        m.insert("lpips_reference".into(), l.distance(&gen_sq, &ref_img)? as f64);
    }
    let ref_feat = p.image_features(&[reference])?.remove(0);
    m.insert("cis".into(), scores::clip_score(&g, &ref_feat)?);
    // CS and CPS compare image and text features: one encoder must give both.
    let joint = p.stages.image_encoder.is_none();
    let ref_text = &p.data.items[reference].text;
    if joint && !ref_text.is_empty() {
        let t = p.text_features(std::slice::from_ref(ref_text))?.remove(0);
        m.insert("cs".into(), scores::clip_score(&g, &t)?);
    }

    // Personalization.
    let mut preference: Vec<&str> = s.prepared.keywords.iter().map(|k| k.keyword.as_str()).collect();
    if preference.is_empty() {
        preference = user
            .history
            .iter()
            .map(|id| p.data.items[id].text.as_str())
            .filter(|t| !t.is_empty())
            .collect();
    }
    let history_texts: Vec<String> = user
        .history
        .iter()
        .map(|id| p.data.items[id].text.clone())
        .filter(|t| !t.is_empty())
        .collect();
    match cps {
        CpsText::Keywords if joint && !preference.is_empty() => {
            let t = p.text_features(&[preference.join(", ")])?.remove(0);
            m.insert("cps".into(), scores::clip_score(&g, &t)?);
        }
        CpsText::History if joint && !history_texts.is_empty() => {
            let t = p.text_features(&history_texts)?;
            m.insert("cps".into(), scores::mean_clip_score(&g, &t)?);
        }
        _ => {}
    }
    if !history.is_empty() {
        let feats = p.image_features(&history)?;
        m.insert("cpis".into(), scores::mean_clip_score(&g, &feats)?);
        let (mut ss, mut ll) = (0.0, 0.0);
        for id in &history {
            let h = sq(id)?;
            ss += ssim(&gen_sq, &h)?;
            if let Some(l) = lpips {
                ll += l.distance(&gen_sq, &h)? as f64;
            }
        }
        m.insert("ssim_personal".into(), ss / history.len() as f64);
        if lpips.is_some() {
            m.insert("lpips_personal".into(), ll / history.len() as f64);
        }
    }
    if let Some(ranker) = &p.stages.ranker {
        let (r_o, r_g) = ranks(p, ranker, user.user.as_str(), &user.history, reference, &g)?;
        m.insert("rank_original".into(), r_o as f64);
        m.insert("rank_generated".into(), r_g as f64);
        m.insert("rank_change".into(), scores::rank_change(r_o, r_g)?);
    }
    Ok(m)
}

/// The reference's rank and the generated image's rank in its place, among
/// every catalogue item outside the history.
fn ranks(
    p: &Pipeline,
    ranker: &ragar_core::stage::DynRanker,
    user: &str,
    history: &[String],
    reference: &str,
    generated: &[f32],
) -> Result<(usize, usize)> {
    let mut candidates: Vec<Candidate> = p
        .data
        .item_order
        .iter()
        .filter(|id| !history.contains(id))
        .map(|id| Candidate {
            item: id.as_str().into(),
            visual: RNone,
            text: RNone,
        })
        .collect();
    let at = candidates
        .iter()
        .position(|c| c.item.as_str() == reference)
        .ok_or_else(|| Error::invalid_input(format!("reference '{reference}' is also in the history")))?;
    candidates.push(Candidate {
        item: reference.into(),
        visual: RSome(Tensor::from_f32(&[generated.len()], generated.to_vec())?),
        text: RNone,
    });
    let query = RankQuery {
        history: UserHistory {
            user: user.into(),
            items: history.iter().map(|s| s.as_str().into()).collect(),
        },
        candidates: candidates.into(),
    };
    let mut scores_ = ranker.score(std::slice::from_ref(&query))?.remove(0);
    let g = scores_.pop().expect("pushed above");
    let r_o = scores::rank_of(&scores_, at);
    scores_[at] = g;
    let r_g = scores::rank_of(&scores_, at);
    Ok((r_o, r_g))
}
