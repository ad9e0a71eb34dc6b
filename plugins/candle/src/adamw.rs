//! `torch.optim.AdamW` (with `torch.nn.utils.clip_grad_norm_` first), the
//! optimiser of every trainable ragar-candle component, replayed exactly so
//! that training matches PyTorch step for step and checkpoints resume
//! bit-exactly (the moments and the step count are saved with the weights).
//! Weight decay 0 gives Adam.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::BTreeMap;

/// Hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// (beta1, beta2).
    pub betas: (f64, f64),
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// Optimiser state.
#[derive(Clone, Default)]
pub struct AdamW {
    /// First and second moments by parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// Clip the global gradient norm to `clip` (0 = off), then update
    /// `vars` in place; returns the norm before clipping. A parameter the
    /// loss does not reach steps with a zero gradient.
    pub fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
        clip: f64,
        c: &AdamWConfig,
    ) -> Result<f64> {
        let mut sq = 0f64;
        let mut gs = Vec::with_capacity(vars.len());
        for (_, var) in vars {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            gs.push(g);
        }
        let norm = sq.sqrt();
        let scale = if clip > 0.0 {
            (clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.step += 1;
        let (b1, b2) = c.betas;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for ((name, var), g) in vars.iter().zip(gs) {
            let g = (g * scale)?;
            let (m, v) = match self.moments.remove(name) {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            var.set(&(decayed - ((&m / &denom)? * (lr / bc1))?)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(norm)
    }
}
