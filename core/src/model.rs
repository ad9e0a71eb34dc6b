//! Where a model's files come from: a local folder (HF layout), or a
//! Hugging Face Hub repository `hf:org/name[@revision]` resolved through the
//! standard HF cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`) and downloaded into it when missing — unless
//! offline mode is on (`HF_HUB_OFFLINE=1` or `RAGAR_OFFLINE=1`), which never
//! touches the network.

use crate::error::{Error, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// A model reference from a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A local folder.
    Local(PathBuf),
    /// A Hub model repository at a revision (branch, tag or commit).
    Hub {
        /// `org/name`.
        repo: String,
        /// Branch, tag or 40-hex commit; `main` by default.
        revision: String,
    },
}

/// Whether resolving may download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Only look (validation, `ragar models`).
    Never,
    /// Download missing files unless offline mode is on.
    IfMissing,
}

/// True when `HF_HUB_OFFLINE` or `RAGAR_OFFLINE` is set to a true value.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "RAGAR_OFFLINE"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| matches!(s.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on")))
}

/// The HF cache directory the Python libraries use.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/huggingface/hub")
}

impl ModelSource {
    /// Parse `hf:org/name[@rev]`; anything else is a local path, resolved by
    /// `resolve_local` (config-relative, `${RAGAR_CACHE}`).
    pub fn parse(s: &str, resolve_local: impl FnOnce(&str) -> PathBuf) -> Result<Self> {
        let Some(rest) = s.strip_prefix("hf:") else {
            return Ok(ModelSource::Local(resolve_local(s)));
        };
        let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
        let valid = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        match repo.split_once('/') {
            Some((org, name)) if valid(org) && valid(name) && !revision.is_empty() => Ok(ModelSource::Hub {
                repo: repo.into(),
                revision: revision.into(),
            }),
            _ => Err(Error::config(format!(
                "'{s}' is not a Hub reference of the form hf:org/name[@revision]"
            ))),
        }
    }

    /// The folder holding `required` files (and whichever `optional` ones
    /// exist). A missing file names itself and how to get it.
    pub fn resolve(&self, required: &[&str], optional: &[&str], fetch: Fetch) -> Result<PathBuf> {
        match self {
            ModelSource::Local(dir) => {
                if !dir.is_dir() {
                    return Err(Error::not_found(format!(
                        "model folder {} does not exist (run scripts/setup.sh for the test weights, or \
                         use hf:org/name to fetch from the Hugging Face Hub)",
                        dir.display()
                    )));
                }
                for f in required {
                    if !dir.join(f).is_file() {
                        return Err(Error::not_found(format!(
                            "missing model file {}",
                            dir.join(f).display()
                        )));
                    }
                }
                Ok(dir.clone())
            }
            ModelSource::Hub { repo, revision } => resolve_hub(repo, revision, required, optional, fetch),
        }
    }
}

impl ModelSource {
    /// The safetensors files of a checkpoint in `sub` (`""` for the root):
    /// `{stem}.safetensors`, else the shards that `{stem}.safetensors.index.json`
    /// lists (large checkpoints such as BLIP-2 OPT-2.7b are sharded).
    pub fn safetensors_files(&self, sub: &str, stem: &str, fetch: Fetch) -> Result<Vec<PathBuf>> {
        let join = |f: &str| {
            if sub.is_empty() {
                f.to_string()
            } else {
                format!("{sub}/{f}")
            }
        };
        let single = join(&format!("{stem}.safetensors"));
        let index = join(&format!("{stem}.safetensors.index.json"));
        let local_has = |f: &str| matches!(self, ModelSource::Local(d) if d.join(f).is_file());
        let try_single = match self {
            ModelSource::Local(_) => local_has(&single) || !local_has(&index),
            ModelSource::Hub { .. } => true,
        };
        if try_single {
            match self.resolve(&[&single], &[], fetch) {
                Ok(root) => return Ok(vec![root.join(&single)]),
                Err(e) if matches!(self, ModelSource::Local(_)) => {
                    return Err(Error::not_found(format!("{e} (nor {index})")))
                }
                Err(_) => {}
            }
        }
        let root = self.resolve(&[&index], &[], fetch)?;
        let map: serde_json::Value = crate::files::read_json(&root.join(&index))?;
        let mut shards: Vec<String> = map["weight_map"]
            .as_object()
            .ok_or_else(|| Error::model(format!("{}: no weight_map", root.join(&index).display())))?
            .values()
            .filter_map(|v| v.as_str().map(&join))
            .collect();
        shards.sort();
        shards.dedup();
        let refs: Vec<&str> = shards.iter().map(String::as_str).collect();
        let root = self.resolve(&refs, &[], fetch)?;
        Ok(shards.iter().map(|f| root.join(f)).collect())
    }
}

fn snapshot_file(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    // A commit hash names its snapshot directly; a branch or tag goes through refs/.
    let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let p = folder.join("snapshots").join(commit).join(file);
    p.is_file().then_some(p)
}

fn resolve_hub(repo: &str, revision: &str, required: &[&str], optional: &[&str], fetch: Fetch) -> Result<PathBuf> {
    let cache = hf_cache_dir();
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for f in required {
        match snapshot_file(&cache, repo, revision, f) {
            Some(p) => found.push(p),
            None => missing.push(*f),
        }
    }
    if !missing.is_empty() {
        if fetch == Fetch::Never || offline() {
            let why = if offline() {
                "offline mode is on"
            } else {
                "not downloaded yet"
            };
            return Err(Error::not_found(format!(
                "hf:{repo}@{revision}: {} not in the Hugging Face cache {} ({why}); fetch with \
                 `huggingface-cli download {repo} {} --revision {revision}` or run without HF_HUB_OFFLINE",
                missing.join(", "),
                cache.display(),
                missing.join(" ")
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(cache.clone()))
            .build()
            .map_err(|e| Error::not_found(format!("hf:{repo}: cannot start a Hub client: {e}")))?;
        let r = api.repo(Repo::with_revision(repo.into(), RepoType::Model, revision.into()));
        for f in &missing {
            found.push(
                r.get(f)
                    .map_err(|e| Error::not_found(format!("hf:{repo}@{revision}: downloading {f}: {e}")))?,
            );
        }
        if !offline() {
            for f in optional {
                // Optional files may not exist upstream; ignore their errors.
                let _ = r.get(f);
            }
        }
    }
    let first = found
        .first()
        .ok_or_else(|| Error::config(format!("hf:{repo}: no files asked for")))?;
    // All files of one revision share a snapshot folder; the file may sit in a sub-folder.
    let depth = required.first().map_or(1, |f| f.split('/').count());
    Ok(first.ancestors().nth(depth).unwrap_or(first).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_references_and_paths() {
        let local = |s: &str| PathBuf::from("/base").join(s);
        assert_eq!(
            ModelSource::parse("hf:openai/clip-vit-base-patch32", local).unwrap(),
            ModelSource::Hub {
                repo: "openai/clip-vit-base-patch32".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSource::parse("hf:a/b@v1.0", local).unwrap(),
            ModelSource::Hub {
                repo: "a/b".into(),
                revision: "v1.0".into()
            }
        );
        assert_eq!(
            ModelSource::parse("models/x", local).unwrap(),
            ModelSource::Local("/base/models/x".into())
        );
        assert!(ModelSource::parse("hf:noslash", local).is_err());
        assert!(ModelSource::parse("hf:a/b@", local).is_err());
    }
}
