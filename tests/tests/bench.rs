//! `ragar bench` on a two-job matrix over the demo setup (shrunk): the jobs
//! run and are tabled (Table 1 metrics, per-image latency, Table 4); two shards merged equal the unsharded bench; a bench
//! killed mid-job and resumed equals an uninterrupted one; unknown sweep
//! keys and an existing bench without --resume are refused.

use ragar_tests::*;
use std::path::Path;
use std::process::Command;

fn matrix(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("matrix.yaml");
    std::fs::write(
        &p,
        format!(
            "config: {}\ntrain_users: 1\ntest_users: 1\nmethods:\n  ragar: [dataset.merged_users=30, \"stage_cache={}\"]\n  no-rank-reward: [dataset.merged_users=30, \"stage_cache={}\", method.reflection.rank_weight=0]\n",
            root().join("configs/demo.yaml").display(),
            dir.join("stage.redb").display(),
            dir.join("stage.redb").display()
        ),
    )
    .unwrap();
    p
}

fn bench(args: &[&str]) -> (bool, String) {
    let o = run(Command::new(ragar()).current_dir(root()).arg("bench").args(args));
    (o.status.success(), text(&o))
}

fn metrics(out: &Path) -> serde_json::Value {
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let by_id: serde_json::Map<String, serde_json::Value> = all
        .iter()
        .map(|r| (r["job"]["id"].as_str().unwrap().to_string(), r["metrics"].clone()))
        .collect();
    serde_json::Value::Object(by_id)
}

