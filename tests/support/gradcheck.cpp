#include "support/gradcheck.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

namespace statemamba::test {

WeightedLoss::WeightedLoss(at::IntArrayRef y_shape, at::IntArrayRef state_shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  y_weight = at::randn(y_shape, gen, at::kDouble);
  state_weight = at::randn(state_shape, gen, at::kDouble);
}

at::Tensor WeightedLoss::operator()(const at::Tensor& y, const at::Tensor& final_state) const {
  at::Tensor loss = at::zeros({}, at::kDouble);
  if (use_y) loss = loss + (y.to(at::kDouble) * y_weight).sum();
  if (use_state) loss = loss + (final_state.to(at::kDouble) * state_weight).sum();
  return loss;
}

std::vector<at::Tensor> autograd_gradients(const LossFn& loss, const std::vector<at::Tensor>& inputs) {
  std::vector<at::Tensor> leaves;
  for (const auto& t : inputs) leaves.push_back(t.detach().clone().requires_grad_(true));
  const at::Tensor value = loss(leaves);
  return torch::autograd::grad({value}, leaves, /*grad_outputs=*/{}, /*retain_graph=*/false,
                               /*create_graph=*/false, /*allow_unused=*/true);
}

void expect_gradients_match_finite_differences(const LossFn& loss, const std::vector<at::Tensor>& inputs,
                                               const std::vector<std::string>& names, GradTolerance tol) {
  ASSERT_EQ(inputs.size(), names.size());
  const auto analytic = autograd_gradients(loss, inputs);

  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> point;
  for (const auto& t : inputs) point.push_back(t.detach().clone().contiguous());
  auto loss_at = [&] { return loss(point).item<double>(); };

  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_EQ(point[i].scalar_type(), at::kDouble) << "gradcheck needs float64, '" << names[i] << "' is not";
    ASSERT_TRUE(analytic[i].defined()) << "autograd gave no gradient for '" << names[i] << "'";
    ASSERT_EQ(analytic[i].sizes(), inputs[i].sizes()) << "gradient of '" << names[i] << "'";
    const at::Tensor grad = analytic[i].to(at::kDouble).contiguous();
    double* x = point[i].data_ptr<double>();
    int64_t mismatches = 0, worst = -1;
    double worst_excess = 0, worst_numeric = 0, worst_analytic = 0;
    for (int64_t j = 0; j < point[i].numel(); ++j) {
      const double saved = x[j];
      x[j] = saved + tol.eps;
      const double plus = loss_at();
      x[j] = saved - tol.eps;
      const double minus = loss_at();
      x[j] = saved;
      const double numeric = (plus - minus) / (2 * tol.eps);
      const double a = grad.data_ptr<double>()[j];
      const double excess = std::abs(a - numeric) - (tol.atol + tol.rtol * std::abs(numeric));
      if (excess > 0 || std::isnan(a)) {
        ++mismatches;
        if (worst < 0 || excess > worst_excess) {
          worst = j, worst_excess = excess, worst_numeric = numeric, worst_analytic = a;
        }
      }
    }
    EXPECT_EQ(mismatches, 0) << "d loss / d " << names[i] << ": " << mismatches << " of " << point[i].numel()
                             << " elements differ from central differences; worst at flat index " << worst
                             << ": autograd " << worst_analytic << ", numeric " << worst_numeric;
  }
}

}  // namespace statemamba::test
