//! The rankers. MICRO against our PyTorch transcription of the reference code's
//! definitions (tests/fixtures/micro-tiny, scripts/fixtures/make_micro.py):
//! forward embeddings and the BPR + L2 + InfoNCE loss within 1e-5, and every
//! parameter after one Adam step within 1e-5. Then, on synthetic users with
//! planted visual tastes: training beats popularity on held-out items,
//! substitution scoring prefers an image of the user's taste, and a saved
//! state scores identically after loading.

use candle_core::{Device, Tensor};
use ragar_candle::adamw::{AdamW, AdamWConfig};
use ragar_candle::content_ranker::ContentRanker;
use ragar_candle::micro::{Micro, MicroConfig};
use ragar_candle::micro_ranker::MicroRanker;
use ragar_core::abi_stable::std_types::{RNone, ROption, RVec};
use ragar_core::stage::{Candidate, ItemFeatures, RankQuery, Ranker, RankerData, UserHistory};
use ragar_core::ComponentSpec;
use std::collections::HashMap;
use std::path::PathBuf;

fn reference() -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/micro-tiny/reference.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn u32s(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i32>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect()
}

#[test]
fn forward_loss_and_one_adam_step_match_pytorch() {
    let r = reference();
    let e = u32s(&r["edges"]);
    let edges: Vec<(u32, u32)> = e.chunks(2).map(|p| (p[0], p[1])).collect();
    let cfg = MicroConfig {
        dim: 8,
        knn_k: 4,
        ..Default::default()
    };
    let m = Micro::new(
        cfg,
        vec![r["features.visual"].clone(), r["features.text"].clone()],
        &edges,
        7,
        0,
    )
    .unwrap();
    for (name, var) in &m.params.vars {
        var.set(&r[&format!("init.{name}")]).unwrap();
    }
    let emb = m.forward().unwrap();
    assert!(
        max_diff(&emb.users, &r["users"]) <= 1e-5,
        "users {}",
        max_diff(&emb.users, &r["users"])
    );
    assert!(
        max_diff(&emb.items, &r["items"]) <= 1e-5,
        "items {}",
        max_diff(&emb.items, &r["items"])
    );
    let [total, bpr, reg, cl] = m
        .loss(
            &emb,
            &u32s(&r["batch.users"]),
            &u32s(&r["batch.pos"]),
            &u32s(&r["batch.neg"]),
        )
        .unwrap();
    let got = Tensor::stack(&[&total, &bpr, &reg, &cl], 0).unwrap();
    assert!(max_diff(&got, &r["losses"]) <= 1e-5, "losses {got} vs {}", r["losses"]);
    let grads = total.backward().unwrap();
    let adam = AdamWConfig {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
    };
    AdamW::default().step(&m.params.vars, &grads, 1e-2, 0.0, &adam).unwrap();
    for (name, var) in &m.params.vars {
        let d = max_diff(var.as_tensor(), &r[&format!("after.{name}")]);
        assert!(d <= 1e-5, "{name} after one step: {d}");
    }
}

