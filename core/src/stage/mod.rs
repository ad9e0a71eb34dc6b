//! The six stage contracts.
//!
//! Each stage has three faces:
//! - a plain Rust trait (`Encoder`, ...) that plugin authors implement with
//!   ordinary slices, `String`s and [`Result`](crate::Result);
//! - an FFI-stable `#[sabi_trait]` (`FfiEncoder`) whose trait object
//!   (`EncoderBox`) is what actually crosses a plugin boundary, static or
//!   dynamic: every call through it runs under [`guard`], so a panic in a
//!   plugin becomes an [`ErrorKind::Panic`](crate::ErrorKind::Panic) value;
//! - a host-side handle (`DynEncoder`) that converts back to plain types.
//!
//! Methods are batch-first (they take slices) so a backend can batch.
//! The `#[sabi(last_prefix_field)]` marks let later versions append methods
//! without breaking plugins built against this one.

// abi_stable's #[sabi_trait] expands to impls inside a const block, which
// rustc's non_local_definitions lint flags; the code is abi_stable's own.
#[allow(non_local_definitions)]
pub mod captioner;
#[allow(non_local_definitions)]
pub mod encoder;
#[allow(non_local_definitions)]
pub mod generator;
#[allow(non_local_definitions)]
pub mod keyword_llm;
#[allow(non_local_definitions)]
pub mod mapper;
#[allow(non_local_definitions)]
pub mod ranker;

pub use captioner::{CaptionOptions, Captioner, CaptionerBox, DynCaptioner};
pub use encoder::{DynEncoder, Encoder, EncoderBox, EncoderInfo, TextEmbeddings};
pub use generator::{Conditioning, DynGenerator, GenerationRequest, Generator, GeneratorBox, GeneratorInfo};
pub use keyword_llm::{
    DynKeywordLlm, GenerateOptions, Generation, KeywordLlm, KeywordLlmBox, LlmInfo, PreferenceStates,
};
pub use mapper::{
    DynMapper, LossConfig, Mapper, MapperBox, MapperInfo, MapperInput, MapperOutput, ReflectionSample, TrainStats,
};
pub use ranker::{
    Candidate, DynRanker, FitReport, ItemFeatures, RankQuery, Ranker, RankerBox, RankerData, UserHistory,
};

use crate::error::{Error, ErrorKind, Result};
use abi_stable::std_types::{RResult, RString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Run `f`, turning both its error and any panic into an FFI-safe result.
pub fn guard<T>(f: impl FnOnce() -> Result<T>) -> RResult<T, Error> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            RResult::RErr(Error::new(ErrorKind::Panic, format!("plugin panicked: {what}")))
        }
    }
}

pub(crate) fn strings(xs: &[String]) -> Vec<RString> {
    xs.iter().map(|s| RString::from(s.as_str())).collect()
}

pub(crate) fn owned(xs: abi_stable::std_types::RSlice<'_, RString>) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

#[doc(hidden)]
#[macro_export]
macro_rules! __stage_box {
    (Captioner) => {
        $crate::stage::CaptionerBox
    };
    (Encoder) => {
        $crate::stage::EncoderBox
    };
    (KeywordLlm) => {
        $crate::stage::KeywordLlmBox
    };
    (Mapper) => {
        $crate::stage::MapperBox
    };
    (Generator) => {
        $crate::stage::GeneratorBox
    };
    (Ranker) => {
        $crate::stage::RankerBox
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __stage_boxer {
    (Captioner) => {
        $crate::stage::captioner::boxed
    };
    (Encoder) => {
        $crate::stage::encoder::boxed
    };
    (KeywordLlm) => {
        $crate::stage::keyword_llm::boxed
    };
    (Mapper) => {
        $crate::stage::mapper::boxed
    };
    (Generator) => {
        $crate::stage::generator::boxed
    };
    (Ranker) => {
        $crate::stage::ranker::boxed
    };
}
