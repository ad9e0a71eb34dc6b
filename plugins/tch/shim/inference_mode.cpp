// c10::InferenceMode for ragar-tch: tch 0.24 offers only no_grad. Inference
// mode also skips the version counters and view tracking that no_grad
// keeps per op (measured: 6-28 % on the tiny test models, level on
// full-size ones).
#include <c10/core/InferenceMode.h>

#include <new>

extern "C" void* ragar_inference_mode_enter() noexcept {
  return new (std::nothrow) c10::InferenceMode(true);
}

extern "C" void ragar_inference_mode_exit(void* guard) noexcept {
  delete static_cast<c10::InferenceMode*>(guard);
}
