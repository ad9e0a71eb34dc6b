//! Configuration: defaults < YAML file(s) < `RAGAR_*` environment <
//! `key.path=value` command-line overrides (merged last), with figment.
//!
//! YAML is read through serde_norway (serde_yaml is deprecated) behind
//! figment's `Format` trait. Unknown keys are rejected with their path; each
//! value remembers where it came from (`ragar print-config`).

use figment::providers::{Env, Format, Serialized};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use ragar_core::{ComponentSpec, DType, Error, Result, Stage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shared libraries with dynamic plugins to load (besides `RAGAR_PLUGIN_PATH`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PathBuf>,
    /// Project-local cache (native libraries, weights); found automatically when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The content-addressed store of captions, embeddings and keywords
    /// (default `<cache_dir>/stage-outputs.redb`; `${RAGAR_CACHE}` expands
    /// to the cache directory; one process at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_cache: Option<PathBuf>,
    /// Image -> caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captioner: Option<ComponentConfig>,
    /// Text / image -> vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<ComponentConfig>,
    /// Image -> vector, when item images should not go through `encoder`
    /// (a text-only encoder such as MiniLM beside an image encoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_encoder: Option<ComponentConfig>,
    /// Keywords and [IMG] hidden states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword_llm: Option<ComponentConfig>,
    /// Modal Mapper + Balance Calibrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapper: Option<ComponentConfig>,
    /// Image generator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<ComponentConfig>,
    /// Ranker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranker: Option<ComponentConfig>,
    /// The users and items (`ragar train`, `run`, `train-ranker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<crate::dataset::DatasetConfig>,
    /// The RAGAR method's settings (the paper's values by default).
    #[serde(default)]
    pub method: crate::pipeline::MethodConfig,
    /// `ragar evaluate`'s settings (LPIPS weights).
    #[serde(default)]
    pub evaluation: crate::evaluate::EvaluationConfig,
}

/// One stage's component block.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// Component (model) name, e.g. `minilm`.
    pub name: String,
    /// Backend: `candle`, `ort`, `tch`, `builtin`, or a dynamic plugin's.
    pub backend: String,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA if present, else CPU).
    #[serde(default = "default_device")]
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Opaque to the host; the plugin parses and checks them.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "f32".into()
}

impl Config {
    /// How many stages are configured.
    pub fn component_count(&self) -> usize {
        Stage::ALL.iter().filter(|s| self.component(**s).is_some()).count()
    }

    /// The component block of `stage`, if configured.
    pub fn component(&self, stage: Stage) -> Option<&ComponentConfig> {
        match stage {
            Stage::Captioner => self.captioner.as_ref(),
            Stage::Encoder => self.encoder.as_ref(),
            Stage::KeywordLlm => self.keyword_llm.as_ref(),
            Stage::Mapper => self.mapper.as_ref(),
            Stage::Generator => self.generator.as_ref(),
            Stage::Ranker => self.ranker.as_ref(),
        }
    }

    /// ONNX Runtime's CUDA provider and libtorch's CUDA build each bring
    /// their own CUDA libraries (cuBLAS, cuDNN, ...), loaded into one
    /// process when one config puts an `ort` and a `tch` component on CUDA;
    /// two versions of one library in a process may clash (wrong symbols,
    /// crashes at the first kernel). The warning, when that is so.
    pub fn cuda_backends_clash(&self) -> Option<String> {
        let blocks: Vec<(String, &ComponentConfig)> = Stage::ALL
            .iter()
            .filter_map(|s| self.component(*s).map(|c| (stage_key(*s), c)))
            .chain(self.image_encoder.as_ref().map(|c| ("image_encoder".to_string(), c)))
            .collect();
        let on_cuda = |backend: &str| -> Vec<String> {
            blocks
                .iter()
                .filter(|(_, c)| c.backend == backend && c.device.starts_with("cuda"))
                .map(|(k, _)| k.clone())
                .collect()
        };
        let (ort, tch) = (on_cuda("ort"), on_cuda("tch"));
        if ort.is_empty() || tch.is_empty() {
            return None;
        }
        Some(format!(
            "{} on ONNX Runtime CUDA and {} on libtorch CUDA share one process: their CUDA libraries \
             (cuBLAS, cuDNN) may clash. If it fails, put those stages on one CUDA backend (or one on \
             the CPU); running each backend in its own process is the planned fix",
            ort.join(", "),
            tch.join(", ")
        ))
    }
}

