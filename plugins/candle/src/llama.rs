//! Llama-architecture decoder (Touvron et al. 2023), also used by SmolLM2 and
//! other Llama-style checkpoints, and by Qwen2 / Qwen2.5 (Bai et al. 2023;
//! the paper's KeywordLLM), which only adds biases to the q/k/v projections:
//! RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP.
//!
//! Reference implementations: `transformers.models.llama.modeling_llama`
//! (`LlamaForCausalLM`) and `transformers.models.qwen2.modeling_qwen2`. Two weight layouts load into the same model:
//! - HF safetensors (`model.layers.{i}.self_attn.q_proj.weight`, ...), whose
//!   q/k projections use the "rotate half" rotary layout;
//! - GGUF (`blk.{i}.attn_q.weight`, ...; quantized matmuls), whose q/k rows
//!   llama.cpp's converter permuted into the interleaved rotary layout.
//!
//! `forward` returns the final (post-norm) hidden states — what the paper's
//! Eq. 7 reads at the [IMG] positions — and `logits` maps them to the vocabulary.

use crate::activation as act;
use crate::linear::Linear;
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use std::io::{Read, Seek};

/// The fields of a HF `config.json` (or of GGUF `llama.*` metadata) the model needs.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    /// Rotary base.
    #[serde(default = "theta")]
    pub rope_theta: f64,
    /// Context length.
    #[serde(default = "ctx")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Per-head width when not `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// transformers >= 5 writes the rotary settings here instead.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
}

/// `rope_parameters` of transformers >= 5 configs.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct RopeParameters {
    /// Rotary base.
    pub rope_theta: Option<f64>,
    /// Only `default` (no scaling) is implemented.
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn eps() -> f64 {
    1e-6
}
fn theta() -> f64 {
    10000.0
}
fn ctx() -> usize {
    2048
}

impl Config {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.rope_theta)
    }
    /// Refuse settings the forward pass does not implement.
    pub fn check(&self) -> Result<()> {
        let ty = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
            .unwrap_or("default");
        if ty != "default" {
            candle_core::bail!("rope_type '{ty}' (rotary scaling) is not implemented; only 'default'");
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            candle_core::bail!("num_attention_heads must be a multiple of num_key_value_heads");
        }
        Ok(())
    }
}

/// Which rotary layout the q/k weights are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rope {
    /// HF: the two halves of each head are rotated together.
    Halves,
    /// llama.cpp/GGUF: adjacent pairs are rotated together.
    Interleaved,
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // f32 on the CPU: candle's fused op (one pass instead of seven ops,
        // which at one token per step are mostly overhead).
        if x.dtype() == DType::F32 && x.device().is_cpu() && x.is_contiguous() && !x.track_op() {
            return candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32);
        }
        // Computed in f32 as the reference does, then cast back.
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

struct Layer {
    q: Proj,
    k: Proj,
    v: Proj,
    /// Qwen2 adds biases to the q/k/v projections; Llama has none.
    qkv_bias: Option<[Tensor; 3]>,
    o: Proj,
    gate: Proj,
    up: Proj,
    down: Proj,
    attn_norm: RmsNorm,
    mlp_norm: RmsNorm,
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Default)]
pub struct Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
}

