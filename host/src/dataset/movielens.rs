//! GroupLens MovieLens, ml-latest and ml-latest-small, in their own files:
//!
//! - `ratings.csv`: `userId,movieId,rating,timestamp` (header first;
//!   ratings 0.5-5.0 in half stars; Unix seconds);
//! - `movies.csv`: `movieId,title,genres` (title with the year in
//!   parentheses, quoted when it has commas; genres `|`-separated or
//!   `(no genres listed)`);
//! - posters, which GroupLens does not ship: `<posters>/<movieId>.<ext>`
//!   (jpg, jpeg, png, webp), as the poster crawls of the reference systems
//!   store them. Movies without one keep `image: None`.
//!
//! Sequences as the paper builds them: a user's ratings at or above
//! `min_rating` (4) sorted by time (ties in file order), the last one the
//! reference, the ones before it the history. Users with fewer than two
//! such ratings cannot give a history and a reference and are skipped (the
//! count is a note). An item's text is its title and genres.

use super::{DatasetConfig, Item, Raw};
use ragar_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A CSV file read by column name, with errors naming file, line and column.
struct Csv {
    path: PathBuf,
    reader: csv::Reader<std::fs::File>,
    columns: Vec<usize>,
}

impl Csv {
    fn open(path: &Path, want: &[&str]) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
        let header = reader
            .headers()
            .map_err(|e| Error::invalid_input(format!("{}: header: {e}", path.display())))?
            .clone();
        let columns = want
            .iter()
            .map(|w| {
                header.iter().position(|h| h.trim() == *w).ok_or_else(|| {
                    Error::invalid_input(format!(
                        "{}: no '{w}' column (expected {}; found {})",
                        path.display(),
                        want.join(","),
                        header.iter().collect::<Vec<_>>().join(",")
                    ))
                })
            })
            .collect::<Result<_>>()?;
        Ok(Csv {
            path: path.to_path_buf(),
            reader,
            columns,
        })
    }

    /// Each data row as `(line, fields in the order asked)`.
    fn rows(&mut self, mut f: impl FnMut(usize, Vec<&str>) -> Result<()>) -> Result<()> {
        let mut rec = csv::StringRecord::new();
        loop {
            let ok = self.reader.read_record(&mut rec).map_err(|e| {
                let line = e.position().map_or(0, |p| p.line());
                Error::invalid_input(format!("{}:{line}: {e}", self.path.display()))
            })?;
            if !ok {
                return Ok(());
            }
            let line = rec.position().map_or(0, |p| p.line()) as usize;
            let fields = self
                .columns
                .iter()
                .map(|&c| {
                    rec.get(c).ok_or_else(|| {
                        Error::invalid_input(format!(
                            "{}:{line}: {} fields, the header has more",
                            self.path.display(),
                            rec.len()
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            f(line, fields)?;
        }
    }
}

/// A field parsed, or an error naming file, line, column and value.
fn parse<T: FromStr>(path: &Path, line: usize, column: &str, v: &str) -> Result<T> {
    v.trim().parse().map_err(|_| {
        Error::invalid_input(format!(
            "{}:{line}: column '{column}': '{v}' is not a valid value",
            path.display()
        ))
    })
}

/// Load `root`.
pub(crate) fn load(cfg: &DatasetConfig, root: &Path) -> Result<Raw> {
    let mut notes = Vec::new();
    // Movies.
    let movies_path = root.join("movies.csv");
    let mut movies = Csv::open(&movies_path, &["movieId", "title", "genres"])?;
    let poster_dir = root.join(&cfg.posters);
    let poster_files = super::image_files(&poster_dir)?;
    let mut items = Vec::new();
    let mut known: HashMap<String, usize> = HashMap::new();
    movies.rows(|line, f| {
        let id: u64 = parse(&movies_path, line, "movieId", f[0])?;
        let id = id.to_string();
        if let Some(first) = known.insert(id.clone(), line) {
            return Err(Error::invalid_input(format!(
                "{}:{line}: movieId {id} appears twice (first on line {first})",
                movies_path.display()
            )));
        }
        let genres: Vec<&str> = f[2]
            .split('|')
            .filter(|g| !g.is_empty() && *g != "(no genres listed)")
            .collect();
        let title = f[1].trim();
        let text = match (title.is_empty(), genres.is_empty()) {
            (_, true) => title.to_string(),
            (true, false) => format!("Genres: {}", genres.join(", ")),
            (false, false) => format!("{title}. Genres: {}", genres.join(", ")),
        };
        let image = poster_files.as_ref().and_then(|p| p.get(&id).cloned());
        items.push(Item { id, image, text });
        Ok(())
    })?;
    match &poster_files {
        None => notes.push(format!(
            "no posters folder at {}: items have text only (image features, captions and generation need posters)",
            poster_dir.display()
        )),
        Some(_) => {
            let missing = items.iter().filter(|i| i.image.is_none()).count();
            if missing > 0 {
                notes.push(format!(
                    "{missing} of {} movies have no poster in {}",
                    items.len(),
                    poster_dir.display()
                ));
            }
        }
    }
    // Ratings.
    let ratings_path = root.join("ratings.csv");
    let mut ratings = Csv::open(&ratings_path, &["userId", "movieId", "rating", "timestamp"])?;
    // Per user, in order of first appearance: (timestamp, line, movieId) of each liked movie.
    type Events = Vec<(i64, usize, String)>;
    let mut per_user: Vec<(String, Events)> = Vec::new();
    let mut user_row: HashMap<String, usize> = HashMap::new();
    ratings.rows(|line, f| {
        let user: u64 = parse(&ratings_path, line, "userId", f[0])?;
        let movie: u64 = parse(&ratings_path, line, "movieId", f[1])?;
        let rating: f64 = parse(&ratings_path, line, "rating", f[2])?;
        let time: i64 = parse(&ratings_path, line, "timestamp", f[3])?;
        if !(0.5..=5.0).contains(&rating) {
            return Err(Error::invalid_input(format!(
                "{}:{line}: column 'rating': {rating} is outside 0.5-5.0",
                ratings_path.display()
            )));
        }
        let movie = movie.to_string();
        if !known.contains_key(&movie) {
            return Err(Error::invalid_input(format!(
                "{}:{line}: movieId {movie} is not in {}",
                ratings_path.display(),
                movies_path.display()
            )));
        }
        let user = user.to_string();
        let row = *user_row.entry(user.clone()).or_insert_with(|| {
            per_user.push((user, Vec::new()));
            per_user.len() - 1
        });
        if rating >= cfg.min_rating {
            per_user[row].1.push((time, line, movie));
        }
        Ok(())
    })?;
    let mut users = Vec::new();
    let mut skipped = 0;
    for (user, mut events) in per_user {
        events.sort_by_key(|(t, line, _)| (*t, *line));
        let mut seen = HashSet::new();
        let seq: Vec<String> = events
            .into_iter()
            .filter(|(_, _, m)| seen.insert(m.clone()))
            .map(|(_, _, m)| m)
            .collect();
        match super::from_sequence(user, seq) {
            Some(u) => users.push(u),
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        notes.push(format!(
            "{skipped} users have fewer than two ratings >= {} and were skipped",
            cfg.min_rating
        ));
    }
    if users.is_empty() {
        return Err(Error::invalid_input(format!(
            "{}: no user has two or more ratings >= {}",
            ratings_path.display(),
            cfg.min_rating
        )));
    }
    Ok(Raw { items, users, notes })
}
