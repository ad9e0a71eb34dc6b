//! Mapper: the trainable part of RAGAR.
//!
//! `forward` is the Modal Mapper (GILL-style: Linear(d_llm -> 512), a 4+4
//! layer encoder-decoder transformer with 77 learned queries, Linear(512 ->
//! 768); Eq. 8) followed by the Balance Calibrator (cross-attention from the
//! multimodal feature to the keyword feature plus a residual; Eq. 9). Its
//! output, the general preference, conditions the Generator.
//!
//! Training needs autograd, which lives inside one framework, so the Mapper
//! owns its optimiser. The host runs the reflection module (Eq. 10-12): it
//! draws Gaussian perturbations of the general preference, generates an image
//! from each, ranks them with the Ranker, turns ranks into rewards, and hands
//! perturbations, rewards and the two targets to [`Mapper::train_step`],
//! which forms l1 * L_rank + l2 * L_cal + l3 * L_sem (Eq. 15) and steps.

use super::guard;
use crate::data::Tensor;
use crate::error::{Error, Result};
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RStr, RVec};
use abi_stable::StableAbi;

/// Shapes the mapper works with.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct MapperInfo {
    /// d_llm of the [IMG] hidden states.
    pub input_dim: u32,
    /// Number of [IMG] tokens expected.
    pub n_img_tokens: u32,
    /// Dimension of the keyword feature.
    pub keyword_dim: u32,
    /// Learned queries = output tokens (77 for SD 1.5).
    pub n_queries: u32,
    /// Output width (768 for SD 1.5).
    pub output_dim: u32,
}

/// One sample's inputs (Eq. 7 outputs plus the keyword feature).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct MapperInput {
    /// `[n_img, d_llm]` hidden states at the [IMG] tokens.
    pub img_states: Tensor,
    /// `[d_llm]` text-related embedding (concatenated in Eq. 8).
    pub text_embedding: Tensor,
    /// `[keyword_dim]` keyword feature from the text encoder (Eq. 9).
    pub keyword_feature: Tensor,
}

/// One sample's outputs.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct MapperOutput {
    /// `[n_queries, output_dim]` Modal Mapper output (Eq. 8), before calibration.
    pub mapped: Tensor,
    /// `[n_queries, output_dim]` general preference (Eq. 9).
    pub preference: Tensor,
}

/// One reflection sample handed to [`Mapper::train_step`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ReflectionSample {
    /// The inputs the general preference is computed from.
    pub input: MapperInput,
    /// `[n, n_queries, output_dim]` the standard-normal noises eps_i; the
    /// perturbed preferences were `preference + sigma * eps_i` (Eq. 11).
    pub noises: Tensor,
    /// `[n]` reward of each perturbation from its rank (Eq. 10-12).
    pub rewards: RVec<f32>,
    /// Retrieval-augmented preference (Eq. 5), target of the calibrator loss (Eq. 13).
    pub retrieval_preference: Tensor,
    /// Semantic features of the reference image, target of the semantic loss (Eq. 14).
    pub semantic_target: Tensor,
}

/// Loss weights and optimiser settings for one step.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct LossConfig {
    /// l1: weight of the rank (policy-gradient) loss.
    pub rank_weight: f32,
    /// l2: weight of the calibrator loss.
    pub calibrator_weight: f32,
    /// l3: weight of the semantic loss.
    pub semantic_weight: f32,
    /// Standard deviation of the Gaussian perturbations.
    pub sigma: f32,
    /// Margin subtracted from rewards (Eq. 12).
    pub margin: f32,
    /// Learning rate.
    pub lr: f32,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f32,
}

/// What one training step did.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TrainStats {
    /// Optimiser steps taken so far.
    pub step: u64,
    /// Weighted total (Eq. 15).
    pub loss: f32,
    /// Rank loss (Eq. 12).
    pub rank_loss: f32,
    /// Calibrator loss (Eq. 13).
    pub calibrator_loss: f32,
    /// Semantic loss (Eq. 14).
    pub semantic_loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

