//! Scoring with a trained content ranker outside candle (which trains it:
//! `ragar_candle::content_ranker`): its state file (the item features it
//! knows, `max_len`) and the inputs of its exported scoring graph
//! (`scripts/export_content_ranker.py`) for one query, built the way
//! candle's scoring builds them: the last `max_len` history items,
//! left-padded with a 0 mask, most recent last; a candidate's visual or text
//! feature given in the query replaces the item's own.

use crate::stage::RankQuery;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// A content ranker's state file, read for scoring.
pub struct ContentState {
    index: HashMap<String, usize>,
    visual: Vec<f32>,
    text: Vec<f32>,
    /// Visual and text feature widths (0 = modality absent).
    pub dims: (usize, usize),
    /// History items the model reads.
    pub max_len: usize,
}

/// One query's graph inputs (row-major): history `[max_len, dv]`,
/// `[max_len, dt]`, mask `[max_len]`; candidates `[c, dv]`, `[c, dt]`.
pub struct QueryInputs {
    /// History visual features.
    pub hist_visual: Vec<f32>,
    /// History text features.
    pub hist_text: Vec<f32>,
    /// 1 = item, 0 = padding.
    pub mask: Vec<f32>,
    /// Candidate visual features.
    pub cand_visual: Vec<f32>,
    /// Candidate text features.
    pub cand_text: Vec<f32>,
    /// Candidates.
    pub n: usize,
}

#[derive(serde::Deserialize)]
struct Meta {
    items: Vec<String>,
    params: Params,
}

#[derive(serde::Deserialize)]
struct Params {
    max_len: usize,
}

fn matrix(st: &safetensors::SafeTensors, path: &Path, name: &str, rows: usize) -> Result<(Vec<f32>, usize)> {
    let t = st
        .tensor(name)
        .map_err(|e| Error::model(format!("{}: {name}: {e}", path.display())))?;
    let shape = t.shape();
    if t.dtype() != safetensors::Dtype::F32 || shape.len() != 2 || shape[0] != rows {
        return Err(Error::model(format!(
            "{}: {name} is {:?} {shape:?}, expected f32 [{rows}, d]",
            path.display(),
            t.dtype()
        )));
    }
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((v, shape[1]))
}

impl ContentState {
    /// Read what candle's content ranker saved (`ragar.content` metadata).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::model(format!("{}: not a safetensors file: {e}", path.display())))?;
        let meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("ragar.content"))
            .ok_or_else(|| {
                Error::model(format!(
                    "{}: not a content-ranker state (no ragar.content)",
                    path.display()
                ))
            })?;
        let meta: Meta =
            serde_json::from_str(meta).map_err(|e| Error::model(format!("{}: ragar.content: {e}", path.display())))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        let n = meta.items.len();
        let (visual, dv) = matrix(&st, path, "features.visual", n)?;
        let (text, dt) = matrix(&st, path, "features.text", n)?;
        Ok(ContentState {
            index: meta.items.into_iter().enumerate().map(|(i, n)| (n, i)).collect(),
            visual,
            text,
            dims: (dv, dt),
            max_len: meta.params.max_len,
        })
    }

    fn features(&self, qi: usize, id: &str) -> Result<(&[f32], &[f32])> {
        let i = *self
            .index
            .get(id)
            .ok_or_else(|| Error::invalid_input(format!("query {qi}: item '{id}' has no known features")))?;
        let (dv, dt) = self.dims;
        Ok((&self.visual[i * dv..(i + 1) * dv], &self.text[i * dt..(i + 1) * dt]))
    }

    /// The graph inputs of query `qi`.
    pub fn inputs(&self, qi: usize, q: &RankQuery) -> Result<QueryInputs> {
        let (dv, dt) = self.dims;
        let l = self.max_len;
        let items = &q.history.items;
        let tail = &items[items.len().saturating_sub(l)..];
        let pad = l - tail.len();
        let mut out = QueryInputs {
            hist_visual: vec![0.0; pad * dv],
            hist_text: vec![0.0; pad * dt],
            mask: vec![0.0; pad],
            cand_visual: Vec::with_capacity(q.candidates.len() * dv),
            cand_text: Vec::with_capacity(q.candidates.len() * dt),
            n: q.candidates.len(),
        };
        for id in tail {
            let (v, t) = self.features(qi, id.as_str())?;
            out.hist_visual.extend_from_slice(v);
            out.hist_text.extend_from_slice(t);
            out.mask.push(1.0);
        }
        for (ci, c) in q.candidates.iter().enumerate() {
            let given = (c.visual.as_ref().into_option(), c.text.as_ref().into_option());
            let (v, t) = match given {
                (Some(v), Some(t)) => (v.to_f32_vec(), t.to_f32_vec()),
                (v, t) => {
                    let own = self.features(qi, c.item.as_str())?;
                    (
                        v.map_or(own.0.to_vec(), |v| v.to_f32_vec()),
                        t.map_or(own.1.to_vec(), |t| t.to_f32_vec()),
                    )
                }
            };
            if (v.len(), t.len()) != self.dims {
                return Err(Error::invalid_input(format!(
                    "query {qi}, candidate {ci}: features of {} + {} values, the model reads {dv} + {dt}",
                    v.len(),
                    t.len()
                )));
            }
            out.cand_visual.extend(v);
            out.cand_text.extend(t);
        }
        Ok(out)
    }
}

/// The `checkpoint` of a content ranker's params (the other params are
/// candle's training settings and are read there), resolved; required for
/// scoring outside candle.
pub fn checkpoint(spec: &crate::ComponentSpec, backend: &str) -> Result<std::path::PathBuf> {
    let v: serde_json::Value = spec.params()?;
    match v.get("checkpoint") {
        Some(serde_json::Value::String(p)) => Ok(spec.resolve_path(p)),
        _ => Err(Error::config(format!(
            "{}.params.checkpoint: the {backend} content ranker scores with a trained state (train it with \
             `ragar train-ranker` on candle, then python scripts/export_content_ranker.py STATE)",
            spec.key
        ))),
    }
}

/// The probe: the state and its exported graph (`graph_of(state)`) exist.
pub fn probe(
    spec: &crate::ComponentSpec,
    backend: &str,
    graph_of: impl Fn(&std::path::Path) -> std::path::PathBuf,
) -> Result<crate::component::Probe> {
    let state = checkpoint(spec, backend)?;
    let export = format!(
        "python scripts/export_content_ranker.py {}{}",
        state.display(),
        spec.dtype.export_flag()
    );
    crate::component::Probe::default()
        .file(&state)?
        .exported(&graph_of(&state), &export)
}
