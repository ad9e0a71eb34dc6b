//! The Stable Diffusion image decoder: the decoder half of the KL
//! autoencoder (Rombach et al. 2022), latents -> RGB in [-1, 1].
//!
//! Reference implementation: diffusers' `AutoencoderKL.decode`
//! (`models/autoencoders/autoencoder_kl.py`, `vae.py` `Decoder`,
//! `UNetMidBlock2D`, `UpDecoderBlock2D`): `post_quant_conv`, `conv_in`, a
//! mid block of ResNet / single-head self-attention / ResNet, up blocks of
//! `layers_per_block + 1` ResNets each followed by nearest 2x + conv except
//! the last, GroupNorm, SiLU, `conv_out`. Weight names are the `vae/`
//! folder's; the mid-block attention is read under its current names
//! (`to_q`, `to_k`, `to_v`, `to_out.0`) or the pre-0.14 ones (`query`,
//! `key`, `value`, `proj_attn`) that older checkpoints still carry. The
//! encoder half is not needed to generate and is not loaded.

use crate::conv::{conv2d, Conv2d};
use crate::group_norm::{group_norm, GroupNorm};
use crate::linear::{linear, Linear};
use crate::unet::{attention, ResnetBlock, Upsample};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// `vae/config.json`.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Channels per level (the decoder walks them in reverse).
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder level (the decoder has one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding (0.18215 for SD 1.5).
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    /// diffusers keeps this VAE in float32 even when the pipeline runs in f16.
    #[serde(default)]
    pub force_upcast: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its attention layer.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Only `UpDecoderBlock2D` levels are supported.
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn d32() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl Config {
    /// Pixels per latent cell along each side (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Single-head self-attention over the feature map, with its own GroupNorm and residual.
struct MidAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl MidAttention {
    fn load(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(MidAttention {
            group_norm: group_norm(groups, c, 1e-6, vb.pp("group_norm"))?,
            q: linear(c, c, vb.pp(name("to_q", "query")))?,
            k: linear(c, c, vb.pp(name("to_k", "key")))?,
            v: linear(c, c, vb.pp(name("to_v", "value")))?,
            out: linear(c, c, vb.pp(name("to_out.0", "proj_attn")))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let heads = |l: &Linear| -> Result<Tensor> { l.forward(&t)?.unsqueeze(1) };
        let o = attention(
            &heads(&self.q)?,
            &heads(&self.k)?,
            &heads(&self.v)?,
            (c as f64).powf(-0.5),
        )?;
        let o = self.out.forward(&o.squeeze(1)?)?;
        o.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

struct UpLevel {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

/// `AutoencoderKL`'s decoding path.
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (ResnetBlock, Option<MidAttention>, ResnetBlock),
    up: Vec<UpLevel>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: Config,
}

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(
        cin,
        cout,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb,
    )
}

impl VaeDecoder {
    /// Load from the `vae/` weights (root of the AutoencoderKL).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        if let Some(t) = cfg.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            candle_core::bail!("vae/config.json: up block type {t} is not supported (UpDecoderBlock2D only)");
        }
        let (groups, eps) = (cfg.norm_num_groups, 1e-6);
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let top = rev[0];
        let dvb = vb.pp("decoder");
        let mvb = dvb.pp("mid_block");
        let mid = (
            ResnetBlock::load(mvb.pp("resnets.0"), top, top, None, groups, eps)?,
            cfg.mid_block_add_attention
                .then(|| MidAttention::load(mvb.pp("attentions.0"), top, groups))
                .transpose()?,
            ResnetBlock::load(mvb.pp("resnets.1"), top, top, None, groups, eps)?,
        );
        let mut up = Vec::with_capacity(n);
        let mut out_c = top;
        for (i, &c) in rev.iter().enumerate() {
            let prev_c = out_c;
            out_c = c;
            let uvb = dvb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev_c } else { out_c };
                    ResnetBlock::load(uvb.pp(format!("resnets.{j}")), cin, out_c, None, groups, eps)
                })
                .collect::<Result<_>>()?;
            let upsample = (i + 1 < n)
                .then(|| Upsample::load(uvb.pp("upsamplers.0"), out_c))
                .transpose()?;
            up.push(UpLevel { resnets, upsample });
        }
        let lat = cfg.latent_channels;
        Ok(VaeDecoder {
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv2d(lat, lat, 1, Default::default(), vb.pp("post_quant_conv")))
                .transpose()?,
            conv_in: conv3(lat, top, dvb.pp("conv_in"))?,
            mid,
            up,
            conv_norm_out: group_norm(groups, cfg.block_out_channels[0], eps, dvb.pp("conv_norm_out"))?,
            conv_out: conv3(cfg.block_out_channels[0], cfg.out_channels, dvb.pp("conv_out"))?,
            config: cfg.clone(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decode latents as the sampler leaves them (this divides by
    /// `scaling_factor`): `[b, 4, h, w]` -> `[b, 3, 8h, 8w]` in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_scaled(&(latents / self.config.scaling_factor)?)
    }

    /// Decode latents already divided by `scaling_factor` (diffusers'
    /// `AutoencoderKL.decode` input).
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        let mut x = latents.clone();
        if let Some(p) = &self.post_quant_conv {
            x = p.forward(&x)?;
        }
        x = self.conv_in.forward(&x)?;
        x = self.mid.0.forward(&x, None)?;
        if let Some(a) = &self.mid.1 {
            x = a.forward(&x)?;
        }
        x = self.mid.2.forward(&x, None)?;
        for level in &self.up {
            for r in &level.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = &level.upsample {
                x = u.forward(&x, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}
