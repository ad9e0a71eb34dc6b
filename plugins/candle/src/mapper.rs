//! RAGAR's trainable Mapper: the Modal Mapper (Eq. 8, GILL's) and the
//! Balance Calibrator (Eq. 9), with the reflection losses (Eq. 11-15) and
//! its own AdamW, on candle's autograd.
//!
//! References: GILL (Koh et al. 2023; `gill/layers.py`, `TextFcLayer`
//! mode `gill_mapper`): `fc` Linear(d_llm -> 512), `tfm` =
//! `torch.nn.Transformer(d_model 512, 4 encoder + 4 decoder layers, 4 heads,
//! FFN 2048, ReLU, dropout 0, norm_first=True, batch_first=True)` whose
//! decoder reads 77 learned `query_embs`, then `model` Linear(512 -> 768).
//! Weight names are GILL's / PyTorch's (`tfm.encoder.layers.0.self_attn.in_proj_weight`,
//! ...), so a GILL mapper checkpoint loads as the Modal Mapper.
//! `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_` are replayed
//! exactly (tests/fixtures: one step against PyTorch).
//!
//! Choices the paper leaves open, and ours (each a documented parameter):
//! - Eq. 8 "concatenate the text-related embedding and the image-related
//!   embedding": the text-related embedding is one more token of the
//!   mapper's input sequence, before the [IMG] states.
//! - Eq. 9 Balance Calibrator: `preference = mapped + MHA(LN(mapped),
//!   kw, kw)`, the keyword feature (one vector from the text encoder)
//!   projected by `calibrator.kw_proj` into `keyword_tokens` tokens of the
//!   output width: with a single key, attention would give every query the
//!   same value and the query side would learn nothing.
//! - Eq. 11-12 rank loss: `-mean_i (r_i - margin) * log N(z_i; mu, sigma^2 I)`
//!   with `z_i = mu + sigma * eps_i` held fixed and `mu` the general
//!   preference; the log-density is averaged over dimensions (a constant
//!   rescaling of the sum that keeps the loss in a usable range).
//! - Eq. 13 calibrator loss: `1 - cos(P_cal(mean_tokens(preference)), retrieval preference)`,
//!   `P_cal` a learned Linear when the widths differ (identity otherwise).
//! - Eq. 14 semantic loss: mean squared error to a `[77, 768]` target (the
//!   SD text-encoder output of the reference caption, GILL's target), or
//!   `1 - cos(P_sem(mean_tokens(mapped)), target)` for a vector target.

use crate::adamw::{AdamW, AdamWConfig};
use crate::device::{device, model_err};
use crate::state::{StateReader, StateWriter};
use candle_core::{DType, Device, Tensor, Var, D};
use ragar_core::component::Probe;
use ragar_core::stage::{LossConfig, Mapper, MapperInfo, MapperInput, MapperOutput, ReflectionSample, TrainStats};
use ragar_core::{ComponentSpec, Error, Result};
use std::collections::BTreeMap;

pub use ragar_core::mapper::MapperConfig;

/// The parameters, by checkpoint name.
struct Params(BTreeMap<String, Var>);

impl Params {
    fn t(&self, name: &str) -> &Tensor {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("mapper parameter {name} is created in Params::init"))
            .as_tensor()
    }
}

