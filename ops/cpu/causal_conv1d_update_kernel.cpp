// CPU decode step of the causal conv: y = bias + Σ_k w[k]·[state, x][k], then the state shifts
// left by one and takes x as its newest column. Same summation order as the full conv kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/args.h"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

at::Tensor causal_conv1d_update_cpu(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, bool silu,
                                    const std::optional<at::Tensor>& reset) {
  const ConvDims s = check_causal_conv1d_update_args(x, conv_state, weight, bias, reset);
  const auto acc = s.state_dtype;
  const int64_t W = s.width;
  const at::Tensor x_ = x.to(acc).contiguous(), w_ = weight.to(acc).contiguous();
  const at::Tensor b_ = bias ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor reset_ = reset ? reset->contiguous() : at::Tensor();
  at::Tensor st = conv_state.is_contiguous() ? conv_state : conv_state.contiguous();
  auto y = at::empty({s.batch, s.dim}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "causal_conv1d_update_cpu", [&] {
    using T = scalar_t;
    // Base pointers once: data_ptr() checks dtype and storage on every call.
    T* const state_base = st.data_ptr<T>();
    const T *w_base = w_.data_ptr<T>(), *xs = x_.data_ptr<T>();
    const T* biases = b_.defined() ? b_.data_ptr<T>() : nullptr;
    const bool* resets = reset_.defined() ? reset_.data_ptr<bool>() : nullptr;
    T* const ys = y.data_ptr<T>();
    at::parallel_for(0, s.batch * s.dim, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / s.dim, d = row % s.dim;
        T* past = state_base + row * (W - 1);
        const T* w = w_base + d * W;
        const T xt = xs[row];
        if (resets && resets[b]) std::fill(past, past + W - 1, T(0));
        T out = biases ? biases[d] : T(0);
        for (int64_t k = 0; k < W - 1; ++k) out += w[k] * past[k];
        out += w[W - 1] * xt;
        ys[row] = silu ? ops::silu(out) : out;
        std::copy(past + 1, past + W - 1, past);
        past[W - 2] = xt;
      }
    });
  });
  if (!st.is_same(conv_state)) const_cast<at::Tensor&>(conv_state).copy_(st);
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) { m.impl("causal_conv1d_update", &causal_conv1d_update_cpu); }

}  // namespace statemamba::ops
