// CUDA kernels of mamba_mixer_step: a Mamba mixer's decode step in two launches instead of the
// separate ops' dozen (conv update, dtype casts, two GEMMs, the slices' copies, the state update).
//
// x_proj needs every channel's conv output before any channel can take its state step, a
// dependency across blocks, hence two kernels:
//   1. conv_xproj: a block per (rows, tile of channels): conv update + SiLU (conv_state shifted in
//      place, xc kept in a scratch buffer) and this tile's share of x_proj, xc · x_projᵀ, as one
//      float partial sum per output;
//   2. ssm: a block per (rows, 256/G channels): x_dbl = the tiles' partials added in tile order and
//      rounded to the model dtype (as x_proj's Linear output is); Δ = dt_proj row · δ, rounded
//      likewise; then the state update, D skip and SiLU(z) gate of selective_state_update.
// Two regimes, measured on an H100 (mamba-130m shapes, BENCHMARKS.md). At batch <= 4 the kernels
// are bound by the latency of their dependent loads: a block per row and 64-channel tiles (more
// blocks), and every thread issues all its loads before waiting on any. Larger batches take
// 128-channel tiles; from batch 32 a conv block takes 4 rows (its x_proj weights serve all 4),
// and the state update loads its lane's inputs after x_dbl's reduction, not before.
// The conv and the state update repeat causal_conv1d_update's and selective_state_update's
// arithmetic in the same order; only the two projections add in another order than cuBLAS, so the
// result equals the separate ops to float rounding (one rounding of δ, B, C, Δ to the model dtype
// may land on the neighbouring value). Float64 inputs, conv width > 8 or d_state > 128 take the
// separate ops.
#include <torch/library.h>

#include <type_traits>

#include "ops/cuda/common.cuh"
#include "ops/mamba_mixer_step.h"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kThreads = 256;
constexpr int kMaxLatencyBatch = 4;  // batches up to this: a row per block and narrow conv tiles
constexpr int kNarrowTile = 64;      // channels per conv/x_proj block, small batches: 24 blocks per row at D 1536
constexpr int kWideTile = 128;       // larger batches
constexpr int kRowsPerBlock = 4;     // large batches: rows per conv block, sharing x_proj's weight loads
constexpr int kMinBatchForRowBlocks = 32;
// Channels per conv/x_proj block for a batch: the launch and the partial sums' buffer agree on it.
inline int conv_tile_for(int64_t batch) { return batch <= kMaxLatencyBatch ? kNarrowTile : kWideTile; }
constexpr int kChunk = 8;            // channels per x_proj task: one 16-byte load of bfloat16 weights
constexpr int kTasks = 8;            // x_proj tasks per thread in flight (J = R + 2N <= 256 in one round)
constexpr int kMaxW = 8;
constexpr int kStates = 4;     // states per lane in the state update
constexpr int kMaxFastN = 128;
constexpr int kRankRegs = 16;  // dt_proj weights per lane held in registers

// T: xz and the projections (float, half, bfloat16); P: the other parameters (float or T).
template <typename T, typename P>
struct MixerParams {
  const T* xz;       // [B, 2D]: x then z
  float* conv_state;  // [B, D, W-1]
  float* ssm_state;   // [B, D, N]
  const P *conv_w, *conv_b, *dt_bias, *A, *Dskip;  // [D, W], [D] or null, [D], [D, N], [D]
  const T *x_proj_w, *dt_proj_w;                     // [R + 2N, D], [D, R]
  const bool* reset;                                 // [B] or null
  T* xc;                                             // scratch [B, D]: the conv output
  float* partial;                                    // scratch [B, conv_tiles, R + 2N]
  T* y;                                              // [B, D]
  int batch, dim, width, dstate, rank, conv_tiles, G;
  bool vec;    // ssm_state rows 16-byte aligned and N % 4 == 0
  bool w_vec;  // x_proj rows 16-byte aligned (D·sizeof(T) % 16 == 0 and an aligned base)
  bool a_vec;  // A float32 with 16-byte aligned rows of N % 4 == 0
};

