#include "support/reference.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

namespace statemamba::test {
namespace {

// A float64, contiguous copy of a tensor, indexed with plain integers.
struct Grid {
  at::Tensor data;
  const double* p = nullptr;
  int64_t s0 = 0, s1 = 0;

  explicit Grid(const at::Tensor& t) : data(t.to(at::kDouble).contiguous()), p(data.data_ptr<double>()) {
    if (data.dim() >= 2) s0 = data.stride(0);
    if (data.dim() >= 3) s1 = data.stride(1);
  }
  double operator()(int64_t i) const { return p[i]; }
  double operator()(int64_t i, int64_t j) const { return p[i * s0 + j]; }
  double operator()(int64_t i, int64_t j, int64_t k) const { return p[i * s0 + j * s1 + k]; }
};

struct Mask {
  at::Tensor data;
  const bool* p = nullptr;
  int64_t L = 0;

  explicit Mask(const OptTensor& t) {
    if (!t) return;
    data = t->to(at::kBool).contiguous();
    p = data.data_ptr<bool>();
    L = data.size(-1);
  }
  bool operator()(int64_t b, int64_t t) const { return p && p[b * L + t]; }
};

// torch.nn.functional.softplus with its default threshold of 20.
double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
double silu(double x) { return x / (1.0 + std::exp(-x)); }

at::Tensor zeros(std::vector<int64_t> shape) { return at::zeros(shape, at::kDouble); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> reference_selective_scan(
    const at::Tensor& u_, const at::Tensor& delta_, const at::Tensor& A_, const at::Tensor& B_,
    const at::Tensor& C_, const OptTensor& D_, const OptTensor& z_, const OptTensor& delta_bias_,
    bool delta_softplus, const OptTensor& initial_state_, const OptTensor& reset_) {
  const int64_t batch = u_.size(0), dim = u_.size(1), L = u_.size(2), N = A_.size(1);
  const Grid u(u_), delta(delta_), A(A_), B(B_), C(C_);
  const Grid D(D_ ? *D_ : zeros({dim})), bias(delta_bias_ ? *delta_bias_ : zeros({dim}));
  const Grid h0(initial_state_ ? *initial_state_ : zeros({batch, dim, N}));
  const std::optional<Grid> z = z_ ? std::optional<Grid>(Grid(*z_)) : std::nullopt;
  const Mask reset(reset_);

  auto y = zeros({batch, dim, L}), final_state = zeros({batch, dim, N});
  auto y_out = y.accessor<double, 3>();
  auto h_out = final_state.accessor<double, 3>();
  std::vector<double> h(N);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t n = 0; n < N; ++n) h[n] = h0(b, d, n);
      for (int64_t t = 0; t < L; ++t) {
        if (reset(b, t)) std::fill(h.begin(), h.end(), 0.0);
        double dt = delta(b, d, t) + bias(d);
        if (delta_softplus) dt = softplus(dt);
        double out = D(d) * u(b, d, t);
        for (int64_t n = 0; n < N; ++n) {
          h[n] = std::exp(dt * A(d, n)) * h[n] + dt * B(b, n, t) * u(b, d, t);
          out += C(b, n, t) * h[n];
        }
        if (z) out *= silu((*z)(b, d, t));
        y_out[b][d][t] = out;
      }
      for (int64_t n = 0; n < N; ++n) h_out[b][d][n] = h[n];
    }
  }
  return {y, final_state};
}

std::tuple<at::Tensor, at::Tensor> reference_causal_conv1d(const at::Tensor& x_, const at::Tensor& weight_,
                                                           const OptTensor& bias_,
                                                           const OptTensor& initial_state_,
                                                           const OptTensor& reset_, bool silu_out) {
  const int64_t batch = x_.size(0), dim = x_.size(1), L = x_.size(2), W = weight_.size(1);
  const Grid x(x_), weight(weight_), bias(bias_ ? *bias_ : zeros({dim}));
  const Grid state(initial_state_ ? *initial_state_ : zeros({batch, dim, W - 1}));
  const Mask reset(reset_);

  auto y = zeros({batch, dim, L}), final_state = zeros({batch, dim, W - 1});
  auto y_out = y.accessor<double, 3>();
  auto s_out = final_state.accessor<double, 3>();
  // The input at time p (p < 0: column W-1+p of initial_state).
  auto input = [&](int64_t b, int64_t d, int64_t p) { return p < 0 ? state(b, d, W - 1 + p) : x(b, d, p); };
  constexpr int64_t kNoReset = std::numeric_limits<int64_t>::min();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t d = 0; d < dim; ++d) {
      int64_t last_reset = kNoReset;  // inputs before it are hidden
      for (int64_t t = 0; t < L; ++t) {
        if (reset(b, t)) last_reset = t;
        double out = bias(d);
        for (int64_t k = 0; k < W; ++k) {
          const int64_t p = t - (W - 1) + k;
          if (p >= last_reset) out += weight(d, k) * input(b, d, p);
        }
        y_out[b][d][t] = silu_out ? silu(out) : out;
      }
      for (int64_t k = 0; k < W - 1; ++k) {
        const int64_t p = L - (W - 1) + k;
        s_out[b][d][k] = p >= last_reset ? input(b, d, p) : 0.0;
      }
    }
  }
  return {y, final_state};
}

// The decode steps are the sequence ops at L = 1.
std::tuple<at::Tensor, at::Tensor> reference_selective_state_update(
    const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
    const OptTensor& dt_bias, bool dt_softplus, const OptTensor& reset) {
  auto seq = [](const at::Tensor& t) { return t.unsqueeze(-1); };
  auto [y, next] = reference_selective_scan(seq(x), seq(dt), A, seq(B), seq(C), D,
                                            z ? OptTensor(seq(*z)) : std::nullopt, dt_bias, dt_softplus,
                                            state, reset ? OptTensor(seq(*reset)) : std::nullopt);
  return {y.squeeze(-1), next};
}

std::tuple<at::Tensor, at::Tensor> reference_causal_conv1d_update(const at::Tensor& x,
                                                                  const at::Tensor& conv_state,
                                                                  const at::Tensor& weight,
                                                                  const OptTensor& bias, bool silu,
                                                                  const OptTensor& reset) {
  auto [y, next] = reference_causal_conv1d(x.unsqueeze(-1), weight, bias, conv_state,
                                           reset ? OptTensor(reset->unsqueeze(-1)) : std::nullopt, silu);
  return {y.squeeze(-1), next};
}

}  // namespace statemamba::test
