// Meta (shape-only) kernel for add_rms_norm_linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_meta(const at::Tensor& hidden,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& norm_weight, double eps,
                                                            std::optional<at::ScalarType> residual_dtype,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias) {
  // Symbolic shapes (torch.compile's dynamic tracing) cannot be checked by value here; concrete ones
  // get every check the other backends make, with the same messages.
  if (!hidden.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
      !weight.unsafeGetTensorImpl()->has_symbolic_sizes_strides())
    check_add_rms_norm_linear_args(hidden, residual, norm_weight, eps, residual_dtype, weight, bias);
  const auto promoted = residual && residual->defined()
                            ? at::promote_types(hidden.scalar_type(), residual->scalar_type())
                            : hidden.scalar_type();
  return {at::empty_symint({hidden.sym_size(0), weight.sym_size(0)}, hidden.options().dtype(weight.scalar_type())),
          at::empty_symint(hidden.sym_sizes(), hidden.options().dtype(residual_dtype.value_or(promoted)))};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) { m.impl("add_rms_norm_linear", &add_rms_norm_linear_meta); }

}  // namespace statemamba::ops
