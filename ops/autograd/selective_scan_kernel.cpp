// Autograd for selective_scan: saves the inputs and recomputes inside selective_scan_backward, so
// training memory is the inputs alone. Both outputs are differentiable (the final state carries
// gradient into the next chunk when chunks are trained together).
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/optional_tensor.h"
#include "ops/selective_scan.h"

namespace statemamba::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SelectiveScanFunction : public torch::autograd::Function<SelectiveScanFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& delta,
                               const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                               const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                               const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                               const std::optional<at::Tensor>& initial_state,
                               const std::optional<at::Tensor>& reset) {
    ctx->save_for_backward({u, delta, A, B, C, or_undefined(D), or_undefined(z), or_undefined(delta_bias),
                            or_undefined(initial_state), or_undefined(reset)});
    ctx->saved_data["delta_softplus"] = delta_softplus;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, final_state] = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset);
    return {y, final_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor& u = s[0];
    at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(u);
    auto [du, ddelta, dA, dB, dC, dD, dz, dbias, dinit] = selective_scan_backward(
        grad_y, or_none(grads[1]), u, s[1], s[2], s[3], s[4], or_none(s[5]), or_none(s[6]), or_none(s[7]),
        ctx->saved_data["delta_softplus"].toBool(), or_none(s[8]), or_none(s[9]));
    return {du, ddelta, dA, dB, dC, dD, dz, dbias, at::Tensor(), dinit, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> selective_scan_autograd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset) {
  auto out = SelectiveScanFunction::apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Autograd, m) { m.impl("selective_scan", &selective_scan_autograd); }

}  // namespace statemamba::ops
