//! ragar-ort: RAGAR stages on ONNX Runtime.
//!
//! ONNX Runtime is loaded at run time (ort's `load-dynamic`), from
//! `ORT_DYLIB_PATH` or the project cache (`scripts/setup.sh` installs
//! `libonnxruntime.so.1.32.0` from the PyPI wheel); nothing is downloaded at
//! build time. Models are ONNX graphs exported from the same checkpoints the
//! other backends read (see `scripts/export_minilm.py`).
#![deny(missing_docs)]

pub mod blip;
pub mod blip2;
pub mod clip;
pub mod content_ranker;
pub mod keyword_llm;
pub mod mapper;
pub mod minilm;
pub mod runtime;
pub mod stable_diffusion;

use ragar_core::{component, Component, ComponentSpec};

/// Every component this plugin offers.
pub fn components() -> Vec<Component> {
    vec![
        component!(
            Encoder,
            "minilm",
            "ort",
            ["cpu", "cuda"],
            "sentence-transformers BERT text encoder from an ONNX graph (model.onnx, or model_int8.onnx)",
            minilm::SentenceEncoder::load,
            |spec: &ComponentSpec| ragar_core::text::probe(spec, "model.onnx")
        ),
        component!(
            Encoder,
            "clip",
            "ort",
            ["cpu", "cuda"],
            "CLIP text + image encoder from ONNX graphs (text_model.onnx, vision_model.onnx; scripts/export_clip.py)",
            clip::ClipEncoder::load,
            |spec: &ComponentSpec| ragar_core::clip::ClipDir::probe(spec, &clip::GRAPHS)
        ),
        component!(
            Mapper,
            "ragar",
            "ort",
            ["cpu", "cuda"],
            "RAGAR's Mapper for inference from the ONNX graph of a trained checkpoint (<checkpoint>.onnx; \
             scripts/export_mapper.py)",
            mapper::OrtMapper::load_component,
            mapper::probe
        ),
        component!(
            Ranker,
            "content",
            "ort",
            ["cpu", "cuda"],
            "The content-based sequential ranker trained on candle, scoring from its ONNX graph \
             (<state>.onnx; scripts/export_content_ranker.py)",
            content_ranker::OrtContentRanker::load_component,
            content_ranker::probe
        ),
        component!(
            KeywordLlm,
            "llama",
            "ort",
            ["cpu", "cuda"],
            "Llama-architecture LLM from ONNX graphs with a key/value cache (model.onnx, hidden_states.onnx; \
             scripts/export_llm.py): keywords and [IMG] hidden states, sampling shared with candle",
            keyword_llm::load,
            keyword_llm::probe
        ),
        component!(
            KeywordLlm,
            "qwen2",
            "ort",
            ["cpu", "cuda"],
            "Qwen2/Qwen2.5 LLM from ONNX graphs with a key/value cache (model.onnx, hidden_states.onnx; \
             scripts/export_llm.py): keywords and [IMG] hidden states",
            keyword_llm::load,
            keyword_llm::probe
        ),
        component!(
            Captioner,
            "blip",
            "ort",
            ["cpu", "cuda"],
            "BLIP or BLIP-2 (OPT) captioning from ONNX graphs with key/value caches (config.json's model_type \
             decides; scripts/export_blip.py): greedy or beam search, shared with candle",
            blip::load,
            blip::probe
        ),
        component!(
            Captioner,
            "blip2",
            "ort",
            ["cpu", "cuda"],
            "BLIP-2 (OPT) captioning from ONNX graphs (image_queries, embed_tokens, language_model_with_past; \
             same component as `blip`)",
            blip::load,
            blip::probe
        ),
        component!(
            Generator,
            "stable-diffusion",
            "ort",
            ["cpu", "cuda"],
            "Stable Diffusion 1.x/2.x from ONNX graphs ({text_encoder,unet,vae_decoder}/model.onnx; scripts/export_sd.py), \
             the shared seeded sampler loop",
            stable_diffusion::StableDiffusion::load,
            stable_diffusion::StableDiffusion::probe
        ),
    ]
}

ragar_core::register_static!("ort", components);
