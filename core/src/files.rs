//! Reading the small JSON files that sit beside model weights, and the one
//! atomic write every output and checkpoint goes through.

use crate::error::{Error, ErrorKind, Result, ResultExt};
use std::path::Path;

/// Parse a JSON file; errors name the file (and the line/column for syntax).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).or_err(ErrorKind::Model, path.display())
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder,
/// flushed and synced, then renamed over the target (a crash leaves the old
/// file or the new one, never a mix).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
