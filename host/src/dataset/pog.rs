//! POG (Alibaba iFashion; Chen et al., KDD 2019) in its released files,
//! comma-separated, no header:
//!
//! - `item_data.txt`: `item_id,cate_id,pic_url,title` (the title is the
//!   rest of the line: it may itself hold commas);
//! - `user_data.txt`: `user_id,item_id;item_id;...,outfit_id` — the items a
//!   user clicked, in order, and an outfit;
//! - `outfit_data.txt` (optional, checked when present):
//!   `outfit_id,item_id;item_id;...`;
//! - `images/<item_id>.<ext>` (jpg, jpeg, png, webp): the pictures behind
//!   `pic_url`, which the dataset does not ship.
//!
//! A user's clicked items in order are their sequence (repeats after the
//! first kept out), the last one the reference. The paper works on "a
//! subset of users": `max_users` draws one with the split seed (file order
//! kept). A user id may appear on several lines (one per outfit); their
//! clicks are joined in file order.

use super::{DatasetConfig, Item, Raw};
use ragar_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;

fn lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text =
        String::from_utf8(text).map_err(|e| Error::invalid_input(format!("{}: not UTF-8 ({e})", path.display())))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r').to_string()))
        .collect())
}

/// Load `root`.
pub(crate) fn load(cfg: &DatasetConfig, root: &Path) -> Result<Raw> {
    let mut notes = Vec::new();
    let items_path = root.join("item_data.txt");
    let pictures = super::image_files(&root.join("images"))?.unwrap_or_default();
    let mut items = Vec::new();
    let mut known: HashMap<String, usize> = HashMap::new();
    for (line, l) in lines(&items_path)? {
        let f: Vec<&str> = l.splitn(4, ',').collect();
        if f.len() < 3 || f[0].trim().is_empty() {
            return Err(Error::invalid_input(format!(
                "{}:{line}: expected item_id,cate_id,pic_url,title",
                items_path.display()
            )));
        }
        let id = f[0].trim().to_string();
        if let Some(first) = known.insert(id.clone(), line) {
            return Err(Error::invalid_input(format!(
                "{}:{line}: item {id} appears twice (first on line {first})",
                items_path.display()
            )));
        }
        items.push(Item {
            image: pictures.get(&id).cloned(),
            text: f.get(3).map_or("", |t| t.trim()).to_string(),
            id,
        });
    }
    let missing = items.iter().filter(|i| i.image.is_none()).count();
    if missing > 0 {
        notes.push(format!(
            "{missing} of {} items have no picture in {}",
            items.len(),
            root.join("images").display()
        ));
    }
    let outfits_path = root.join("outfit_data.txt");
    let mut outfits = HashSet::new();
    if outfits_path.is_file() {
        for (line, l) in lines(&outfits_path)? {
            let (id, members) = l.split_once(',').ok_or_else(|| {
                Error::invalid_input(format!(
                    "{}:{line}: expected outfit_id,item;item;...",
                    outfits_path.display()
                ))
            })?;
            if let Some(bad) = members.split(';').find(|m| !known.contains_key(m.trim())) {
                return Err(Error::invalid_input(format!(
                    "{}:{line}: outfit {id}: item {bad} is not in {}",
                    outfits_path.display(),
                    items_path.display()
                )));
            }
            outfits.insert(id.trim().to_string());
        }
    }
    let users_path = root.join("user_data.txt");
    let mut order: Vec<String> = Vec::new();
    let mut clicks: HashMap<String, Vec<String>> = HashMap::new();
    for (line, l) in lines(&users_path)? {
        let f: Vec<&str> = l.split(',').collect();
        if f.len() != 3 {
            return Err(Error::invalid_input(format!(
                "{}:{line}: expected user_id,item;item;...,outfit_id ({} fields)",
                users_path.display(),
                f.len()
            )));
        }
        let (user, seq, outfit) = (f[0].trim(), f[1].trim(), f[2].trim());
        if seq.is_empty() {
            return Err(Error::invalid_input(format!(
                "{}:{line}: user {user} has no items",
                users_path.display()
            )));
        }
        if !outfits.is_empty() && !outfits.contains(outfit) {
            return Err(Error::invalid_input(format!(
                "{}:{line}: user {user}: outfit {outfit} is not in {}",
                users_path.display(),
                outfits_path.display()
            )));
        }
        let entry = clicks.entry(user.to_string()).or_insert_with(|| {
            order.push(user.to_string());
            Vec::new()
        });
        for it in seq.split(';').map(str::trim) {
            if !known.contains_key(it) {
                return Err(Error::invalid_input(format!(
                    "{}:{line}: user {user}: item {it} is not in {}",
                    users_path.display(),
                    items_path.display()
                )));
            }
            if !entry.iter().any(|e| e == it) {
                entry.push(it.to_string());
            }
        }
    }
    if let Some(n) = cfg.max_users.filter(|&n| n < order.len()) {
        let mut idx: Vec<usize> = (0..order.len()).collect();
        ragar_core::rng::TorchGenerator::new(cfg.split_seed).shuffle(&mut idx);
        let mut keep: Vec<usize> = idx[..n].to_vec();
        keep.sort_unstable();
        notes.push(format!("{n} of {} users drawn (dataset.max_users)", order.len()));
        order = keep.into_iter().map(|i| order[i].clone()).collect();
    }
    let mut users = Vec::new();
    let mut short = 0;
    for user in order {
        let seq = clicks.remove(&user).unwrap_or_default();
        match super::from_sequence(user, seq) {
            Some(u) => users.push(u),
            None => short += 1,
        }
    }
    if short > 0 {
        notes.push(format!("{short} users with a single item were skipped"));
    }
    Ok(Raw { items, users, notes })
}
