//! LPIPS (Zhang et al., CVPR 2018), v0.1, the perceptual distance of the
//! paper's Table 1, as the `lpips` package computes it:
//!
//! 1. images in [0, 1] go to [-1, 1], then `(x - shift) / scale` with
//!    shift (-0.030, -0.088, -0.188), scale (0.458, 0.448, 0.450);
//! 2. a torchvision backbone's features at five ReLUs (AlexNet: relu1-5 of
//!    `features[0..12]`; VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3);
//! 3. per layer: unit-normalise each pixel's channel vector (eps 1e-10),
//!    square the difference, weight channels by the layer's learned 1x1
//!    conv (no bias) and average over pixels;
//! 4. the sum over layers.
//!
//! Weights: the backbone in torchvision's names (`features.{i}.weight`,
//! `.bias`: the user's ImageNet checkpoint converted to safetensors; the
//! hubs' files are not reachable here) and the linear heads in the lpips
//! package's names (`lin{k}.model.1.weight`, converted from its
//! `weights/v0.1/{alex,vgg}.pth`). Both files are checked against the
//! architecture, naming the tensor that disagrees.

use crate::checkpoint::Checkpoint;
use crate::conv::Conv2d;
use crate::device::model_err;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use ragar_core::{Error, Image, Result};
use std::path::Path;

/// The backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// AlexNet (the lpips default).
    Alex,
    /// VGG16.
    Vgg,
}

/// One step of a torchvision `features` stack.
enum Layer {
    Conv(Conv2d),
    Relu,
    MaxPool { k: usize, s: usize },
}

/// LPIPS with loaded weights.
pub struct Lpips {
    /// `features` layers, with the indices after which a tap is taken.
    layers: Vec<Layer>,
    taps: Vec<usize>,
    heads: Vec<Tensor>,
    device: Device,
}

/// Each `features` index: conv (in, out, kernel, stride, padding), relu, or max-pool (kernel, stride).
fn architecture(net: Net) -> (Vec<(usize, char, [usize; 5])>, Vec<usize>) {
    let mut spec = Vec::new();
    let taps;
    match net {
        Net::Alex => {
            let convs = [
                (0, [3, 64, 11, 4, 2]),
                (3, [64, 192, 5, 1, 2]),
                (6, [192, 384, 3, 1, 1]),
                (8, [384, 256, 3, 1, 1]),
                (10, [256, 256, 3, 1, 1]),
            ];
            for (i, c) in convs {
                spec.push((i, 'c', c));
                spec.push((i + 1, 'r', [0; 5]));
            }
            spec.push((2, 'p', [3, 2, 0, 0, 0]));
            spec.push((5, 'p', [3, 2, 0, 0, 0]));
            taps = vec![1, 4, 7, 9, 11];
        }
        Net::Vgg => {
            let cfg: [&[usize]; 5] = [
                &[64, 64],
                &[128, 128],
                &[256, 256, 256],
                &[512, 512, 512],
                &[512, 512, 512],
            ];
            let (mut i, mut cin) = (0, 3);
            let mut t = Vec::new();
            for (b, block) in cfg.iter().enumerate() {
                if b > 0 {
                    spec.push((i, 'p', [2, 2, 0, 0, 0]));
                    i += 1;
                }
                for &cout in *block {
                    spec.push((i, 'c', [cin, cout, 3, 1, 1]));
                    spec.push((i + 1, 'r', [0; 5]));
                    i += 2;
                    cin = cout;
                }
                t.push(i - 1);
            }
            taps = t;
        }
    }
    spec.sort_by_key(|s| s.0);
    (spec, taps)
}

fn shape_checked(st: &Checkpoint, name: &str, want: &[usize], file: &Path, dev: &Device) -> Result<Tensor> {
    let t = st
        .load(name, dev)
        .map_err(|_| Error::invalid_input(format!("{}: no tensor '{name}'", file.display())))?;
    if t.dims() != want {
        return Err(Error::invalid_input(format!(
            "{}: '{name}' has shape {:?}, LPIPS expects {want:?}",
            file.display(),
            t.dims()
        )));
    }
    t.to_dtype(DType::F32).map_err(model_err(file.display().to_string()))
}

