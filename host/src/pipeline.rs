//! The RAGAR method, orchestrated over the six stage contracts: the
//! Retrieval module (Eq. 2-5), the Generation module (Eq. 6-9), and the
//! Reflection module's training loop (Eq. 10-15), plus `ragar run` and
//! `ragar train-ranker`. Framework-free math lives in `ragar_core`
//! (`retrieval`, `keywords`, `reflection`); models live in plugins. Every
//! per-item output (captions, embeddings, keyword answers) goes through the
//! content-addressed cache.

use crate::cache::Cache;
use crate::config::{stage_key, Loaded};
use crate::dataset::{Dataset, Split, User};
use crate::registry::Registry;
use ragar_core::abi_stable::std_types::{RNone, ROption, RString, RVec};
use ragar_core::keywords::{self, Counted};
use ragar_core::reflection::{self, RewardFn, Verdict};
use ragar_core::retrieval::{self, RetrievalConfig, Retrieved};
use ragar_core::stage::{
    Candidate, CaptionOptions, Conditioning, DynCaptioner, DynEncoder, DynGenerator, DynKeywordLlm, DynMapper,
    DynRanker, GenerateOptions, GenerationRequest, LossConfig, MapperInput, RankQuery, ReflectionSample, UserHistory,
};
use ragar_core::{Error, Image, Result, Stage, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the text that is retrieved over comes from (Eq. 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionSource {
    /// Caption each item image with the Captioner (the paper's).
    Captioner,
    /// Use the item's own text (no captioner needed).
    Text,
}

/// What conditions the generator when `ragar run` generates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    /// RAGAR: the Mapper's general preference (Eq. 8-9).
    #[default]
    Preference,
    /// The SD baseline of Table 1: the reference item's text (its caption
    /// when it has no text) as the prompt; no Mapper.
    ReferenceText,
}

/// The `method:` block: every choice of the paper, with its value as default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    /// What conditions the generator in `ragar run`.
    pub condition: Condition,
    /// Retrieval module (k = 5).
    pub retrieval: RetrievalConfig,
    /// Caption source for retrieval.
    pub captions: CaptionSource,
    /// Captioner decoding.
    pub caption_max_tokens: u32,
    /// Captioner beams.
    pub caption_beams: u32,
    /// Eq. 6 prompt; `{text}` is the item's text (or caption when it has none).
    pub keyword_prompt: String,
    /// Most tokens of a keyword answer.
    pub keyword_max_tokens: u32,
    /// Keywords kept after the frequency filter (top m).
    pub top_m: usize,
    /// Eq. 7 prompt; `{keywords}` is the kept keywords, `{reference}` the reference item's text.
    pub preference_prompt: String,
    /// Generation settings.
    pub generation: GenerationConfig,
    /// Reflection (Eq. 10-15).
    pub reflection: ReflectionConfig,
    /// Training loop.
    pub train: TrainConfig,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            condition: Condition::Preference,
            retrieval: RetrievalConfig::default(),
            captions: CaptionSource::Captioner,
            caption_max_tokens: 30,
            caption_beams: 3,
            keyword_prompt: "Give 5 short keywords describing the visual style and content of this item: {text}\n\
                             Answer with comma-separated keywords only."
                .into(),
            keyword_max_tokens: 32,
            top_m: 10,
            preference_prompt: "A user likes items described by: {keywords}. Imagine the picture of \
                                \"{reference}\" this user would like best."
                .into(),
            generation: GenerationConfig::default(),
            reflection: ReflectionConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

/// Image generation settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance: f32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Negative prompt.
    pub negative: String,
    /// Base seed; sample s of epoch e uses a seed derived from (seed, e, s, image).
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            steps: 30,
            guidance: 7.5,
            width: 512,
            height: 512,
            negative: String::new(),
            seed: 0,
        }
    }
}

/// Reflection module settings (Eq. 10-15).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReflectionConfig {
    /// Perturbations per sample (n = 3).
    pub noises: usize,
    /// Their standard deviation.
    pub sigma: f32,
    /// Margin subtracted from rewards (Eq. 12).
    pub margin: f32,
    /// Rank -> reward.
    pub reward: RewardFn,
    /// lambda_1, rank loss.
    pub rank_weight: f32,
    /// lambda_2, calibrator loss.
    pub calibrator_weight: f32,
    /// lambda_3, semantic loss.
    pub semantic_weight: f32,
}