/// 4 taste clusters; item visual features = cluster centre + noise; each
/// user likes items of one cluster.
fn synthetic() -> RankerData {
    let mut g = ragar_core::rng::TorchGenerator::new(7);
    let centres: Vec<Vec<f32>> = (0..4).map(|_| g.randn(16).unwrap()).collect();
    let n_items = 48;
    let items: Vec<ItemFeatures> = (0..n_items)
        .map(|i| {
            let noise = g.randn(16).unwrap();
            let v: Vec<f32> = centres[i % 4].iter().zip(&noise).map(|(c, n)| c + 0.3 * n).collect();
            let t: Vec<f32> = g
                .randn(16)
                .unwrap()
                .iter()
                .zip(&centres[i % 4])
                .map(|(n, c)| 0.5 * c + 0.5 * n)
                .collect();
            ItemFeatures {
                item: format!("i{i}").into(),
                visual: ragar_core::Tensor::from_f32(&[16], v).unwrap(),
                text: ragar_core::Tensor::from_f32(&[16], t).unwrap(),
            }
        })
        .collect();
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for u in 0..24 {
        let c = u % 4;
        let mine: Vec<usize> = (0..n_items).filter(|i| i % 4 == c).collect();
        let pick: Vec<usize> = (0..7).map(|k| mine[(u * 5 + k * 3) % mine.len()]).collect();
        let mut seen = Vec::new();
        for p in pick {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        let (tr, va) = seen.split_at(seen.len() - 2);
        let h = |v: &[usize]| UserHistory {
            user: format!("u{u}").into(),
            items: v.iter().map(|i| format!("i{i}").into()).collect(),
        };
        train.push(h(tr));
        valid.push(h(va));
    }
    RankerData {
        train: train.into(),
        valid: valid.into(),
        items: items.into(),
        seed: 3,
    }
}

#[test]
fn learns_tastes_scores_substitutions_and_round_trips() {
    let data = synthetic();
    let spec = ComponentSpec::new(
        "ranker",
        serde_json::json!({"model": {"dim": 16, "knn_k": 5}, "epochs": 60, "batch_size": 64, "lr": 0.01, "patience": 15}),
    );
    let mut ranker = MicroRanker::load_component(&spec).unwrap();
    let report = ranker.fit(&data).unwrap();
    let recall = report.metrics.iter().find(|m| m.0.as_str() == "recall@10").unwrap().1;
    // Popularity / random would find about 10 of 48 items: recall near 0.2.
    assert!(recall >= 0.5, "validation recall@10 {recall}");

    // A user of cluster c: an item with a cluster-c image beats the same item with another cluster's image.
    let mut wins = 0;
    for u in 0..8 {
        let c = u % 4;
        let other = (c + 1) % 4;
        let feat = |k: usize| ROption::RSome(data.items[k].visual.clone());
        let q = RankQuery {
            history: data.train[u].clone(),
            candidates: RVec::from(vec![
                Candidate {
                    item: "i47".into(),
                    visual: feat(4 + c),
                    text: RNone,
                },
                Candidate {
                    item: "i47".into(),
                    visual: feat(4 + other),
                    text: RNone,
                },
            ]),
        };
        let s = ranker.score(&[q]).unwrap();
        wins += (s[0][0] > s[0][1]) as usize;
    }
    assert!(wins >= 6, "the user's taste won {wins} of 8 substitutions");

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("micro.safetensors");
    ranker.save(path.to_str().unwrap()).unwrap();
    let spec2 = ComponentSpec::new("ranker", serde_json::json!({"checkpoint": path}));
    let loaded = MicroRanker::load_component(&spec2).unwrap();
    let q = RankQuery {
        history: data.train[3].clone(),
        candidates: (0..48)
            .map(|i| Candidate {
                item: format!("i{i}").into(),
                visual: RNone,
                text: RNone,
            })
            .collect(),
    };
    assert_eq!(ranker.score(&[q.clone()]).unwrap(), loaded.score(&[q]).unwrap());

    let bad = RankQuery {
        history: data.train[0].clone(),
        candidates: RVec::from(vec![Candidate {
            item: "nope".into(),
            visual: RNone,
            text: RNone,
        }]),
    };
    let e = ranker.score(&[bad]).unwrap_err().to_string();
    assert!(e.contains("item 'nope' is not in the catalogue"), "{e}");
}

#[test]
fn content_ranker_learns_scores_unseen_images_and_round_trips() {
    let data = synthetic();
    let spec = ComponentSpec::new(
        "ranker",
        serde_json::json!({"dim": 16, "epochs": 40, "batch_size": 32, "lr": 0.01, "patience": 10}),
    );
    let mut ranker = ContentRanker::load_component(&spec).unwrap();
    let report = ranker.fit(&data).unwrap();
    let recall = report.metrics.iter().find(|m| m.0.as_str() == "recall@10").unwrap().1;
    assert!(recall >= 0.5, "validation recall@10 {recall}");
    // Inductive: an image of the user's taste beats another taste's, for an item id never seen.
    let mut wins = 0;
    for u in 0..8 {
        let c = u % 4;
        let cand = |k: usize| Candidate {
            item: "generated".into(),
            visual: ROption::RSome(data.items[k].visual.clone()),
            text: ROption::RSome(data.items[k].text.clone()),
        };
        let q = RankQuery {
            history: data.train[u].clone(),
            candidates: RVec::from(vec![cand(4 + c), cand(4 + (c + 2) % 4)]),
        };
        let s = ranker.score(&[q]).unwrap();
        wins += (s[0][0] > s[0][1]) as usize;
    }
    assert!(wins >= 7, "the user's taste won {wins} of 8");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("content.safetensors");
    ranker.save(path.to_str().unwrap()).unwrap();
    let loaded =
        ContentRanker::load_component(&ComponentSpec::new("ranker", serde_json::json!({"checkpoint": path}))).unwrap();
    let q = RankQuery {
        history: data.train[5].clone(),
        candidates: (0..48)
            .map(|i| Candidate {
                item: format!("i{i}").into(),
                visual: RNone,
                text: RNone,
            })
            .collect(),
    };
    assert_eq!(ranker.score(&[q.clone()]).unwrap(), loaded.score(&[q]).unwrap());
}
