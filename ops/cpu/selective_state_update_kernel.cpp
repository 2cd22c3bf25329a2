// CPU decode step of the selective scan. Same arithmetic, in the same order, as one step of
// ops/cpu/selective_scan_kernel.cpp, so stepping token by token reproduces the full scan exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/args.h"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

at::Tensor selective_state_update_cpu(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                      const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                      const std::optional<at::Tensor>& reset) {
  const ScanDims s = check_selective_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, reset);
  const auto acc = s.state_dtype;
  auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor x_ = as_acc(x), dt_ = as_acc(dt), A_ = as_acc(A), B_ = as_acc(B), C_ = as_acc(C);
  const at::Tensor D_ = D ? as_acc(*D) : at::Tensor(), z_ = z ? as_acc(*z) : at::Tensor();
  const at::Tensor bias_ = dt_bias ? as_acc(*dt_bias) : at::Tensor();
  const at::Tensor reset_ = reset ? reset->contiguous() : at::Tensor();
  // Work on a contiguous state and copy back if the caller's is strided.
  at::Tensor h_all = state.is_contiguous() ? state : state.contiguous();
  auto y = at::empty({s.batch, s.dim}, x.options().dtype(acc));
  const int64_t N = s.dstate;
  AT_DISPATCH_FLOATING_TYPES(acc, "selective_state_update_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, s.batch * s.dim, std::max<int64_t>(1, 4096 / N), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / s.dim, d = row % s.dim;
        T* h = h_all.data_ptr<T>() + row * N;
        const T* Av = A_.data_ptr<T>() + d * N;
        const T* Bv = B_.data_ptr<T>() + b * N;
        const T* Cv = C_.data_ptr<T>() + b * N;
        const T u = x_.data_ptr<T>()[row];
        const T raw = dt_.data_ptr<T>()[row] + (bias_.defined() ? bias_.data_ptr<T>()[d] : T(0));
        const T dt_t = dt_softplus ? softplus(raw) : raw, dtu = dt_t * u;
        if (reset_.defined() && reset_.data_ptr<bool>()[b]) std::fill(h, h + N, T(0));
        for (int64_t n = 0; n < N; ++n) h[n] = std::exp(dt_t * Av[n]) * h[n] + dtu * Bv[n];
        T out = (D_.defined() ? D_.data_ptr<T>()[d] : T(0)) * u;
        for (int64_t n = 0; n < N; ++n) out += Cv[n] * h[n];
        if (z_.defined()) out *= silu(z_.data_ptr<T>()[row]);
        y.data_ptr<T>()[row] = out;
      }
    });
  });
  if (!h_all.is_same(state)) const_cast<at::Tensor&>(state).copy_(h_all);
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) { m.impl("selective_state_update", &selective_state_update_cpu); }

}  // namespace statemamba::ops
