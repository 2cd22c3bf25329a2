// CPU kernel of add_rms_norm_linear: the two ops (add_rms_norm's CPU kernel, then at::linear).
#include <torch/library.h>

#include "ops/add_rms_norm_linear.h"
#include "ops/args.h"

namespace statemamba::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cpu(const at::Tensor& hidden,
                                                           const std::optional<at::Tensor>& residual,
                                                           const at::Tensor& norm_weight, double eps,
                                                           std::optional<at::ScalarType> residual_dtype,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias) {
  check_add_rms_norm_linear_args(hidden, residual, norm_weight, eps, residual_dtype, weight, bias);
  return add_rms_norm_linear_unfused(hidden, residual, norm_weight, eps, residual_dtype, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) { m.impl("add_rms_norm_linear", &add_rms_norm_linear_cpu); }

}  // namespace statemamba::ops