#[test]
fn bench_shards_merge_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let m = matrix(tmp.path());
    let m = m.to_str().unwrap();
    let full = tmp.path().join("full");
    let (ok, t) = bench(&[m, "--out", full.to_str().unwrap()]);
    assert!(ok, "{t}");
    assert!(t.contains("2 jobs ok, 0 failed"), "{t}");
    let whole = metrics(&full);
    assert_eq!(whole.as_object().unwrap().len(), 2);
    for (id, runs) in whole.as_object().unwrap() {
        assert!(runs["ragar"]["ssim_reference"].is_number(), "{id}: {runs}");
    }
    let csv = std::fs::read_to_string(full.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4, "2 jobs x 2 runs: {csv}");
    assert!(
        csv.starts_with("job,method,run,status,seconds,peak_rss_mib,p50_s,p90_s,p99_s,images_per_s,table4_recall10")
    );
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(full.join("results.json")).unwrap()).unwrap();
    for r in &all {
        // One test user: one timed image per run, and Table 4's three rows.
        for run in ["ragar", "untrained"] {
            let l = &r["latency"][run];
            assert_eq!(l["n"].as_u64(), Some(1), "{r}");
            assert!(l["p50"].as_f64().unwrap() > 0.0 && l["p50"] == l["p99"], "{r}");
        }
        let t4 = r["table4"].as_object().unwrap();
        assert_eq!(t4.keys().collect::<Vec<_>>(), ["ORI", "ragar", "untrained"], "{r}");
    }

    // Again without --resume: refused.
    let (ok, t) = bench(&[m, "--out", full.to_str().unwrap()]);
    assert!(!ok && t.contains("--resume"), "{t}");

    // Two shards, merged, equal the whole.
    let (s0, s1) = (tmp.path().join("s0"), tmp.path().join("s1"));
    assert!(bench(&[m, "--out", s0.to_str().unwrap(), "--shard", "0/2"]).0);
    assert!(bench(&[m, "--out", s1.to_str().unwrap(), "--shard", "1/2"]).0);
    assert_eq!(metrics(&s0).as_object().unwrap().len(), 1);
    let merged = tmp.path().join("merged");
    let (ok, t) = bench(&[
        "merge",
        merged.to_str().unwrap(),
        s0.to_str().unwrap(),
        s1.to_str().unwrap(),
    ]);
    assert!(ok, "{t}");
    assert_eq!(metrics(&merged), whole);

    // Killed in the middle of the second job (its results missing, its
    // generation run begun but no sample logged, the next run not started),
    // then resumed: the same results.
    let killed = tmp.path().join("killed");
    copy(&full, &killed);
    let second = whole.as_object().unwrap().keys().nth(1).unwrap().clone();
    let job = killed.join("jobs").join(&second);
    std::fs::remove_file(job.join("results.json")).unwrap();
    std::fs::remove_dir_all(job.join("run/untrained")).unwrap();
    std::fs::write(job.join("run/ragar/samples.jsonl"), "").unwrap();
    std::fs::remove_file(job.join("run/ragar/metrics.json")).unwrap();
    let (ok, t) = bench(&[m, "--out", killed.to_str().unwrap(), "--resume"]);
    assert!(ok && t.contains("done earlier, kept"), "{t}");
    assert_eq!(metrics(&killed), whole);

    // An unknown sweep key names the valid ones.
    let (ok, t) = bench(&[
        m,
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
        "method.retrival.k=1,2",
    ]);
    assert!(!ok && t.contains("retrival") && t.contains("retrieval"), "{t}");
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A stage matrix (`job: stage`): CLIP image encoding on the three
/// backends and the PyTorch reference row, each a child process timed
/// after warm-up; tabled with ratios against the fastest backend and
/// against PyTorch. `bench.min_time` keeps timing past `iters` on every
/// runner. Unknown `bench.*` settings name the valid ones.
#[test]
fn stage_matrix_times_every_backend_and_the_pytorch_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("stages.yaml");
    let methods = ["candle", "ort", "tch"]
        .iter()
        .map(|b| format!("  clip-image__{b}: [bench.stage=encoder-image, encoder.backend={b}]\n"))
        .collect::<String>();
    std::fs::write(
        &m,
        format!(
            "config: {}\njob: stage\nreference: {}\nbench: {{batch: 2, iters: 3, min_time: 0.25, warmup: 1, size: 96}}\nmethods:\n{methods}  clip-image__pytorch: [bench.stage=encoder-image, bench.runner=pytorch]\n",
            root().join("configs/bench/backends-base.yaml").display(),
            root().join("scripts/bench_reference.py").display(),
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (ok, t) = bench(&[m.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok && t.contains("4 jobs ok, 0 failed"), "{t}");
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let mut runners = Vec::new();
    for r in &all {
        let s = &r["stage"];
        let (n, mean) = (
            s["latency"]["n"].as_u64().unwrap(),
            s["latency"]["mean"].as_f64().unwrap(),
        );
        assert!(n >= 3 && n as f64 * mean >= 0.25, "{r}");
        assert!(s["items_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 0.0, "{r}");
        runners.push(s["backend"].as_str().unwrap().to_string());
    }
    runners.sort();
    assert_eq!(runners, ["candle", "ort", "pytorch", "tch"]);
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("/ fastest ragar") && md.contains("/ PyTorch"), "{md}");
    let pytorch_row = md.lines().find(|l| l.contains("| pytorch |")).unwrap();
    assert!(pytorch_row.ends_with("| 1.00x |"), "{pytorch_row}");
    assert!(md.lines().filter(|l| l.contains("| 1.00x | ")).count() >= 1, "{md}");

    // A matrix file with one setting spoiled fails naming the setting.
    let spoiled = |from: &str, to: &str, out: &str| {
        let bad = tmp.path().join("bad.yaml");
        std::fs::write(&bad, std::fs::read_to_string(&m).unwrap().replace(from, to)).unwrap();
        bench(&[bad.to_str().unwrap(), "--out", tmp.path().join(out).to_str().unwrap()])
    };
    let (ok, t) = spoiled("iters: 3", "iterations: 3", "b");
    assert!(
        !ok && t.contains("bench.iterations") && t.contains("bench.iters"),
        "{t}"
    );
    let (ok, t) = spoiled("min_time: 0.25", "min_time: soon", "c");
    assert!(!ok && t.contains("bench.min_time: 'soon'"), "{t}");
}