impl Default for ReflectionConfig {
    fn default() -> Self {
        ReflectionConfig {
            noises: 3,
            sigma: 0.1,
            margin: 0.5,
            reward: RewardFn::Linear,
            rank_weight: 1.0,
            calibrator_weight: 1.0,
            semantic_weight: 1.0,
        }
    }
}

/// Training loop settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the training users.
    pub epochs: usize,
    /// Learning rate.
    pub lr: f32,
    /// Gradient-norm clip (0 = off).
    pub grad_clip: f32,
    /// Write a checkpoint every this many samples.
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            lr: 1e-4,
            grad_clip: 1.0,
            checkpoint_every: 10,
        }
    }
}

/// Component identity for cache keys: name, backend, version, dtype, params.
fn identity(loaded: &Loaded, registry: &Registry, stage: Stage) -> Result<String> {
    let c = loaded
        .config
        .component(stage)
        .ok_or_else(|| Error::config(format!("the config has no `{}` block", stage_key(stage))))?;
    stage_identity(registry, stage, c)
}

/// [`identity`] of the `image_encoder` block.
fn block_identity(registry: &Registry, c: &crate::config::ComponentConfig) -> Result<String> {
    stage_identity(registry, Stage::Encoder, c)
}

fn stage_identity(registry: &Registry, stage: Stage, c: &crate::config::ComponentConfig) -> Result<String> {
    let version = registry
        .find(stage, &c.name, &c.backend)?
        .component
        .descriptor
        .version
        .to_string();
    Ok(format!(
        "{}/{}/{}/{}/{}",
        c.name,
        c.backend,
        version,
        c.dtype,
        serde_json::Value::Object(c.params.clone())
    ))
}

fn fill(template: &str, pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .fold(template.to_string(), |t, (k, v)| t.replace(&format!("{{{k}}}"), v))
}

/// The stages a command needs, built once.
pub struct Stages {
    /// Captioner (when captions come from images).
    pub captioner: Option<(DynCaptioner, String)>,
    /// Encoder (text, and images unless `image_encoder` is set).
    pub encoder: (DynEncoder, String),
    /// Encoder of item images, when separate.
    pub image_encoder: Option<(DynEncoder, String)>,
    /// KeywordLLM.
    pub llm: Option<(DynKeywordLlm, String)>,
    /// Mapper.
    pub mapper: Option<DynMapper>,
    /// Generator.
    pub generator: Option<DynGenerator>,
    /// Ranker.
    pub ranker: Option<DynRanker>,
}

/// What the method computes for one user before the Mapper (Eq. 2-7).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prepared {
    /// The reference item whose image is personalised.
    #[serde(default)]
    pub reference: String,
    /// Retrieved history items (indices into the history) and their weights.
    pub retrieved: Retrieved,
    /// Retrieved item ids.
    pub retrieved_items: Vec<String>,
    /// Kept keywords with their counts.
    pub keywords: Vec<Counted>,
    /// History items left out, with why (missing or unreadable image).
    #[serde(default)]
    pub skipped: Vec<(String, String)>,
    /// What the user should know about this sample.
    #[serde(default)]
    pub notes: Vec<String>,
    /// The preference prompt (Eq. 7).
    pub prompt: String,
    /// Eq. 5's retrieval-augmented preference (empty when k = 0).
    #[serde(skip)]
    pub retrieval_preference: Vec<f32>,
    /// The reference image's visual feature (semantic target, Eq. 14).
    #[serde(skip)]
    pub reference_visual: Vec<f32>,
    /// The Mapper's input.
    #[serde(skip)]
    pub input: Option<MapperInput>,
}

/// Seconds and calls per stage (model calls only; cache hits cost nothing).
#[derive(Default)]
pub struct Timings(std::cell::RefCell<std::collections::BTreeMap<String, (f64, u64)>>);

impl Timings {
    /// Run `f`, adding its duration to `stage`.
    pub fn time<T>(&self, stage: &str, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let out = f();
        let mut m = self.0.borrow_mut();
        let e = m.entry(stage.to_string()).or_default();
        e.0 += t.elapsed().as_secs_f64();
        e.1 += 1;
        out
    }