impl Cache {
    /// Tokens already cached.
    pub fn len(&self) -> usize {
        self.kv
            .first()
            .and_then(|c| c.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The decoder.
pub struct Llama {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Proj,
    cos: Tensor,
    sin: Tensor,
    rope: Rope,
    cfg: Config,
    dtype: DType,
}

fn rotary_tables(cfg: &Config, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / cfg.theta().powf(2.0 * i as f64 / hd as f64) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, (1, hd / 2), dev)?;
    let t = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?;
    let freqs = t.matmul(&inv)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

impl Llama {
    /// Load HF safetensors weights (`LlamaForCausalLM` layout).
    pub fn from_safetensors(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.check()?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let lin = |vb: VarBuilder, o: usize, i: usize| -> Result<Proj> {
            Ok(Proj::from(QMatMul::Tensor(vb.get((o, i), "weight")?)))
        };
        let norm = |vb: VarBuilder| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: vb.get(h, "weight")?,
                eps: cfg.rms_norm_eps,
            })
        };
        let m = vb.pp("model");
        let embed_w = m.get((cfg.vocab_size, h), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                let bias = |name: &str, n: usize| l.pp(format!("self_attn.{name}")).get(n, "bias");
                let qkv_bias = if l.contains_tensor("self_attn.q_proj.bias") {
                    Some([bias("q_proj", nq)?, bias("k_proj", nkv)?, bias("v_proj", nkv)?])
                } else {
                    None
                };
                Ok(Layer {
                    qkv_bias,
                    q: lin(l.pp("self_attn.q_proj"), nq, h)?,
                    k: lin(l.pp("self_attn.k_proj"), nkv, h)?,
                    v: lin(l.pp("self_attn.v_proj"), nkv, h)?,
                    o: lin(l.pp("self_attn.o_proj"), h, nq)?,
                    gate: lin(l.pp("mlp.gate_proj"), cfg.intermediate_size, h)?,
                    up: lin(l.pp("mlp.up_proj"), cfg.intermediate_size, h)?,
                    down: lin(l.pp("mlp.down_proj"), h, cfg.intermediate_size)?,
                    attn_norm: norm(l.pp("input_layernorm"))?,
                    mlp_norm: norm(l.pp("post_attention_layernorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            Proj::from(QMatMul::Tensor(embed_w.clone()))
        } else {
            lin(vb.pp("lm_head"), cfg.vocab_size, h)?
        };
        let (cos, sin) = rotary_tables(cfg, vb.dtype(), vb.device())?;
        Ok(Llama {
            embed: Embedding::new(embed_w, h),
            layers,
            norm: norm(m.pp("norm"))?,
            lm_head,
            cos,
            sin,
            rope: Rope::Halves,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Load a GGUF file (llama.cpp layout; quantized weights stay quantized).
    /// `dequantize` turns every quantized matrix into f32 (see the
    /// keyword LLM's `dequantize` param).
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        r: &mut R,
        dev: &Device,
        dequantize: bool,
    ) -> Result<Self> {
        let md = |k: &str| {
            content
                .metadata
                .get(k)
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata lacks {k}")))
        };
        let arch = md("general.architecture")?.to_string()?.clone();
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| md(&key(k)).and_then(|v| v.to_u32()).map(|v| v as usize);
        let embed_q = content.tensor(r, "token_embd.weight", dev)?;
        let vocab_size = embed_q.shape().dims()[0];
        let cfg = Config {
            vocab_size,
            hidden_size: u("embedding_length")?,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: u("attention.head_count")?,
            num_key_value_heads: Some(u("attention.head_count_kv")?),
            rms_norm_eps: md(&key("attention.layer_norm_rms_epsilon"))?.to_f32()? as f64,
            rope_theta: md(&key("rope.freq_base"))
                .and_then(|v| v.to_f32())
                .map_or(10000.0, |v| v as f64),
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            head_dim: None,
            rope_parameters: None,
        };
        cfg.check()?;
        let q = |r: &mut R, name: &str| -> Result<Proj> {
            let t = content.tensor(r, name, dev)?;
            if dequantize {
                Ok(Proj::from(QMatMul::Tensor(t.dequantize(dev)?)))
            } else {
                Ok(Proj::from(QMatMul::from_qtensor(t)?))
            }
        };
        let f = |r: &mut R, name: &str| -> Result<Tensor> { content.tensor(r, name, dev)?.dequantize(dev) };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("blk.{i}");
            let qkv_bias = if content.tensor_infos.contains_key(&format!("{p}.attn_q.bias")) {
                Some([
                    f(r, &format!("{p}.attn_q.bias"))?,
                    f(r, &format!("{p}.attn_k.bias"))?,
                    f(r, &format!("{p}.attn_v.bias"))?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                qkv_bias,
                q: q(r, &format!("{p}.attn_q.weight"))?,
                k: q(r, &format!("{p}.attn_k.weight"))?,
                v: q(r, &format!("{p}.attn_v.weight"))?,
                o: q(r, &format!("{p}.attn_output.weight"))?,
                gate: q(r, &format!("{p}.ffn_gate.weight"))?,
                up: q(r, &format!("{p}.ffn_up.weight"))?,
                down: q(r, &format!("{p}.ffn_down.weight"))?,
                attn_norm: RmsNorm {
                    weight: f(r, &format!("{p}.attn_norm.weight"))?,
                    eps: cfg.rms_norm_eps,
                },
                mlp_norm: RmsNorm {
                    weight: f(r, &format!("{p}.ffn_norm.weight"))?,
                    eps: cfg.rms_norm_eps,
                },
            });
        }
        let norm = RmsNorm {
            weight: f(r, "output_norm.weight")?,
            eps: cfg.rms_norm_eps,
        };
        let lm_head = q(
            r,
            if cfg.tie_word_embeddings {
                "token_embd.weight"
            } else {
                "output.weight"
            },
        )?;
        let embed = Embedding::new(embed_q.dequantize(dev)?, cfg.hidden_size);
        let (cos, sin) = rotary_tables(&cfg, DType::F32, dev)?;
        Ok(Llama {
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            rope: Rope::Interleaved,
            cfg,
            dtype: DType::F32,
        })
    }

    /// The configuration (for GGUF, read from its metadata).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Token embeddings `[b, t, h]` (the input of [`Llama::forward_embeds`]).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)
    }

    /// The token embedding matrix `[vocab, h]`.
    pub fn embedding_matrix(&self) -> &Tensor {
        self.embed.embeddings()
    }

    /// Final hidden states `[b, t, h]` (after the last RMSNorm) for `ids`
    /// `[b, t]` continuing what `cache` holds.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.forward_embeds(&self.embed.forward(ids)?, cache)
    }

    /// As [`Llama::forward`], from input embeddings (so callers can supply
    /// rows for tokens the checkpoint does not have, such as [IMG]).
    pub fn forward_embeds(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let offset = cache.len();
        if offset + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds the context of {}",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        cache.kv.resize_with(self.layers.len(), || None);
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        // The model's dtype first: callers hand in f32 rows ([IMG] states),
        // and the mask must match the scores it is added to.
        let mut x = x.to_dtype(self.dtype)?;
        let mask = if t > 1 {
            Some(causal_mask(t, offset, x.dtype(), x.device())?)
        } else {
            None
        };
        for (layer, kv) in self.layers.iter().zip(cache.kv.iter_mut()) {
            x = self.layer(layer, &x, &cos, &sin, mask.as_ref(), kv, b, t)?;
        }
        self.norm.forward(&x)
    }

    /// Vocabulary logits `[b, t, vocab]` (f32) from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        mm(&self.lm_head, hidden)?.to_dtype(DType::F32)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut Option<(Tensor, Tensor)>,
        b: usize,
        t: usize,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        let h = l.attn_norm.forward(x)?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
        let (mut q, mut k, mut v) = (mm(&l.q, &h)?, mm(&l.k, &h)?, mm(&l.v, &h)?);
        if let Some([bq, bk, bv]) = &l.qkv_bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (q, k) = match self.rope {
            Rope::Halves => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
            Rope::Interleaved => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
        };
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, &k], 2)?.contiguous()?,
                Tensor::cat(&[&pv, &v], 2)?.contiguous()?,
            ),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let attn = match crate::attention::fused(&q, &k, &v, mask) {
            // The fused CPU op takes the grouped heads as they are.
            true => crate::attention::attend(&q, &k, &v, (hd as f64).powf(-0.5), mask)?,
            false => grouped_attention(&q, &k, &v, mask, nh / nkv)?,
        };
        let attn = attn.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let x = (x + mm(&l.o, &attn)?)?;
        let h = l.mlp_norm.forward(&x)?;
        let mlp = mm(&l.down, &(act::silu(&mm(&l.gate, &h)?)? * mm(&l.up, &h)?)?)?;
        x + mlp
    }
}

