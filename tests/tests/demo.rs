//! `ragar demo` end to end on the open sticker set, shrunk (30 merged
//! users, one training and one test user) to stay quick: every step runs,
//! the metrics table and the report are written, the closing words say
//! plainly that the generator has no real weights, and a second call keeps
//! the finished steps. Table 4: the demo's rows replace the test user's
//! reference image, and a run whose "generated" images are byte copies of
//! the reference images trains a ranker with exactly ORI's figures (the
//! replacement touches only the reference items' visual features, and the
//! retraining is deterministic).

use ragar_tests::*;
use std::process::Command;

#[test]
fn demo_runs_every_step_and_says_what_is_real() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let args = |o: &std::path::Path| {
        vec![
            "demo".to_string(),
            "--out".into(),
            o.to_str().unwrap().into(),
            "--train-users".into(),
            "1".into(),
            "--test-users".into(),
            "1".into(),
            "dataset.merged_users=30".into(),
            format!("stage_cache={}", tmp.path().join("stage.redb").display()),
        ]
    };
    let o = run(Command::new(ragar()).current_dir(root()).args(args(&out)));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("NO REAL IMAGE GENERATOR WEIGHTS"), "{t}");
    assert!(
        t.contains("| ser30k | ragar |") && t.contains("| ser30k | untrained |"),
        "{t}"
    );
    for f in [
        "ranker/micro.safetensors",
        "train/mapper.safetensors",
        "ragar/metrics.json",
        "untrained/metrics.json",
        "report.html",
        "metrics.md",
        "table4/table4.md",
        "table4/ragar.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let t4: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("table4/table4.json")).unwrap()).unwrap();
    let rows = t4.as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["ORI", "ragar", "untrained"]);
    assert!(rows[0]["replaced"].is_null());
    for r in &rows[1..] {
        // One test user: one reference item, its sticker replaced by noise.
        let rep = &r["replaced"];
        assert_eq!(
            (rep["items"].as_u64(), rep["images"].as_u64()),
            (Some(1), Some(1)),
            "{r}"
        );
        assert_eq!(rep["changed"].as_u64(), Some(1), "{r}");
    }

    // A run of byte copies of each reference image.
    let copy = tmp.path().join("copy");
    std::fs::create_dir_all(copy.join("images")).unwrap();
    let mut lines = String::new();
    for l in std::fs::read_to_string(out.join("ragar/samples.jsonl"))
        .unwrap()
        .lines()
    {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let reference = v["prepared"]["reference"].as_str().unwrap().to_string();
        let name = format!("images/{}", reference.replace('/', "_"));
        std::fs::copy(cache().join("data/stickers/Images").join(&reference), copy.join(&name)).unwrap();
        v["image"] = name.into();
        lines += &format!("{v}\n");
    }
    std::fs::write(copy.join("samples.jsonl"), lines).unwrap();
    let t4copy = tmp.path().join("t4copy");
    let o = run(Command::new(ragar()).current_dir(root()).args([
        "table4",
        "configs/demo.yaml",
        "--run",
        copy.to_str().unwrap(),
        "--ori",
        out.join("ranker/micro.safetensors.eval.json").to_str().unwrap(),
        "--out",
        t4copy.to_str().unwrap(),
        "dataset.merged_users=30",
        &format!("stage_cache={}", tmp.path().join("stage.redb").display()),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let t4: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t4copy.join("table4.json")).unwrap()).unwrap();
    let (ori, copied) = (&t4[0]["test"]["ranker"], &t4[1]["test"]["ranker"]);
    assert_eq!(t4[1]["replaced"]["changed"].as_u64(), Some(0), "{t4}");
    assert_eq!(ori, copied, "copies of the reference images must give ORI's figures");
    let again = run(Command::new(ragar()).current_dir(root()).args(args(&out)));
    let t = text(&again);
    assert!(again.status.success() && t.contains("exists: kept"), "{t}");
}