    /// `{stage: {seconds, calls}}`.
    pub fn json(&self) -> serde_json::Value {
        self.0
            .borrow()
            .iter()
            .map(|(k, (s, n))| (k.clone(), serde_json::json!({"seconds": s, "calls": n})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// A printable table.
    pub fn table(&self) -> String {
        let mut out = String::from("stage               seconds   calls\n");
        for (k, (s, n)) in self.0.borrow().iter() {
            out += &format!("{k:<18} {s:>9.2} {n:>7}\n");
        }
        out
    }
}

/// The method over a dataset.
pub struct Pipeline<'a> {
    /// Per-stage timing.
    pub timings: Timings,
    /// Method settings.
    pub method: MethodConfig,
    /// Data.
    pub data: &'a Dataset,
    /// Stage outputs cache.
    pub cache: &'a Cache,
    /// Stages.
    pub stages: Stages,
}

impl<'a> Pipeline<'a> {
    fn images(&self, ids: &[&str]) -> Result<Vec<Image>> {
        ids.iter()
            .map(|id| {
                ragar_core::vision::decode(self.data.image_path(id)?)
                    .map(|d| d.image)
                    .map_err(|e| e.context(format!("item '{id}'")))
            })
            .collect()
    }

    /// Eq. 2, first half: each item's caption (or text).
    pub fn captions(&self, ids: &[&str]) -> Result<Vec<String>> {
        match (self.method.captions, &self.stages.captioner) {
            (CaptionSource::Text, _) => Ok(ids.iter().map(|id| self.data.items[*id].text.clone()).collect()),
            (CaptionSource::Captioner, None) => Err(Error::config(
                "method.captions is `captioner` but the config has no captioner (or set method.captions: text)",
            )),
            (CaptionSource::Captioner, Some((cap, ident))) => {
                let inputs: Vec<Vec<u8>> = ids.iter().map(|id| self.image_key(id)).collect::<Result<_>>()?;
                let opts = CaptionOptions {
                    max_tokens: self.method.caption_max_tokens,
                    beams: self.method.caption_beams,
                    prompt: RString::new(),
                };
                let ident = format!("{ident}|{}|{}", opts.max_tokens, opts.beams);
                self.cache.memo("caption", &ident, &inputs, |missing| {
                    let which: Vec<&str> = missing.iter().map(|&i| ids[i]).collect();
                    let images = self.images(&which)?;
                    self.timings.time("captioner", || cap.caption(&images, &opts))
                })
            }
        }
    }

    /// Whether an item's image can be read and decoded.
    fn check_image(&self, id: &str) -> Result<()> {
        ragar_core::vision::decode(self.data.image_path(id)?)
            .map(|_| ())
            .map_err(|e| e.context(format!("item '{id}'")))
    }

    /// The bytes that identify an item's image: its file's content hash.
    fn image_key(&self, id: &str) -> Result<Vec<u8>> {
        let p = self.data.image_path(id)?;
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e).context(format!("item '{id}'")))?;
        Ok(Cache::key("file", "", &bytes).into_bytes())
    }

    /// The encoder of images: `image_encoder` when configured, else `encoder`.
    pub fn image_encoder(&self) -> &DynEncoder {
        &self.stages.image_encoder.as_ref().unwrap_or(&self.stages.encoder).0
    }

    /// Text embeddings through the cache.
    pub fn text_features(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let (enc, ident) = &self.stages.encoder;
        let inputs: Vec<Vec<u8>> = texts.iter().map(|t| t.as_bytes().to_vec()).collect();
        self.cache.memo("text-embedding", ident, &inputs, |missing| {
            let which: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            self.timings
                .time("encoder (text)", || enc.embed_text(&which))?
                .vectors
                .to_rows()
        })
    }

    /// Eq. 4: image features of items through the cache.
    pub fn image_features(&self, ids: &[&str]) -> Result<Vec<Vec<f32>>> {
        let paths: Vec<(&Path, String)> = ids
            .iter()
            .map(|id| Ok((self.data.image_path(id)?, format!("item '{id}'"))))
            .collect::<Result<_>>()?;
        self.file_features(&paths)
    }

