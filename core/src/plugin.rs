//! How plugins reach the host: statically (inventory) or dynamically (an
//! abi_stable root module in a cdylib). Both paths hand over the same
//! [`Component`] values, so the host cannot tell them apart.

use crate::component::Component;
use abi_stable::library::RootModule;
use abi_stable::std_types::{RStr, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, StableAbi};

/// Bumped when the meaning of a contract changes in a way abi_stable's
/// layout check cannot see. A plugin built for another value is refused.
pub const INTERFACE_VERSION: u32 = 1;

/// A statically linked plugin, registered with `inventory`.
pub struct StaticPlugin {
    /// Plugin name (`candle`, `ort`, ...).
    pub name: &'static str,
    /// Its components.
    pub components: fn() -> Vec<Component>,
}

inventory::collect!(StaticPlugin);

/// Every statically linked plugin.
pub fn static_plugins() -> impl Iterator<Item = &'static StaticPlugin> {
    inventory::iter::<StaticPlugin>.into_iter()
}

/// Register a plugin crate's components for static linking:
/// `register_static!("candle", components);` with `fn components() -> Vec<Component>`.
#[macro_export]
macro_rules! register_static {
    ($name:expr, $components:path) => {
        $crate::inventory::submit! {
            $crate::plugin::StaticPlugin { name: $name, components: $components }
        }
    };
}

/// The root module a dynamic plugin exports. Fields may only be appended
/// (after the last prefix field), never changed.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// [`INTERFACE_VERSION`] the plugin was built with.
    pub interface_version: u32,
    /// Plugin name.
    pub name: RStr<'static>,
    /// Its components.
    #[sabi(last_prefix_field)]
    pub components: extern "C" fn() -> RVec<Component>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "ragar_plugin";
    const NAME: &'static str = "ragar_plugin";
    const VERSION_STRINGS: abi_stable::sabi_types::VersionStrings = package_version_strings!();
}

/// Export a plugin crate from a cdylib:
/// `ragar_core::export_plugin!("candle", ragar_candle::components);`.
/// The cdylib must depend on `abi_stable` directly.
#[macro_export]
macro_rules! export_plugin {
    ($name:expr, $components:path) => {
        #[::abi_stable::export_root_module]
        pub fn ragar_plugin_root() -> $crate::plugin::PluginModRef {
            // Named apart from any `components` the caller passes in.
            extern "C" fn ragar_plugin_components() -> $crate::abi_stable::std_types::RVec<$crate::Component> {
                // A panic here would cross the FFI boundary and abort the host.
                ::std::panic::catch_unwind($components)
                    .map(|v| v.into_iter().collect())
                    .unwrap_or_default()
            }
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::plugin::PluginMod {
                interface_version: $crate::plugin::INTERFACE_VERSION,
                name: $crate::abi_stable::std_types::RStr::from_str($name),
                components: ragar_plugin_components,
            }
            .leak_into_prefix()
        }
    };
}
