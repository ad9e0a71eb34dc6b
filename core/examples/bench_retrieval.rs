//! Throughput of the Retrieval module (Eq. 2-5) with cached features, on a
//! POG-sized synthetic set: 19,000 items (512-d caption embeddings, 768-d
//! visual features), 1,000 users with 20 history items and a reference
//! each, k = 5. Reports users/s and history items/s (similarity, top-k and
//! weighted fusion), best of 5 passes.
//!
//! cargo run -p ragar-core --example bench_retrieval   (ragar-core builds at opt-level 3 in every profile)

use ragar_core::retrieval::{fuse, retrieve, RetrievalConfig};
use ragar_core::rng::TorchGenerator;
use std::time::Instant;

fn main() {
    let (n_items, n_users, hist, dt, dv) = (19_000usize, 1_000usize, 20usize, 512usize, 768usize);
    let mut g = TorchGenerator::new(0);
    let text: Vec<Vec<f32>> = (0..n_items).map(|_| g.randn(dt).unwrap()).collect();
    let visual: Vec<Vec<f32>> = (0..n_items).map(|_| g.randn(dv).unwrap()).collect();
    let users: Vec<(usize, Vec<usize>)> = (0..n_users)
        .map(|_| {
            let r = g.next_u32() as usize % n_items;
            (r, (0..hist).map(|_| g.next_u32() as usize % n_items).collect())
        })
        .collect();
    let cfg = RetrievalConfig::default();
    let mut best = f64::INFINITY;
    let mut check = 0f32;
    for _ in 0..5 {
        let t = Instant::now();
        for (r, h) in &users {
            let hist_t: Vec<Vec<f32>> = h.iter().map(|&i| text[i].clone()).collect();
            let hist_v: Vec<Vec<f32>> = h.iter().map(|&i| visual[i].clone()).collect();
            let got = retrieve(&text[*r], &hist_t, &cfg).unwrap();
            check += fuse(&got, &hist_v).unwrap().unwrap()[0];
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "retrieval (k = 5, {hist} history items, {dt}-d captions, {dv}-d visual): {:.0} users/s, {:.0} items/s (checksum {check:.3})",
        n_users as f64 / best,
        (n_users * hist) as f64 / best
    );
}