    /// Image features of image files, each named by `what` in errors. The
    /// cache is keyed by the file's bytes, as for items, so a file equal to
    /// an item's image gets exactly that item's feature.
    pub fn file_features(&self, files: &[(&Path, String)]) -> Result<Vec<Vec<f32>>> {
        let (enc, ident) = self.stages.image_encoder.as_ref().unwrap_or(&self.stages.encoder);
        let inputs: Vec<Vec<u8>> = files
            .iter()
            .map(|(p, what)| {
                let bytes = std::fs::read(p).map_err(|e| Error::io(p, e).context(what.clone()))?;
                Ok(Cache::key("file", "", &bytes).into_bytes())
            })
            .collect::<Result<_>>()?;
        self.cache.memo("image-embedding", ident, &inputs, |missing| {
            let images = missing
                .iter()
                .map(|&i| {
                    let (p, what) = &files[i];
                    ragar_core::vision::decode(p)
                        .map(|d| d.image)
                        .map_err(|e| e.context(what.clone()))
                })
                .collect::<Result<Vec<_>>>()?;
            self.timings
                .time("encoder (image)", || enc.embed_image(&images))?
                .to_rows()
        })
    }

    /// Eq. 6: each item's raw keyword answer, through the cache.
    pub fn keyword_answers(&self, ids: &[&str], captions: &[String]) -> Result<Vec<String>> {
        let (llm, ident) = self
            .stages
            .llm
            .as_ref()
            .ok_or_else(|| Error::config("the method needs a keyword_llm block"))?;
        let prompts: Vec<String> = ids
            .iter()
            .zip(captions)
            .map(|(id, cap)| {
                let t = &self.data.items[*id].text;
                fill(
                    &self.method.keyword_prompt,
                    &[("text", if t.is_empty() { cap } else { t })],
                )
            })
            .collect();
        let opts = GenerateOptions {
            max_tokens: self.method.keyword_max_tokens,
            ..Default::default()
        };
        let ident = format!("{ident}|{}", opts.max_tokens);
        let inputs: Vec<Vec<u8>> = prompts.iter().map(|p| p.as_bytes().to_vec()).collect();
        self.cache.memo("keywords", &ident, &inputs, |missing| {
            let which: Vec<String> = missing.iter().map(|&i| prompts[i].clone()).collect();
            let gens = self.timings.time("keyword llm", || llm.generate(&which, &opts))?;
            Ok(gens.into_iter().map(|g| g.text.to_string()).collect())
        })
    }

    /// Eq. 7: the [IMG] hidden states and text-related embedding of a
    /// preference prompt, through the cache (they depend on the prompt and
    /// the LLM's version only).
    fn preference_states(&self, prompt: &str) -> Result<ragar_core::stage::PreferenceStates> {
        let (llm, ident) = self.stages.llm.as_ref().expect("checked by keyword_answers");
        let stored: Vec<(Vec<usize>, Vec<f32>, Vec<f32>)> =
            self.cache
                .memo("preference-states", ident, &[prompt.as_bytes().to_vec()], |_| {
                    let s = self
                        .timings
                        .time("keyword llm [IMG]", || llm.preference_states(&[prompt.to_string()]))?
                        .remove(0);
                    Ok(vec![(
                        s.img_states.dims(),
                        s.img_states.to_f32_vec(),
                        s.text_embedding.to_f32_vec(),
                    )])
                })?;
        let (dims, img, txt) = stored.into_iter().next().expect("one prompt");
        Ok(ragar_core::stage::PreferenceStates {
            img_states: Tensor::from_f32(&dims, img)?,
            text_embedding: Tensor::from_f32(&[txt.len()], txt)?,
        })
    }

