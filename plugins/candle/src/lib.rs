//! ragar-candle: RAGAR stages on candle, on CPU and (with the `cuda`
//! feature) CUDA.
//!
//! One file per model family; each opens with the paper and reference
//! implementation it follows. Link statically (the `ragar` binary's `candle`
//! feature) or load `ragar-candle-plugin` as a shared library: both expose
//! the same [`components`].
#![deny(missing_docs)]

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod bert;
pub mod blip;
pub mod blip2;
pub mod blip_captioner;
pub mod checkpoint;
pub mod clip;
pub mod clip_encoder;
pub mod content_ranker;
pub mod conv;
pub mod decoding;
pub mod device;
pub mod early_stopping;
pub mod group_norm;
pub mod keyword_llm;
pub mod linear;
pub mod llama;
pub mod lpips;
pub mod mapper;
pub mod micro;
pub mod micro_ranker;
pub mod minilm;
pub mod sparse;
pub mod stable_diffusion;
pub mod state;
pub mod unet;
pub mod vae;

use ragar_core::{component, Component, ComponentSpec};

/// Every component this plugin offers.
pub fn components() -> Vec<Component> {
    vec![
        component!(
            Encoder,
            "minilm",
            "candle",
            ["cpu", "cuda"],
            "sentence-transformers BERT text encoder (all-MiniLM-L6-v2) from model.safetensors",
            minilm::SentenceEncoder::load,
            |spec: &ComponentSpec| ragar_core::text::probe(spec, "model.safetensors")
        ),
        component!(
            Encoder,
            "clip",
            "candle",
            ["cpu", "cuda"],
            "CLIP text and image features (HF CLIPModel checkpoints, e.g. ViT-B/32, ViT-L/14)",
            clip_encoder::ClipEncoder::load,
            clip_encoder::ClipEncoder::probe
        ),
        component!(
            KeywordLlm,
            "llama",
            "candle",
            ["cpu", "cuda"],
            "Llama-architecture LLM (SmolLM2, Llama 2/3, ...) from GGUF or HF safetensors: keywords and [IMG] hidden states",
            keyword_llm::LlamaKeywordLlm::load,
            keyword_llm::LlamaKeywordLlm::probe
        ),
        // Qwen2 / Qwen2.5 (the paper's KeywordLLM) run on the same decoder;
        // the name lets configs say what they mean.
        component!(
            KeywordLlm,
            "qwen2",
            "candle",
            ["cpu", "cuda"],
            "Qwen2/Qwen2.5 LLM from GGUF or HF safetensors: keywords and [IMG] hidden states",
            keyword_llm::LlamaKeywordLlm::load,
            keyword_llm::LlamaKeywordLlm::probe
        ),
        component!(
            Captioner,
            "blip",
            "candle",
            ["cpu", "cuda"],
            "BLIP or BLIP-2 (OPT) captioning from HF checkpoints (config.json's model_type decides): greedy or beam search",
            blip_captioner::BlipCaptioner::load,
            blip_captioner::BlipCaptioner::probe
        ),
        // The paper's captioner; the same component reads both architectures.
        component!(
            Captioner,
            "blip2",
            "candle",
            ["cpu", "cuda"],
            "BLIP-2 (OPT) captioning, e.g. Salesforce/blip2-opt-2.7b (same component as `blip`)",
            blip_captioner::BlipCaptioner::load,
            blip_captioner::BlipCaptioner::probe
        ),
        component!(
            Mapper,
            "ragar",
            "candle",
            ["cpu", "cuda"],
            "RAGAR's Modal Mapper (GILL) + Balance Calibrator with the reflection losses and AdamW (trainable)",
            mapper::RagarMapper::load_component,
            mapper::RagarMapper::probe
        ),
        component!(
            Ranker,
            "micro",
            "candle",
            ["cpu", "cuda"],
            "MICRO multimodal recommender (LightGCN + kNN item graphs + contrastive fusion); scores generated images by substitution",
            micro_ranker::MicroRanker::load_component,
            micro_ranker::MicroRanker::probe
        ),
        component!(
            Ranker,
            "content",
            "candle",
            ["cpu", "cuda"],
            "Inductive content-based sequential ranker (attention over history features); scores unseen images directly",
            content_ranker::ContentRanker::load_component,
            content_ranker::ContentRanker::probe
        ),
        component!(
            Generator,
            "stable-diffusion",
            "candle",
            ["cpu", "cuda"],
            "Stable Diffusion 1.x/2.x (diffusers pipeline folder): text or 77xD prompt embeddings -> image; DDIM, Euler-a, DPM++ 2M",
            stable_diffusion::StableDiffusion::load,
            stable_diffusion::StableDiffusion::probe
        ),
    ]
}

ragar_core::register_static!("candle", components);
