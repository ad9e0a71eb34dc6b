//! Ranker: scores candidate items for a user, given the user's history.
//!
//! The reflection module (Eq. 10) substitutes the visual features of the
//! reference image, the global-preference image and the RAGAR images into
//! the user's sequence and ranks them; the rank change metric (Eq. 16) and
//! Table 4 use the same contract. A transductive ranker such as MICRO scores
//! a generated image by substituting the features of the item it replaces;
//! an inductive one scores the features directly.

use super::guard;
use crate::data::Tensor;
use crate::error::{Error, Result};
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;

/// Features of one item (catalogue or generated).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ItemFeatures {
    /// Item id.
    pub item: RString,
    /// `[d_v]` visual feature.
    pub visual: Tensor,
    /// `[d_t]` text feature.
    pub text: Tensor,
}

/// One user's ordered interactions.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct UserHistory {
    /// User id.
    pub user: RString,
    /// Item ids, oldest first.
    pub items: RVec<RString>,
}

/// A candidate to score.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The catalogue item this candidate is (or, for a generated image, replaces).
    pub item: RString,
    /// Visual feature overriding the item's own (a generated image's).
    pub visual: ROption<Tensor>,
    /// Text feature overriding the item's own.
    pub text: ROption<Tensor>,
}

/// Score `candidates` for `history`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct RankQuery {
    /// The user and their history.
    pub history: UserHistory,
    /// What to score.
    pub candidates: RVec<Candidate>,
}

/// Training data for [`Ranker::fit`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct RankerData {
    /// Training interactions.
    pub train: RVec<UserHistory>,
    /// Held-out interactions for early stopping and reporting.
    pub valid: RVec<UserHistory>,
    /// Features of every item.
    pub items: RVec<ItemFeatures>,
    /// Seed for initialisation and sampling.
    pub seed: u64,
}

/// What training reached: named figures such as `recall@10`, `ndcg@10`, `epochs`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct FitReport {
    /// Name -> value.
    pub metrics: RVec<Tuple2<RString, f64>>,
}

/// The ranker contract, implemented by plugins.
pub trait Ranker: Send + Sync + 'static {
    /// One score per candidate per query (higher = preferred).
    fn score(&self, queries: &[RankQuery]) -> Result<Vec<Vec<f32>>>;
    /// Train from interactions and item features.
    fn fit(&mut self, data: &RankerData) -> Result<FitReport> {
        let _ = data;
        Err(Error::unsupported("this ranker is not trainable"))
    }
    /// Save trained state to `path`.
    fn save(&self, path: &str) -> Result<()> {
        let _ = path;
        Err(Error::unsupported("this ranker has no state to save"))
    }
    /// Load trained state from `path`.
    fn load(&mut self, path: &str) -> Result<()> {
        let _ = path;
        Err(Error::unsupported("this ranker has no state to load"))
    }
}

/// FFI face of [`Ranker`].
#[sabi_trait]
pub trait FfiRanker: Send + Sync {
    /// See [`Ranker::score`].
    fn score(&self, queries: RSlice<'_, RankQuery>) -> RResult<RVec<RVec<f32>>, Error>;
    /// See [`Ranker::fit`].
    fn fit(&mut self, data: &RankerData) -> RResult<FitReport, Error>;
    /// See [`Ranker::save`].
    fn save(&self, path: RStr<'_>) -> RResult<(), Error>;
    /// See [`Ranker::load`].
    #[sabi(last_prefix_field)]
    fn load(&mut self, path: RStr<'_>) -> RResult<(), Error>;
}

/// A ranker behind the FFI boundary.
pub type RankerBox = FfiRanker_TO<'static, RBox<()>>;

struct Guarded<T>(T);

impl<T: Ranker> FfiRanker for Guarded<T> {
    fn score(&self, queries: RSlice<'_, RankQuery>) -> RResult<RVec<RVec<f32>>, Error> {
        guard(|| Ok(self.0.score(queries.as_slice())?.into_iter().map(RVec::from).collect()))
    }
    fn fit(&mut self, data: &RankerData) -> RResult<FitReport, Error> {
        guard(|| self.0.fit(data))
    }
    fn save(&self, path: RStr<'_>) -> RResult<(), Error> {
        guard(|| self.0.save(path.as_str()))
    }
    fn load(&mut self, path: RStr<'_>) -> RResult<(), Error> {
        guard(|| self.0.load(path.as_str()))
    }
}

/// Put a [`Ranker`] behind the FFI boundary.
pub fn boxed<T: Ranker>(r: T) -> RankerBox {
    FfiRanker_TO::from_value(Guarded(r), abi_stable::sabi_trait::TD_Opaque)
}

/// The host's handle to a ranker from any plugin.
pub struct DynRanker(pub RankerBox);

impl DynRanker {
    /// See [`Ranker::score`]; checks one score per candidate.
    pub fn score(&self, queries: &[RankQuery]) -> Result<Vec<Vec<f32>>> {
        let out = self.0.score(queries.into()).into_result()?;
        if out.len() != queries.len() || out.iter().zip(queries).any(|(s, q)| s.len() != q.candidates.len()) {
            return Err(Error::model(
                "ranker returned a score list that does not match its queries",
            ));
        }
        Ok(out.into_iter().map(RVec::into_vec).collect())
    }
    /// See [`Ranker::fit`].
    pub fn fit(&mut self, data: &RankerData) -> Result<FitReport> {
        self.0.fit(data).into_result()
    }
    /// See [`Ranker::save`].
    pub fn save(&self, path: &str) -> Result<()> {
        self.0.save(path.into()).into_result()
    }
    /// See [`Ranker::load`].
    pub fn load(&mut self, path: &str) -> Result<()> {
        self.0.load(path.into()).into_result()
    }
}
