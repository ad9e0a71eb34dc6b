//! Reading the small JSON files that sit beside model weights.

use crate::error::{Error, ErrorKind, Result, ResultExt};
use std::path::Path;

/// Parse a JSON file; errors name the file (and the line/column for syntax).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).or_err(ErrorKind::Model, path.display())
}
