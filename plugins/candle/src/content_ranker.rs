//! An inductive, content-based sequential ranker: the second Ranker, which
//! scores any image from its features alone (no catalogue substitution), so
//! swapping it for MICRO is one config line.
//!
//! Model (ours, in the spirit of attentive sequential recommenders such as
//! SASRec / DIN, kept small): an item is `x = W_v v + W_t t` (its visual and
//! text features projected to `dim`); a user is the attention-pooled
//! history, `p = sum_j softmax_j(w . tanh(A (x_j + r_j))) x_j` with a learned
//! recency embedding `r_j` for the j-th most recent of the last `max_len`
//! items; the score is `p . x`. Trained on next-item prediction (every
//! prefix of a training history predicts its next item) with BPR against one
//! uniformly drawn negative, Adam, early stopping on validation Recall@10.

use crate::adamw::{AdamW, AdamWConfig};
use crate::device::{device, model_err};
use crate::early_stopping::EarlyStopping;
use crate::state::{StateReader, StateWriter};
use candle_core::{DType, Device, Tensor, Var, D};
use ragar_core::component::Probe;
use ragar_core::metrics::ranking::recall_ndcg;
use ragar_core::stage::{FitReport, RankQuery, Ranker, RankerData};
use ragar_core::{ComponentSpec, Error, Result};
use std::collections::HashMap;

/// `params` of the `ranker: content` component.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContentParams {
    /// Representation width.
    #[serde(default = "d64")]
    pub dim: usize,
    /// History items the user representation reads (most recent).
    #[serde(default = "twenty")]
    pub max_len: usize,
    /// Most epochs.
    #[serde(default = "epochs")]
    pub epochs: usize,
    /// Examples per step.
    #[serde(default = "batch")]
    pub batch_size: usize,
    /// Adam learning rate.
    #[serde(default = "lr")]
    pub lr: f64,
    /// Epochs without a better validation Recall@10 before stopping.
    #[serde(default = "patience")]
    pub patience: usize,
    /// A trained state to load.
    #[serde(default)]
    pub checkpoint: Option<String>,
}

fn d64() -> usize {
    64
}
fn twenty() -> usize {
    20
}
fn epochs() -> usize {
    50
}
fn batch() -> usize {
    256
}
fn lr() -> f64 {
    1e-3
}
fn patience() -> usize {
    5
}

/// The content ranker component.
pub struct ContentRanker {
    params: ContentParams,
    vars: Vec<(String, Var)>,
    /// Catalogue features by item id (for histories and plain candidates).
    items: HashMap<String, (Vec<f32>, Vec<f32>)>,
    dims: (usize, usize),
    device: Device,
}

