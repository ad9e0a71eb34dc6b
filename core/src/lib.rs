//! ragar-core: the contracts of the RAGAR framework.
//!
//! RAGAR (retrieval-augmented personalized image generation guided by
//! recommendation) is a pipeline of six model stages — Captioner, Encoder,
//! KeywordLLM, Mapper, Generator, Ranker — glued by framework-free math
//! (retrieval, rewards, metrics). This crate owns:
//!
//! - the plain data that crosses a stage boundary ([`Image`], [`Tensor`]);
//! - the one error type ([`Error`]) that crosses as a value;
//! - the six stage contracts ([`stage`]), each a plain trait for plugin
//!   authors plus an FFI-stable trait object for the boundary;
//! - how a plugin offers components ([`Component`], [`component!`]) and how
//!   it reaches the host ([`plugin`]: `inventory` for static linking, an
//!   `abi_stable` root module for cdylibs).
//!
//! The main design decision: **the same FFI-stable trait object is used
//! whether a plugin is linked statically or loaded from a shared library.**
//! There is one code path in the host, and every call runs under
//! [`stage::guard`], so a panicking plugin yields an error, not an abort.
//!
//! No ML framework is a dependency of this crate (architecture invariant).
#![deny(missing_docs)]

#[cfg(feature = "text")]
pub mod blip;
#[cfg(feature = "text")]
pub mod clip;
pub mod component;
pub mod content;
pub mod data;
pub mod decoding;
#[cfg(feature = "text")]
pub mod diffusion;
pub mod error;
pub mod files;
pub mod keywords;
#[cfg(feature = "text")]
pub mod llm;
pub mod mapper;
pub mod metrics;
#[cfg(feature = "hub")]
pub mod model;
pub mod plugin;
pub mod reflection;
pub mod retrieval;
pub mod rng;
pub mod schedulers;
pub mod sparse;
pub mod stage;
#[cfg(feature = "text")]
pub mod text;
pub mod vision;

pub use component::{Component, ComponentDescriptor, ComponentSpec, Device, Factory, Stage};
pub use data::{DType, Image, Tensor, TensorData};
pub use error::{Error, ErrorKind, Result, ResultExt};
pub use stage::guard;

#[doc(hidden)]
pub use abi_stable;
#[doc(hidden)]
pub use inventory;
