//! The Stable Diffusion denoiser: a UNet conditioned on timestep and text
//! (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
//! Diffusion Models"), the network RAGAR's Generator runs (SD 1.5).
//!
//! Reference implementation: diffusers' `UNet2DConditionModel`
//! (`models/unets/unet_2d_condition.py`, `unet_2d_blocks.py`, `resnet.py`,
//! `transformers/transformer_2d.py`, `attention.py`): sinusoidal timestep
//! embedding (cos first), ResNet blocks with the time embedding added after
//! the first convolution, spatial transformers (GroupNorm, 1x1 or linear
//! projection, self-attention, cross-attention to the text, GEGLU
//! feed-forward) in `CrossAttn*` blocks, skip connections concatenated on the
//! way up. Weight names and `config.json` keys are diffusers' (`unet/`
//! folder of a pipeline). Covers SD 1.x and 2.x; configs asking for class,
//! addition or other time embeddings (SDXL, unCLIP) are refused by name.
//!
//! The ResNet block and the resampling layers are shared with the VAE (`vae.rs`).

use crate::activation as act;
use crate::conv::{conv2d, Conv2d};
use crate::group_norm::{group_norm, GroupNorm};
use crate::linear::{linear, linear_no_bias, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{layer_norm, Conv2dConfig, LayerNorm, VarBuilder};

/// `unet/config.json`.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Latent side the model was trained at (64 for SD 1.5 = 512 px).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// `CrossAttnDownBlock2D` or `DownBlock2D`, per level.
    pub down_block_types: Vec<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D`, per level (top to bottom reversed).
    pub up_block_types: Vec<String>,
    /// ResNet layers per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Text feature width (768 for SD 1.5).
    pub cross_attention_dim: usize,
    /// Heads per level, as diffusers reads this legacy key (an int or a list).
    pub attention_head_dim: HeadSpec,
    /// When set, overrides `attention_head_dim` as the head count.
    #[serde(default)]
    pub num_attention_heads: Option<HeadSpec>,
    /// Groups of every GroupNorm.
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    /// ResNet GroupNorm epsilon.
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    /// Linear instead of 1x1-conv projections in and out of transformers (SD 2.x).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Timestep embedding order.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Timestep embedding frequency shift.
    #[serde(default)]
    pub freq_shift: f64,
    /// Padding of the downsampling convolutions.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Transformer layers per level (an int or a list).
    #[serde(default)]
    pub transformer_layers_per_block: Option<HeadSpec>,
    /// Refused when set: class-conditioned UNets.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Refused when set: SDXL-style added conditioning.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Only `UNetMidBlock2DCrossAttn` is supported.
    #[serde(default)]
    pub mid_block_type: Option<String>,
    /// Refused when true.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Refused when true.
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    /// Refused unless `default`.
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// Refused unless `positional`.
    #[serde(default)]
    pub time_embedding_type: Option<String>,
}

/// An int for every level, or one per level.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum HeadSpec {
    /// Same for every level.
    One(usize),
    /// One per level.
    PerLevel(Vec<usize>),
}

impl HeadSpec {
    fn per_level(&self, n: usize) -> Result<Vec<usize>> {
        match self {
            HeadSpec::One(v) => Ok(vec![*v; n]),
            HeadSpec::PerLevel(v) if v.len() == n => Ok(v.clone()),
            HeadSpec::PerLevel(v) => candle_core::bail!("{} values given for {n} UNet levels", v.len()),
        }
    }
}

fn d32() -> usize {
    32
}
fn eps5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}

impl Config {
    /// Refuse what this implementation does not do, naming the key.
    fn check(&self) -> Result<()> {
        let refuse = |key: &str, v: &dyn std::fmt::Debug| -> Result<()> {
            candle_core::bail!("unet/config.json: {key} = {v:?} is not supported (SD 1.x / 2.x UNets only)")
        };
        if let Some(v) = &self.class_embed_type {
            refuse("class_embed_type", v)?;
        }
        if let Some(v) = &self.addition_embed_type {
            refuse("addition_embed_type", v)?;
        }
        if let Some(v) = self
            .mid_block_type
            .as_deref()
            .filter(|v| *v != "UNetMidBlock2DCrossAttn")
        {
            refuse("mid_block_type", &v)?;
        }
        if self.center_input_sample {
            refuse("center_input_sample", &true)?;
        }
        if !matches!(
            self.only_cross_attention,
            serde_json::Value::Null | serde_json::Value::Bool(false)
        ) {
            refuse("only_cross_attention", &self.only_cross_attention)?;
        }
        if let Some(v) = self.resnet_time_scale_shift.as_deref().filter(|v| *v != "default") {
            refuse("resnet_time_scale_shift", &v)?;
        }
        if let Some(v) = self.time_embedding_type.as_deref().filter(|v| *v != "positional") {
            refuse("time_embedding_type", &v)?;
        }
        let n = self.block_out_channels.len();
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "unet/config.json: {n} block_out_channels but {} down and {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                refuse("block type", t)?;
            }
        }
        Ok(())
    }

    /// How many times the latent is halved on the way down.
    pub fn downsamples(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, k, cfg, vb)
}

/// diffusers' `ResnetBlock2D` (time embedding optional, as in the VAE).
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub(crate) fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: group_norm(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: temb.map(|t| linear(t, cout, vb.pp("time_emb_proj"))).transpose()?,
            norm2: group_norm(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: (cin != cout)
                .then(|| conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut")))
                .transpose()?,
        })
    }

    /// `temb` is the already-activated time embedding `[b, t]` (one SiLU
    /// shared by all blocks: diffusers applies it in each block, to the same value).
    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            h = h.broadcast_add(&proj.forward(t)?.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Stride-2 convolution (`downsamplers.0.conv`).
pub(crate) struct Downsample(Conv2d);

impl Downsample {
    pub(crate) fn load(vb: VarBuilder, c: usize, padding: usize) -> Result<Self> {
        Ok(Downsample(conv(c, c, 3, 2, padding, vb.pp("conv"))?))
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

/// Nearest-neighbour 2x, then a convolution (`upsamplers.0.conv`).
pub(crate) struct Upsample(Conv2d);

impl Upsample {
    pub(crate) fn load(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Upsample(conv(c, c, 3, 1, 1, vb.pp("conv"))?))
    }
    /// `size`: the output size when it is not exactly twice the input
    /// (odd latent sides: the skip connection's size decides).
    pub(crate) fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.0.forward(&x.upsample_nearest2d(oh, ow)?)
    }
}

/// Scaled dot-product attention over `[b, heads, s, d]`, chunked along the
/// queries so that a 64x64 latent (4,096 tokens) does not hold every head's
/// full score matrix at once. Softmax in f32. (On the CPU in f32 the fused
/// op of `attention.rs` runs instead: it holds one block of scores per task.)
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    const CHUNK_SCORES: usize = 1 << 24;
    let (b, h, s, _) = q.dims4()?;
    let sk = k.dim(2)?;
    let kt = k.t()?.contiguous()?;
    let rows = (CHUNK_SCORES / (b * h * sk).max(1)).clamp(1, s);
    let mut outs = Vec::with_capacity(s.div_ceil(rows));
    for start in (0..s).step_by(rows) {
        let len = rows.min(s - start);
        let qc = (q.narrow(2, start, len)? * scale)?;
        let w = qc.matmul(&kt)?;
        let p = act::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        outs.push(p.matmul(v)?);
    }
    Tensor::cat(&outs, 2)
}

/// diffusers' `Attention` as the UNet uses it: bias-free q/k/v, biased output.
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(CrossAttention {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, s, dim) = x.dims3()?;
        let hd = dim / self.heads;
        // The heads as views; the fused CPU op reads them in place.
        let split = |t: Tensor| -> Result<Tensor> {
            let n = t.dim(1)?;
            t.reshape((b, n, self.heads, hd))?.transpose(1, 2)
        };
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(context)?)?;
        let v = split(self.to_v.forward(context)?)?;
        let scale = (hd as f64).powf(-0.5);
        let o = match crate::attention::fused(&q, &k, &v, None) {
            true => crate::attention::attend(&q, &k, &v, scale, None)?,
            false => attention(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, scale)?,
        };
        self.to_out.forward(&o.transpose(1, 2)?.reshape((b, s, dim))?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(TransformerBlock {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::load(vb.pp("attn1"), dim, dim, heads)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::load(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_proj: linear(dim, 2 * inner, vb.pp("ff.net.0.proj"))?,
            ff_out: linear(inner, dim, vb.pp("ff.net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let x = (self.attn1.forward(&n, &n)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + x)?;
        let p = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        let half = p.dim(D::Minus1)? / 2;
        let geglu = (p.narrow(D::Minus1, 0, half)? * act::gelu_erf(&p.narrow(D::Minus1, half, half)?)?)?;
        self.ff_out.forward(&geglu)? + x
    }
}

/// The in/out projection of a spatial transformer: 1x1 conv (SD 1.x) or linear (SD 2.x).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` over a feature map.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn load(vb: VarBuilder, c: usize, layers: usize, heads: usize, cfg: &Config) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(conv(c, c, 1, 1, 0, vb.pp(name))?)
            })
        };
        Ok(SpatialTransformer {
            norm: group_norm(cfg.norm_num_groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::load(
                        vb.pp(format!("transformer_blocks.{i}")),
                        c,
                        cfg.cross_attention_dim,
                        heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let n = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Projection::Conv(p) => to_tokens(p.forward(&n)?)?,
            Projection::Linear(p) => p.forward(&to_tokens(n)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let to_map = |t: Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_map(t)?)?,
            Projection::Linear(p) => to_map(p.forward(&t)?)?,
        };
        out + x
    }
}

/// One level: ResNets, each optionally followed by a spatial transformer.
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
}

