//! The ranker's view of a dataset and its held-out evaluation.
//!
//! Split of each user's whole sequence ([`Holdout`], config
//! `dataset.holdout`):
//! - `random` (default; MICRO's and LATTICE's protocol): a seeded shuffle of
//!   each user's interactions, 80 % train, 10 % validation (early
//!   stopping), 10 % test, rounded, with at least one training item;
//! - `last` (leave-one-out by time): the last item tests, the one before it
//!   validates, the rest trains; users with two items give one training and
//!   one validation item; users with one only train.
//!
//! Evaluation: for every test user, every catalogue item the user did not
//! train or validate on is a candidate; Recall@10 / NDCG@10 (definitions in
//! `ragar_core::metrics::ranking`) of the ranker, of the popularity ranker
//! (training interaction counts) and of a seeded random ranker, on the same
//! candidates. A ranker is worth its training only above both.

use crate::dataset::Dataset;
use crate::pipeline::{Pipeline, SampleLine};
use ragar_core::abi_stable::std_types::{RNone, RString, RVec};
use ragar_core::metrics::ranking::{popularity_scores, random_scores, recall_ndcg, TopK};
use ragar_core::stage::{Candidate, DynRanker, ItemFeatures, RankQuery, RankerData, UserHistory};
use ragar_core::{Error, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Training data plus the held-out test item of each user.
pub struct RankerSplit {
    /// What `Ranker::fit` sees.
    pub data: RankerData,
    /// Each user's test items (last interaction).
    pub test: Vec<UserHistory>,
    /// Items whose visual feature a [`Replacement`] changed.
    pub replaced: usize,
}

fn history(user: &str, items: &[String]) -> UserHistory {
    UserHistory {
        user: user.into(),
        items: items.iter().map(|s| RString::from(s.as_str())).collect(),
    }
}

/// The split of `data.sequences` (no features).
pub fn split_sequences(data: &Dataset, holdout: &Holdout) -> (Vec<UserHistory>, Vec<UserHistory>, Vec<UserHistory>) {
    let (mut train, mut valid, mut test) = (Vec::new(), Vec::new(), Vec::new());
    let mut g = ragar_core::rng::TorchGenerator::new(holdout.seed);
    for (u, seq) in data.users.iter().zip(&data.sequences) {
        let n = seq.len();
        let (order, n_valid, n_test): (Vec<usize>, usize, usize) = match holdout.mode {
            HoldoutMode::Last => {
                let held = n.saturating_sub(1).min(2);
                ((0..n).collect(), held.min(1), held.saturating_sub(1))
            }
            HoldoutMode::Random => {
                let mut order: Vec<usize> = (0..n).collect();
                g.shuffle(&mut order);
                let n_test = ((n as f64 * holdout.test).round() as usize).min(n.saturating_sub(1));
                let n_valid = ((n as f64 * holdout.valid).round() as usize).min(n.saturating_sub(1 + n_test));
                (order, n_valid, n_test)
            }
        };
        // Train keeps sequence order; the held-out parts are the order's tail.
        let n_train = n - n_valid - n_test;
        let mut tr: Vec<usize> = order[..n_train].to_vec();
        tr.sort_unstable();
        let pick = |ix: &[usize]| -> Vec<String> { ix.iter().map(|&i| seq[i].clone()).collect() };
        train.push(history(&u.user, &pick(&tr)));
        if n_valid > 0 {
            valid.push(history(&u.user, &pick(&order[n_train..n_train + n_valid])));
        }
        if n_test > 0 {
            test.push(history(&u.user, &pick(&order[n_train + n_valid..])));
        }
    }
    (train, valid, test)
}

/// How each user's interactions are held out (`dataset.holdout`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Holdout {
    /// `random` or `last`.
    #[serde(default)]
    pub mode: HoldoutMode,
    /// Validation fraction (`random`).
    #[serde(default = "tenth")]
    pub valid: f64,
    /// Test fraction (`random`).
    #[serde(default = "tenth")]
    pub test: f64,
    /// Shuffle seed (`random`).
    #[serde(default)]
    pub seed: u64,
}