/// The mapper contract, implemented by plugins.
pub trait Mapper: Send + Sync + 'static {
    /// Shapes.
    fn info(&self) -> MapperInfo;
    /// Eq. 8-9 for each input.
    fn forward(&self, inputs: &[MapperInput]) -> Result<Vec<MapperOutput>>;
    /// One optimiser step on a batch of reflection samples (Eq. 11-15).
    fn train_step(&mut self, batch: &[ReflectionSample], cfg: &LossConfig) -> Result<TrainStats>;
    /// Write weights, optimiser state, step and RNG state to `path` (atomically).
    fn save(&self, path: &str) -> Result<()>;
    /// Read what [`Mapper::save`] wrote; a checkpoint of another configuration
    /// is an error naming the mismatched tensor.
    fn load(&mut self, path: &str) -> Result<()>;
}

/// FFI face of [`Mapper`].
#[sabi_trait]
pub trait FfiMapper: Send + Sync {
    /// See [`Mapper::info`].
    fn info(&self) -> RResult<MapperInfo, Error>;
    /// See [`Mapper::forward`].
    fn forward(&self, inputs: RSlice<'_, MapperInput>) -> RResult<RVec<MapperOutput>, Error>;
    /// See [`Mapper::train_step`].
    fn train_step(&mut self, batch: RSlice<'_, ReflectionSample>, cfg: &LossConfig) -> RResult<TrainStats, Error>;
    /// See [`Mapper::save`].
    fn save(&self, path: RStr<'_>) -> RResult<(), Error>;
    /// See [`Mapper::load`].
    #[sabi(last_prefix_field)]
    fn load(&mut self, path: RStr<'_>) -> RResult<(), Error>;
}

/// A mapper behind the FFI boundary.
pub type MapperBox = FfiMapper_TO<'static, RBox<()>>;

struct Guarded<T>(T);

impl<T: Mapper> FfiMapper for Guarded<T> {
    fn info(&self) -> RResult<MapperInfo, Error> {
        guard(|| Ok(self.0.info()))
    }
    fn forward(&self, inputs: RSlice<'_, MapperInput>) -> RResult<RVec<MapperOutput>, Error> {
        guard(|| self.0.forward(inputs.as_slice()).map(RVec::from))
    }
    fn train_step(&mut self, batch: RSlice<'_, ReflectionSample>, cfg: &LossConfig) -> RResult<TrainStats, Error> {
        guard(|| self.0.train_step(batch.as_slice(), cfg))
    }
    fn save(&self, path: RStr<'_>) -> RResult<(), Error> {
        guard(|| self.0.save(path.as_str()))
    }
    fn load(&mut self, path: RStr<'_>) -> RResult<(), Error> {
        guard(|| self.0.load(path.as_str()))
    }
}

/// Put a [`Mapper`] behind the FFI boundary.
pub fn boxed<T: Mapper>(m: T) -> MapperBox {
    FfiMapper_TO::from_value(Guarded(m), abi_stable::sabi_trait::TD_Opaque)
}

/// The host's handle to a mapper from any plugin.
pub struct DynMapper {
    inner: MapperBox,
    info: MapperInfo,
}

impl DynMapper {
    /// Wrap a boxed mapper, asking it for its info once.
    pub fn new(inner: MapperBox) -> Result<Self> {
        let info = inner.info().into_result()?;
        Ok(DynMapper { inner, info })
    }
    /// Shapes.
    pub fn info(&self) -> &MapperInfo {
        &self.info
    }
    /// See [`Mapper::forward`].
    pub fn forward(&self, inputs: &[MapperInput]) -> Result<Vec<MapperOutput>> {
        let out = self.inner.forward(inputs.into()).into_result()?;
        if out.len() != inputs.len() {
            return Err(Error::model(format!(
                "mapper returned {} outputs for {} inputs",
                out.len(),
                inputs.len()
            )));
        }
        Ok(out.into_vec())
    }
    /// See [`Mapper::train_step`].
    pub fn train_step(&mut self, batch: &[ReflectionSample], cfg: &LossConfig) -> Result<TrainStats> {
        self.inner.train_step(batch.into(), cfg).into_result()
    }
    /// See [`Mapper::save`].
    pub fn save(&self, path: &str) -> Result<()> {
        self.inner.save(path.into()).into_result()
    }
    /// See [`Mapper::load`].
    pub fn load(&mut self, path: &str) -> Result<()> {
        self.inner.load(path.into()).into_result()
    }
}
