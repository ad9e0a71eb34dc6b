//! The ONNX graphs the export scripts write have the shape arithmetic their
//! named axes decide folded into constants (scripts/onnx_shapes.py), and
//! compute what the unfolded export computes. The check is
//! tests/python/onnx_shapes_fold.py, on the tiny Qwen2 decoder: unfolded vs
//! folded through ONNX Runtime over cached prompt pieces at batch 1 and 3.

use ragar_tests::*;
use std::process::Command;

#[test]
fn folding_the_shape_arithmetic_keeps_every_output_and_drops_most_shape_nodes() {
    let o = run(Command::new(cache().join("venv/bin/python"))
        .current_dir(root())
        .arg("tests/python/onnx_shapes_fold.py")
        .arg(cache()));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("with computed targets []") && t.contains("max |unfolded - folded| over logits and caches"),
        "{t}"
    );
}