/// The config key of a stage's block (`keyword_llm` for `keyword-llm`).
pub fn stage_key(stage: Stage) -> String {
    stage.as_str().replace('-', "_")
}

/// YAML for figment, through serde_norway.
pub struct Yaml;

impl Format for Yaml {
    type Error = serde_norway::Error;
    const NAME: &'static str = "YAML";
    fn from_str<T: serde::de::DeserializeOwned>(s: &str) -> std::result::Result<T, Self::Error> {
        serde_norway::from_str(s)
    }
}

/// `key.path=value` overrides from the command line. Values are parsed as
/// YAML scalars/flow collections, so `batch_size=8` is a number and
/// `plugins=[a.so]` a list.
#[derive(Clone, Debug, Default)]
pub struct Overrides(Vec<(String, String)>);

impl Overrides {
    /// Parse `k=v` arguments; anything without `=` is an error naming it.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        args.iter()
            .map(|a| {
                let a = a.as_ref();
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| Error::config(format!("override '{a}' is not of the form key.path=value")))?;
                if k.is_empty() || k.split('.').any(str::is_empty) {
                    return Err(Error::config(format!("override '{a}' has an empty key segment")));
                }
                Ok((k.to_string(), v.to_string()))
            })
            .collect::<Result<_>>()
            .map(Overrides)
    }

    fn nested(&self) -> std::result::Result<serde_json::Value, figment::Error> {
        let mut root = serde_json::Value::Object(Default::default());
        for (k, v) in &self.0 {
            let value: serde_json::Value =
                serde_norway::from_str(v).map_err(|e| figment::Error::from(format!("override {k}={v}: {e}")))?;
            let mut node = &mut root;
            let parts: Vec<&str> = k.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let obj = match node {
                    serde_json::Value::Object(o) => o,
                    _ => return Err(figment::Error::from(format!("override {k}: '{part}' is below a value"))),
                };
                if i + 1 == parts.len() {
                    obj.insert(part.to_string(), value.clone());
                    break;
                }
                node = obj
                    .entry(part.to_string())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if !node.is_object() {
                    *node = serde_json::Value::Object(Default::default());
                }
            }
        }
        Ok(root)
    }
}

impl Provider for Overrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line override")
    }
    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(self.nested()?).data()
    }
}

/// Environment variables read by ragar that are not config keys
/// (`RAGAR_PYTHON`: the reference rows' Python in `ragar bench`, which its
/// `stage-bench` children inherit; `RAGAR_MKL_VENDOR_CHECK`: ragar-tch's
/// `mkl` module; `RAGAR_TCH_UNFROZEN`: ragar-tch's `load_module_as`).
const NON_CONFIG_ENV: [&str; 6] = [
    "CACHE",
    "PLUGIN_PATH",
    "LOG",
    "PYTHON",
    "MKL_VENDOR_CHECK",
    "TCH_UNFROZEN",
];

/// A loaded configuration and where each value came from.
pub struct Loaded {
    /// The typed config.
    pub config: Config,
    /// The merged figment, for provenance.
    pub figment: Figment,
    /// The YAML file (its directory resolves relative paths).
    pub file: Option<PathBuf>,
}