    /// Eq. 2-7 for one user.
    pub fn prepare(&self, user: &User) -> Result<Prepared> {
        let reference = user.reference.as_deref().expect("filled by Dataset::load");
        let at = |e: Error| e.context(format!("user '{}'", user.user));
        // A history item whose image is missing or unreadable is skipped and
        // recorded; the reference's must be readable.
        let mut skipped = Vec::new();
        let mut hist: Vec<&str> = Vec::new();
        for id in &user.history {
            match self.check_image(id) {
                Ok(()) => hist.push(id),
                Err(e) => skipped.push((id.clone(), e.to_string())),
            }
        }
        self.check_image(reference)
            .map_err(|e| at(e.context("reference item")))?;
        if hist.is_empty() {
            return Err(at(Error::invalid_input("no history item has a usable image")));
        }
        let mut notes = Vec::new();
        let k = self.method.retrieval.k;
        if k > hist.len() {
            notes.push(format!(
                "{} usable history items, fewer than k = {k}: all are retrieved",
                hist.len()
            ));
        }
        let mut all = hist.clone();
        all.push(reference);
        let captions = self.captions(&all)?;
        let emb = self.text_features(&captions)?;
        check_vectors("caption embedding", &all, &emb).map_err(at)?;
        let (ref_emb, hist_emb) = emb.split_last().expect("reference included");
        let retrieved = retrieval::retrieve(ref_emb, hist_emb, &self.method.retrieval).map_err(at)?;
        let visual = self.image_features(&all)?;
        check_vectors("image feature", &all, &visual).map_err(at)?;
        let (ref_visual, hist_visual) = visual.split_last().expect("reference included");
        let retrieval_preference = retrieval::fuse(&retrieved, hist_visual)?.unwrap_or_default();
        let answers = self.keyword_answers(&hist, &captions[..hist.len()])?;
        let lists: Vec<Vec<String>> = answers.iter().map(|a| keywords::parse(a)).collect();
        let kept = keywords::top_m(&lists, self.method.top_m);
        let kw_text = kept.iter().map(|c| c.keyword.as_str()).collect::<Vec<_>>().join(", ");
        let ref_text = {
            let t = &self.data.items[reference].text;
            if t.is_empty() {
                captions.last().cloned().unwrap_or_default()
            } else {
                t.clone()
            }
        };
        let prompt = fill(
            &self.method.preference_prompt,
            &[("keywords", &kw_text), ("reference", &ref_text)],
        );
        let states = self.preference_states(&prompt)?;
        let keyword_feature = self.text_features(std::slice::from_ref(&kw_text))?.remove(0);
        Ok(Prepared {
            reference: reference.to_string(),
            skipped,
            notes,
            retrieved_items: retrieved.indices.iter().map(|&i| hist[i].to_string()).collect(),
            retrieved,
            keywords: kept,
            prompt,
            retrieval_preference,
            reference_visual: ref_visual.clone(),
            input: Some(MapperInput {
                img_states: states.img_states,
                text_embedding: states.text_embedding,
                keyword_feature: Tensor::from_f32(&[keyword_feature.len()], keyword_feature)?,
            }),
        })
    }

    fn generate(&self, prefs: &[Tensor], seeds: &[u64]) -> Result<Vec<Image>> {
        let conds = prefs.iter().map(|p| Conditioning::Embeddings(p.clone())).collect();
        self.generate_from(conds, seeds)
    }

    fn generate_from(&self, conds: Vec<Conditioning>, seeds: &[u64]) -> Result<Vec<Image>> {
        let g = self
            .stages
            .generator
            .as_ref()
            .ok_or_else(|| Error::config("the method needs a generator block"))?;
        let gc = &self.method.generation;
        let negative = if gc.negative.is_empty() {
            RNone
        } else {
            ROption::RSome(Conditioning::Text(gc.negative.as_str().into()))
        };
        let reqs: Vec<GenerationRequest> = conds
            .into_iter()
            .zip(seeds)
            .map(|(cond, &seed)| GenerationRequest {
                cond,
                negative: negative.clone(),
                seed,
                steps: gc.steps,
                guidance: gc.guidance,
                width: gc.width,
                height: gc.height,
            })
            .collect();
        self.timings.time("generator", || g.generate(&reqs))
    }

    /// Eq. 10-12: generate the global-preference image and one per
    /// perturbation, score them with the reference image in the user's
    /// sequence, and turn ranks into rewards.
    pub fn reflect(
        &self,
        user: &User,
        prepared: &Prepared,
        preference: &Tensor,
        seed: u64,
    ) -> Result<(Verdict, Vec<Vec<f32>>)> {
        let rc = &self.method.reflection;
        let mu = preference.to_f32_vec();
        let noises = reflection::noises(seed, rc.noises, mu.len())?;
        let mut prefs = vec![preference.clone()];
        for eps in &noises {
            prefs.push(Tensor::from_f32(
                &preference.dims(),
                reflection::perturb(&mu, eps, rc.sigma)?,
            )?);
        }
        let seeds: Vec<u64> = (0..prefs.len() as u64)
            .map(|i| seed.wrapping_mul(31).wrapping_add(i))
            .collect();
        let images = self.generate(&prefs, &seeds)?;
        let feats = self
            .timings
            .time("encoder (image)", || self.image_encoder().embed_image(&images))?
            .to_rows()?;
        let ranker = self
            .stages
            .ranker
            .as_ref()
            .ok_or_else(|| Error::config("training needs a ranker block"))?;
        let reference = user.reference.clone().expect("filled by Dataset::load");
        let vis =
            |v: &[f32]| -> Result<ROption<Tensor>> { Ok(ROption::RSome(Tensor::from_f32(&[v.len()], v.to_vec())?)) };
        let mut candidates = vec![Candidate {
            item: reference.as_str().into(),
            visual: vis(&prepared.reference_visual)?,
            text: RNone,
        }];
        for f in &feats {
            candidates.push(Candidate {
                item: reference.as_str().into(),
                visual: vis(f)?,
                text: RNone,
            });
        }
        let query = RankQuery {
            history: UserHistory {
                user: user.user.as_str().into(),
                items: user.history.iter().map(|s| RString::from(s.as_str())).collect(),
            },
            candidates: candidates.into(),
        };
        let scores = self
            .timings
            .time("ranker", || ranker.score(std::slice::from_ref(&query)))?
            .remove(0);
        Ok((reflection::verdict(&scores, rc.reward)?, noises))
    }

