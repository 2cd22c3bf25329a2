#include "ops/causal_conv1d.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace statemamba::ops {

std::tuple<at::Tensor, at::Tensor> causal_conv1d(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& initial_state,
                                                 const std::optional<at::Tensor>& reset, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::causal_conv1d", "")
                       .typed<decltype(causal_conv1d)>();
  return op.call(x, weight, bias, initial_state, reset, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::causal_conv1d_backward", "")
                       .typed<decltype(causal_conv1d_backward)>();
  return op.call(grad_y, grad_final_state, x, weight, bias, initial_state, reset, silu);
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def(
      "causal_conv1d(Tensor x, Tensor weight, Tensor? bias=None, Tensor? initial_state=None, "
      "Tensor? reset=None, bool silu=False) -> (Tensor y, Tensor final_state)");
  m.def(
      "causal_conv1d_backward(Tensor grad_y, Tensor? grad_final_state, Tensor x, Tensor weight, "
      "Tensor? bias, Tensor? initial_state, Tensor? reset, bool silu) -> (Tensor dx, Tensor dweight, "
      "Tensor dbias, Tensor dinitial_state)");
}

}  // namespace statemamba::ops
