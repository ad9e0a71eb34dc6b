//! MICRO as a ragar Ranker: trained from interactions and item features
//! (`fit`, `ragar train-ranker`), scoring catalogue items and generated
//! images substituted for them (`score`, the reflection module's Eq. 10).
//! Model and its choices in `micro.rs`.
//!
//! Training follows the reference: BPR triples (each training interaction
//! with one uniformly drawn item the user has not interacted with), Adam at
//! lr 5e-4 decayed by 0.96^(epoch / 50) with the loss's own L2 term, batches of 1024, evaluation of
//! Recall@10 / NDCG@10 on the validation users every epoch, early stopping
//! after `patience` epochs without a better Recall@10 (the best weights are
//! kept). The state file holds the weights, the configuration, the id maps,
//! the item features and the training graph: everything scoring needs.

use crate::adamw::{AdamW, AdamWConfig};
use crate::device::{device, model_err};
use crate::early_stopping::EarlyStopping;
use crate::micro::{Embeddings, Ids, Micro, MicroConfig};
use crate::state::{StateReader, StateWriter};
use candle_core::{Device, Tensor};
use ragar_core::component::Probe;
use ragar_core::metrics::ranking::recall_ndcg;
use ragar_core::stage::{FitReport, RankQuery, Ranker, RankerData};
use ragar_core::{ComponentSpec, Error, Result};
use std::collections::HashSet;

/// `params` of the `ranker: micro` component.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MicroParams {
    /// Model hyper-parameters.
    #[serde(default)]
    pub model: MicroConfig,
    /// Most epochs.
    #[serde(default = "epochs")]
    pub epochs: usize,
    /// BPR triples per step.
    #[serde(default = "batch")]
    pub batch_size: usize,
    /// Adam learning rate.
    #[serde(default = "lr")]
    pub lr: f64,
    /// Epochs without a better validation Recall@10 before stopping.
    #[serde(default = "patience")]
    pub patience: usize,
    /// A trained state to load (written by `fit` / `ragar train-ranker`).
    #[serde(default)]
    pub checkpoint: Option<String>,
}

fn epochs() -> usize {
    200
}
fn batch() -> usize {
    1024
}
fn lr() -> f64 {
    5e-4
}
fn patience() -> usize {
    10
}

/// What scoring needs after training.
struct Trained {
    model: Micro,
    emb: Embeddings,
    users: Ids,
    items: Ids,
    /// Each training user's items (for unseen-user fallbacks and exclusions).
    seen: Vec<Vec<u32>>,
    /// The modalities of `model.modalities`, in order: `visual`, `text`.
    kinds: Vec<String>,
}

/// The MICRO ranker component.
pub struct MicroRanker {
    params: MicroParams,
    trained: Option<Trained>,
    device: Device,
}

impl MicroRanker {
    /// Build from `params:`; loads `checkpoint` when given.
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        let params: MicroParams = spec.params()?;
        let mut r = MicroRanker {
            params: params.clone(),
            trained: None,
            device: device(spec)?,
        };
        if let Some(c) = &params.checkpoint {
            r.load(&spec.resolve_path(c).to_string_lossy())?;
        }
        Ok(r)
    }

    /// Params (and the checkpoint file) without loading.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        let p: MicroParams = spec.params()?;
        match &p.checkpoint {
            Some(c) => Probe::default().file(&spec.resolve_path(c)),
            None => Ok(Probe::default()),
        }
    }

    fn trained(&self) -> Result<&Trained> {
        self.trained.as_ref().ok_or_else(|| {
            Error::config("the MICRO ranker is not trained: run `ragar train-ranker` or set params.checkpoint")
        })
    }
}