impl Level {
    fn forward(&self, i: usize, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.resnets[i].forward(x, Some(temb))?;
        match self.attentions.get(i) {
            Some(a) => a.forward(&x, context),
            None => Ok(x),
        }
    }
}

struct DownBlock {
    level: Level,
    downsample: Option<Downsample>,
}

struct UpBlock {
    level: Level,
    upsample: Option<Upsample>,
}

/// `UNet2DConditionModel`.
pub struct UNet {
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialTransformer,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: Config,
}

impl UNet {
    /// Load from the `unet/` weights.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.check()?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let heads = cfg
            .num_attention_heads
            .as_ref()
            .unwrap_or(&cfg.attention_head_dim)
            .per_level(n)?;
        let tlayers = cfg
            .transformer_layers_per_block
            .clone()
            .unwrap_or(HeadSpec::One(1))
            .per_level(n)?;
        let temb = 4 * boc[0];
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);

        let mut down = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = boc[i];
            let vb = vb.pp(format!("down_blocks.{i}"));
            let cross = kind.starts_with("CrossAttn");
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
            };
            for j in 0..cfg.layers_per_block {
                let cin = if j == 0 { in_c } else { out_c };
                level.resnets.push(ResnetBlock::load(
                    vb.pp(format!("resnets.{j}")),
                    cin,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if cross {
                    level.attentions.push(SpatialTransformer::load(
                        vb.pp(format!("attentions.{j}")),
                        out_c,
                        tlayers[i],
                        heads[i],
                        cfg,
                    )?);
                }
            }
            let downsample = (i + 1 < n)
                .then(|| Downsample::load(vb.pp("downsamplers.0"), out_c, cfg.downsample_padding))
                .transpose()?;
            down.push(DownBlock { level, downsample });
        }

        let mid_c = boc[n - 1];
        let mvb = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::load(mvb.pp("resnets.0"), mid_c, mid_c, Some(temb), groups, eps)?,
            ResnetBlock::load(mvb.pp("resnets.1"), mid_c, mid_c, Some(temb), groups, eps)?,
        ];
        let mid_attention = SpatialTransformer::load(mvb.pp("attentions.0"), mid_c, tlayers[n - 1], heads[n - 1], cfg)?;

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = tlayers.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev_c = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let vb = vb.pp(format!("up_blocks.{i}"));
            let cross = kind.starts_with("CrossAttn");
            let layers = cfg.layers_per_block + 1;
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
            };
            for j in 0..layers {
                let skip_c = if j == layers - 1 { in_c } else { out_c };
                let cin = if j == 0 { prev_c } else { out_c };
                level.resnets.push(ResnetBlock::load(
                    vb.pp(format!("resnets.{j}")),
                    cin + skip_c,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if cross {
                    level.attentions.push(SpatialTransformer::load(
                        vb.pp(format!("attentions.{j}")),
                        out_c,
                        rev_layers[i],
                        rev_heads[i],
                        cfg,
                    )?);
                }
            }
            let upsample = (i + 1 < n)
                .then(|| Upsample::load(vb.pp("upsamplers.0"), out_c))
                .transpose()?;
            up.push(UpBlock { level, upsample });
        }

        Ok(UNet {
            time_linear_1: linear(boc[0], temb, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            time_dim: boc[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            conv_in: conv(cfg.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: group_norm(groups, boc[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(boc[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config: cfg.clone(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// diffusers' `get_timestep_embedding`, computed in f32 as there.
    fn timestep_embedding(&self, t: f64, b: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
        let half = self.time_dim / 2;
        let t = t as f32;
        // ln(10000) rounded to f32 once, as torch multiplies a float32 tensor by it.
        let ln_period = 10000f64.ln() as f32;
        let mut sin = Vec::with_capacity(half);
        let mut cos = Vec::with_capacity(half);
        for i in 0..half {
            let exponent = -ln_period * i as f32 / (half as f32 - self.freq_shift as f32);
            let arg = t * exponent.exp();
            sin.push(arg.sin());
            cos.push(arg.cos());
        }
        let row: Vec<f32> = if self.flip_sin_to_cos {
            [cos, sin].concat()
        } else {
            [sin, cos].concat()
        };
        Tensor::from_vec(row, (1, self.time_dim), dev)?
            .broadcast_as((b, self.time_dim))?
            .to_dtype(dtype)
    }

    /// Predicted noise for latents `x` `[b, c, h, w]` at timestep `t`,
    /// conditioned on `context` `[b, tokens, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, t: f64, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let temb = self.timestep_embedding(t, b, x.dtype(), x.device())?;
        let temb = self
            .time_linear_2
            .forward(&act::silu(&self.time_linear_1.forward(&temb)?)?)?;
        // Every ResNet applies SiLU to the embedding before its projection.
        let temb = act::silu(&temb)?;

        let mut x = self.conv_in.forward(x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for i in 0..block.level.resnets.len() {
                x = block.level.forward(i, &x, &temb, context)?;
                skips.push(x.clone());
            }
            if let Some(d) = &block.downsample {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, Some(&temb))?;
        x = self.mid_attention.forward(&x, context)?;
        x = self.mid_resnets[1].forward(&x, Some(&temb))?;

        // Sides that do not halve evenly need the skip's size when upsampling.
        let odd = (h | w) % (1 << self.config.downsamples()) != 0;
        for block in &self.up {
            for i in 0..block.level.resnets.len() {
                let skip = skips.pop().expect("one skip per up-block ResNet");
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = block.level.forward(i, &x, &temb, context)?;
            }
            if let Some(u) = &block.upsample {
                let size = match (odd, skips.last()) {
                    (true, Some(s)) => Some((s.dim(2)?, s.dim(3)?)),
                    _ => None,
                };
                x = u.forward(&x, size)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}
