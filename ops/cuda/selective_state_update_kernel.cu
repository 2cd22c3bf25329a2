// CUDA decode step of the selective scan, state advanced in place.
//
// Fast path (float32 state, d_state <= 128): G lanes per (batch, channel) row, 4 states each, as in
// the sequence kernel (ops/cuda/selective_scan_kernel.cu), with the same arithmetic in the same
// order (fast softplus, exp2 of Δ·A·log2 e, per-lane partial sums added lane by lane, then D·u,
// then the gate),
// so stepping token by token reproduces the sequence kernel bit for bit. State rows are read and
// written with 16-byte accesses, coalesced across the row's lanes; the op is bound by that traffic
// (8 bytes per state element) at large batch and by launch latency at batch 1.
// Simple path (float64 state, or d_state > 128): one thread per row, as the simple scan kernel.
#include <torch/library.h>

#include "ops/args.h"
#include "ops/cuda/common.cuh"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kThreads = 128;
constexpr int kStates = 4;
constexpr int kMaxFastN = 128;

template <typename T, typename S>
struct SsuParams {
  S* state;
  const T *x, *dt, *B, *C, *z;
  const S *A, *D, *bias;
  const bool* reset;
  T* y;
  int batch, dim, dstate, G;
  bool softplus, vec;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) ssu_kernel(const SsuParams<T, float> p) {
  const int G = p.G, N = p.dstate;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  const int g = threadIdx.x % G;
  const bool active = row < int64_t(p.batch) * p.dim;
  float part = 0.f, xv = 0.f;
  if (active) {
    const int b = int(row / p.dim), d = int(row % p.dim);
    xv = to<float>(p.x[row]);
    const float raw = to<float>(p.dt[row]) + (p.bias ? p.bias[d] : 0.f);
    const float dt = p.softplus ? softplus_fast(raw) : raw, dtu = dt * xv;
    const bool rst = p.reset && p.reset[b];
    const int n0 = kStates * g;
    if (n0 < N) {
      float* h = p.state + row * N + n0;
      float hv[kStates] = {0.f, 0.f, 0.f, 0.f};
      if (!rst) {
        if (p.vec) {
          const float4 v = *reinterpret_cast<const float4*>(h);
          hv[0] = v.x, hv[1] = v.y, hv[2] = v.z, hv[3] = v.w;
        } else {
#pragma unroll
          for (int i = 0; i < kStates; ++i) hv[i] = n0 + i < N ? h[i] : 0.f;
        }
      }
#pragma unroll
      for (int i = 0; i < kStates; ++i) {
        const int n = n0 + i;
        if (n < N) {
          const float A2 = p.A[int64_t(d) * N + n] * kLog2e;
          hv[i] = fmaf(exp_scaled(dt * A2), hv[i], dtu * to<float>(p.B[int64_t(b) * N + n]));
          part = fmaf(to<float>(p.C[int64_t(b) * N + n]), hv[i], part);
        }
      }
      if (p.vec) {
        *reinterpret_cast<float4*>(h) = make_float4(hv[0], hv[1], hv[2], hv[3]);
      } else {
#pragma unroll
        for (int i = 0; i < kStates; ++i)
          if (n0 + i < N) h[i] = hv[i];
      }
    }
  }
  // Lane sums in lane order, as the sequence kernel's epilogue adds them.
  const int base = (threadIdx.x % 32) / G * G;
  float acc = 0.f;
  for (int gg = 0; gg < G; ++gg) acc += __shfl_sync(0xffffffffu, part, base + gg);
  if (active && g == 0) {
    const int d = int(row % p.dim);
    acc = fmaf(p.D ? p.D[d] : 0.f, xv, acc);
    if (p.z) acc *= silu(to<float>(p.z[row]));
    p.y[row] = T(acc);
  }
}