    /// One reflection training step on one user (Eq. 10-15).
    pub fn train_step(&mut self, user: &User, seed: u64) -> Result<(ragar_core::stage::TrainStats, Verdict, Prepared)> {
        let prepared = self.prepare(user)?;
        let input = prepared.input.clone().expect("prepare fills it");
        let mapper = self
            .stages
            .mapper
            .as_ref()
            .ok_or_else(|| Error::config("training needs a mapper block"))?;
        let out = self
            .timings
            .time("mapper", || mapper.forward(std::slice::from_ref(&input)))?
            .remove(0);
        let (verdict, noises) = self.reflect(user, &prepared, &out.preference, seed)?;
        let dims = out.preference.dims();
        let flat: Vec<f32> = noises.concat();
        let sample = ReflectionSample {
            input,
            noises: Tensor::from_f32(&[noises.len(), dims[0], dims[1]], flat)?,
            rewards: RVec::from(verdict.rewards.clone()),
            retrieval_preference: Tensor::from_f32(
                &[prepared.retrieval_preference.len()],
                prepared.retrieval_preference.clone(),
            )?,
            semantic_target: Tensor::from_f32(&[prepared.reference_visual.len()], prepared.reference_visual.clone())?,
        };
        let rc = &self.method.reflection;
        let tc = &self.method.train;
        let loss = LossConfig {
            rank_weight: rc.rank_weight,
            calibrator_weight: rc.calibrator_weight,
            semantic_weight: rc.semantic_weight,
            sigma: rc.sigma,
            margin: rc.margin,
            lr: tc.lr,
            grad_clip: tc.grad_clip,
        };
        let mapper = self.stages.mapper.as_mut().expect("checked above");
        let timings = &self.timings;
        let stats = timings.time("mapper train step", || {
            mapper.train_step(std::slice::from_ref(&sample), &loss)
        })?;
        Ok((stats, verdict, prepared))
    }

    /// The personalised image of one user (`ragar run`).
    pub fn personalise(&self, user: &User, seed: u64) -> Result<(Image, Prepared)> {
        let prepared = self.prepare(user)?;
        if self.method.condition == Condition::ReferenceText {
            let reference = user.reference.as_deref().expect("filled by Dataset::load");
            let text = match self.data.items[reference].text.as_str() {
                "" => self.captions(&[reference])?.remove(0),
                t => t.to_string(),
            };
            let img = self
                .generate_from(vec![Conditioning::Text(text.as_str().into())], &[seed])?
                .remove(0);
            return Ok((img, prepared));
        }
        let mapper = self
            .stages
            .mapper
            .as_ref()
            .ok_or_else(|| Error::config("the method needs a mapper block"))?;
        let out = mapper
            .forward(std::slice::from_ref(prepared.input.as_ref().expect("prepare fills it")))?
            .remove(0);
        let img = self.generate(std::slice::from_ref(&out.preference), &[seed])?.remove(0);
        Ok((img, prepared))
    }
}

