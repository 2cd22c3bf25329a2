// Meta (shape-only) kernels for causal_conv1d.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> causal_conv1d_meta(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& initial_state,
                                                      const std::optional<at::Tensor>& reset, bool) {
  const ConvDims s = check_causal_conv1d_args(x, weight, bias, initial_state, reset);
  return {at::empty_like(x, at::MemoryFormat::Contiguous),
          at::empty({s.batch, s.dim, s.width - 1}, x.options().dtype(s.state_dtype))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward_meta(
    const at::Tensor& grad_y, const std::optional<at::Tensor>&, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& reset, bool) {
  check_causal_conv1d_args(x, weight, bias, initial_state, reset);
  auto like = [](const std::optional<at::Tensor>& t) {
    return t ? at::empty_like(*t, at::MemoryFormat::Contiguous) : at::Tensor();
  };
  return {like(x), like(weight), like(bias), like(initial_state)};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) {
  m.impl("causal_conv1d", &causal_conv1d_meta);
  m.impl("causal_conv1d_backward", &causal_conv1d_backward_meta);
}

}  // namespace statemamba::ops
