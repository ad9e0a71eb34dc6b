//! ragar-tch: RAGAR stages on libtorch, from TorchScript modules exported by
//! the reference Python libraries (`scripts/export_minilm.py`).
//!
//! libtorch comes from the PyPI torch 2.11.0 wheel installed by
//! `scripts/setup.sh` (tch 0.24 pairs with torch 2.11); `.cargo/config.toml`
//! points `LIBTORCH` at it and the binaries carry an rpath to its `lib/`.
#![deny(missing_docs)]

pub mod blip;
pub mod blip2;
pub mod clip;
pub mod content_ranker;
pub mod keyword_llm;
pub mod mapper;
pub mod minilm;
pub mod mkl;
pub mod stable_diffusion;

use ragar_core::{component, Component, ComponentSpec, DType, Error, Result};

/// Every component this plugin offers.
pub fn components() -> Vec<Component> {
    vec![
        component!(
            Encoder,
            "minilm",
            "tch",
            ["cpu", "cuda"],
            "sentence-transformers BERT text encoder from a TorchScript module (model.ts; dtype f16: model.f16.ts)",
            minilm::SentenceEncoder::load,
            |spec: &ComponentSpec| ragar_core::text::probe(spec, &module_file(spec, "model.ts"))
        ),
        component!(
            Encoder,
            "clip",
            "tch",
            ["cpu", "cuda"],
            "CLIP text + image encoder from TorchScript modules (text_model.ts, vision_model.ts; scripts/export_clip.py; \
             dtype f16: the *.f16.ts exports)",
            clip::ClipEncoder::load,
            |spec: &ComponentSpec| {
                let [text, vision] = clip::graphs(spec);
                ragar_core::clip::ClipDir::probe(spec, &[&text, &vision])
            }
        ),
        component!(
            Mapper,
            "ragar",
            "tch",
            ["cpu", "cuda"],
            "RAGAR's Mapper for inference from the TorchScript module of a trained checkpoint (<checkpoint>.ts; \
             scripts/export_mapper.py; dtype f16: <checkpoint>.f16.ts)",
            mapper::TchMapper::load_component,
            mapper::probe
        ),
        component!(
            Ranker,
            "content",
            "tch",
            ["cpu", "cuda"],
            "The content-based sequential ranker trained on candle, scoring from its TorchScript module \
             (<state>.ts; scripts/export_content_ranker.py; dtype f16: <state>.f16.ts)",
            content_ranker::TchContentRanker::load_component,
            content_ranker::probe
        ),
        component!(
            KeywordLlm,
            "llama",
            "tch",
            ["cpu", "cuda"],
            "Llama-architecture LLM from TorchScript modules with a key/value cache (model.ts, hidden_states.ts; \
             scripts/export_llm.py; dtype f16: the *.f16.ts exports): keywords and [IMG] hidden states, sampling \
             shared with candle",
            keyword_llm::load,
            keyword_llm::probe
        ),
        component!(
            KeywordLlm,
            "qwen2",
            "tch",
            ["cpu", "cuda"],
            "Qwen2/Qwen2.5 LLM from TorchScript modules with a key/value cache (model.ts, hidden_states.ts; \
             scripts/export_llm.py; dtype f16: the *.f16.ts exports): keywords and [IMG] hidden states",
            keyword_llm::load,
            keyword_llm::probe
        ),
        component!(
            Captioner,
            "blip",
            "tch",
            ["cpu", "cuda"],
            "BLIP or BLIP-2 (OPT) captioning from TorchScript modules with key/value caches (config.json's model_type \
             decides; scripts/export_blip.py; dtype f16: the *.f16.ts exports): greedy or beam search, shared with candle",
            blip::load,
            blip::probe
        ),
        component!(
            Captioner,
            "blip2",
            "tch",
            ["cpu", "cuda"],
            "BLIP-2 (OPT) captioning from TorchScript modules (image_queries, embed_tokens, language_model_with_past; \
             same component as `blip`)",
            blip::load,
            blip::probe
        ),
        component!(
            Generator,
            "stable-diffusion",
            "tch",
            ["cpu", "cuda"],
            "Stable Diffusion 1.x/2.x from TorchScript modules ({text_encoder,unet,vae_decoder}/model.ts; scripts/export_sd.py; \
             dtype f16: the model.f16.ts exports), the shared seeded sampler loop",
            stable_diffusion::StableDiffusion::load,
            stable_diffusion::StableDiffusion::probe
        ),
    ]
}

