//! Side by side: candle's CPU matmul / conv2d against ragar-candle's packed
//! weights ([`ragar_candle::linear`], [`ragar_candle::conv`]) on the shapes
//! the models run, in one process. Prints the median of `REPS` timings of
//! each and the ratio.
//!
//!     cargo run --release -p ragar-candle --example packed_matmul

use candle_core::{Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use std::time::Instant;

const REPS: usize = 7;

/// Median seconds per call of `f`, over `REPS` runs of `iters` calls.
fn median(iters: usize, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        t.push(start.elapsed().as_secs_f64() / iters as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[REPS / 2])
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!("| linear (rows m, in k -> out n) | candle us | packed us | ratio |\n|---|---:|---:|---:|");
    // An LLM decode step (SmolLM2 MLP, its 49k output head), BLIP's beams,
    // a prompt, a MiniLM batch, SD's attention projections at 64 x 64.
    for &(m, k, n, what) in &[
        (1, 576, 1536, "decode step"),
        (1, 576, 49152, "LM head"),
        (4, 768, 768, "4 beams"),
        (50, 576, 1536, "prompt"),
        (12, 384, 384, "MiniLM b1"),
        (12, 1536, 384, "MiniLM b1"),
        (128, 384, 1536, "MiniLM b8"),
        (4096, 320, 320, "SD attention"),
    ] {
        let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let ours = ragar_candle::linear::Linear::new(w.clone(), None);
        let iters = (2e8 / (m * n * k) as f64).clamp(3.0, 500.0) as usize;
        let a = median(iters, || x.matmul(&w.t()?))?;
        let b = median(iters, || ours.forward(&x))?;
        println!(
            "| {m} x {k} -> {n} ({what}) | {:.1} | {:.1} | {:.2}x |",
            a * 1e6,
            b * 1e6,
            a / b
        );
    }
    println!("\n| conv2d (batch, c_in, side -> c_out, kernel / stride) | candle us | packed us | ratio |\n|---|---:|---:|---:|");
    for &(b, ci, side, co, k, stride, pad) in &[
        (1, 320, 64, 320, 3, 1, 1),
        (8, 4, 8, 32, 3, 1, 1),
        (8, 3, 224, 768, 32, 32, 0),
    ] {
        let x = Tensor::randn(0f32, 1., (b, ci, side, side), &dev)?;
        let w = Tensor::randn(0f32, 1., (co, ci, k, k), &dev)?;
        let cfg = Conv2dConfig {
            padding: pad,
            stride,
            ..Default::default()
        };
        let theirs = candle_nn::Conv2d::new(w.clone(), None, cfg);
        let ours = ragar_candle::conv::Conv2d::new(w, None, cfg);
        let flops = b * co * ci * k * k * (side / stride) * (side / stride);
        let iters = (2e8 / flops as f64).clamp(3.0, 500.0) as usize;
        let a = median(iters, || theirs.forward(&x))?;
        let c = median(iters, || ours.forward(&x))?;
        println!(
            "| {b}, {ci}, {side} -> {co}, {k} / {stride} | {:.1} | {:.1} | {:.2}x |",
            a * 1e6,
            c * 1e6,
            a / c
        );
    }
    Ok(())
}
