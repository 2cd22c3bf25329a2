#include "ops/small_batch_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace statemamba::ops {

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::small_batch_linear", "")
                       .typed<decltype(small_batch_linear)>();
  return op.call(x, weight, bias);
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

}  // namespace statemamba::ops