/// Stack one modality's features in item order, checking widths; `None`
/// when no item has this modality (MovieLens without posters, say).
fn feature_matrix(data: &RankerData, items: &Ids, text: bool, dev: &Device) -> Result<Option<Tensor>> {
    let kind = if text { "text" } else { "visual" };
    let pick = |f: &ragar_core::stage::ItemFeatures| if text { f.text.numel() } else { f.visual.numel() };
    if data.items.iter().all(|f| pick(f) == 0) {
        return Ok(None);
    }
    let mut dim = None;
    let mut flat = Vec::new();
    for name in &items.names {
        let f = data
            .items
            .iter()
            .find(|f| f.item.as_str() == name)
            .ok_or_else(|| Error::invalid_input(format!("item '{name}' has interactions but no features")))?;
        let v = if text { &f.text } else { &f.visual };
        let d = *dim.get_or_insert(v.numel());
        if v.numel() != d || d == 0 {
            let missing = data.items.iter().filter(|f| pick(f) == 0).count();
            return Err(Error::invalid_input(format!(
                "item '{name}': {kind} feature of {} values, others have {d} \
                 ({missing} of {} items have no {kind} feature: give every item one, or none)",
                v.numel(),
                data.items.len()
            )));
        }
        flat.extend(v.to_f32_vec());
    }
    Tensor::from_vec(flat, (items.names.len(), dim.unwrap_or(0)), dev)
        .map(Some)
        .map_err(model_err("MICRO features"))
}

impl Trained {
    /// The user's embedding; a user unseen in training is the mean of
    /// their known history items' embeddings.
    fn user_vector(&self, q: &RankQuery, qi: usize, dev: &Device) -> Result<Tensor> {
        if let Some(&u) = self.users.index.get(q.history.user.as_str()) {
            return self.emb.users.get(u).map_err(model_err("MICRO"));
        }
        let rows: Vec<u32> = q
            .history
            .items
            .iter()
            .filter_map(|i| self.items.index.get(i.as_str()).map(|&i| i as u32))
            .collect();
        if rows.is_empty() {
            return Err(Error::invalid_input(format!(
                "query {qi}: user '{}' was not in training and none of their history items is known",
                q.history.user
            )));
        }
        let idx = Tensor::new(rows.as_slice(), dev).map_err(model_err("MICRO"))?;
        self.emb
            .items
            .index_select(&idx, 0)
            .and_then(|x| x.mean(0))
            .map_err(model_err("MICRO"))
    }

    /// A candidate's feature overrides, one slot per trained modality.
    fn overrides(
        &self,
        c: &ragar_core::stage::Candidate,
        qi: usize,
        ci: usize,
        dev: &Device,
    ) -> Result<Vec<Option<Tensor>>> {
        for (kind, given) in [("visual", c.visual.is_some()), ("text", c.text.is_some())] {
            if given && !self.kinds.iter().any(|k| k == kind) {
                return Err(Error::invalid_input(format!(
                    "query {qi}, candidate {ci}: a {kind} feature was given, but this MICRO was trained \
                     without {kind} features (modalities: {})",
                    self.kinds.join(", ")
                )));
            }
        }
        self.kinds
            .iter()
            .enumerate()
            .map(|(m, kind)| {
                let f = if kind == "visual" { &c.visual } else { &c.text };
                let Some(f) = f.as_ref().into_option() else {
                    return Ok(None);
                };
                let want = self.model.modalities[m].features.dim(1).map_err(model_err("MICRO"))?;
                if f.numel() != want {
                    return Err(Error::invalid_input(format!(
                        "query {qi}, candidate {ci}: {kind} feature of {} values, the catalogue's have {want}",
                        f.numel()
                    )));
                }
                Tensor::from_vec(f.to_f32_vec(), want, dev)
                    .map(Some)
                    .map_err(model_err("MICRO"))
            })
            .collect()
    }
}

