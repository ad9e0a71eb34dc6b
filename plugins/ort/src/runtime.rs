//! Finding and starting ONNX Runtime once per process, and opening sessions
//! with the graph's inputs and outputs checked against what a stage expects.

use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::session::Session;
use ragar_core::{ComponentSpec, Error, ErrorKind, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The ONNX Runtime version `scripts/setup.sh` installs.
pub const ORT_LIB: &str = "libonnxruntime.so.1.32.0";

static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// Where libonnxruntime is: `$ORT_DYLIB_PATH`, else `<cache>/lib/onnxruntime/`.
pub fn library_path(cache_dir: &Path) -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir.join("lib/onnxruntime").join(ORT_LIB))
}

/// The process's ONNX Runtime environment, loading the library on first use.
/// A missing library is an error naming the setup script, never a panic.
pub fn environment(cache_dir: &Path) -> Result<&'static Environment> {
    let env = ENV.get_or_init(|| {
        let lib = library_path(cache_dir);
        if !lib.is_file() {
            return Err(format!(
                "ONNX Runtime library not found at {} (run scripts/setup.sh, or set ORT_DYLIB_PATH)",
                lib.display()
            ));
        }
        // ort reports a bad library by panicking inside its loader; keep that
        // at this boundary.
        std::panic::catch_unwind(|| {
            ort::init_from(&lib)
                .map_err(|e| e.to_string())?
                .with_global_thread_pool(thread_pool().map_err(|e| e.to_string())?)
                .build()
                .map_err(|e| e.to_string())
        })
        .unwrap_or_else(|_| Err(format!("{} could not be loaded as ONNX Runtime", lib.display())))
        .map_err(|e| format!("{}: {e}", lib.display()))
    });
    env.as_ref().map_err(|e| Error::new(ErrorKind::NativeLibrary, e))
}

/// One intra-op thread pool for every session of the process, a thread per
/// core. With a pool per session, a stage of several graphs run in turn
/// (BLIP's vision model, cross keys and decoder; SD's text encoder, UNet and
/// VAE) had each idle session's workers spinning on the cores the running
/// one needed: BLIP at batch 8 captioned 2x faster with spinning off, while
/// single-graph stages ran 10-20 % slower that way. A shared pool keeps the
/// spinning (ONNX Runtime's default, good for back-to-back ops) to one set
/// of workers.
fn thread_pool() -> std::result::Result<GlobalThreadPoolOptions, ort::Error> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    GlobalThreadPoolOptions::default()
        .with_intra_threads(threads)?
        .with_inter_threads(1)
}

/// Open `model` on the spec's device; it runs on the process's shared
/// intra-op thread pool.
pub fn session(spec: &ComponentSpec, model: &Path) -> Result<Session> {
    spec.require_exported_f32("ort")?;
    let env = environment(Path::new(spec.cache_dir.as_str()))?;
    if !model.is_file() {
        return Err(Error::not_found(format!(
            "missing ONNX model {} (each stage's export script writes it: README, \"Using it\")",
            model.display()
        )));
    }
    let err = |e: ort::Error| Error::model(format!("{}: {e}", model.display()));
    let mut builder = Session::builder(env).map_err(err)?;
    builder = match spec.device()? {
        ragar_core::Device::Cpu => builder,
        ragar_core::Device::Cuda(_) if !cfg!(feature = "cuda") => {
            return Err(Error::device(
                "CUDA was asked for but ragar-ort was built without its `cuda` feature \
                 (ONNX Runtime's CUDA provider is unverified here); say `device: auto` to allow the CPU",
            ))
        }
        _ => with_cuda(builder, spec)?,
    };
    builder.commit_from_file(model).map_err(err)
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    spec: &ComponentSpec,
) -> Result<ort::session::builder::SessionBuilder> {
    let (id, required) = match spec.device()? {
        ragar_core::Device::Cuda(n) => (n as i32, true),
        _ => (0, false),
    };
    let ep = ort::ep::CUDA::default().with_device_id(id).build();
    // ort's default, when the provider cannot start (a CPU-only
    // libonnxruntime, no driver, missing CUDA libraries), is to log it and
    // run on the CPU: a `cuda:N` run would then report CPU figures under a
    // CUDA label. `cuda:N` fails instead; `auto` may fall back.
    let ep = if required { ep.error_on_failure() } else { ep };
    let failed = |e: String| {
        Error::device(format!(
            "{}.device: {}: ONNX Runtime's CUDA execution provider did not start: {e} (it needs \
             onnxruntime-gpu's library as ORT_DYLIB_PATH, CUDA 13's and cuDNN 9's libraries on \
             LD_LIBRARY_PATH, and the NVIDIA driver; say `device: auto` to allow the CPU)",
            spec.key, spec.device
        ))
    };
    if required {
        cuda_preflight(id).map_err(failed)?;
    }
    builder
        .with_execution_providers([ep])
        .map_err(|e| failed(e.to_string()))
}