/// `x @ w^T + b` over the last dimension of any-rank `x`.
fn linear(p: &Params, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    let w = p.t(&format!("{name}.weight"));
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("rank >= 1");
    let y = x.reshape(((), k))?.matmul(&w.t()?)?;
    let y = match p.0.get(&format!("{name}.bias")) {
        Some(b) => y.broadcast_add(b.as_tensor())?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

/// LayerNorm from differentiable primitives (candle's fused kernel has no backward).
fn layer_norm(p: &Params, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let c = x.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(p.t(&format!("{name}.weight")))?
        .broadcast_add(p.t(&format!("{name}.bias")))
}

/// `torch.nn.MultiheadAttention` (packed in-projection), batch first.
fn mha(p: &Params, name: &str, q: &Tensor, kv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let w = p.t(&format!("{name}.in_proj_weight"));
    let b = p.t(&format!("{name}.in_proj_bias"));
    let d = w.dim(1)?;
    let proj = |x: &Tensor, i: usize| -> candle_core::Result<Tensor> {
        let (bs, s, _) = x.dims3()?;
        let y = x
            .reshape((bs * s, d))?
            .matmul(&w.narrow(0, i * d, d)?.t()?)?
            .broadcast_add(&b.narrow(0, i * d, d)?)?;
        y.reshape((bs, s, heads, d / heads))?.transpose(1, 2)?.contiguous()
    };
    let (qh, kh, vh) = (proj(q, 0)?, proj(kv, 1)?, proj(kv, 2)?);
    let scores = (qh.matmul(&kh.t()?)? / ((d / heads) as f64).sqrt())?;
    let attn = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&vh)?;
    let (bs, _, s, _) = attn.dims4()?;
    linear(
        p,
        &format!("{name}.out_proj"),
        &attn.transpose(1, 2)?.reshape((bs, s, d))?,
    )
}

fn ffn(p: &Params, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    linear(
        p,
        &format!("{name}.linear2"),
        &linear(p, &format!("{name}.linear1"), x)?.relu()?,
    )
}

/// The Modal Mapper + Balance Calibrator component.
pub struct RagarMapper {
    cfg: MapperConfig,
    params: Params,
    optimizer: AdamW,
    device: Device,
}

/// Parameter names and shapes, in checkpoint order.
fn shapes(c: &MapperConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, o) = (c.hidden_dim, c.ffn_dim, c.output_dim);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("fc.weight".into(), vec![h, c.input_dim]),
        ("fc.bias".into(), vec![h]),
        ("query_embs".into(), vec![1, c.n_queries, h]),
        ("model.weight".into(), vec![o, h]),
        ("model.bias".into(), vec![o]),
    ];
    let attn = |v: &mut Vec<(String, Vec<usize>)>, p: &str, d: usize| {
        v.push((format!("{p}.in_proj_weight"), vec![3 * d, d]));
        v.push((format!("{p}.in_proj_bias"), vec![3 * d]));
        v.push((format!("{p}.out_proj.weight"), vec![d, d]));
        v.push((format!("{p}.out_proj.bias"), vec![d]));
    };
    let norm = |v: &mut Vec<(String, Vec<usize>)>, p: &str, d: usize| {
        v.push((format!("{p}.weight"), vec![d]));
        v.push((format!("{p}.bias"), vec![d]));
    };
    for (part, norms) in [("encoder", 2), ("decoder", 3)] {
        for i in 0..c.layers {
            let l = format!("tfm.{part}.layers.{i}");
            attn(&mut v, &format!("{l}.self_attn"), h);
            if part == "decoder" {
                attn(&mut v, &format!("{l}.multihead_attn"), h);
            }
            v.push((format!("{l}.linear1.weight"), vec![f, h]));
            v.push((format!("{l}.linear1.bias"), vec![f]));
            v.push((format!("{l}.linear2.weight"), vec![h, f]));
            v.push((format!("{l}.linear2.bias"), vec![h]));
            for n in 1..=norms {
                norm(&mut v, &format!("{l}.norm{n}"), h);
            }
        }
        norm(&mut v, &format!("tfm.{part}.norm"), h);
    }
    v.push((
        "calibrator.kw_proj.weight".into(),
        vec![c.keyword_tokens * o, c.keyword_dim],
    ));
    v.push(("calibrator.kw_proj.bias".into(), vec![c.keyword_tokens * o]));
    norm(&mut v, "calibrator.norm", o);
    attn(&mut v, "calibrator.attn", o);
    if c.retrieval_dim != o {
        v.push(("calibrator.cal_proj.weight".into(), vec![c.retrieval_dim, o]));
    }
    if c.semantic_dim != 0 && c.semantic_dim != o {
        v.push(("calibrator.sem_proj.weight".into(), vec![c.semantic_dim, o]));
    }
    v
}

