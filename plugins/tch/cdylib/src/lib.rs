//! ragar-tch built as a shared library: `RAGAR_PLUGIN_PATH=libragar_tch_plugin.so`.
ragar_core::export_plugin!("tch", ragar_tch::components);