/// Whether ONNX Runtime's CUDA provider really runs on device `id`, asked
/// once per device and process. Even with `error_on_failure`, a GPU build of
/// the library whose provider cannot load (a CUDA library or the driver
/// missing) only logs that and places every node on the CPU. A one-node
/// graph committed with the CPU fallback disabled fails then. The real
/// sessions keep the fallback: ONNX Runtime puts shape arithmetic on the CPU
/// on purpose.
#[cfg(feature = "cuda")]
fn cuda_preflight(id: i32) -> std::result::Result<(), String> {
    static CHECKED: std::sync::Mutex<Vec<(i32, std::result::Result<(), String>)>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = checked.iter().find(|(d, _)| *d == id) {
        return r.clone();
    }
    let env = ENV
        .get()
        .and_then(|e| e.as_ref().ok())
        .ok_or("ONNX Runtime is not loaded")?;
    let attempt = || -> std::result::Result<(), String> {
        let cuda = ort::ep::CUDA::default().with_device_id(id).build().error_on_failure();
        Session::builder(env)
            .map_err(|e| e.to_string())?
            .with_execution_providers([cuda])
            .map_err(|e| e.to_string())?
            .with_disable_cpu_fallback()
            .map_err(|e| e.to_string())?
            .commit_from_memory(&relu_graph())
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let r =
        attempt().map_err(|e| format!("a one-node graph ran on the CPU, not on CUDA device {id} (ONNX Runtime: {e})"));
    checked.push((id, r.clone()));
    r
}

/// `y = Relu(x)` on f32 `[1]` as an ONNX model (protobuf, IR 8, opset 17):
/// the smallest graph every execution provider takes.
#[cfg(feature = "cuda")]
fn relu_graph() -> Vec<u8> {
    // A protobuf field: key (number << 3 | wire type), then the value;
    // type 0 varint (all values here < 128), type 2 length-delimited.
    fn int(n: u8, v: u8) -> Vec<u8> {
        vec![n << 3, v]
    }
    fn bytes(n: u8, v: &[u8]) -> Vec<u8> {
        [&[n << 3 | 2, v.len() as u8][..], v].concat()
    }
    // ValueInfoProto { name, type: TypeProto { tensor_type { elem_type:
    // FLOAT, shape { dim { dim_value: 1 } } } } }
    let value = |name: &[u8]| {
        let tensor = [int(1, 1), bytes(2, &bytes(1, &int(1, 1)))].concat();
        [bytes(1, name), bytes(2, &bytes(1, &tensor))].concat()
    };
    // NodeProto { input, output, op_type }
    let node = [bytes(1, b"x"), bytes(2, b"y"), bytes(4, b"Relu")].concat();
    // GraphProto { node, name, input, output }
    let graph = [
        bytes(1, &node),
        bytes(2, b"probe"),
        bytes(11, &value(b"x")),
        bytes(12, &value(b"y")),
    ]
    .concat();
    // ModelProto { ir_version, graph, opset_import { domain "", version } }
    [int(1, 8), bytes(7, &graph), bytes(8, &int(2, 17))].concat()
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    _spec: &ComponentSpec,
) -> Result<ort::session::builder::SessionBuilder> {
    // `auto` without the CUDA provider: the CPU.
    Ok(builder)
}

/// Check that the graph declares `required` inputs (and only names from
/// `allowed`), and has `output`; the error lists expected and found names.
pub fn check_io(session: &Session, model: &Path, required: &[&str], allowed: &[&str], output: &str) -> Result<()> {
    let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let missing = required.iter().any(|r| !inputs.contains(r));
    let unknown = inputs.iter().any(|i| !allowed.contains(i));
    if missing || unknown || !outputs.contains(&output) {
        // Names with their types and shapes (symbolic dimensions by name).
        let typed = |v: &[ort::value::Outlet]| -> Vec<String> {
            v.iter().map(|o| format!("{}: {}", o.name(), o.dtype())).collect()
        };
        return Err(Error::model(format!(
            "{}: graph does not match the stage: expected inputs {required:?} (optionally {:?}) and output \
             '{output}', found inputs {:?} and outputs {:?}",
            model.display(),
            allowed.iter().filter(|a| !required.contains(a)).collect::<Vec<_>>(),
            typed(session.inputs()),
            typed(session.outputs()),
        )));
    }
    Ok(())
}

/// An ONNX Runtime error as ragar's.
pub fn ort_err(e: ort::Error) -> Error {
    Error::model(format!("ONNX Runtime: {e}"))
}

/// The session behind a stage's `&self` (ort's `run` needs `&mut`).
pub fn lock(s: &std::sync::Mutex<Session>) -> Result<std::sync::MutexGuard<'_, Session>> {
    s.lock()
        .map_err(|_| Error::model("ONNX session poisoned by an earlier panic"))
}

