#pragma once
// Naive float64 references for the four ops, written from the math in ops/*.h with plain loops and
// no call into statemamba. Inputs may have any floating dtype (they are read as float64, so a
// bfloat16 input is compared on the values it actually holds); every result is float64.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace statemamba::test {

using OptTensor = std::optional<at::Tensor>;

// Returns (y [B, D, L], final_state [B, D, N]).
std::tuple<at::Tensor, at::Tensor> reference_selective_scan(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    bool delta_softplus, const OptTensor& initial_state, const OptTensor& reset);

// Returns (y [B, D, L], final_state [B, D, W-1]).
std::tuple<at::Tensor, at::Tensor> reference_causal_conv1d(const at::Tensor& x, const at::Tensor& weight,
                                                           const OptTensor& bias,
                                                           const OptTensor& initial_state,
                                                           const OptTensor& reset, bool silu);

// Decode steps; they leave `state` alone and return (y [B, D], the state after the step).
std::tuple<at::Tensor, at::Tensor> reference_selective_state_update(
    const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
    const OptTensor& dt_bias, bool dt_softplus, const OptTensor& reset);
std::tuple<at::Tensor, at::Tensor> reference_causal_conv1d_update(const at::Tensor& x,
                                                                  const at::Tensor& conv_state,
                                                                  const at::Tensor& weight,
                                                                  const OptTensor& bias, bool silu,
                                                                  const OptTensor& reset);

}  // namespace statemamba::test
