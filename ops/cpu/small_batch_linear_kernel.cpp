// CPU kernel of small_batch_linear: at::linear itself (MKL's GEMV is already memory-bound here).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_small_batch_linear_args(x, weight, bias);
  return at::linear(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) { m.impl("small_batch_linear", &small_batch_linear_cpu); }

}  // namespace statemamba::ops
