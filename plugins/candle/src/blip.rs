//! BLIP image captioning (Li et al. 2022, "BLIP: Bootstrapping
//! Language-Image Pre-training for Unified Vision-Language Understanding and
//! Generation"): a ViT image encoder and a BERT decoder that cross-attends to
//! it. RAGAR's retrieval module captions history items (Eq. 2); the paper
//! uses BLIP-2, this is the BLIP captioner the same slot takes.
//!
//! Reference implementation: transformers' `BlipForConditionalGeneration`
//! (`models/blip/modeling_blip.py`, `modeling_blip_text.py`): pre-norm ViT
//! with a fused `qkv` projection and learned absolute positions, its last
//! hidden state after `post_layernorm` as the image embedding; a post-norm
//! BERT decoder (self-attention with a causal mask, cross-attention to the
//! image, GELU feed-forward) and the `cls.predictions` head (transform,
//! decoder tied to the word embeddings unless stored). Weight names match the
//! Salesforce/blip-image-captioning-{base,large} checkpoints.
//!
//! Decoding starts from `[DEC]` (`bos_token_id`), optionally followed by a
//! prompt, and stops at `[SEP]` (`sep_token_id`). Greedy and beam search
//! follow transformers' `generate` (see [`BlipCaptioner`](crate::blip_captioner)).

use crate::activation as act;
use crate::conv::{conv2d, Conv2d};
use crate::linear::{linear, Linear};
use candle_core::{IndexOp, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, Conv2dConfig, Embedding, LayerNorm, VarBuilder};

/// `config.json` of a BlipForConditionalGeneration checkpoint.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {
    /// The BERT decoder.
    #[serde(default)]
    pub text_config: TextConfig,
    /// The ViT encoder.
    #[serde(default)]
    pub vision_config: VisionConfig,
}

/// Decoder hyper-parameters (defaults = transformers' `BlipTextConfig`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Vocabulary (bert-base-uncased + [DEC] + [ENC]).
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Width of the image embeddings it attends to.
    pub encoder_hidden_size: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// `[DEC]`: decoding starts here.
    pub bos_token_id: u32,
    /// `[SEP]`: decoding stops here.
    pub sep_token_id: u32,
    /// Padding id.
    pub pad_token_id: u32,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            bos_token_id: 30522,
            sep_token_id: 102,
            pad_token_id: 0,
        }
    }
}

/// Encoder hyper-parameters (defaults = transformers' `BlipVisionConfig`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct VisionConfig {
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
    /// Patch side in pixels.
    pub patch_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            layer_norm_eps: 1e-5,
        }
    }
}

/// Softmax(q k^T / sqrt(d) + bias) v over `[b, h, s, d]`, softmax in f32.
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let hd = q.dim(D::Minus1)?;
    crate::attention::attend(q, k, v, (hd as f64).powf(-0.5), bias)
}

pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, w) = x.dims3()?;
    x.reshape((b, s, heads, w / heads))?.transpose(1, 2)?.contiguous()
}

pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

struct VisionLayer {
    qkv: Linear,
    projection: Linear,
    norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: LayerNorm,
    heads: usize,
}

impl VisionLayer {
    fn load(vb: VarBuilder, c: &VisionConfig) -> Result<Self> {
        let h = c.hidden_size;
        // BLIP stores `qkv.bias`; BLIP-2 checkpoints `q_bias` and `v_bias`
        // (the key bias is zero), or `qkv.bias` when saved by transformers 5.
        let a = vb.pp("self_attn");
        let qkv_w = a.get((3 * h, h), "qkv.weight")?;
        let qkv_b = if a.contains_tensor("qkv.bias") {
            Some(a.get(3 * h, "qkv.bias")?)
        } else if a.contains_tensor("q_bias") {
            let q = a.get(h, "q_bias")?;
            Some(Tensor::cat(&[&q, &q.zeros_like()?, &a.get(h, "v_bias")?], 0)?)
        } else {
            None
        };
        Ok(VisionLayer {
            qkv: Linear::new(qkv_w, qkv_b),
            projection: linear(h, h, vb.pp("self_attn.projection"))?,
            norm1: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
            norm2: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x)?)?
            .reshape((b, s, 3, self.heads, h / self.heads))?
            .permute((2, 0, 3, 1, 4))?;
        // Views: the fused attention reads them in place.
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?, qkv.i(2)?);
        let x = (x + self.projection.forward(&merge_heads(&attend(&q, &k, &v, None)?)?)?)?;
        let y = self
            .fc2
            .forward(&act::gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        x + y
    }
}

