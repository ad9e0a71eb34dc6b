//! MICRO (Zhang et al., TKDE 2023, "Latent Structure Mining with
//! Contrastive Modality Fusion for Multimedia Recommendation"), the
//! multimodal ranking model RAGAR's reflection module and rank metrics use
//! (paper, Eq. 10 and Appendix).
//!
//! Reference implementation: the authors' PyTorch code (built on LATTICE):
//! per modality m, an item-item graph from the k nearest neighbours (cosine,
//! k = 10, weighted by similarity, self included) of the raw features,
//! mixed 0.9 / 0.1 with the same graph over a learned 64-d projection,
//! symmetrically normalised; one propagation of the item ID embeddings over
//! each graph gives h_m; an attention (Linear, tanh, Linear -> one logit per
//! item and modality, softmax over modalities) fuses them into h; users and
//! items also go through LightGCN (2 layers, mean of layers) on the
//! user-item graph; item = LightGCN item + L2-normalised h; score = dot.
//! Loss: BPR + 1e-5 * L2 of the batch embeddings / batch + 0.03 *
//! sum_m InfoNCE(h_m, h) at temperature 0.5. Our PyTorch transcription of
//! these definitions (scripts/fixtures/make_micro.py) is the parity reference.
//!
//! Scoring a generated image (MICRO is transductive; the paper does not say
//! how, this is our method): the candidate takes the place of the item it
//! replaces; its visual (and/or text) feature is swapped in, its kNN rows are
//! recomputed against the fixed catalogue in both the raw and learned spaces,
//! h is recomputed for that row only, and the candidate's item embedding is
//! LightGCN's embedding of the replaced item plus the new normalised h.
//! Users unseen in training are represented by the mean of their history
//! items' embeddings (said in the score's error-free path; documented here).

use crate::sparse::Sparse;
use candle_core::{DType, Tensor, Var, D};
use ragar_core::metrics::ranking::top_k;
use ragar_core::{Error, Result};
use std::collections::{HashMap, HashSet};

/// Hyper-parameters (the paper's MICRO defaults).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MicroConfig {
    /// Embedding width.
    #[serde(default = "d64")]
    pub dim: usize,
    /// Neighbours per item in each modality graph.
    #[serde(default = "ten")]
    pub knn_k: usize,
    /// Weight of the raw-feature graph against the learned one.
    #[serde(default = "lambda")]
    pub lambda: f64,
    /// LightGCN layers on the user-item graph.
    #[serde(default = "two")]
    pub layers: usize,
    /// L2 regularisation of the batch embeddings.
    #[serde(default = "reg")]
    pub reg_weight: f64,
    /// Weight of the contrastive (InfoNCE) term.
    #[serde(default = "cl")]
    pub cl_weight: f64,
    /// InfoNCE temperature.
    #[serde(default = "tau")]
    pub tau: f64,
}

fn d64() -> usize {
    64
}
fn ten() -> usize {
    10
}
fn lambda() -> f64 {
    0.9
}
fn two() -> usize {
    2
}
fn reg() -> f64 {
    1e-5
}
fn cl() -> f64 {
    0.03
}
fn tau() -> f64 {
    0.5
}

impl Default for MicroConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// A normalised kNN graph: `[n, k]` neighbour indices and weights, and the
/// inverse square-root degree of each row.
#[derive(Clone)]
pub struct Graph {
    /// Neighbour indices `[n, k]` (u32).
    pub idx: Tensor,
    /// Normalised weights `[n, k]`.
    pub val: Tensor,
    /// `d_i^-1/2` of each row `[n]`.
    pub inv: Tensor,
    /// The same graph as a fixed sparse matrix, for graphs without autograd.
    sparse: Option<Sparse>,
}

fn setup_err(e: candle_core::Error) -> Error {
    Error::model(format!("MICRO setup: {e}"))
}

impl Graph {
    /// The same graph cut from autograd (and so held as a sparse matrix).
    pub fn detached(&self) -> candle_core::Result<Graph> {
        let (idx, val) = (self.idx.to_vec2::<u32>()?, self.val.to_vec2::<f32>()?);
        let entries: Vec<(u32, u32, f32)> = idx
            .iter()
            .zip(&val)
            .enumerate()
            .flat_map(|(r, (is, vs))| is.iter().zip(vs).map(move |(&c, &v)| (r as u32, c, v)))
            .collect();
        Ok(Graph {
            idx: self.idx.clone(),
            val: self.val.detach(),
            inv: self.inv.detach(),
            sparse: Some(Sparse::new(idx.len(), idx.len(), &entries)),
        })
    }
}