// Channel d of row b: causal_conv1d_update's arithmetic (taps newest first, in float), conv_state
// shifted in place, SiLU; xc stored in the model dtype and returned as that value in float. The
// state is read whatever the reset flag says (and zeroed after), so neither load waits on the other.
template <typename T, typename P>
__device__ __forceinline__ float conv_channel(const MixerParams<T, P>& p, int b, int d) {
  const int Wm1 = p.width - 1;
  const int64_t row = int64_t(b) * p.dim + d;
  float* st = p.conv_state + row * Wm1;
  const P* wr = p.conv_w + int64_t(d) * p.width;
  float old[kMaxW];
#pragma unroll
  for (int k = 0; k < kMaxW; ++k) old[k] = k < Wm1 ? st[k] : 0.f;
  const float xv = to<float>(p.xz[int64_t(b) * 2 * p.dim + d]);
  if (p.reset && p.reset[b]) {
#pragma unroll
    for (int k = 0; k < kMaxW; ++k) old[k] = 0.f;
  }
  float acc = p.conv_b ? to<float>(p.conv_b[d]) : 0.f;
  acc = fmaf(to<float>(wr[p.width - 1]), xv, acc);
#pragma unroll
  for (int k = kMaxW - 2; k >= 0; --k)
    if (k < Wm1) acc = fmaf(to<float>(wr[k]), old[k], acc);
  const T xc = T(silu(acc));
  p.xc[row] = xc;
#pragma unroll
  for (int j = 0; j < kMaxW - 1; ++j)
    if (j < Wm1) st[j] = j == Wm1 - 1 ? xv : old[j + 1];
  return to<float>(xc);
}

// A block per (tile of kTile channels, kRows rows): the conv of its channels and rows, then this
// tile's share of x_proj for each row. x_proj runs as tasks e = j·C + c (output j, channels
// [8c, 8c + 8), C = kTile / 8) whose weights are fetched before the conv, one 16-byte load each,
// and serve all kRows rows; a task's 8 products in channel order, then an output's C tasks
// (neighbouring lanes) added as a fixed tree.
template <typename T, typename P, int kTile, int kRows>
__global__ void __launch_bounds__(kThreads) conv_xproj_kernel(const MixerParams<T, P> p) {
  constexpr int kChunks = kTile / kChunk;
  static_assert(kChunks <= 32 && 32 % kChunks == 0, "an output's tasks must lie in one warp");
  __shared__ __align__(16) float xs[kRows][kTile];
  const int tile = blockIdx.x, b0 = blockIdx.y * kRows, tid = threadIdx.x;
  const int d0 = tile * kTile, nd = min(kTile, p.dim - d0);
  const int J = p.rank + 2 * p.dstate;
  // Launched overlapped: the tile's weights and conv states travel to L2 while in_proj still runs.
  if (nd > 0) {
    for (int j = tid; j < J; j += kThreads) prefetch_l2_range(p.x_proj_w + int64_t(j) * p.dim + d0, nd * int64_t(sizeof(T)), 0, 1);
    prefetch_l2_range(p.conv_w + int64_t(d0) * p.width, int64_t(nd) * p.width * sizeof(P), tid, kThreads);
    const int rows = min(kRows, p.batch - b0), Wm1 = p.width - 1;
    for (int r = 0; r < rows; ++r)
      prefetch_l2_range(p.conv_state + (int64_t(b0 + r) * p.dim + d0) * Wm1, int64_t(nd) * Wm1 * 4, tid, kThreads);
  }
  wait_for_previous_kernel();
  allow_next_kernel();
  T w[kTasks][kChunk];
  auto fetch = [&](int round) {
#pragma unroll
    for (int k = 0; k < kTasks; ++k) {
      const int e = (round * kTasks + k) * kThreads + tid, j = e / kChunks, c0 = (e % kChunks) * kChunk;
      const T* src = p.x_proj_w + int64_t(j) * p.dim + d0 + c0;
      if (j < J && p.w_vec && c0 + kChunk <= nd) {
        load8(src, w[k]);
      } else {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) w[k][i] = j < J && c0 + i < nd ? src[i] : T(0);
      }
    }
  };
  fetch(0);
  for (int e = tid; e < kRows * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    xs[r][c] = c < nd && b0 + r < p.batch ? conv_channel(p, b0 + r, d0 + c) : 0.f;
  }
  __syncthreads();
  const int rounds = (J * kChunks + kTasks * kThreads - 1) / (kTasks * kThreads);
  for (int round = 0; round < rounds; ++round) {
    if (round > 0) fetch(round);
#pragma unroll
    for (int k = 0; k < kTasks; ++k) {
      const int e = (round * kTasks + k) * kThreads + tid, j = e / kChunks, c0 = (e % kChunks) * kChunk;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        // The task's 8 inputs as two 16-byte shared loads (lanes 8 floats apart: no bank conflicts).
        const float4 lo = *reinterpret_cast<const float4*>(&xs[r][c0]), hi = *reinterpret_cast<const float4*>(&xs[r][c0 + 4]);
        const float x8[kChunk] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) s = fmaf(to<float>(w[k][i]), x8[i], s);
#pragma unroll
        for (int o = kChunks / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (c0 == 0 && j < J && b0 + r < p.batch) p.partial[(int64_t(b0 + r) * p.conv_tiles + tile) * J + j] = s;
      }
    }
  }
}

