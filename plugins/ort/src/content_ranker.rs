//! The content ranker (trained on candle) scoring from the ONNX graph that
//! `scripts/export_content_ranker.py` writes next to its state
//! (`content.safetensors` -> `content.onnx`). The state's item features and
//! the query layout are `ragar_core::content`, the same as candle's.

use crate::runtime::{check_io, ort_err as err, run_f32, session};
use ort::session::Session;
use ort::value::Tensor;
use ragar_core::component::Probe;
use ragar_core::content::{checkpoint, ContentState};
use ragar_core::stage::{RankQuery, Ranker};
use ragar_core::{ComponentSpec, Result};
use std::path::Path;
use std::sync::Mutex;

/// The content ranker on ONNX Runtime.
pub struct OrtContentRanker {
    // ort's `run` needs `&mut Session`; the contract is `&self`.
    session: Mutex<Session>,
    state: ContentState,
    spec: ComponentSpec,
}

fn open(spec: &ComponentSpec, state: &Path) -> Result<(Session, ContentState)> {
    let st = ContentState::open(state)?;
    let graph = state.with_extension("onnx");
    let s = session(spec, &graph)
        .map_err(|e| e.context("export it with: python scripts/export_content_ranker.py STATE"))?;
    let mut inputs = vec!["mask"];
    if st.dims.0 > 0 {
        inputs.extend(["hist_visual", "cand_visual"]);
    }
    if st.dims.1 > 0 {
        inputs.extend(["hist_text", "cand_text"]);
    }
    check_io(&s, &graph, &inputs, &inputs, "scores")?;
    Ok((s, st))
}

impl OrtContentRanker {
    /// Build from the params' `checkpoint` (the trained state).
    pub fn load_component(spec: &ComponentSpec) -> Result<Self> {
        probe(spec)?;
        let (session, state) = open(spec, &checkpoint(spec, "ort")?)?;
        Ok(OrtContentRanker {
            session: Mutex::new(session),
            state,
            spec: spec.clone(),
        })
    }
}

/// The probe: the state and its exported graph (a missing one is named with
/// its export command; loading asks it first for that message).
pub fn probe(spec: &ComponentSpec) -> Result<Probe> {
    ragar_core::content::probe(spec, "ort", |s| s.with_extension("onnx"))
}

impl Ranker for OrtContentRanker {
    fn score(&self, queries: &[RankQuery]) -> Result<Vec<Vec<f32>>> {
        let (dv, dt) = self.state.dims;
        let l = self.state.max_len as i64;
        queries
            .iter()
            .enumerate()
            .map(|(qi, q)| {
                let x = self.state.inputs(qi, q)?;
                let n = x.n as i64;
                let mut inputs: Vec<(&'static str, ort::value::DynValue)> = vec![(
                    "mask",
                    Tensor::from_array((vec![1, l], x.mask)).map_err(err)?.into_dyn(),
                )];
                if dv > 0 {
                    inputs.push((
                        "hist_visual",
                        Tensor::from_array((vec![1, l, dv as i64], x.hist_visual))
                            .map_err(err)?
                            .into_dyn(),
                    ));
                    inputs.push((
                        "cand_visual",
                        Tensor::from_array((vec![1, n, dv as i64], x.cand_visual))
                            .map_err(err)?
                            .into_dyn(),
                    ));
                }
                if dt > 0 {
                    inputs.push((
                        "hist_text",
                        Tensor::from_array((vec![1, l, dt as i64], x.hist_text))
                            .map_err(err)?
                            .into_dyn(),
                    ));
                    inputs.push((
                        "cand_text",
                        Tensor::from_array((vec![1, n, dt as i64], x.cand_text))
                            .map_err(err)?
                            .into_dyn(),
                    ));
                }
                run_f32(&self.session, inputs, "scores")
            })
            .collect()
    }

    fn load(&mut self, path: &str) -> Result<()> {
        let (s, st) = open(&self.spec, Path::new(path))?;
        self.session = Mutex::new(s);
        self.state = st;
        Ok(())
    }
}
