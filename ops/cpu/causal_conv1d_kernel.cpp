// CPU causal conv1d: one pass per (batch, channel) row over the input extended on the left by the
// carried state, rows in parallel. A reset at t moves the row's "visible from" point to t.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/args.h"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

struct ConvInputs {
  at::Tensor x_ext;   // [B, D, W-1+L]: carried state (or zeros), then x, in the state dtype
  at::Tensor weight;  // [D, W]
  at::Tensor bias;    // [D] or undefined
  at::Tensor reset;   // [B, L] or undefined
};

// The inputs' base pointers, fetched once per call: data_ptr() checks dtype and storage each time,
// which costs as much as a short row's conv (L = 1 in an RL rollout).
template <typename T>
struct RowPointers {
  const T *x_ext, *weight, *bias;
  const bool* reset;
  explicit RowPointers(const ConvInputs& in)
      : x_ext(in.x_ext.data_ptr<T>()), weight(in.weight.data_ptr<T>()),
        bias(in.bias.defined() ? in.bias.data_ptr<T>() : nullptr),
        reset(in.reset.defined() ? in.reset.data_ptr<bool>() : nullptr) {}
};

ConvInputs prepare(const ConvDims& s, const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& initial_state,
                   const std::optional<at::Tensor>& reset) {
  const auto acc = s.state_dtype;
  at::Tensor past = initial_state ? initial_state->to(acc)
                                  : at::zeros({s.batch, s.dim, s.width - 1}, x.options().dtype(acc));
  ConvInputs in;
  in.x_ext = at::cat({past, x.to(acc)}, 2).contiguous();
  in.weight = weight.to(acc).contiguous();
  if (bias) in.bias = bias->to(acc).contiguous();
  if (reset) in.reset = reset->contiguous();
  return in;
}

// visible_from[t] (in x_ext coordinates): the first input position output t may see.
void visible_from(const bool* reset, int64_t L, int64_t W, std::vector<int64_t>& out) {
  int64_t from = 0;
  for (int64_t t = 0; t < L; ++t) {
    if (reset && reset[t]) from = t + W - 1;
    out[t] = from;
  }
}

int64_t grain_for(const ConvDims& s) { return std::max<int64_t>(1, 65536 / (s.seqlen * s.width)); }

