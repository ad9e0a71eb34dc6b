//! Datasets as RAGAR uses them: a catalogue of items (image + text) and
//! users, each with an ordered history and a reference item to personalise.
//!
//! Every format loads into one [`Dataset`]:
//! - `jsonl` ([`jsonl`]): the generic manifest, `items.jsonl` + `users.jsonl`;
//! - `movielens` ([`movielens`]): GroupLens ml-latest / ml-latest-small
//!   (`ratings.csv`, `movies.csv`, a posters folder keyed by movieId);
//! - `pog` ([`pog`]): Alibaba POG (`item_data.txt`, `user_data.txt`,
//!   `outfit_data.txt`, `images/`);
//! - `ser30k` ([`ser30k`]): SER30K stickers (`Images/<theme>/`,
//!   `Annotations/image-level/*.json`), users made by merging two themes.
//!
//! Users keep their last `history_len` history items (20, the paper's);
//! [`Dataset::sequences`] keeps each user's whole ordered sequence, which is
//! what a ranker trains on. Users are split into train / valid / test by a
//! seeded shuffle. A bad line is an error naming the file, the line and the
//! field.

pub mod jsonl;
pub mod movielens;
pub mod pog;
pub mod ser30k;

use ragar_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File format of a dataset.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `items.jsonl` + `users.jsonl`.
    #[default]
    Jsonl,
    /// GroupLens MovieLens (`ratings.csv`, `movies.csv`, `posters/`).
    Movielens,
    /// Alibaba POG (`item_data.txt`, `user_data.txt`, `images/`).
    Pog,
    /// SER30K stickers (`Images/`, `Annotations/image-level/`).
    Ser30k,
}

impl Format {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Movielens => "movielens",
            Format::Pog => "pog",
            Format::Ser30k => "ser30k",
        }
    }
}

/// The `dataset:` block.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// File format.
    #[serde(default)]
    pub format: Format,
    /// `jsonl`: the items file.
    #[serde(default)]
    pub items: Option<PathBuf>,
    /// `jsonl`: the users file.
    #[serde(default)]
    pub users: Option<PathBuf>,
    /// `movielens`, `pog`, `ser30k`: the dataset's folder.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// `movielens`: poster images `<movieId>.{jpg,jpeg,png,webp}`, relative to `root`.
    #[serde(default = "posters")]
    pub posters: PathBuf,
    /// `movielens`: ratings at or above this count as interactions (the paper: 4).
    #[serde(default = "four")]
    pub min_rating: f64,
    /// `pog`: keep a seeded random subset of this many users.
    #[serde(default)]
    pub max_users: Option<usize>,
    /// `ser30k`: how many users to make by merging two themes.
    #[serde(default = "thousand")]
    pub merged_users: usize,
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
    /// How rankers hold out each user's interactions (`ragar train-ranker`).
    #[serde(default)]
    pub holdout: crate::ranking::Holdout,
}

fn posters() -> PathBuf {
    PathBuf::from("posters")
}
fn four() -> f64 {
    4.0
}
fn thousand() -> usize {
    1000
}
fn twenty() -> usize {
    20
}
fn tenth() -> f64 {
    0.1
}

impl DatasetConfig {
    /// A required path of this format (`${RAGAR_CACHE}` expanded, relative
    /// to the config's folder), or an error naming the key.
    fn path(&self, key: &str, v: &Option<PathBuf>, base: &Path, cache: &Path) -> Result<PathBuf> {
        let expand = |p: &PathBuf| {
            let s = p.to_string_lossy().replace("${RAGAR_CACHE}", &cache.to_string_lossy());
            base.join(s)
        };
        v.as_ref().map(expand).ok_or_else(|| {
            Error::config(format!(
                "dataset.{key} is required for dataset.format: {}",
                serde_json::to_value(self.format).expect("plain enum")
            ))
        })
    }
}

