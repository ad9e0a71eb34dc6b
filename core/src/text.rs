//! The sentence-transformers text pipeline shared by every backend's text
//! encoder: the model folder layout, tokenisation with truncation reporting,
//! and attention-masked mean pooling + L2 normalisation.
//!
//! Only the transformer forward pass differs between candle, ONNX Runtime and
//! libtorch; everything before and after it lives here so the three backends
//! cannot drift apart.

use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::files::read_json;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tokenizers::{Tokenizer, TruncationParams};

/// A sentence-transformers model folder (`modules.json`, `1_Pooling/`, ...).
#[derive(Clone, Debug)]
pub struct SentenceModelDir {
    /// The folder.
    pub root: PathBuf,
    /// `max_seq_length` from `sentence_bert_config.json` (else the position limit).
    pub max_seq_length: usize,
    /// Output dimension from `1_Pooling/config.json` (else `hidden_size`).
    pub dim: usize,
    /// Whether `modules.json` ends in a Normalize module.
    pub normalize: bool,
}

#[derive(serde::Deserialize)]
struct BertConfigLite {
    hidden_size: usize,
    max_position_embeddings: usize,
}

#[derive(serde::Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
}

impl SentenceModelDir {
    /// Open and check a model folder; every missing file is named.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::not_found(format!(
                "model folder {} does not exist (run scripts/setup.sh to fetch the test weights)",
                root.display()
            )));
        }
        let cfg: BertConfigLite = read_json(&root.join("config.json"))?;
        let max_seq_length = match root.join("sentence_bert_config.json") {
            p if p.exists() => {
                let v: serde_json::Value = read_json(&p)?;
                v["max_seq_length"]
                    .as_u64()
                    .map_or(cfg.max_position_embeddings, |n| n as usize)
            }
            _ => cfg.max_position_embeddings,
        };
        let mut dim = cfg.hidden_size;
        let pooling = root.join("1_Pooling/config.json");
        if pooling.exists() {
            let p: PoolingConfig = read_json(&pooling)?;
            if !p.pooling_mode_mean_tokens || p.pooling_mode_cls_token || p.pooling_mode_max_tokens {
                return Err(Error::unsupported(format!(
                    "{}: only mean pooling is implemented",
                    pooling.display()
                )));
            }
            dim = p.word_embedding_dimension;
        }
        let normalize = match root.join("modules.json") {
            p if p.exists() => {
                let v: serde_json::Value = read_json(&p)?;
                v.as_array().is_some_and(|mods| {
                    mods.iter()
                        .any(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
                })
            }
            // A bare transformers folder: normalise, as retrieval uses cosine anyway.
            _ => true,
        };
        Ok(SentenceModelDir {
            root: root.to_path_buf(),
            max_seq_length,
            dim,
            normalize,
        })
    }

    /// A file inside the folder that must exist.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        let p = self.root.join(name);
        if !p.exists() {
            return Err(Error::not_found(format!("missing model file {}", p.display())));
        }
        Ok(p)
    }

    /// The folder's tokenizer, set up for [`SentenceTokenizer`].
    pub fn tokenizer(&self) -> Result<SentenceTokenizer> {
        SentenceTokenizer::from_file(&self.file("tokenizer.json")?, self.max_seq_length)
    }
}

/// A batch of token ids, padded to its longest member.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    /// Rows in the batch.
    pub batch: usize,
    /// Padded sequence length.
    pub seq_len: usize,
    /// `[batch * seq_len]` token ids.
    pub ids: Vec<i64>,
    /// `[batch * seq_len]` 1 for real tokens, 0 for padding.
    pub mask: Vec<i64>,
    /// `[batch * seq_len]` segment ids (all 0 for single sentences).
    pub type_ids: Vec<i64>,
    /// Indices of texts that were truncated to `max_seq_length`.
    pub truncated: Vec<u32>,
}

