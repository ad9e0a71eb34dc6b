//! BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image
//! Pre-training with Frozen Image Encoders and Large Language Models"), the
//! captioner the RAGAR paper uses (Eq. 2): a frozen ViT, a Q-Former whose
//! learned queries read the image, a linear projection into a frozen OPT
//! language model that writes the caption.
//!
//! Reference implementation: transformers' `Blip2ForConditionalGeneration`
//! (`models/blip_2/modeling_blip_2.py`) with `OPTForCausalLM`
//! (`models/opt/modeling_opt.py`): the ViT is BLIP's (`blip.rs`) with the
//! q/v-only attention bias; the Q-Former is a post-norm BERT over the query
//! tokens (LayerNorm first, cross-attention to the image every
//! `cross_attention_frequency` layers, the `*_query` feed-forward); OPT is a
//! pre-norm decoder with learned positions offset by 2, ReLU feed-forward
//! and the LM head tied to the token embeddings. The language model reads
//! the projected queries in place of the `num_query_tokens` `<image>` tokens,
//! then BOS (or the tokenised prompt). Weight names match
//! Salesforce/blip2-opt-* checkpoints. Flan-T5 language models are refused
//! by name.

use crate::activation as act;
use crate::blip::{attend, merge_heads, split_heads, TextAttention, VisionConfig, VisionModel};
use crate::linear::{linear, linear_no_bias, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};

/// `config.json` of a Blip2ForConditionalGeneration checkpoint.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {
    /// The ViT.
    #[serde(default)]
    pub vision_config: Blip2VisionConfig,
    /// The Q-Former.
    #[serde(default)]
    pub qformer_config: QFormerConfig,
    /// The language model (OPT).
    #[serde(default)]
    pub text_config: OptConfig,
    /// Learned queries.
    #[serde(default = "thirty_two")]
    pub num_query_tokens: usize,
    /// The `<image>` placeholder id (absent in older checkpoints).
    #[serde(default)]
    pub image_token_index: Option<u32>,
}

fn thirty_two() -> usize {
    32
}

/// BLIP-2's ViT (defaults = transformers' `Blip2VisionConfig`: EVA ViT-g/14).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct Blip2VisionConfig {
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for Blip2VisionConfig {
    fn default() -> Self {
        Blip2VisionConfig {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            layer_norm_eps: 1e-6,
        }
    }
}

impl From<&Blip2VisionConfig> for VisionConfig {
    fn from(c: &Blip2VisionConfig) -> Self {
        VisionConfig {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            image_size: c.image_size,
            patch_size: c.patch_size,
            layer_norm_eps: c.layer_norm_eps,
        }
    }
}

/// Q-Former hyper-parameters (defaults = transformers' `Blip2QFormerConfig`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    /// Width.
    pub hidden_size: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// A cross-attention layer every this many layers (from layer 0).
    pub cross_attention_frequency: usize,
    /// Width of the image features.
    pub encoder_hidden_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        QFormerConfig {
            hidden_size: 768,
            num_attention_heads: 12,
            num_hidden_layers: 12,
            intermediate_size: 3072,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            layer_norm_eps: 1e-12,
        }
    }
}

/// OPT hyper-parameters (defaults = transformers' `OPTConfig`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct OptConfig {
    /// Must be `opt`.
    pub model_type: String,
    /// Vocabulary.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Token embedding width (differs from `hidden_size` in opt-350m).
    pub word_embed_proj_dim: Option<usize>,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub ffn_dim: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Pre-norm (every OPT but 350m).
    pub do_layer_norm_before: bool,
    /// Whether the decoder's final LayerNorm is absent.
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// `relu` (the only one OPT checkpoints use).
    pub activation_function: String,
    /// Beginning of sequence.
    pub bos_token_id: u32,
    /// End of sequence: decoding stops here.
    pub eos_token_id: u32,
    /// Padding.
    pub pad_token_id: u32,
}

impl Default for OptConfig {
    fn default() -> Self {
        OptConfig {
            model_type: "opt".into(),
            vocab_size: 50272,
            hidden_size: 768,
            word_embed_proj_dim: None,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            ffn_dim: 3072,
            max_position_embeddings: 2048,
            do_layer_norm_before: true,
            remove_final_layer_norm: false,
            activation_function: "relu".into(),
            bos_token_id: 2,
            eos_token_id: 2,
            pad_token_id: 1,
        }
    }
}