/// A catalogue item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Id.
    pub id: String,
    /// Image file (absolute after loading); `None` when the dataset has none
    /// for this item (a movie without a poster).
    pub image: Option<PathBuf>,
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
    /// Each user's whole interaction sequence, oldest first (the last item
    /// is the reference); aligned with `users`.
    pub sequences: Vec<Vec<String>>,
    /// Indices into `users`.
    pub train: Vec<usize>,
    /// Indices into `users`.
    pub valid: Vec<usize>,
    /// Indices into `users`.
    pub test: Vec<usize>,
    /// What loading decided that a user should know (users skipped, items
    /// without images).
    pub notes: Vec<String>,
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

/// What a format loader returns: items in file order, and each user's
/// whole ordered sequence with an explicit reference where the format has one.
pub(crate) struct Raw {
    items: Vec<Item>,
    users: Vec<(User, Vec<String>)>,
    notes: Vec<String>,
}

/// A user whose whole sequence is `seq`: the last item the reference, the
/// ones before it the history; `None` with fewer than two items.
pub(crate) fn from_sequence(user: String, seq: Vec<String>) -> Option<(User, Vec<String>)> {
    if seq.len() < 2 {
        return None;
    }
    let mut history = seq.clone();
    let reference = history.pop();
    Some((
        User {
            user,
            history,
            reference,
        },
        seq,
    ))
}

/// Image files of `dir` by file stem (jpg, jpeg, png, webp; any case);
/// `None` when `dir` does not exist.
pub(crate) fn image_files(dir: &Path) -> Result<Option<HashMap<String, PathBuf>>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png" | "webp")) {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.insert(stem.to_string(), path.clone());
            }
        }
    }
    Ok(Some(out))
}

impl Dataset {
    /// Load and check a dataset; relative paths resolve against `base`,
    /// `${RAGAR_CACHE}` to `cache`.
    pub fn load(cfg: &DatasetConfig, base: &Path, cache: &Path) -> Result<Self> {
        if !(0.0..1.0).contains(&(cfg.valid + cfg.test)) || cfg.valid < 0.0 || cfg.test < 0.0 {
            return Err(Error::config(format!(
                "dataset.valid + dataset.test must be in [0, 1), got {} + {}",
                cfg.valid, cfg.test
            )));
        }
        if cfg.history_len == 0 {
            return Err(Error::config("dataset.history_len must be at least 1"));
        }
        let raw = match cfg.format {
            Format::Jsonl => jsonl::load(
                &cfg.path("items", &cfg.items, base, cache)?,
                &cfg.path("users", &cfg.users, base, cache)?,
            )?,
            Format::Movielens => movielens::load(cfg, &cfg.path("root", &cfg.root, base, cache)?)?,
            Format::Pog => pog::load(cfg, &cfg.path("root", &cfg.root, base, cache)?)?,
            Format::Ser30k => ser30k::load(cfg, &cfg.path("root", &cfg.root, base, cache)?)?,
        };
        let mut items = HashMap::new();
        let mut item_order = Vec::new();
        for it in raw.items {
            item_order.push(it.id.clone());
            items.insert(it.id.clone(), it);
        }
        let (mut users, mut sequences) = (Vec::new(), Vec::new());
        for (mut u, seq) in raw.users {
            let keep = u.history.len().saturating_sub(cfg.history_len);
            u.history.drain(..keep);
            users.push(u);
            sequences.push(seq);
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
        Ok(Dataset {
            items,
            item_order,
            users,
            sequences,
            valid: order[..nv].to_vec(),
            test: order[nv..nv + nt].to_vec(),
            train: order[nv + nt..].to_vec(),
            notes: raw.notes,
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

    /// An item's image file, or an error naming the item.
    pub fn image_path(&self, id: &str) -> Result<&Path> {
        self.items[id]
            .image
            .as_deref()
            .ok_or_else(|| Error::invalid_input(format!("item '{id}' has no image in this dataset")))
    }
}
