//! Files in and out: line-oriented text inputs and atomic writes.

use ragar_core::{Error, Result, Tensor};
use std::path::Path;

/// One entry per line of `path` (a final newline does not add an empty
/// entry; `\r\n` is accepted). Empty lines are kept as empty strings so that
/// output row i always belongs to input line i+1. A line that is not UTF-8
/// is an error naming the file and line.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            String::from_utf8(line.to_vec()).map_err(|e| {
                Error::invalid_input(format!(
                    "{}:{}: not valid UTF-8 (byte {} of the line)",
                    path.display(),
                    i + 1,
                    e.utf8_error().valid_up_to() + 1
                ))
            })
        })
        .collect()
}

pub use ragar_core::files::write_atomic;

/// Parse a JSON-lines file (blank lines skipped); errors name file and line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::invalid_input(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// Write `value` as pretty JSON (with a final newline), atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::io(path, e))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Save a `[n, d]` tensor as `.json` (array of arrays) or `.safetensors`
/// (one f32 tensor named `name`), chosen by the extension.
pub fn write_matrix(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let bytes = match ext {
        "json" => {
            let rows = t.to_rows()?;
            let mut s = serde_json::to_vec(&rows).map_err(|e| Error::io(path, e))?;
            s.push(b'\n');
            s
        }
        "safetensors" => {
            let data: Vec<u8> = t.to_f32_vec().iter().flat_map(|x| x.to_le_bytes()).collect();
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.dims(), &data)
                .map_err(|e| Error::io(path, e))?;
            safetensors::tensor::serialize([(name, view)], None).map_err(|e| Error::io(path, e))?
        }
        _ => {
            return Err(Error::invalid_input(format!(
                "{}: unknown output format (use .json or .safetensors)",
                path.display()
            )))
        }
    };
    write_atomic(path, &bytes)
}

/// Save named f32 tensors as one `.safetensors` file, atomically.
pub fn write_tensors(path: &Path, tensors: &[(&str, Tensor)]) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(Error::invalid_input(format!(
            "{}: this output must be .safetensors",
            path.display()
        )));
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.dims(),
                t.to_f32_vec().iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.as_str(), v))
                .map_err(|e| Error::io(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, None).map_err(|e| Error::io(path, e))?;
    write_atomic(path, &bytes)
}

/// Prompt embeddings for `ragar stage generator`: `prompt_embeds`
/// (`[n, tokens, d]` or `[tokens, d]`) and optional `negative_embeds`, each
/// row as a `[tokens, d]` f32 tensor. F16 / BF16 files are widened.
pub fn read_prompt_embeds(path: &Path) -> Result<(Vec<Tensor>, Option<Vec<Tensor>>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::invalid_input(format!("{}: not a safetensors file: {e}", path.display())))?;
    let rows = |name: &str| -> Result<Option<Vec<Tensor>>> {
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            safetensors::Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::invalid_input(format!(
                    "{}: {name} is {other:?}; prompt embeddings must be F32, F16 or BF16",
                    path.display()
                )))
            }
        };
        let (n, t, d) = match *view.shape() {
            [t, d] => (1, t, d),
            [n, t, d] => (n, t, d),
            ref s => {
                return Err(Error::invalid_input(format!(
                    "{}: {name} has shape {s:?}; expected [n, tokens, dim] or [tokens, dim]",
                    path.display()
                )))
            }
        };
        (0..n)
            .map(|i| Tensor::from_f32(&[t, d], data[i * t * d..(i + 1) * t * d].to_vec()))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    };
    let pos = rows("prompt_embeds")?.ok_or_else(|| {
        let names: Vec<&str> = st.names();
        Error::invalid_input(format!(
            "{}: no tensor named prompt_embeds (found: {})",
            path.display(),
            names.join(", ")
        ))
    })?;
    Ok((pos, rows("negative_embeds")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_empties_and_name_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.txt");
        std::fs::write(&p, b"a\r\n\nb\n").unwrap();
        assert_eq!(read_lines(&p).unwrap(), vec!["a", "", "b"]);
        std::fs::write(&p, b"ok\nbad \xff here\n").unwrap();
        let err = read_lines(&p).unwrap_err().to_string();
        assert!(err.contains("in.txt:2: not valid UTF-8"), "{err}");
    }

    #[test]
    fn matrices_round_trip_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let t = Tensor::from_rows(&[vec![1.0, 2.0], vec![3.0, 4.0]]).unwrap();
        write_matrix(&p, "embeddings", &t).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let v = st.tensor("embeddings").unwrap();
        assert_eq!(v.shape(), &[2, 2]);
        assert!(write_matrix(&dir.path().join("m.txt"), "x", &t).is_err());
    }
}
