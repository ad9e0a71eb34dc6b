//! A plugin that misbehaves on purpose, to prove the host survives it:
//! its encoder panics inside `embed_text`, and with the `future-interface`
//! feature it claims an interface version the host does not implement.

use ragar_core::stage::{Encoder, EncoderInfo, TextEmbeddings};
use ragar_core::{component, Component, ComponentSpec, Result};

struct Panicking;

impl Encoder for Panicking {
    fn info(&self) -> EncoderInfo {
        EncoderInfo {
            dim: 4,
            text: true,
            image: false,
            max_tokens: 8,
            normalized: false,
        }
    }
    fn embed_text(&self, _texts: &[String]) -> Result<TextEmbeddings> {
        panic!("deliberate panic inside a plugin");
    }
}

fn components() -> Vec<Component> {
    vec![component!(
        Encoder,
        "panic",
        "test",
        ["cpu"],
        "panics on every call",
        |_: &ComponentSpec| Ok::<_, ragar_core::Error>(Panicking)
    )]
}

#[cfg(not(feature = "future-interface"))]
ragar_core::export_plugin!("misbehaving", components);

#[cfg(feature = "future-interface")]
#[abi_stable::export_root_module]
pub fn ragar_plugin_root() -> ragar_core::plugin::PluginModRef {
    use abi_stable::prefix_type::PrefixTypeTrait;
    extern "C" fn list() -> abi_stable::std_types::RVec<Component> {
        components().into()
    }
    ragar_core::plugin::PluginMod {
        interface_version: ragar_core::plugin::INTERFACE_VERSION + 1,
        name: abi_stable::std_types::RStr::from_str("from-the-future"),
        components: list,
    }
    .leak_into_prefix()
}
