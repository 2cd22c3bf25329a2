#include "ops/mamba_mixer_step.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "ops/args.h"
#include "ops/causal_conv1d_update.h"
#include "ops/selective_state_update.h"

namespace statemamba::ops {
namespace {

constexpr const char* kOp = "mamba_mixer_step";

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  return o.str() + ']';
}

void check_shape(const char* arg, const at::Tensor& t, const std::vector<int64_t>& want, const char* layout,
                 const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), kOp, ": argument '", arg, "' is an undefined tensor");
  TORCH_CHECK(t.sizes().vec() == want, kOp, ": argument '", arg, "' must have shape ", layout, " = ",
              shape_str(want), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(t.device() == ref.device(), kOp, ": argument '", arg, "' is on ", t.device(),
              " but 'xz' is on ", ref.device());
}

void check_dtype(const char* arg, const at::Tensor& t, at::ScalarType want, const char* why) {
  TORCH_CHECK(t.scalar_type() == want, kOp, ": argument '", arg, "' must be ", want, " (", why, "), got ",
              t.scalar_type());
}

// Parameters other than the projections may be float32 or xz's dtype.
void check_param(const char* arg, const at::Tensor& t, const std::vector<int64_t>& want, const char* layout,
                 const at::Tensor& xz) {
  check_shape(arg, t, want, layout, xz);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == xz.scalar_type(), kOp, ": argument '", arg,
              "' must be float32 or ", xz.scalar_type(), " (xz's dtype), got ", t.scalar_type());
}

}  // namespace

MixerStepDims check_mamba_mixer_step_args(const at::Tensor& xz, const at::Tensor& conv_state,
                                          const at::Tensor& ssm_state, const at::Tensor& conv_weight,
                                          const std::optional<at::Tensor>& conv_bias,
                                          const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                          const at::Tensor& dt_proj_bias, const at::Tensor& A,
                                          const at::Tensor& D, const std::optional<at::Tensor>& reset) {
  TORCH_CHECK(xz.defined(), kOp, ": argument 'xz' is an undefined tensor");
  const auto t = xz.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, kOp,
              ": argument 'xz' must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(xz.dim() == 2 && xz.size(1) % 2 == 0 && xz.size(1) > 0, kOp,
              ": argument 'xz' must have shape [batch, 2·d_inner] (x then z), got ", shape_str(xz.sizes()));
  TORCH_CHECK(ssm_state.defined() && ssm_state.dim() == 3, kOp,
              ": argument 'ssm_state' must have shape [batch, d_inner, d_state], got ",
              ssm_state.defined() ? shape_str(ssm_state.sizes()) : "undefined");
  TORCH_CHECK(conv_weight.defined() && conv_weight.dim() == 2, kOp,
              ": argument 'conv_weight' must have shape [d_inner, width], got ",
              conv_weight.defined() ? shape_str(conv_weight.sizes()) : "undefined");
  TORCH_CHECK(dt_proj_weight.defined() && dt_proj_weight.dim() == 2, kOp,
              ": argument 'dt_proj_weight' must have shape [d_inner, dt_rank], got ",
              dt_proj_weight.defined() ? shape_str(dt_proj_weight.sizes()) : "undefined");
  const int64_t B = xz.size(0), Dm = xz.size(1) / 2, N = ssm_state.size(2), W = conv_weight.size(1);
  const int64_t R = dt_proj_weight.size(1);
  TORCH_CHECK(W >= 1, kOp, ": argument 'conv_weight' must have at least one tap, got ", shape_str(conv_weight.sizes()));
  TORCH_CHECK(N >= 1 && R >= 1, kOp, ": d_state and dt_rank must be at least 1, got ", N, " and ", R);
  const auto state_dtype = state_dtype_for(t);
  for (auto [arg, s, cols, layout] : {std::tuple{"conv_state", &conv_state, W - 1, "[batch, d_inner, width-1]"},
                                      std::tuple{"ssm_state", &ssm_state, N, "[batch, d_inner, d_state]"}}) {
    check_shape(arg, *s, {B, Dm, cols}, layout, xz);
    check_dtype(arg, *s, state_dtype, "state is kept in float32, float64 for float64 inputs");
  }
  check_param("conv_weight", conv_weight, {Dm, W}, "[d_inner, width]", xz);
  if (conv_bias) check_param("conv_bias", *conv_bias, {Dm}, "[d_inner]", xz);
  check_shape("x_proj_weight", x_proj_weight, {R + 2 * N, Dm}, "[dt_rank + 2·d_state, d_inner]", xz);
  check_dtype("x_proj_weight", x_proj_weight, t, "xz's dtype, as a Linear layer needs");
  check_shape("dt_proj_weight", dt_proj_weight, {Dm, R}, "[d_inner, dt_rank]", xz);
  check_dtype("dt_proj_weight", dt_proj_weight, t, "xz's dtype, as a Linear layer needs");
  check_param("dt_proj_bias", dt_proj_bias, {Dm}, "[d_inner]", xz);
  check_param("A", A, {Dm, N}, "[d_inner, d_state]", xz);
  check_param("D", D, {Dm}, "[d_inner]", xz);
  if (reset) {
    check_shape("reset", *reset, {B}, "[batch]", xz);
    check_dtype("reset", *reset, at::kBool, "a mask of the rows to start afresh");
  }
  return {B, Dm, W, N, R, state_dtype};
}

at::Tensor mamba_mixer_step_unfused(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                                    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                                    const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                    const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                                    const std::optional<at::Tensor>& reset) {
  const MixerStepDims s = check_mamba_mixer_step_args(xz, conv_state, ssm_state, conv_weight, conv_bias,
                                                      x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reset);
  const auto acc = s.state_dtype;
  const auto xc = causal_conv1d_update(xz.narrow(1, 0, s.dim), conv_state, conv_weight, conv_bias, /*silu=*/true,
                                       reset);
  const auto x_dbl = at::linear(xc, x_proj_weight);
  const auto dt = at::linear(x_dbl.narrow(-1, 0, s.rank), dt_proj_weight);
  return selective_state_update(ssm_state, xc, dt, A.to(acc), x_dbl.narrow(-1, s.rank, s.dstate),
                                x_dbl.narrow(-1, s.rank + s.dstate, s.dstate), D.to(acc),
                                xz.narrow(1, s.dim, s.dim), dt_proj_bias.to(acc), /*dt_softplus=*/true, reset);
}

at::Tensor mamba_mixer_step(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                            const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                            const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                            const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                            const std::optional<at::Tensor>& reset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("statemamba::mamba_mixer_step", "")
                       .typed<decltype(mamba_mixer_step)>();
  return op.call(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                 A, D, reset);
}

TORCH_LIBRARY_FRAGMENT(statemamba, m) {
  m.def(
      "mamba_mixer_step(Tensor xz, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor conv_weight, "
      "Tensor? conv_bias, Tensor x_proj_weight, Tensor dt_proj_weight, Tensor dt_proj_bias, Tensor A, "
      "Tensor D, Tensor? reset=None) -> Tensor");
}

}  // namespace statemamba::ops