/// Row-normalised features.
fn unit_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-12)?)
}

/// Top-k neighbour indices of each row of `q` among the rows of `keys`
/// (cosine), computed in chunks without autograd. Ties keep the lower index.
pub fn knn_indices(q: &Tensor, keys: &Tensor, k: usize) -> candle_core::Result<Vec<Vec<u32>>> {
    let (qn, kn) = (unit_rows(&q.detach())?, unit_rows(&keys.detach())?);
    let n = qn.dim(0)?;
    let mut out = Vec::with_capacity(n);
    let chunk = ((1 << 22) / kn.dim(0)?.max(1)).max(1);
    let none = HashSet::new();
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let sims: Vec<Vec<f32>> = qn.narrow(0, start, len)?.matmul(&kn.t()?)?.to_vec2()?;
        out.extend(sims.iter().map(|row| top_k(row, &none, k)));
    }
    Ok(out)
}

/// Cosine of each row of `q` with its listed neighbours among `keys`, `[n, k]`
/// (differentiable in both).
fn neighbour_cosines(q: &Tensor, keys: &Tensor, idx: &[Vec<u32>]) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, k) = (idx.len(), idx.first().map_or(0, |r| r.len()));
    let flat: Vec<u32> = idx.iter().flatten().copied().collect();
    let idx_t = Tensor::from_vec(flat, (n, k), q.device())?;
    let neigh = unit_rows(keys)?
        .index_select(&idx_t.flatten_all()?, 0)?
        .reshape((n, k, ()))?;
    let val = neigh.broadcast_mul(&unit_rows(q)?.unsqueeze(1)?)?.sum(D::Minus1)?;
    Ok((idx_t, val))
}

/// LATTICE's graph over `x`: kNN by cosine (self included), weighted by the
/// cosine, normalised `d_i^-1/2 a_ij d_j^-1/2` with d the row sums.
pub fn build_graph(x: &Tensor, k: usize) -> candle_core::Result<Graph> {
    let idx = knn_indices(x, x, k)?;
    let (idx_t, val) = neighbour_cosines(x, x, &idx)?;
    let inv = val.sum(1)?.clamp(1e-12, f64::MAX)?.sqrt()?.recip()?;
    let (n, k) = idx_t.dims2()?;
    let inv_j = inv.index_select(&idx_t.flatten_all()?, 0)?.reshape((n, k))?;
    let val = val.broadcast_mul(&inv.unsqueeze(1)?)?.mul(&inv_j)?;
    Ok(Graph {
        idx: idx_t,
        val,
        inv,
        sparse: None,
    })
}

/// The graph row of catalogue item `item` after its features became `row`
/// (`[1, d]`): neighbours among the catalogue with that row replaced; the
/// neighbours' degrees are the catalogue graph's (`cat`), the item's own
/// the new row's.
fn substituted_row(row: &Tensor, catalogue: &Tensor, item: usize, cat: &Graph, k: usize) -> candle_core::Result<Graph> {
    let keys = replace_row(catalogue, item, row)?;
    let idx = knn_indices(row, &keys, k)?;
    let (idx_t, val) = neighbour_cosines(row, &keys, &idx)?;
    let inv_self = val.sum(1)?.clamp(1e-12, f64::MAX)?.sqrt()?.recip()?;
    let key_inv = replace_row(&cat.inv.unsqueeze(1)?, item, &inv_self.unsqueeze(1)?)?.squeeze(1)?;
    let (n, k) = idx_t.dims2()?;
    let inv_j = key_inv.index_select(&idx_t.flatten_all()?, 0)?.reshape((n, k))?;
    let val = val.broadcast_mul(&inv_self.unsqueeze(1)?)?.mul(&inv_j)?;
    Ok(Graph {
        idx: idx_t,
        val,
        inv: inv_self,
        sparse: None,
    })
}

/// `h = A x` for a kNN graph.
fn propagate(g: &Graph, x: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(s) = &g.sparse {
        return s.matmul(x);
    }
    let (n, k) = g.idx.dims2()?;
    let neigh = x.index_select(&g.idx.flatten_all()?, 0)?.reshape((n, k, ()))?;
    neigh.broadcast_mul(&g.val.unsqueeze(2)?)?.sum(1)
}

