//! SER30K (Liu et al., ACM MM 2022), the sticker set the paper uses, in its
//! own layout:
//!
//! - `Images/<theme>/<file>`: the stickers, one folder per theme;
//! - `Annotations/image-level/{train,val,test}.json`: `{"annotations":
//!   [{"topic", "file_name", "anno", "text"}, ...]}` — `topic` is the theme
//!   folder, `file_name` the file in it (a path under `Images/` is accepted
//!   too), `anno` the emotion label (1-7, optional), `text` what the sticker
//!   says (optional).
//!
//! SER30K has no users. The paper makes them: "we merge two random themes
//! into user historical sequences and randomly select a reference sticker
//! from other themes". Here: `merged_users` users (1,000 by default), each
//! from a seeded draw of two themes A, B and a third theme C; the history is
//! `history_len` stickers drawn without replacement from A and B together
//! (in draw order), the reference one sticker of C. An item's text is its
//! annotation text, or its theme's name when it has none. The same layout
//! carries the project's open sticker set (`scripts/data/make_stickers.py`).

use super::jsonl::inside;
use super::{DatasetConfig, Item, Raw, User};
use ragar_core::rng::TorchGenerator;
use ragar_core::{Error, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

#[derive(serde::Deserialize)]
struct AnnotationFile {
    annotations: Vec<Annotation>,
}

#[derive(serde::Deserialize)]
struct Annotation {
    topic: String,
    file_name: String,
    #[serde(default)]
    anno: Option<serde_json::Value>,
    #[serde(default)]
    text: Option<String>,
}

/// A uniform index below `n` from the generator's 32-bit stream.
fn below(g: &mut TorchGenerator, n: usize) -> usize {
    ((g.next_u32() as u64 * n as u64) >> 32) as usize
}

/// Load `root`.
pub(crate) fn load(cfg: &DatasetConfig, root: &Path) -> Result<Raw> {
    let ann_dir = root.join("Annotations/image-level");
    let images = root.join("Images");
    let mut items = Vec::new();
    let mut themes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut ids = HashSet::new();
    let mut found = 0;
    for part in ["train", "val", "test"] {
        let path = ann_dir.join(format!("{part}.json"));
        if !path.is_file() {
            continue;
        }
        found += 1;
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let file: AnnotationFile = serde_json::from_str(&text)
            .map_err(|e| Error::invalid_input(format!("{}:{}: {e}", path.display(), e.line())))?;
        for (i, a) in file.annotations.into_iter().enumerate() {
            let at = |what: String| {
                Error::invalid_input(format!(
                    "{}: annotations[{i}] ('{}'): {what}",
                    path.display(),
                    a.file_name
                ))
            };
            if a.topic.is_empty() || a.file_name.is_empty() {
                return Err(at("empty topic or file_name".into()));
            }
            let theme_dir = inside(&images, Path::new(&a.topic)).map_err(&at)?;
            let mut image = inside(&theme_dir, Path::new(&a.file_name)).map_err(&at)?;
            if !image.exists() {
                // Some copies give file_name relative to Images/.
                let alt = inside(&images, Path::new(&a.file_name)).map_err(&at)?;
                if alt.exists() {
                    image = alt;
                }
            }
            let id = format!("{}/{}", a.topic, a.file_name.rsplit('/').next().unwrap_or(&a.file_name));
            if !ids.insert(id.clone()) {
                return Err(at(format!("sticker '{id}' is annotated twice")));
            }
            if let Some(v) = &a.anno {
                if !v.is_u64() && !v.is_string() {
                    return Err(at(format!("anno {v} is not an emotion label")));
                }
            }
            let text = a
                .text
                .filter(|t| !t.trim().is_empty())
                .unwrap_or_else(|| a.topic.clone());
            themes.entry(a.topic.clone()).or_default().push(items.len());
            items.push(Item {
                id,
                image: Some(image),
                text,
            });
        }
    }
    if found == 0 {
        return Err(Error::invalid_input(format!(
            "{}: no train.json, val.json or test.json",
            ann_dir.display()
        )));
    }
    let usable: Vec<&Vec<usize>> = themes.values().filter(|v| !v.is_empty()).collect();
    if usable.len() < 3 {
        return Err(Error::invalid_input(format!(
            "{}: {} themes; merged users need at least three (two for the history, one for the reference)",
            ann_dir.display(),
            usable.len()
        )));
    }
    let names: Vec<&String> = themes.keys().collect();
    let mut g = TorchGenerator::new(cfg.split_seed ^ 0x5e830);
    let mut users = Vec::new();
    for u in 0..cfg.merged_users {
        // Three distinct themes.
        let mut pick = Vec::new();
        while pick.len() < 3 {
            let t = below(&mut g, names.len());
            if !pick.contains(&t) {
                pick.push(t);
            }
        }
        let mut pool: Vec<usize> = themes[names[pick[0]]]
            .iter()
            .chain(&themes[names[pick[1]]])
            .copied()
            .collect();
        let n = cfg.history_len.min(pool.len());
        // Partial Fisher-Yates: the first n of the pool, in draw order.
        for i in 0..n {
            let j = i + below(&mut g, pool.len() - i);
            pool.swap(i, j);
        }
        let history: Vec<String> = pool[..n].iter().map(|&i| items[i].id.clone()).collect();
        let c = &themes[names[pick[2]]];
        let reference = items[c[below(&mut g, c.len())]].id.clone();
        let mut seq = history.clone();
        seq.push(reference.clone());
        users.push((
            User {
                user: format!("u{u:05}-{}+{}", names[pick[0]], names[pick[1]]),
                history,
                reference: Some(reference),
            },
            seq,
        ));
    }
    let notes = vec![format!(
        "{} stickers in {} themes; {} merged users (two themes each, reference from a third)",
        items.len(),
        themes.len(),
        users.len()
    )];
    Ok(Raw { items, users, notes })
}
