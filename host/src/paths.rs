//! Where ragar keeps what `scripts/setup.sh` installs: the project-local
//! cache `.ragar/` (native libraries under `lib/`, weights under `models/`).

use std::path::{Path, PathBuf};

/// The cache directory: `$RAGAR_CACHE`, else the first `.ragar/` found walking
/// up from the current directory, then from the executable's directory; else
/// `./.ragar` (which then does not exist, and loaders say to run the setup).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("RAGAR_CACHE") {
        return PathBuf::from(p);
    }
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf)),
    ];
    for start in starts.into_iter().flatten() {
        if let Some(found) = start.ancestors().map(|d| d.join(".ragar")).find(|d| d.is_dir()) {
            return found;
        }
    }
    PathBuf::from(".ragar")
}
