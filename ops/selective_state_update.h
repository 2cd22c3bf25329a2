#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace statemamba::ops {

// One decode step of the selective scan; `state` [B, D, N] (float32/float64) is advanced in place.
//   x, dt, z: [B, D]   A: [D, N]   B, C: [B, N]   D, dt_bias: [D]   reset: [B] bool (zero the row's
//   state before the step). Returns y [B, D] in x's dtype. Equals selective_scan with L = 1.
at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D = std::nullopt,
                                  const std::optional<at::Tensor>& z = std::nullopt,
                                  const std::optional<at::Tensor>& dt_bias = std::nullopt,
                                  bool dt_softplus = false,
                                  const std::optional<at::Tensor>& reset = std::nullopt);

}  // namespace statemamba::ops
