// Freezing a loaded TorchScript module for the CPU (ragar-tch's
// `freeze_for_cpu`): tch 0.24 has no binding for torch::jit::freeze.
//
// Freezing inlines the module's weights into its graph as constants, which
// lets each Linear's weight be stored in the layout MKL multiplies fastest:
//
// - Packed (MKL's sgemm_pack) and multiplied by `ragar::packed_linear`
//   below through sgemm_compute. An ordinary sgemm packs the weight anew on
//   every call, which for the few-row inputs of batch-1 encoding costs as
//   much as the product itself. The 72 products of a CLIP ViT-B/32 tower,
//   distinct weights each, on this 2-core AMD EPYC (ms, packed vs
//   transposed): 7 rows 15.5 vs 29.7, 14 rows 16.8 vs 30.5, 50 rows 46 vs
//   60, 112 rows 92 vs 104, 400 rows 325 vs 344, 1 row 18.7 vs 18.4.
//   Intel's extension for PyTorch packs fp32 Linears the same way. A ViT's
//   patch embedding (a convolution whose stride is its kernel) is such a
//   product too, and is packed the same way.
// - Otherwise (a libtorch without MKL, a weight that is not f32):
//   transposed ([in, out]) and multiplied with aten::matmul. MKL's products
//   with a weight read transposed ([out, in], as nn.Linear keeps it) are
//   the slow path for few rows: 0.1-0.97x the time with the weight laid out
//   for a plain product.
//
// libtorch's own transposition pass (FrozenLinearTranspose) makes every
// copy before any original is released, so loading peaks at the module's
// Linear weights twice over (+550 MB for SmolLM2-135M, 28 GB for a 7B model
// in f32). The pass below swaps one Linear at a time and drops the original
// constant as soon as nothing uses it, so the peak is one extra weight
// matrix.
#include <ATen/ATen.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/runtime/graph_iterator.h>
#include <torch/library.h>

#include <climits>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

// MKL's packed products, as libtorch_cpu exports them (Fortran calling
// convention, 32-bit integers). Weak: against a libtorch without MKL they
// stay null and Linears are transposed instead.
extern "C" {
size_t SGEMM_PACK_GET_SIZE(const char* identifier, const int* m, const int* n, const int* k)
    __attribute__((weak));
void SGEMM_PACK(const char* identifier, const char* trans, const int* m, const int* n,
                const int* k, const float* alpha, const float* src, const int* ld, float* dest)
    __attribute__((weak));
void SGEMM_COMPUTE(const char* transa, const char* transb, const int* m, const int* n,
                   const int* k, const float* a, const int* lda, const float* b, const int* ldb,
                   const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

bool mkl_packing_available() {
  return SGEMM_PACK_GET_SIZE != nullptr && SGEMM_PACK != nullptr && SGEMM_COMPUTE != nullptr;
}

// The row count MKL is told to expect when packing. The packed layout does
// not depend on it (the same size, and the same products within f32
// rounding, for 1 to 1,000 rows packed with 1, 50 or 400: checked against
// f64 on four shapes), so one packing serves every batch and length.
constexpr int kPackRowsHint = 64;

// W [n, k] (nn.Linear's [out, in]) packed as MKL's matrix A of the
// column-major product C'[n, m] = W[n, k] . X'[k, m], which is the
// row-major Y[m, n] = X[m, k] . W^T. The buffer has MKL's upper bound for
// its size (several MB over the matrix's own, even for small ones); pages
// MKL never writes are never touched, so they cost address space, not
// memory.
at::Tensor mkl_pack(const at::Tensor& w) {
  const int n = static_cast<int>(w.size(0));
  const int k = static_cast<int>(w.size(1));
  const size_t bytes = SGEMM_PACK_GET_SIZE("A", &n, &kPackRowsHint, &k);
  at::Tensor packed = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, w.options());
  const float one = 1.0f;
  const at::Tensor wc = w.contiguous();
  SGEMM_PACK("A", "T", &n, &kPackRowsHint, &k, &one, wc.data_ptr<float>(), &k,
             packed.data_ptr<float>());
  return packed;
}

// y = x . W^T + bias for x [..., k] in f32, W packed by mkl_pack.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "ragar::packed_linear takes f32 inputs on the CPU, got ", x.scalar_type(), " on ",
              x.device());
  const int64_t k = x.size(-1);
  const at::Tensor xc = x.contiguous();
  const int64_t m = k == 0 ? 0 : xc.numel() / k;
  TORCH_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX, "ragar::packed_linear: a product of ",
              m, " x ", k, " x ", n, " is beyond MKL's 32-bit sizes");
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  // With a bias the output starts as a copy of it and MKL adds the product
  // (beta 1): one pass over the output fewer than a separate add. A copy
  // always: for a single row, expand(...).contiguous() would be the bias
  // constant itself, and MKL would add into the weights.
  at::Tensor y = at::empty(sizes, x.options());
  if (bias) {
    y.copy_(bias->expand(sizes));
  }
  if (m == 0) {
    return y;
  }
  if (k == 0) {
    return bias ? y : y.zero_();
  }
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const float beta = bias ? 1.0f : 0.0f;
  SGEMM_COMPUTE("P", "N", &ni, &mi, &ki, packed.data_ptr<float>(), &ki, xc.data_ptr<float>(),
                &ki, &beta, y.data_ptr<float>(), &ni);
  return y;
}