/// Load `file` (if any) with the environment and `overrides` on top.
///
/// Environment: `RAGAR_ENCODER__BACKEND=ort` sets `encoder.backend`
/// (double underscore separates levels).
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Loaded> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(f) = file {
        if !f.is_file() {
            return Err(Error::not_found(format!("config file {} does not exist", f.display())));
        }
        fig = fig.merge(Yaml::file_exact(f));
    }
    let env = Env::prefixed("RAGAR_")
        .split("__")
        .filter(|k| !NON_CONFIG_ENV.iter().any(|n| k.as_str().eq_ignore_ascii_case(n)));
    fig = fig.merge(env).merge(overrides.clone());
    let config: Config = fig.extract().map_err(|e| config_error(&e))?;
    Ok(Loaded {
        config,
        figment: fig,
        file: file.map(Path::to_path_buf),
    })
}

/// figment's error chain as one message per line.
fn config_error(e: &figment::Error) -> Error {
    let lines: Vec<String> = e.clone().into_iter().map(|e| e.to_string()).collect();
    Error::config(format!("invalid configuration:\n  {}", lines.join("\n  ")))
}

impl Loaded {
    /// Directory relative paths in params are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.file
            .as_ref()
            .and_then(|f| f.parent())
            .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    /// Cache directory: `cache_dir` key, else [`crate::paths::cache_dir`].
    pub fn cache_dir(&self) -> PathBuf {
        self.config.cache_dir.clone().unwrap_or_else(crate::paths::cache_dir)
    }

    /// The spec handed to the factory of `stage`'s component.
    pub fn spec(&self, stage: Stage) -> Result<ComponentSpec> {
        let key = stage_key(stage);
        let c = self
            .config
            .component(stage)
            .ok_or_else(|| Error::config(format!("the config has no `{key}` block")))?;
        self.block_spec(&key, c)
    }

    /// The spec of the component block `c` found under `key`.
    pub fn block_spec(&self, key: &str, c: &ComponentConfig) -> Result<ComponentSpec> {
        let dtype = DType::parse(&c.dtype).map_err(|e| e.context(format!("{key}.dtype")))?;
        ragar_core::Device::parse(&c.device).map_err(|e| e.context(format!("{key}.device")))?;
        Ok(ComponentSpec {
            device: c.device.as_str().into(),
            dtype,
            params_json: serde_json::Value::Object(c.params.clone()).to_string().into(),
            base_dir: self.base_dir().to_string_lossy().as_ref().into(),
            cache_dir: self.cache_dir().to_string_lossy().as_ref().into(),
            key: key.into(),
        })
    }

    /// Every leaf value as (dotted key, value, source), for `print-config`.
    pub fn provenance(&self) -> Vec<(String, serde_json::Value, String)> {
        let json = serde_json::to_value(&self.config).unwrap_or_default();
        let mut out = Vec::new();
        walk("", &json, &mut |key, v| {
            let source = match self.figment.find_metadata(key) {
                Some(md) => match &md.source {
                    Some(src) => format!("{} {src}", md.name),
                    None => md.name.to_string(),
                },
                None => "default".into(),
            };
            // Values present only through serde defaults are not in the figment.
            let source = if self.figment.find_value(key).is_err() {
                "default".into()
            } else {
                source
            };
            out.push((key.to_string(), v.clone(), source));
        });
        out
    }
}

fn walk(prefix: &str, v: &serde_json::Value, f: &mut impl FnMut(&str, &serde_json::Value)) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&key, child, f);
            }
        }
        _ if !prefix.is_empty() => f(prefix, v),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_nest_and_type_values() {
        let o = Overrides::parse(&[
            "encoder.params.batch_size=8",
            "encoder.backend=ort",
            "plugins=[a.so, b.so]",
        ])
        .unwrap();
        let v = o.nested().unwrap();
        assert_eq!(v["encoder"]["params"]["batch_size"], 8);
        assert_eq!(v["encoder"]["backend"], "ort");
        assert_eq!(v["plugins"][1], "b.so");
        assert!(Overrides::parse(&["novalue"]).is_err());
        assert!(Overrides::parse(&["a..b=1"]).is_err());
    }
}
