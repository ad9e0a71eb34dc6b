//! Encoder: text -> vector and/or image -> vector.
//!
//! Used for the caption embeddings of the retrieval module (Eq. 2), the
//! visual features fused by it (Eq. 4-5), the keyword feature of the Balance
//! Calibrator (Eq. 9) and the CLIP-based metrics (CS, CIS, CPS, CPIS).

use super::{guard, owned, strings};
use crate::data::{Image, Tensor};
use crate::error::{Error, Result};
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RString, RVec};
use abi_stable::StableAbi;

/// What an encoder produces.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct EncoderInfo {
    /// Output dimension.
    pub dim: u32,
    /// Whether [`Encoder::embed_text`] is implemented.
    pub text: bool,
    /// Whether [`Encoder::embed_image`] is implemented.
    pub image: bool,
    /// Longest text in tokens (special tokens included); longer ones are truncated.
    pub max_tokens: u32,
    /// Whether output vectors are L2-normalised.
    pub normalized: bool,
}

/// Text embeddings and which inputs had to be truncated.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TextEmbeddings {
    /// `[n, dim]` f32, one row per input text, in order.
    pub vectors: Tensor,
    /// Indices of inputs longer than `max_tokens`, embedded from their prefix.
    pub truncated: RVec<u32>,
}

/// The encoder contract, implemented by plugins.
///
/// An empty string is a valid text: it is embedded like any other (for BERT-
/// style models that is `[CLS] [SEP]`), so the output always has one row per
/// input.
pub trait Encoder: Send + Sync + 'static {
    /// Dimensions and capabilities.
    fn info(&self) -> EncoderInfo;
    /// Embed a batch of texts into `[texts.len(), dim]`.
    fn embed_text(&self, texts: &[String]) -> Result<TextEmbeddings>;
    /// Embed a batch of images into `[images.len(), dim]`.
    fn embed_image(&self, images: &[Image]) -> Result<Tensor> {
        let _ = images;
        Err(Error::unsupported("this encoder does not embed images"))
    }
}

/// FFI face of [`Encoder`].
#[sabi_trait]
pub trait FfiEncoder: Send + Sync {
    /// See [`Encoder::info`].
    fn info(&self) -> RResult<EncoderInfo, Error>;
    /// See [`Encoder::embed_text`].
    fn embed_text(&self, texts: RSlice<'_, RString>) -> RResult<TextEmbeddings, Error>;
    /// See [`Encoder::embed_image`].
    #[sabi(last_prefix_field)]
    fn embed_image(&self, images: RSlice<'_, Image>) -> RResult<Tensor, Error>;
}

/// An encoder behind the FFI boundary.
pub type EncoderBox = FfiEncoder_TO<'static, RBox<()>>;

struct Guarded<T>(T);

impl<T: Encoder> FfiEncoder for Guarded<T> {
    fn info(&self) -> RResult<EncoderInfo, Error> {
        guard(|| Ok(self.0.info()))
    }
    fn embed_text(&self, texts: RSlice<'_, RString>) -> RResult<TextEmbeddings, Error> {
        guard(|| self.0.embed_text(&owned(texts)))
    }
    fn embed_image(&self, images: RSlice<'_, Image>) -> RResult<Tensor, Error> {
        guard(|| self.0.embed_image(images.as_slice()))
    }
}

/// Put an [`Encoder`] behind the FFI boundary.
pub fn boxed<T: Encoder>(encoder: T) -> EncoderBox {
    FfiEncoder_TO::from_value(Guarded(encoder), abi_stable::sabi_trait::TD_Opaque)
}

/// The host's handle to an encoder from any plugin.
pub struct DynEncoder {
    inner: EncoderBox,
    info: EncoderInfo,
}

impl DynEncoder {
    /// Wrap a boxed encoder, asking it for its info once.
    pub fn new(inner: EncoderBox) -> Result<Self> {
        let info = inner.info().into_result()?;
        Ok(DynEncoder { inner, info })
    }
    /// Dimensions and capabilities.
    pub fn info(&self) -> &EncoderInfo {
        &self.info
    }
    /// Embed texts; see [`Encoder::embed_text`].
    pub fn embed_text(&self, texts: &[String]) -> Result<TextEmbeddings> {
        let out = self.inner.embed_text(strings(texts).as_slice().into()).into_result()?;
        check_rows(&out.vectors, texts.len(), self.info.dim)?;
        Ok(out)
    }
    /// Embed images; see [`Encoder::embed_image`].
    pub fn embed_image(&self, images: &[Image]) -> Result<Tensor> {
        let out = self.inner.embed_image(images.into()).into_result()?;
        check_rows(&out, images.len(), self.info.dim)?;
        Ok(out)
    }
}

/// A plugin that returns the wrong shape is a plugin bug; say so at the boundary.
fn check_rows(t: &Tensor, n: usize, dim: u32) -> Result<()> {
    let want = [n, dim as usize];
    if t.dims() != want {
        return Err(Error::model(format!(
            "encoder returned shape {:?}, expected {want:?}",
            t.dims()
        )));
    }
    Ok(())
}
