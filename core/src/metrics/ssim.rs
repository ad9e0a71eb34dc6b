//! SSIM (Wang et al., 2004) as the paper reports it and as scikit-image
//! computes it with `gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False, data_range=255, channel_axis=-1`:
//!
//! - local statistics under an 11x11 Gaussian window (sigma 1.5; scipy's
//!   `gaussian_filter` with truncate 3.5, i.e. radius 5, normalised);
//! - SSIM map `((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`
//!   with `C1 = (0.01 L)^2`, `C2 = (0.03 L)^2`, `L = 255`;
//! - the mean of the map over the pixels whose window lies inside the
//!   image (scikit-image crops 5 pixels from each border), then over the
//!   three channels.
//!
//! Images must have the same size and be at least 11 pixels on each side.

use crate::data::Image;
use crate::error::{Error, Result};

const RADIUS: usize = 5;

fn kernel() -> [f64; 2 * RADIUS + 1] {
    let mut k = [0.0; 2 * RADIUS + 1];
    for (i, v) in k.iter_mut().enumerate() {
        let x = i as f64 - RADIUS as f64;
        *v = (-0.5 * x * x / (1.5 * 1.5)).exp();
    }
    let s: f64 = k.iter().sum();
    k.map(|v| v / s)
}

/// Valid-region separable Gaussian filter of a `w x h` plane.
fn filter(p: &[f64], w: usize, h: usize, k: &[f64]) -> Vec<f64> {
    let (ow, oh) = (w - 2 * RADIUS, h - 2 * RADIUS);
    let mut rows = vec![0.0; ow * h];
    for y in 0..h {
        for x in 0..ow {
            rows[y * ow + x] = k.iter().enumerate().map(|(i, kv)| kv * p[y * w + x + i]).sum();
        }
    }
    let mut out = vec![0.0; ow * oh];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = k.iter().enumerate().map(|(i, kv)| kv * rows[(y + i) * ow + x]).sum();
        }
    }
    out
}

/// Mean SSIM of two RGB images.
pub fn ssim(a: &Image, b: &Image) -> Result<f64> {
    if (a.width, a.height) != (b.width, b.height) {
        return Err(Error::invalid_input(format!(
            "SSIM needs equal sizes, got {}x{} and {}x{}",
            a.width, a.height, b.width, b.height
        )));
    }
    let (w, h) = (a.width as usize, a.height as usize);
    if w < 2 * RADIUS + 1 || h < 2 * RADIUS + 1 {
        return Err(Error::invalid_input(format!(
            "SSIM needs at least 11x11 pixels, got {w}x{h}"
        )));
    }
    let k = kernel();
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0;
    for c in 0..3 {
        let x: Vec<f64> = a.rgb.iter().skip(c).step_by(3).map(|&v| v as f64).collect();
        let y: Vec<f64> = b.rgb.iter().skip(c).step_by(3).map(|&v| v as f64).collect();
        let prod = |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(a, b)| a * b).collect() };
        let (mx, my) = (filter(&x, w, h, &k), filter(&y, w, h, &k));
        let (xx, yy, xy) = (
            filter(&prod(&x, &x), w, h, &k),
            filter(&prod(&y, &y), w, h, &k),
            filter(&prod(&x, &y), w, h, &k),
        );
        let n = mx.len();
        let mut sum = 0.0;
        for i in 0..n {
            let (ux, uy) = (mx[i], my[i]);
            let (vx, vy, cxy) = (xx[i] - ux * ux, yy[i] - uy * uy, xy[i] - ux * uy);
            sum += ((2.0 * ux * uy + c1) * (2.0 * cxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
        }
        total += sum / n as f64;
    }
    Ok(total / 3.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: u32, h: u32, f: impl Fn(u32, u32, usize) -> u8) -> Image {
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    v.push(f(x, y, c));
                }
            }
        }
        Image::new(w, h, v).unwrap()
    }

    #[test]
    fn identical_is_one_and_sizes_are_checked() {
        let a = img(16, 12, |x, y, c| (x * 13 + y * 7 + c as u32 * 50) as u8);
        assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
        let b = img(16, 12, |x, y, c| 255 - (x * 13 + y * 7 + c as u32 * 50) as u8);
        assert!(ssim(&a, &b).unwrap() < 0.0, "an inverted image anti-correlates");
        assert!(ssim(&a, &img(12, 16, |_, _, _| 0)).is_err());
        assert!(ssim(&img(10, 10, |_, _, _| 0), &img(10, 10, |_, _, _| 0)).is_err());
    }
}