impl Ranker for MicroRanker {
    fn fit(&mut self, data: &RankerData) -> Result<FitReport> {
        let dev = self.device.clone();
        let users = Ids::new(data.train.iter().map(|h| h.user.as_str()));
        let items = Ids::new(data.items.iter().map(|f| f.item.as_str()));
        let mut edges = Vec::new();
        let mut seen: Vec<Vec<u32>> = vec![Vec::new(); users.names.len()];
        for h in data.train.iter() {
            let u = users.index[h.user.as_str()];
            for it in h.items.iter() {
                let i = *items
                    .index
                    .get(it.as_str())
                    .ok_or_else(|| Error::invalid_input(format!("user '{}': item '{it}' has no features", h.user)))?;
                if !seen[u].contains(&(i as u32)) {
                    seen[u].push(i as u32);
                    edges.push((u as u32, i as u32));
                }
            }
        }
        if edges.is_empty() {
            return Err(Error::invalid_input("no training interactions"));
        }
        let (mut feats, mut kinds) = (Vec::new(), Vec::new());
        for (kind, text) in [("visual", false), ("text", true)] {
            if let Some(f) = feature_matrix(data, &items, text, &dev)? {
                feats.push(f);
                kinds.push(kind.to_string());
            }
        }
        if feats.is_empty() {
            return Err(Error::invalid_input(
                "MICRO needs visual or text features; no item has either",
            ));
        }
        let model = Micro::new(self.params.model.clone(), feats, &edges, users.names.len(), data.seed)?;
        // Validation truth per training user (unknown users cannot be evaluated transductively).
        let mut truth: Vec<Vec<u32>> = vec![Vec::new(); users.names.len()];
        for h in data.valid.iter() {
            if let Some(&u) = users.index.get(h.user.as_str()) {
                truth[u].extend(
                    h.items
                        .iter()
                        .filter_map(|i| items.index.get(i.as_str()).map(|&i| i as u32)),
                );
            }
        }
        let opt_cfg = AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::default();
        let mut rng = ragar_core::rng::TorchGenerator::new(data.seed ^ 0x5eed);
        let n_items = items.names.len() as u32;
        let seen_sets: Vec<HashSet<u32>> = seen.iter().map(|s| s.iter().copied().collect()).collect();
        let mut stop = EarlyStopping::new(self.params.patience);
        let vars = model.params.vars.clone();
        for epoch in 0..self.params.epochs {
            let (mut loss_sum, mut steps) = (0.0, 0usize);
            // The reference's schedule: LambdaLR(0.96 ** (epoch / 50)).
            let lr = self.params.lr * 0.96f64.powf(epoch as f64 / 50.0);
            // Shuffle the interactions (Fisher-Yates on the torch generator's stream).
            let mut order: Vec<usize> = (0..edges.len()).collect();
            rng.shuffle(&mut order);
            // The learned graphs are rebuilt on the epoch's first batch and
            // reused, detached (as sparse matrices), for the rest: the
            // reference's schedule.
            let mut graphs: Option<Vec<crate::micro::Graph>> = None;
            for chunk in order.chunks(self.params.batch_size.max(1)) {
                let (mut u, mut p, mut n) = (Vec::new(), Vec::new(), Vec::new());
                for &e in chunk {
                    let (uu, pp) = edges[e];
                    let mut neg = rng.next_u32() % n_items;
                    let mut tries = 0;
                    while seen_sets[uu as usize].contains(&neg) && tries < 100 {
                        neg = rng.next_u32() % n_items;
                        tries += 1;
                    }
                    u.push(uu);
                    p.push(pp);
                    n.push(neg);
                }
                let emb = model
                    .forward_with(graphs.as_deref())
                    .map_err(model_err("MICRO forward"))?;
                if graphs.is_none() {
                    let g = emb.learned.iter().map(crate::micro::Graph::detached);
                    graphs = Some(
                        g.collect::<candle_core::Result<_>>()
                            .map_err(model_err("MICRO graphs"))?,
                    );
                }
                let [total, ..] = model.loss(&emb, &u, &p, &n).map_err(model_err("MICRO loss"))?;
                loss_sum += total.to_scalar::<f32>().map_err(model_err("MICRO loss"))? as f64;
                steps += 1;
                let grads = total.backward().map_err(model_err("MICRO backward"))?;
                opt.step(&vars, &grads, lr, 0.0, &opt_cfg)
                    .map_err(model_err("MICRO optimiser step"))?;
            }
            // Evaluation rebuilds the graphs from the epoch's final weights.
            let emb = model.forward().map_err(model_err("MICRO forward"))?;
            let scores = emb
                .users
                .matmul(&emb.items.t().map_err(model_err("MICRO"))?)
                .and_then(|s| s.to_vec2::<f32>())
                .map_err(model_err("MICRO evaluation"))?;
            let m = recall_ndcg(&scores, &seen, &truth, 10);
            // Training runs for minutes: say where it is (stderr, one line an epoch).
            eprintln!(
                "MICRO epoch {epoch}: loss {:.4}, valid recall@10 {:.4}, ndcg@10 {:.4}",
                loss_sum / steps.max(1) as f64,
                m.recall,
                m.ndcg
            );
            if stop.epoch(m.recall, m.ndcg, &vars).map_err(model_err("MICRO"))? {
                break;
            }
        }
        stop.restore(&vars).map_err(model_err("MICRO"))?;
        let emb = model.forward().map_err(model_err("MICRO forward"))?;
        self.trained = Some(Trained {
            model,
            emb,
            users,
            items,
            seen,
            kinds,
        });
        Ok(stop.report())
    }