impl ContentRanker {
    /// Build from `params:`; loads `checkpoint` when given.
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        let params: ContentParams = spec.params()?;
        let mut r = ContentRanker {
            params: params.clone(),
            vars: Vec::new(),
            items: HashMap::new(),
            dims: (0, 0),
            device: device(spec)?,
        };
        if let Some(c) = &params.checkpoint {
            r.load(&spec.resolve_path(c).to_string_lossy())?;
        }
        Ok(r)
    }

    /// Params (and the checkpoint file) without loading.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        let p: ContentParams = spec.params()?;
        match &p.checkpoint {
            Some(c) => Probe::default().file(&spec.resolve_path(c)),
            None => Ok(Probe::default()),
        }
    }

    fn init(&mut self, dv: usize, dt: usize, seed: u64) -> Result<()> {
        let d = self.params.dim;
        let mut g = ragar_core::rng::TorchGenerator::new(seed);
        let mut var = |shape: (usize, usize), scale: f32| -> Result<Var> {
            let n = shape.0 * shape.1;
            let v: Vec<f32> = g.randn(n.max(16))?.into_iter().take(n).map(|x| x * scale).collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &self.device).map_err(model_err("content ranker"))?)
                .map_err(model_err("content ranker"))
        };
        if dv + dt == 0 {
            return Err(Error::invalid_input(
                "the content ranker needs visual or text features; items have neither",
            ));
        }
        // A modality no item has (MovieLens without posters) gets no weight.
        self.vars = Vec::new();
        if dv > 0 {
            self.vars
                .push(("visual.weight".into(), var((d, dv), (1.0 / dv as f32).sqrt())?));
        }
        if dt > 0 {
            self.vars
                .push(("text.weight".into(), var((d, dt), (1.0 / dt as f32).sqrt())?));
        }
        self.vars.extend([
            ("recency".into(), var((self.params.max_len, d), 0.02)?),
            ("attention.weight".into(), var((d, d), (1.0 / d as f32).sqrt())?),
            ("attention.query".into(), var((1, d), (1.0 / d as f32).sqrt())?),
        ]);
        self.dims = (dv, dt);
        Ok(())
    }

    fn var(&self, name: &str) -> &Tensor {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .expect("created in init")
            .1
            .as_tensor()
    }

    /// `x = W_v v + W_t t` for `[n, dv]`, `[n, dt]`.
    fn embed(&self, v: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        match self.dims {
            (0, _) => t.matmul(&self.var("text.weight").t()?),
            (_, 0) => v.matmul(&self.var("visual.weight").t()?),
            _ => v.matmul(&self.var("visual.weight").t()?)? + t.matmul(&self.var("text.weight").t()?)?,
        }
    }

    /// User representations for histories given as `[b, L, d]` item
    /// embeddings (most recent last) and a `[b, L]` mask (1 = item).
    fn pool(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let l = x.dim(1)?;
        // Histories are left-padded with the most recent item last; recency row 0 = most recent.
        let rev = Tensor::from_vec((0..l as u32).rev().collect::<Vec<_>>(), l, x.device())?;
        let rec = self.var("recency").narrow(0, 0, l)?.index_select(&rev, 0)?;
        let h = x.broadcast_add(&rec.unsqueeze(0)?)?;
        let a = h.broadcast_matmul(&self.var("attention.weight").t()?)?.tanh()?;
        let logits = a.broadcast_matmul(&self.var("attention.query").t()?)?.squeeze(2)?;
        let logits = (logits + ((mask - 1.0)? * 1e9)?)?;
        let w = candle_nn::ops::softmax(&logits, D::Minus1)?;
        w.unsqueeze(1)?.matmul(x)?.squeeze(1)
    }

    /// `[b, L, d]` history embeddings and mask for item-id histories (last `max_len`, left-padded).
    fn histories(&self, hs: &[Vec<&(Vec<f32>, Vec<f32>)>]) -> candle_core::Result<(Tensor, Tensor)> {
        let l = self.params.max_len;
        let (dv, dt) = self.dims;
        let (mut v, mut t, mut m) = (Vec::new(), Vec::new(), Vec::new());
        for h in hs {
            let tail = &h[h.len().saturating_sub(l)..];
            for _ in tail.len()..l {
                v.extend(std::iter::repeat_n(0f32, dv));
                t.extend(std::iter::repeat_n(0f32, dt));
                m.push(0f32);
            }
            for (fv, ft) in tail {
                v.extend(fv);
                t.extend(ft);
                m.push(1.0);
            }
        }
        let b = hs.len();
        let x = self.embed(
            &Tensor::from_vec(v, (b * l, dv), &self.device)?,
            &Tensor::from_vec(t, (b * l, dt), &self.device)?,
        )?;
        Ok((x.reshape((b, l, ()))?, Tensor::from_vec(m, (b, l), &self.device)?))
    }

    fn all_items(&self, names: &[String]) -> candle_core::Result<Tensor> {
        let (dv, dt) = self.dims;
        let v: Vec<f32> = names.iter().flat_map(|n| self.items[n].0.clone()).collect();
        let t: Vec<f32> = names.iter().flat_map(|n| self.items[n].1.clone()).collect();
        self.embed(
            &Tensor::from_vec(v, (names.len(), dv), &self.device)?,
            &Tensor::from_vec(t, (names.len(), dt), &self.device)?,
        )
    }
}