impl Lpips {
    /// Load a backbone and its linear heads.
    pub fn load(net: Net, backbone: &Path, heads: &Path, device: &Device) -> Result<Self> {
        let (spec, taps) = architecture(net);
        let bb = Checkpoint::open(&[backbone])?;
        let mut layers = Vec::new();
        for (i, kind, p) in spec {
            layers.push(match kind {
                'c' => {
                    let [cin, cout, k, stride, padding] = p;
                    let w = shape_checked(
                        &bb,
                        &format!("features.{i}.weight"),
                        &[cout, cin, k, k],
                        backbone,
                        device,
                    )?;
                    let b = shape_checked(&bb, &format!("features.{i}.bias"), &[cout], backbone, device)?;
                    let cfg = Conv2dConfig {
                        padding,
                        stride,
                        ..Default::default()
                    };
                    Layer::Conv(Conv2d::new(w, Some(b), cfg))
                }
                'r' => Layer::Relu,
                _ => Layer::MaxPool { k: p[0], s: p[1] },
            });
        }
        let channels: Vec<usize> = taps
            .iter()
            .map(|&t| {
                layers[..t]
                    .iter()
                    .rev()
                    .find_map(|l| match l {
                        Layer::Conv(c) => Some(c.kernel_shape()[0]),
                        _ => None,
                    })
                    .expect("a conv before every tap")
            })
            .collect();
        let hd = Checkpoint::open(&[heads])?;
        let heads_t = channels
            .iter()
            .enumerate()
            .map(|(k, &c)| shape_checked(&hd, &format!("lin{k}.model.1.weight"), &[1, c, 1, 1], heads, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Lpips {
            layers,
            taps,
            heads: heads_t,
            device: device.clone(),
        })
    }

    /// [`Lpips::load`] on the CPU.
    pub fn load_cpu(net: Net, backbone: &Path, heads: &Path) -> Result<Self> {
        Self::load(net, backbone, heads, &Device::Cpu)
    }

    /// `[1, 3, h, w]` in LPIPS's input scale from an RGB image.
    fn input(&self, img: &Image) -> candle_core::Result<Tensor> {
        let (w, h) = (img.width as usize, img.height as usize);
        let x = Tensor::from_vec(img.rgb.to_vec(), (h, w, 3), &self.device)?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        let x = ((x / 127.5)? - 1.0)?;
        let shift = Tensor::new(&[-0.030f32, -0.088, -0.188], &self.device)?.reshape((1, 3, 1, 1))?;
        let scale = Tensor::new(&[0.458f32, 0.448, 0.450], &self.device)?.reshape((1, 3, 1, 1))?;
        x.broadcast_sub(&shift)?.broadcast_div(&scale)
    }

    /// Unit-normalised features at the five taps.
    fn features(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut out = Vec::new();
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = match l {
                Layer::Conv(c) => c.forward(&h)?,
                Layer::Relu => h.relu()?,
                Layer::MaxPool { k, s } => h.max_pool2d_with_stride(*k, *s)?,
            };
            if self.taps.contains(&i) {
                let norm = h.sqr()?.sum_keepdim(1)?.sqrt()?;
                out.push(h.broadcast_div(&(norm + 1e-10)?)?);
            }
        }
        Ok(out)
    }

    /// The LPIPS distance of two images of the same size (at least 32 px a
    /// side for AlexNet's strides to leave a pixel at the last tap).
    pub fn distance(&self, a: &Image, b: &Image) -> Result<f32> {
        if (a.width, a.height) != (b.width, b.height) {
            return Err(Error::invalid_input(format!(
                "LPIPS needs equal sizes, got {}x{} and {}x{}",
                a.width, a.height, b.width, b.height
            )));
        }
        let err = model_err("LPIPS");
        let fa = self.input(a).and_then(|x| self.features(&x)).map_err(&err)?;
        let fb = self.input(b).and_then(|x| self.features(&x)).map_err(&err)?;
        let mut total = 0f32;
        for ((x, y), w) in fa.iter().zip(&fb).zip(&self.heads) {
            let d = (x - y)
                .and_then(|d| d.sqr())
                .and_then(|d| d.conv2d(w, 0, 1, 1, 1))
                .and_then(|d| d.mean_all())
                .and_then(|d| d.to_scalar::<f32>())
                .map_err(&err)?;
            total += d;
        }
        Ok(total)
    }
}