/// A tokenizer with sentence-transformers' truncation and dynamic padding.
///
/// The tokenizer.json shipped with all-MiniLM-L6-v2 pads and truncates to a
/// fixed 128 tokens; sentence-transformers instead truncates at
/// `max_seq_length` (256) and pads to the longest text in the batch. Both
/// settings are replaced here so every backend sees what the reference sees.
pub struct SentenceTokenizer {
    inner: Tokenizer,
    max_len: usize,
    pad_id: i64,
}

impl SentenceTokenizer {
    /// Load `tokenizer.json`, truncating at `max_len` tokens (special tokens
    /// included); batches are padded with the pad token named by the sibling
    /// `tokenizer_config.json` (else `[PAD]`, else id 0).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let inner = Tokenizer::from_file(path).or_err(ErrorKind::Model, path.display())?;
        Self::new(inner, path, max_len)
    }

    /// The tokenizer of a folder: `tokenizer.json` when present, else a CLIP
    /// BPE tokenizer from `vocab.json` + `merges.txt` (the slow-tokenizer
    /// files that Stable Diffusion repos ship alone; see [`clip_bpe_tokenizer`]).
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json, max_len);
        }
        let inner = clip_bpe_tokenizer(&dir.join("vocab.json"), &dir.join("merges.txt"))?;
        Self::new(inner, &json, max_len)
    }

    /// `path`: where `tokenizer.json` is or would be (its folder's
    /// `tokenizer_config.json` names the pad token).
    fn new(mut inner: Tokenizer, path: &Path, max_len: usize) -> Result<Self> {
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .or_err(ErrorKind::Model, path.display())?;
        let pad_token = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .filter(|p| p.is_file())
            .and_then(|p| read_json::<serde_json::Value>(&p).ok())
            .and_then(|v| match &v["pad_token"] {
                serde_json::Value::String(s) => Some(s.clone()),
                other => other["content"].as_str().map(str::to_string),
            })
            .unwrap_or_else(|| "[PAD]".into());
        let pad_id = inner.token_to_id(&pad_token).unwrap_or(0) as i64;
        // Padding is ours (TokenBatch::pad), per batch of similar lengths.
        inner.with_padding(None);
        Ok(SentenceTokenizer { inner, max_len, pad_id })
    }

    /// The id batches are padded with.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Longest sequence in tokens.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenise each text on its own (no padding), one after another on the
    /// calling thread. tokenizers' `encode_batch` would run them on rayon's
    /// pool, whose workers then spin on the cores that ONNX Runtime's and
    /// libtorch's own worker threads need next; a text takes microseconds
    /// to tokenise and milliseconds to encode.
    pub fn encode_each(&self, texts: &[String]) -> Result<Vec<Encoded>> {
        texts
            .iter()
            .map(|t| {
                let e = self
                    .inner
                    .encode(t.as_str(), true)
                    .map_err(|e| Error::invalid_input(format!("tokenising: {e}")))?;
                Ok(Encoded {
                    ids: e.get_ids().iter().map(|&x| x as i64).collect(),
                    type_ids: e.get_type_ids().iter().map(|&x| x as i64).collect(),
                    truncated: !e.get_overflowing().is_empty(),
                })
            })
            .collect()
    }

    /// Tokenise a batch of texts, padded to its longest.
    pub fn encode(&self, texts: &[String]) -> Result<TokenBatch> {
        let enc = self.encode_each(texts)?;
        Ok(TokenBatch::pad(&enc.iter().collect::<Vec<_>>(), self.pad_id))
    }
}

/// One tokenised text.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// Token ids, special tokens included.
    pub ids: Vec<i64>,
    /// Segment ids.
    pub type_ids: Vec<i64>,
    /// Whether the text was cut at the tokenizer's limit.
    pub truncated: bool,
}