/// The ViT image encoder (`vision_model.*`).
pub struct VisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
    image_size: usize,
}

impl VisionModel {
    /// Load from `vb` at `vision_model`.
    pub fn load(vb: VarBuilder, c: &VisionConfig) -> Result<Self> {
        let n = (c.image_size / c.patch_size).pow(2) + 1;
        let conv = Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        Ok(VisionModel {
            class_embedding: vb.get((1, 1, c.hidden_size), "embeddings.class_embedding")?,
            patch_embedding: conv2d(
                3,
                c.hidden_size,
                c.patch_size,
                conv,
                vb.pp("embeddings.patch_embedding"),
            )?,
            position_embedding: vb.get((1, n, c.hidden_size), "embeddings.position_embedding")?,
            layers: (0..c.num_hidden_layers)
                .map(|i| VisionLayer::load(vb.pp(format!("encoder.layers.{i}")), c))
                .collect::<Result<_>>()?,
            post_layernorm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            image_size: c.image_size,
        })
    }

    /// Input side in pixels.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `[b, 3, size, size]` normalised pixels -> image embeddings `[b, 1 + patches, h]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(&pixels.to_dtype(self.class_embedding.dtype())?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let h = patches.dim(2)?;
        let cls = self.class_embedding.broadcast_as((b, 1, h))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// BERT attention block with its post-norm residual (`attention.*` or
/// `crossattention.*`; the q/k/v projections sit under `self` in BLIP and
/// under `attention` in BLIP-2's Q-Former).
pub(crate) struct TextAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl TextAttention {
    pub(crate) fn load(vb: VarBuilder, inner: &str, h: usize, kv_width: usize, heads: usize, eps: f64) -> Result<Self> {
        Ok(TextAttention {
            query: linear(h, h, vb.pp(inner).pp("query"))?,
            key: linear(kv_width, h, vb.pp(inner).pp("key"))?,
            value: linear(kv_width, h, vb.pp(inner).pp("value"))?,
            dense: linear(h, h, vb.pp("output.dense"))?,
            norm: layer_norm(h, eps, vb.pp("output.LayerNorm"))?,
            heads,
        })
    }

    pub(crate) fn kv(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.key.forward(x)?, self.heads)?,
            split_heads(&self.value.forward(x)?, self.heads)?,
        ))
    }

    pub(crate) fn forward(&self, x: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?;
        let ctx = merge_heads(&attend(&q, k, v, bias)?)?;
        self.norm.forward(&(self.dense.forward(&ctx)? + x)?)
    }
}