// What one lane of the state update reads besides x_proj's output.
template <typename T>
struct LaneInputs {
  T dtw[kRankRegs];  // dt_proj row entries g, g + G, ... (neighbouring lanes read neighbouring entries)
  float h[kStates], A2[kStates];  // the row's states; A·log2(e)
  float x, z, dt_bias, d_skip;
};

template <typename T, typename P>
__device__ __forceinline__ void load_row_inputs(LaneInputs<T>& in, const MixerParams<T, P>& p, int b, int d,
                                                bool active) {
  const int64_t row = int64_t(b) * p.dim + d;
  in.x = active ? to<float>(p.xc[row]) : 0.f;
  in.z = active ? to<float>(p.xz[int64_t(b) * 2 * p.dim + p.dim + d]) : 0.f;
  in.dt_bias = active ? to<float>(p.dt_bias[d]) : 0.f;
  in.d_skip = active ? to<float>(p.Dskip[d]) : 0.f;
}

// The state is read whatever the reset flag says (zeroed when used), so no load waits on another.
template <typename T, typename P>
__device__ __forceinline__ void load_lane(LaneInputs<T>& in, const MixerParams<T, P>& p, int b, int d, int g,
                                          bool active, bool owns_states) {
  const int N = p.dstate, R = p.rank, G = p.G, n0 = kStates * g;
  const int64_t row = int64_t(b) * p.dim + d;
  const T* w = p.dt_proj_w + int64_t(d) * R + g;
#pragma unroll
  for (int i = 0; i < kRankRegs; ++i) in.dtw[i] = active && g + i * G < R ? w[i * G] : T(0);
#pragma unroll
  for (int i = 0; i < kStates; ++i) in.h[i] = 0.f, in.A2[i] = 0.f;
  if (owns_states) {
    const float* h = p.ssm_state + row * N + n0;
    if (p.vec) {
      const float4 v = *reinterpret_cast<const float4*>(h);
      in.h[0] = v.x, in.h[1] = v.y, in.h[2] = v.z, in.h[3] = v.w;
    } else {
#pragma unroll
      for (int i = 0; i < kStates; ++i) in.h[i] = n0 + i < N ? h[i] : 0.f;
    }
    const P* a = p.A + int64_t(d) * N + n0;
    if constexpr (std::is_same_v<P, float>) {
      if (p.a_vec) {
        const float4 v = *reinterpret_cast<const float4*>(a);
        in.A2[0] = v.x * kLog2e, in.A2[1] = v.y * kLog2e, in.A2[2] = v.z * kLog2e, in.A2[3] = v.w * kLog2e;
        return load_row_inputs(in, p, b, d, active);
      }
    }
#pragma unroll
    for (int i = 0; i < kStates; ++i) in.A2[i] = n0 + i < N ? to<float>(a[i]) * kLog2e : 0.f;
  }
  load_row_inputs(in, p, b, d, active);
}

