#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <optional>

namespace statemamba::ops {

// The pre-norm of a Mamba block in one pass (differentiable: gradients for hidden, residual, weight):
//   r = hidden + residual          (in their promoted dtype; r = hidden without a residual)
//   normed = RMSNorm(r as weight's dtype) · weight   = x · rsqrt(mean(x²) + eps) · weight
// Returns (normed in weight's dtype, r in residual_dtype, default the promoted dtype).
// hidden, residual: [..., C] floating, same shape and device; weight: [C]. Any strides; the kernels
// take row-major rows and, without copying, the channel-major [B, L, C] views the Mamba mixer
// produces (strides [C·L, 1, L]); outputs keep hidden's layout. Arithmetic in float32 (float64
// when an input is float64); every layout and batch size sums a row in the same order, so a row's
// result does not depend on the other rows or on the layout.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps,
                                                std::optional<at::ScalarType> residual_dtype = std::nullopt);

}  // namespace statemamba::ops