struct TextLayer {
    attention: TextAttention,
    crossattention: TextAttention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

/// Keys and values kept between decoding steps, `[beams, heads, len, d]` per layer.
#[derive(Clone, Default)]
pub struct DecoderCache {
    self_kv: Vec<(Tensor, Tensor)>,
    cross_kv: Vec<(Tensor, Tensor)>,
}

impl DecoderCache {
    /// Tokens already decoded.
    pub fn len(&self) -> usize {
        self.self_kv.first().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Whether nothing has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep rows `rows` (beam reordering), in that order.
    pub fn select(&mut self, rows: &Tensor) -> Result<()> {
        for kv in self.self_kv.iter_mut().chain(self.cross_kv.iter_mut()) {
            *kv = (kv.0.index_select(rows, 0)?, kv.1.index_select(rows, 0)?);
        }
        Ok(())
    }
}

/// The BERT decoder with its LM head (`text_decoder.*`).
pub struct TextDecoder {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<TextLayer>,
    transform: Linear,
    transform_norm: LayerNorm,
    decoder: Linear,
    config: TextConfig,
}

impl TextDecoder {
    /// Load from `vb` at `text_decoder`.
    pub fn load(vb: VarBuilder, c: &TextConfig) -> Result<Self> {
        let h = c.hidden_size;
        let bert = vb.pp("bert");
        let word_embeddings = embedding(c.vocab_size, h, bert.pp("embeddings.word_embeddings"))?;
        let head = vb.pp("cls.predictions");
        // Tied to the word embeddings unless the checkpoint stores its own.
        let decoder_w = if head.contains_tensor("decoder.weight") {
            head.get((c.vocab_size, h), "decoder.weight")?
        } else {
            word_embeddings.embeddings().clone()
        };
        let decoder_b = if head.contains_tensor("bias") {
            head.get(c.vocab_size, "bias")?
        } else {
            head.get(c.vocab_size, "decoder.bias")?
        };
        let (heads, eps) = (c.num_attention_heads, c.layer_norm_eps);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = bert.pp(format!("encoder.layer.{i}"));
                Ok(TextLayer {
                    attention: TextAttention::load(l.pp("attention"), "self", h, h, heads, eps)?,
                    crossattention: TextAttention::load(
                        l.pp("crossattention"),
                        "self",
                        h,
                        c.encoder_hidden_size,
                        heads,
                        eps,
                    )?,
                    intermediate: linear(h, c.intermediate_size, l.pp("intermediate.dense"))?,
                    output: linear(c.intermediate_size, h, l.pp("output.dense"))?,
                    norm: layer_norm(h, c.layer_norm_eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(TextDecoder {
            word_embeddings,
            position_embeddings: embedding(c.max_position_embeddings, h, bert.pp("embeddings.position_embeddings"))?,
            embeddings_norm: layer_norm(h, c.layer_norm_eps, bert.pp("embeddings.LayerNorm"))?,
            layers,
            transform: linear(h, h, head.pp("transform.dense"))?,
            transform_norm: layer_norm(h, c.layer_norm_eps, head.pp("transform.LayerNorm"))?,
            decoder: Linear::new(decoder_w, Some(decoder_b)),
            config: c.clone(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// Logits `[b, s, vocab]` for new tokens `ids` `[b, s]` after those in
    /// `cache`, attending to `image` `[b, patches, w]` (cross keys and values
    /// are computed once, on the first call).
    pub fn forward(&self, ids: &Tensor, image: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let past = cache.len();
        if past + s > self.config.max_position_embeddings {
            candle_core::bail!(
                "caption of {} tokens exceeds the decoder's {} positions",
                past + s,
                self.config.max_position_embeddings
            );
        }
        let pos = Tensor::arange(past as u32, (past + s) as u32, ids.device())?.unsqueeze(0)?;
        let x = self
            .word_embeddings
            .forward(ids)?
            .broadcast_add(&self.position_embeddings.forward(&pos)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;
        // New token i sees every cached token and new tokens up to itself.
        let causal: Vec<f32> = (0..s)
            .flat_map(|i| (0..past + s).map(move |j| if j > past + i { f32::MIN } else { 0.0 }))
            .collect();
        let bias = Tensor::from_vec(causal, (1, 1, s, past + s), ids.device())?.to_dtype(x.dtype())?;
        let first = cache.cross_kv.is_empty();
        for (i, layer) in self.layers.iter().enumerate() {
            let (k, v) = layer.attention.kv(&x)?;
            let (k, v) = match cache.self_kv.get(i) {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            let h = layer.attention.forward(&x, &k, &v, Some(&bias))?;
            if i < cache.self_kv.len() {
                cache.self_kv[i] = (k, v);
            } else {
                cache.self_kv.push((k, v));
            }
            if first {
                cache.cross_kv.push(layer.crossattention.kv(image)?);
            }
            let (ck, cv) = &cache.cross_kv[i];
            let h = layer.crossattention.forward(&h, ck, cv, None)?;
            let y = layer
                .output
                .forward(&act::gelu_erf(&layer.intermediate.forward(&h)?)?)?;
            x = layer.norm.forward(&(y + h)?)?;
        }
        let t = self
            .transform_norm
            .forward(&act::gelu_erf(&self.transform.forward(&x)?)?)?;
        self.decoder.forward(&t)
    }
}

/// Both halves.
pub struct Blip {
    /// Image encoder.
    pub vision: VisionModel,
    /// Caption decoder.
    pub decoder: TextDecoder,
}

impl Blip {
    /// Load a BlipForConditionalGeneration checkpoint.
    pub fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        if c.text_config.encoder_hidden_size != c.vision_config.hidden_size {
            candle_core::bail!(
                "BLIP config: the decoder attends to {}-wide image features but the encoder is {} wide",
                c.text_config.encoder_hidden_size,
                c.vision_config.hidden_size
            );
        }
        Ok(Blip {
            vision: VisionModel::load(vb.pp("vision_model"), &c.vision_config)?,
            decoder: TextDecoder::load(vb.pp("text_decoder"), &c.text_config)?,
        })
    }
}