ragar_core::register_static!("tch", components);

/// The device and precision a spec asks for. Every stage's export script
/// also writes half-precision modules (`--dtype f16` writes `model.f16.ts`
/// next to `model.ts`): the stage opens [`module_file`] and casts its float
/// inputs to the kind. `cuda`
/// without CUDA is an error; only `auto` falls back to the CPU.
pub fn placement(spec: &ComponentSpec) -> Result<(tch::Device, tch::Kind)> {
    let kind = match spec.dtype {
        DType::F32 => tch::Kind::Float,
        DType::F16 => tch::Kind::Half,
        DType::BF16 => tch::Kind::BFloat16,
    };
    let device = match spec.device()? {
        ragar_core::Device::Cpu => tch::Device::Cpu,
        ragar_core::Device::Auto => tch::Device::cuda_if_available(),
        ragar_core::Device::Cuda(n) => {
            if !tch::Cuda::is_available() {
                return Err(Error::device(
                    "CUDA was asked for but libtorch sees no CUDA device (no driver, or a build \
                     whose libtorch lacks CUDA); say `device: auto` to allow the CPU",
                ));
            }
            tch::Device::Cuda(n)
        }
    };
    Ok((device, kind))
}

/// The module exported beside a trained state (`mapper.safetensors` ->
/// `mapper.ts`, or `mapper.f16.ts` for `dtype: f16`), as the export
/// scripts name it.
pub fn module_beside(dtype: DType, state: &std::path::Path) -> std::path::PathBuf {
    dtype
        .exported_file(&state.with_extension("ts").to_string_lossy())
        .into()
}

/// The module a spec's `dtype` reads in place of `file`: `model.ts` (f32)
/// or `model.f16.ts` / `model.bf16.ts`, as the export scripts name them.
pub fn module_file(spec: &ComponentSpec, file: &str) -> String {
    spec.dtype.exported_file(file)
}

/// Load a TorchScript module onto `device` in eval mode and check that its
/// weights are `kind` (a module traced in f16 saved under an f32 name, or
/// the reverse, would otherwise fail deep inside the first forward). A file
/// this libtorch cannot read (another torch version's, or not TorchScript)
/// is an error naming the file and the libtorch it needs.
pub fn load_module_as(path: &std::path::Path, device: tch::Device, kind: tch::Kind) -> Result<tch::CModule> {
    if !path.is_file() {
        return Err(Error::not_found(format!(
            "missing TorchScript module {}",
            path.display()
        )));
    }
    let mut module = tch::CModule::load_on_device(path, device).map_err(|e| {
        Error::model(format!(
            "{}: not a TorchScript module this libtorch (torch 2.11, tch 0.24) can read: {}",
            path.display(),
            first_line(&e.to_string())
        ))
    })?;
    module.set_eval();
    let params = module
        .named_parameters()
        .map_err(|e| Error::model(format!("{}: {}", path.display(), first_line(&e.to_string()))))?;
    if let Some((name, p)) = params.iter().find(|(_, p)| p.is_floating_point()) {
        if p.kind() != kind {
            return Err(Error::model(format!(
                "{}: its weights ({name}) are {}, the config's dtype is {} (the export scripts write \
                 model.ts in f32 and model.f16.ts with --dtype f16)",
                path.display(),
                kind_name(p.kind()),
                kind_name(kind)
            )));
        }
    }
    // The handles above keep every weight alive; freezing swaps each Linear's
    // weight for a transposed copy and frees the original only if nothing
    // else holds it.
    drop(params);
    if device == tch::Device::Cpu && !keeps_modules_unfrozen() {
        if let Err(why) = freeze_for_cpu(&mut module) {
            // A module freezing cannot handle (one that changes its own
            // attributes in forward) still runs as loaded, only slower.
            eprintln!("note: {}: runs unfrozen ({})", path.display(), first_line(&why));
        }
    }
    Ok(module)
}

/// The environment variable that keeps CPU modules as loaded (unfrozen), for
/// comparing or for a module whose frozen form misbehaves.
pub const UNFROZEN_ENV: &str = "RAGAR_TCH_UNFROZEN";

