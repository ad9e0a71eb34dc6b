//! The paper's image metrics against their reference implementations on
//! real photos (scikit-image's data), values made by
//! scripts/fixtures/make_metrics.py at setup: SSIM vs
//! `skimage.metrics.structural_similarity` (Gaussian, sigma 1.5, data range
//! 255, per channel) within 1e-6.

use ragar_core::metrics::ssim::ssim;
use std::path::PathBuf;

fn refs() -> PathBuf {
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ragar"));
    let d = cache.join("data/metrics-ref");
    assert!(
        d.join("reference.json").is_file(),
        "{} missing: run scripts/setup.sh",
        d.display()
    );
    d
}

#[test]
fn ssim_matches_scikit_image() {
    let d = refs();
    let reference: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    let img = |n: &str| {
        ragar_core::vision::decode(&d.join(format!("images/{n}.png")))
            .unwrap()
            .image
    };
    for r in &reference {
        let (a, b) = (r["a"].as_str().unwrap(), r["b"].as_str().unwrap());
        let want = r["ssim"].as_f64().unwrap();
        let got = ssim(&img(a), &img(b)).unwrap();
        assert!(
            (got - want).abs() < 1e-6,
            "SSIM {a} vs {b}: ragar {got}, scikit-image {want}"
        );
    }
}

#[test]
fn item_images_are_padded_and_resized_as_pil_does() {
    let d = refs();
    let img = |n: &str| {
        ragar_core::vision::decode(&d.join(format!("images/{n}.png")))
            .unwrap()
            .image
    };
    let rocket = img("rocket");
    for size in [64, 200] {
        let ours = ragar_core::vision::square(&rocket, size).unwrap();
        let pil = img(&format!("rocket-square-{size}"));
        assert_eq!((ours.width, ours.height), (size, size));
        let max = ours
            .rgb
            .iter()
            .zip(pil.rgb.iter())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert_eq!(max, 0, "{size}: pad + LANCZOS differs from PIL by {max} levels");
    }
}
