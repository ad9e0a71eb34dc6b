//! The CLIP tokenizer built from vocab.json + merges.txt (what Stable
//! Diffusion repos ship) against the tokenizer.json that transformers'
//! CLIPTokenizerFast writes from the same files (scripts/setup.sh builds
//! both into .ragar/models/clip-tokenizer): identical ids on every line.
#![cfg(feature = "text")]

use ragar_core::text::clip_bpe_tokenizer;
use std::path::PathBuf;

#[test]
fn vocab_and_merges_tokenize_like_the_converted_tokenizer_json() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or(root.join(".ragar"));
    let dir = cache.join("models/clip-tokenizer");
    assert!(dir.is_dir(), "{} missing: run scripts/setup.sh", dir.display());
    let ours = clip_bpe_tokenizer(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut lines: Vec<String> = std::fs::read_to_string(root.join("tests/fixtures/sentences.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.extend(
        [
            "Café  au LAIT — 3.5 cups!!",
            "don't stop: it's 12:30",
            "  tabs\tand\nnewlines ",
            "emoji 🎉🎉 ok",
            "",
        ]
        .map(String::from),
    );
    for line in &lines {
        let a = ours.encode(line.as_str(), true).unwrap();
        let b = reference.encode(line.as_str(), true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{line:?}");
    }
}