// A convolution whose kernel tiles its input (stride = kernel, no padding,
// dilation or groups: a ViT's patch embedding) as one packed product:
// x [N, C, H, W] -> patches [N * H' * W', C * kh * kw] . W^T -> [N, O, H', W'].
// oneDNN's convolution took 4.5 ms for CLIP ViT-B/32's 224 px patches
// where this takes 1.25 ms. The result is a permuted view, which the
// flatten(2).transpose(1, 2) a ViT applies next turns back into the
// product's own [N, H' * W', O] layout without a copy.
at::Tensor packed_patch_conv(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels,
                             int64_t kh, int64_t kw, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4, "ragar::packed_patch_conv takes [N, C, H, W] inputs, got ",
              x.sizes());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2) / kh, w = x.size(3) / kw;
  const at::Tensor patches = x.slice(2, 0, h * kh)
                                 .slice(3, 0, w * kw)
                                 .reshape({n, c, h, kh, w, kw})
                                 .permute({0, 2, 4, 1, 3, 5})
                                 .reshape({n * h * w, c * kh * kw});
  return packed_linear(patches, packed, out_channels, bias)
      .view({n, h, w, out_channels})
      .permute({0, 3, 1, 2});
}

// Registers ragar::packed_linear and ragar::packed_patch_conv once per
// process. The host and a dynamically loaded tch plugin each carry this
// shim; whichever freezes a module first registers them and the other
// finds them there. The library
// object is never destroyed, so the registration lasts the process.
void register_packed_ops() {
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  if (c10::Dispatcher::singleton().findOp(c10::OperatorName("ragar::packed_patch_conv", ""))) {
    return;
  }
  auto* lib =
      new torch::Library(torch::Library::FRAGMENT, "ragar", std::nullopt, __FILE__, __LINE__);
  lib->def("packed_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor",
           torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(packed_linear)));
  lib->def(
      "packed_patch_conv(Tensor x, Tensor packed, int out_channels, int kh, int kw, Tensor? bias) "
      "-> Tensor",
      torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(packed_patch_conv)));
}

// Puts `replacement` (already inserted after `n`) in the place of `n`'s
// output, removes `n`, and frees the weight constant `n` read unless
// another node reads it (a tied embedding).
void replace_node(Node* n, Node* replacement, Value* weight) {
  n->output()->replaceAllUsesWith(replacement->output());
  n->destroy();
  if (!weight->hasUses()) {
    weight->node()->destroy();
  }
}

// Each aten::linear(x, W, b) with a constant 2-D W becomes
// ragar::packed_linear(x, pack(W), n, b) where MKL can pack W (f32), else
// aten::matmul(x, W^T) [+ b] with W^T a contiguous constant.
void relayout_frozen_linears(std::shared_ptr<Graph>& graph) {
  std::vector<Node*> linears;
  torch::jit::DepthFirstGraphNodeIterator it(graph);
  for (Node* n = it.next(); n != nullptr; n = it.next()) {
    if (n->kind() == at::aten::linear && n->inputs().size() == 3 &&
        n->input(1)->node()->kind() == at::prim::Constant) {
      linears.push_back(n);
    }
  }
  const bool packing = mkl_packing_available();
  static const auto packed_linear_op = c10::Symbol::fromQualString("ragar::packed_linear");
  for (Node* n : linears) {
    Value* weight = n->input(1);
    auto w = torch::jit::constant_as<at::Tensor>(weight);
    if (!w || w->dim() != 2) {
      continue;
    }
    Value* bias = n->input(2);
    Node* result = nullptr;
    // Constants go before the Linear, the products after it.
    torch::jit::WithInsertPoint guard(n);
    if (packing && w->scalar_type() == at::kFloat && w->size(0) <= INT_MAX &&
        w->size(1) <= INT_MAX) {
      Value* packed = graph->insertConstant(mkl_pack(*w));
      Value* out_features = graph->insertConstant(w->size(0));
      w.reset();
      result = graph->create(packed_linear_op, {n->input(0), packed, out_features, bias});
      result->insertAfter(n);
      result->output()->setType(n->output()->type());
    } else {
      const bool has_bias = bias->type()->kind() != c10::TypeKind::NoneType;
      Value* wt = graph->insertConstant(w->t().contiguous());
      Value* alpha = has_bias ? graph->insertConstant(1) : nullptr;
      w.reset();
      result = graph->create(at::aten::matmul, {n->input(0), wt});
      result->insertAfter(n);
      result->output()->setType(n->output()->type());
      if (has_bias) {
        Node* add = graph->create(at::aten::add, {result->output(), bias, alpha});
        add->insertAfter(result);
        add->output()->setType(n->output()->type());
        result = add;
      }
    }
    replace_node(n, result, weight);
  }
}