/// Whether [`UNFROZEN_ENV`] is set to `1`, read once per process (every
/// module call asks).
fn keeps_modules_unfrozen() -> bool {
    static UNFROZEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNFROZEN.get_or_init(|| std::env::var(UNFROZEN_ENV).is_ok_and(|v| v.trim() == "1"))
}

extern "C" {
    fn ragar_freeze_for_cpu(module: *mut std::ffi::c_void) -> *mut std::ffi::c_char;
    fn ragar_forward_graph(module: *mut std::ffi::c_void) -> *mut std::ffi::c_char;
}

/// The `torch::jit::Module*` a CModule wraps.
fn module_ptr(module: &tch::CModule) -> *mut std::ffi::c_void {
    // tch keeps the pointer as the struct's only field and offers no
    // accessor; the size check makes a tch that changes that a build error
    // rather than a wrong pointer.
    const _: () = assert!(std::mem::size_of::<tch::CModule>() == std::mem::size_of::<*mut std::ffi::c_void>());
    // SAFETY: CModule is exactly its module pointer (checked above).
    unsafe { std::mem::transmute_copy(module) }
}

/// Take ownership of a message the shim allocated with strdup.
fn shim_string(s: *mut std::ffi::c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string from strdup, freed once here.
    let text = unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { libc::free(s.cast()) };
    Some(text)
}

/// A module's forward graph in TorchScript's IR text (what freezing made of
/// it: constants, `ragar::packed_linear` in place of `aten::linear`).
pub fn forward_graph(module: &tch::CModule) -> Option<String> {
    // SAFETY: the shim only reads the module.
    shim_string(unsafe { ragar_forward_graph(module_ptr(module)) })
}

/// Freeze `module` in place (`shim/freeze.cpp`): its weights become graph
/// constants and every f32 Linear's weight is stored packed for MKL's
/// sgemm_compute (pre-transposed where MKL cannot pack it), which spares
/// each product the packing an ordinary sgemm redoes per call: the cost
/// that dominates the few-row products of batch-1 encoding. On an error
/// the module is unchanged.
fn freeze_for_cpu(module: &mut tch::CModule) -> std::result::Result<(), String> {
    // SAFETY: the shim replaces the module the pointer points to (the
    // pointer itself, owned by `module`, does not change).
    shim_string(unsafe { ragar_freeze_for_cpu(module_ptr(module)) }).map_or(Ok(()), Err)
}

/// A float kind in the config's spelling (`f16`), other kinds as libtorch names them.
fn kind_name(kind: tch::Kind) -> String {
    match kind {
        tch::Kind::Float => "f32".into(),
        tch::Kind::Half => "f16".into(),
        tch::Kind::BFloat16 => "bf16".into(),
        k => format!("{k:?}"),
    }
}

/// libtorch errors carry a C++ backtrace; the first line says what happened.
pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// A tensor as f32 values on the host (any kind, any device).
pub fn to_host(t: &tch::Tensor) -> Result<Vec<f32>> {
    let t = t
        .to_kind(tch::Kind::Float)
        .to_device(tch::Device::Cpu)
        .contiguous()
        .view(-1);
    Vec::<f32>::try_from(&t).map_err(|e| Error::model(format!("reading TorchScript output: {e}")))
}

extern "C" {
    fn ragar_inference_mode_enter() -> *mut std::ffi::c_void;
    fn ragar_inference_mode_exit(guard: *mut std::ffi::c_void);
}

/// Run `f` in libtorch's inference mode (`c10::InferenceMode`, through
/// `shim/inference_mode.cpp`): no autograd, and none of the version counters
/// and view tracking that `no_grad` still keeps per op. Every module call of
/// this plugin runs in it; the tensors it returns are inference tensors,
/// which the plugin only reads, copies to the host or feeds back in.
pub fn inference_mode<T>(f: impl FnOnce() -> T) -> T {
    struct Guard(*mut std::ffi::c_void);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: the guard this thread's `enter` made, released once.
            unsafe { ragar_inference_mode_exit(self.0) }
        }
    }
    // SAFETY: `enter` only allocates the guard and sets this thread's
    // autograd state; it returns null where the allocation failed.
    let guard = Guard(unsafe { ragar_inference_mode_enter() });
    if guard.0.is_null() {
        return tch::no_grad(f);
    }
    f()
}

extern "C" {
    fn ragar_set_graph_executor_optimize(on: bool) -> bool;
}

