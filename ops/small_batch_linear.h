#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace statemamba::ops {

// y = x · weightᵀ + bias for the few rows of a decode step: x [B, K], weight [N, K], bias [N], one
// dtype; returns y [B, N] in that dtype. The same function as at::linear. On CUDA, one or two
// rows of float32/float16/bfloat16 run as one pass over the weight (a GEMV: every warp streams
// whole weight rows, accumulating in float32), where GEMM libraries leave most of the memory
// bandwidth unused; larger batches and other inputs go to at::linear. Inference only: no backward.
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace statemamba::ops
