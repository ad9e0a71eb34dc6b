// Freezing a loaded TorchScript module for the CPU (ragar-tch's
// `freeze_for_cpu`): tch 0.24 has no binding for torch::jit::freeze.
//
// Freezing inlines the module's weights into its graph as constants, which
// lets FrozenLinearTranspose store each Linear's weight pre-transposed
// ([in, out]) and call matmul on it. MKL's products with a weight read
// transposed ([out, in], as nn.Linear keeps it) are slow for the few-row
// inputs of batch-1 encoding and of every decoding step; with the weight
// laid out for a plain product they run 15-40 % faster (measured: MiniLM
// and CLIP ViT-B/32 text at batch 1, SmolLM2 and Qwen2 decoding steps).
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/frozen_linear_transpose.h>

#include <cstring>
#include <exception>

// Replace *module by its frozen, linear-transposed form. Returns null on
// success; otherwise a malloc'd message (the caller frees it) and *module
// is left as it was.
extern "C" char* ragar_freeze_for_cpu(void* module) noexcept {
  try {
    auto* m = static_cast<torch::jit::Module*>(module);
    torch::jit::Module frozen = torch::jit::freeze(*m);
    auto graph = frozen.get_method("forward").graph();
    torch::jit::FrozenLinearTranspose(graph);
    // The pass leaves the untransposed weights behind as unused constants
    // (a second copy of every Linear: +150 MB on CLIP ViT-B/32's text
    // tower); dropping them brings the module back to its loaded size.
    torch::jit::EliminateDeadCode(graph);
    *m = frozen;
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception");
  }
}