impl Ranker for ContentRanker {
    fn fit(&mut self, data: &RankerData) -> Result<FitReport> {
        let first = data
            .items
            .first()
            .ok_or_else(|| Error::invalid_input("no item features"))?;
        let (dv, dt) = (first.visual.numel(), first.text.numel());
        self.items.clear();
        for f in data.items.iter() {
            if f.visual.numel() != dv || f.text.numel() != dt {
                return Err(Error::invalid_input(format!(
                    "item '{}': features of {} + {} values, others have {dv} + {dt}",
                    f.item,
                    f.visual.numel(),
                    f.text.numel()
                )));
            }
            self.items
                .insert(f.item.to_string(), (f.visual.to_f32_vec(), f.text.to_f32_vec()));
        }
        self.init(dv, dt, data.seed)?;
        let names: Vec<String> = data.items.iter().map(|f| f.item.to_string()).collect();
        let index: HashMap<&str, u32> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as u32)).collect();
        let lookup = |h: &ragar_core::stage::UserHistory| -> Result<Vec<u32>> {
            h.items
                .iter()
                .map(|i| {
                    index
                        .get(i.as_str())
                        .copied()
                        .ok_or_else(|| Error::invalid_input(format!("user '{}': item '{i}' has no features", h.user)))
                })
                .collect()
        };
        // Next-item examples from every prefix of every training history.
        let mut examples: Vec<(Vec<u32>, u32)> = Vec::new();
        let mut train_hist: Vec<Vec<u32>> = Vec::new();
        for h in data.train.iter() {
            let ids = lookup(h)?;
            for k in 1..ids.len() {
                examples.push((ids[..k].to_vec(), ids[k]));
            }
            train_hist.push(ids);
        }
        if examples.is_empty() {
            return Err(Error::invalid_input("no training history has two items"));
        }
        let truth: Vec<Vec<u32>> = data
            .train
            .iter()
            .map(|h| {
                data.valid
                    .iter()
                    .filter(|v| v.user == h.user)
                    .flat_map(|v| v.items.iter().filter_map(|i| index.get(i.as_str()).copied()))
                    .collect()
            })
            .collect();
        let adam = AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::default();
        let mut rng = ragar_core::rng::TorchGenerator::new(data.seed ^ 0xc0117e);
        let err = model_err("content ranker training");
        let mut stop = EarlyStopping::new(self.params.patience);
        for _ in 0..self.params.epochs {
            let mut order: Vec<usize> = (0..examples.len()).collect();
            rng.shuffle(&mut order);
            for chunk in order.chunks(self.params.batch_size.max(1)) {
                let hs: Vec<Vec<&(Vec<f32>, Vec<f32>)>> = chunk
                    .iter()
                    .map(|&e| examples[e].0.iter().map(|&i| &self.items[&names[i as usize]]).collect())
                    .collect();
                let pos: Vec<String> = chunk.iter().map(|&e| names[examples[e].1 as usize].clone()).collect();
                let neg: Vec<String> = chunk
                    .iter()
                    .map(|&e| {
                        let mut n = rng.next_u32() as usize % names.len();
                        if n as u32 == examples[e].1 {
                            n = (n + 1) % names.len();
                        }
                        names[n].clone()
                    })
                    .collect();
                let loss = (|| -> candle_core::Result<Tensor> {
                    let (x, m) = self.histories(&hs)?;
                    let p = self.pool(&x, &m)?;
                    let sp = (&p * self.all_items(&pos)?)?.sum(1)?;
                    let sn = (&p * self.all_items(&neg)?)?.sum(1)?;
                    let d = (sp - sn)?.neg()?;
                    (d.relu()? + (d.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()
                })()
                .map_err(&err)?;
                let grads = loss.backward().map_err(&err)?;
                opt.step(&self.vars, &grads, self.params.lr, 0.0, &adam).map_err(&err)?;
            }
            let scores = (|| -> candle_core::Result<Vec<Vec<f32>>> {
                let hs: Vec<Vec<&(Vec<f32>, Vec<f32>)>> = train_hist
                    .iter()
                    .map(|h| h.iter().map(|&i| &self.items[&names[i as usize]]).collect())
                    .collect();
                let (x, m) = self.histories(&hs)?;
                self.pool(&x, &m)?.matmul(&self.all_items(&names)?.t()?)?.to_vec2()
            })()
            .map_err(&err)?;
            let m = recall_ndcg(&scores, &train_hist, &truth, 10);
            if stop.epoch(m.recall, m.ndcg, &self.vars).map_err(&err)? {
                break;
            }
        }
        stop.restore(&self.vars).map_err(&err)?;
        Ok(stop.report())
    }

    fn score(&self, queries: &[RankQuery]) -> Result<Vec<Vec<f32>>> {
        crate::device::on_pool(&self.device, || {
            if self.vars.is_empty() {
                return Err(Error::config(
                    "the content ranker is not trained: run `ragar train-ranker` or set params.checkpoint",
                ));
            }
            let err = model_err("content ranker scoring");
            queries
                .iter()
                .enumerate()
                .map(|(qi, q)| {
                    let feat = |id: &str| -> Result<&(Vec<f32>, Vec<f32>)> {
                        self.items.get(id).ok_or_else(|| {
                            Error::invalid_input(format!("query {qi}: item '{id}' has no known features"))
                        })
                    };
                    let hist = q
                        .history
                        .items
                        .iter()
                        .map(|i| feat(i.as_str()))
                        .collect::<Result<Vec<_>>>()?;
                    let (x, m) = self.histories(&[hist]).map_err(&err)?;
                    let p = self.pool(&x, &m).map_err(&err)?;
                    q.candidates
                        .iter()
                        .enumerate()
                        .map(|(ci, c)| {
                            let (v, t) = match (c.visual.as_ref().into_option(), c.text.as_ref().into_option()) {
                                (Some(v), Some(t)) => (v.to_f32_vec(), t.to_f32_vec()),
                                (v, t) => {
                                    let own = feat(c.item.as_str())?;
                                    (
                                        v.map_or(own.0.clone(), |v| v.to_f32_vec()),
                                        t.map_or(own.1.clone(), |t| t.to_f32_vec()),
                                    )
                                }
                            };
                            if (v.len(), t.len()) != self.dims {
                                return Err(Error::invalid_input(format!(
                                    "query {qi}, candidate {ci}: features of {} + {} values, the model reads {} + {}",
                                    v.len(),
                                    t.len(),
                                    self.dims.0,
                                    self.dims.1
                                )));
                            }
                            let x = self
                                .embed(
                                    &Tensor::from_vec(v, (1, self.dims.0), &self.device).map_err(&err)?,
                                    &Tensor::from_vec(t, (1, self.dims.1), &self.device).map_err(&err)?,
                                )
                                .map_err(&err)?;
                            (&p * &x)
                                .and_then(|s| s.sum_all())
                                .and_then(|s| s.to_dtype(DType::F32)?.to_scalar::<f32>())
                                .map_err(&err)
                        })
                        .collect()
                })
                .collect()
        })
    }

    fn save(&self, path: &str) -> Result<()> {
        if self.vars.is_empty() {
            return Err(Error::config("nothing to save: the content ranker is not trained"));
        }
        let mut w = StateWriter::default();
        for (n, v) in &self.vars {
            w.tensor(n, v.as_tensor()).map_err(model_err(path))?;
        }
        let mut names: Vec<&String> = self.items.keys().collect();
        names.sort();
        let (dv, dt) = self.dims;
        let fv: Vec<f32> = names.iter().flat_map(|n| self.items[*n].0.clone()).collect();
        let ft: Vec<f32> = names.iter().flat_map(|n| self.items[*n].1.clone()).collect();
        let t = |v: Vec<f32>, d: usize| Tensor::from_vec(v, (names.len(), d), &self.device).map_err(model_err(path));
        w.tensor("features.visual", &t(fv, dv)?).map_err(model_err(path))?;
        w.tensor("features.text", &t(ft, dt)?).map_err(model_err(path))?;
        w.write(
            path,
            "ragar.content",
            &serde_json::json!({"items": names, "params": self.params}),
        )
    }

    fn load(&mut self, path: &str) -> Result<()> {
        let r = StateReader::open(path, "ragar.content", "a content-ranker state")?;
        let names: Vec<String> = r.field("items")?;
        let saved: ContentParams = r.field("params")?;
        let fv = r.require("features.visual", None, &self.device)?;
        let ft = r.require("features.text", None, &self.device)?;
        let (dv, dt) = (fv.dim(1).map_err(model_err(path))?, ft.dim(1).map_err(model_err(path))?);
        self.params.dim = saved.dim;
        self.params.max_len = saved.max_len;
        self.init(dv, dt, 0)?;
        for (name, var) in &self.vars {
            var.set(&r.require(name, Some(var.as_tensor().dims()), &self.device)?)
                .map_err(model_err(path))?;
        }
        let rows = |t: &Tensor| t.to_vec2::<f32>().map_err(model_err(path));
        let (fv, ft) = (rows(&fv)?, rows(&ft)?);
        self.items = names.into_iter().zip(fv.into_iter().zip(ft)).collect();
        Ok(())
    }
}