impl RagarMapper {
    /// A freshly initialised mapper (PyTorch's default initialisation
    /// scales: uniform +-1/sqrt(fan_in) for linear layers, N(0, 1) queries,
    /// ones and zeros for norms), from `cfg.seed`.
    pub fn new(cfg: MapperConfig, device: Device) -> Result<Self> {
        if !cfg.hidden_dim.is_multiple_of(cfg.heads) || !cfg.output_dim.is_multiple_of(cfg.calibrator_heads) {
            return Err(Error::config(format!(
                "mapper: hidden_dim {} must divide by heads {} and output_dim {} by calibrator_heads {}",
                cfg.hidden_dim, cfg.heads, cfg.output_dim, cfg.calibrator_heads
            )));
        }
        let mut g = ragar_core::rng::TorchGenerator::new(cfg.seed);
        let mut params = BTreeMap::new();
        for (name, shape) in shapes(&cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.contains("norm") && name.ends_with("weight") {
                vec![1.0; n]
            } else if name.contains("norm") || name.ends_with("bias") {
                vec![0.0; n]
            } else if name == "query_embs" {
                g.randn(n.max(16))?.into_iter().take(n).collect()
            } else {
                let bound = 1.0 / (shape[shape.len() - 1] as f32).sqrt();
                g.rand(n).into_iter().map(|u| (2.0 * u - 1.0) * bound).collect()
            };
            let t = Tensor::from_vec(data, shape, &device).map_err(model_err("mapper init"))?;
            params.insert(name, Var::from_tensor(&t).map_err(model_err("mapper init"))?);
        }
        Ok(RagarMapper {
            cfg,
            params: Params(params),
            optimizer: AdamW::default(),
            device,
        })
    }

