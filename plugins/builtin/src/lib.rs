//! ragar-builtin: weight-free stages. They need no download and no native
//! library, so they are always available as baselines and for smoke tests.
#![deny(missing_docs)]

pub mod color_histogram;

use ragar_core::{component, Component};

/// Every component this plugin offers.
pub fn components() -> Vec<Component> {
    vec![component!(
        Encoder,
        "color-histogram",
        "builtin",
        ["cpu"],
        "joint RGB colour histogram image features (weight-free baseline for Eq. 4)",
        color_histogram::ColorHistogram::load,
        color_histogram::ColorHistogram::probe
    )]
}

ragar_core::register_static!("builtin", components);
