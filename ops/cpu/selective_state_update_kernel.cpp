// CPU decode step of the selective scan. The step and output are ssm_row.h's, as in
// ops/cpu/selective_scan_kernel.cpp, so stepping token by token reproduces the full scan exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/args.h"
#include "ops/cpu/ssm_row.h"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

struct DecodeTensors {
  at::Tensor h, x, dt, A, B, C, D, z, bias, reset, y;  // in the state dtype, contiguous
};

// Rows [begin, end) of one decode step.
template <typename T>
SM_ALWAYS_INLINE void update_rows(const DecodeTensors& io, const ScanDims& s, bool dt_softplus, int64_t begin,
                                  int64_t end) {
  // Base pointers once: data_ptr() checks dtype and storage on every call, which would cost more
  // than a row's update.
  const int64_t N = s.dstate;
  T* const h_base = io.h.data_ptr<T>();
  const T *x = io.x.data_ptr<T>(), *dt = io.dt.data_ptr<T>(), *A = io.A.data_ptr<T>();
  const T *B = io.B.data_ptr<T>(), *C = io.C.data_ptr<T>();
  const T* D = io.D.defined() ? io.D.data_ptr<T>() : nullptr;
  const T* z = io.z.defined() ? io.z.data_ptr<T>() : nullptr;
  const T* bias = io.bias.defined() ? io.bias.data_ptr<T>() : nullptr;
  const bool* resets = io.reset.defined() ? io.reset.data_ptr<bool>() : nullptr;
  T* const y = io.y.data_ptr<T>();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / s.dim, d = row % s.dim;
    T* h = h_base + row * N;
    const T u = x[row];
    const T raw = dt[row] + (bias ? bias[d] : T(0));
    const T dt_t = dt_softplus ? softplus(raw) : raw;
    cpu::ssm_step(h, A + d * N, B + b * N, dt_t, u, resets && resets[b], N);
    T out = cpu::ssm_output(C + b * N, h, D ? D[d] : T(0), u, N);
    if (z) out *= silu(z[row]);
    y[row] = out;
  }
}
SM_CPU_CLONES void update_rows_f32(const DecodeTensors& io, const ScanDims& s, bool dt_softplus, int64_t begin,
                                   int64_t end) {
  update_rows<float>(io, s, dt_softplus, begin, end);
}
void update_rows_f64(const DecodeTensors& io, const ScanDims& s, bool dt_softplus, int64_t begin, int64_t end) {
  update_rows<double>(io, s, dt_softplus, begin, end);
}

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
  const DecodeTensors io{h_all, x_, dt_, A_, B_, C_, D_, z_, bias_, reset_, y};
  at::parallel_for(0, s.batch * s.dim, std::max<int64_t>(1, 4096 / s.dstate), [&](int64_t begin, int64_t end) {
    if (acc == at::kDouble) update_rows_f64(io, s, dt_softplus, begin, end);
    else update_rows_f32(io, s, dt_softplus, begin, end);
  });
  if (!h_all.is_same(state)) const_cast<at::Tensor&>(state).copy_(h_all);
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) { m.impl("selective_state_update", &selective_state_update_cpu); }

}  // namespace statemamba::ops