struct QFormerLayer {
    attention: TextAttention,
    crossattention: Option<TextAttention>,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

/// The Q-Former over its learned queries (`qformer.*`, `query_tokens`).
pub struct QFormer {
    query_tokens: Tensor,
    layernorm: LayerNorm,
    layers: Vec<QFormerLayer>,
}

impl QFormer {
    fn load(vb: VarBuilder, query_tokens: Tensor, c: &QFormerConfig) -> Result<Self> {
        let (h, heads, eps) = (c.hidden_size, c.num_attention_heads, c.layer_norm_eps);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let cross = c.cross_attention_frequency > 0 && i % c.cross_attention_frequency == 0;
                Ok(QFormerLayer {
                    attention: TextAttention::load(l.pp("attention"), "attention", h, h, heads, eps)?,
                    crossattention: cross
                        .then(|| {
                            TextAttention::load(
                                l.pp("crossattention"),
                                "attention",
                                h,
                                c.encoder_hidden_size,
                                heads,
                                eps,
                            )
                        })
                        .transpose()?,
                    intermediate: linear(h, c.intermediate_size, l.pp("intermediate_query.dense"))?,
                    output: linear(c.intermediate_size, h, l.pp("output_query.dense"))?,
                    norm: layer_norm(h, eps, l.pp("output_query.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(QFormer {
            query_tokens,
            layernorm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layernorm"))?,
            layers,
        })
    }

    /// Query outputs `[b, queries, h]` for image embeddings `[b, patches, w]`.
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let b = image.dim(0)?;
        let (_, q, h) = self.query_tokens.dims3()?;
        let mut x = self
            .layernorm
            .forward(&self.query_tokens.broadcast_as((b, q, h))?.contiguous()?)?;
        for layer in &self.layers {
            let (k, v) = layer.attention.kv(&x)?;
            x = layer.attention.forward(&x, &k, &v, None)?;
            if let Some(cross) = &layer.crossattention {
                let (k, v) = cross.kv(image)?;
                x = cross.forward(&x, &k, &v, None)?;
            }
            let y = layer
                .output
                .forward(&act::gelu_erf(&layer.intermediate.forward(&x)?)?)?;
            x = layer.norm.forward(&(y + x)?)?;
        }
        Ok(x)
    }
}

struct OptLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    attn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ffn_norm: LayerNorm,
}

/// OPT's key/value cache, `[rows, heads, len, d]` per layer.
#[derive(Clone, Default)]
pub struct OptCache {
    kv: Vec<(Tensor, Tensor)>,
}

impl OptCache {
    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.kv.first().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Whether nothing has been processed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep rows `rows`, in that order.
    pub fn select(&mut self, rows: &Tensor) -> Result<()> {
        for kv in self.kv.iter_mut() {
            *kv = (kv.0.index_select(rows, 0)?, kv.1.index_select(rows, 0)?);
        }
        Ok(())
    }
}

/// `OPTForCausalLM` (`language_model.*`).
pub struct Opt {
    embed_tokens: Embedding,
    embed_positions: Embedding,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<OptLayer>,
    final_norm: Option<LayerNorm>,
    lm_head: Linear,
    heads: usize,
    pre_norm: bool,
    config: OptConfig,
}

/// OPT's learned positions start at index 2 (fairseq's padding offset).
const POSITION_OFFSET: usize = 2;

impl Opt {
    fn load(vb: VarBuilder, c: &OptConfig) -> Result<Self> {
        if c.model_type != "opt" {
            candle_core::bail!(
                "BLIP-2 with a '{}' language model is not supported (OPT only; Flan-T5 checkpoints are not)",
                c.model_type
            );
        }
        if c.activation_function != "relu" {
            candle_core::bail!("OPT activation '{}' is not supported (relu)", c.activation_function);
        }
        let h = c.hidden_size;
        let e = c.word_embed_proj_dim.unwrap_or(h);
        let d = vb.pp("model.decoder");
        let embed_tokens = embedding(c.vocab_size, e, d.pp("embed_tokens"))?;
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            linear_no_bias(e, c.vocab_size, vb.pp("lm_head"))?
        } else {
            Linear::new(embed_tokens.embeddings().clone(), None)
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = d.pp(format!("layers.{i}"));
                Ok(OptLayer {
                    q: linear(h, h, l.pp("self_attn.q_proj"))?,
                    k: linear(h, h, l.pp("self_attn.k_proj"))?,
                    v: linear(h, h, l.pp("self_attn.v_proj"))?,
                    out: linear(h, h, l.pp("self_attn.out_proj"))?,
                    attn_norm: layer_norm(h, 1e-5, l.pp("self_attn_layer_norm"))?,
                    fc1: linear(h, c.ffn_dim, l.pp("fc1"))?,
                    fc2: linear(c.ffn_dim, h, l.pp("fc2"))?,
                    ffn_norm: layer_norm(h, 1e-5, l.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Opt {
            embed_positions: embedding(c.max_position_embeddings + POSITION_OFFSET, h, d.pp("embed_positions"))?,
            project_in: (e != h).then(|| linear_no_bias(e, h, d.pp("project_in"))).transpose()?,
            project_out: (e != h)
                .then(|| linear_no_bias(h, e, d.pp("project_out")))
                .transpose()?,
            layers,
            final_norm: (c.do_layer_norm_before && !c.remove_final_layer_norm)
                .then(|| layer_norm(h, 1e-5, d.pp("final_layer_norm")))
                .transpose()?,
            embed_tokens,
            lm_head,
            heads: c.num_attention_heads,
            pre_norm: c.do_layer_norm_before,
            config: c.clone(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &OptConfig {
        &self.config
    }

    /// Token embeddings `[b, s, e]` of `ids` `[b, s]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Logits `[b, s, vocab]` for new input embeddings `[b, s, e]` after those in `cache`.
    pub fn forward(&self, embeds: &Tensor, cache: &mut OptCache) -> Result<Tensor> {
        let x = self.hidden(embeds, cache)?;
        self.head(&x)
    }

    /// Logits `[b, vocab]` of the last new position only: what decoding
    /// needs, without the head over a long prefix (32 image queries and the
    /// prompt at 50k vocabulary entries each).
    pub fn forward_last(&self, embeds: &Tensor, cache: &mut OptCache) -> Result<Tensor> {
        let x = self.hidden(embeds, cache)?;
        let s = x.dim(1)?;
        self.head(&x.narrow(1, s - 1, 1)?)?.squeeze(1)
    }

    /// The final norm, output projection and LM head, per position.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(n) = &self.final_norm {
            x = n.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x)?;
        }
        self.lm_head.forward(&x)
    }

    /// The decoder layers' output `[b, s, e]`, before the final norm.
    fn hidden(&self, embeds: &Tensor, cache: &mut OptCache) -> Result<Tensor> {
        let (_, s, _) = embeds.dims3()?;
        let past = cache.len();
        if past + s > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds OPT's {} positions",
                past + s,
                self.config.max_position_embeddings
            );
        }
        let dev = embeds.device();
        let pos = Tensor::arange(
            (past + POSITION_OFFSET) as u32,
            (past + s + POSITION_OFFSET) as u32,
            dev,
        )?;
        let mut x = match &self.project_in {
            Some(p) => p.forward(embeds)?,
            None => embeds.clone(),
        };
        x = x.broadcast_add(&self.embed_positions.forward(&pos)?.unsqueeze(0)?)?;
        let causal: Vec<f32> = (0..s)
            .flat_map(|i| (0..past + s).map(move |j| if j > past + i { f32::MIN } else { 0.0 }))
            .collect();
        let bias = Tensor::from_vec(causal, (1, 1, s, past + s), dev)?.to_dtype(x.dtype())?;
        for (i, l) in self.layers.iter().enumerate() {
            let a_in = if self.pre_norm {
                l.attn_norm.forward(&x)?
            } else {
                x.clone()
            };
            let (k, v) = (
                split_heads(&l.k.forward(&a_in)?, self.heads)?,
                split_heads(&l.v.forward(&a_in)?, self.heads)?,
            );
            let (k, v) = match cache.kv.get(i) {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            let q = split_heads(&l.q.forward(&a_in)?, self.heads)?;
            let a = l.out.forward(&merge_heads(&attend(&q, &k, &v, Some(&bias))?)?)?;
            if i < cache.kv.len() {
                cache.kv[i] = (k, v);
            } else {
                cache.kv.push((k, v));
            }
            x = (x + a)?;
            if !self.pre_norm {
                x = l.attn_norm.forward(&x)?;
            }
            let f_in = if self.pre_norm {
                l.ffn_norm.forward(&x)?
            } else {
                x.clone()
            };
            x = (x + l.fc2.forward(&l.fc1.forward(&f_in)?.relu()?)?)?;
            if !self.pre_norm {
                x = l.ffn_norm.forward(&x)?;
            }
        }
        Ok(x)
    }
}

/// The whole captioner.
pub struct Blip2 {
    /// Image encoder.
    pub vision: VisionModel,
    /// Query transformer.
    pub qformer: QFormer,
    language_projection: Linear,
    /// Language model.
    pub opt: Opt,
    /// The configuration it was built from.
    pub config: Config,
}

impl Blip2 {
    /// Load a Blip2ForConditionalGeneration (OPT) checkpoint.
    pub fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        let q = &c.qformer_config;
        if q.encoder_hidden_size != c.vision_config.hidden_size {
            candle_core::bail!(
                "BLIP-2 config: the Q-Former reads {}-wide image features but the ViT is {} wide",
                q.encoder_hidden_size,
                c.vision_config.hidden_size
            );
        }
        let opt = Opt::load(vb.pp("language_model"), &c.text_config)?;
        let e = c.text_config.word_embed_proj_dim.unwrap_or(c.text_config.hidden_size);
        Ok(Blip2 {
            vision: VisionModel::load(vb.pp("vision_model"), &(&c.vision_config).into())?,
            qformer: QFormer::load(
                vb.pp("qformer"),
                vb.get((1, c.num_query_tokens, q.hidden_size), "query_tokens")?,
                q,
            )?,
            language_projection: linear(q.hidden_size, e, vb.pp("language_projection"))?,
            opt,
            config: c.clone(),
        })
    }

    /// The language model's input for the image part: `[b, queries, e]`.
    pub fn image_prefix(&self, pixels: &Tensor) -> Result<Tensor> {
        let image = self.vision.forward(pixels)?;
        self.language_projection.forward(&self.qformer.forward(&image)?)
    }
}
