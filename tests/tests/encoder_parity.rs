//! The MiniLM encoder on candle, ONNX Runtime and libtorch, switched by one
//! override on the same binary, against sentence-transformers' embeddings of
//! the same real weights (tests/fixtures/minilm_reference.json); in f16 on
//! tch (export_minilm.py --dtype f16's module) and candle too.

use ragar_tests::*;

fn embed(backend: &str, extra: &[&str], out: &std::path::Path) -> String {
    cache();
    let o = run(minilm_stage(&ragar(), out)
        .arg(format!("encoder.backend={backend}"))
        .args(extra));
    assert!(o.status.success(), "{backend}: {}", text(&o));
    text(&o)
}

fn check_against_reference(name: &str, got: &[Vec<f64>], min_cos: f64) {
    let want = reference();
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: one row per line, the empty line included"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let c = cosine(g, w);
        assert!(
            c >= min_cos,
            "{name}: line {} has cosine {c} to the reference (< {min_cos})",
            i + 1
        );
    }
}

#[test]
fn fp32_backends_match_sentence_transformers_and_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    for backend in ["candle", "ort", "tch"] {
        let out = dir.path().join(format!("{backend}.json"));
        let log = embed(backend, &[], &out);
        // Line 11 is ~400 words: longer than max_seq_length (256), truncated like the reference.
        assert!(
            log.contains("sentences.txt:11 is longer than 256 tokens"),
            "{backend}: {log}"
        );
        let got = read_matrix(&out);
        check_against_reference(backend, &got, 0.9999);
        all.push(got);
    }
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        for (ra, rb) in all[a].iter().zip(&all[b]) {
            assert!(cosine(ra, rb) >= 0.9999, "backends {a} and {b} disagree");
        }
    }
}

#[test]
fn f16_on_tch_and_candle_stays_near_sentence_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for backend in ["tch", "candle"] {
        let out = dir.path().join(format!("{backend}-f16.json"));
        embed(backend, &["encoder.dtype=f16"], &out);
        check_against_reference(&format!("{backend} f16"), &read_matrix(&out), 0.9995);
    }
}

#[test]
fn int8_onnx_graph_is_close() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("int8.json");
    embed("ort", &["encoder.params.file=model_int8.onnx"], &out);
    check_against_reference("ort int8", &read_matrix(&out), 0.99);
}

#[test]
fn safetensors_output_has_one_row_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e.safetensors");
    embed("candle", &[], &out);
    let bytes = std::fs::read(&out).unwrap();
    // safetensors: 8-byte header length, then a JSON header.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["embeddings"]["shape"], serde_json::json!([11, 384]));
    assert_eq!(header["embeddings"]["dtype"], "F32");
}
