//! The content-addressed cache of stage outputs (captions, caption and image
//! embeddings, keyword answers): items recur across users, so each is
//! captioned, encoded and keyworded once per component version.
//!
//! Keys are SHA-256 of (output kind, the component's identity: name,
//! backend, version, dtype and params, and the input bytes), so changing a
//! model or its parameters never serves stale values. The store is redb, an
//! embedded ACID key-value database: each batch of new entries is one
//! durable transaction (a killed run loses at most the batch in flight, never
//! corrupts the file), readers run concurrently with the writer inside a
//! process, and a second process opening the same file is refused with a
//! clear error (redb's file lock) rather than racing it.

use ragar_core::{Error, Result};
use redb::{Database, ReadableTableMetadata, TableDefinition};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("stage_outputs");

/// The store.
pub struct Cache {
    db: Database,
    path: PathBuf,
}

impl Cache {
    /// Open or create the cache file.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let db = Database::create(path).map_err(|e| {
            Error::io(
                path,
                format!("{e} (another ragar process using this cache? set cache_dir per run)"),
            )
        })?;
        Ok(Cache {
            db,
            path: path.to_path_buf(),
        })
    }

    /// The key of `input` for an output `kind` of component `identity`.
    pub fn key(kind: &str, identity: &str, input: &[u8]) -> String {
        let mut h = Sha256::new();
        for part in [kind.as_bytes(), identity.as_bytes(), input] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The stored value of each key (`None` where missing).
    pub fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let err = |e: String| Error::io(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| err(e.to_string()))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![None; keys.len()]),
            Err(e) => return Err(err(e.to_string())),
        };
        keys.iter()
            .map(|k| {
                Ok(table
                    .get(k.as_str())
                    .map_err(|e| err(e.to_string()))?
                    .map(|v| v.value().to_vec()))
            })
            .collect()
    }

    /// Store entries in one durable transaction.
    pub fn put_many(&self, entries: &[(String, Vec<u8>)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let err = |e: String| Error::io(&self.path, e);
        let txn = self.db.begin_write().map_err(|e| err(e.to_string()))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| err(e.to_string()))?;
            for (k, v) in entries {
                table.insert(k.as_str(), v.as_slice()).map_err(|e| err(e.to_string()))?;
            }
        }
        txn.commit().map_err(|e| err(e.to_string()))
    }

    /// Entries stored.
    pub fn len(&self) -> Result<u64> {
        let err = |e: String| Error::io(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| err(e.to_string()))?;
        match txn.open_table(TABLE) {
            Ok(t) => t.len().map_err(|e| err(e.to_string())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The values for `inputs`, computing the missing ones with `compute`
    /// (called once, on the missing inputs only, in order) and storing them.
    pub fn memo<T, F>(&self, kind: &str, identity: &str, inputs: &[Vec<u8>], compute: F) -> Result<Vec<T>>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Clone,
        F: FnOnce(&[usize]) -> Result<Vec<T>>,
    {
        let keys: Vec<String> = inputs.iter().map(|i| Cache::key(kind, identity, i)).collect();
        let found = self.get_many(&keys)?;
        let mut out: Vec<Option<T>> = Vec::with_capacity(inputs.len());
        let mut missing = Vec::new();
        for (i, f) in found.into_iter().enumerate() {
            match f.map(|b| serde_json::from_slice::<T>(&b)) {
                Some(Ok(v)) => out.push(Some(v)),
                // A value this version cannot read is recomputed.
                _ => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if !missing.is_empty() {
            let computed = compute(&missing)?;
            if computed.len() != missing.len() {
                return Err(Error::model(format!(
                    "{kind}: {} values computed for {} inputs",
                    computed.len(),
                    missing.len()
                )));
            }
            let mut entries = Vec::with_capacity(missing.len());
            for (&i, v) in missing.iter().zip(computed) {
                entries.push((
                    keys[i].clone(),
                    serde_json::to_vec(&v).map_err(|e| Error::model(e.to_string()))?,
                ));
                out[i] = Some(v);
            }
            self.put_many(&entries)?;
        }
        Ok(out.into_iter().map(|v| v.expect("filled above")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memoises_across_reopen_and_keys_by_component() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        let inputs: Vec<Vec<u8>> = vec![b"a".to_vec(), b"b".to_vec()];
        {
            let c = Cache::open(&path).unwrap();
            let v: Vec<String> = c
                .memo("caption", "blip@1", &inputs, |m| {
                    Ok(m.iter().map(|i| format!("x{i}")).collect())
                })
                .unwrap();
            assert_eq!(v, vec!["x0", "x1"]);
            assert_eq!(c.len().unwrap(), 2);
        }
        let c = Cache::open(&path).unwrap();
        let more: Vec<Vec<u8>> = vec![b"b".to_vec(), b"c".to_vec()];
        let v: Vec<String> = c
            .memo("caption", "blip@1", &more, |m| {
                assert_eq!(m, &[1], "only the new input is computed");
                Ok(vec!["new".to_string()])
            })
            .unwrap();
        assert_eq!(v, vec!["x1", "new"]);
        // Another component version does not see these entries.
        let v: Vec<String> = c
            .memo("caption", "blip@2", &more[..1], |m| Ok(vec![format!("v2-{}", m.len())]))
            .unwrap();
        assert_eq!(v, vec!["v2-1"]);
        assert!(
            Cache::open(&path).is_err(),
            "a second open of a locked cache is refused"
        );
    }
}
