//! The component registry: statically linked plugins (inventory) and dynamic
//! ones (abi_stable cdylibs from the config's `plugins:` and
//! `RAGAR_PLUGIN_PATH`). Load failures are collected, not fatal one by one,
//! so the user sees every broken plugin at once.

use crate::config::Loaded;
use abi_stable::library::{lib_header_from_path, LibraryError};
use ragar_core::plugin::{PluginModRef, INTERFACE_VERSION};
use ragar_core::stage::{DynCaptioner, DynEncoder, DynGenerator, DynKeywordLlm, DynMapper, DynRanker};
use ragar_core::{Component, ComponentDescriptor, Error, Factory, Result, Stage};
use std::path::{Path, PathBuf};

/// Where a component came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Linked into this binary.
    Static {
        /// The plugin's name.
        plugin: String,
    },
    /// Loaded from a shared library.
    Dynamic {
        /// The library.
        path: PathBuf,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Static { plugin } => write!(f, "static ({plugin})"),
            Origin::Dynamic { path } => write!(f, "dynamic ({})", path.display()),
        }
    }
}

/// A registered component.
#[derive(Clone)]
pub struct Entry {
    /// The plugin's component.
    pub component: Component,
    /// Where it came from.
    pub origin: Origin,
}

/// A plugin library that could not be loaded, with a one-paragraph cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadFailure {
    /// The library path.
    pub path: PathBuf,
    /// Why, in one paragraph.
    pub cause: String,
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.cause)
    }
}

/// Every available component.
#[derive(Default)]
pub struct Registry {
    entries: Vec<Entry>,
    failures: Vec<LoadFailure>,
}

impl Registry {
    /// Static plugins plus the dynamic ones named in `config_plugins` and
    /// `RAGAR_PLUGIN_PATH` (a `:`-separated list).
    pub fn discover(config_plugins: &[PathBuf], base_dir: &Path) -> Self {
        let mut reg = Registry::default();
        for p in ragar_core::plugin::static_plugins() {
            for c in (p.components)() {
                reg.entries.push(Entry {
                    component: c,
                    origin: Origin::Static { plugin: p.name.into() },
                });
            }
        }
        let from_env = std::env::var_os("RAGAR_PLUGIN_PATH")
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let from_config = config_plugins
            .iter()
            .map(|p| if p.is_absolute() { p.clone() } else { base_dir.join(p) });
        for path in from_env.into_iter().chain(from_config) {
            reg.load_library(&path);
        }
        reg
    }

    /// Load one plugin library; on failure record why and go on.
    pub fn load_library(&mut self, path: &Path) {
        match load_plugin(path) {
            Ok(components) => {
                let origin = Origin::Dynamic {
                    path: path.to_path_buf(),
                };
                self.entries.extend(components.into_iter().map(|c| Entry {
                    component: c,
                    origin: origin.clone(),
                }));
            }
            Err(cause) => self.failures.push(LoadFailure {
                path: path.to_path_buf(),
                cause,
            }),
        }
    }

    /// Every component, static first then dynamic in load order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Libraries that failed to load.
    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    /// Fail with every load failure at once, if there were any.
    pub fn ensure_loaded(&self) -> Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = self.failures.iter().map(|f| format!("- {f}")).collect();
        Err(Error::new(
            ragar_core::ErrorKind::NativeLibrary,
            format!("{} plugin(s) failed to load:\n{}", self.failures.len(), list.join("\n")),
        ))
    }

    /// The component for (`stage`, `name`, `backend`). A dynamically loaded
    /// one wins over a static one of the same identity (the user asked for
    /// it explicitly). Unknown names list what exists.
    pub fn find(&self, stage: Stage, name: &str, backend: &str) -> Result<&Entry> {
        let of_stage: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.component.descriptor.stage == stage)
            .collect();
        if let Some(e) = of_stage
            .iter()
            .rev()
            .find(|e| e.component.descriptor.name == name && e.component.descriptor.backend == backend)
        {
            return Ok(e);
        }
        let backends: Vec<String> = of_stage
            .iter()
            .filter(|e| e.component.descriptor.name == name)
            .map(|e| e.component.descriptor.backend.to_string())
            .collect();
        let mut msg = if backends.is_empty() {
            let mut names: Vec<String> = of_stage
                .iter()
                .map(|e| format!("{} ({})", e.component.descriptor.name, e.component.descriptor.backend))
                .collect();
            names.dedup();
            format!(
                "no {stage} component named '{name}'; available: {}",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            )
        } else {
            format!(
                "{stage} '{name}' has no backend '{backend}'; available backends: {}",
                backends.join(", ")
            )
        };
        if !self.failures.is_empty() {
            msg.push_str(&format!(
                " ({} plugin(s) failed to load: see `ragar plugins`)",
                self.failures.len()
            ));
        }
        Err(Error::config(msg))
    }

    fn spec_for(&self, loaded: &Loaded, stage: Stage) -> Result<(&Entry, ragar_core::ComponentSpec)> {
        let spec = loaded.spec(stage)?;
        let c = loaded.config.component(stage).expect("spec() checked the block exists");
        let entry = self
            .find(stage, &c.name, &c.backend)
            .map_err(|e| e.context(spec.key.as_str()))?;
        check_device(&entry.component.descriptor, &c.device).map_err(|e| e.context(spec.key.as_str()))?;
        Ok((entry, spec))
    }
}

