// Freezing a loaded TorchScript module for the CPU (ragar-tch's
// `freeze_for_cpu`): tch 0.24 has no binding for torch::jit::freeze.
//
// Freezing inlines the module's weights into its graph as constants, which
// lets each Linear's weight be stored pre-transposed ([in, out]) and
// multiplied with matmul. MKL's products with a weight read transposed
// ([out, in], as nn.Linear keeps it) are slow for the few-row inputs of
// batch-1 encoding and of every decoding step; with the weight laid out for
// a plain product MKL takes 0.1-0.97x the time, and whole stages ran
// 1.3-2x faster (backends matrix: MiniLM at batch 1, BLIP / BLIP-2
// captioning, SmolLM2 and Qwen2 decoding).
//
// libtorch's own pass for this (FrozenLinearTranspose) makes every
// transposed copy before any original is released, so loading peaks at the
// module's Linear weights twice over (+550 MB for SmolLM2-135M, 28 GB for a
// 7B model in f32). The pass below swaps one Linear at a time and drops the
// original constant as soon as nothing uses it, so the peak is one extra
// weight matrix.
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

// aten::linear(x, W, b) with a constant 2-D W  ->  aten::matmul(x, W^T) [+ b],
// W^T a contiguous constant.
void transpose_frozen_linears(std::shared_ptr<Graph>& graph) {
  std::vector<Node*> linears;
  torch::jit::DepthFirstGraphNodeIterator it(graph);
  for (Node* n = it.next(); n != nullptr; n = it.next()) {
    if (n->kind() == at::aten::linear && n->inputs().size() == 3 &&
        n->input(1)->node()->kind() == at::prim::Constant) {
      linears.push_back(n);
    }
  }
  for (Node* n : linears) {
    Value* weight = n->input(1);
    auto w = torch::jit::constant_as<at::Tensor>(weight);
    if (!w || w->dim() != 2) {
      continue;
    }
    Value* bias = n->input(2);
    const bool has_bias = bias->type()->kind() != c10::TypeKind::NoneType;
    // Constants go before the Linear, the products after it.
    torch::jit::WithInsertPoint guard(n);
    Value* wt = graph->insertConstant(w->t().contiguous());
    Value* alpha = has_bias ? graph->insertConstant(1) : nullptr;
    w.reset();
    Node* matmul = graph->create(at::aten::matmul, {n->input(0), wt});
    matmul->insertAfter(n);
    matmul->output()->setType(n->output()->type());
    Node* result = matmul;
    if (has_bias) {
      Node* add = graph->create(at::aten::add, {matmul->output(), bias, alpha});
      add->insertAfter(matmul);
      add->output()->setType(n->output()->type());
      result = add;
    }
    n->output()->replaceAllUsesWith(result->output());
    n->destroy();
    // The original matrix is freed here unless another node reads it (a
    // tied embedding).
    if (!weight->hasUses()) {
      weight->node()->destroy();
    }
  }
}

}  // namespace

// Replace *module by its frozen form with pre-transposed Linear weights.
// Returns null on success; otherwise a malloc'd message (the caller frees
// it). If freezing itself fails *module is left as it was.
extern "C" char* ragar_freeze_for_cpu(void* module) noexcept {
  try {
    auto* m = static_cast<torch::jit::Module*>(module);
    // The frozen module shares the loaded one's tensors; replacing the
    // loaded one first leaves the graph's constants their only owner, so
    // each original weight goes when its Linear is swapped.
    *m = torch::jit::freeze(*m);
    auto graph = m->get_method("forward").graph();
    transpose_frozen_linears(graph);
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception");
  }
}

// The forward graph of *module as text (a malloc'd string the caller frees;
// null on an error): what freezing made of it, for tests and debugging.
extern "C" char* ragar_forward_graph(void* module) noexcept {
  try {
    auto* m = static_cast<torch::jit::Module*>(module);
    return strdup(m->get_method("forward").graph()->toString().c_str());
  } catch (...) {
    return nullptr;
  }
}