    /// Build from `params:` (see [`MapperConfig`]), plus an optional
    /// `checkpoint` to resume from.
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        let (cfg, ckpt) = ragar_core::mapper::parse_params(spec)?;
        let mut m = RagarMapper::new(cfg, device(spec)?)?;
        if let Some(path) = ckpt {
            m.load(&path)?;
        }
        Ok(m)
    }

    /// Facts for `ragar validate`'s wiring checks.
    pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
        ragar_core::mapper::probe(spec, |p: &str| std::path::PathBuf::from(p))
    }

    /// Eq. 8: the Modal Mapper over a batch `[b, 1 + n_img, d_llm]`.
    fn modal_mapper(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let (h, heads) = (self.cfg.hidden_dim, self.cfg.heads);
        let mut mem = linear(p, "fc", x)?;
        for i in 0..self.cfg.layers {
            let l = format!("tfm.encoder.layers.{i}");
            let n = layer_norm(p, &format!("{l}.norm1"), &mem)?;
            mem = (&mem + mha(p, &format!("{l}.self_attn"), &n, &n, heads)?)?;
            mem = (&mem + ffn(p, &l, &layer_norm(p, &format!("{l}.norm2"), &mem)?)?)?;
        }
        let mem = layer_norm(p, "tfm.encoder.norm", &mem)?;
        let b = x.dim(0)?;
        let mut y = p
            .t("query_embs")
            .broadcast_as((b, self.cfg.n_queries, h))?
            .contiguous()?;
        for i in 0..self.cfg.layers {
            let l = format!("tfm.decoder.layers.{i}");
            let n = layer_norm(p, &format!("{l}.norm1"), &y)?;
            y = (&y + mha(p, &format!("{l}.self_attn"), &n, &n, heads)?)?;
            let n = layer_norm(p, &format!("{l}.norm2"), &y)?;
            y = (&y + mha(p, &format!("{l}.multihead_attn"), &n, &mem, heads)?)?;
            y = (&y + ffn(p, &l, &layer_norm(p, &format!("{l}.norm3"), &y)?)?)?;
        }
        linear(p, "model", &layer_norm(p, "tfm.decoder.norm", &y)?)
    }

    /// Eq. 9: the Balance Calibrator; `kw` is `[b, keyword_dim]`.
    fn calibrate(&self, mapped: &Tensor, kw: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let b = kw.dim(0)?;
        let kv = linear(p, "calibrator.kw_proj", kw)?.reshape((b, self.cfg.keyword_tokens, self.cfg.output_dim))?;
        let q = layer_norm(p, "calibrator.norm", mapped)?;
        mapped + mha(p, "calibrator.attn", &q, &kv, self.cfg.calibrator_heads)?
    }

    /// Stack a batch of inputs into `[b, 1 + n_img, d]` and `[b, kw]` tensors, checking shapes.
    fn stack(&self, inputs: &[MapperInput]) -> Result<(Tensor, Tensor)> {
        let c = &self.cfg;
        let (xs, kws) = ragar_core::mapper::stack_inputs(c, inputs)?;
        let b = inputs.len();
        let x =
            Tensor::from_vec(xs, (b, 1 + c.n_img_tokens, c.input_dim), &self.device).map_err(model_err("mapper"))?;
        let kw = Tensor::from_vec(kws, (b, c.keyword_dim), &self.device).map_err(model_err("mapper"))?;
        Ok((x, kw))
    }

    fn forward_t(&self, inputs: &[MapperInput]) -> Result<(Tensor, Tensor)> {
        let (x, kw) = self.stack(inputs)?;
        let mapped = self.modal_mapper(&x).map_err(model_err("modal mapper"))?;
        let pref = self.calibrate(&mapped, &kw).map_err(model_err("balance calibrator"))?;
        Ok((mapped, pref))
    }

    /// The four losses `[total, rank, calibrator, semantic]` of a batch,
    /// without stepping (diagnostics and gradient checks).
    pub fn loss_values(&self, batch: &[ReflectionSample], cfg: &LossConfig) -> Result<[f32; 4]> {
        let l = self.losses(batch, cfg)?;
        let mut out = [0f32; 4];
        for (o, t) in out.iter_mut().zip(&l) {
            *o = t.to_scalar::<f32>().map_err(model_err("loss"))?;
        }
        Ok(out)
    }

    /// d total / d parameter `name` (flattened), by autograd.
    pub fn gradient(&self, batch: &[ReflectionSample], cfg: &LossConfig, name: &str) -> Result<Vec<f32>> {
        let [total, ..] = self.losses(batch, cfg)?;
        let grads = total.backward().map_err(model_err("backward"))?;
        let var = self
            .params
            .0
            .get(name)
            .ok_or_else(|| Error::invalid_input(format!("no parameter {name}")))?;
        // A parameter the loss does not reach has a zero gradient.
        match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().and_then(|t| t.to_vec1()).map_err(model_err("gradient")),
            None => Ok(vec![0.0; var.as_tensor().elem_count()]),
        }
    }

    /// Overwrite parameter `name` (flattened values).
    pub fn set_parameter(&self, name: &str, values: &[f32]) -> Result<()> {
        let var = self
            .params
            .0
            .get(name)
            .ok_or_else(|| Error::invalid_input(format!("no parameter {name}")))?;
        let t = Tensor::from_vec(values.to_vec(), var.as_tensor().dims(), &self.device).map_err(model_err(name))?;
        var.set(&t).map_err(model_err(name))
    }

    /// Parameter `name` (flattened values).
    pub fn parameter(&self, name: &str) -> Result<Vec<f32>> {
        let var = self
            .params
            .0
            .get(name)
            .ok_or_else(|| Error::invalid_input(format!("no parameter {name}")))?;
        var.as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(model_err(name))
    }

    /// Check a reflection sample's shapes against this mapper's.
    fn check_sample(&self, i: usize, s: &ReflectionSample) -> Result<()> {
        let c = &self.cfg;
        let (q, o) = (c.n_queries, c.output_dim);
        let bad = |what: &str, got: Vec<usize>, want: String| {
            Err(Error::invalid_input(format!(
                "reflection sample {i}: {what} of shape {got:?}, expected {want}"
            )))
        };
        let nd = s.noises.dims();
        if nd.len() != 3 || nd[1..] != [q, o] || nd[0] != s.rewards.len() || nd[0] == 0 {
            return bad(
                "noises",
                nd,
                format!("[n, {q}, {o}] with n = {} rewards (n >= 1)", s.rewards.len()),
            );
        }
        if let Some(r) = s.rewards.iter().find(|r| !r.is_finite()) {
            return Err(Error::invalid_input(format!("reflection sample {i}: reward {r}")));
        }
        let rd = s.retrieval_preference.dims();
        if !(s.retrieval_preference.numel() == 0 || rd == [c.retrieval_dim]) {
            return bad(
                "retrieval_preference",
                rd,
                format!("[{}] (or empty: no retrieval)", c.retrieval_dim),
            );
        }
        let sd = s.semantic_target.dims();
        if !(sd == [q, o] || (c.semantic_dim != 0 && sd == [c.semantic_dim])) {
            let want = match c.semantic_dim {
                0 => format!("[{q}, {o}]"),
                d => format!("[{q}, {o}] or [{d}]"),
            };
            return bad("semantic_target", sd, want);
        }
        Ok(())
    }

    /// Mean over tokens, then the named projection when one exists.
    fn pool(&self, x: &Tensor, proj: &str) -> candle_core::Result<Tensor> {
        let pooled = x.mean_keepdim(0)?;
        let pooled = if self.params.0.contains_key(&format!("{proj}.weight")) {
            linear(&self.params, proj, &pooled)?
        } else {
            pooled
        };
        pooled.squeeze(0)
    }

    /// The losses of Eq. 11-15 for a batch: `[total, rank, calibrator, semantic]`.
    fn losses(&self, batch: &[ReflectionSample], cfg: &LossConfig) -> Result<[Tensor; 4]> {
        for (i, s) in batch.iter().enumerate() {
            self.check_sample(i, s)?;
        }
        let inputs: Vec<MapperInput> = batch.iter().map(|s| s.input.clone()).collect();
        let (mapped, pref) = self.forward_t(&inputs)?;
        self.losses_t(batch, cfg, &mapped, &pref)
            .map_err(model_err("reflection losses"))
    }

    fn losses_t(
        &self,
        batch: &[ReflectionSample],
        cfg: &LossConfig,
        mapped: &Tensor,
        pref: &Tensor,
    ) -> candle_core::Result<[Tensor; 4]> {
        let dev = &self.device;
        let (q, o) = (self.cfg.n_queries, self.cfg.output_dim);
        let sigma = cfg.sigma as f64;
        let (mut rank, mut cal, mut sem) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in batch.iter().enumerate() {
            let mu = pref.get(i)?;
            // Eq. 11-12: the rewards weigh each fixed perturbation's log-density
            // N(z; mu, sigma^2 I), per dimension: -(z - mu)^2 / (2 sigma^2) - ln(sigma sqrt(2 pi)).
            let n = s.rewards.len();
            let eps = Tensor::from_vec(s.noises.to_f32_vec(), (n, q, o), dev)?;
            let z = mu.detach().unsqueeze(0)?.broadcast_add(&(eps * sigma)?)?;
            let sq = z.broadcast_sub(&mu.unsqueeze(0)?)?.sqr()?.mean((1, 2))?;
            let logp = ((sq * (-0.5 / (sigma * sigma)))? - (sigma * (2.0 * std::f64::consts::PI).sqrt()).ln())?;
            let adv: Vec<f32> = s.rewards.iter().map(|r| r - cfg.margin).collect();
            rank.push((logp * Tensor::from_vec(adv, n, dev)?)?.mean_all()?.neg()?);
            // Eq. 13 (skipped without retrieval).
            if s.retrieval_preference.numel() > 0 {
                let target = Tensor::from_vec(s.retrieval_preference.to_f32_vec(), self.cfg.retrieval_dim, dev)?;
                cal.push(one_minus_cos(&self.pool(&mu, "calibrator.cal_proj")?, &target)?);
            }
            // Eq. 14.
            let m = mapped.get(i)?;
            let sd = s.semantic_target.dims();
            let target = Tensor::from_vec(s.semantic_target.to_f32_vec(), sd.clone(), dev)?;
            sem.push(if sd == [q, o] {
                (&m - &target)?.sqr()?.mean_all()?
            } else {
                one_minus_cos(&self.pool(&m, "calibrator.sem_proj")?, &target)?
            });
        }
        let mean = |v: Vec<Tensor>| -> candle_core::Result<Tensor> {
            if v.is_empty() {
                return Tensor::new(0f32, dev);
            }
            let n = v.len() as f64;
            Tensor::stack(&v, 0)?.sum_all()? / n
        };
        let (rank, cal, sem) = (mean(rank)?, mean(cal)?, mean(sem)?);
        let total = (((&rank * cfg.rank_weight as f64)? + (&cal * cfg.calibrator_weight as f64)?)?
            + (&sem * cfg.semantic_weight as f64)?)?;
        Ok([total, rank, cal, sem])
    }
}