/// One modality's fixed inputs.
pub struct Modality {
    /// Raw features `[items, d_m]`.
    pub features: Tensor,
    /// The raw-feature graph (fixed).
    raw: Graph,
}

/// The user-item graph with LightGCN's weights `1 / sqrt(d_u d_i)`.
pub struct Bipartite {
    /// `[users, items]`.
    user_item: Sparse,
    /// `[items, users]`.
    item_user: Sparse,
}

impl Bipartite {
    /// Edges `(user, item)` (deduplicated by the caller).
    pub fn new(edges: &[(u32, u32)], n_users: usize, n_items: usize) -> Self {
        let mut du = vec![0f32; n_users];
        let mut di = vec![0f32; n_items];
        for &(u, i) in edges {
            du[u as usize] += 1.0;
            di[i as usize] += 1.0;
        }
        let entries: Vec<(u32, u32, f32)> = edges
            .iter()
            .map(|&(u, i)| (u, i, 1.0 / (du[u as usize] * di[i as usize]).sqrt()))
            .collect();
        let user_item = Sparse::new(n_users, n_items, &entries);
        Bipartite {
            item_user: user_item.t(),
            user_item,
        }
    }

    /// LightGCN: mean of `layers + 1` propagations of `(eu, ei)`.
    fn lightgcn(&self, eu: &Tensor, ei: &Tensor, layers: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (mut u, mut i) = (eu.clone(), ei.clone());
        let (mut su, mut si) = (eu.clone(), ei.clone());
        for _ in 0..layers {
            (u, i) = (self.user_item.matmul(&i)?, self.item_user.matmul(&u)?);
            su = (su + &u)?;
            si = (si + &i)?;
        }
        let n = (layers + 1) as f64;
        Ok(((su / n)?, (si / n)?))
    }
}

/// The trainable parameters.
pub struct MicroParams {
    /// Every parameter by name.
    pub vars: Vec<(String, Var)>,
}

impl MicroParams {
    /// The named parameter.
    pub fn get(&self, name: &str) -> &Tensor {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("MICRO parameter {name}"))
            .1
            .as_tensor()
    }
}

/// What a forward pass produces.
pub struct Embeddings {
    /// `[users, dim]`.
    pub users: Tensor,
    /// `[items, dim]` (LightGCN + normalised h).
    pub items: Tensor,
    /// Per-modality h_m `[items, dim]`.
    pub h_m: Vec<Tensor>,
    /// Fused h `[items, dim]`.
    pub h: Tensor,
    /// LightGCN item embeddings alone `[items, dim]`.
    pub items_gcn: Tensor,
    /// The learned-feature graphs of this pass, per modality.
    pub learned: Vec<Graph>,
}

/// MICRO over fixed data.
pub struct Micro {
    /// Hyper-parameters.
    pub cfg: MicroConfig,
    /// Parameters.
    pub params: MicroParams,
    /// The modalities (visual, text), in that order.
    pub modalities: Vec<Modality>,
    /// The training user-item graph.
    pub graph: Bipartite,
}

