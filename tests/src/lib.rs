//! Helpers for ragar's integration tests: build and locate the `ragar`
//! binary (full, and without backend features), the plugin cdylibs, and
//! the project cache made by `scripts/setup.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The project cache; tests need `scripts/setup.sh` to have run.
pub fn cache() -> PathBuf {
    let c = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".ragar"));
    assert!(
        c.join("models/all-MiniLM-L6-v2/model.safetensors").is_file(),
        "{} is not set up: run scripts/setup.sh first",
        c.display()
    );
    c
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

// One cargo at a time: parallel tests would otherwise queue on cargo's lock
// and print confusing "Blocking" lines.
static CARGO: Mutex<()> = Mutex::new(());

fn cargo_build(args: &[&str]) {
    let _g = CARGO.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .arg("build")
        .args(args)
        .status()
        .expect("running cargo");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// `ragar` with its default features (builtin, candle, ort, tch).
pub fn ragar() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        cargo_build(&["-p", "ragar-host", "--bin", "ragar"]);
        target_dir().join("debug/ragar")
    })
    .clone()
}

/// `ragar` built WITHOUT any backend feature (only `builtin`), in its own
/// target directory so it does not replace the full binary.
pub fn ragar_minimal() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = target_dir().join("minimal");
        cargo_build(&[
            "-p",
            "ragar-host",
            "--bin",
            "ragar",
            "--no-default-features",
            "--features",
            "builtin",
            "--target-dir",
            dir.to_str().unwrap(),
        ]);
        dir.join("debug/ragar")
    })
    .clone()
}

/// Build the cdylib package `package` (optionally with `features`) and return
/// the library's path (copied aside so feature variants do not overwrite it).
/// Without features the whole workspace is built, so the plugin shares the
/// test build's dependency artifacts instead of re-resolving features alone.
pub fn cdylib(package: &str, features: &[&str]) -> PathBuf {
    let joined = features.join(",");
    if features.is_empty() {
        cargo_build(&["--workspace"]);
    } else {
        cargo_build(&["-p", package, "--lib", "--features", joined.as_str()]);
    }
    let lib = target_dir().join(format!("debug/lib{}.so", package.replace('-', "_")));
    let tag = if features.is_empty() {
        "default".to_string()
    } else {
        joined.replace(',', "+")
    };
    let copy = target_dir().join(format!("debug/test-plugins/{tag}/lib{}.so", package.replace('-', "_")));
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(&lib, &copy).unwrap();
    copy
}

/// `BIN stage STAGE --config CONFIG --out OUT`, from the workspace root;
/// callers add the input file, flags and `key=value` overrides.
pub fn stage_command(bin: &Path, stage: &str, config: &str, out: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.current_dir(root())
        .args(["stage", stage, "--config", config, "--out"])
        .arg(out);
    cmd
}

/// `BIN stage encoder --config configs/minilm.yaml --text-file
/// tests/fixtures/sentences.txt --out OUT`, from the workspace root; add
/// overrides and environment to taste.
pub fn minilm_stage(bin: &Path, out: &Path) -> Command {
    let mut cmd = stage_command(bin, "encoder", "configs/minilm.yaml", out);
    cmd.args(["--text-file", "tests/fixtures/sentences.txt"]);
    cmd
}

/// Run a command, returning its output; stdin is closed.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(std::process::Stdio::null()).output().expect("spawning")
}

/// stdout + stderr as one string, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A JSON array of arrays of numbers.
pub fn read_matrix(path: &Path) -> Vec<Vec<f64>> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Cosine similarity.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The sentence-transformers reference (`scripts/reference_embeddings.py`).
pub fn reference() -> Vec<Vec<f64>> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/minilm_reference.json")).unwrap())
            .unwrap();
    serde_json::from_value(v["embeddings"].clone()).unwrap()
}

/// Load `page` in headless Chromium (no sandbox, no background networking)
/// and return the DOM after the load event; saves a screenshot to `shot`.
pub fn chromium(page: &Path, shot: &Path) -> String {
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let profile = tempfile::tempdir().unwrap();
    let base = [
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        format!("--user-data-dir={}", profile.path().display()),
        "--virtual-time-budget=5000".into(),
    ];
    let dom = Command::new("chromium")
        .args(&base)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("chromium (installed by scripts/setup.sh)");
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let s = Command::new("chromium")
        .args(&base)
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1280,2400")
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        s.status.success() && shot.is_file(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    String::from_utf8(dom.stdout).unwrap()
}
