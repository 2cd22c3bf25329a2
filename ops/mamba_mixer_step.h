#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace statemamba::ops {

// One decode step of a whole Mamba mixer between in_proj and out_proj, with the mixer's own
// parameters; conv_state [B, D, W-1] and ssm_state [B, D, N] (float32, float64 for float64 inputs)
// are advanced in place. With R the Δ rank:
//   xz: [B, 2D] = (x; z), in_proj's output      conv_weight: [D, W]   conv_bias: [D]
//   x_proj_weight: [R + 2N, D]   dt_proj_weight: [D, R]   dt_proj_bias, D: [D]   A = -exp(A_log): [D, N]
//   reset: [B] bool (the marked rows forget their past before the step)
// Returns y [B, D] in xz's dtype, the same values as the separate ops give (mamba_mixer_step_unfused):
//   xc = SiLU(causal_conv1d_update(x)); (δ, B, C) = split(xc · x_projᵀ); Δ = δ · dt_projᵀ;
//   y = selective_state_update(xc, Δ, A, B, C, D, z, dt_bias, softplus)
// with x_proj's and dt_proj's outputs rounded to xz's dtype, as Linear layers of that dtype do.
// On CUDA (float32 state, W <= 8, N <= 128) it runs as two fused kernels; elsewhere it is the
// separate ops. Inference only: no backward.
at::Tensor mamba_mixer_step(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                            const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                            const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                            const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                            const std::optional<at::Tensor>& reset = std::nullopt);

// The same step through causal_conv1d_update, two linear layers and selective_state_update: the
// definition the fused kernels are tested against, and the CPU kernel.
at::Tensor mamba_mixer_step_unfused(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                                    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                                    const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                    const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                                    const std::optional<at::Tensor>& reset = std::nullopt);

struct MixerStepDims {
  int64_t batch, dim, width, dstate, rank;
  at::ScalarType state_dtype;
};
// Shapes, dtypes and devices of mamba_mixer_step's arguments; c10::Error naming the argument,
// what was expected and what came. Shared by the op's CPU, CUDA and Meta kernels.
MixerStepDims check_mamba_mixer_step_args(const at::Tensor& xz, const at::Tensor& conv_state,
                                          const at::Tensor& ssm_state, const at::Tensor& conv_weight,
                                          const std::optional<at::Tensor>& conv_bias,
                                          const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                          const at::Tensor& dt_proj_bias, const at::Tensor& A,
                                          const at::Tensor& D, const std::optional<at::Tensor>& reset);

}  // namespace statemamba::ops
