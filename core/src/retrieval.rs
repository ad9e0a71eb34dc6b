//! RAGAR's Retrieval module (paper, Sec. "Retrieval Module", Eq. 2-5),
//! framework-free: given the caption embeddings of a user's history items
//! and of the reference item (Eq. 2, from the Captioner and Encoder stages),
//! rank the history by cosine similarity to the reference (Eq. 3), keep the
//! top k (k = 5 in the paper; k = 0 turns retrieval off), and fuse the kept
//! items' visual features (Eq. 4) weighted by their similarities normalised
//! over the top k (Eq. 5) into the retrieval-augmented preference.
//!
//! Choices the paper leaves open, and ours:
//! - "normalised similarity scores": `w_i = s_i / sum_j s_j` over the top k.
//!   Cosine similarities can be negative, which would make that sum unstable,
//!   so negative similarities count as 0; when every kept similarity is <= 0
//!   the weights are uniform. A softmax with temperature is the alternative.
//! - Ties in similarity keep the more recent item first (history is in time
//!   order, most recent last), so results do not depend on sort stability.
//! - k larger than the history keeps the whole history.

use crate::error::{Error, Result};

/// How the top-k similarities become fusion weights (Eq. 5).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Weighting {
    /// `max(s_i, 0) / sum_j max(s_j, 0)` (the paper's); uniform when the sum is 0.
    Normalized,
    /// `softmax(s_i / temperature)`.
    Softmax {
        /// Softmax temperature (> 0).
        temperature: f32,
    },
    /// `1 / k` (what PMG-style fusion does, for ablations).
    Uniform,
}

/// Retrieval settings.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalConfig {
    /// Items kept (the paper's k, 5); 0 = no retrieval.
    #[serde(default = "five")]
    pub k: usize,
    /// Similarities -> weights.
    #[serde(default = "normalized")]
    pub weighting: Weighting,
}

fn five() -> usize {
    5
}
fn normalized() -> Weighting {
    Weighting::Normalized
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            k: 5,
            weighting: Weighting::Normalized,
        }
    }
}

/// Which history items were retrieved, with their similarities and weights
/// (most similar first). The report shows these.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Retrieved {
    /// Indices into the history.
    pub indices: Vec<usize>,
    /// Cosine similarity of each to the reference (Eq. 3).
    pub similarities: Vec<f32>,
    /// Fusion weight of each (Eq. 5); sums to 1 unless empty.
    pub weights: Vec<f32>,
}

/// Cosine similarity (0 when either vector is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    crate::metrics::scores::cosine(a, b) as f32
}

fn check(name: &str, v: &[f32], dim: usize) -> Result<()> {
    if v.len() != dim {
        return Err(Error::invalid_input(format!(
            "{name} has {} dimensions, the reference has {dim}",
            v.len()
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid_input(format!("{name}: value {i} is {}", v[i])));
    }
    Ok(())
}

/// Eq. 3 + top-k + Eq. 5's weights: which history items to fuse, and how.
/// `history[i]` and `reference` are caption embeddings (Eq. 2).
pub fn retrieve(reference: &[f32], history: &[Vec<f32>], cfg: &RetrievalConfig) -> Result<Retrieved> {
    check("the reference embedding", reference, reference.len())?;
    for (i, h) in history.iter().enumerate() {
        check(&format!("history item {i}"), h, reference.len())?;
    }
    if let Weighting::Softmax { temperature } = cfg.weighting {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::config(format!(
                "retrieval softmax temperature must be > 0, got {temperature}"
            )));
        }
    }
    let sims: Vec<f32> = history.iter().map(|h| cosine(reference, h)).collect();
    let mut order: Vec<usize> = (0..history.len()).collect();
    // Most similar first; on ties the more recent (later) item first.
    order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]).then(b.cmp(&a)));
    order.truncate(cfg.k.min(history.len()));
    let top: Vec<f32> = order.iter().map(|&i| sims[i]).collect();
    Ok(Retrieved {
        weights: weights(&top, cfg.weighting),
        similarities: top,
        indices: order,
    })
}

/// Eq. 5's weights for similarities `s` (most similar first).
pub fn weights(s: &[f32], w: Weighting) -> Vec<f32> {
    if s.is_empty() {
        return Vec::new();
    }
    let uniform = vec![1.0 / s.len() as f32; s.len()];
    match w {
        Weighting::Uniform => uniform,
        Weighting::Normalized => {
            let pos: Vec<f64> = s.iter().map(|&x| (x as f64).max(0.0)).collect();
            let sum: f64 = pos.iter().sum();
            if sum <= 0.0 {
                uniform
            } else {
                pos.iter().map(|&x| (x / sum) as f32).collect()
            }
        }
        Weighting::Softmax { temperature } => {
            let t = temperature as f64;
            let max = s.iter().map(|&x| x as f64 / t).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|&x| (x as f64 / t - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|&x| (x / sum) as f32).collect()
        }
    }
}

