//! MKL's vendor check on tch (ragar-tch's `mkl` module): libtorch's call to
//! `mkl_serv_intel_cpu_true` reaches ragar's definition, from the `ragar`
//! executable and from the dynamically loaded tch plugin, and
//! `RAGAR_MKL_VENDOR_CHECK=1` hands the question on to MKL's own. Checked by
//! the dynamic linker's own record of the bindings (`LD_DEBUG=bindings`),
//! not by timing; the tch parity tests run through the same path.

use ragar_tests::*;
use std::path::Path;

const SYMBOL: &str = "`mkl_serv_intel_cpu_true'";

/// Run one tch MiniLM encoder call of `bin` with the dynamic linker's binding log
/// on; the log's lines that bind the MKL symbol.
fn bindings(bin: &Path, env: &[(&str, &Path)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.json");
    let mut cmd = minilm_stage(bin, &out);
    cmd.env("LD_DEBUG", "bindings")
        .env("LD_DEBUG_OUTPUT", dir.path().join("ld"))
        .env("RAGAR_CACHE", cache())
        .arg("encoder.backend=tch");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = run(&mut cmd);
    assert!(o.status.success(), "{}", text(&o));
    let mut lines = Vec::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("ld") {
            let log = std::fs::read_to_string(&p).unwrap_or_default();
            lines.extend(log.lines().filter(|l| l.contains(SYMBOL)).map(|l| l.trim().to_string()));
        }
    }
    lines
}

/// `binding file A [0] to B [0]`: whether some line binds from a file whose
/// name ends in `from` to one ending in `to`.
fn binds(lines: &[String], from: &str, to: &str) -> bool {
    lines.iter().any(|l| {
        let Some(rest) = l.split("binding file ").nth(1) else {
            return false;
        };
        let Some((a, b)) = rest.split_once(" to ") else {
            return false;
        };
        let file = |s: &str| s.split(" [").next().unwrap_or("").to_string();
        file(a).ends_with(from) && file(b).ends_with(to)
    })
}

#[test]
fn libtorch_asks_ragar_whether_mkl_may_use_the_cpus_instructions() {
    let bin = ragar();
    let name = bin.file_name().unwrap().to_str().unwrap().to_string();
    let lines = bindings(&bin, &[]);
    assert!(binds(&lines, "libtorch_cpu.so", &name), "{lines:#?}");
    assert!(
        !binds(&lines, &name, "libtorch_cpu.so"),
        "answered without asking MKL: {lines:#?}"
    );

    let keep = bindings(&bin, &[("RAGAR_MKL_VENDOR_CHECK", Path::new("1"))]);
    assert!(binds(&keep, "libtorch_cpu.so", &name), "{keep:#?}");
    assert!(
        binds(&keep, &name, "libtorch_cpu.so"),
        "RAGAR_MKL_VENDOR_CHECK=1 hands the question to MKL's own: {keep:#?}"
    );
}

#[test]
fn the_dynamic_tch_plugin_answers_for_its_own_libtorch() {
    let bin = ragar_minimal();
    let lib = cdylib("ragar-tch-plugin", &[]);
    let lines = bindings(&bin, &[("RAGAR_PLUGIN_PATH", &lib)]);
    assert!(binds(&lines, "libtorch_cpu.so", "libragar_tch_plugin.so"), "{lines:#?}");
}