std::tuple<at::Tensor, at::Tensor> causal_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& initial_state,
                                                     const std::optional<at::Tensor>& reset, bool silu) {
  const ConvDims s = check_causal_conv1d_args(x, weight, bias, initial_state, reset);
  const ConvInputs in = prepare(s, x, weight, bias, initial_state, reset);
  const int64_t L = s.seqlen, W = s.width, E = L + W - 1;
  auto y = at::empty({s.batch, s.dim, L}, x.options().dtype(s.state_dtype));
  auto final_state = at::empty({s.batch, s.dim, W - 1}, x.options().dtype(s.state_dtype));
  AT_DISPATCH_FLOATING_TYPES(s.state_dtype, "causal_conv1d_cpu", [&] {
    using T = scalar_t;
    const RowPointers<T> p(in);
    T* const y_base = y.data_ptr<T>();
    T* const fs_base = final_state.data_ptr<T>();
    at::parallel_for(0, s.batch * s.dim, grain_for(s), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> from(L);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / s.dim, d = row % s.dim;
        const T* xe = p.x_ext + row * E;
        const T* w = p.weight + d * W;
        const T b0 = p.bias ? p.bias[d] : T(0);
        visible_from(p.reset ? p.reset + b * L : nullptr, L, W, from);
        T* out = y_base + row * L;
        for (int64_t t = 0; t < L; ++t) {
          T acc = b0;
          for (int64_t k = std::max<int64_t>(0, from[t] - t); k < W; ++k) acc += w[k] * xe[t + k];
          out[t] = silu ? ops::silu(acc) : acc;
        }
        // The next chunk sees the last W-1 inputs, minus those a reset in this chunk hid.
        T* fs = fs_base + row * (W - 1);
        for (int64_t j = 0; j < W - 1; ++j) fs[j] = (L + j >= from[L - 1]) ? xe[L + j] : T(0);
      }
    });
  });
  return {y.to(x.scalar_type()), final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset, bool silu) {
  const ConvDims s = check_causal_conv1d_args(x, weight, bias, initial_state, reset);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "causal_conv1d_backward: argument 'grad_y' must have the shape of x ",
              x.sizes(), ", got ", grad_y.sizes());
  const ConvInputs in = prepare(s, x, weight, bias, initial_state, reset);
  const int64_t L = s.seqlen, W = s.width, E = L + W - 1;
  const auto opts = x.options().dtype(s.state_dtype);
  const at::Tensor gy = grad_y.to(s.state_dtype).contiguous();
  at::Tensor gfinal;
  if (grad_final_state && grad_final_state->defined()) {
    TORCH_CHECK(grad_final_state->sizes() == at::IntArrayRef({s.batch, s.dim, W - 1}),
                "causal_conv1d_backward: argument 'grad_final_state' must have shape [batch, d_inner, width-1]");
    gfinal = grad_final_state->to(s.state_dtype).contiguous();
  }
  auto dx_ext = at::zeros({s.batch, s.dim, E}, opts);
  auto dw_rows = at::zeros({s.batch, s.dim, W}, opts);
  auto db_rows = at::zeros({s.batch, s.dim}, opts);
  AT_DISPATCH_FLOATING_TYPES(s.state_dtype, "causal_conv1d_backward_cpu", [&] {
    using T = scalar_t;
    const RowPointers<T> p(in);
    const T* const gy_base = gy.data_ptr<T>();
    T* const dxe_base = dx_ext.data_ptr<T>();
    T* const dw_base = dw_rows.data_ptr<T>();
    T* const db_base = db_rows.data_ptr<T>();
    const T* const gfinal_base = gfinal.defined() ? gfinal.data_ptr<T>() : nullptr;
    at::parallel_for(0, s.batch * s.dim, grain_for(s), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> from(L);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / s.dim, d = row % s.dim;
        const T* xe = p.x_ext + row * E;
        const T* w = p.weight + d * W;
        const T b0 = p.bias ? p.bias[d] : T(0);
        const T* g = gy_base + row * L;
        T* dxe = dxe_base + row * E;
        T* dw = dw_base + row * W;
        T db = 0;
        visible_from(p.reset ? p.reset + b * L : nullptr, L, W, from);
        for (int64_t t = 0; t < L; ++t) {
          const int64_t k0 = std::max<int64_t>(0, from[t] - t);
          T gpre = g[t];
          if (silu) {
            T pre = b0;
            for (int64_t k = k0; k < W; ++k) pre += w[k] * xe[t + k];
            gpre *= silu_grad(pre);
          }
          db += gpre;
          for (int64_t k = k0; k < W; ++k) {
            dxe[t + k] += gpre * w[k];
            dw[k] += gpre * xe[t + k];
          }
        }
        if (gfinal.defined()) {
          const T* gf = gfinal_base + row * (W - 1);
          for (int64_t j = 0; j < W - 1; ++j)
            if (L + j >= from[L - 1]) dxe[L + j] += gf[j];
        }
        db_base[row] = db;
      }
    });
  });
  auto dx = dx_ext.narrow(2, W - 1, L).to(x.scalar_type());
  auto dinit = initial_state ? dx_ext.narrow(2, 0, W - 1).contiguous().to(initial_state->scalar_type()) : at::Tensor();
  return {dx, dw_rows.sum(0).to(weight.scalar_type()), bias ? db_rows.sum(0).to(bias->scalar_type()) : at::Tensor(),
          dinit};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) {
  m.impl("causal_conv1d", &causal_conv1d_cpu);
  m.impl("causal_conv1d_backward", &causal_conv1d_backward_cpu);
}

}  // namespace statemamba::ops
