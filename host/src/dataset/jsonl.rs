//! The generic JSONL manifest every dataset can convert to.
//!
//! `items.jsonl`: one `{"id", "image", "text"}` per line; `image` is a path
//! relative to the items file's folder and may not leave it (no absolute
//! paths, no `..` past the folder). `users.jsonl`: one `{"user", "history":
//! [ids, oldest first], "reference": id}` per line; `reference` defaults to
//! the last history item, which then leaves the history.

use super::{Item, Raw, User};
use ragar_core::{Error, Result};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .map_err(|e| Error::invalid_input(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// `rel` joined to `root`, refusing paths that would leave `root`.
pub fn inside(root: &Path, rel: &Path) -> std::result::Result<PathBuf, String> {
    let mut depth = 0usize;
    for c in rel.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("path '{}' leaves the dataset folder", rel.display()))?
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "path '{}' is absolute; manifest paths are relative to the dataset folder",
                    rel.display()
                ))
            }
        }
    }
    Ok(root.join(rel))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemLine {
    id: String,
    #[serde(default)]
    image: Option<PathBuf>,
    #[serde(default)]
    text: String,
}

/// Load a manifest.
pub(crate) fn load(items_path: &Path, users_path: &Path) -> Result<Raw> {
    let dir = items_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut items = Vec::new();
    let mut ids = HashSet::new();
    for (line, it) in read_jsonl::<ItemLine>(items_path)? {
        let at =
            |what: String| Error::invalid_input(format!("{}:{line}: item '{}': {what}", items_path.display(), it.id));
        if it.id.is_empty() {
            return Err(at("empty id".into()));
        }
        if !ids.insert(it.id.clone()) {
            return Err(at("appears twice".into()));
        }
        let image = it.image.as_deref().map(|p| inside(&dir, p)).transpose().map_err(at)?;
        items.push(Item {
            id: it.id,
            image,
            text: it.text,
        });
    }
    let mut users = Vec::new();
    let mut seen_users = HashSet::new();
    for (line, mut u) in read_jsonl::<User>(users_path)? {
        let at =
            |what: String| Error::invalid_input(format!("{}:{line}: user '{}': {what}", users_path.display(), u.user));
        if !seen_users.insert(u.user.clone()) {
            return Err(at("appears twice".into()));
        }
        if let Some(bad) = u.history.iter().chain(u.reference.iter()).find(|id| !ids.contains(*id)) {
            return Err(at(format!("item '{bad}' is not in {}", items_path.display())));
        }
        let mut seq = u.history.clone();
        match &u.reference {
            Some(r) => seq.push(r.clone()),
            None => u.reference = u.history.pop(),
        }
        if u.reference.is_none() || u.history.is_empty() {
            return Err(at("needs a reference item and at least one history item".into()));
        }
        users.push((u, seq));
    }
    Ok(Raw {
        items,
        users,
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_stay_inside_the_folder() {
        let root = Path::new("/data/set");
        assert_eq!(inside(root, Path::new("img/a.png")).unwrap(), root.join("img/a.png"));
        assert!(inside(root, Path::new("img/../a.png")).is_ok());
        assert!(inside(root, Path::new("../b/a.png")).unwrap_err().contains("leaves"));
        assert!(inside(root, Path::new("img/../../a.png")).is_err());
        assert!(inside(root, Path::new("/etc/passwd")).unwrap_err().contains("absolute"));
    }
}
