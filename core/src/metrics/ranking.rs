//! Top-k ranking metrics and reference rankers.
//!
//! Definitions (the ones MICRO and LATTICE report, and the paper's Table 4):
//! for a user with held-out items T and the ranker's top-k list L (items
//! the user interacted with in training excluded),
//!
//! - Recall@k = |L ∩ T| / min(|T|, k);
//! - NDCG@k = Σ_{r: L_r ∈ T} 1 / log2(r + 2)  /  Σ_{r < min(|T|, k)} 1 / log2(r + 2)
//!   (r counted from 0);
//!
//! both averaged over the users with a non-empty T. Ties in score keep the
//! lower item index first, so a result never depends on sort stability.

use crate::rng::TorchGenerator;
use std::collections::HashSet;

/// Recall@k and NDCG@k averaged over users.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopK {
    /// Mean Recall@k.
    pub recall: f64,
    /// Mean NDCG@k.
    pub ndcg: f64,
    /// Users evaluated (those with held-out items).
    pub users: usize,
}

/// The `k` best items of `scores`, skipping `exclude`; ties keep the lower index.
pub fn top_k(scores: &[f32], exclude: &HashSet<u32>, k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).filter(|i| !exclude.contains(i)).collect();
    let better = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
    if order.len() > k && k > 0 {
        order.select_nth_unstable_by(k - 1, better);
        order.truncate(k);
    }
    order.sort_by(better);
    order.truncate(k);
    order
}

/// Recall@k and NDCG@k of one ranked list against held-out `truth`.
pub fn recall_ndcg_one(list: &[u32], truth: &HashSet<u32>, k: usize) -> (f64, f64) {
    let n = truth.len().min(k);
    if n == 0 {
        return (0.0, 0.0);
    }
    let gain = |r: usize| 1.0 / (r as f64 + 2.0).log2();
    let (mut hits, mut dcg) = (0usize, 0.0);
    for (r, i) in list.iter().take(k).enumerate() {
        if truth.contains(i) {
            hits += 1;
            dcg += gain(r);
        }
    }
    let idcg: f64 = (0..n).map(gain).sum();
    (hits as f64 / n as f64, dcg / idcg)
}

/// Recall@k and NDCG@k of score rows (`scores[u][i]`) against `truth[u]`,
/// excluding each user's `seen[u]`; users without held-out items are skipped.
/// Rows may be borrowed (`&[f32]`), so one row can serve every user.
pub fn recall_ndcg<R: AsRef<[f32]>>(scores: &[R], seen: &[Vec<u32>], truth: &[Vec<u32>], k: usize) -> TopK {
    let mut out = TopK::default();
    for ((row, seen), truth) in scores.iter().zip(seen).zip(truth) {
        if truth.is_empty() {
            continue;
        }
        let exclude: HashSet<u32> = seen.iter().copied().collect();
        let t: HashSet<u32> = truth.iter().copied().collect();
        let (r, n) = recall_ndcg_one(&top_k(row.as_ref(), &exclude, k), &t, k);
        out.recall += r;
        out.ndcg += n;
        out.users += 1;
    }
    if out.users > 0 {
        out.recall /= out.users as f64;
        out.ndcg /= out.users as f64;
    }
    out
}

/// The popularity ranker: every user gets each item's number of training
/// interactions as its score.
pub fn popularity_scores(train: &[Vec<u32>], n_items: usize) -> Vec<f32> {
    let mut count = vec![0f32; n_items];
    for seq in train {
        for &i in seq {
            count[i as usize] += 1.0;
        }
    }
    count
}

/// The random ranker: independent uniform scores per user and item from
/// `seed` (PyTorch's `torch.rand` stream).
pub fn random_scores(users: usize, n_items: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut g = TorchGenerator::new(seed);
    (0..users).map(|_| g.rand(n_items)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_recall_and_ndcg() {
        // Items 0..6; user sees item 5 in training; held-out {1, 3}.
        let scores = vec![vec![0.9, 0.1, 0.8, 0.7, 0.0, 1.0]];
        let m = recall_ndcg(&scores, &[vec![5]], &[vec![1, 3]], 3);
        // Top-3 without item 5: [0, 2, 3]; one hit (item 3) at rank 2.
        assert_eq!(m.users, 1);
        assert!((m.recall - 0.5).abs() < 1e-12);
        let want = (1.0 / 4f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((m.ndcg - want).abs() < 1e-12);
    }

    #[test]
    fn ties_keep_the_lower_index_and_partial_selection_equals_sorting() {
        let scores = vec![0.5, 0.5, 0.9, 0.5, 0.1];
        assert_eq!(top_k(&scores, &HashSet::new(), 3), vec![2, 0, 1]);
        let g = random_scores(1, 1000, 7).remove(0);
        let mut full: Vec<u32> = (0..1000).collect();
        full.sort_by(|a, b| g[*b as usize].total_cmp(&g[*a as usize]).then(a.cmp(b)));
        assert_eq!(top_k(&g, &HashSet::new(), 10), full[..10].to_vec());
    }

    #[test]
    fn users_without_truth_are_skipped_and_popularity_counts() {
        let m = recall_ndcg(
            &[vec![1.0, 0.0], vec![0.0, 1.0]],
            &[vec![], vec![]],
            &[vec![], vec![1]],
            1,
        );
        assert_eq!(m.users, 1);
        assert_eq!(m.recall, 1.0);
        assert_eq!(popularity_scores(&[vec![0, 2], vec![2]], 3), vec![1.0, 0.0, 2.0]);
    }
}
