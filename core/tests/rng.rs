//! `TorchGenerator::randn` against torch.randn(shape, generator=torch.Generator().manual_seed(42)),
//! recorded by scripts/fixtures/make_sd.py into the tiny SD fixture that setup builds.

use ragar_core::rng::TorchGenerator;
use safetensors::SafeTensors;
use std::path::PathBuf;

fn reference() -> Vec<u8> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or(root.join(".ragar"));
    let path = cache.join("models/sd-tiny/reference.safetensors");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (scripts/setup.sh builds it)", path.display()))
}

#[test]
fn randn_equals_torch_bit_for_bit() {
    let bytes = reference();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (key, n) in [
        ("randn.1x4x8x8", 256),
        ("randn.1x4x3x7", 84),
        ("randn.2x4x64x64", 32768),
    ] {
        let want: Vec<f32> = st
            .tensor(key)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got = TorchGenerator::new(42).randn(n).unwrap();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Exact with scalar libm; SLEEF-vectorised torch builds may differ in the last bit.
        assert!(worst <= 2e-6, "{key}: max abs diff {worst}");
    }
}