impl Registry {
    /// The `image_encoder` block's encoder, when the config has one.
    pub fn image_encoder(&self, loaded: &Loaded) -> Result<Option<DynEncoder>> {
        let Some(c) = &loaded.config.image_encoder else {
            return Ok(None);
        };
        let spec = loaded.block_spec("image_encoder", c)?;
        let entry = self
            .find(Stage::Encoder, &c.name, &c.backend)
            .map_err(|e| e.context("image_encoder"))?;
        check_device(&entry.component.descriptor, &c.device).map_err(|e| e.context("image_encoder"))?;
        match entry.component.factory {
            Factory::Encoder(make) => make(&spec)
                .into_result()
                .and_then(DynEncoder::new)
                .map(Some)
                .map_err(|e| e.context("image_encoder")),
            other => Err(Error::model(format!(
                "plugin bug: component registered as encoder has a {} factory",
                other.stage()
            ))),
        }
    }
}

/// Refuse a device the component does not declare (`auto` always passes).
pub fn check_device(d: &ComponentDescriptor, device: &str) -> Result<()> {
    let kind = device.split(':').next().unwrap_or(device);
    if kind == "auto" || d.devices.iter().any(|x| x.as_str() == kind) {
        return Ok(());
    }
    let devs: Vec<&str> = d.devices.iter().map(|s| s.as_str()).collect();
    Err(Error::device(format!(
        "{} '{}' on {} runs on {}, not '{device}'",
        d.stage,
        d.name,
        d.backend,
        devs.join(", ")
    )))
}

macro_rules! builders {
    ($($(#[$doc:meta])* $fn_name:ident, $stage:ident => $dyn:ident, $wrap:expr;)*) => {
        impl Registry {
            $(
                $(#[$doc])*
                pub fn $fn_name(&self, loaded: &Loaded) -> Result<$dyn> {
                    let (entry, spec) = self.spec_for(loaded, Stage::$stage)?;
                    let key = spec.key.to_string();
                    match entry.component.factory {
                        Factory::$stage(make) => make(&spec).into_result().and_then($wrap).map_err(|e| e.context(key)),
                        other => Err(Error::model(format!(
                            "plugin bug: component registered as {} has a {} factory",
                            Stage::$stage,
                            other.stage()
                        ))),
                    }
                }
            )*
        }
    };
}

builders! {
    /// Build the configured captioner.
    captioner, Captioner => DynCaptioner, |b| Ok(DynCaptioner(b));
    /// Build the configured encoder.
    encoder, Encoder => DynEncoder, DynEncoder::new;
    /// Build the configured keyword LLM.
    keyword_llm, KeywordLlm => DynKeywordLlm, DynKeywordLlm::new;
    /// Build the configured mapper.
    mapper, Mapper => DynMapper, DynMapper::new;
    /// Build the configured generator.
    generator, Generator => DynGenerator, DynGenerator::new;
    /// Build the configured ranker.
    ranker, Ranker => DynRanker, |b| Ok(DynRanker(b));
}

/// Open a plugin library and read its components. Libraries are never
/// unloaded (components keep pointers into them).
fn load_plugin(path: &Path) -> std::result::Result<Vec<Component>, String> {
    if !path.exists() {
        return Err("file does not exist".into());
    }
    let header = lib_header_from_path(path).map_err(|e| summarize(&e))?;
    let module = header.init_root_module::<PluginModRef>().map_err(|e| summarize(&e))?;
    let version = module.interface_version();
    if version != INTERFACE_VERSION {
        return Err(format!(
            "plugin '{}' implements ragar plugin interface {version}, this ragar implements {INTERFACE_VERSION}; \
             rebuild the plugin against this ragar-core",
            module.name()
        ));
    }
    Ok((module.components())().into_vec())
}

/// abi_stable's errors can be ~30 KB (full layout dumps); keep one paragraph.
fn summarize(e: &LibraryError) -> String {
    match e {
        LibraryError::OpenError { err, .. } => format!("cannot be opened as a shared library: {err}"),
        LibraryError::GetSymbolError { .. } => {
            "is a shared library but not a ragar plugin (it exports no abi_stable root module)".into()
        }
        LibraryError::IncompatibleVersionNumber {
            library_name,
            expected_version,
            actual_version,
        } => format!(
            "was built against {library_name} {actual_version}, incompatible with this ragar's \
             {expected_version}; rebuild the plugin against this ragar-core"
        ),
        LibraryError::AbiInstability(_) => "its plugin interface types differ in layout from this ragar's \
             (built against another ragar-core); rebuild the plugin against this ragar-core"
            .into(),
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            "was built with an incompatible abi_stable or Rust ABI; rebuild it with this ragar's toolchain".into()
        }
        other => {
            let text = other.to_string();
            let first: String = text.lines().next().unwrap_or("").chars().take(300).collect();
            format!("failed to initialise: {first}")
        }
    }
}
