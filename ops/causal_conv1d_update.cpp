#include "ops/causal_conv1d_update.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace statemamba::ops {

at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool silu,
                                const std::optional<at::Tensor>& reset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::causal_conv1d_update", "")
                       .typed<decltype(causal_conv1d_update)>();
  return op.call(x, conv_state, weight, bias, silu, reset);
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias=None, "
      "bool silu=False, Tensor? reset=None) -> Tensor");
}

}  // namespace statemamba::ops
