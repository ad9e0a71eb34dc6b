//! ragar-ort built as a shared library: `RAGAR_PLUGIN_PATH=libragar_ort_plugin.so`.
ragar_core::export_plugin!("ort", ragar_ort::components);