/// Grouped-query attention on candle's ops, `[b, nh, t, hd]` out: key/value
/// head j serves query heads j * rep .. (j + 1) * rep (transformers'
/// repeat_kv), so those heads' rows go against it in one product,
/// [b, nkv, rep * t, hd] x [b, nkv, hd, s], instead of copying the keys and
/// values rep times.
fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, rep: usize) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (nkv, s) = (k.dim(1)?, k.dim(2)?);
    let q = q.reshape((b, nkv, rep * t, hd))?;
    let mut w = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
    if let Some(m) = mask {
        let m = m.reshape((1, 1, 1, t, s))?;
        w = w
            .reshape((b, nkv, rep, t, s))?
            .broadcast_add(&m)?
            .reshape((b, nkv, rep * t, s))?;
    }
    let p = act::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    p.matmul(v)?.reshape((b, nh, t, hd))
}

/// `[1, 1, t, offset + t]`: query i (at position offset + i) sees keys up to offset + i.
fn causal_mask(t: usize, offset: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..offset + t).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (1, 1, t, offset + t), dev)?.to_dtype(dtype)
}

/// A projection: dense weights are a [`Linear`] (packed once for the CPU),
/// GGUF-quantized ones stay candle's quantized matmul.
enum Proj {
    Dense(Linear),
    Quantized(QMatMul),
}

impl From<QMatMul> for Proj {
    fn from(q: QMatMul) -> Self {
        match q {
            QMatMul::Tensor(w) => Proj::Dense(Linear::new(w, None)),
            q => Proj::Quantized(q),
        }
    }
}

fn mm(w: &Proj, x: &Tensor) -> Result<Tensor> {
    match w {
        Proj::Dense(l) => l.forward(x),
        Proj::Quantized(q) => q.forward(x),
    }
}
