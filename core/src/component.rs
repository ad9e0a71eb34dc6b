//! What a plugin offers (a [`Component`]: descriptor + factory) and what the
//! host hands a factory when it builds one (a [`ComponentSpec`]).

use crate::data::DType;
use crate::error::{Error, Result};
use crate::stage::{CaptionerBox, EncoderBox, GeneratorBox, KeywordLlmBox, MapperBox, RankerBox};
use abi_stable::std_types::{RResult, RString, RVec, Tuple2};
use abi_stable::StableAbi;
use std::path::{Path, PathBuf};

/// The six stages of the RAGAR pipeline.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// image -> caption (retrieval, Eq. 2).
    Captioner,
    /// text / image -> vector (retrieval Eq. 2 and 4, keyword feature, metrics).
    Encoder,
    /// prompt -> keywords (Eq. 6); prompt with [IMG] tokens -> hidden states (Eq. 7).
    KeywordLlm,
    /// Modal Mapper + Balance Calibrator (Eq. 8-9), trainable by reflection (Eq. 10-15).
    Mapper,
    /// conditioning -> image (Stable Diffusion or another generator).
    Generator,
    /// user history + candidates -> scores (reflection Eq. 10-12, metrics).
    Ranker,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::Captioner,
        Stage::Encoder,
        Stage::KeywordLlm,
        Stage::Mapper,
        Stage::Generator,
        Stage::Ranker,
    ];
    /// The spelling used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Captioner => "captioner",
            Stage::Encoder => "encoder",
            Stage::KeywordLlm => "keyword-llm",
            Stage::Mapper => "mapper",
            Stage::Generator => "generator",
            Stage::Ranker => "ranker",
        }
    }
    /// Parse [`Stage::as_str`]'s spelling (underscores accepted too).
    pub fn parse(s: &str) -> Result<Self> {
        let norm = s.replace('_', "-");
        Stage::ALL.into_iter().find(|st| st.as_str() == norm).ok_or_else(|| {
            let names: Vec<_> = Stage::ALL.iter().map(|s| s.as_str()).collect();
            Error::config(format!("unknown stage '{s}' (stages: {})", names.join(", ")))
        })
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a component is: shown by `ragar plugins`, matched by configs.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct ComponentDescriptor {
    /// The stage it implements.
    pub stage: Stage,
    /// Model name, shared across backends (`minilm`, `clip`, ...).
    pub name: RString,
    /// Backend (`candle`, `ort`, `tch`, `builtin`, ...).
    pub backend: RString,
    /// The implementing crate's version.
    pub version: RString,
    /// Devices it can run on (`cpu`, `cuda`).
    pub devices: RVec<RString>,
    /// One line for people.
    pub summary: RString,
}

impl ComponentDescriptor {
    /// A descriptor from plain strings.
    pub fn new(stage: Stage, name: &str, backend: &str, version: &str, devices: &[&str], summary: &str) -> Self {
        ComponentDescriptor {
            stage,
            name: name.into(),
            backend: backend.into(),
            version: version.into(),
            devices: devices.iter().map(|d| RString::from(*d)).collect(),
            summary: summary.into(),
        }
    }
}

/// Everything a factory gets to build a component.
///
/// `params_json` is the component's `params:` block, opaque to the host; the
/// plugin parses it with `deny_unknown_fields` (see [`ComponentSpec::params`]).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ComponentSpec {
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: RString,
    /// Compute dtype.
    pub dtype: DType,
    /// The `params:` block as JSON (an object, possibly empty).
    pub params_json: RString,
    /// Directory relative paths in params are resolved against (the config file's).
    pub base_dir: RString,
    /// The project-local cache (native libraries, weights), see `scripts/setup.sh`.
    pub cache_dir: RString,
    /// Where the component sits in the config (`encoder`), for error messages.
    pub key: RString,
}

impl ComponentSpec {
    /// A CPU/f32 spec with the given params, for tests and tools.
    pub fn new(key: &str, params: serde_json::Value) -> Self {
        ComponentSpec {
            device: "cpu".into(),
            dtype: DType::F32,
            params_json: params.to_string().into(),
            base_dir: ".".into(),
            cache_dir: ".ragar".into(),
            key: key.into(),
        }
    }

    /// For backends that run a model file in the precision it was exported
    /// in (ONNX graphs, TorchScript modules; the export scripts write f32):
    /// any other `dtype` is refused, naming the key, rather than run in f32
    /// under another name (a benchmark row labelled f16 that ran f32).
    pub fn require_exported_f32(&self, backend: &str) -> Result<()> {
        match self.dtype {
            DType::F32 => Ok(()),
            d => Err(Error::unsupported(format!(
                "{}.dtype: {} on {backend}: {backend} runs the exported model file in its own precision, \
                 and the export scripts write f32; say `dtype: f32`, or run {} on candle",
                self.key,
                d.as_str(),
                d.as_str()
            ))),
        }
    }

    /// Parse `params` into the plugin's own struct; unknown keys are rejected
    /// when the struct says `#[serde(deny_unknown_fields)]`.
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.params_json).map_err(|e| Error::config(format!("{}.params: {e}", self.key)))
    }

    /// Resolve a path from params: `${RAGAR_CACHE}` expands to the cache dir,
    /// absolute paths stay, relative ones are taken from `base_dir`.
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        let expanded = p.replace("${RAGAR_CACHE}", &self.cache_dir);
        let path = Path::new(&expanded);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            Path::new(self.base_dir.as_str()).join(path)
        }
    }

    /// The device as a parsed [`Device`].
    pub fn device(&self) -> Result<Device> {
        Device::parse(&self.device)
    }
}

