//! Generator: conditioning -> image. In RAGAR a Stable Diffusion 1.5 model
//! conditioned on the general preference (the Balance Calibrator's output,
//! Eq. 9, shaped like CLIP text-encoder output: 77 x 768); baselines condition
//! it on plain text instead.

use super::guard;
use crate::data::{Image, Tensor};
use crate::error::{Error, Result};
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RString, RVec};
use abi_stable::StableAbi;

/// What a generator accepts.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct GeneratorInfo {
    /// Shape of embedding conditioning, e.g. `[77, 768]`.
    pub embedding_shape: RVec<u64>,
    /// Whether text prompts are accepted.
    pub accepts_text: bool,
    /// Whether prompt embeddings are accepted.
    pub accepts_embeddings: bool,
}

/// What an image is generated from.
#[repr(u8)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub enum Conditioning {
    /// A text prompt, encoded by the generator's own text encoder.
    Text(RString),
    /// Prompt embeddings of [`GeneratorInfo::embedding_shape`].
    Embeddings(Tensor),
}

/// One image to generate.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// Positive conditioning.
    pub cond: Conditioning,
    /// Negative conditioning for classifier-free guidance (empty prompt if none).
    pub negative: ROption<Conditioning>,
    /// Seed of the initial noise, drawn on the CPU so a seed gives the same
    /// image on any device.
    pub seed: u64,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale (1 = off).
    pub guidance: f32,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
}

/// The generator contract, implemented by plugins.
pub trait Generator: Send + Sync + 'static {
    /// What it accepts.
    fn info(&self) -> GeneratorInfo;
    /// One image per request, in order.
    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Image>>;
}

/// FFI face of [`Generator`].
#[sabi_trait]
pub trait FfiGenerator: Send + Sync {
    /// See [`Generator::info`].
    fn info(&self) -> RResult<GeneratorInfo, Error>;
    /// See [`Generator::generate`].
    #[sabi(last_prefix_field)]
    fn generate(&self, requests: RSlice<'_, GenerationRequest>) -> RResult<RVec<Image>, Error>;
}

/// A generator behind the FFI boundary.
pub type GeneratorBox = FfiGenerator_TO<'static, RBox<()>>;

struct Guarded<T>(T);

impl<T: Generator> FfiGenerator for Guarded<T> {
    fn info(&self) -> RResult<GeneratorInfo, Error> {
        guard(|| Ok(self.0.info()))
    }
    fn generate(&self, requests: RSlice<'_, GenerationRequest>) -> RResult<RVec<Image>, Error> {
        guard(|| self.0.generate(requests.as_slice()).map(RVec::from))
    }
}

/// Put a [`Generator`] behind the FFI boundary.
pub fn boxed<T: Generator>(g: T) -> GeneratorBox {
    FfiGenerator_TO::from_value(Guarded(g), abi_stable::sabi_trait::TD_Opaque)
}

/// The host's handle to a generator from any plugin.
pub struct DynGenerator {
    inner: GeneratorBox,
    info: GeneratorInfo,
}

impl DynGenerator {
    /// Wrap a boxed generator, asking it for its info once.
    pub fn new(inner: GeneratorBox) -> Result<Self> {
        let info = inner.info().into_result()?;
        Ok(DynGenerator { inner, info })
    }
    /// What it accepts.
    pub fn info(&self) -> &GeneratorInfo {
        &self.info
    }
    /// See [`Generator::generate`]; embedding shapes are checked first.
    pub fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Image>> {
        for (i, r) in requests.iter().enumerate() {
            for c in std::iter::once(&r.cond).chain(r.negative.as_ref().into_option()) {
                if let Conditioning::Embeddings(t) = c {
                    if t.shape != self.info.embedding_shape {
                        return Err(Error::invalid_input(format!(
                            "request {i}: prompt embeddings of shape {:?}, the generator expects {:?}",
                            t.dims(),
                            self.info.embedding_shape.as_slice()
                        )));
                    }
                }
            }
        }
        let out = self.inner.generate(requests.into()).into_result()?;
        if out.len() != requests.len() {
            return Err(Error::model(format!(
                "generator returned {} images for {} requests",
                out.len(),
                requests.len()
            )));
        }
        Ok(out.into_vec())
    }
}
