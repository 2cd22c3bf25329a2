// Meta (shape-only) kernel for small_batch_linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

at::Tensor small_batch_linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const LinearDims s = check_small_batch_linear_args(x, weight, bias);
  return at::empty({s.batch, s.out_features}, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) { m.impl("small_batch_linear", &small_batch_linear_meta); }

}  // namespace statemamba::ops