impl Micro {
    /// Build the fixed graphs and initialise parameters (Xavier-normal as
    /// the reference, from `seed`). `features` holds one `[items, d_m]`
    /// tensor per modality.
    pub fn new(
        cfg: MicroConfig,
        features: Vec<Tensor>,
        edges: &[(u32, u32)],
        n_users: usize,
        seed: u64,
    ) -> Result<Self> {
        let dev = features
            .first()
            .map(|f| f.device().clone())
            .ok_or_else(|| Error::invalid_input("MICRO needs at least one modality"))?;
        let n_items = features[0].dim(0).map_err(setup_err)?;
        let mut g = ragar_core::rng::TorchGenerator::new(seed);
        let mut xavier = |rows: usize, cols: usize| -> Result<Var> {
            let std = (2.0 / (rows + cols) as f32).sqrt();
            let v: Vec<f32> = g
                .randn((rows * cols).max(16))?
                .into_iter()
                .take(rows * cols)
                .map(|x| x * std)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &dev).map_err(setup_err)?).map_err(setup_err)
        };
        let d = cfg.dim;
        let mut vars = vec![
            ("user_embedding".to_string(), xavier(n_users, d)?),
            ("item_embedding".to_string(), xavier(n_items, d)?),
        ];
        let mut modalities = Vec::new();
        for (m, f) in features.into_iter().enumerate() {
            if f.dim(0).map_err(setup_err)? != n_items {
                return Err(Error::invalid_input(format!(
                    "modality {m}: features for {} items, expected {n_items}",
                    f.dims()[0]
                )));
            }
            vars.push((
                format!("projection.{m}.weight"),
                xavier(d, f.dim(1).map_err(setup_err)?)?,
            ));
            let raw = build_graph(&f, cfg.knn_k)
                .and_then(|g| g.detached())
                .map_err(setup_err)?;
            modalities.push(Modality { features: f, raw });
        }
        vars.push(("attention.0.weight".into(), xavier(d, d)?));
        vars.push((
            "attention.0.bias".into(),
            Var::from_tensor(&Tensor::zeros(d, DType::F32, &dev).map_err(setup_err)?).map_err(setup_err)?,
        ));
        vars.push(("attention.2.weight".into(), xavier(1, d)?));
        let graph = Bipartite::new(edges, n_users, n_items);
        Ok(Micro {
            cfg,
            params: MicroParams { vars },
            modalities,
            graph,
        })
    }

    /// Learned projection of modality m's features.
    fn projected(&self, m: usize, f: &Tensor) -> candle_core::Result<Tensor> {
        f.matmul(&self.params.get(&format!("projection.{m}.weight")).t()?)
    }

    /// Per-item attention logits for one modality's h_m.
    fn attention_logit(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.params;
        h.matmul(&p.get("attention.0.weight").t()?)?
            .broadcast_add(p.get("attention.0.bias"))?
            .tanh()?
            .matmul(&p.get("attention.2.weight").t()?)
    }

    /// The item-item signal h_m of every modality, the fused h, and the
    /// learned graphs (built now, or `cached` ones, detached).
    fn item_signals(&self, cached: Option<&[Graph]>) -> candle_core::Result<(Vec<Tensor>, Tensor, Vec<Graph>)> {
        let ei = self.params.get("item_embedding");
        let lam = self.cfg.lambda;
        let (mut hs, mut learned) = (Vec::new(), Vec::new());
        for (m, md) in self.modalities.iter().enumerate() {
            let g = match cached {
                Some(gs) => gs[m].clone(),
                None => build_graph(&self.projected(m, &md.features)?, self.cfg.knn_k)?,
            };
            hs.push(((propagate(&md.raw, ei)? * lam)? + (propagate(&g, ei)? * (1.0 - lam))?)?);
            learned.push(g);
        }
        let h = self.fuse(&hs)?;
        Ok((hs, h, learned))
    }

    fn fuse(&self, hs: &[Tensor]) -> candle_core::Result<Tensor> {
        let logits = Tensor::cat(
            &hs.iter()
                .map(|h| self.attention_logit(h))
                .collect::<candle_core::Result<Vec<_>>>()?,
            1,
        )?;
        let w = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let mut h = hs[0].broadcast_mul(&w.narrow(1, 0, 1)?)?;
        for (m, hm) in hs.iter().enumerate().skip(1) {
            h = (h + hm.broadcast_mul(&w.narrow(1, m, 1)?)?)?;
        }
        Ok(h)
    }

    /// Full forward pass, building the learned graphs from the current
    /// projections (differentiable through their weights).
    pub fn forward(&self) -> candle_core::Result<Embeddings> {
        self.forward_with(None)
    }

    /// Forward pass reusing learned graphs from an earlier pass, detached.
    /// The reference trainer does this: it rebuilds the learned graphs on
    /// the first batch of an epoch (`build_item_graph=True`) and detaches
    /// them for the rest, so an epoch costs one kNN search per modality.
    pub fn forward_with(&self, cached: Option<&[Graph]>) -> candle_core::Result<Embeddings> {
        let (h_m, h, learned) = self.item_signals(cached)?;
        let (users, items_gcn) = self.graph.lightgcn(
            self.params.get("user_embedding"),
            self.params.get("item_embedding"),
            self.cfg.layers,
        )?;
        let items = (&items_gcn + unit_rows(&h)?)?;
        Ok(Embeddings {
            users,
            items,
            h_m,
            h,
            items_gcn,
            learned,
        })
    }

    /// BPR + L2 + InfoNCE for a batch of `(user, positive, negative)` triples;
    /// returns `[total, bpr, reg, cl]`.
    pub fn loss(&self, e: &Embeddings, u: &[u32], pos: &[u32], neg: &[u32]) -> candle_core::Result<[Tensor; 4]> {
        let dev = e.users.device();
        let t = |v: &[u32]| Tensor::new(v, dev);
        let (ut, pt, nt) = (t(u)?, t(pos)?, t(neg)?);
        let (ue, pe, ne) = (
            e.users.index_select(&ut, 0)?,
            e.items.index_select(&pt, 0)?,
            e.items.index_select(&nt, 0)?,
        );
        let sp = (&ue * &pe)?.sum(1)?;
        let sn = (&ue * &ne)?.sum(1)?;
        // -log sigmoid(x) = softplus(-x), written stably.
        let x = (sp - sn)?;
        let bpr = softplus(&x.neg()?)?.mean_all()?;
        let b = u.len() as f64;
        let reg = ((ue.sqr()?.sum_all()? + pe.sqr()?.sum_all()?)? + ne.sqr()?.sum_all()?)?;
        let reg = ((reg * 0.5)? / b)?;
        let mut cl = Tensor::new(0f32, dev)?;
        let items = t(pos)?;
        let fused = unit_rows(&e.h.index_select(&items, 0)?)?;
        for hm in &e.h_m {
            cl = (cl + info_nce(&unit_rows(&hm.index_select(&items, 0)?)?, &fused, self.cfg.tau)?)?;
        }
        let total = ((&bpr + (&reg * self.cfg.reg_weight)?)? + (&cl * self.cfg.cl_weight)?)?;
        Ok([total, bpr, reg, cl])
    }

    /// The item embedding of `item` with modality features replaced
    /// (`None` keeps the catalogue's), by re-deriving that item's graph rows.
    pub fn substituted_item(
        &self,
        e: &Embeddings,
        item: usize,
        features: &[Option<Tensor>],
    ) -> candle_core::Result<Tensor> {
        if features.iter().all(Option::is_none) {
            return e.items.get(item);
        }
        let ei = self.params.get("item_embedding");
        let lam = self.cfg.lambda;
        let mut hs: Vec<Tensor> = Vec::new();
        for (m, md) in self.modalities.iter().enumerate() {
            let row = match features.get(m).and_then(|f| f.as_ref()) {
                Some(f) => f.reshape((1, ()))?,
                None => md.features.narrow(0, item, 1)?,
            };
            let k = self.cfg.knn_k;
            let raw = substituted_row(&row, &md.features, item, &md.raw, k)?;
            let p_cat = self.projected(m, &md.features)?;
            let learned = substituted_row(&self.projected(m, &row)?, &p_cat, item, &e.learned[m], k)?;
            hs.push(((propagate(&raw, ei)? * lam)? + (propagate(&learned, ei)? * (1.0 - lam))?)?);
        }
        let h = self.fuse(&hs)?;
        (e.items_gcn.narrow(0, item, 1)? + unit_rows(&h)?)?.squeeze(0)
    }
}

