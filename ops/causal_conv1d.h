#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace statemamba::ops {

// Depthwise causal convolution over a chunk, continuing from initial_state.
//   x: [B, D, L]   weight: [D, W]   bias: [D]   initial_state: [B, D, W-1] (the last W-1 inputs,
//   oldest first; zeros if absent)   reset: [B, L] bool
//   y_t = bias + Σ_k weight[k] · x_{t-W+1+k}, over inputs not hidden by a reset at or before t;
//   then y = silu(y) if silu.
// Returns (y [B, D, L] in x's dtype, final_state [B, D, W-1]: the last W-1 inputs, zeros where a
// reset hides them). Differentiable in x, weight, bias and initial_state.
std::tuple<at::Tensor, at::Tensor> causal_conv1d(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias = std::nullopt,
    const std::optional<at::Tensor>& initial_state = std::nullopt,
    const std::optional<at::Tensor>& reset = std::nullopt, bool silu = false);

// Gradients of causal_conv1d: (dx, dweight, dbias, dinitial_state); grad_final_state may be
// undefined; absent optional inputs get undefined gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset,
    bool silu);

}  // namespace statemamba::ops
