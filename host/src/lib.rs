//! ragar-host: the `ragar` binary's library — configuration, the plugin
//! registry and loader, and the commands.
//!
//! Architecture invariant: the host never names a framework type. It sees
//! stages only through `ragar_core`'s contracts, whether their plugin was
//! linked in (cargo features `candle`, `ort`, `tch`, `builtin`) or loaded
//! from a shared library at run time.
#![deny(missing_docs)]

pub mod bench;
pub mod cache;
pub mod commands;
pub mod config;
pub mod dataset;
pub mod demo;
pub mod evaluate;
pub mod io;
pub mod paths;
pub mod pipeline;
pub mod plots;
pub mod ranking;
pub mod registry;
pub mod report;
pub mod stage_bench;

// A plugin crate the binary never references is dropped by the linker, and
// its inventory registrations with it: name each linked plugin once.
#[cfg(feature = "builtin")]
use ragar_builtin as _;
#[cfg(feature = "candle")]
use ragar_candle as _;
#[cfg(feature = "ort")]
use ragar_ort as _;
#[cfg(feature = "tch")]
use ragar_tch as _;
