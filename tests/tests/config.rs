//! Configuration: precedence (YAML < RAGAR_* env < key=value), provenance,
//! and the errors a user sees for unknown keys, YAML syntax and names.

use ragar_tests::*;
use std::process::Command;

fn write(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

const BASE: &str =
    "encoder:\n  name: minilm\n  backend: candle\n  params:\n    model_dir: /nowhere\n    batch_size: 32\n";

fn print_config(cfg: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(ragar());
    cmd.arg("print-config").arg(cfg).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = run(&mut cmd);
    (o.status.success(), text(&o))
}

fn line_of<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn precedence_and_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.yaml", BASE);

    let (ok, out) = print_config(&cfg, &[], &[]);
    assert!(ok, "{out}");
    let l = line_of(&out, "encoder.params.batch_size");
    assert!(l.contains("= 32") && l.contains("c.yaml"), "{l}");
    assert!(line_of(&out, "encoder.device").contains("# default"), "{out}");

    // The variables ragar reads for itself are not config keys: a bench's
    // RAGAR_PYTHON reaches every stage-bench child's config load.
    let env = [
        ("RAGAR_ENCODER__PARAMS__BATCH_SIZE", "16"),
        ("RAGAR_PYTHON", "/usr/bin/python3"),
        ("RAGAR_LOG", "warn"),
        ("RAGAR_MKL_VENDOR_CHECK", "1"),
    ];
    let (ok, out) = print_config(&cfg, &env, &[]);
    assert!(ok, "{out}");
    let l = line_of(&out, "encoder.params.batch_size");
    assert!(l.contains("= 16") && l.contains("environment"), "{l}");

    let (_, out) = print_config(&cfg, &env, &["encoder.params.batch_size=8", "encoder.backend=ort"]);
    let l = line_of(&out, "encoder.params.batch_size");
    assert!(l.contains("= 8") && l.contains("command-line override"), "{l}");
    assert!(line_of(&out, "encoder.backend").contains("\"ort\""), "{out}");
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.yaml",
        &BASE.replace("backend: candle", "backend: candle\n  devcie: cpu"),
    );
    let (ok, out) = print_config(&cfg, &[], &[]);
    assert!(!ok);
    assert!(
        out.contains("unknown field") && out.contains("devcie") && out.contains("encoder"),
        "{out}"
    );

    let cfg = write(dir.path(), "d.yaml", BASE);
    let (ok, out) = print_config(&cfg, &[], &["encodr.backend=ort"]);
    assert!(!ok && out.contains("encodr"), "{out}");
}

#[test]
fn yaml_syntax_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "broken.yaml",
        "encoder:\n  name: minilm\n  backend: [candle\n",
    );
    let (ok, out) = print_config(&cfg, &[], &[]);
    assert!(!ok);
    assert!(out.contains("broken.yaml"), "{out}");
    assert!(out.contains("line") && out.contains("column"), "{out}");
}

#[test]
fn unknown_backend_and_component_list_the_available_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.yaml", BASE);
    let t = write(dir.path(), "t.txt", "hello\n");
    let o = run(Command::new(ragar())
        .args(["stage", "encoder", "--config"])
        .arg(&cfg)
        .arg("--text-file")
        .arg(&t)
        .args(["--out", "/dev/null", "encoder.backend=onnx"]));
    let out = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("no backend 'onnx'") && out.contains("candle") && out.contains("ort") && out.contains("tch"),
        "{out}"
    );

    let o = run(Command::new(ragar())
        .args(["validate"])
        .arg(&cfg)
        .arg("encoder.name=clipp"));
    let out = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("no encoder component named 'clipp'") && out.contains("minilm (candle)"),
        "{out}"
    );
}

#[test]
fn validate_catches_miswiring_before_loading_weights() {
    let dir = tempfile::tempdir().unwrap();
    // model_dir does not exist: validate must not try to load it.
    let cfg = write(
        dir.path(),
        "c.yaml",
        "encoder:\n  name: color-histogram\n  backend: builtin\n  device: cuda:0\n  dtype: f8\n",
    );
    let o = run(Command::new(ragar()).arg("validate").arg(&cfg));
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("2 problem(s)"), "{out}");
    assert!(out.contains("encoder.dtype: unknown dtype 'f8'"), "{out}");
    assert!(out.contains("runs on cpu, not 'cuda:0'"), "{out}");

    // A missing model folder and a misspelt parameter are found without
    // loading any weights.
    let o = run(Command::new(ragar())
        .arg("validate")
        .arg(&write(dir.path(), "m.yaml", BASE)));
    let out = text(&o);
    assert!(
        !o.status.success() && out.contains("model folder /nowhere does not exist"),
        "{out}"
    );
    let o = run(Command::new(ragar()).current_dir(root()).args([
        "validate",
        "configs/minilm.yaml",
        "encoder.params.batchsize=8",
    ]));
    let out = text(&o);
    assert!(
        !o.status.success() && out.contains("unknown field `batchsize`"),
        "{out}"
    );

    cache();
    for backend in ["candle", "ort", "tch"] {
        let o = run(Command::new(ragar()).current_dir(root()).args([
            "validate",
            "configs/minilm.yaml",
            &format!("encoder.backend={backend}"),
        ]));
        assert!(o.status.success(), "{backend}: {}", text(&o));
    }
}

#[test]
fn ort_and_tch_both_on_cuda_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "clash.yaml",
        &format!(
            "encoder:\n  name: minilm\n  backend: ort\n  device: cuda:0\n  params: {{model_dir: {m}}}\n\
             generator:\n  name: stable-diffusion\n  backend: tch\n  device: cuda:0\n  params: {{model_dir: {s}}}\n",
            m = cache().join("models/all-MiniLM-L6-v2").display(),
            s = cache().join("models/sd-tiny").display()
        ),
    );
    let o = run(Command::new(ragar()).arg("validate").arg(&cfg));
    let out = text(&o);
    assert!(
        out.contains("warning: encoder on ONNX Runtime CUDA and generator on libtorch CUDA share one process"),
        "{out}"
    );
    // One of them on the CPU: no warning.
    let cfg = write(
        dir.path(),
        "fine.yaml",
        &std::fs::read_to_string(&cfg)
            .unwrap()
            .replacen("device: cuda:0", "device: cpu", 1),
    );
    let o = run(Command::new(ragar()).arg("validate").arg(&cfg));
    assert!(!text(&o).contains("share one process"), "{}", text(&o));
}
