// Meta (shape-only) kernel for selective_state_update.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/args.h"

namespace statemamba::ops {
namespace {

at::Tensor selective_state_update_meta(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                       const std::optional<at::Tensor>& dt_bias, bool,
                                       const std::optional<at::Tensor>& reset) {
  check_selective_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, reset);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) { m.impl("selective_state_update", &selective_state_update_meta); }

}  // namespace statemamba::ops
