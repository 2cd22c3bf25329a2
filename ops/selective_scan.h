#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace statemamba::ops {

// Selective scan over a whole chunk, starting from initial_state (zeros if absent).
//   u, delta, z: [B, D, L]   A: [D, N]   B, C: [B, N, L]   D, delta_bias: [D]
//   initial_state: [B, D, N]   reset: [B, L] bool
//   Δ = softplus(delta + delta_bias) if delta_softplus, else delta + delta_bias
//   h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t     (h_{t-1} := 0 where reset[b, t])
//   y_t = C_t · h_t + D u_t,  then y_t *= silu(z_t) if z is given
// Returns (y [B, D, L] in u's dtype, final_state [B, D, N] = h after the last step).
// Differentiable in every tensor argument, initial_state included.
std::tuple<at::Tensor, at::Tensor> selective_scan(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D = std::nullopt,
    const std::optional<at::Tensor>& z = std::nullopt,
    const std::optional<at::Tensor>& delta_bias = std::nullopt, bool delta_softplus = false,
    const std::optional<at::Tensor>& initial_state = std::nullopt,
    const std::optional<at::Tensor>& reset = std::nullopt);

// Gradients of selective_scan. grad_final_state may be undefined. Returns
// (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); the gradient of an absent
// optional input is an undefined tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
selective_scan_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                        const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const std::optional<at::Tensor>& initial_state,
                        const std::optional<at::Tensor>& reset);

}  // namespace statemamba::ops
