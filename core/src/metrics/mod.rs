//! The paper's evaluation metrics, framework-free.
//!
//! - [`ranking`]: Recall@k and NDCG@k of a recommender on held-out
//!   interactions (Table 4), and the popularity and random reference
//!   rankers every recommendation result is read against;
//! - [`scores`]: CS, CIS, CPS, CPIS (CLIP cosines) and the rank change of
//!   Eq. 16;
//! - [`ssim`]: structural similarity, scikit-image's Gaussian variant;
//! - [`latency`]: latency percentiles and throughput for benchmarks.
//!
//! LPIPS needs a network and lives with the backends (`ragar_candle::lpips`).

pub mod latency;
pub mod ranking;
pub mod scores;
pub mod ssim;