fn replace_row(x: &Tensor, i: usize, row: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let mut parts = Vec::new();
    if i > 0 {
        parts.push(x.narrow(0, 0, i)?);
    }
    parts.push(row.clone());
    if i + 1 < n {
        parts.push(x.narrow(0, i + 1, n - i - 1)?);
    }
    Tensor::cat(&parts, 0)
}

/// `log(1 + e^x)`, stable for large |x|.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    // max(x, 0) + log(1 + e^-|x|)
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// InfoNCE between row-aligned unit views: mean of `-log softmax_j(a_i . b_j / tau)[i]`.
fn info_nce(a: &Tensor, b: &Tensor, tau: f64) -> candle_core::Result<Tensor> {
    let logits = (a.matmul(&b.t()?)? / tau)?;
    let lse = {
        let max = logits.max_keepdim(1)?.detach();
        (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?
    };
    let diag = ((a * b)?.sum_keepdim(1)? / tau)?;
    (lse - diag)?.mean_all()
}

/// Index helpers for users and items by id.
pub struct Ids {
    /// Id -> row.
    pub index: HashMap<String, usize>,
    /// Row -> id.
    pub names: Vec<String>,
}

impl Ids {
    /// Rows in first-seen order.
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut index = HashMap::new();
        let mut names = Vec::new();
        for id in ids {
            if !index.contains_key(id) {
                index.insert(id.to_string(), names.len());
                names.push(id.to_string());
            }
        }
        Ids { index, names }
    }
}
