// Meta (shape-only) kernel for add_rms_norm: the outputs in the layout the real kernels choose.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_meta(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, double eps,
                                                     std::optional<at::ScalarType> residual_dtype) {
  const NormIO io = prepare_add_rms_norm(hidden, residual, weight, eps, residual_dtype);
  return {io.normed, io.residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) { m.impl("add_rms_norm", &add_rms_norm_meta); }

}  // namespace statemamba::ops
