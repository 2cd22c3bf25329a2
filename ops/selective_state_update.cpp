#include "ops/selective_state_update.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace statemamba::ops {

at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const std::optional<at::Tensor>& reset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::selective_state_update", "")
                       .typed<decltype(selective_state_update)>();
  return op.call(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, reset);
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
      "Tensor? D=None, Tensor? z=None, Tensor? dt_bias=None, bool dt_softplus=False, "
      "Tensor? reset=None) -> Tensor");
}

}  // namespace statemamba::ops
