// Meta (shape-only) kernels for selective_scan: same checks as every backend, no data touched.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> selective_scan_meta(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& reset) {
  const ScanDims s = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  return {at::empty_like(u, at::MemoryFormat::Contiguous),
          at::empty({s.batch, s.dim, s.dstate}, u.options().dtype(s.state_dtype))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_backward_meta(const at::Tensor& grad_y, const std::optional<at::Tensor>&, const at::Tensor& u,
                             const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                             const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                             const std::optional<at::Tensor>& delta_bias, bool,
                             const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset) {
  check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  auto like = [](const std::optional<at::Tensor>& t) {
    return t ? at::empty_like(*t, at::MemoryFormat::Contiguous) : at::Tensor();
  };
  return {like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias), like(initial_state)};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) {
  m.impl("selective_scan", &selective_scan_meta);
  m.impl("selective_scan_backward", &selective_scan_backward_meta);
}

}  // namespace statemamba::ops