impl TokenBatch {
    /// Pad `items` to the longest with `pad_id` (mask 0, segment 0).
    pub fn pad(items: &[&Encoded], pad_id: i64) -> TokenBatch {
        let seq_len = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let n = items.len() * seq_len;
        let mut b = TokenBatch {
            batch: items.len(),
            seq_len,
            ids: Vec::with_capacity(n),
            mask: Vec::with_capacity(n),
            type_ids: Vec::with_capacity(n),
            truncated: Vec::new(),
        };
        for (i, e) in items.iter().enumerate() {
            let pad = seq_len - e.ids.len();
            b.ids
                .extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            b.mask
                .extend(std::iter::repeat_n(1, e.ids.len()).chain(std::iter::repeat_n(0, pad)));
            b.type_ids
                .extend(e.type_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
            if e.truncated {
                b.truncated.push(i as u32);
            }
        }
        b
    }
}

/// Attention-masked mean over tokens, then (optionally) L2 normalisation:
/// sentence-transformers' Pooling(mean) + Normalize. `hidden` is
/// `[batch, seq_len, dim]` row-major.
pub fn mean_pool(hidden: &[f32], batch: &TokenBatch, dim: usize, normalize: bool) -> Vec<Vec<f32>> {
    (0..batch.batch)
        .map(|b| {
            let mut acc = vec![0f32; dim];
            let mut count = 0f32;
            for t in 0..batch.seq_len {
                if batch.mask[b * batch.seq_len + t] == 0 {
                    continue;
                }
                count += 1.0;
                let row = &hidden[(b * batch.seq_len + t) * dim..][..dim];
                acc.iter_mut().zip(row).for_each(|(a, x)| *a += x);
            }
            // sentence-transformers clamps the token count at 1e-9.
            let count = count.max(1e-9);
            acc.iter_mut().for_each(|a| *a /= count);
            if normalize {
                // F.normalize: x / max(||x||, 1e-12).
                let norm = acc.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                acc.iter_mut().for_each(|a| *a /= norm);
            }
            acc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_ignores_padding_and_normalises() {
        let batch = TokenBatch {
            batch: 1,
            seq_len: 3,
            ids: vec![1, 2, 0],
            mask: vec![1, 1, 0],
            type_ids: vec![0; 3],
            truncated: vec![],
        };
        // Third token is padding with a huge value that must not count.
        let hidden = [1.0, 0.0, 3.0, 4.0, 100.0, 100.0];
        let raw = mean_pool(&hidden, &batch, 2, false);
        assert_eq!(raw, vec![vec![2.0, 2.0]]);
        let unit = mean_pool(&hidden, &batch, 2, true);
        let s = 1.0 / 2f32.sqrt();
        assert!((unit[0][0] - s).abs() < 1e-6 && (unit[0][1] - s).abs() < 1e-6);
    }
}

/// The `params:` of a sentence-transformers text encoder, the same for every
/// backend so that `encoder.backend=...` switches backend and nothing else.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentenceEncoderParams {
    /// The model folder (`${RAGAR_CACHE}` and config-relative paths allowed).
    pub model_dir: String,
    /// Texts per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// The weights file inside `model_dir`, when not the backend's default
    /// (`model.safetensors` for candle, `model.onnx` for ort, `model.ts` for tch).
    #[serde(default)]
    pub file: Option<String>,
}

fn default_batch() -> usize {
    32
}

/// Optional files of a sentence-transformers folder, fetched when present upstream.
const OPTIONAL_FILES: [&str; 4] = [
    "sentence_bert_config.json",
    "modules.json",
    "1_Pooling/config.json",
    "tokenizer_config.json",
];

impl SentenceEncoderParams {
    /// Parse from a spec, resolve `model_dir` (a folder or `hf:org/name@rev`)
    /// and find the backend's weights file (`file`, else `default_file`).
    /// With [`Fetch::Never`](crate::model::Fetch) nothing is downloaded.
    pub fn open(
        spec: &crate::ComponentSpec,
        default_file: &str,
        fetch: crate::model::Fetch,
    ) -> Result<(Self, SentenceModelDir, PathBuf)> {
        use crate::model::ModelSource;
        let params: Self = spec.params()?;
        if params.batch_size == 0 {
            return Err(Error::config(format!(
                "{}.params.batch_size must be at least 1",
                spec.key
            )));
        }
        let source = ModelSource::parse(&params.model_dir, |p| spec.resolve_path(p))?;
        let root = source.resolve(&["config.json", "tokenizer.json"], &OPTIONAL_FILES, fetch)?;
        let dir = SentenceModelDir::open(&root)?;
        let file = params.file.as_deref().unwrap_or(default_file);
        let weights = match source.resolve(&[file], &[], fetch) {
            Ok(d) => d.join(file),
            Err(_) if matches!(source, ModelSource::Local(_)) => {
                return Err(Error::not_found(format!(
                    "missing model file {} (run scripts/setup.sh; for other checkpoints export ONNX/TorchScript \
                     with: python scripts/export_minilm.py {}{})",
                    root.join(file).display(),
                    root.display(),
                    crate::DType::of_exported_file(file).export_flag()
                )))
            }
            Err(e) => return Err(e),
        };
        Ok((params, dir, weights))
    }
}

/// The probe of a sentence encoder whose backend reads `default_file`:
/// params parse, the folder (local or already in the HF cache) and its
/// configs are readable, the weights file exists; reports `text_dim` and
/// `max_tokens`. Reads no weights and downloads nothing.
pub fn probe(spec: &crate::ComponentSpec, default_file: &str) -> Result<crate::component::Probe> {
    let (_, dir, weights) = SentenceEncoderParams::open(spec, default_file, crate::model::Fetch::Never)?;
    let probe = crate::component::Probe::default()
        .file(&weights)?
        .file(&dir.file("tokenizer.json")?)?;
    Ok(probe
        .fact("text_dim", dir.dim as u64)
        .fact("max_tokens", dir.max_seq_length as u64))
}

/// Embed `texts` in chunks of `batch_size` with `forward`, which maps a token
/// batch to its last hidden state `[batch, seq_len, hidden]` (row-major).
/// This is the whole encoder except the transformer itself.
pub fn embed_in_batches(
    texts: &[String],
    batch_size: usize,
    tokenizer: &SentenceTokenizer,
    dir: &SentenceModelDir,
    mut forward: impl FnMut(&TokenBatch) -> Result<Vec<f32>>,
) -> Result<crate::stage::TextEmbeddings> {
    // Batch texts of similar length together (longest first), as
    // sentence-transformers does: padding to each batch's longest text then
    // wastes little work. Rows are put back in input order afterwards.
    let encoded = tokenizer.encode_each(texts)?;
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].ids.len()));
    let mut rows = vec![Vec::new(); texts.len()];
    let mut truncated = Vec::new();
    for idx in order.chunks(batch_size.max(1)) {
        let batch = TokenBatch::pad(&idx.iter().map(|&i| &encoded[i]).collect::<Vec<_>>(), tokenizer.pad_id);
        let hidden = forward(&batch)?;
        let want = batch.batch * batch.seq_len * dir.dim;
        if hidden.len() != want {
            return Err(Error::model(format!(
                "transformer returned {} values, expected {want} ({} x {} x {})",
                hidden.len(),
                batch.batch,
                batch.seq_len,
                dir.dim
            )));
        }
        for (k, row) in mean_pool(&hidden, &batch, dir.dim, dir.normalize)
            .into_iter()
            .enumerate()
        {
            rows[idx[k]] = row;
        }
        truncated.extend(batch.truncated.iter().map(|&k| idx[k as usize] as u32));
    }
    truncated.sort_unstable();
    let vectors = if rows.is_empty() {
        crate::Tensor::from_f32(&[0, dir.dim], vec![])?
    } else {
        crate::Tensor::from_rows(&rows)?
    };
    Ok(crate::stage::TextEmbeddings {
        vectors,
        truncated: truncated.into(),
    })
}