// A block per (row, 256/G channels). kEarly: the lane's loads go out before x_dbl's reduction
// (latency-bound small batches) rather than after it (fewer live registers during the
// reduction, measured faster from batch 32 on).
template <typename T, typename P, bool kEarly>
__global__ void __launch_bounds__(kThreads) ssm_kernel(const MixerParams<T, P> p) {
  extern __shared__ float x_dbl[];  // [R + 2N]: δ, B, C
  const int b = blockIdx.y, tid = threadIdx.x, J = p.rank + 2 * p.dstate;
  const int G = p.G, N = p.dstate, R = p.rank;
  const int d_raw = blockIdx.x * (kThreads / G) + tid / G, g = tid % G, n0 = kStates * g;
  const bool active = d_raw < p.dim, owns_states = active && n0 < N;
  const int d = active ? d_raw : 0;
  const int64_t row = int64_t(b) * p.dim + d;
  // Launched overlapped: the block's dt_proj rows, A rows and states travel to L2 while the conv
  // kernel still runs.
  {
    const int d_first = blockIdx.x * (kThreads / G), count = min(kThreads / G, p.dim - d_first);
    prefetch_l2_range(p.dt_proj_w + int64_t(d_first) * R, int64_t(count) * R * sizeof(T), tid, kThreads);
    prefetch_l2_range(p.A + int64_t(d_first) * N, int64_t(count) * N * sizeof(P), tid, kThreads);
    prefetch_l2_range(p.ssm_state + (int64_t(b) * p.dim + d_first) * N, int64_t(count) * N * 4, tid, kThreads);
  }
  wait_for_previous_kernel();
  allow_next_kernel();
  LaneInputs<T> in;
  if (kEarly) load_lane(in, p, b, d, g, active, owns_states);
  // x_dbl = the tiles' partials added in tile order, rounded to the model dtype (as x_proj's
  // Linear output is); the tiles' loads go out together.
  // One group covers every tile in the latency-bound case (24 tiles at D 1536); at larger batches
  // (12 tiles) a smaller group issues fewer predicated-off loads, where instruction issue is the bound.
  constexpr int kGroup = kEarly ? 32 : 16;
  for (int j = tid; j < J; j += kThreads) {
    const float* src = p.partial + int64_t(b) * p.conv_tiles * J + j;
    float s = 0.f;
    for (int t0 = 0; t0 < p.conv_tiles; t0 += kGroup, src += kGroup * J) {
      float v[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) v[i] = t0 + i < p.conv_tiles ? src[i * J] : 0.f;
#pragma unroll
      for (int i = 0; i < kGroup; ++i)
        if (t0 + i < p.conv_tiles) s += v[i];
    }
    x_dbl[j] = to<float>(T(s));
  }
  __syncthreads();
  if (!kEarly) load_lane(in, p, b, d, g, active, owns_states);
  const float *delta_low = x_dbl, *Bv = x_dbl + R, *Cv = x_dbl + R + N;
  // Δ before its bias: the channel's dt_proj row · δ, the row's G lanes splitting the rank.
  float dt_lin = 0.f;
#pragma unroll
  for (int i = 0; i < kRankRegs; ++i)
    if (g + i * G < R) dt_lin = fmaf(to<float>(in.dtw[i]), delta_low[g + i * G], dt_lin);
  if (active)
    for (int q = g + kRankRegs * G; q < R; q += G)
      dt_lin = fmaf(to<float>(p.dt_proj_w[int64_t(d) * R + q]), delta_low[q], dt_lin);
  for (int o = G / 2; o > 0; o >>= 1) dt_lin += __shfl_xor_sync(0xffffffffu, dt_lin, o);
  // selective_state_update's arithmetic from here (see selective_state_update_kernel.cu).
  float part = 0.f;
  if (owns_states) {
    const bool rst = p.reset && p.reset[b];
    const float raw = to<float>(T(dt_lin)) + in.dt_bias;  // Δ rounded as dt_proj's output
    const float dt = softplus_fast(raw), dtu = dt * in.x;
#pragma unroll
    for (int i = 0; i < kStates; ++i) {
      const int n = n0 + i;
      if (n < N) {
        in.h[i] = fmaf(exp_scaled(dt * in.A2[i]), rst ? 0.f : in.h[i], dtu * Bv[n]);
        part = fmaf(Cv[n], in.h[i], part);
      }
    }
    float* h = p.ssm_state + row * N + n0;
    if (p.vec) {
      *reinterpret_cast<float4*>(h) = make_float4(in.h[0], in.h[1], in.h[2], in.h[3]);
    } else {
#pragma unroll
      for (int i = 0; i < kStates; ++i)
        if (n0 + i < N) h[i] = in.h[i];
    }
  }
  // Lane sums in lane order, as selective_state_update adds them.
  const int base = (tid % 32) / G * G;
  float acc = 0.f;
  for (int gg = 0; gg < G; ++gg) acc += __shfl_sync(0xffffffffu, part, base + gg);
  if (active && g == 0) {
    acc = fmaf(in.d_skip, in.x, acc);
    acc *= silu(in.z);
    p.y[row] = T(acc);
  }
}

