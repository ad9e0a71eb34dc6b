//! The paper's CLIP scores and rank change (Table 1, Eq. 16), on features
//! and ranks the stages produce. Definitions, as the report states them:
//!
//! Semantic alignment, generated image g against the reference item:
//! - **CS** = 100 cos(CLIP_image(g), CLIP_text(reference text));
//! - **CIS** = 100 cos(CLIP_image(g), CLIP_image(reference image)).
//!
//! Personalization, against what represents the user's preference:
//! - **CPS** = 100 cos(CLIP_image(g), CLIP_text(preference text)), the
//!   preference text being the user's kept keywords joined by ", " (the
//!   history items' texts when no keyword was kept);
//! - **CPIS** = mean over the user's history images h of
//!   100 cos(CLIP_image(g), CLIP_image(h)).
//!
//! Cosines are of the L2-normalised projected features, not clamped (a
//! negative score stays negative, unlike torchmetrics' CLIPScore).
//!
//! **Rank change** (Eq. 16, whose formula was lost from the paper's text;
//! its words: "emphasizes improvements for higher-ranked items by
//! diminishing the weight for lower-ranked ones; larger means more
//! personalized"): with r_o the rank of the original reference item among
//! the user's candidates and r_g the rank of the generated image put in its
//! place (1 = first; same ranker, same candidates),
//! `ΔR = (r_o - r_g) / log2(1 + r_o)`, averaged over users. Moving from 2nd
//! to 1st counts 0.63; from 100th to 99th, 0.15.

use crate::error::{Error, Result};

/// Cosine of two vectors, accumulated in f64 (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// `100 cos(a, b)`: CS, CIS and CPS.
pub fn clip_score(a: &[f32], b: &[f32]) -> Result<f64> {
    if a.len() != b.len() {
        return Err(Error::invalid_input(format!(
            "CLIP score of features of {} and {} values",
            a.len(),
            b.len()
        )));
    }
    Ok(100.0 * cosine(a, b))
}

/// The mean CLIP score of `generated` against each of `others`: CPIS (history
/// images) and the `history` variant of CPS (history texts).
pub fn mean_clip_score(generated: &[f32], others: &[Vec<f32>]) -> Result<f64> {
    if others.is_empty() {
        return Err(Error::invalid_input(
            "a mean CLIP score over no features (a user without history?)",
        ));
    }
    let mut sum = 0.0;
    for h in others {
        sum += clip_score(generated, h)?;
    }
    Ok(sum / others.len() as f64)
}

/// Eq. 16 for one user: `(r_o - r_g) / log2(1 + r_o)`, ranks from 1.
pub fn rank_change(original: usize, generated: usize) -> Result<f64> {
    if original == 0 || generated == 0 {
        return Err(Error::invalid_input("ranks start at 1"));
    }
    Ok((original as f64 - generated as f64) / (1.0 + original as f64).log2())
}

/// The 1-based rank of candidate `which` under `scores` (higher = better;
/// ties count against it: rank = 1 + number of candidates scoring at least
/// as high, other than itself).
pub fn rank_of(scores: &[f32], which: usize) -> usize {
    let s = scores[which];
    1 + scores
        .iter()
        .enumerate()
        .filter(|&(i, &v)| i != which && v >= s)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_by_hand() {
        assert!((clip_score(&[1.0, 0.0], &[1.0, 1.0]).unwrap() - 100.0 / 2f64.sqrt()).abs() < 1e-9);
        assert!((clip_score(&[1.0, 0.0], &[-2.0, 0.0]).unwrap() + 100.0).abs() < 1e-9);
        assert!(clip_score(&[1.0], &[1.0, 2.0]).is_err());
        let c = mean_clip_score(&[1.0, 0.0], &[vec![1.0, 0.0], vec![0.0, 1.0]]).unwrap();
        assert!((c - 50.0).abs() < 1e-9);
        assert!(mean_clip_score(&[1.0], &[]).is_err());
    }

    #[test]
    fn rank_change_weighs_top_ranks_more() {
        let top = rank_change(2, 1).unwrap();
        let low = rank_change(100, 99).unwrap();
        assert!((top - 1.0 / 3f64.log2()).abs() < 1e-12 && top > 4.0 * low);
        assert_eq!(rank_change(5, 5).unwrap(), 0.0);
        assert!(rank_change(1, 3).unwrap() < 0.0);
        assert!(rank_change(0, 1).is_err());
        assert_eq!(rank_of(&[0.5, 0.9, 0.5, 0.1], 0), 3, "a tie counts against");
        assert_eq!(rank_of(&[0.5, 0.9, 0.5, 0.1], 1), 1);
    }
}
