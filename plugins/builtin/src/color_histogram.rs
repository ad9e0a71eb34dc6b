//! Joint RGB colour histogram as an image feature: a weight-free stand-in
//! for the visual encoder of the retrieval module (Eq. 4) when no ViT/CLIP
//! weights are at hand. Each channel is quantised into `bins` levels; the
//! `bins^3` counts are divided by the pixel count and L2-normalised, so the
//! cosine of two features compares colour distributions.

use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::{ComponentSpec, Error, Image, Result, Tensor};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_bins")]
    bins: u32,
}

fn default_bins() -> u32 {
    4
}

/// The colour-histogram encoder.
pub struct ColorHistogram {
    bins: u32,
}

impl ColorHistogram {
    /// Build from `params: { bins }` (2..=16, default 4 -> 64 dimensions).
    pub fn load(spec: &ComponentSpec) -> Result<Self> {
        let p: Params = spec.params()?;
        if !(2..=16).contains(&p.bins) {
            return Err(Error::config(format!(
                "{}.params.bins must be in 2..=16, got {}",
                spec.key, p.bins
            )));
        }
        Ok(ColorHistogram { bins: p.bins })
    }

    /// Params check and `image_dim`, for `ragar validate`.
    pub fn probe(spec: &ComponentSpec) -> Result<ragar_core::component::Probe> {
        let h = Self::load(spec)?;
        Ok(ragar_core::component::Probe::default().fact("image_dim", h.bins.pow(3) as u64))
    }

    fn feature(&self, img: &Image) -> Result<Vec<f32>> {
        let b = self.bins as usize;
        let mut h = vec![0f32; b * b * b];
        let px = img.rgb.len() / 3;
        if px == 0 {
            return Err(Error::invalid_input("empty image (0 pixels)"));
        }
        for p in img.rgb.chunks_exact(3) {
            let q = |v: u8| v as usize * b / 256;
            h[(q(p[0]) * b + q(p[1])) * b + q(p[2])] += 1.0;
        }
        let norm = h.iter().map(|x| x * x).sum::<f32>().sqrt();
        h.iter_mut().for_each(|x| *x /= norm);
        Ok(h)
    }
}

impl Encoder for ColorHistogram {
    fn info(&self) -> EncoderInfo {
        EncoderInfo {
            dim: self.bins.pow(3),
            text: false,
            image: true,
            max_tokens: 0,
            normalized: true,
        }
    }

    fn embed_text(&self, _texts: &[String]) -> Result<TextEmbeddings> {
        Err(Error::unsupported("color-histogram embeds images only"))
    }

    fn embed_image(&self, images: &[Image]) -> Result<Tensor> {
        let rows = images
            .iter()
            .enumerate()
            .map(|(i, img)| self.feature(img).map_err(|e| e.context(format!("image {i}"))))
            .collect::<Result<Vec<_>>>()?;
        if rows.is_empty() {
            return Tensor::from_f32(&[0, self.bins.pow(3) as usize], vec![]);
        }
        Tensor::from_rows(&rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_separates_colours_and_is_unit_length() {
        let enc = ColorHistogram::load(&ComponentSpec::new("encoder", serde_json::json!({"bins": 4}))).unwrap();
        let red = Image::new(2, 1, vec![255, 0, 0, 250, 10, 5]).unwrap();
        let blue = Image::new(1, 1, vec![0, 0, 255]).unwrap();
        let f = enc.embed_image(&[red.clone(), blue, red]).unwrap().to_rows().unwrap();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&f[0], &f[0]) - 1.0).abs() < 1e-6);
        assert!(dot(&f[0], &f[1]).abs() < 1e-6);
        assert_eq!(f[0], f[2]);
        assert!(ColorHistogram::load(&ComponentSpec::new("encoder", serde_json::json!({"bins": 1}))).is_err());
        assert!(ColorHistogram::load(&ComponentSpec::new("encoder", serde_json::json!({"bin": 4}))).is_err());
    }
}
