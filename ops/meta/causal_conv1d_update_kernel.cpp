// Meta (shape-only) kernel for causal_conv1d_update.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

at::Tensor causal_conv1d_update_meta(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, bool,
                                     const std::optional<at::Tensor>& reset) {
  check_causal_conv1d_update_args(x, conv_state, weight, bias, reset);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) { m.impl("causal_conv1d_update", &causal_conv1d_update_meta); }

}  // namespace statemamba::ops
