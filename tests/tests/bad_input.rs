//! Bad input gets a clear error naming the file, line or setup step.

use ragar_tests::*;
use std::process::Command;

fn stage(args: &[&str], input: &std::path::Path, out: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(ragar());
    cmd.current_dir(root())
        .args(["stage", "encoder", "--config", "configs/minilm.yaml", "--text-file"])
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = run(&mut cmd);
    (o.status.success(), text(&o))
}

#[test]
fn non_utf8_input_names_the_line_and_writes_nothing() {
    cache();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, b"fine\nalso fine\nbad \xc3\x28 byte\n").unwrap();
    let out = dir.path().join("o.json");
    let (ok, msg) = stage(&[], &input, &out, &[]);
    assert!(!ok);
    assert!(msg.contains("in.txt:3: not valid UTF-8"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn missing_and_corrupt_weights_name_the_file() {
    let cache = cache();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let src = cache.join("models/all-MiniLM-L6-v2");
    for f in [
        "config.json",
        "tokenizer.json",
        "sentence_bert_config.json",
        "modules.json",
    ] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\n").unwrap();
    let out = dir.path().join("o.json");
    let dir_arg = format!("encoder.params.model_dir={}", model.display());

    let (ok, msg) = stage(&[&dir_arg], &input, &out, &[]);
    assert!(
        !ok && msg.contains("missing model file") && msg.contains("model.safetensors"),
        "{msg}"
    );

    // A truncated weights file.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (ok, msg) = stage(&[&dir_arg], &input, &out, &[]);
    assert!(!ok && msg.contains("model.safetensors"), "{msg}");

    let (ok, msg) = stage(&[&dir_arg, "encoder.backend=tch"], &input, &out, &[]);
    assert!(
        !ok && msg.contains("model.ts") && msg.contains("scripts/setup.sh"),
        "{msg}"
    );

    // Exported files that are not what they claim to be.
    std::fs::write(model.join("model.ts"), b"PK\x03\x04 not a torchscript archive").unwrap();
    let (ok, msg) = stage(&[&dir_arg, "encoder.backend=tch"], &input, &out, &[]);
    assert!(
        !ok && msg.contains("model.ts") && msg.contains("not a TorchScript module"),
        "{msg}"
    );
    std::fs::write(model.join("model.onnx"), b"not a protobuf").unwrap();
    let (ok, msg) = stage(&[&dir_arg, "encoder.backend=ort"], &input, &out, &[]);
    assert!(!ok && msg.contains("model.onnx"), "{msg}");

    let (ok, msg) = stage(&["encoder.params.model_dir=/does/not/exist"], &input, &out, &[]);
    assert!(
        !ok && msg.contains("/does/not/exist") && msg.contains("scripts/setup.sh"),
        "{msg}"
    );
}

#[test]
fn missing_onnx_runtime_names_the_setup_script() {
    cache();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\n").unwrap();
    let (ok, msg) = stage(
        &["encoder.backend=ort"],
        &input,
        &dir.path().join("o.json"),
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
    );
    assert!(!ok);
    assert!(
        msg.contains("ONNX Runtime library not found") && msg.contains("scripts/setup.sh"),
        "{msg}"
    );
}

#[test]
fn setup_refuses_a_wheel_with_the_wrong_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("assets.lock");
    // A tiny real wheel, pinned to a wrong hash.
    std::fs::write(&lock, format!("six-1.16.0-py2.py3-none-any.whl {}\n", "0".repeat(64))).unwrap();
    let o = run(Command::new("bash")
        .arg(root().join("scripts/setup.sh"))
        .env("RAGAR_CACHE", dir.path().join("cache"))
        .env("RAGAR_ASSETS_LOCK", &lock));
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("SHA-256 mismatch for six-1.16.0-py2.py3-none-any.whl"),
        "{out}"
    );
    assert!(!dir.path().join("cache/wheels/six-1.16.0-py2.py3-none-any.whl").exists());
}
