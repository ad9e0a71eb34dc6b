//! Captioner: image -> caption, the first step of the retrieval module (Eq. 2:
//! each history item's image is captioned, e.g. by BLIP-2, before encoding).

use super::guard;
use crate::data::Image;
use crate::error::{Error, Result};
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RString, RVec};
use abi_stable::StableAbi;

/// Decoding options for a caption.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct CaptionOptions {
    /// Most new tokens per caption.
    pub max_tokens: u32,
    /// Beam width; 1 means greedy decoding.
    pub beams: u32,
    /// Optional text prefix (conditional captioning, e.g. "a picture of").
    pub prompt: RString,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions {
            max_tokens: 30,
            beams: 1,
            prompt: RString::new(),
        }
    }
}

/// The captioner contract, implemented by plugins.
pub trait Captioner: Send + Sync + 'static {
    /// One caption per image, in order.
    fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>>;
}

/// FFI face of [`Captioner`].
#[sabi_trait]
pub trait FfiCaptioner: Send + Sync {
    /// See [`Captioner::caption`].
    #[sabi(last_prefix_field)]
    fn caption(&self, images: RSlice<'_, Image>, opts: &CaptionOptions) -> RResult<RVec<RString>, Error>;
}

/// A captioner behind the FFI boundary.
pub type CaptionerBox = FfiCaptioner_TO<'static, RBox<()>>;

struct Guarded<T>(T);

impl<T: Captioner> FfiCaptioner for Guarded<T> {
    fn caption(&self, images: RSlice<'_, Image>, opts: &CaptionOptions) -> RResult<RVec<RString>, Error> {
        guard(|| {
            Ok(self
                .0
                .caption(images.as_slice(), opts)?
                .into_iter()
                .map(RString::from)
                .collect())
        })
    }
}

/// Put a [`Captioner`] behind the FFI boundary.
pub fn boxed<T: Captioner>(c: T) -> CaptionerBox {
    FfiCaptioner_TO::from_value(Guarded(c), abi_stable::sabi_trait::TD_Opaque)
}

/// The host's handle to a captioner from any plugin.
pub struct DynCaptioner(pub CaptionerBox);

impl DynCaptioner {
    /// See [`Captioner::caption`]; checks one caption per image.
    pub fn caption(&self, images: &[Image], opts: &CaptionOptions) -> Result<Vec<String>> {
        let out = self.0.caption(images.into(), opts).into_result()?;
        if out.len() != images.len() {
            return Err(Error::model(format!(
                "captioner returned {} captions for {} images",
                out.len(),
                images.len()
            )));
        }
        Ok(out.into_iter().map(|s| s.into_string()).collect())
    }
}
