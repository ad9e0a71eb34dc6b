//! The TorchScript modules the export scripts write hold only the weights
//! they read, and run on the device their inputs are on, so one file serves
//! `device: cpu` and `cuda:N` (a trace on the CPU records
//! `arange(..., device="cpu")` and the like as constants;
//! scripts/ragar_export.py `trace()` replaces them). Without a GPU here the
//! check is tests/python/exports_follow_inputs.py: no device constant in any
//! module setup exported, and the convolution-free ones run with weights and
//! inputs on PyTorch's `meta` device, which refuses the CPU tensors an
//! unmended module makes (checked on one exported before the mend: it fails).

use ragar_tests::*;
use std::process::Command;

#[test]
fn exported_modules_follow_their_inputs_device() {
    let o = run(Command::new(cache().join("venv/bin/python"))
        .current_dir(root())
        .arg("tests/python/exports_follow_inputs.py")
        .arg(cache()));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("with device constants []") && t.contains("ran on meta"),
        "{t}"
    );
}

/// Every exported module holds only the weights its forward reads
/// (tests/python/exports_hold_used_weights.py): a wrapper holding a whole
/// model for one part of it (the BLIP-2 image queries with the language
/// model, the VAE decoder with the encoder) makes the file, and the memory
/// libtorch loads, that model's size; checked on such exports: 36 and 74
/// unused weights found.
#[test]
fn exported_modules_hold_only_the_weights_they_use() {
    let o = run(Command::new(cache().join("venv/bin/python"))
        .current_dir(root())
        .arg("tests/python/exports_hold_used_weights.py")
        .arg(cache()));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("TorchScript modules, 0 holding weights they do not use"),
        "{t}"
    );
}