/// The [`crate::stage::EncoderInfo`] of a sentence-transformers model.
pub fn encoder_info(dir: &SentenceModelDir) -> crate::stage::EncoderInfo {
    crate::stage::EncoderInfo {
        dim: dir.dim as u32,
        text: true,
        image: false,
        max_tokens: dir.max_seq_length as u32,
        normalized: dir.normalize,
    }
}

/// Qwen2's split rule (single digits), from its tokenizer.json.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split rule (digit runs of up to three), from its tokenizer.json.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer rebuilt from GGUF metadata
/// (`tokenizer.ggml.model = gpt2`): `tokens` by id, `merges` as "a b",
/// `types` (3 = control tokens, kept whole as special tokens), and the
/// llama.cpp pre-tokenizer name (`smollm`, `llama-bpe`, `qwen2`, ... — digits
/// are split individually for `smollm`, kept in runs otherwise).
pub fn gguf_bpe_tokenizer(tokens: &[String], types: &[i32], merges: &[String], pre: &str) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::AddedToken;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::model(format!("GGUF merge '{m}' is not 'a b'")))
        })
        .collect::<Result<Vec<_>>>()?;
    // Llama 3 looks whole pre-tokens up in the vocabulary before merging.
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
        .build()
        .map_err(|e| Error::model(format!("GGUF tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    // llama.cpp's pre-tokenizer names -> the split rules of the original tokenizer.json.
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let pattern = tokenizers::pre_tokenizers::split::SplitPattern::Regex(re.into());
        tokenizers::pre_tokenizers::split::Split::new(pattern, tokenizers::SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| Error::model(format!("GGUF pre-tokenizer '{pre}': {e}")))
    };
    let bytes_only = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
    let pre_tok = match pre {
        "smollm" => Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]),
        "qwen2" => Sequence::new(vec![split(QWEN2_SPLIT)?, bytes_only]),
        "llama-bpe" | "llama3" => Sequence::new(vec![split(LLAMA3_SPLIT)?, bytes_only]),
        _ => Sequence::new(vec![PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))]),
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    if pre == "qwen2" {
        // Qwen's tokenizer.json normalises to NFC first.
        tok.with_normalizer(Some(tokenizers::normalizers::unicode::NFC));
    }
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == 3)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(&special);
    Ok(tok)
}

