// Autograd for add_rms_norm: the backward of r = hidden + residual, x = r, y = x·rsqrt(mean(x²)+eps)·w
// in ATen ops (float32, float64 for float64 inputs). The dtype casts pass gradients through
// unchanged, as autograd treats .to(); a gradient of residual_out adds to r's.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/add_rms_norm.h"
#include "ops/args.h"
#include "ops/autograd/optional_tensor.h"

namespace statemamba::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AddRmsNormFunction : public torch::autograd::Function<AddRmsNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                               const at::Tensor& weight, double eps, std::optional<at::ScalarType> residual_dtype) {
    ctx->save_for_backward({hidden, or_undefined(residual), weight});
    ctx->saved_data["eps"] = eps;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [normed, residual_out] = add_rms_norm(hidden, residual, weight, eps, residual_dtype);
    return {normed, residual_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &hidden = s[0], &residual = s[1], &weight = s[2];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool f64 = hidden.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble ||
                     (residual.defined() && residual.scalar_type() == at::kDouble);
    const at::ScalarType acc = f64 ? at::kDouble : at::kFloat;
    // The forward's values: r in the promoted dtype, x = r as weight's dtype.
    at::Tensor r = hidden.to(acc);
    if (residual.defined())
      r = (r + residual.to(acc)).to(at::promote_types(hidden.scalar_type(), residual.scalar_type())).to(acc);
    const at::Tensor x = r.to(weight.scalar_type()).to(acc);
    const at::Tensor inv = at::rsqrt(x.square().mean(-1, /*keepdim=*/true) + eps);
    at::Tensor d_r, d_weight;
    if (grads[0].defined()) {
      const at::Tensor gy = grads[0].to(acc);
      const at::Tensor g = gy * weight.to(acc);
      d_r = inv * (g - x * inv.square() * (g * x).mean(-1, /*keepdim=*/true));
      d_weight = (gy * x * inv).reshape({-1, weight.size(0)}).sum(0).to(weight.scalar_type());
    }
    if (grads[1].defined()) d_r = d_r.defined() ? d_r + grads[1].to(acc) : grads[1].to(acc);
    if (!d_r.defined()) d_r = at::zeros_like(r);
    return {d_r.to(hidden.scalar_type()), residual.defined() ? d_r.to(residual.scalar_type()) : at::Tensor(), d_weight,
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> add_rms_norm_autograd(const at::Tensor& hidden,
                                                         const std::optional<at::Tensor>& residual,
                                                         const at::Tensor& weight, double eps,
                                                         std::optional<at::ScalarType> residual_dtype) {
  auto out = AddRmsNormFunction::apply(hidden, residual, weight, eps, residual_dtype);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, Autograd, m) { m.impl("add_rms_norm", &add_rms_norm_autograd); }

}  // namespace statemamba::ops
