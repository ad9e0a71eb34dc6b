//! The reflection losses behave as their definitions say: gradients equal
//! central finite differences for each of the three losses; the policy
//! gradient moves the preference toward the better-rewarded perturbation;
//! and a few hundred reflection steps against a toy ranker (rewards from
//! the rank of each perturbed preference's distance to a hidden target)
//! lower the total loss and raise the mean reward.

use candle_core::Device;
use ragar_candle::mapper::{MapperConfig, RagarMapper};
use ragar_core::abi_stable::std_types::RVec;
use ragar_core::reflection;
use ragar_core::stage::{LossConfig, Mapper, MapperInput, ReflectionSample};
use ragar_core::Tensor;
use std::path::PathBuf;

fn cfg() -> MapperConfig {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mapper-tiny/config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    serde_json::from_value(v["mapper"].clone()).unwrap()
}

fn randn(g: &mut ragar_core::rng::TorchGenerator, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_f32(shape, g.randn(n.max(16)).unwrap()[..n].to_vec()).unwrap()
}

fn input(c: &MapperConfig, g: &mut ragar_core::rng::TorchGenerator) -> MapperInput {
    MapperInput {
        img_states: randn(g, &[c.n_img_tokens, c.input_dim]),
        text_embedding: randn(g, &[c.input_dim]),
        keyword_feature: randn(g, &[c.keyword_dim]),
    }
}

fn loss(weights: [f32; 3], lr: f32) -> LossConfig {
    LossConfig {
        rank_weight: weights[0],
        calibrator_weight: weights[1],
        semantic_weight: weights[2],
        sigma: 0.1,
        margin: 0.5,
        lr,
        grad_clip: 0.0,
    }
}

