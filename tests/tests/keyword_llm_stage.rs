//! `ragar stage keyword-llm` on the real SmolLM2-135M-Instruct GGUF:
//! keyword generation to JSON and the [IMG] hidden states to safetensors.

use ragar_tests::*;

fn stage(args: &[&str], out: &std::path::Path) -> String {
    cache();
    let dir = out.parent().unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "Give three comma-separated keywords for this item: red floral summer dress\n\
         Give three comma-separated keywords for this movie: Toy Story (1995)\n",
    )
    .unwrap();
    let o = run(
        stage_command(&ragar(), "keyword-llm", "configs/components/smollm2.yaml", out)
            .arg("--text-file")
            .arg(&prompts)
            .args(args),
    );
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

#[test]
fn generates_one_answer_per_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k.json");
    stage(&["--max-tokens", "8"], &out);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let n = r["tokens"].as_u64().unwrap();
        assert!((1..=8).contains(&n), "{r}");
        assert!(!r["text"].as_str().unwrap().is_empty());
        assert_eq!(r["prompt_truncated"], false);
    }
}

#[test]
fn writes_img_states_and_text_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.safetensors");
    stage(&["--img-states"], &out);
    let bytes = std::fs::read(&out).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["img_states"]["shape"], serde_json::json!([2, 8, 576]));
    assert_eq!(header["text_embedding"]["shape"], serde_json::json!([2, 576]));
}