template <typename S>
__global__ void ssu_simple_kernel(const SsuParams<S, S> p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= int64_t(p.batch) * p.dim) return;
  const int b = int(row / p.dim), d = int(row % p.dim), N = p.dstate;
  S* h = p.state + row * N;
  const S u = p.x[row], raw = p.dt[row] + (p.bias ? p.bias[d] : S(0));
  const S dt = p.softplus ? softplus(raw) : raw, dtu = dt * u;
  const bool rst = p.reset && p.reset[b];
  S acc = (p.D ? p.D[d] : S(0)) * u;
  for (int n = 0; n < N; ++n) {
    h[n] = exp(dt * p.A[int64_t(d) * N + n]) * (rst ? S(0) : h[n]) + dtu * p.B[int64_t(b) * N + n];
    acc += p.C[int64_t(b) * N + n] * h[n];
  }
  if (p.z) acc *= silu(p.z[row]);
  p.y[row] = acc;
}

at::Tensor selective_state_update_cuda(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                       const std::optional<at::Tensor>& reset) {
  const ScanDims s = check_selective_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, reset);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = s.state_dtype;
  at::Tensor h = state.is_contiguous() ? state : state.contiguous();
  const at::Tensor rst = contig_or_undef(reset);
  const int64_t rows = s.batch * s.dim;
  const auto stream = current_stream();
  at::Tensor y;
  if (acc == at::kFloat && s.dstate <= kMaxFastN) {
    const at::Tensor xc = x.contiguous(), dtc = dt.contiguous(), Bc = B.contiguous(), Cc = C.contiguous();
    const at::Tensor zc = contig_or_undef(z), Af = A.to(at::kFloat).contiguous();
    const at::Tensor Df = as_dtype(D, at::kFloat), bf = as_dtype(dt_bias, at::kFloat);
    y = at::empty({s.batch, s.dim}, x.options());
    SM_DISPATCH_FAST(x.scalar_type(), "selective_state_update_cuda", [&] {
      using T = scalar_t;
      SsuParams<T, float> p{};
      p.state = h.data_ptr<float>(), p.x = xc.data_ptr<T>(), p.dt = dtc.data_ptr<T>();
      p.B = Bc.data_ptr<T>(), p.C = Cc.data_ptr<T>(), p.z = ptr<T>(zc);
      p.A = Af.data_ptr<float>(), p.D = ptr<float>(Df), p.bias = ptr<float>(bf), p.reset = ptr<bool>(rst);
      p.y = y.data_ptr<T>();
      p.batch = int(s.batch), p.dim = int(s.dim), p.dstate = int(s.dstate), p.softplus = dt_softplus;
      p.G = std::max(4, pow2_ceil(ceil_div(s.dstate, kStates)));  // as the sequence kernel
      p.vec = s.dstate % kStates == 0 && aligned16(p.state);
      ssu_kernel<T><<<ceil_div(rows, kThreads / p.G), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    const at::Tensor xc = x.to(acc).contiguous(), dtc = dt.to(acc).contiguous();
    const at::Tensor Bc = B.to(acc).contiguous(), Cc = C.to(acc).contiguous(), Ac = A.to(acc).contiguous();
    const at::Tensor zc = as_dtype(z, acc), Dc = as_dtype(D, acc), bc = as_dtype(dt_bias, acc);
    at::Tensor ys = at::empty({s.batch, s.dim}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "selective_state_update_cuda_simple", [&] {
      using S = scalar_t;
      SsuParams<S, S> p{};
      p.state = h.data_ptr<S>(), p.x = xc.data_ptr<S>(), p.dt = dtc.data_ptr<S>();
      p.B = Bc.data_ptr<S>(), p.C = Cc.data_ptr<S>(), p.z = ptr<S>(zc);
      p.A = Ac.data_ptr<S>(), p.D = ptr<S>(Dc), p.bias = ptr<S>(bc), p.reset = ptr<bool>(rst);
      p.y = ys.data_ptr<S>();
      p.batch = int(s.batch), p.dim = int(s.dim), p.dstate = int(s.dstate), p.softplus = dt_softplus;
      ssu_simple_kernel<S><<<ceil_div(rows, kThreads), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    y = ys.to(x.scalar_type());
  }
  if (!h.is_same(state)) const_cast<at::Tensor&>(state).copy_(h);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("selective_state_update", &selective_state_update_cuda); }

}  // namespace statemamba::ops
