//! State files of trainable components (Mapper, rankers): safetensors with
//! f32 (and u32) tensors and one JSON metadata entry, written atomically.
//! One metadata key, because safetensors keeps metadata in a hash map whose
//! order would otherwise make two identical states differ in bytes.

use candle_core::{Device, Tensor};
use ragar_core::{Error, Result};
use std::collections::HashMap;

/// Tensors to write: f32 tensors by name, plus raw u32 arrays.
#[derive(Default)]
pub struct StateWriter {
    entries: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)>,
}

impl StateWriter {
    /// Add an f32 tensor.
    pub fn tensor(&mut self, name: &str, t: &Tensor) -> candle_core::Result<()> {
        let v = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        self.entries.push((
            name.to_string(),
            t.dims().to_vec(),
            safetensors::Dtype::F32,
            le_bytes(&v),
        ));
        Ok(())
    }

    /// Add a u32 array of `shape`.
    pub fn u32s(&mut self, name: &str, shape: Vec<usize>, v: &[u32]) {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.entries
            .push((name.to_string(), shape, safetensors::Dtype::U32, bytes));
    }

    /// Write to `path` atomically, with `meta` under `key`.
    pub fn write(&self, path: &str, key: &str, meta: &serde_json::Value) -> Result<()> {
        let views = self
            .entries
            .iter()
            .map(|(n, s, dt, b)| {
                safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                    .map(|v| (n.as_str(), v))
                    .map_err(|e| Error::model(format!("{path}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([(key.to_string(), meta.to_string())]);
        let bytes =
            safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::model(format!("{path}: {e}")))?;
        ragar_core::files::write_atomic(std::path::Path::new(path), &bytes)
    }
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A state file read back.
pub struct StateReader {
    bytes: Vec<u8>,
    path: String,
    meta: serde_json::Value,
}

impl StateReader {
    /// Read `path`; `key` is the metadata entry `what` (e.g. "a MICRO state") wrote.
    pub fn open(path: &str, key: &str, what: &str) -> Result<Self> {
        Self::read(path, key, what, true)
    }

    /// Read `path`, whose metadata may be absent (plain weight files, e.g.
    /// exported from PyTorch); the metadata is then `null`.
    pub fn open_weights(path: &str, key: &str, what: &str) -> Result<Self> {
        Self::read(path, key, what, false)
    }

    fn read(path: &str, key: &str, what: &str, need_meta: bool) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(std::path::Path::new(path), e))?;
        let bad = |why: String| Error::invalid_input(format!("{path}: {why} (not {what} written by ragar?)"));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = match header.metadata().as_ref().and_then(|m| m.get(key).cloned()) {
            Some(raw) => serde_json::from_str(&raw).map_err(|e| bad(e.to_string()))?,
            None if need_meta => return Err(bad(format!("no `{key}` metadata"))),
            None => serde_json::Value::Null,
        };
        Ok(StateReader {
            bytes,
            path: path.to_string(),
            meta,
        })
    }

    /// The metadata.
    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    /// A metadata field parsed as `T`.
    pub fn field<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        serde_json::from_value(self.meta[name].clone())
            .map_err(|e| Error::invalid_input(format!("{}: metadata field {name}: {e}", self.path)))
    }

    fn view(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.bytes)
            .map_err(|e| Error::invalid_input(format!("{}: {e}", self.path)))
    }

    /// The f32 tensor `name`, if present.
    pub fn tensor(&self, name: &str, dev: &Device) -> Result<Option<Tensor>> {
        let st = self.view()?;
        let Ok(v) = st.tensor(name) else { return Ok(None) };
        if v.dtype() != safetensors::Dtype::F32 {
            return Err(Error::invalid_input(format!(
                "{}: {name} is {:?}, expected F32",
                self.path,
                v.dtype()
            )));
        }
        let data: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Tensor::from_vec(data, v.shape(), dev)
            .map(Some)
            .map_err(|e| Error::model(format!("{}: {e}", self.path)))
    }

    /// The f32 tensor `name`, which must be present with `shape` when given.
    pub fn require(&self, name: &str, shape: Option<&[usize]>, dev: &Device) -> Result<Tensor> {
        let t = self.tensor(name, dev)?.ok_or_else(|| {
            Error::invalid_input(format!(
                "{}: missing tensor {name} (a state of another configuration?)",
                self.path
            ))
        })?;
        if let Some(s) = shape.filter(|s| *s != t.dims()) {
            return Err(Error::invalid_input(format!(
                "{}: tensor {name} has shape {:?}, this component's is {s:?} (another configuration?)",
                self.path,
                t.dims()
            )));
        }
        Ok(t)
    }

    /// The u32 array `name`.
    pub fn u32s(&self, name: &str) -> Result<Vec<u32>> {
        let st = self.view()?;
        let v = st
            .tensor(name)
            .map_err(|_| Error::invalid_input(format!("{}: missing tensor {name}", self.path)))?;
        Ok(v.data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
