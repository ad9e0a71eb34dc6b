//! ragar-candle built as a shared library: `RAGAR_PLUGIN_PATH=libragar_candle_plugin.so`.
ragar_core::export_plugin!("candle", ragar_candle::components);
