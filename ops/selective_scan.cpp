#include "ops/selective_scan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace statemamba::ops {

std::tuple<at::Tensor, at::Tensor> selective_scan(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::selective_scan", "")
                       .typed<decltype(selective_scan)>();
  return op.call(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
selective_scan_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                        const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                        bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                        const std::optional<at::Tensor>& reset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::selective_scan_backward", "")
                       .typed<decltype(selective_scan_backward)>();
  return op.call(grad_y, grad_final_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                 initial_state, reset);
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D=None, "
      "Tensor? z=None, Tensor? delta_bias=None, bool delta_softplus=False, "
      "Tensor? initial_state=None, Tensor? reset=None) -> (Tensor y, Tensor final_state)");
  m.def(
      "selective_scan_backward(Tensor grad_y, Tensor? grad_final_state, Tensor u, Tensor delta, "
      "Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, "
      "Tensor? initial_state, Tensor? reset) -> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, "
      "Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, Tensor dinitial_state)");
}

}  // namespace statemamba::ops
