//! CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
//! Natural Language Supervision"): text and image towers with projections.
//!
//! Reference implementation: `transformers.models.clip.modeling_clip`
//! (`CLIPModel`, `CLIPTextModel`, `CLIPVisionModel`): pre-norm encoder
//! layers, quick-GELU (OpenAI checkpoints) or GELU, causal text attention,
//! text pooling at the end-of-text token, vision pooling at the class token
//! after `post_layernorm`. Weight names match HF checkpoints
//! (`text_model.encoder.layers.{i}.self_attn.q_proj.weight`,
//! `vision_model.pre_layrnorm.weight` — sic —, `visual_projection.weight`).

use crate::activation as act;
use crate::attention::attend;
use crate::conv::{conv2d_no_bias, Conv2d};
use crate::linear::{linear, linear_no_bias, Linear};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Conv2dConfig, Embedding, LayerNorm, VarBuilder};

/// `config.json` of a CLIPModel (or the text part alone, as in SD's text encoder).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {
    /// Text tower.
    #[serde(default)]
    pub text_config: TextConfig,
    /// Vision tower.
    #[serde(default)]
    pub vision_config: VisionConfig,
    /// Width of the shared embedding space.
    #[serde(default = "d512")]
    pub projection_dim: usize,
}

/// Text tower hyper-parameters (defaults = openai/clip-vit-base-patch32, as HF's).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// `quick_gelu` or `gelu`.
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// End-of-text id; 2 means "old config: pool at the highest id".
    pub eos_token_id: u32,
    /// Projection width when the text model stands alone.
    pub projection_dim: usize,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            projection_dim: 512,
        }
    }
}

/// Vision tower hyper-parameters (defaults = openai/clip-vit-base-patch32, as HF's).
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
    /// Input resolution.
    pub image_size: usize,
    /// Patch size.
    pub patch_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// `quick_gelu` or `gelu`.
    pub hidden_act: String,
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
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

fn d512() -> usize {
    512
}

#[derive(Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => candle_core::bail!("unsupported CLIP hidden_act '{other}' (quick_gelu or gelu)"),
        }
    }
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => act::quick_gelu(x),
            Activation::Gelu => act::gelu_erf(x),
        }
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, h: usize, heads: usize) -> Result<Self> {
        Ok(Attention {
            q: linear(h, h, vb.pp("q_proj"))?,
            k: linear(h, h, vb.pp("k_proj"))?,
            v: linear(h, h, vb.pp("v_proj"))?,
            out: linear(h, h, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// `bias`: additive `[b, 1, s, s]` mask or none.
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |t: Tensor| t.reshape((b, s, self.heads, hd))?.transpose(1, 2);
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let o = attend(&q, &k, &v, (hd as f64).powf(-0.5), bias)?;
        self.out.forward(&o.transpose(1, 2)?.reshape((b, s, h))?)
    }
}

struct EncoderLayer {
    attn: Attention,
    norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, h: usize, inter: usize, heads: usize, eps: f64, act: Activation) -> Result<Self> {
        Ok(EncoderLayer {
            attn: Attention::load(vb.pp("self_attn"), h, heads)?,
            norm1: layer_norm(h, eps, vb.pp("layer_norm1"))?,
            fc1: linear(h, inter, vb.pp("mlp.fc1"))?,
            fc2: linear(inter, h, vb.pp("mlp.fc2"))?,
            norm2: layer_norm(h, eps, vb.pp("layer_norm2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, bias)?)?;
        let y = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        x + y
    }
}

fn load_layers(
    vb: VarBuilder,
    n: usize,
    h: usize,
    inter: usize,
    heads: usize,
    eps: f64,
    act: &str,
) -> Result<Vec<EncoderLayer>> {
    let act = Activation::parse(act)?;
    (0..n)
        .map(|i| EncoderLayer::load(vb.pp(format!("encoder.layers.{i}")), h, inter, heads, eps, act))
        .collect()
}

/// The text tower (`text_model.*`).
pub struct TextTransformer {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    eos_token_id: u32,
    max_len: usize,
}

impl TextTransformer {
    /// Load from `vb` at `text_model`.
    pub fn load(vb: VarBuilder, c: &TextConfig) -> Result<Self> {
        Ok(TextTransformer {
            token_embedding: embedding(c.vocab_size, c.hidden_size, vb.pp("embeddings.token_embedding"))?,
            position_embedding: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                vb.pp("embeddings.position_embedding"),
            )?,
            layers: load_layers(
                vb.clone(),
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                &c.hidden_act,
            )?,
            final_layer_norm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?,
            eos_token_id: c.eos_token_id,
            max_len: c.max_position_embeddings,
        })
    }

    /// `ids`: `[b, s]` u32; `mask`: optional `[b, s]` (1 = token, 0 = padding).
    /// Returns (last hidden state `[b, s, h]`, pooled `[b, h]`).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, s) = ids.dims2()?;
        if s > self.max_len {
            candle_core::bail!("CLIP text of {s} tokens exceeds the context of {}", self.max_len);
        }
        let dev = ids.device();
        let pos = Tensor::arange(0u32, s as u32, dev)?.unsqueeze(0)?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&pos)?)?;
        let bias = attention_bias(b, s, mask, x.dtype(), dev)?;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&bias))?;
        }
        let x = self.final_layer_norm.forward(&x)?;
        let pooled = self.pool(&x, ids)?;
        Ok((x, pooled))
    }

    /// The hidden state at each sequence's end-of-text token (first match).
    fn pool(&self, x: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let at = if self.eos_token_id == 2 {
                    // Old configs: the end-of-text token has the highest id.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    row.iter().position(|&t| t == self.eos_token_id).unwrap_or(0)
                };
                x.i((i, at))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}

