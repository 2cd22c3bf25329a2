#include "ops/add_rms_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace statemamba::ops {

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps,
                                                std::optional<at::ScalarType> residual_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::add_rms_norm", "")
                       .typed<decltype(add_rms_norm)>();
  return op.call(hidden, residual, weight, eps, residual_dtype);
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def(
      "add_rms_norm(Tensor hidden, Tensor? residual, Tensor weight, float eps, "
      "ScalarType? residual_dtype=None) -> (Tensor normed, Tensor residual_out)");
}

}  // namespace statemamba::ops