/// Run `s` on named inputs and return output `name` as f32 values.
pub fn run_f32(
    s: &std::sync::Mutex<Session>,
    inputs: Vec<(&'static str, ort::value::DynValue)>,
    name: &str,
) -> Result<Vec<f32>> {
    let mut s = lock(s)?;
    let out = s.run(inputs).map_err(ort_err)?;
    let (_, data) = out[name].try_extract_tensor::<f32>().map_err(ort_err)?;
    Ok(data.to_vec())
}

/// `count` empty cache tensors `[rows, heads, 0, head_dim]`: the cache
/// before the prefix.
pub fn empty_cache(count: usize, rows: usize, heads: usize, head_dim: usize) -> Result<Vec<ort::value::DynValue>> {
    let shape = vec![rows as i64, heads as i64, 0, head_dim as i64];
    (0..count)
        .map(|_| {
            Ok(ort::value::Tensor::from_array((shape.clone(), Vec::<f32>::new()))
                .map_err(ort_err)?
                .into_dyn())
        })
        .collect()
}

/// Move the outputs `names` out of a run (the next step's cache), in
/// order; a missing one is named with its graph.
pub fn take_outputs<'a>(
    out: &mut ort::session::SessionOutputs<'_>,
    names: impl IntoIterator<Item = &'a str>,
    graph: &str,
) -> Result<Vec<ort::value::DynValue>> {
    names
        .into_iter()
        .map(|n| {
            out.remove(n)
                .ok_or_else(|| Error::model(format!("{graph}: no output {n}")))
        })
        .collect()
}

/// Rows `rows` of a cache tensor `[n, ...]`, as a new value (beam
/// reordering, one image's rows repeated for its beams).
pub fn take_rows(v: &ort::value::DynValue, rows: &[u32]) -> Result<ort::value::DynValue> {
    let (shape, data) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
    let n = shape.first().copied().unwrap_or(0).max(1) as usize;
    let mut shape = shape.to_vec();
    shape[0] = rows.len() as i64;
    let picked = ragar_core::decoding::gather_rows(data, data.len() / n, rows);
    Ok(ort::value::Tensor::from_array((shape, picked))
        .map_err(ort_err)?
        .into_dyn())
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    fn spec(device: &str) -> ComponentSpec {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut spec = ComponentSpec::new("encoder", serde_json::json!({}));
        spec.device = device.into();
        spec.cache_dir = std::env::var("RAGAR_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join(".ragar"))
            .display()
            .to_string()
            .into();
        spec
    }

    /// The library scripts/setup.sh installs is ONNX Runtime's CPU build:
    /// its CUDA provider cannot start, and `cuda:0` must say so rather than
    /// run on the CPU; `auto` runs there.
    #[test]
    fn cuda_fails_loudly_where_the_provider_cannot_start_and_auto_falls_back() {
        if std::env::var_os("ORT_DYLIB_PATH").is_some() {
            // Another library (onnxruntime-gpu on a GPU machine may start).
            eprintln!("skipped: ORT_DYLIB_PATH names another ONNX Runtime than scripts/setup.sh's");
            return;
        }
        let s = spec("cuda:0");
        let model = Path::new(s.cache_dir.as_str()).join("models/all-MiniLM-L6-v2/model.onnx");
        let Err(err) = session(&s, &model) else {
            panic!("cuda:0 on a CPU-only ONNX Runtime opened a session")
        };
        let err = err.to_string();
        eprintln!("{err}");
        assert!(
            err.contains("encoder.device: cuda:0") && err.contains("CUDA execution provider did not start"),
            "{err}"
        );
        assert!(session(&spec("auto"), &model).is_ok());
    }

    /// The preflight's graph is a model ONNX Runtime opens and runs.
    #[test]
    fn the_preflight_graph_is_a_valid_onnx_model() {
        let env = environment(Path::new(spec("cpu").cache_dir.as_str())).unwrap();
        let mut s = Session::builder(env)
            .unwrap()
            .commit_from_memory(&relu_graph())
            .unwrap();
        let x = ort::value::Tensor::from_array((vec![1i64], vec![-2.0f32])).unwrap();
        let out = s.run(ort::inputs!["x" => x]).unwrap();
        let (_, y) = out["y"].try_extract_tensor::<f32>().unwrap();
        assert_eq!(y, &[0.0]);
    }
}
