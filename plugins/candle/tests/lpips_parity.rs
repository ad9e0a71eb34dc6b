//! LPIPS against the `lpips` package (v0.1) on real photos: the real linear
//! heads from the package, random AlexNet / VGG16 backbones (ImageNet
//! weights cannot be had offline), values made by
//! scripts/fixtures/make_metrics.py at setup. Tolerance: 1e-4 relative to
//! max(reference, 1e-2).

use ragar_candle::lpips::{Lpips, Net};
use std::path::PathBuf;

fn refs() -> PathBuf {
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ragar"));
    let d = cache.join("data/metrics-ref");
    assert!(
        d.join("reference.json").is_file(),
        "{} missing: run scripts/setup.sh",
        d.display()
    );
    d
}

#[test]
fn lpips_matches_the_lpips_package() {
    let d = refs();
    let reference: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    let img = |n: &str| {
        ragar_core::vision::decode(&d.join(format!("images/{n}.png")))
            .unwrap()
            .image
    };
    let dev = candle_core::Device::Cpu;
    for (net, backbone, key) in [(Net::Alex, "alexnet", "lpips_alex"), (Net::Vgg, "vgg16", "lpips_vgg")] {
        let m = Lpips::load(
            net,
            &d.join(format!("{backbone}-random.safetensors")),
            &d.join(format!(
                "lpips-{}-lin.safetensors",
                if net == Net::Alex { "alex" } else { "vgg" }
            )),
            &dev,
        )
        .unwrap();
        for r in &reference {
            let (a, b) = (r["a"].as_str().unwrap(), r["b"].as_str().unwrap());
            let want = r[key].as_f64().unwrap();
            let got = m.distance(&img(a), &img(b)).unwrap() as f64;
            assert!(
                (got - want).abs() <= 1e-4 * want.max(1e-2),
                "{key} {a} vs {b}: ragar {got}, lpips {want}"
            );
        }
    }
}

#[test]
fn lpips_files_are_checked_against_the_architecture() {
    let d = refs();
    let dev = candle_core::Device::Cpu;
    // VGG heads on an AlexNet: the first head has 64 channels in both, the second does not.
    let e = Lpips::load(
        Net::Alex,
        &d.join("alexnet-random.safetensors"),
        &d.join("lpips-vgg-lin.safetensors"),
        &dev,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("lin1.model.1.weight") && e.contains("[1, 128, 1, 1]") && e.contains("[1, 192, 1, 1]"),
        "{e}"
    );
    let e = Lpips::load(
        Net::Vgg,
        &d.join("alexnet-random.safetensors"),
        &d.join("lpips-vgg-lin.safetensors"),
        &dev,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("features.0.weight"), "{e}");
}
