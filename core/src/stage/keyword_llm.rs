//! KeywordLLM: the LLM of the generation module.
//!
//! Two uses: (1) plain generation, to extract concise keywords per item from a
//! prompt populated with the item's text (Eq. 6); (2) a forward pass over the
//! preference prompt whose vocabulary was extended with the special tokens
//! `[IMG0] .. [IMG{n-1}]`, returning the last-layer hidden states at those
//! positions (the image-related features) and the text-related embedding
//! (Eq. 7), both inputs of the Modal Mapper (Eq. 8).

use super::{guard, owned, strings};
use crate::data::Tensor;
use crate::error::{Error, Result};
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RString, RVec};
use abi_stable::StableAbi;

/// Shape facts of the LLM.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct LlmInfo {
    /// Hidden size d_llm of the last layer.
    pub hidden_size: u32,
    /// Number of [IMG] tokens appended by [`KeywordLlm::preference_states`].
    pub n_img_tokens: u32,
    /// Context length in tokens.
    pub context: u32,
}

/// Decoding options.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_tokens: u32,
    /// 0 means greedy; otherwise softmax temperature for seeded sampling.
    pub temperature: f32,
    /// Nucleus sampling threshold (1 = off).
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Generation stops before any of these strings.
    pub stop: RVec<RString>,
    /// Apply the checkpoint's chat template to the prompt.
    pub chat_template: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: RVec::new(),
            chat_template: true,
        }
    }
}

/// One generated text.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new text, without the prompt.
    pub text: RString,
    /// Number of new tokens.
    pub tokens: u32,
    /// Whether the prompt was cut to fit the context.
    pub prompt_truncated: bool,
}

/// Eq. 7's outputs for one preference prompt.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PreferenceStates {
    /// `[n_img, d_llm]`: last-layer hidden states at the [IMG] positions.
    pub img_states: Tensor,
    /// `[d_llm]`: the text-related embedding (mean of the last-layer hidden
    /// states over the prompt's own tokens, before the [IMG] tokens).
    pub text_embedding: Tensor,
}

/// The keyword-LLM contract, implemented by plugins.
pub trait KeywordLlm: Send + Sync + 'static {
    /// Shape facts.
    fn info(&self) -> LlmInfo;
    /// Generate one continuation per prompt (Eq. 6).
    fn generate(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<Generation>>;
    /// Hidden states at the [IMG] tokens appended to each prompt (Eq. 7).
    fn preference_states(&self, prompts: &[String]) -> Result<Vec<PreferenceStates>>;
}

/// FFI face of [`KeywordLlm`].
#[sabi_trait]
pub trait FfiKeywordLlm: Send + Sync {
    /// See [`KeywordLlm::info`].
    fn info(&self) -> RResult<LlmInfo, Error>;
    /// See [`KeywordLlm::generate`].
    fn generate(&self, prompts: RSlice<'_, RString>, opts: &GenerateOptions) -> RResult<RVec<Generation>, Error>;
    /// See [`KeywordLlm::preference_states`].
    #[sabi(last_prefix_field)]
    fn preference_states(&self, prompts: RSlice<'_, RString>) -> RResult<RVec<PreferenceStates>, Error>;
}

/// A keyword LLM behind the FFI boundary.
pub type KeywordLlmBox = FfiKeywordLlm_TO<'static, RBox<()>>;

struct Guarded<T>(T);

impl<T: KeywordLlm> FfiKeywordLlm for Guarded<T> {
    fn info(&self) -> RResult<LlmInfo, Error> {
        guard(|| Ok(self.0.info()))
    }
    fn generate(&self, prompts: RSlice<'_, RString>, opts: &GenerateOptions) -> RResult<RVec<Generation>, Error> {
        guard(|| self.0.generate(&owned(prompts), opts).map(RVec::from))
    }
    fn preference_states(&self, prompts: RSlice<'_, RString>) -> RResult<RVec<PreferenceStates>, Error> {
        guard(|| self.0.preference_states(&owned(prompts)).map(RVec::from))
    }
}

/// Put a [`KeywordLlm`] behind the FFI boundary.
pub fn boxed<T: KeywordLlm>(llm: T) -> KeywordLlmBox {
    FfiKeywordLlm_TO::from_value(Guarded(llm), abi_stable::sabi_trait::TD_Opaque)
}

/// The host's handle to a keyword LLM from any plugin.
pub struct DynKeywordLlm {
    inner: KeywordLlmBox,
    info: LlmInfo,
}

impl DynKeywordLlm {
    /// Wrap a boxed LLM, asking it for its info once.
    pub fn new(inner: KeywordLlmBox) -> Result<Self> {
        let info = inner.info().into_result()?;
        Ok(DynKeywordLlm { inner, info })
    }
    /// Shape facts.
    pub fn info(&self) -> &LlmInfo {
        &self.info
    }
    /// See [`KeywordLlm::generate`].
    pub fn generate(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        let out = self
            .inner
            .generate(strings(prompts).as_slice().into(), opts)
            .into_result()?;
        expect_len("generations", out.len(), prompts.len())?;
        Ok(out.into_vec())
    }
    /// See [`KeywordLlm::preference_states`].
    pub fn preference_states(&self, prompts: &[String]) -> Result<Vec<PreferenceStates>> {
        let out = self
            .inner
            .preference_states(strings(prompts).as_slice().into())
            .into_result()?;
        expect_len("preference states", out.len(), prompts.len())?;
        Ok(out.into_vec())
    }
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::model(format!(
            "keyword LLM returned {got} {what} for {want} prompts"
        )));
    }
    Ok(())
}