/// Run `f`, a call of a module whose inputs start with `first`: in
/// inference mode, and for a CPU module (frozen at load, unless freezing
/// refused it) with TorchScript's graph executor optimizations off on this
/// thread (`shim/freeze.cpp` says why).
fn call_module<T>(first: Option<&tch::Tensor>, f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: sets a thread-local flag of libtorch's.
            unsafe { ragar_set_graph_executor_optimize(self.0) };
        }
    }
    let on_cpu = first.is_some_and(|t| t.device() == tch::Device::Cpu) && !keeps_modules_unfrozen();
    // SAFETY: as above; the guard puts the previous setting back, also on a
    // panic.
    let _restore = on_cpu.then(|| Restore(unsafe { ragar_set_graph_executor_optimize(false) }));
    inference_mode(f)
}

/// Run a stage's module (behind `&self`: CModule is not Sync) in inference
/// mode; errors name `what`.
pub fn forward(module: &std::sync::Mutex<tch::CModule>, inputs: &[tch::Tensor], what: &str) -> Result<tch::Tensor> {
    let m = module
        .lock()
        .map_err(|_| Error::model("TorchScript module poisoned by an earlier panic"))?;
    call_module(inputs.first(), || m.forward_ts(inputs))
        .map_err(|e| Error::model(format!("{what} (TorchScript): {}", first_line(&e.to_string()))))
}

