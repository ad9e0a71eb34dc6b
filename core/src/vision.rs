//! Image preprocessing shared by every backend's vision models, written to
//! reproduce the reference pipelines bit for bit where they are defined in
//! integers: PIL's bicubic resampling (what CLIP's and BLIP's reference
//! preprocessing call), centre crop, rescale and normalise to CHW floats.

use crate::data::Image;
use crate::error::{Error, Result};

/// PIL's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's Lanczos kernel (a = 3): `sinc(x) sinc(x / 3)`, support 3.
fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    };
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// A PIL resampling filter: kernel and support.
#[derive(Clone, Copy)]
struct Filter(fn(f64) -> f64, f64);

const BICUBIC: Filter = Filter(bicubic, 2.0);
const LANCZOS: Filter = Filter(lanczos, 3.0);

/// PIL keeps 8-bit resampling weights as fixed point with this many bits.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point weights of one output position: first input index and taps.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.1 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as isize).max(0) as usize;
            let xmax = (((center + support + 0.5) as isize).min(in_size as isize) as usize).max(xmin);
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| (filter.0)((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = k.iter().sum();
            if total != 0.0 {
                k.iter_mut().for_each(|w| *w /= total);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = k
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps { start: xmin, weights }
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resample RGB8 to `width` x `height` exactly as PIL's
/// `Image.resize(size, Image.BICUBIC)`: separable, horizontal pass first,
/// each pass rounded to 8 bits, antialiased when shrinking.
pub fn resize_bicubic(img: &Image, width: u32, height: u32) -> Result<Image> {
    resize(img, width, height, BICUBIC)
}

/// Resample as PIL's `Image.resize(size, Image.LANCZOS)` (what the
/// reference systems use for item images).
pub fn resize_lanczos(img: &Image, width: u32, height: u32) -> Result<Image> {
    resize(img, width, height, LANCZOS)
}

/// Pad to a square of the longer side with `fill`, the image centred
/// (offsets rounded down), as the reference systems do before resizing
/// item images.
pub fn pad_square(img: &Image, fill: [u8; 3]) -> Image {
    let side = img.width.max(img.height) as usize;
    let (ox, oy) = ((side - img.width as usize) / 2, (side - img.height as usize) / 2);
    let mut out: Vec<u8> = fill.iter().copied().cycle().take(side * side * 3).collect();
    let w = img.width as usize;
    for y in 0..img.height as usize {
        let dst = ((oy + y) * side + ox) * 3;
        out[dst..dst + w * 3].copy_from_slice(&img.rgb[y * w * 3..(y + 1) * w * 3]);
    }
    Image::new(side as u32, side as u32, out).expect("sized above")
}

/// An item image as the metrics compare it: padded to a white square,
/// then resized (Lanczos) to `size` x `size`.
pub fn square(img: &Image, size: u32) -> Result<Image> {
    let padded = pad_square(img, [255, 255, 255]);
    if padded.width == size {
        return Ok(padded);
    }
    resize_lanczos(&padded, size, size)
}

fn resize(img: &Image, width: u32, height: u32, filter: Filter) -> Result<Image> {
    if img.width == 0 || img.height == 0 || width == 0 || height == 0 {
        return Err(Error::invalid_input(format!(
            "cannot resize a {}x{} image to {width}x{height}",
            img.width, img.height
        )));
    }
    let (iw, ih) = (img.width as usize, img.height as usize);
    let (ow, oh) = (width as usize, height as usize);
    let round = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width is unchanged, as PIL does).
    let horiz: Vec<u8> = if ow == iw {
        img.rgb.to_vec()
    } else {
        let taps = coefficients(iw, ow, filter);
        let mut out = vec![0u8; ih * ow * 3];
        for y in 0..ih {
            let row = &img.rgb[y * iw * 3..(y + 1) * iw * 3];
            for (x, t) in taps.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = round;
                    for (i, &w) in t.weights.iter().enumerate() {
                        ss += row[(t.start + i) * 3 + c] as i64 * w as i64;
                    }
                    out[(y * ow + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    };
    if oh == ih {
        return Image::new(width, height, horiz);
    }
    let taps = coefficients(ih, oh, filter);
    let mut out = vec![0u8; oh * ow * 3];
    for (y, t) in taps.iter().enumerate() {
        for x in 0..ow * 3 {
            let mut ss = round;
            for (i, &w) in t.weights.iter().enumerate() {
                ss += horiz[(t.start + i) * ow * 3 + x] as i64 * w as i64;
            }
            out[y * ow * 3 + x] = clip8(ss);
        }
    }
    Image::new(width, height, out)
}

/// Crop the centre `width` x `height`; odd margins put the extra pixel on
/// the right/bottom (offsets rounded down, as HF's image processors and
/// onnx-clip do).
pub fn center_crop(img: &Image, width: u32, height: u32) -> Result<Image> {
    if width > img.width || height > img.height {
        return Err(Error::invalid_input(format!(
            "cannot crop {width}x{height} from a {}x{} image",
            img.width, img.height
        )));
    }
    let (x0, y0) = (((img.width - width) / 2) as usize, ((img.height - height) / 2) as usize);
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for y in y0..y0 + height as usize {
        let start = (y * img.width as usize + x0) * 3;
        rgb.extend_from_slice(&img.rgb[start..start + width as usize * 3]);
    }
    Image::new(width, height, rgb)
}

/// `[3, h, w]` floats: `(pixel / 255 - mean[c]) / std[c]`.
pub fn normalize_chw(img: &Image, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let n = img.width as usize * img.height as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, px) in img.rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// OpenAI CLIP's normalisation constants.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's normalisation constants.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// CLIP's reference preprocessing: resize the shorter side to `size`
/// (bicubic, the longer side scaled and truncated to an integer, as
/// torchvision's `Resize(size)` does), centre crop `size` x `size`,
/// normalise with `mean`/`std`. Returns `[3, size, size]`.
pub fn clip_preprocess(img: &Image, size: u32, mean: [f32; 3], std: [f32; 3]) -> Result<Vec<f32>> {
    let (w, h) = (img.width as u64, img.height as u64);
    if w == 0 || h == 0 {
        return Err(Error::invalid_input("empty image (0 pixels)"));
    }
    let s = size as u64;
    let (rw, rh) = if w <= h { (s, s * h / w) } else { (s * w / h, s) };
    let resized = resize_bicubic(img, rw as u32, rh as u32)?;
    let cropped = center_crop(&resized, size, size)?;
    Ok(normalize_chw(&cropped, mean, std))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_and_uniform_image_stay_put() {
        let img = Image::new(3, 2, (0..18).map(|v| v as u8 * 10).collect()).unwrap();
        assert_eq!(resize_bicubic(&img, 3, 2).unwrap(), img);
        let flat = Image::new(7, 5, vec![200; 7 * 5 * 3]).unwrap();
        let r = resize_bicubic(&flat, 3, 11).unwrap();
        assert!(r.rgb.iter().all(|&v| v == 200));
    }

    #[test]
    fn crop_takes_the_centre() {
        let img = Image::new(4, 1, vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]).unwrap();
        assert_eq!(center_crop(&img, 2, 1).unwrap().rgb.to_vec(), vec![2, 2, 2, 3, 3, 3]);
        assert!(center_crop(&img, 5, 1).is_err());
    }
}

/// A decoded image file and what had to be converted to reach RGB8.
#[cfg(feature = "imageio")]
#[derive(Clone, Debug)]
pub struct Decoded {
    /// The pixels.
    pub image: Image,
    /// Conversions done ("16-bit RGBA converted to 8-bit RGB"), for the user.
    pub notes: Vec<String>,
}

/// Decode an image file (PNG, JPEG, WebP, GIF, BMP, TIFF) into RGB8.
/// Grayscale, alpha and 16-bit images are converted, and each conversion is
/// reported; alpha is composited onto white, as the reference systems pad
/// item images onto white. An unreadable or non-image file is an error
/// naming the file.
#[cfg(feature = "imageio")]
pub fn decode(path: &std::path::Path) -> Result<Decoded> {
    use image::{ColorType, DynamicImage};
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| Error::invalid_input(format!("{}: not a readable image ({e})", path.display())))?;
    let (w, h, color) = (img.width(), img.height(), img.color());
    let mut notes = Vec::new();
    if color != ColorType::Rgb8 {
        notes.push(format!("{}: {color:?} image converted to 8-bit RGB", path.display()));
    }
    let rgb = if color.has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
        for px in rgba.pixels() {
            let a = px[3] as u32;
            // Composite over white with rounding.
            out.extend((0..3).map(|c| ((px[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8));
        }
        out
    } else if let DynamicImage::ImageRgb8(rgb) = img {
        rgb.into_raw()
    } else {
        img.to_rgb8().into_raw()
    };
    Ok(Decoded {
        image: Image::new(w, h, rgb)?,
        notes,
    })
}

/// An image as PNG bytes (8-bit RGB, no gamma or colour-profile chunks).
#[cfg(feature = "imageio")]
pub fn encode_png(img: &Image) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(img.width, img.height, img.rgb.to_vec())
        .ok_or_else(|| {
            Error::invalid_input(format!(
                "{}x{} image with {} bytes",
                img.width,
                img.height,
                img.rgb.len()
            ))
        })?
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::invalid_input(format!("encoding PNG: {e}")))?;
    Ok(out.into_inner())
}