fn one_minus_cos(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dot = (a * b)?.sum_all()?;
    let na = a.sqr()?.sum_all()?.sqrt()?;
    let nb = b.sqr()?.sum_all()?.sqrt()?;
    (dot / ((na * nb)? + 1e-8)?)?.neg()? + 1.0
}

impl Mapper for RagarMapper {
    fn info(&self) -> MapperInfo {
        self.cfg.info()
    }

    fn forward(&self, inputs: &[MapperInput]) -> Result<Vec<MapperOutput>> {
        crate::device::on_pool(&self.device, || {
            if inputs.is_empty() {
                return Ok(Vec::new());
            }
            let (mapped, pref) = self.forward_t(inputs)?;
            let shape = [self.cfg.n_queries, self.cfg.output_dim];
            let rows = |t: &Tensor, i: usize| -> Result<ragar_core::Tensor> {
                let v = t
                    .get(i)
                    .and_then(|r| r.flatten_all()?.to_vec1::<f32>())
                    .map_err(model_err("mapper"))?;
                ragar_core::Tensor::from_f32(&shape, v)
            };
            (0..inputs.len())
                .map(|i| {
                    Ok(MapperOutput {
                        mapped: rows(&mapped, i)?,
                        preference: rows(&pref, i)?,
                    })
                })
                .collect()
        })
    }