/// Eq. 5: the retrieval-augmented preference, `sum_i w_i * v_i` over the
/// retrieved items' visual features (Eq. 4). `None` when nothing was
/// retrieved (k = 0: the calibrator loss is then skipped).
pub fn fuse(retrieved: &Retrieved, visual: &[Vec<f32>]) -> Result<Option<Vec<f32>>> {
    let Some(&first) = retrieved.indices.first() else {
        return Ok(None);
    };
    let dim = visual
        .get(first)
        .ok_or_else(|| Error::invalid_input(format!("no visual feature for history item {first}")))?
        .len();
    let mut out = vec![0f64; dim];
    for (&i, &w) in retrieved.indices.iter().zip(&retrieved.weights) {
        let v = visual
            .get(i)
            .ok_or_else(|| Error::invalid_input(format!("no visual feature for history item {i}")))?;
        check(&format!("visual feature of history item {i}"), v, dim)?;
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w as f64 * x as f64;
        }
    }
    Ok(Some(out.into_iter().map(|x| x as f32).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn top_k_by_cosine_with_normalised_weights() {
        let reference = vec![1.0, 0.0];
        // cos: 1, 0, 0.6, -1, 0.8
        let history = vec![
            vec![2.0, 0.0],
            vec![0.0, 3.0],
            vec![0.6, 0.8],
            vec![-1.0, 0.0],
            vec![0.8, 0.6],
        ];
        let r = retrieve(
            &reference,
            &history,
            &RetrievalConfig {
                k: 3,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.indices, vec![0, 4, 2]);
        close(&r.similarities, &[1.0, 0.8, 0.6]);
        close(&r.weights, &[1.0 / 2.4, 0.8 / 2.4, 0.6 / 2.4]);
        let visual = vec![
            vec![1.0, 0.0],
            vec![9.0, 9.0],
            vec![0.0, 1.0],
            vec![9.0, 9.0],
            vec![1.0, 1.0],
        ];
        let fused = fuse(&r, &visual).unwrap().unwrap();
        close(&fused, &[(1.0 + 0.8) / 2.4, (0.8 + 0.6) / 2.4]);
    }

    #[test]
    fn k_zero_disables_and_large_k_keeps_everything() {
        let history = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let off = retrieve(
            &[1.0, 0.0],
            &history,
            &RetrievalConfig {
                k: 0,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(off.indices.is_empty() && off.weights.is_empty());
        assert_eq!(fuse(&off, &history).unwrap(), None);
        let all = retrieve(
            &[1.0, 0.0],
            &history,
            &RetrievalConfig {
                k: 20,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(all.indices, vec![0, 1]);
        close(&all.weights, &[1.0, 0.0]);
    }

    #[test]
    fn negative_similarities_count_as_zero_and_all_negative_is_uniform() {
        close(&weights(&[0.5, -0.5], Weighting::Normalized), &[1.0, 0.0]);
        close(&weights(&[-0.1, -0.5], Weighting::Normalized), &[0.5, 0.5]);
        let sm = weights(&[1.0, 0.0], Weighting::Softmax { temperature: 0.5 });
        let e = (2f32).exp();
        close(&sm, &[e / (e + 1.0), 1.0 / (e + 1.0)]);
    }

    #[test]
    fn ties_prefer_the_more_recent_item() {
        let history = vec![vec![1.0, 1.0], vec![2.0, 2.0], vec![0.0, 1.0]];
        let r = retrieve(
            &[1.0, 1.0],
            &history,
            &RetrievalConfig {
                k: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.indices, vec![1, 0]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = retrieve(&[1.0, 0.0], &[vec![1.0, 0.0], vec![1.0]], &RetrievalConfig::default()).unwrap_err();
        assert!(e.to_string().contains("history item 1 has 1 dimensions"), "{e}");
        let e = retrieve(&[1.0, f32::NAN], &[], &RetrievalConfig::default()).unwrap_err();
        assert!(e.to_string().contains("reference embedding: value 1 is NaN"), "{e}");
        let cfg = RetrievalConfig {
            k: 1,
            weighting: Weighting::Softmax { temperature: 0.0 },
        };
        assert!(retrieve(&[1.0], &[vec![1.0]], &cfg).is_err());
    }
}