/// Causal mask plus key padding, as additive `[b, 1, s, s]` biases.
fn attention_bias(b: usize, s: usize, mask: Option<&Tensor>, dtype: DType, dev: &Device) -> Result<Tensor> {
    let neg = f32::MIN;
    let causal: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { neg } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, s, s), dev)?;
    let bias = match mask {
        None => causal.broadcast_as((b, 1, s, s))?.contiguous()?,
        Some(m) => {
            let keep = m.to_dtype(DType::F32)?.reshape((b, 1, 1, s))?;
            let pad = ((keep - 1.0)?.neg()? * f64::from(neg))?.broadcast_as((b, 1, s, s))?;
            // min() keeps one f32::MIN instead of overflowing to -inf.
            causal.broadcast_as((b, 1, s, s))?.minimum(&pad)?
        }
    };
    bias.to_dtype(dtype)
}

/// The vision tower (`vision_model.*`).
pub struct VisionTransformer {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    image_size: usize,
}

impl VisionTransformer {
    /// Load from `vb` at `vision_model`.
    pub fn load(vb: VarBuilder, c: &VisionConfig) -> Result<Self> {
        let patches = (c.image_size / c.patch_size).pow(2);
        let conv = Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        Ok(VisionTransformer {
            class_embedding: vb.get(c.hidden_size, "embeddings.class_embedding")?,
            patch_embedding: conv2d_no_bias(
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                conv,
                vb.pp("embeddings.patch_embedding"),
            )?,
            position_embedding: embedding(patches + 1, c.hidden_size, vb.pp("embeddings.position_embedding"))?,
            pre_layrnorm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers: load_layers(
                vb.clone(),
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                &c.hidden_act,
            )?,
            post_layernorm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            image_size: c.image_size,
        })
    }

    /// Input resolution.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `pixels`: `[b, 3, size, size]`, already normalised. Returns (last
    /// hidden state `[b, 1 + patches, h]`, pooled `[b, h]`).
    pub fn forward(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, _, hgt, wid) = pixels.dims4()?;
        if hgt != self.image_size || wid != self.image_size {
            candle_core::bail!(
                "CLIP vision input is {hgt}x{wid}, the model takes {0}x{0}",
                self.image_size
            );
        }
        let dtype = self.class_embedding.dtype();
        let patches = self
            .patch_embedding
            .forward(&pixels.to_dtype(dtype)?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let h = self.class_embedding.dim(0)?;
        let cls = self.class_embedding.reshape((1, 1, h))?.broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        let n = x.dim(1)?;
        let pos = Tensor::arange(0u32, n as u32, pixels.device())?.unsqueeze(0)?;
        let mut x = self
            .pre_layrnorm
            .forward(&x.broadcast_add(&self.position_embedding.forward(&pos)?)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        let pooled = self.post_layernorm.forward(&x.i((.., 0))?)?;
        Ok((x, pooled))
    }
}

/// Both towers and their projections into the shared space.
pub struct ClipModel {
    /// Text tower.
    pub text: TextTransformer,
    /// Vision tower.
    pub vision: VisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
}

impl ClipModel {
    /// Load a full CLIPModel checkpoint.
    pub fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        Ok(ClipModel {
            text: TextTransformer::load(vb.pp("text_model"), &c.text_config)?,
            vision: VisionTransformer::load(vb.pp("vision_model"), &c.vision_config)?,
            text_projection: linear_no_bias(c.text_config.hidden_size, c.projection_dim, vb.pp("text_projection"))?,
            visual_projection: linear_no_bias(
                c.vision_config.hidden_size,
                c.projection_dim,
                vb.pp("visual_projection"),
            )?,
        })
    }

    /// Projected text features `[b, projection_dim]` (not normalised).
    pub fn text_features(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.text_projection.forward(&self.text.forward(ids, mask)?.1)
    }

    /// Projected image features `[b, projection_dim]` (not normalised).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.visual_projection.forward(&self.vision.forward(pixels)?.1)
    }
}
