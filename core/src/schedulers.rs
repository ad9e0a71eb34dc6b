//! Diffusion samplers for the Generator stage, framework-free so that the
//! candle, ONNX Runtime and libtorch generators share one implementation:
//! they run the denoiser, these run the loop arithmetic.
//!
//! Reference implementation: diffusers' `DDIMScheduler`,
//! `EulerAncestralDiscreteScheduler` and `DPMSolverMultistepScheduler`
//! (DPM-Solver++ 2M, midpoint), with Stable Diffusion 1.5's noise schedule
//! (scaled-linear betas 0.00085..0.012 over 1,000 steps, `steps_offset` 1,
//! epsilon prediction) and each scheduler's default timestep spacing.
//! Samples are flat f32 slices (any shape); the caller supplies every random
//! number (initial latents and Euler-ancestral's per-step noise), drawn on
//! the CPU from the request's seed, so a seed gives the same image anywhere.

use crate::error::{Error, Result};

/// The training noise schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleConfig {
    /// Training steps (1,000 for SD).
    pub num_train_timesteps: usize,
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// `scaled_linear` (SD) or `linear`.
    pub scaled_linear: bool,
    /// Offset added to "leading" timesteps (1 for SD 1.5).
    pub steps_offset: usize,
    /// The denoiser predicts v instead of epsilon (SD 2.x 768 px).
    pub v_prediction: bool,
}

impl Default for ScheduleConfig {
    /// Stable Diffusion 1.5's schedule.
    fn default() -> Self {
        ScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            scaled_linear: true,
            steps_offset: 1,
            v_prediction: false,
        }
    }
}

impl ScheduleConfig {
    /// Cumulative products of alphas, as diffusers computes them.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let lin = |a: f64, b: f64, i: usize| {
            if n == 1 {
                a
            } else {
                a + (b - a) * i as f64 / (n - 1) as f64
            }
        };
        let mut acc = 1.0;
        (0..n)
            .map(|i| {
                let beta = if self.scaled_linear {
                    lin(self.beta_start.sqrt(), self.beta_end.sqrt(), i).powi(2)
                } else {
                    lin(self.beta_start, self.beta_end, i)
                };
                acc *= 1.0 - beta;
                acc
            })
            .collect()
    }
}

/// Which sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    /// DDIM, eta = 0 (deterministic).
    Ddim,
    /// Euler ancestral (needs fresh noise each step).
    EulerAncestral,
    /// DPM-Solver++ 2M (multistep, deterministic).
    DpmSolverPP,
}

impl SchedulerKind {
    /// Parse `ddim`, `euler-a` / `euler_ancestral`, `dpm++` / `dpmsolver++`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ddim" => Ok(SchedulerKind::Ddim),
            "euler-a" | "euler_a" | "euler_ancestral" => Ok(SchedulerKind::EulerAncestral),
            "dpm++" | "dpmsolver++" | "dpm-solver++" | "dpmpp-2m" => Ok(SchedulerKind::DpmSolverPP),
            _ => Err(Error::config(format!("unknown scheduler '{s}' (ddim, euler-a, dpm++)"))),
        }
    }
}

/// A sampler's loop arithmetic.
pub trait Scheduler: Send {
    /// The timesteps the denoiser is called at, first to last.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial Gaussian latents.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// What to feed the denoiser at step `i` (unchanged unless the sampler scales it).
    fn scale_model_input(&self, sample: &[f32], i: usize) -> Vec<f32> {
        let _ = i;
        sample.to_vec()
    }
    /// Whether [`Scheduler::step`] needs a noise slice.
    fn needs_noise(&self) -> bool {
        false
    }
    /// The sample after step `i`, given the denoiser's output.
    fn step(&mut self, model_output: &[f32], i: usize, sample: &[f32], noise: Option<&[f32]>) -> Result<Vec<f32>>;
}