/// Build the stages a command needs from the registry.
pub fn build_stages(loaded: &Loaded, registry: &Registry, need: &[Stage], method: &MethodConfig) -> Result<Stages> {
    registry.ensure_loaded()?;
    if let Some(w) = loaded.config.cuda_backends_clash() {
        eprintln!("warning: {w}");
    }
    let has = |s: Stage| need.contains(&s);
    let ident = |s: Stage| identity(loaded, registry, s);
    Ok(Stages {
        captioner: if has(Stage::Captioner) && method.captions == CaptionSource::Captioner {
            Some((registry.captioner(loaded)?, ident(Stage::Captioner)?))
        } else {
            None
        },
        encoder: (registry.encoder(loaded)?, ident(Stage::Encoder)?),
        image_encoder: match (registry.image_encoder(loaded)?, &loaded.config.image_encoder) {
            (Some(e), Some(c)) => Some((e, block_identity(registry, c)?)),
            _ => None,
        },
        llm: if has(Stage::KeywordLlm) {
            Some((registry.keyword_llm(loaded)?, ident(Stage::KeywordLlm)?))
        } else {
            None
        },
        mapper: if has(Stage::Mapper) {
            Some(registry.mapper(loaded)?)
        } else {
            None
        },
        generator: if has(Stage::Generator) {
            Some(registry.generator(loaded)?)
        } else {
            None
        },
        ranker: if has(Stage::Ranker) {
            Some(registry.ranker(loaded)?)
        } else {
            None
        },
    })
}

/// One line of a run's or a training's JSONL log.
#[derive(Serialize, Deserialize)]
pub struct SampleLine {
    /// User id.
    pub user: String,
    /// Epoch (training) or 0.
    pub epoch: usize,
    /// Image file (runs).
    #[serde(default)]
    pub image: Option<String>,
    /// What Eq. 2-7 chose.
    pub prepared: Prepared,
    /// Ranks and rewards (training).
    #[serde(default)]
    pub verdict: Option<Verdict>,
    /// Losses (training).
    #[serde(default)]
    pub stats: Option<serde_json::Value>,
    /// Error, when this sample failed (recorded, and the run goes on).
    #[serde(default)]
    pub error: Option<String>,
    /// Seconds taken.
    pub seconds: f64,
}

/// Append one JSON line, flushed and synced (a killed run keeps every finished line).
pub fn append_line(path: &Path, line: &impl Serialize) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut s = serde_json::to_vec(line).map_err(|e| Error::io(path, e))?;
    s.push(b'\n');
    f.write_all(&s)
        .and_then(|_| f.sync_data())
        .map_err(|e| Error::io(path, e))
}

/// The `(user, epoch)` pairs already logged in a JSONL file (resume).
/// A torn last line (killed mid-write) is ignored.
pub fn done(path: &Path) -> Result<std::collections::HashSet<(String, usize)>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Default::default());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["error"].is_null())
        .filter_map(|v| Some((v["user"].as_str()?.to_string(), v["epoch"].as_u64()? as usize)))
        .collect())
}

/// Seed of sample `s` in epoch `e`.
pub fn sample_seed(base: u64, epoch: usize, user: &str) -> u64 {
    let h = Cache::key("seed", &format!("{base}/{epoch}"), user.as_bytes());
    u64::from_str_radix(&h[..16], 16).unwrap_or(base)
}

/// The run folder: `--out` or `runs/<config stem>/<unix time>`.
pub fn run_dir(loaded: &Loaded, out: Option<&Path>) -> PathBuf {
    out.map(Path::to_path_buf).unwrap_or_else(|| {
        let stem = loaded
            .file
            .as_ref()
            .and_then(|f| f.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from("runs").join(stem).join(t.to_string())
    })
}

/// Which users a command works on, limited.
pub fn users(data: &Dataset, split: Split, limit: Option<usize>) -> Vec<&User> {
    let mut u = data.split(split);
    if let Some(n) = limit {
        u.truncate(n);
    }
    u
}

/// A user id as a file name: path separators and odd characters replaced,
/// with a short hash when anything was replaced (so ids stay distinct).
pub fn file_safe(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == id && !id.starts_with('.') && !id.is_empty() {
        clean
    } else {
        format!("{clean}-{}", &Cache::key("id", "", id.as_bytes())[..8])
    }
}

/// Finite, non-zero vectors, or an error naming the item.
fn check_vectors(what: &str, ids: &[&str], vs: &[Vec<f32>]) -> Result<()> {
    for (id, v) in ids.iter().zip(vs) {
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::model(format!("item '{id}': {what} has NaN or infinite values")));
        }
        if v.iter().all(|&x| x == 0.0) {
            return Err(Error::model(format!(
                "item '{id}': {what} is all zeros (no direction to compare)"
            )));
        }
    }
    Ok(())
}
