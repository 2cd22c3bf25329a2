#include "ops/add_rms_norm_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/add_rms_norm.h"
#include "ops/small_batch_linear.h"

namespace statemamba::ops {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear(const at::Tensor& hidden,
                                                       const std::optional<at::Tensor>& residual,
                                                       const at::Tensor& norm_weight, double eps,
                                                       std::optional<at::ScalarType> residual_dtype,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::add_rms_norm_linear", "")
                       .typed<decltype(add_rms_norm_linear)>();
  return op.call(hidden, residual, norm_weight, eps, residual_dtype, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_unfused(const at::Tensor& hidden,
                                                               const std::optional<at::Tensor>& residual,
                                                               const at::Tensor& norm_weight, double eps,
                                                               std::optional<at::ScalarType> residual_dtype,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias) {
  const auto [normed, r] = add_rms_norm(hidden, residual, norm_weight, eps, residual_dtype);
  return {small_batch_linear(normed, weight, bias), r};
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def(
      "add_rms_norm_linear(Tensor hidden, Tensor? residual, Tensor norm_weight, float eps, "
      "ScalarType? residual_dtype, Tensor weight, Tensor? bias=None) -> (Tensor, Tensor)");
}

}  // namespace statemamba::ops