/// OpenAI CLIP's tokenizer from the slow-tokenizer files (`vocab.json`,
/// `merges.txt`), built as transformers' `CLIPTokenizerFast` converts them:
/// NFC, whitespace runs to one space, lower case; CLIP's split pattern then
/// byte-level symbols; BPE with the `</w>` end-of-word suffix;
/// `<|startoftext|>` ... `<|endoftext|>` around every text.
pub fn clip_bpe_tokenizer(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    let vocab_map: serde_json::Map<String, serde_json::Value> = read_json(vocab)?;
    let text = std::fs::read_to_string(merges).or_err(ErrorKind::Io, merges.display())?;
    let merges_list: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    let id = |t: &str| -> Result<u64> {
        vocab_map
            .get(t)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::model(format!("{}: no '{t}' entry (not a CLIP vocabulary)", vocab.display())))
    };
    let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let special = |t: &str, i: u64| {
        serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special("<|startoftext|>", bos), special("<|endoftext|>", eos)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos],
                           "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_map, "merges": merges_list},
    });
    Tokenizer::from_str(&spec.to_string()).map_err(|e| {
        Error::model(format!(
            "{} + {}: not a CLIP BPE tokenizer: {e}",
            vocab.display(),
            merges.display()
        ))
    })
}

/// CLIP's pre-tokenisation pattern (the special tokens, English
/// contractions, letter runs, single digits, other symbol runs).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
