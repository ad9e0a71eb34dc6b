//! The paper's evaluation metrics, framework-free.
//!
//! - [`ranking`]: Recall@k and NDCG@k of a recommender on held-out
//!   interactions (Table 4), and the popularity and random reference
//!   rankers every recommendation result is read against.

pub mod ranking;