    fn train_step(&mut self, batch: &[ReflectionSample], cfg: &LossConfig) -> Result<TrainStats> {
        if batch.is_empty() {
            return Err(Error::invalid_input("train_step on an empty batch"));
        }
        if cfg.sigma.is_nan() || cfg.sigma <= 0.0 || cfg.lr.is_nan() || cfg.lr <= 0.0 {
            return Err(Error::config(format!(
                "sigma ({}) and lr ({}) must be > 0",
                cfg.sigma, cfg.lr
            )));
        }
        let [total, rank, cal, sem] = self.losses(batch, cfg)?;
        let grads = total.backward().map_err(model_err("mapper backward"))?;
        let opt = AdamWConfig {
            betas: self.cfg.betas,
            eps: self.cfg.adam_eps,
            weight_decay: self.cfg.weight_decay,
        };
        let vars: Vec<(String, Var)> = self.params.0.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let grad_norm = self
            .optimizer
            .step(&vars, &grads, cfg.lr as f64, cfg.grad_clip as f64, &opt)
            .map_err(model_err("mapper optimiser step"))?;
        let scalar = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .and_then(|t| t.to_scalar::<f32>())
                .map_err(model_err("loss"))
        };
        Ok(TrainStats {
            step: self.optimizer.step,
            loss: scalar(&total)?,
            rank_loss: scalar(&rank)?,
            calibrator_loss: scalar(&cal)?,
            semantic_loss: scalar(&sem)?,
            grad_norm: grad_norm as f32,
        })
    }

    fn save(&self, path: &str) -> Result<()> {
        let mut w = StateWriter::default();
        for (name, var) in &self.params.0 {
            w.tensor(name, var.as_tensor()).map_err(model_err(path))?;
            if let Some((m, v)) = self.optimizer.moments.get(name) {
                w.tensor(&format!("optimizer.exp_avg.{name}"), m)
                    .map_err(model_err(path))?;
                w.tensor(&format!("optimizer.exp_avg_sq.{name}"), v)
                    .map_err(model_err(path))?;
            }
        }
        w.write(
            path,
            "ragar.mapper",
            &serde_json::json!({"step": self.optimizer.step, "mapper_config": self.cfg}),
        )
    }

    fn load(&mut self, path: &str) -> Result<()> {
        // Plain weight files (a GILL mapper, a PyTorch export) load too, at step 0.
        let r = StateReader::open_weights(path, "ragar.mapper", "a Mapper checkpoint")?;
        let mut moments = BTreeMap::new();
        for (name, var) in &self.params.0 {
            let t = r.require(name, Some(var.as_tensor().dims()), &self.device)?;
            var.set(&t).map_err(model_err(path))?;
            let m = r.tensor(&format!("optimizer.exp_avg.{name}"), &self.device)?;
            let v = r.tensor(&format!("optimizer.exp_avg_sq.{name}"), &self.device)?;
            if let (Some(m), Some(v)) = (m, v) {
                moments.insert(name.clone(), (m, v));
            }
        }
        self.optimizer.moments = moments;
        self.optimizer.step = if r.meta().is_null() { 0 } else { r.field("step")? };
        Ok(())
    }
}
