//! `ragar demo` end to end on the open sticker set, shrunk (30 merged
//! users, one training and one test user) to stay quick: every step runs,
//! the metrics table and the report are written, the closing words say
//! plainly that the generator has no real weights, and a second call keeps
//! the finished steps.

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
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let again = run(Command::new(ragar()).current_dir(root()).args(args(&out)));
    let t = text(&again);
    assert!(again.status.success() && t.contains("exists: kept"), "{t}");
}