template <typename T, typename P>
void launch(const MixerStepDims& s, const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
            const at::Tensor& conv_w, const at::Tensor& conv_b, const at::Tensor& x_proj_w,
            const at::Tensor& dt_proj_w, const at::Tensor& dt_bias, const at::Tensor& A, const at::Tensor& Dskip,
            const at::Tensor& reset, const at::Tensor& xc, const at::Tensor& partial, const at::Tensor& y) {
  MixerParams<T, P> p{};
  p.xz = xz.data_ptr<T>(), p.conv_state = conv_state.data_ptr<float>(), p.ssm_state = ssm_state.data_ptr<float>();
  p.conv_w = conv_w.data_ptr<P>(), p.conv_b = ptr<P>(conv_b), p.dt_bias = dt_bias.data_ptr<P>();
  p.A = A.data_ptr<P>(), p.Dskip = Dskip.data_ptr<P>();
  p.x_proj_w = x_proj_w.data_ptr<T>(), p.dt_proj_w = dt_proj_w.data_ptr<T>(), p.reset = ptr<bool>(reset);
  p.xc = xc.data_ptr<T>(), p.partial = partial.data_ptr<float>(), p.y = y.data_ptr<T>();
  p.batch = int(s.batch), p.dim = int(s.dim), p.width = int(s.width), p.dstate = int(s.dstate);
  const bool latency_bound = s.batch <= kMaxLatencyBatch;
  p.rank = int(s.rank), p.conv_tiles = ceil_div(s.dim, conv_tile_for(s.batch));
  // Several rows per block only once the batch alone fills the GPU with blocks.
  const int rows = s.batch >= kMinBatchForRowBlocks ? kRowsPerBlock : 1;
  p.G = std::max(4, pow2_ceil(ceil_div(s.dstate, kStates)));  // as selective_state_update
  p.vec = s.dstate % kStates == 0 && aligned16(p.ssm_state);
  p.w_vec = (s.dim * int64_t(sizeof(T))) % 16 == 0 && aligned16(p.x_proj_w);
  p.a_vec = std::is_same_v<P, float> && s.dstate % kStates == 0 && aligned16(p.A);
  const auto stream = current_stream();
  const dim3 conv_grid(p.conv_tiles, ceil_div(s.batch, rows)), ssm_grid(ceil_div(s.dim, kThreads / p.G), unsigned(s.batch));
  const size_t smem = sizeof(float) * size_t(s.rank + 2 * s.dstate);
  const dim3 block(kThreads);
  if (latency_bound) {
    launch_overlapped(conv_xproj_kernel<T, P, kNarrowTile, 1>, conv_grid, block, 0, stream, p);
    launch_overlapped(ssm_kernel<T, P, true>, ssm_grid, block, smem, stream, p);
  } else if (rows == 1) {
    launch_overlapped(conv_xproj_kernel<T, P, kWideTile, 1>, conv_grid, block, 0, stream, p);
    launch_overlapped(ssm_kernel<T, P, true>, ssm_grid, block, smem, stream, p);
  } else {
    launch_overlapped(conv_xproj_kernel<T, P, kWideTile, kRowsPerBlock>, conv_grid, block, 0, stream, p);
    launch_overlapped(ssm_kernel<T, P, false>, ssm_grid, block, smem, stream, p);
  }
}