#[test]
fn each_loss_has_finite_difference_gradients() {
    let c = cfg();
    let m = RagarMapper::new(c.clone(), Device::Cpu).unwrap();
    let mut g = ragar_core::rng::TorchGenerator::new(5);
    let sample = ReflectionSample {
        input: input(&c, &mut g),
        noises: randn(&mut g, &[3, c.n_queries, c.output_dim]),
        rewards: RVec::from(vec![1.0, 0.2, 0.6]),
        retrieval_preference: randn(&mut g, &[c.retrieval_dim]),
        semantic_target: randn(&mut g, &[c.n_queries, c.output_dim]),
    };
    let dims = [c.n_queries, c.output_dim];
    let mu0 = m.forward(std::slice::from_ref(&sample.input)).unwrap()[0]
        .preference
        .to_f32_vec();
    let eps0 = sample.noises.to_f32_vec();
    let sigma = 0.1f32;
    for (which, w) in [
        ("rank", [1.0, 0.0, 0.0]),
        ("calibrator", [0.0, 1.0, 0.0]),
        ("semantic", [0.0, 0.0, 1.0]),
    ] {
        let l = loss(w, 1e-3);
        for name in ["model.bias", "calibrator.kw_proj.bias", "fc.bias"] {
            let analytic = m.gradient(std::slice::from_ref(&sample), &l, name).unwrap();
            let base = m.parameter(name).unwrap();
            for i in [0, base.len() / 2] {
                let h = 1e-2f32;
                let at = |d: f32| {
                    let mut p = base.clone();
                    p[i] += d;
                    m.set_parameter(name, &p).unwrap();
                    // The policy gradient differentiates log N(z; mu) with the
                    // sampled z = mu0 + sigma * eps held fixed: re-express z
                    // around the moved mu.
                    let mu = m.forward(std::slice::from_ref(&sample.input)).unwrap()[0]
                        .preference
                        .to_f32_vec();
                    let moved: Vec<f32> = eps0
                        .iter()
                        .enumerate()
                        .map(|(j, e)| (mu0[j % mu0.len()] + sigma * e - mu[j % mu.len()]) / sigma)
                        .collect();
                    let mut s2 = sample.clone();
                    s2.noises = Tensor::from_f32(&[3, dims[0], dims[1]], moved).unwrap();
                    m.loss_values(&[s2], &l).unwrap()[0] as f64
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
                m.set_parameter(name, &base).unwrap();
                let a = analytic[i] as f64;
                assert!(
                    (a - numeric).abs() <= 2e-3 + 0.02 * a.abs().max(numeric.abs()),
                    "{which} loss, d/d {name}[{i}]: autograd {a} vs finite difference {numeric}"
                );
            }
        }
    }
}

#[test]
fn the_policy_gradient_moves_toward_the_rewarded_perturbation() {
    let c = cfg();
    let mut m = RagarMapper::new(c.clone(), Device::Cpu).unwrap();
    let mut g = ragar_core::rng::TorchGenerator::new(9);
    let inp = input(&c, &mut g);
    let dims = [c.n_queries, c.output_dim];
    let eps = reflection::noises(1, 2, dims[0] * dims[1]).unwrap();
    let before = m.forward(std::slice::from_ref(&inp)).unwrap()[0]
        .preference
        .to_f32_vec();
    let sample = ReflectionSample {
        input: inp.clone(),
        noises: Tensor::from_f32(&[2, dims[0], dims[1]], eps.concat()).unwrap(),
        rewards: RVec::from(vec![1.0, 0.0]),
        retrieval_preference: Tensor::from_f32(&[0], vec![]).unwrap(),
        semantic_target: Tensor::from_f32(&dims, vec![0.0; dims[0] * dims[1]]).unwrap(),
    };
    m.train_step(&[sample], &loss([1.0, 0.0, 0.0], 1e-3)).unwrap();
    let after = m.forward(std::slice::from_ref(&inp)).unwrap()[0]
        .preference
        .to_f32_vec();
    let moved: f64 = after
        .iter()
        .zip(&before)
        .zip(eps[0].iter().zip(&eps[1]))
        .map(|((a, b), (e1, e2))| ((a - b) * (e1 - e2)) as f64)
        .sum();
    assert!(
        moved > 0.0,
        "the preference moved away from the rewarded perturbation ({moved})"
    );
}

#[test]
fn reflection_against_a_toy_ranker_lowers_loss_and_raises_reward() {
    let c = cfg();
    let mut m = RagarMapper::new(c.clone(), Device::Cpu).unwrap();
    let mut g = ragar_core::rng::TorchGenerator::new(21);
    let inp = input(&c, &mut g);
    let dims = [c.n_queries, c.output_dim];
    let n = dims[0] * dims[1];
    // The toy ranker prefers preferences near a hidden target.
    let target = g.randn(n).unwrap();
    let retrieval = randn(&mut g, &[c.retrieval_dim]);
    let semantic = randn(&mut g, &dims);
    let l = loss([1.0, 0.1, 0.1], 3e-3);
    let dist = |p: &[f32]| -> f32 { -p.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() };
    // Decoys spread around the starting preference's distance to the target.
    let mu_start = m.forward(std::slice::from_ref(&inp)).unwrap()[0]
        .preference
        .to_f32_vec();
    let d0 = dist(&mu_start);
    let decoys: Vec<f32> = (0..20).map(|k| d0 * (0.7 + 0.03 * k as f32)).collect();
    let (mut rewards, mut losses) = (Vec::new(), Vec::new());
    for step in 0..300u64 {
        let mu = m.forward(std::slice::from_ref(&inp)).unwrap()[0]
            .preference
            .to_f32_vec();
        let eps = reflection::noises(step, 4, n).unwrap();
        // Rewards as the toy ranker gives them: the share of a fixed pool of
        // decoy preferences each perturbed preference outranks.
        let rewards_now: Vec<f32> = eps
            .iter()
            .map(|e| {
                let s = dist(&reflection::perturb(&mu, e, l.sigma).unwrap());
                decoys.iter().filter(|&&d| s > d).count() as f32 / decoys.len() as f32
            })
            .collect();
        let v_mean = rewards_now.iter().sum::<f32>() / rewards_now.len() as f32;
        let sample = ReflectionSample {
            input: inp.clone(),
            noises: Tensor::from_f32(&[4, dims[0], dims[1]], eps.concat()).unwrap(),
            rewards: RVec::from(rewards_now.clone()),
            retrieval_preference: retrieval.clone(),
            semantic_target: semantic.clone(),
        };
        let s = m.train_step(&[sample], &l).unwrap();
        rewards.push(v_mean as f64);
        losses.push(s.loss as f64);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (r0, r1) = (mean(&rewards[..50]), mean(&rewards[250..]));
    let (l0, l1) = (mean(&losses[..50]), mean(&losses[250..]));
    assert!(r1 > r0, "mean reward {r0:.3} -> {r1:.3}");
    assert!(l1 < l0, "loss {l0:.4} -> {l1:.4}");
}
