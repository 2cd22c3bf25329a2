// CUDA kernels of mamba_mixer_step: a Mamba mixer's decode step in two launches instead of the
// separate ops' dozen (conv update, dtype casts, two GEMMs, the slices' copies, the state update).
//
// x_proj needs every channel's conv output before any channel can take its state step, a
// dependency across blocks, hence two kernels:
//   1. conv_xproj: a block per (row, 128 channels): conv update + SiLU (conv_state shifted in
//      place, xc kept in a scratch buffer) and this tile's share of x_proj, xc · x_projᵀ, as one
//      float partial sum per output;
//   2. ssm: a block per (row, 256/G channels): x_dbl = the tiles' partials added in tile order and
//      rounded to the model dtype (as x_proj's Linear output is); Δ = dt_proj row · δ, rounded
//      likewise; then the state update, D skip and SiLU(z) gate of selective_state_update.
// The conv and the state update repeat causal_conv1d_update's and selective_state_update's
// arithmetic in the same order; only the two projections add in another order than cuBLAS, so the
// result equals the separate ops to float rounding (one rounding of δ, B, C, Δ to the model dtype
// may land on the neighbouring value). Float64 inputs, conv width > 8 or d_state > 128 take the
// separate ops.
#include <torch/library.h>

#include "ops/cuda/common.cuh"
#include "ops/mamba_mixer_step.h"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kThreads = 256;
constexpr int kConvTile = 128;  // channels per conv/x_proj block
constexpr int kMaxW = 8;
constexpr int kStates = 4;  // states per lane in the state update
constexpr int kMaxFastN = 128;

// T: xz and the projections (float, half, bfloat16); P: the other parameters (float or T).
template <typename T, typename P>
struct MixerParams {
  const T* xz;       // [B, 2D]: x then z
  float* conv_state;  // [B, D, W-1]
  float* ssm_state;   // [B, D, N]
  const P *conv_w, *conv_b, *dt_bias, *A_log, *Dskip;  // [D, W], [D] or null, [D], [D, N], [D]
  const T *x_proj_w, *dt_proj_w;                     // [R + 2N, D], [D, R]
  const bool* reset;                                 // [B] or null
  T* xc;                                             // scratch [B, D]: the conv output
  float* partial;                                    // scratch [B, conv_tiles, R + 2N]
  T* y;                                              // [B, D]
  int batch, dim, width, dstate, rank, conv_tiles, G;
  bool vec;  // ssm_state rows 16-byte aligned and N % 4 == 0
};

template <typename T, typename P>
__global__ void __launch_bounds__(kThreads) conv_xproj_kernel(const MixerParams<T, P> p) {
  __shared__ float xs[kConvTile];
  const int tile = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int d0 = tile * kConvTile, nd = min(kConvTile, p.dim - d0);
  if (tid < kConvTile) {
    float out = 0.f;
    if (tid < nd) {
      // causal_conv1d_update's arithmetic: taps newest first, in float.
      const int d = d0 + tid, Wm1 = p.width - 1;
      const int64_t row = int64_t(b) * p.dim + d;
      float* st = p.conv_state + row * Wm1;
      const P* wr = p.conv_w + int64_t(d) * p.width;
      const bool rst = p.reset && p.reset[b];
      float old[kMaxW];
#pragma unroll
      for (int k = 0; k < kMaxW; ++k) old[k] = k < Wm1 && !rst ? st[k] : 0.f;
      const float xv = to<float>(p.xz[int64_t(b) * 2 * p.dim + d]);
      float acc = p.conv_b ? to<float>(p.conv_b[d]) : 0.f;
      acc = fmaf(to<float>(wr[p.width - 1]), xv, acc);
#pragma unroll
      for (int k = kMaxW - 2; k >= 0; --k)
        if (k < Wm1) acc = fmaf(to<float>(wr[k]), old[k], acc);
      const T xc = T(silu(acc));
      p.xc[row] = xc;
      out = to<float>(xc);
#pragma unroll
      for (int j = 0; j < kMaxW - 1; ++j)
        if (j < Wm1) st[j] = j == Wm1 - 1 ? xv : old[j + 1];
    }
    xs[tid] = out;
  }
  __syncthreads();
  // This tile's share of every x_proj output: a warp per output, lanes across the channels.
  const int warp = tid / 32, lane = tid % 32, J = p.rank + 2 * p.dstate;
  for (int j = warp; j < J; j += kThreads / 32) {
    const T* w = p.x_proj_w + int64_t(j) * p.dim + d0;
    float s = 0.f;
    for (int k = lane; k < nd; k += 32) s = fmaf(to<float>(w[k]), xs[k], s);
    s = warp_sum(s);
    if (lane == 0) p.partial[(int64_t(b) * p.conv_tiles + tile) * J + j] = s;
  }
}

