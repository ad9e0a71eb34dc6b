//! safetensors checkpoints read tensor by tensor, as the model asks for them.
//!
//! candle's `VarBuilder::from_mmaped_safetensors` maps the whole file; every
//! page a model reads stays in the process's resident set until the map is
//! dropped, next to the copy the tensor was made into (and, for linear
//! layers, the packed copy), so loading peaked at about twice the weights
//! (CLIP ViT-B/32 images at batch 8: 1,369 MiB peak, 830 MiB read this way,
//! ONNX Runtime 853 in the same minutes). Here the header is
//! parsed once and each tensor is read with one positioned read into its own
//! buffer: the peak is the weights plus the largest tensor in flight, on the
//! CPU and when the tensors go on to a GPU alike. Tensors the model does not
//! ask for (the vision tower of a text-only encoder) are never read.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use ragar_core::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where one tensor lies: which file, its dtype and shape, its bytes.
#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// One or more safetensors files (a sharded checkpoint), indexed by name.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, Entry>,
}

/// The header's dtype names, as candle's.
fn dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl Checkpoint {
    /// Open `paths` and index their headers; a malformed header, a tensor
    /// whose byte range disagrees with its shape or lies past the end of the
    /// file, or a name found in two shards is an error naming the file.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut ck = Checkpoint {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for p in paths {
            ck.add(p.as_ref())?;
        }
        Ok(ck)
    }

    fn add(&mut self, path: &Path) -> Result<()> {
        let bad = |what: String| Error::model(format!("{}: not a safetensors file: {what}", path.display()));
        let file = File::open(path).map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        // safetensors caps headers at 100 MB; a larger length is a foreign file.
        if n > 100_000_000 || 8 + n > size {
            return Err(bad(format!("header length {n} in a file of {size} bytes")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8).map_err(|e| bad(e.to_string()))?;
        let header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_start = 8 + n;
        let index = self.files.len();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let field = |k: &str| info.get(k).ok_or_else(|| bad(format!("tensor '{name}' has no {k}")));
            let dt = field("dtype")?.as_str().unwrap_or_default();
            let dtype = dtype(dt).ok_or_else(|| {
                Error::unsupported(format!(
                    "{}: tensor '{name}' has dtype {dt}, which ragar does not load",
                    path.display()
                ))
            })?;
            let shape: Vec<usize> = serde_json::from_value(field("shape")?.clone())
                .map_err(|e| bad(format!("tensor '{name}' shape: {e}")))?;
            let [s, e]: [u64; 2] = serde_json::from_value(field("data_offsets")?.clone())
                .map_err(|e| bad(format!("tensor '{name}' data_offsets: {e}")))?;
            let want = shape.iter().product::<usize>() * dtype.size_in_bytes();
            if e < s || (e - s) as usize != want || data_start + e > size {
                return Err(bad(format!(
                    "tensor '{name}' ({dt} {shape:?}, {want} bytes) has bytes {s}..{e} of a {} byte data section",
                    size - data_start
                )));
            }
            let entry = Entry {
                file: index,
                dtype,
                shape,
                start: data_start + s,
                len: want,
            };
            if let Some(prev) = self.tensors.insert(name.clone(), entry) {
                return Err(bad(format!(
                    "tensor '{name}' is also in {}",
                    self.files[prev.file].0.display()
                )));
            }
        }
        self.files.push((path.to_path_buf(), file));
        Ok(())
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` as stored, on `dev`.
    pub fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(e) = self.tensors.get(name) else {
            return Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt());
        };
        let (path, file) = &self.files[e.file];
        let mut bytes = vec![0u8; e.len];
        file.read_exact_at(&mut bytes, e.start)
            .map_err(|err| candle_core::Error::Msg(format!("{}: tensor '{name}': {err}", path.display())))?;
        Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, dev)
    }

    /// A VarBuilder over the checkpoint, converting to `dtype` on `dev`.
    pub fn var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }
}

impl SimpleBackend for Checkpoint {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // The header says the shape: a mismatch is refused before any bytes are read.
        if let Some(e) = self.tensors.get(name) {
            if e.shape != s.dims() {
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: Shape::from(e.shape.clone()),
                }
                .bt());
            }
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// A VarBuilder over the safetensors `paths`, in `dtype` on `dev`.
pub fn var_builder<P: AsRef<Path>>(paths: &[P], dtype: DType, dev: &Device) -> Result<VarBuilder<'static>> {
    Ok(Checkpoint::open(paths)?.var_builder(dtype, dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join(name);
        let map: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn reads_what_candles_memory_map_reads() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
        let h = Tensor::new(&[0.5f32, -2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let p1 = write(dir.path(), "a.safetensors", &[("a", a.clone()), ("b", b.clone())]);
        let p2 = write(dir.path(), "h.safetensors", &[("h", h.clone())]);
        let ck = Checkpoint::open(&[&p1, &p2]).unwrap();
        let mm = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&[&p1, &p2]) }.unwrap();
        for name in ["a", "b", "h"] {
            let (x, y) = (
                ck.load(name, &Device::Cpu).unwrap(),
                mm.load(name, &Device::Cpu).unwrap(),
            );
            assert_eq!((x.dtype(), x.dims()), (y.dtype(), y.dims()), "{name}");
            let diff = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(
                diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(),
                0.0,
                "{name}"
            );
        }
        let vb = ck.var_builder(DType::F32, &Device::Cpu);
        assert_eq!(vb.get((2,), "h").unwrap().to_vec1::<f32>().unwrap(), vec![0.5, -2.0]);
        let err = vb.get((4, 3), "a").unwrap_err().to_string();
        assert!(err.contains("shape mismatch for a"), "{err}");
        assert!(!vb.contains_tensor("c"));
        assert!(vb.get((1,), "c").is_err());
    }

    #[test]
    fn bad_files_name_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "w.safetensors",
            &[("w", Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap())],
        );
        // Cut the data section: the tensor's bytes now run past the end.
        let bytes = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        let err = Checkpoint::open(&[&cut]).unwrap_err().to_string();
        assert!(err.contains("cut.safetensors") && err.contains("tensor 'w'"), "{err}");
        // Not a safetensors file at all.
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
        let err = Checkpoint::open(&[&junk]).unwrap_err().to_string();
        assert!(
            err.contains("junk.safetensors") && err.contains("header length"),
            "{err}"
        );
        // The same tensor in two shards.
        let err = Checkpoint::open(&[&p, &p]).unwrap_err().to_string();
        assert!(err.contains("tensor 'w' is also in"), "{err}");
        let missing = dir.path().join("missing.safetensors");
        let err = Checkpoint::open(&[&missing]).unwrap_err().to_string();
        assert!(err.contains("missing.safetensors"), "{err}");
    }
}
