#pragma once
// Finite-difference gradient check in float64: autograd's gradients of a scalar loss, through our
// ops, against central differences of the same loss.
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

namespace statemamba::test {

using LossFn = std::function<at::Tensor(const std::vector<at::Tensor>&)>;

struct GradTolerance {
  double eps = 1e-6;   // central-difference step; truncation error ~eps², rounding ~1e-16/eps
  double atol = 1e-7;
  double rtol = 1e-5;
};

// A scalar loss of an op's (y, final_state) that weights every element with its own fixed random
// weight, so each output element, the state's included, feeds a distinct gradient. use_y /
// use_state drop a term, leaving that output's incoming gradient undefined.
struct WeightedLoss {
  at::Tensor y_weight, state_weight;  // float64
  bool use_y = true, use_state = true;

  WeightedLoss(at::IntArrayRef y_shape, at::IntArrayRef state_shape, uint64_t seed);
  at::Tensor operator()(const at::Tensor& y, const at::Tensor& final_state) const;
};

// Autograd gradients of loss(inputs) w.r.t. each input (undefined where the loss does not use it).
std::vector<at::Tensor> autograd_gradients(const LossFn& loss, const std::vector<at::Tensor>& inputs);

// Expects, for every float64 input, autograd's gradient to match central differences element by
// element; names[i] labels inputs[i] in failure messages.
void expect_gradients_match_finite_differences(const LossFn& loss, const std::vector<at::Tensor>& inputs,
                                               const std::vector<std::string>& names,
                                               GradTolerance tol = {});

}  // namespace statemamba::test