// A = -exp(A_log) as the separate path computes it (at::exp in float): through double, since this
// file is built with fast math and expf would be the approximate intrinsic.
__device__ __forceinline__ float a_from_log(float a_log) { return -float(exp(double(a_log))); }

template <typename T, typename P>
__global__ void __launch_bounds__(kThreads) ssm_kernel(const MixerParams<T, P> p) {
  extern __shared__ float x_dbl[];  // [R + 2N]: δ, B, C
  const int b = blockIdx.y, tid = threadIdx.x, J = p.rank + 2 * p.dstate;
  for (int j = tid; j < J; j += kThreads) {
    float s = 0.f;
    for (int t = 0; t < p.conv_tiles; ++t) s += p.partial[(int64_t(b) * p.conv_tiles + t) * J + j];
    x_dbl[j] = to<float>(T(s));  // rounded as x_proj's output in the model dtype
  }
  __syncthreads();
  const float *delta_low = x_dbl, *Bv = x_dbl + p.rank, *Cv = x_dbl + p.rank + p.dstate;
  const int G = p.G, N = p.dstate, R = p.rank;
  const int d = blockIdx.x * (kThreads / G) + tid / G, g = tid % G;
  const bool active = d < p.dim;
  // Δ before its bias: the channel's dt_proj row · δ, the row's G lanes splitting the rank.
  float dt_lin = 0.f;
  if (active) {
    const T* w = p.dt_proj_w + int64_t(d) * R;
    for (int r = g; r < R; r += G) dt_lin = fmaf(to<float>(w[r]), delta_low[r], dt_lin);
  }
  for (int o = G / 2; o > 0; o >>= 1) dt_lin += __shfl_xor_sync(0xffffffffu, dt_lin, o);
  // selective_state_update's arithmetic from here (see selective_state_update_kernel.cu).
  float part = 0.f, xv = 0.f;
  int64_t row = 0;
  if (active) {
    row = int64_t(b) * p.dim + d;
    xv = to<float>(p.xc[row]);
    const float raw = to<float>(T(dt_lin)) + to<float>(p.dt_bias[d]);  // Δ rounded as dt_proj's output
    const float dt = softplus_fast(raw), dtu = dt * xv;
    const bool rst = p.reset && p.reset[b];
    const int n0 = kStates * g;
    if (n0 < N) {
      float* h = p.ssm_state + row * N + n0;
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
          const float A2 = a_from_log(to<float>(p.A_log[int64_t(d) * N + n])) * kLog2e;
          hv[i] = fmaf(exp_scaled(dt * A2), hv[i], dtu * Bv[n]);
          part = fmaf(Cv[n], hv[i], part);
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
  // Lane sums in lane order, as selective_state_update adds them.
  const int base = (tid % 32) / G * G;
  float acc = 0.f;
  for (int gg = 0; gg < G; ++gg) acc += __shfl_sync(0xffffffffu, part, base + gg);
  if (active && g == 0) {
    acc = fmaf(to<float>(p.Dskip[d]), xv, acc);
    acc *= silu(to<float>(p.xz[int64_t(b) * 2 * p.dim + p.dim + d]));
    p.y[row] = T(acc);
  }
}

template <typename T, typename P>
void launch(const MixerStepDims& s, const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
            const at::Tensor& conv_w, const at::Tensor& conv_b, const at::Tensor& x_proj_w,
            const at::Tensor& dt_proj_w, const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Dskip,
            const at::Tensor& reset, const at::Tensor& xc, const at::Tensor& partial, const at::Tensor& y) {
  MixerParams<T, P> p{};
  p.xz = xz.data_ptr<T>(), p.conv_state = conv_state.data_ptr<float>(), p.ssm_state = ssm_state.data_ptr<float>();
  p.conv_w = conv_w.data_ptr<P>(), p.conv_b = ptr<P>(conv_b), p.dt_bias = dt_bias.data_ptr<P>();
  p.A_log = A_log.data_ptr<P>(), p.Dskip = Dskip.data_ptr<P>();
  p.x_proj_w = x_proj_w.data_ptr<T>(), p.dt_proj_w = dt_proj_w.data_ptr<T>(), p.reset = ptr<bool>(reset);
  p.xc = xc.data_ptr<T>(), p.partial = partial.data_ptr<float>(), p.y = y.data_ptr<T>();
  p.batch = int(s.batch), p.dim = int(s.dim), p.width = int(s.width), p.dstate = int(s.dstate);
  p.rank = int(s.rank), p.conv_tiles = ceil_div(s.dim, kConvTile);
  p.G = std::max(4, pow2_ceil(ceil_div(s.dstate, kStates)));  // as selective_state_update
  p.vec = s.dstate % kStates == 0 && aligned16(p.ssm_state);
  const auto stream = current_stream();
  conv_xproj_kernel<T, P><<<dim3(p.conv_tiles, unsigned(s.batch)), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t smem = sizeof(float) * size_t(s.rank + 2 * s.dstate);
  ssm_kernel<T, P><<<dim3(ceil_div(s.dim, kThreads / p.G), unsigned(s.batch)), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mamba_mixer_step_cuda(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                                 const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                                 const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                 const at::Tensor& dt_proj_bias, const at::Tensor& A_log, const at::Tensor& D,
                                 const std::optional<at::Tensor>& reset) {
  const MixerStepDims s = check_mamba_mixer_step_args(xz, conv_state, ssm_state, conv_weight, conv_bias,
                                                      x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, reset);
  const auto t = xz.scalar_type();
  // The small parameters are read in one dtype: float32, or xz's when all of them have it.
  at::ScalarType param = conv_weight.scalar_type();
  for (const at::Tensor* q : {&dt_proj_bias, &A_log, &D})
    if (q->scalar_type() != param) param = at::kFloat;
  if (conv_bias && conv_bias->scalar_type() != param) param = at::kFloat;
  // Shared memory for x_dbl: (R + 2N) floats, kept within the default 48 KB.
  const bool fast = t != at::kDouble && s.width <= kMaxW && s.dstate <= kMaxFastN &&
                    (s.rank + 2 * s.dstate) * 4 <= 48 * 1024 && s.batch <= 65535 && s.batch * s.dim < (int64_t(1) << 31);
  if (!fast || s.batch == 0 || s.dim == 0) {
    return mamba_mixer_step_unfused(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                    dt_proj_bias, A_log, D, reset);
  }
  c10::cuda::CUDAGuard guard(xz.device());
  // Strided states are worked on as contiguous copies and written back, as the other decode ops do.
  at::Tensor cs = conv_state.is_contiguous() ? conv_state : conv_state.contiguous();
  at::Tensor ss = ssm_state.is_contiguous() ? ssm_state : ssm_state.contiguous();
  auto as_param = [&](const at::Tensor& q) { return q.to(param).contiguous(); };  // no-ops when they fit
  const at::Tensor cw = as_param(conv_weight), cb = conv_bias ? as_param(*conv_bias) : at::Tensor();
  const at::Tensor db = as_param(dt_proj_bias), al = as_param(A_log), dk = as_param(D);
  const at::Tensor xzc = xz.contiguous(), xw = x_proj_weight.contiguous(), dw = dt_proj_weight.contiguous();
  const at::Tensor rst = contig_or_undef(reset);
  const at::Tensor xc = at::empty({s.batch, s.dim}, xz.options());
  const at::Tensor partial =
      at::empty({s.batch, ceil_div(s.dim, kConvTile), s.rank + 2 * s.dstate}, xz.options().dtype(at::kFloat));
  at::Tensor y = at::empty({s.batch, s.dim}, xz.options());
  SM_DISPATCH_FAST(t, "mamba_mixer_step_cuda", [&] {
    using T = scalar_t;
    if (param == at::kFloat)
      launch<T, float>(s, xzc, cs, ss, cw, cb, xw, dw, db, al, dk, rst, xc, partial, y);
    else
      launch<T, T>(s, xzc, cs, ss, cw, cb, xw, dw, db, al, dk, rst, xc, partial, y);
  });
  if (!cs.is_same(conv_state)) const_cast<at::Tensor&>(conv_state).copy_(cs);
  if (!ss.is_same(ssm_state)) const_cast<at::Tensor&>(ssm_state).copy_(ss);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("mamba_mixer_step", &mamba_mixer_step_cuda); }

}  // namespace statemamba::ops
