//! The framework-free half of RAGAR's Reflection module (paper, Sec.
//! "Recommendation Reflection", Eq. 10-12): the host draws the Gaussian
//! perturbations of the general preference, has an image generated from
//! each, lets the Ranker score the set {reference image, global-preference
//! image, RAGAR images} substituted into the user's sequence, and turns the
//! scores into ranks and the ranks into rewards. The Mapper (which owns
//! autograd) then forms the policy-gradient loss from the noises and rewards
//! (`stage::mapper::ReflectionSample`).
//!
//! Choices the paper leaves open, and ours:
//! - Ranks are taken within the candidate set (1 = highest score); equal
//!   scores share the better rank (competition ranking), so a tie never
//!   favours one perturbation by its position.
//! - The reward of rank r among N candidates is, by default, linear
//!   `(N - r) / (N - 1)` in [0, 1] (1 = ranked first); a rank-discounted
//!   `1 / log2(1 + r)` (as the rank-change metric discounts) and the
//!   reciprocal `1 / r` are options.
//! - "The final reward is the mean rank score of the generated images": the
//!   mean reward of the n perturbations, reported per step.

use crate::error::{Error, Result};
use crate::rng::TorchGenerator;

/// Rank -> reward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardFn {
    /// `(N - r) / (N - 1)`.
    Linear,
    /// `1 / log2(1 + r)`.
    LogDiscount,
    /// `1 / r`.
    Reciprocal,
}

impl RewardFn {
    /// Reward of 1-based rank `r` among `n` candidates.
    pub fn reward(self, r: usize, n: usize) -> f32 {
        let (r, n) = (r as f64, n as f64);
        (match self {
            RewardFn::Linear if n <= 1.0 => 1.0,
            RewardFn::Linear => (n - r) / (n - 1.0),
            RewardFn::LogDiscount => 1.0 / (1.0 + r).log2(),
            RewardFn::Reciprocal => 1.0 / r,
        }) as f32
    }
}

/// 1-based competition ranks of `scores` (highest score = rank 1; equal
/// scores share the better rank). NaN scores are an error.
pub fn ranks(scores: &[f32]) -> Result<Vec<usize>> {
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::model(format!("ranker score {i} is NaN")));
    }
    Ok(scores
        .iter()
        .map(|&s| 1 + scores.iter().filter(|&&o| o > s).count())
        .collect())
}

/// The ranker's verdict on one reflection sample (Eq. 10-12).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// Rank of the reference image among the candidates.
    pub reference_rank: usize,
    /// Rank of the global-preference image.
    pub global_rank: usize,
    /// Rank of each perturbation's image.
    pub ranks: Vec<usize>,
    /// Reward of each perturbation (what the policy gradient weighs).
    pub rewards: Vec<f32>,
    /// Mean reward of the perturbations (the paper's final reward).
    pub mean_reward: f32,
}

/// Score order of the candidate set: `[reference, global, perturbation_1..n]`.
pub fn verdict(scores: &[f32], reward: RewardFn) -> Result<Verdict> {
    if scores.len() < 3 {
        return Err(Error::invalid_input(format!(
            "the reflection set needs the reference, the global-preference image and at least one \
             perturbation; got {} scores",
            scores.len()
        )));
    }
    let r = ranks(scores)?;
    let n = scores.len();
    let rewards: Vec<f32> = r[2..].iter().map(|&k| reward.reward(k, n)).collect();
    Ok(Verdict {
        reference_rank: r[0],
        global_rank: r[1],
        mean_reward: rewards.iter().sum::<f32>() / rewards.len() as f32,
        ranks: r[2..].to_vec(),
        rewards,
    })
}

/// The perturbations of one sample: `n` standard-normal noises of `dim`
/// values each, from `seed` (PyTorch's CPU generator, so runs replay
/// exactly on any backend). The perturbed preferences are `mu + sigma * eps_i`.
pub fn noises(seed: u64, n: usize, dim: usize) -> Result<Vec<Vec<f32>>> {
    let mut g = TorchGenerator::new(seed);
    (0..n)
        .map(|_| {
            g.randn(dim.max(16)).map(|mut v| {
                v.truncate(dim);
                v
            })
        })
        .collect()
}

/// `mu + sigma * eps`.
pub fn perturb(mu: &[f32], eps: &[f32], sigma: f32) -> Result<Vec<f32>> {
    if mu.len() != eps.len() {
        return Err(Error::invalid_input(format!(
            "perturbation of {} values for a preference of {}",
            eps.len(),
            mu.len()
        )));
    }
    Ok(mu.iter().zip(eps).map(|(m, e)| m + sigma * e).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn competition_ranks_and_rewards() {
        assert_eq!(ranks(&[0.1, 0.9, 0.5, 0.9]).unwrap(), vec![4, 1, 3, 1]);
        assert!(ranks(&[0.1, f32::NAN]).is_err());
        let v = verdict(&[0.2, 0.5, 0.9, 0.1, 0.5], RewardFn::Linear).unwrap();
        assert_eq!((v.reference_rank, v.global_rank), (4, 2));
        assert_eq!(v.ranks, vec![1, 5, 2]);
        assert_eq!(v.rewards, vec![1.0, 0.0, 0.75]);
        assert!((v.mean_reward - 1.75 / 3.0).abs() < 1e-6);
        assert!((RewardFn::LogDiscount.reward(1, 5) - 1.0).abs() < 1e-6);
        assert!((RewardFn::LogDiscount.reward(3, 5) - 0.5).abs() < 1e-6);
        assert_eq!(RewardFn::Reciprocal.reward(4, 5), 0.25);
        assert!(verdict(&[0.1, 0.2], RewardFn::Linear).is_err());
    }

    #[test]
    fn noises_are_seeded_and_independent() {
        let a = noises(3, 2, 20).unwrap();
        assert_eq!(a, noises(3, 2, 20).unwrap());
        assert_ne!(a[0], a[1]);
        assert_eq!(a[0].len(), 20);
        let p = perturb(&[1.0; 20], &a[0], 0.5).unwrap();
        assert!((p[0] - (1.0 + 0.5 * a[0][0])).abs() < 1e-7);
    }
}
