//! BERT encoder (Devlin et al. 2019), as used by sentence-transformers'
//! all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM").
//!
//! Reference implementation: `transformers.models.bert.modeling_bert.BertModel`
//! (post-norm layers, erf GELU, absolute position embeddings). Weight names
//! match the checkpoint (`embeddings.word_embeddings.weight`,
//! `encoder.layer.{i}.attention.self.query.weight`, ...); a `bert.` prefix, as
//! in `BertForMaskedLM` checkpoints, is accepted too.

use crate::activation as act;
use crate::attention::attend;
use crate::linear::{linear, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};

/// The fields of a HF `config.json` that the forward pass needs.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Position limit.
    pub max_position_embeddings: usize,
    /// Segment vocabulary.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Only `gelu` (erf) is supported, as in every sentence-transformers BERT.
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// Only `absolute` is supported.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn absolute() -> String {
    "absolute".into()
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Embeddings {
            word: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type: embedding(cfg.type_vocab_size, cfg.hidden_size, vb.pp("token_type_embeddings"))?,
            norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, ids: &Tensor, type_ids: &Tensor) -> Result<Tensor> {
        let seq_len = ids.dim(1)?;
        let pos = Tensor::arange(0u32, seq_len as u32, ids.device())?.unsqueeze(0)?;
        let x = self.word.forward(ids)?.broadcast_add(&self.position.forward(&pos)?)?;
        let x = (x + self.token_type.forward(type_ids)?)?;
        self.norm.forward(&x)
    }
}

struct Layer {
    /// query, key and value as one product (their weights stacked), so
    /// `x` is read once and there is one call instead of three.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        Ok(Layer {
            qkv: {
                let parts = ["self.query", "self.key", "self.value"].map(|p| candle_nn::linear(h, h, att.pp(p)));
                let [q, k, v] = parts;
                let (q, k, v) = (q?, k?, v?);
                let w = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
                let b = match (q.bias(), k.bias(), v.bias()) {
                    (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
                    _ => None,
                };
                Linear::new(w, b)
            },
            attn_out: linear(h, h, att.pp("output.dense"))?,
            attn_norm: layer_norm(h, cfg.layer_norm_eps, att.pp("output.LayerNorm"))?,
            intermediate: linear(h, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
            output: linear(cfg.intermediate_size, h, vb.pp("output.dense"))?,
            out_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x`: [b, s, h]; `bias`: [b, 1, 1, s] additive attention mask.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let hd = h / self.heads;
        // q, k and v as `[b, heads, s, d]` views of the one product.
        let qkv = self.qkv.forward(x)?.reshape((b, s, 3, self.heads, hd))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let ctx = attend(&part(0)?, &part(1)?, &part(2)?, (hd as f64).powf(-0.5), Some(bias))?
            .transpose(1, 2)?
            .reshape((b, s, h))?;
        let x = self.attn_norm.forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let ffn = self.output.forward(&act::gelu_erf(&self.intermediate.forward(&x)?)?)?;
        self.out_norm.forward(&(ffn + x)?)
    }
}

/// A BERT encoder without the pooler (sentence-transformers does its own pooling).
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl BertModel {
    /// Load from a VarBuilder over the checkpoint.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        if cfg.hidden_act != "gelu" || cfg.position_embedding_type != "absolute" {
            candle_core::bail!(
                "unsupported BERT variant (hidden_act {}, position_embedding_type {})",
                cfg.hidden_act,
                cfg.position_embedding_type
            );
        }
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let embeddings = Embeddings::load(vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), cfg))
            .collect::<Result<_>>()?;
        Ok(BertModel { embeddings, layers })
    }

    /// Last hidden state `[b, s, h]` for `ids`, `type_ids`, `mask` (all `[b, s]`, u32).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut x = self.embeddings.forward(ids, type_ids)?;
        // Padding gets a large negative bias, as HF does with finfo(dtype).min;
        // -1e4 stays finite in f16 and still gives those keys zero weight.
        let bias = ((mask.to_dtype(x.dtype())? - 1.0)? * 1e4)?.unsqueeze(1)?.unsqueeze(1)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }
        Ok(x)
    }
}
