// Meta (shape-only) kernel for mamba_mixer_step.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/mamba_mixer_step.h"

namespace statemamba::ops {
namespace {

at::Tensor mamba_mixer_step_meta(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                                 const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                                 const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                 const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                                 const std::optional<at::Tensor>& reset) {
  const MixerStepDims s = check_mamba_mixer_step_args(xz, conv_state, ssm_state, conv_weight, conv_bias,
                                                      x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reset);
  return at::empty({s.batch, s.dim}, xz.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Meta, m) { m.impl("mamba_mixer_step", &mamba_mixer_step_meta); }

}  // namespace statemamba::ops