// The ints of a constant int[] input, or nothing.
std::optional<std::vector<int64_t>> constant_ints(Value* v) {
  auto iv = torch::jit::toIValue(v);
  if (!iv || !iv->isIntList()) {
    return std::nullopt;
  }
  return iv->toIntVector();
}

// Each patch-embedding convolution (a constant f32 weight [O, C, kh, kw],
// stride (kh, kw), no padding, dilation 1, one group, not transposed)
// becomes ragar::packed_patch_conv. Needs MKL packing (the caller checks).
void pack_frozen_patch_convs(std::shared_ptr<Graph>& graph) {
  std::vector<Node*> convs;
  torch::jit::DepthFirstGraphNodeIterator it(graph);
  for (Node* n = it.next(); n != nullptr; n = it.next()) {
    // aten::_convolution(input, weight, bias, stride, padding, dilation,
    // transposed, output_padding, groups, ...), aten::conv2d(input, weight,
    // bias, stride, padding, dilation, groups).
    const bool full = n->kind() == at::aten::_convolution && n->inputs().size() >= 9;
    const bool conv2d = n->kind() == at::aten::conv2d && n->inputs().size() == 7;
    if ((full || conv2d) && n->input(1)->node()->kind() == at::prim::Constant) {
      convs.push_back(n);
    }
  }
  static const auto op = c10::Symbol::fromQualString("ragar::packed_patch_conv");
  for (Node* n : convs) {
    const bool full = n->kind() == at::aten::_convolution;
    auto w = torch::jit::constant_as<at::Tensor>(n->input(1));
    auto stride = constant_ints(n->input(3));
    auto padding = constant_ints(n->input(4));
    auto dilation = constant_ints(n->input(5));
    auto groups = torch::jit::constant_as<int64_t>(n->input(full ? 8 : 6));
    auto transposed = full ? torch::jit::constant_as<bool>(n->input(6)) : std::optional<bool>(false);
    if (!w || w->dim() != 4 || w->scalar_type() != at::kFloat || !stride || !padding ||
        !dilation || !groups || !transposed || *transposed || *groups != 1) {
      continue;
    }
    const int64_t kh = w->size(2), kw = w->size(3);
    const auto all = [](const std::vector<int64_t>& v, int64_t a, int64_t b) {
      return v.size() == 2 && v[0] == a && v[1] == b;
    };
    if (!all(*stride, kh, kw) || !all(*padding, 0, 0) || !all(*dilation, 1, 1) ||
        w->size(0) > INT_MAX || w->numel() / w->size(0) > INT_MAX) {
      continue;
    }
    Value* weight = n->input(1);
    torch::jit::WithInsertPoint guard(n);
    Value* packed = graph->insertConstant(mkl_pack(w->reshape({w->size(0), -1})));
    Value* out_channels = graph->insertConstant(w->size(0));
    Value* kh_v = graph->insertConstant(kh);
    Value* kw_v = graph->insertConstant(kw);
    w.reset();
    Node* result = graph->create(op, {n->input(0), packed, out_channels, kh_v, kw_v, n->input(2)});
    result->insertAfter(n);
    result->output()->setType(n->output()->type());
    replace_node(n, result, weight);
  }
}

}  // namespace

// Replace *module by its frozen form with packed (or pre-transposed) Linear
// weights. Returns null on success; otherwise a malloc'd message (the
// caller frees it). If freezing itself fails *module is left as it was.
extern "C" char* ragar_freeze_for_cpu(void* module) noexcept {
  try {
    auto* m = static_cast<torch::jit::Module*>(module);
    // The frozen module shares the loaded one's tensors; replacing the
    // loaded one first leaves the graph's constants their only owner, so
    // each original weight goes when its Linear is swapped.
    *m = torch::jit::freeze(*m);
    auto graph = m->get_method("forward").graph();
    if (mkl_packing_available()) {
      register_packed_ops();
      pack_frozen_patch_convs(graph);
    }
    relayout_frozen_linears(graph);
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

// Set whether TorchScript's graph executor optimizes the graphs this
// thread runs (libtorch keeps the setting per thread); returns the previous
// setting. ragar-tch turns it off around calls of frozen CPU modules:
// freezing has already run the optimizations that apply there, and the
// executor's profiling pipeline runs common-subexpression elimination,
// which compares every pair of tensor constants of one shape element by
// element; with the packed weights (buffers of one size for every small
// matrix) that took minutes on the tiny SD UNet's first calls.
extern "C" bool ragar_set_graph_executor_optimize(bool on) noexcept {
  const bool previous = torch::jit::getGraphExecutorOptimize();
  torch::jit::setGraphExecutorOptimize(on);
  return previous;
}