at::Tensor mamba_mixer_step_cuda(const at::Tensor& xz, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                                 const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                                 const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                 const at::Tensor& dt_proj_bias, const at::Tensor& A, const at::Tensor& D,
                                 const std::optional<at::Tensor>& reset) {
  const MixerStepDims s = check_mamba_mixer_step_args(xz, conv_state, ssm_state, conv_weight, conv_bias,
                                                      x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reset);
  const auto t = xz.scalar_type();
  // The small parameters are read in one dtype: float32, or xz's when all of them have it.
  at::ScalarType param = conv_weight.scalar_type();
  for (const at::Tensor* q : {&dt_proj_bias, &A, &D})
    if (q->scalar_type() != param) param = at::kFloat;
  if (conv_bias && conv_bias->scalar_type() != param) param = at::kFloat;
  // Shared memory for x_dbl: (R + 2N) floats, kept within the default 48 KB.
  const bool fast = t != at::kDouble && s.width <= kMaxW && s.dstate <= kMaxFastN &&
                    (s.rank + 2 * s.dstate) * 4 <= 48 * 1024 && s.batch <= 65535 && s.batch * s.dim < (int64_t(1) << 31);
  if (!fast || s.batch == 0 || s.dim == 0) {
    return mamba_mixer_step_unfused(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                    dt_proj_bias, A, D, reset);
  }
  c10::cuda::CUDAGuard guard(xz.device());
  // Strided states are worked on as contiguous copies and written back, as the other decode ops do.
  at::Tensor cs = conv_state.is_contiguous() ? conv_state : conv_state.contiguous();
  at::Tensor ss = ssm_state.is_contiguous() ? ssm_state : ssm_state.contiguous();
  auto as_param = [&](const at::Tensor& q) { return q.to(param).contiguous(); };  // no-ops when they fit
  const at::Tensor cw = as_param(conv_weight), cb = conv_bias ? as_param(*conv_bias) : at::Tensor();
  const at::Tensor db = as_param(dt_proj_bias), al = as_param(A), dk = as_param(D);
  const at::Tensor xzc = xz.contiguous(), xw = x_proj_weight.contiguous(), dw = dt_proj_weight.contiguous();
  const at::Tensor rst = contig_or_undef(reset);
  const at::Tensor xc = at::empty({s.batch, s.dim}, xz.options());
  const at::Tensor partial =
      at::empty({s.batch, ceil_div(s.dim, conv_tile_for(s.batch)), s.rank + 2 * s.dstate},
                xz.options().dtype(at::kFloat));
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