    fn score(&self, queries: &[RankQuery]) -> Result<Vec<Vec<f32>>> {
        crate::device::on_pool(&self.device, || {
            let t = self.trained()?;
            let err = model_err("MICRO score");
            queries
                .iter()
                .enumerate()
                .map(|(qi, q)| {
                    let user = t.user_vector(q, qi, &self.device)?;
                    let mut out = vec![0f32; q.candidates.len()];
                    // Catalogue items as they are: one gather and one product.
                    let (mut plain, mut rows) = (Vec::new(), Vec::new());
                    for (ci, c) in q.candidates.iter().enumerate() {
                        let &item = t.items.index.get(c.item.as_str()).ok_or_else(|| {
                            Error::invalid_input(format!(
                                "query {qi}, candidate {ci}: item '{}' is not in the catalogue",
                                c.item
                            ))
                        })?;
                        if c.visual.is_none() && c.text.is_none() {
                            plain.push(ci);
                            rows.push(item as u32);
                        } else {
                            let feats = t.overrides(c, qi, ci, &self.device)?;
                            let emb = t.model.substituted_item(&t.emb, item, &feats).map_err(&err)?;
                            out[ci] = (&user * &emb)
                                .and_then(|x| x.sum_all())
                                .and_then(|x| x.to_scalar::<f32>())
                                .map_err(&err)?;
                        }
                    }
                    if !rows.is_empty() {
                        let idx = Tensor::new(rows.as_slice(), &self.device).map_err(&err)?;
                        let s: Vec<f32> = t
                            .emb
                            .items
                            .index_select(&idx, 0)
                            .and_then(|e| e.matmul(&user.unsqueeze(1)?))
                            .and_then(|s| s.flatten_all()?.to_vec1())
                            .map_err(&err)?;
                        for (ci, v) in plain.into_iter().zip(s) {
                            out[ci] = v;
                        }
                    }
                    Ok(out)
                })
                .collect()
        })
    }

    fn save(&self, path: &str) -> Result<()> {
        let t = self.trained()?;
        let mut w = StateWriter::default();
        for (n, v) in &t.model.params.vars {
            w.tensor(n, v.as_tensor()).map_err(model_err(path))?;
        }
        for (m, md) in t.model.modalities.iter().enumerate() {
            w.tensor(&format!("features.{m}"), &md.features)
                .map_err(model_err(path))?;
        }
        let edges: Vec<u32> = t
            .seen
            .iter()
            .enumerate()
            .flat_map(|(u, items)| items.iter().flat_map(move |&i| [u as u32, i]))
            .collect();
        w.u32s("edges", vec![edges.len() / 2, 2], &edges);
        let meta = serde_json::json!({"config": self.params.model, "users": t.users.names, "items": t.items.names, "modalities": t.kinds});
        w.write(path, "ragar.micro", &meta)
    }

    fn load(&mut self, path: &str) -> Result<()> {
        let r = StateReader::open(path, "ragar.micro", "a MICRO state")?;
        let cfg: MicroConfig = r.field("config")?;
        let users: Vec<String> = r.field("users")?;
        let items: Vec<String> = r.field("items")?;
        let flat = r.u32s("edges")?;
        let edges: Vec<(u32, u32)> = flat.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        let kinds: Vec<String> = r.field("modalities")?;
        let feats = (0..kinds.len())
            .map(|m| r.require(&format!("features.{m}"), None, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let model = Micro::new(cfg.clone(), feats, &edges, users.len(), 0)?;
        for (name, var) in &model.params.vars {
            var.set(&r.require(name, Some(var.as_tensor().dims()), &self.device)?)
                .map_err(model_err(path))?;
        }
        let mut seen = vec![Vec::new(); users.len()];
        for &(u, i) in &edges {
            seen[u as usize].push(i);
        }
        let emb = model.forward().map_err(model_err("MICRO forward"))?;
        self.params.model = cfg;
        self.trained = Some(Trained {
            model,
            emb,
            users: Ids::new(users.iter().map(String::as_str)),
            items: Ids::new(items.iter().map(String::as_str)),
            seen,
            kinds,
        });
        Ok(())
    }
}