/// A parsed device string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// CUDA 0 when available, else CPU (only when the config says so).
    Auto,
}

impl Device {
    /// Parse `cpu`, `cuda`, `cuda:N`, `auto`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::Auto),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::config(format!("unknown device '{s}' (cpu, cuda, cuda:N or auto)"))),
        }
    }
}

macro_rules! factories {
    ($($(#[$doc:meta])* $stage:ident => $boxed:ty),* $(,)?) => {
        /// How to build a component: one constructor per stage.
        #[repr(u8)]
        #[derive(StableAbi, Clone, Copy)]
        pub enum Factory {
            $($(#[$doc])* $stage(extern "C" fn(&ComponentSpec) -> RResult<$boxed, Error>),)*
        }
        impl Factory {
            /// The stage this factory builds.
            pub fn stage(&self) -> Stage {
                match self { $(Factory::$stage(_) => Stage::$stage,)* }
            }
        }
    };
}

factories! {
    /// Builds a captioner.
    Captioner => CaptionerBox,
    /// Builds an encoder.
    Encoder => EncoderBox,
    /// Builds a keyword LLM.
    KeywordLlm => KeywordLlmBox,
    /// Builds a mapper.
    Mapper => MapperBox,
    /// Builds a generator.
    Generator => GeneratorBox,
    /// Builds a ranker.
    Ranker => RankerBox,
}

/// What a component will need and produce, found without loading weights
/// (for `ragar validate`): the files it will read (each checked to exist)
/// and named shape facts the host wires between stages, e.g. an encoder's
/// `text_dim`, an LLM's `hidden_size`, a mapper's `keyword_dim`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct Probe {
    /// Files the component will read.
    pub files: RVec<RString>,
    /// Shape facts, name -> value.
    pub facts: RVec<Tuple2<RString, u64>>,
}

impl Probe {
    /// Add a file that must exist (checked here, so the error names it).
    pub fn file(mut self, path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::not_found(format!("missing file {}", path.display())));
        }
        self.files.push(path.to_string_lossy().as_ref().into());
        Ok(self)
    }
    /// Record an exported model file; a missing one is an error that names
    /// the command writing it (`export`).
    pub fn exported(self, path: &Path, export: &str) -> Result<Self> {
        if !path.exists() {
            return Err(Error::not_found(format!(
                "missing model file {} (export it with: {export})",
                path.display()
            )));
        }
        self.file(path)
    }
    /// Add a shape fact.
    pub fn fact(mut self, name: &str, value: u64) -> Self {
        self.facts.push(Tuple2(name.into(), value));
        self
    }
    /// Look a fact up.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.facts.iter().find(|t| t.0 == name).map(|t| t.1)
    }
}

/// A probe for components that read nothing before building: parses nothing,
/// reports nothing.
pub extern "C" fn no_probe(_spec: &ComponentSpec) -> RResult<Probe, Error> {
    RResult::ROk(Probe::default())
}

/// A component a plugin offers.
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct Component {
    /// Who it is.
    pub descriptor: ComponentDescriptor,
    /// How to build it.
    pub factory: Factory,
    /// What it needs and produces, without loading weights.
    pub probe: extern "C" fn(&ComponentSpec) -> RResult<Probe, Error>,
}

/// Declare a [`Component`]: `component!(Encoder, "minilm", "candle", ["cpu", "cuda"],
/// "summary", MiniLm::load, MiniLm::probe)` where `MiniLm::load: fn(&ComponentSpec) ->
/// Result<MiniLm>`, `MiniLm: stage::Encoder`, and the optional `probe: fn(&ComponentSpec)
/// -> Result<Probe>` checks params and files without loading weights. The generated
/// functions catch panics.
#[macro_export]
macro_rules! component {
    ($stage:ident, $name:expr, $backend:expr, [$($dev:expr),*], $summary:expr, $ctor:expr) => {{
        $crate::component!(@make $stage, $name, $backend, [$($dev),*], $summary, $ctor, $crate::component::no_probe)
    }};
    ($stage:ident, $name:expr, $backend:expr, [$($dev:expr),*], $summary:expr, $ctor:expr, $probe:expr) => {{
        extern "C" fn probe(
            spec: &$crate::ComponentSpec,
        ) -> $crate::abi_stable::std_types::RResult<$crate::component::Probe, $crate::Error> {
            $crate::guard(|| ($probe)(spec))
        }
        $crate::component!(@make $stage, $name, $backend, [$($dev),*], $summary, $ctor, probe)
    }};
    (@make $stage:ident, $name:expr, $backend:expr, [$($dev:expr),*], $summary:expr, $ctor:expr, $probe:expr) => {{
        extern "C" fn make(
            spec: &$crate::ComponentSpec,
        ) -> $crate::abi_stable::std_types::RResult<$crate::__stage_box!($stage), $crate::Error> {
            $crate::guard(|| ($ctor)(spec).map($crate::__stage_boxer!($stage)))
        }
        $crate::Component {
            descriptor: $crate::ComponentDescriptor::new(
                $crate::Stage::$stage,
                $name,
                $backend,
                env!("CARGO_PKG_VERSION"),
                &[$($dev),*],
                $summary,
            ),
            factory: $crate::Factory::$stage(make),
            probe: $probe,
        }
    }};
}
