//! Keywords for RAGAR's Generation module (paper, Eq. 6 and the text after
//! it): the KeywordLLM answers a prompt per history item with a keyword
//! list; lists are parsed here, then the low-frequency keywords across the
//! user's history are filtered out and the top m kept for the preference
//! prompt (Eq. 7).
//!
//! Parsing accepts what instruction-tuned LLMs write: comma-, semicolon- or
//! line-separated lists, numbered or bulleted, quoted, with a leading
//! "Keywords:" label. Keywords are lower-cased and trimmed; duplicates in one
//! answer count once (frequency is over items, as in the paper: how many
//! history items share a keyword). Ties in frequency keep the keyword seen
//! first (earliest item, earliest position), so the result is deterministic.

use std::collections::HashMap;

/// Longest keyword kept, in words: longer "keywords" are sentences the model
/// wrote around its list.
pub const MAX_WORDS: usize = 4;

/// The keywords of one LLM answer, in order, without duplicates.
pub fn parse(answer: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in answer.lines() {
        let line = strip_label(line.trim());
        for piece in line.split([',', ';', '|']) {
            let k = clean(piece);
            if k.is_empty() || k.split_whitespace().count() > MAX_WORDS || out.contains(&k) {
                continue;
            }
            out.push(k);
        }
    }
    out
}

/// Drop a leading "Keywords:" style label.
fn strip_label(line: &str) -> &str {
    match line.split_once(':') {
        Some((label, rest)) if label.split_whitespace().count() <= 2 && !label.is_empty() => rest,
        _ => line,
    }
}

/// Trim list markers, quotes, brackets and end punctuation; lower-case.
fn clean(piece: &str) -> String {
    let mut s = piece.trim();
    // "1." / "2)" / "-" / "*" / "•" list markers.
    let digits = s.chars().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 && s[digits..].starts_with(['.', ')']) {
        s = &s[digits + 1..];
    }
    s = s.trim_start_matches(['-', '*', '•', ' ']);
    let s = s.trim_matches(|c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '"' | '\'' | '`' | '[' | ']' | '(' | ')' | '.' | '!' | '?' | '*' | '#'
            )
    });
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// A kept keyword and the number of history items that mention it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counted {
    /// The keyword.
    pub keyword: String,
    /// Items whose list contains it.
    pub count: usize,
}

/// The frequency filter: the `m` keywords mentioned by the most items
/// (ties: first seen first). `per_item` holds each item's parsed list.
pub fn top_m(per_item: &[Vec<String>], m: usize) -> Vec<Counted> {
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut order = 0;
    for list in per_item {
        let mut seen_here: Vec<&str> = Vec::new();
        for k in list {
            if seen_here.contains(&k.as_str()) {
                continue;
            }
            seen_here.push(k);
            *counts.entry(k).or_default() += 1;
            first_seen.entry(k).or_insert_with(|| {
                order += 1;
                order
            });
        }
    }
    let mut all: Vec<(&str, usize)> = counts.into_iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then(first_seen[a.0].cmp(&first_seen[b.0])));
    all.into_iter()
        .take(m)
        .map(|(k, count)| Counted {
            keyword: k.to_string(),
            count,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shapes_llms_answer_in() {
        assert_eq!(
            parse("red, Floral , summer dress."),
            vec!["red", "floral", "summer dress"]
        );
        assert_eq!(
            parse("Keywords:\n1. Red\n2) floral print\n- \"summer\"\n* red"),
            vec!["red", "floral print", "summer"]
        );
        assert_eq!(
            parse("Keywords: denim; jacket | silver buttons"),
            vec!["denim", "jacket", "silver buttons"]
        );
        // A sentence around the list is not a keyword.
        assert_eq!(
            parse("Here are some keywords that describe this item well\nretro, sneakers"),
            vec!["retro", "sneakers"]
        );
        assert!(parse("  \n , ,").is_empty());
    }

    #[test]
    fn keeps_the_most_shared_keywords_with_first_seen_ties() {
        let items = vec![
            vec!["red".to_string(), "dress".into(), "red".into()],
            vec!["blue".into(), "dress".into()],
            vec!["red".into(), "jacket".into()],
            vec!["blue".into()],
        ];
        let top = top_m(&items, 3);
        let got: Vec<(&str, usize)> = top.iter().map(|c| (c.keyword.as_str(), c.count)).collect();
        // red 2, dress 2, blue 2: order of first appearance (red, dress, blue).
        assert_eq!(got, vec![("red", 2), ("dress", 2), ("blue", 2)]);
        assert_eq!(top_m(&items, 0), vec![]);
        assert_eq!(top_m(&items, 10).len(), 4);
    }
}
