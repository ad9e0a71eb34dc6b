//! `ragar stage generator` end to end with the candle Stable Diffusion
//! component on the tiny pipeline that scripts/setup.sh builds
//! (scripts/fixtures/make_sd.py): PNGs equal to diffusers' images from the
//! same seed (8-bit, at most one level apart), from text and from prompt
//! embeddings; bad inputs get errors that name the problem.

use ragar_tests::*;
use safetensors::tensor::TensorView;
use std::path::Path;
use std::process::Command;

fn sd_dir() -> std::path::PathBuf {
    cache().join("models/sd-tiny")
}

fn generator(out: &Path, extra: &[&str]) -> std::process::Output {
    run(
        stage_command(&ragar(), "generator", "configs/components/sd15.yaml", out)
            .args(["--steps", "2", "--width", "64", "--height", "64", "--seed", "42"])
            .args(extra)
            .arg(format!("generator.params.model_dir={}", sd_dir().display()))
            .arg("generator.params.scheduler=ddim"),
    )
}

/// The reference image `key` of reference.safetensors as 8-bit RGB.
fn reference_pixels(key: &str, scale: bool) -> Vec<u8> {
    let bytes = std::fs::read(sd_dir().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(key).unwrap();
    match v.dtype() {
        safetensors::Dtype::I32 => v
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u8)
            .collect(),
        _ => v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .map(|x| if scale { (x * 255.0).round() as u8 } else { x as u8 })
            .collect(),
    }
}

fn assert_close(png: &Path, want: &[u8]) {
    let got = image::open(png).unwrap().to_rgb8().into_raw();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "{}: {worst} levels from diffusers", png.display());
}

fn tensor_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn reference_f32(key: &str) -> Vec<f32> {
    let bytes = std::fs::read(sd_dir().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn text_prompts_give_diffusers_images_as_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red apple on a wooden table\nsomething else\n").unwrap();
    let out = dir.path().join("images");
    let o = generator(
        &out,
        &[
            "--text-file",
            prompts.to_str().unwrap(),
            "--negative",
            "blurry, low quality",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_close(&out.join("000000.png"), &reference_pixels("pipe.ddim.pixels", false));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generations.json")).unwrap()).unwrap();
    assert_eq!(manifest[1]["seed"], 43);
    assert_eq!(manifest[1]["from"], "something else");
    assert!(out.join("000001.png").is_file());
}

#[test]
fn prompt_embeddings_give_diffusers_images() {
    let dir = tempfile::tempdir().unwrap();
    let (pos, neg) = (
        reference_f32("pipe.embeds.prompt_embeds"),
        reference_f32("pipe.embeds.negative_embeds"),
    );
    let (pb, nb) = (tensor_bytes(&pos), tensor_bytes(&neg));
    let file = dir.path().join("embeds.safetensors");
    let views = [
        (
            "prompt_embeds",
            TensorView::new(safetensors::Dtype::F32, vec![1, 77, 32], &pb).unwrap(),
        ),
        (
            "negative_embeds",
            TensorView::new(safetensors::Dtype::F32, vec![77, 32], &nb).unwrap(),
        ),
    ];
    std::fs::write(&file, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    let out = dir.path().join("images");
    let o = generator(&out, &["--prompt-embeds", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_close(&out.join("000000.png"), &reference_pixels("pipe.embeds.image", true));
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let out = dir.path().join("images");

    let o = run(
        stage_command(&ragar(), "generator", "configs/components/sd15.yaml", &out)
            .args([
                "--text-file",
                prompts.to_str().unwrap(),
                "--steps",
                "1",
                "--width",
                "60",
                "--height",
                "64",
            ])
            .arg(format!("generator.params.model_dir={}", sd_dir().display())),
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("request 0: size 60x64 must be a positive multiple of 8"),
        "{}",
        text(&o)
    );

    // Embeddings of the wrong width for this UNet.
    let wrong = tensor_bytes(&vec![0.0; 77 * 16]);
    let file = dir.path().join("wrong.safetensors");
    let views = [(
        "prompt_embeds",
        TensorView::new(safetensors::Dtype::F32, vec![77, 16], &wrong).unwrap(),
    )];
    std::fs::write(&file, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    let o = generator(&out, &["--prompt-embeds", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("prompt embeddings of shape [77, 16], the generator expects [77, 32]"),
        "{}",
        text(&o)
    );

    // A file without prompt_embeds lists what it has.
    let views = [(
        "embeddings",
        TensorView::new(safetensors::Dtype::F32, vec![77, 16], &wrong).unwrap(),
    )];
    std::fs::write(&file, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    let o = generator(&out, &["--prompt-embeds", file.to_str().unwrap()]);
    assert!(
        text(&o).contains("no tensor named prompt_embeds (found: embeddings)"),
        "{}",
        text(&o)
    );

    // A scheduler that does not exist is a config error naming the key.
    let o = run(Command::new(ragar())
        .current_dir(root())
        .args(["validate", "configs/components/sd15.yaml"])
        .arg(format!("generator.params.model_dir={}", sd_dir().display()))
        .arg("generator.params.scheduler=pndm"));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("generator.params.scheduler: unknown scheduler 'pndm'"),
        "{}",
        text(&o)
    );
    assert!(!out.join("000000.png").exists());
}
