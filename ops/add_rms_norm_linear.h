#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <optional>
#include <tuple>

namespace statemamba::ops {

// A Mamba block's decode step up to in_proj's output, in one pass:
//   (normed, r) = add_rms_norm(hidden, residual, norm_weight, eps, residual_dtype)
//   y = normed · weightᵀ + bias
// Returns (y [B, N] in weight's dtype, r [B, C] in residual_dtype). hidden, residual: [B, C] rows;
// norm_weight [C] and weight [N, C] of one dtype (normed's); bias [N]. The same values as the two
// ops (add_rms_norm_linear_unfused), bit for bit on CUDA too: normed is computed as add_rms_norm's
// kernels compute it, and y as small_batch_linear's. On CUDA, one or two rows of
// float32/float16/bfloat16 run as one kernel that every block starts by normalising the rows into
// shared memory; other inputs take the two ops. Inference only: no backward.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear(const at::Tensor& hidden,
                                                       const std::optional<at::Tensor>& residual,
                                                       const at::Tensor& norm_weight, double eps,
                                                       std::optional<at::ScalarType> residual_dtype,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias = std::nullopt);

// The same through add_rms_norm and small_batch_linear: the definition, and the CPU kernel.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_unfused(const at::Tensor& hidden,
                                                               const std::optional<at::Tensor>& residual,
                                                               const at::Tensor& norm_weight, double eps,
                                                               std::optional<at::ScalarType> residual_dtype,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace statemamba::ops