/// Run a module whose output is a tuple of tensors (the cache-carrying
/// decoders), in inference mode; errors name `what`.
pub fn forward_tuple(
    module: &std::sync::Mutex<tch::CModule>,
    inputs: Vec<tch::Tensor>,
    what: &str,
) -> Result<Vec<tch::Tensor>> {
    let m = module
        .lock()
        .map_err(|_| Error::model("TorchScript module poisoned by an earlier panic"))?;
    let first = inputs.first().map(|t| t.shallow_clone());
    let inputs: Vec<tch::IValue> = inputs.into_iter().map(tch::IValue::Tensor).collect();
    let out = call_module(first.as_ref(), || m.forward_is(&inputs))
        .map_err(|e| Error::model(format!("{what} (TorchScript): {}", first_line(&e.to_string()))))?;
    let tch::IValue::Tuple(out) = out else {
        return Err(Error::model(format!(
            "{what} (TorchScript): expected a tuple of tensors"
        )));
    };
    out.into_iter()
        .map(|v| match v {
            tch::IValue::Tensor(t) => Ok(t),
            _ => Err(Error::model(format!("{what} (TorchScript): an output is not a tensor"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside, libtorch makes inference tensors; after, autograd is back as it
    /// was (a product of a tensor that requires grad requires grad again).
    #[test]
    fn inference_mode_holds_for_the_call_only() {
        let x = tch::Tensor::ones([2, 3], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let inside = inference_mode(|| &x * 2.0);
        assert!(inside.is_inference() && !inside.requires_grad());
        let after = &x * 2.0;
        assert!(!after.is_inference() && after.requires_grad());
        // A panic inside still leaves inference mode.
        let r = std::panic::catch_unwind(|| inference_mode(|| panic!("inside")));
        assert!(r.is_err());
        assert!((&x * 2.0).requires_grad());
    }

    /// The tiny CLIP text tower scripts/setup.sh exports (a transformer with
    /// every kind of Linear a stage has: attention, MLP, projection).
    fn clip_text_module() -> std::path::PathBuf {
        clip_module("text_model.ts")
    }

    fn clip_module(file: &str) -> std::path::PathBuf {
        let cache = std::env::var_os("RAGAR_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ragar"));
        let path = cache.join("models/clip-tiny-e2e").join(file);
        assert!(
            path.is_file(),
            "{} is missing: run scripts/setup.sh first",
            path.display()
        );
        path
    }

    fn text_inputs() -> Vec<tch::Tensor> {
        let ids = tch::Tensor::from_slice(&[49406i64, 320, 1125, 539, 320, 2368, 49407, 0]).view([1, 8]);
        let mask = tch::Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 0]).view([1, 8]);
        vec![ids, mask]
    }

    /// One token: every product has a single row.
    fn one_token_inputs() -> Vec<tch::Tensor> {
        vec![
            tch::Tensor::from_slice(&[49407i64]).view([1, 1]),
            tch::Tensor::from_slice(&[1i64]).view([1, 1]),
        ]
    }

    /// A batch of three 5-token titles: the packed products see 15 rows
    /// where `text_inputs` gives them 8 (MKL packs each weight once, for
    /// every row count).
    fn batch_inputs() -> Vec<tch::Tensor> {
        let ids = tch::Tensor::from_slice(&[
            49406i64, 320, 2368, 49407, 0, 49406, 1125, 539, 320, 49407, 49406, 49407, 0, 0, 0,
        ])
        .view([3, 5]);
        let mask = tch::Tensor::from_slice(&[1i64, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]).view([3, 5]);
        vec![ids, mask]
    }

    /// On the CPU a loaded module is frozen (its weights are graph constants,
    /// no longer parameters) and computes what the module as saved computes.
    #[test]
    fn cpu_modules_are_frozen_and_compute_the_same() {
        let path = clip_text_module();
        let frozen = load_module_as(&path, tch::Device::Cpu, tch::Kind::Float).unwrap();
        assert!(frozen.named_parameters().unwrap().is_empty());
        let mut saved = tch::CModule::load_on_device(&path, tch::Device::Cpu).unwrap();
        saved.set_eval();
        assert!(!saved.named_parameters().unwrap().is_empty());
        // Single rows first: a product that wrote into its bias constant
        // there (once the case) would spoil every later call.
        for inputs in [
            one_token_inputs(),
            text_inputs(),
            batch_inputs(),
            one_token_inputs(),
            text_inputs(),
        ] {
            let (a, b) = inference_mode(|| (frozen.forward_ts(&inputs).unwrap(), saved.forward_ts(&inputs).unwrap()));
            assert_eq!(a.size(), b.size());
            let diff = (&a - &b).abs().max().double_value(&[]);
            assert!(
                diff < 1e-5,
                "frozen vs saved at {:?}: max |diff| {diff}",
                inputs[0].size()
            );
        }
        // Every Linear became a product with a packed constant (this
        // libtorch has MKL).
        let graph = forward_graph(&frozen).unwrap();
        assert!(!graph.contains("aten::linear"), "{graph}");
        assert!(graph.matches("ragar::packed_linear").count() >= 12, "{graph}");
    }

    /// The tiny CLIP image tower: its patch embedding (a 32 x 32 convolution
    /// with stride 32) becomes one packed product, which computes what
    /// oneDNN's convolution computes, also for a size that is not a whole
    /// number of patches (the convolution drops the remainder).
    #[test]
    fn patch_embeddings_become_packed_products() {
        let path = clip_module("vision_model.ts");
        let frozen = load_module_as(&path, tch::Device::Cpu, tch::Kind::Float).unwrap();
        let mut saved = tch::CModule::load_on_device(&path, tch::Device::Cpu).unwrap();
        saved.set_eval();
        let graph = forward_graph(&frozen).unwrap();
        assert!(graph.contains("ragar::packed_patch_conv"), "{graph}");
        assert!(!graph.contains("aten::_convolution"), "{graph}");
        tch::manual_seed(7);
        for (n, side) in [(1, 224), (3, 230)] {
            let pixels = tch::Tensor::randn([n, 3, side, side], (tch::Kind::Float, tch::Device::Cpu));
            let (a, b) = inference_mode(|| {
                (
                    frozen.forward_ts(&[pixels.shallow_clone()]).unwrap(),
                    saved.forward_ts(&[pixels.shallow_clone()]).unwrap(),
                )
            });
            assert_eq!(a.size(), b.size());
            let diff = (&a - &b).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "frozen vs saved at {n} x {side} px: max |diff| {diff}");
        }
    }

    /// A module freezing refuses (here: one in training mode) comes back
    /// unchanged with libtorch's reason, and still runs.
    #[test]
    fn a_module_that_cannot_be_frozen_is_left_as_loaded() {
        let mut m = tch::CModule::load_on_device(clip_text_module(), tch::Device::Cpu).unwrap();
        m.set_train();
        let err = freeze_for_cpu(&mut m).unwrap_err();
        assert!(err.contains("eval"), "{err}");
        assert!(!m.named_parameters().unwrap().is_empty());
        m.set_eval();
        assert!(inference_mode(|| m.forward_ts(&text_inputs())).is_ok());
    }
}