fn tenth() -> f64 {
    0.1
}

impl Default for Holdout {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// See [`Holdout`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HoldoutMode {
    /// Seeded per-user shuffle, fractions `valid` / `test`.
    #[default]
    Random,
    /// Leave-one-out by time.
    Last,
}

/// The split with Encoder features for every catalogue item: image
/// features where items have images (no item with one: empty visual
/// features, and the ranker decides whether it can work on text alone),
/// text features of every item's text. Items in `replace` take its visual
/// feature instead of their own image's (Table 4, [`generated_visuals`]).
pub fn ranker_split(p: &Pipeline, holdout: &Holdout, seed: u64, replace: &Replacement) -> Result<RankerSplit> {
    let ids: Vec<&str> = p.data.item_order.iter().map(String::as_str).collect();
    let with_image: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| p.data.items[*id].image.is_some())
        .collect();
    let mut visual: HashMap<&str, Vec<f32>> = with_image.iter().copied().zip(p.image_features(&with_image)?).collect();
    let mut changed = 0;
    if !replace.features.is_empty() && with_image.is_empty() {
        return Err(Error::invalid_input(
            "generated images can only replace reference images in a dataset whose items have images",
        ));
    }
    for (id, f) in &replace.features {
        let own = visual.get_mut(id.as_str()).ok_or_else(|| {
            Error::invalid_input(format!(
                "item '{id}' has no image of its own for a generated one to replace"
            ))
        })?;
        if own != f {
            changed += 1;
        }
        *own = f.clone();
    }
    let texts: Vec<String> = ids.iter().map(|id| p.data.items[*id].text.clone()).collect();
    let text = p.text_features(&texts)?;
    let items = ids
        .iter()
        .zip(text)
        .map(|(id, t)| {
            let v = visual.remove(id).unwrap_or_default();
            Ok(ItemFeatures {
                item: (*id).into(),
                visual: Tensor::from_f32(&[v.len()], v)?,
                text: Tensor::from_f32(&[t.len()], t)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (train, valid, test) = split_sequences(p.data, holdout);
    Ok(RankerSplit {
        data: RankerData {
            train: train.into(),
            valid: valid.into(),
            items: items.into(),
            seed,
        },
        test,
        replaced: changed,
    })
}

/// Table 4: the visual features that replace reference items' own while the
/// ranker trains ("we replace reference images with those generated ...
/// during rank model training"). A ranker knows one feature per item, while
/// a run generates one image per user: an item that is the reference of
/// several generated samples takes the mean of their image features.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Replacement {
    /// The run folder the images come from.
    pub run: Option<String>,
    /// Reference item -> mean image feature of its generated images.
    #[serde(skip)]
    pub features: HashMap<String, Vec<f32>>,
    /// Reference items replaced.
    pub items: usize,
    /// Generated images used.
    pub images: usize,
    /// Replaced items whose feature differs from their own image's (set
    /// when the ranker's split is made; 0 when the run's images are copies).
    pub changed: usize,
    /// Samples left out, and why (failed in the run, image missing).
    pub skipped: Vec<String>,
}

/// The [`Replacement`] made of a run folder's generated images
/// (`samples.jsonl`: user, image), each standing for its user's reference
/// item, features from the pipeline's image encoder. A failed sample or a
/// missing image file is skipped and named; a user the dataset does not
/// know is an error (the run belongs to another dataset).
pub fn generated_visuals(p: &Pipeline, run_dir: &Path) -> Result<Replacement> {
    let log = run_dir.join("samples.jsonl");
    let samples: Vec<SampleLine> = crate::io::read_jsonl(&log)?;
    let reference: HashMap<&str, &str> = p
        .data
        .users
        .iter()
        .filter_map(|u| Some((u.user.as_str(), u.reference.as_deref()?)))
        .collect();
    let mut out = Replacement {
        run: Some(run_dir.display().to_string()),
        ..Default::default()
    };
    let mut sums: HashMap<String, (Vec<f32>, usize)> = HashMap::new();
    for (n, s) in samples.iter().enumerate() {
        let at = format!("{} sample {}", log.display(), n + 1);
        let item = *reference
            .get(s.user.as_str())
            .ok_or_else(|| Error::invalid_input(format!("{at}: user '{}' is not in the dataset", s.user)))?;
        let image = match (&s.error, &s.image) {
            (Some(e), _) => {
                out.skipped
                    .push(format!("{at}: user '{}': the run failed this sample ({e})", s.user));
                continue;
            }
            (None, None) => {
                out.skipped.push(format!("{at}: user '{}': no image", s.user));
                continue;
            }
            (None, Some(i)) => run_dir.join(i),
        };
        if !image.is_file() {
            out.skipped
                .push(format!("{at}: user '{}': {} is missing", s.user, image.display()));
            continue;
        }
        let f = p
            .file_features(&[(image.as_path(), format!("user '{}'", s.user))])?
            .remove(0);
        let e = sums.entry(item.to_string()).or_insert_with(|| (vec![0.0; f.len()], 0));
        if e.0.len() != f.len() {
            return Err(Error::model(format!("{}: image feature sizes differ", image.display())));
        }
        e.0.iter_mut().zip(&f).for_each(|(a, b)| *a += b);
        e.1 += 1;
        out.images += 1;
    }
    out.items = sums.len();
    out.features = sums
        .into_iter()
        .map(|(k, (v, c))| (k, v.into_iter().map(|x| x / c as f32).collect()))
        .collect();
    Ok(out)
}

/// Held-out figures of a ranker and the two reference rankers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    /// The cut-off (10).
    pub k: usize,
    /// The trained ranker.
    pub ranker: TopK,
    /// Items by training popularity.
    pub popularity: TopK,
    /// Uniform random scores.
    pub random: TopK,
}

/// Score every candidate item of every test user with `ranker` and the
/// reference rankers; see the module docs.
pub fn evaluate(ranker: &DynRanker, split: &RankerSplit, k: usize, seed: u64) -> Result<Evaluation> {
    let names: Vec<&str> = split.data.items.iter().map(|f| f.item.as_str()).collect();
    let index: HashMap<&str, u32> = names.iter().enumerate().map(|(i, n)| (*n, i as u32)).collect();
    let ids = |h: &UserHistory| -> Vec<u32> { h.items.iter().filter_map(|i| index.get(i.as_str()).copied()).collect() };
    let mut known: HashMap<&str, Vec<u32>> = HashMap::new();
    for h in split.data.train.iter().chain(split.data.valid.iter()) {
        known.entry(h.user.as_str()).or_default().extend(ids(h));
    }
    let train_of: HashMap<&str, &UserHistory> = split.data.train.iter().map(|h| (h.user.as_str(), h)).collect();
    let train_ids: Vec<Vec<u32>> = split.data.train.iter().map(ids).collect();
    let popularity = popularity_scores(&train_ids, names.len());
    let (mut seen, mut truth, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in split.test.chunks(32) {
        let queries: Vec<RankQuery> = chunk
            .iter()
            .map(|t| {
                let history = train_of
                    .get(t.user.as_str())
                    .map(|h| (*h).clone())
                    .unwrap_or_else(|| history(t.user.as_str(), &[]));
                RankQuery {
                    history,
                    candidates: names
                        .iter()
                        .map(|n| Candidate {
                            item: (*n).into(),
                            visual: RNone,
                            text: RNone,
                        })
                        .collect::<RVec<_>>(),
                }
            })
            .collect();
        scores.extend(ranker.score(&queries)?);
        for t in chunk {
            seen.push(known.get(t.user.as_str()).cloned().unwrap_or_default());
            truth.push(ids(t));
        }
    }
    // Popularity scores every user alike: one row, borrowed per user.
    let pop_rows = vec![popularity.as_slice(); scores.len()];
    let random_rows = random_scores(scores.len(), names.len(), seed);
    Ok(Evaluation {
        k,
        ranker: recall_ndcg(&scores, &seen, &truth, k),
        popularity: recall_ndcg(&pop_rows, &seen, &truth, k),
        random: recall_ndcg(&random_rows, &seen, &truth, k),
    })
}
