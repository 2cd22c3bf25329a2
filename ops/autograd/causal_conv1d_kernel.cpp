// Autograd for causal_conv1d: saves the inputs, recomputes the pre-activation in the backward op.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/optional_tensor.h"
#include "ops/causal_conv1d.h"

namespace statemamba::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class CausalConv1dFunction : public torch::autograd::Function<CausalConv1dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& initial_state,
                               const std::optional<at::Tensor>& reset, bool silu) {
    ctx->save_for_backward({x, weight, or_undefined(bias), or_undefined(initial_state), or_undefined(reset)});
    ctx->saved_data["silu"] = silu;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, final_state] = causal_conv1d(x, weight, bias, initial_state, reset, silu);
    return {y, final_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    auto [dx, dweight, dbias, dinit] = causal_conv1d_backward(
        grad_y, or_none(grads[1]), s[0], s[1], or_none(s[2]), or_none(s[3]), or_none(s[4]),
        ctx->saved_data["silu"].toBool());
    return {dx, dweight, dbias, dinit, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> causal_conv1d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& initial_state,
                                                          const std::optional<at::Tensor>& reset, bool silu) {
  auto out = CausalConv1dFunction::apply(x, weight, bias, initial_state, reset, silu);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Autograd, m) { m.impl("causal_conv1d", &causal_conv1d_autograd); }

}  // namespace statemamba::ops
