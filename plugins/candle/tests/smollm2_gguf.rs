//! The real SmolLM2-135M-Instruct GGUF (installed by scripts/setup.sh)
//! through the same loader users point at their GGUF files, against
//! transformers' GGUF loader (tests/fixtures/smollm2_reference.json, made by
//! scripts/reference_smollm2.py): tokenizer ids exactly; final-position
//! logits closely (transformers dequantizes to fp32, candle keeps Q4_1/Q8_0
//! matmuls, so small differences are expected).

use ragar_candle::keyword_llm::LlamaKeywordLlm;
use ragar_core::stage::{GenerateOptions, KeywordLlm};
use ragar_core::ComponentSpec;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn spec() -> ComponentSpec {
    let dir = std::env::var_os("RAGAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".ragar"));
    let dir = dir.join("models/smollm2-135m-instruct");
    assert!(dir.is_dir(), "{} missing: run scripts/setup.sh", dir.display());
    ComponentSpec::new(
        "keyword_llm",
        serde_json::json!({"model_dir": dir, "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_img_tokens": 4}),
    )
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/smollm2_reference.json")).unwrap())
        .unwrap()
}

#[test]
fn gguf_tokenizer_chat_template_and_logits_match_transformers() {
    let llm = LlamaKeywordLlm::load(&spec()).unwrap();
    for row in reference()["rows"].as_array().unwrap() {
        let (chat, ids) = llm.chat_prompt(row["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(chat, row["chat_text"].as_str().unwrap());
        let want: Vec<u32> = serde_json::from_value(row["ids"].clone()).unwrap();
        assert_eq!(ids, want, "token ids differ for {chat:?}");
        let logits = llm.final_logits(&ids).unwrap();
        let top: Vec<(usize, f64)> = serde_json::from_value(row["top_logits"].clone()).unwrap();
        let mut ours: Vec<usize> = (0..logits.len()).collect();
        ours.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let ref_top10: Vec<usize> = top.iter().take(10).map(|t| t.0).collect();
        let overlap = ours[..10].iter().filter(|i| ref_top10.contains(i)).count();
        let max_gap = top
            .iter()
            .map(|&(i, v)| (logits[i] as f64 - v).abs())
            .fold(0.0, f64::max);
        eprintln!("top-10 overlap {overlap}/10, max |logit diff| over reference top-64 {max_gap:.3}");
        assert_eq!(ours[0], top[0].0, "different argmax");
        assert!(overlap >= 8, "top-10 overlap {overlap}");
        assert!(max_gap < 1.0, "logits differ by {max_gap}");
    }
}

#[test]
fn generates_keywords_and_img_states() {
    let llm = LlamaKeywordLlm::load(&spec()).unwrap();
    let prompts = vec!["List 3 keywords describing the movie Toy Story (1995), Animation|Children|Comedy".to_string()];
    let opts = GenerateOptions {
        max_tokens: 12,
        ..Default::default()
    };
    let out = llm.generate(&prompts, &opts).unwrap();
    eprintln!("{:?}", out[0].text);
    assert!(
        out[0].tokens > 0 && out[0].text.to_lowercase().contains("toy"),
        "{:?}",
        out[0].text
    );
    // Greedy decoding is deterministic; seeded sampling is reproducible.
    assert_eq!(llm.generate(&prompts, &opts).unwrap(), out);
    let sampled = GenerateOptions {
        max_tokens: 8,
        temperature: 0.8,
        top_p: 0.9,
        seed: 7,
        ..Default::default()
    };
    assert_eq!(
        llm.generate(&prompts, &sampled).unwrap(),
        llm.generate(&prompts, &sampled).unwrap()
    );
    // Stop strings cut the text before them.
    let stop = GenerateOptions {
        max_tokens: 12,
        stop: vec!["\n".into()].into(),
        ..Default::default()
    };
    assert!(!llm.generate(&prompts, &stop).unwrap()[0].text.contains('\n'));

    let states = llm.preference_states(&prompts).unwrap();
    assert_eq!(states[0].img_states.dims(), vec![4, 576]);
    assert_eq!(states[0].text_embedding.dims(), vec![576]);
    assert!(states[0].img_states.to_f32_vec().iter().all(|x| x.is_finite()));
}