/// Build a sampler for `steps` denoising steps.
pub fn build(kind: SchedulerKind, cfg: &ScheduleConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    if steps == 0 || steps > cfg.num_train_timesteps {
        return Err(Error::invalid_input(format!(
            "steps must be in 1..={}, got {steps}",
            cfg.num_train_timesteps
        )));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::new(cfg, steps)),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestral::new(cfg, steps)),
        SchedulerKind::DpmSolverPP => Box::new(DpmSolverPP::new(cfg, steps)),
    })
}

/// numpy's `interp` over integer knots 0..len.
fn interp(x: f64, ys: &[f64]) -> f64 {
    let i = (x.floor() as usize).min(ys.len() - 1);
    let frac = x - i as f64;
    if i + 1 < ys.len() {
        ys[i] * (1.0 - frac) + ys[i + 1] * frac
    } else {
        ys[i]
    }
}

fn sigmas_from(acp: &[f64]) -> Vec<f64> {
    acp.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

fn check_len(a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        return Err(Error::invalid_input(format!(
            "scheduler: model output has {} values, sample {}",
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

/// DDIM with eta = 0, "leading" timesteps.
struct Ddim {
    acp: Vec<f64>,
    timesteps: Vec<f64>,
    step_ratio: usize,
    v_prediction: bool,
}

impl Ddim {
    fn new(cfg: &ScheduleConfig, steps: usize) -> Self {
        let step_ratio = cfg.num_train_timesteps / steps;
        let timesteps = (0..steps)
            .rev()
            .map(|i| (i * step_ratio + cfg.steps_offset) as f64)
            .collect();
        Ddim {
            acp: cfg.alphas_cumprod(),
            timesteps,
            step_ratio,
            v_prediction: cfg.v_prediction,
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn step(&mut self, out: &[f32], i: usize, sample: &[f32], _noise: Option<&[f32]>) -> Result<Vec<f32>> {
        check_len(out, sample)?;
        let t = self.timesteps[i] as usize;
        let a_t = self.acp[t];
        // set_alpha_to_one = false: the step past the end uses alphas_cumprod[0].
        let a_prev = t.checked_sub(self.step_ratio).map_or(self.acp[0], |p| self.acp[p]);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        Ok(out
            .iter()
            .zip(sample)
            .map(|(&o, &x)| {
                let (o, x) = (o as f64, x as f64);
                let (x0, eps) = if self.v_prediction {
                    (sa * x - sb * o, sa * o + sb * x)
                } else {
                    ((x - sb * o) / sa, o)
                };
                (a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps) as f32
            })
            .collect())
    }
}

/// Euler ancestral, "linspace" timesteps, sigmas interpolated in t.
struct EulerAncestral {
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    v_prediction: bool,
}

impl EulerAncestral {
    fn new(cfg: &ScheduleConfig, steps: usize) -> Self {
        let n = cfg.num_train_timesteps;
        let timesteps: Vec<f64> = (0..steps)
            .rev()
            .map(|i| {
                if steps == 1 {
                    0.0
                } else {
                    (n - 1) as f64 * i as f64 / (steps - 1) as f64
                }
            })
            .collect();
        let table = sigmas_from(&cfg.alphas_cumprod());
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
        sigmas.push(0.0);
        EulerAncestral {
            sigmas,
            timesteps,
            v_prediction: cfg.v_prediction,
        }
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        // diffusers: the largest sigma itself for "linspace" (and
        // "trailing") spacing; (max sigma^2 + 1)^0.5 only for "leading".
        self.sigmas[0]
    }
    fn scale_model_input(&self, sample: &[f32], i: usize) -> Vec<f32> {
        let s = (self.sigmas[i].powi(2) + 1.0).sqrt();
        sample.iter().map(|&x| (x as f64 / s) as f32).collect()
    }
    fn needs_noise(&self) -> bool {
        true
    }
    fn step(&mut self, out: &[f32], i: usize, sample: &[f32], noise: Option<&[f32]>) -> Result<Vec<f32>> {
        check_len(out, sample)?;
        let noise = noise.ok_or_else(|| Error::invalid_input("euler-a needs noise for every step"))?;
        check_len(noise, sample)?;
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let up = (to.powi(2) * (from.powi(2) - to.powi(2)) / from.powi(2)).sqrt();
        let down = (to.powi(2) - up.powi(2)).sqrt();
        let c = (from.powi(2) + 1.0).sqrt();
        Ok(out
            .iter()
            .zip(sample)
            .zip(noise)
            .map(|((&o, &x), &z)| {
                let (o, x) = (o as f64, x as f64);
                let x0 = if self.v_prediction {
                    o * (-from / c) + x / (from.powi(2) + 1.0)
                } else {
                    x - from * o
                };
                let derivative = (x - x0) / from;
                (x + derivative * (down - from) + z as f64 * up) as f32
            })
            .collect())
    }
}

/// DPM-Solver++ 2M (midpoint), "linspace" timesteps, final sigma 0, first
/// order at the first and last steps.
struct DpmSolverPP {
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    previous: Option<Vec<f64>>,
    v_prediction: bool,
}

impl DpmSolverPP {
    fn new(cfg: &ScheduleConfig, steps: usize) -> Self {
        let n = cfg.num_train_timesteps;
        // linspace(0, n - 1, steps + 1).round()[::-1][:-1]
        let timesteps: Vec<f64> = (1..=steps)
            .rev()
            .map(|i| ((n - 1) as f64 * i as f64 / steps as f64).round_ties_even())
            .collect();
        let table = sigmas_from(&cfg.alphas_cumprod());
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
        sigmas.push(0.0);
        DpmSolverPP {
            sigmas,
            timesteps,
            previous: None,
            v_prediction: cfg.v_prediction,
        }
    }

    fn alpha_sigma(sigma: f64) -> (f64, f64) {
        let a = 1.0 / (sigma * sigma + 1.0).sqrt();
        (a, sigma * a)
    }
}

impl Scheduler for DpmSolverPP {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn step(&mut self, out: &[f32], i: usize, sample: &[f32], _noise: Option<&[f32]>) -> Result<Vec<f32>> {
        check_len(out, sample)?;
        let n = self.timesteps.len();
        let (a_s0, s_s0) = Self::alpha_sigma(self.sigmas[i]);
        // The data prediction x0 the solver integrates.
        let x0: Vec<f64> = out
            .iter()
            .zip(sample)
            .map(|(&o, &x)| {
                if self.v_prediction {
                    a_s0 * x as f64 - s_s0 * o as f64
                } else {
                    (x as f64 - s_s0 * o as f64) / a_s0
                }
            })
            .collect();
        let (a_t, s_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let h = lambda(a_t, s_t) - lambda(a_s0, s_s0);
        let e = (-h).exp() - 1.0;
        // First order at the first step (no history) and the last (sigma 0).
        let history = self.previous.as_ref().filter(|_| i + 1 < n);
        let result: Vec<f32> = match history {
            Some(m1) => {
                let (a_s1, s_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
                let h0 = lambda(a_s0, s_s0) - lambda(a_s1, s_s1);
                let r0 = h0 / h;
                x0.iter()
                    .zip(m1)
                    .zip(sample)
                    .map(|((&d0, &prev), &x)| {
                        let d1 = (d0 - prev) / r0;
                        ((s_t / s_s0) * x as f64 - a_t * e * d0 - 0.5 * a_t * e * d1) as f32
                    })
                    .collect()
            }
            None => x0
                .iter()
                .zip(sample)
                .map(|(&d0, &x)| ((s_t / s_s0) * x as f64 - a_t * e * d0) as f32)
                .collect(),
        };
        self.previous = Some(x0);
        Ok(result)
    }
}
