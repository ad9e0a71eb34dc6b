//! PyTorch's CPU random numbers, reproduced: `torch.Generator().manual_seed(s)`
//! followed by `torch.randn(shape, generator=g)` (float32) gives exactly the
//! values [`TorchGenerator::randn`] gives. The Generator stage draws its
//! initial latents and Euler-ancestral noise here, on the CPU whatever the
//! device, so a seed gives the same image on every backend and device, and
//! the same image as diffusers given `generator=torch.Generator().manual_seed(seed)`.
//!
//! Reference implementation: ATen's `CPUGeneratorImpl` (a standard MT19937
//! seeded with the low 32 bits) and `normal_fill` in
//! `aten/src/ATen/native/cpu/DistributionTemplates.h`: for float tensors of
//! at least 16 elements, every element first gets a uniform
//! `(u32 & (2^24 - 1)) / 2^24`, then each block of 16 is turned into normals
//! by Box-Muller pairing element j with element j + 8; when the length is not
//! a multiple of 16, the last 16 elements are drawn afresh and transformed
//! again. (Vectorised builds compute log/sin/cos with SLEEF: results can then
//! differ from these in the last bit.)

use crate::error::{Error, Result};

const N: usize = 624;
const M: usize = 397;

/// MT19937 with PyTorch's seeding and float sampling.
#[derive(Clone)]
pub struct TorchGenerator {
    state: Box<[u32; N]>,
    index: usize,
}

impl TorchGenerator {
    /// `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        TorchGenerator { state, index: N }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % N] & LOWER);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 == 1 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// The next 32-bit output (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Shuffle `v` in place (Fisher-Yates, last position first), reproducibly.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.next_u32() as usize % (i + 1));
        }
    }

    /// A float uniform in [0, 1) with 24 random bits, as ATen draws it.
    fn uniform(&mut self) -> f32 {
        ((self.next_u32() & 0x00ff_ffff) as f64 / (1u64 << 24) as f64) as f32
    }

    /// `torch.rand(n, generator=g)` in float32: uniforms in [0, 1).
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }

    /// `torch.randn(n, generator=g)` in float32, `n >= 16` (every latent
    /// tensor is; smaller tensors take ATen's other, scalar path).
    pub fn randn(&mut self, n: usize) -> Result<Vec<f32>> {
        if n < 16 {
            return Err(Error::invalid_input(format!(
                "Gaussian noise of {n} values: at least 16 are needed to follow torch.randn's float path"
            )));
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform();
            }
            box_muller_16(tail);
        }
        Ok(data)
    }
}

/// ATen's `normal_fill_16` with mean 0 and std 1 (single precision, as there).
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI) as f32 * u2;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_standard_sequence() {
        // std::mt19937 with the default seed 5489: its 10,000th output is
        // 4123659995 (C++ standard, [rand.predef]).
        let mut g = TorchGenerator::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn too_short_is_an_error() {
        assert!(TorchGenerator::new(0).randn(8).is_err());
    }
}
