//! Datasets as RAGAR uses them: a catalogue of items (image + text) and
//! users, each with an ordered history and a reference item to personalise.
//!
//! This is the generic JSONL manifest every dataset converts to:
//! `items.jsonl`, one `{"id", "image", "text"}` per line (image paths
//! relative to the file), and `users.jsonl`, one `{"user", "history": [ids,
//! oldest first], "reference": id}` per line (`reference` defaults to the
//! last history item, which then leaves the history). Histories keep their
//! last `history_len` items (20, the paper's). Users are split into train /
//! valid / test by a seeded shuffle. A bad line is an error naming the file,
//! the line and the field.

use ragar_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `dataset:` block.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// `items.jsonl`.
    pub items: PathBuf,
    /// `users.jsonl`.
    pub users: PathBuf,
    /// History items kept per user (most recent).
    #[serde(default = "twenty")]
    pub history_len: usize,
    /// Seed of the user split.
    #[serde(default)]
    pub split_seed: u64,
    /// Fraction of users held out for validation.
    #[serde(default = "tenth")]
    pub valid: f64,
    /// Fraction of users held out for test.
    #[serde(default = "tenth")]
    pub test: f64,
}

fn twenty() -> usize {
    20
}
fn tenth() -> f64 {
    0.1
}

/// A catalogue item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Id.
    pub id: String,
    /// Image file (absolute after loading).
    pub image: PathBuf,
    /// Title or description.
    #[serde(default)]
    pub text: String,
}

/// A user to personalise for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Id.
    pub user: String,
    /// Item ids, oldest first.
    pub history: Vec<String>,
    /// The item whose image is personalised.
    #[serde(default)]
    pub reference: Option<String>,
}

/// A loaded dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Items by id.
    pub items: HashMap<String, Item>,
    /// Item ids in file order.
    pub item_order: Vec<String>,
    /// Users (reference filled in, history trimmed).
    pub users: Vec<User>,
    /// Indices into `users`.
    pub train: Vec<usize>,
    /// Indices into `users`.
    pub valid: Vec<usize>,
    /// Indices into `users`.
    pub test: Vec<usize>,
}

/// Which users a command works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training users.
    Train,
    /// Validation users.
    Valid,
    /// Test users.
    Test,
    /// Everyone.
    All,
}

impl Split {
    /// Parse `train`, `valid`, `test`, `all`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "valid" => Ok(Split::Valid),
            "test" => Ok(Split::Test),
            "all" => Ok(Split::All),
            _ => Err(Error::config(format!("unknown split '{s}' (train, valid, test, all)"))),
        }
    }
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::invalid_input(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

impl Dataset {
    /// Load and check a manifest; relative paths resolve against `base`.
    pub fn load(cfg: &DatasetConfig, base: &Path) -> Result<Self> {
        let items_path = base.join(&cfg.items);
        let users_path = base.join(&cfg.users);
        let dir = items_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut items = HashMap::new();
        let mut item_order = Vec::new();
        for (i, mut it) in read_jsonl::<Item>(&items_path)?.into_iter().enumerate() {
            it.image = dir.join(&it.image);
            if items.contains_key(&it.id) {
                return Err(Error::invalid_input(format!(
                    "{}: item '{}' appears twice (second time on data line {})",
                    items_path.display(),
                    it.id,
                    i + 1
                )));
            }
            item_order.push(it.id.clone());
            items.insert(it.id.clone(), it);
        }
        let mut users = Vec::new();
        for (i, mut u) in read_jsonl::<User>(&users_path)?.into_iter().enumerate() {
            let at = |what: String| {
                Error::invalid_input(format!("{}:{}: user '{}': {what}", users_path.display(), i + 1, u.user))
            };
            if let Some(bad) = u
                .history
                .iter()
                .chain(u.reference.iter())
                .find(|id| !items.contains_key(*id))
            {
                return Err(at(format!("item '{bad}' is not in {}", items_path.display())));
            }
            if u.reference.is_none() {
                u.reference = u.history.pop();
            }
            if u.reference.is_none() || u.history.is_empty() {
                return Err(at("needs a reference item and at least one history item".into()));
            }
            let keep = u.history.len().saturating_sub(cfg.history_len);
            u.history.drain(..keep);
            users.push(u);
        }
        if !(0.0..1.0).contains(&(cfg.valid + cfg.test)) || cfg.valid < 0.0 || cfg.test < 0.0 {
            return Err(Error::config(format!(
                "dataset.valid + dataset.test must be in [0, 1), got {} + {}",
                cfg.valid, cfg.test
            )));
        }
        // Seeded Fisher-Yates over user indices, then contiguous splits.
        let mut order: Vec<usize> = (0..users.len()).collect();
        let mut g = ragar_core::rng::TorchGenerator::new(cfg.split_seed);
        g.shuffle(&mut order);
        let n = users.len();
        let (nv, nt) = (
            (n as f64 * cfg.valid).round() as usize,
            (n as f64 * cfg.test).round() as usize,
        );
        let valid = order[..nv].to_vec();
        let test = order[nv..nv + nt].to_vec();
        let train = order[nv + nt..].to_vec();
        Ok(Dataset {
            items,
            item_order,
            users,
            train,
            valid,
            test,
        })
    }

    /// The users of a split, in a stable order (file order).
    pub fn split(&self, s: Split) -> Vec<&User> {
        let mut idx = match s {
            Split::Train => self.train.clone(),
            Split::Valid => self.valid.clone(),
            Split::Test => self.test.clone(),
            Split::All => (0..self.users.len()).collect(),
        };
        idx.sort_unstable();
        idx.into_iter().map(|i| &self.users[i]).collect()
    }
}
