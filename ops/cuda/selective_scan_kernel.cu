// CUDA selective scan, forward and backward.
//
// Fast path (float32 / float16 / bfloat16 inputs, d_state <= 128): a block owns one batch row and
// DT channels; each channel is split over G >= 4 lanes of one warp that hold 4 states each in
// registers (DT·G = 128 threads), and every lane runs the recurrence sequentially over time. That
// keeps one exp2 (MUFU) and three FMAs per (state, step) with no cross-thread scan, which is what
// bounds this op. Time is walked in tiles. Each lane owns a fixed slice of its channel's tile
// columns: it prefetches that slice of u/delta/z (and grad_y, and the tile's reset flags) into
// registers one tile ahead, turns it into Δ and Δ·u (once per element, not once per state lane),
// and after the scan sums y's per-lane partials for the slice and stores it, so per-channel
// constants stay in registers and every loop has a fixed trip count. B and C (shared by the
// block) come through cp.async into shared memory and are transposed to float32 [t][n] once per
// tile. Resets are a per-tile bitmask (the block shares its batch row, so the test is uniform);
// tiles without one run a loop with no reset test. The kernel starts from initial_state and
// writes the final state when it leaves the loop. G = 4 (d_state <= 16) is compiled separately
// with the lane count fixed; other d_state take the same kernel with G read at run time.
//
// Backward: a checkpointing forward pass (the same kernel) stores h every kTb steps; the backward
// kernel walks tiles of kTb steps in reverse, recomputes the tile's states from the checkpoint
// into shared memory, then runs the adjoint recurrence. dB/dC (sums over channels) are reduced
// over the block's channels in shared memory and added to float32 buffers with atomics;
// dA/dD/ddelta_bias accumulate per thread and are added once per block.
//
// Simple path (float64, or d_state > 128): one thread per (batch, channel) row, state in global
// memory, the CPU kernel's algorithm.
#include <torch/library.h>

#include <type_traits>

#include "ops/args.h"
#include "ops/cuda/common.cuh"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kThreads = 128;
constexpr int kStates = 4;      // states per lane
constexpr int kMinLanes = 4;    // lanes per channel, at least (so a lane's tile slice is <= 8 wide)
constexpr int kMaxFastN = 128;  // G <= 32: a channel's lanes stay in one warp
constexpr int kTf = 32;         // forward time tile
constexpr int kTb = 16;         // backward time tile = checkpoint spacing
constexpr int kSub = 8;         // backward steps per dB/dC block reduction
constexpr int kPad = 4;         // floats of padding per shared row (keeps 16-byte rows off one bank)

template <typename T>
struct ScanParams {
  const T *u, *delta, *z, *B, *C, *gy;
  const float *A, *D, *bias, *h0, *gfinal;
  const bool* reset;
  T *y, *du, *ddelta, *dz;
  float *hT, *ckpt, *dh0, *dA, *dB, *dC, *dD, *dbias;
  int batch, dim, dstate, G;
  int64_t L;
  // Elements between consecutive batch entries of B and C, whose rows are otherwise contiguous
  // ([batch][N][L] with any batch stride: a narrow() of x_proj's output is read in place).
  int64_t B_bstride, C_bstride;
  bool softplus, aligned;
};

__host__ __device__ inline size_t round16(size_t b) { return (b + 15) & ~size_t(15); }

// Shared-memory layout (byte offsets) of both kernels.
struct Layout {
  size_t stage, stage0, dt, dtu, gyc, Bf, Cf, p1, p2, red, hs, mask, total;
};

__host__ __device__ inline Layout make_layout(bool backward, int G, int N, int elem) {
  const int DT = kThreads / G, Np = kStates * G, Tc = backward ? kTb : kTf;
  Layout l{};
  size_t o = 0;
  l.stage = round16(size_t(2) * N * Tc * elem);  // B and C tiles as they arrive
  l.stage0 = o, o += 2 * l.stage;
  l.dt = o, o += round16(size_t(DT) * (Tc + kPad) * 4);
  l.dtu = o, o += round16(size_t(DT) * (Tc + kPad) * 4);
  l.gyc = o, o += backward ? round16(size_t(DT) * (Tc + kPad) * 4) : 0;
  l.Bf = o, o += round16(size_t(Tc) * (Np + kPad) * 4);
  l.Cf = o, o += round16(size_t(Tc) * (Np + kPad) * 4);
  l.p1 = o, o += round16(size_t(kThreads) * (Tc + kPad) * 4);
  l.p2 = o, o += backward ? round16(size_t(kThreads) * (Tc + kPad) * 4) : 0;
  l.red = o, o += backward ? round16(size_t(2) * kSub * DT * Np * 4) : 0;
  l.hs = o, o += backward ? round16(size_t(kTb) * kThreads * kStates * 4) : 0;
  l.mask = o, o += 16;
  l.total = o;
  return l;
}

// B/C tile (stage: [N][Tc] in T) -> float32 [Tc][Np + kPad], zero for padding states and steps.
// A thread converts 4 states of one step and writes them as one 16-byte store: consecutive lanes
// take consecutive steps, whose rows (Np + kPad floats apart) fall on distinct bank groups.
template <typename T, int Tc>
__device__ __forceinline__ void convert_bc(float* dst, const T* src, int N, int Np, int t0, int L, int tid) {
  const int BS = Np + kPad;
  for (int e = tid; e < Tc * (Np / 4); e += kThreads) {
    const int k = e % Tc, n = (e / Tc) * 4;
    const bool in_time = t0 + k < L;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = in_time && n + j < N ? to<float>(src[(n + j) * Tc + k]) : 0.f;
    *reinterpret_cast<float4*>(dst + k * BS + n) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

// Reset flags of a tile, prefetched with the tile's other inputs: lane j of warp 0 holds the raw
// byte of step t0 + j (kept unconverted so the load stays in flight until the ballot).
__device__ __forceinline__ unsigned char fetch_reset(const bool* reset, int b, int t0, int L, int Tc, int tid) {
  const int t = t0 + tid;
  return reset && tid < Tc && t < L ? reinterpret_cast<const unsigned char*>(reset)[int64_t(b) * L + t] : 0;
}

// Bit j: reset at step t0 + j (warp 0 builds it; every thread reads it after the next barrier).
__device__ __forceinline__ void build_mask(unsigned* s_mask, unsigned char flag, int tid) {
  if (tid < 32) {
    const unsigned m = __ballot_sync(0xffffffffu, flag != 0);
    if (tid == 0) *s_mask = m;
  }
}

// ---- forward (also the checkpointing pass of the backward) ---------------------------------------

// kG: lanes per channel fixed at compile time (4, d_state <= 16: every loop over lanes and tile
// columns unrolls), or 0 to read it from p.G.
template <typename T, bool kCkpt, int kG>
__global__ void __launch_bounds__(kThreads, 3) scan_fwd_kernel(const ScanParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int RS = kTf + kPad;  // row stride of [DT][Tc] and [thread][Tc] float tiles
  const int G = kG ? kG : p.G, DT = kThreads / G, Np = kStates * G, N = p.dstate, BS = Np + kPad;
  const int L = int(p.L);  // < 2^31, checked on the host
  const int tid = threadIdx.x, dl = tid / G, g = tid % G;
  const int b = blockIdx.y, d0 = blockIdx.x * DT, d = d0 + dl;
  const bool active = dl < min(DT, p.dim - d0);
  const int per = kTf / G, k0 = g * per, nown = active ? per : 0;  // this lane's tile columns
  const Layout lay = make_layout(false, G, N, sizeof(T));
  // Tile c's B/C stage: stage0 + (c & 1) * stage_elems (arithmetic, so no local-memory array).
  T* const stage0 = reinterpret_cast<T*>(smem + lay.stage0);
  const int stage_elems = int(lay.stage / sizeof(T));
  float* s_dt = reinterpret_cast<float*>(smem + lay.dt);
  float* s_dtu = reinterpret_cast<float*>(smem + lay.dtu);
  float* s_B = reinterpret_cast<float*>(smem + lay.Bf);
  float* s_C = reinterpret_cast<float*>(smem + lay.Cf);
  float* s_y = reinterpret_cast<float*>(smem + lay.p1);
  unsigned* s_mask = reinterpret_cast<unsigned*>(smem + lay.mask);

  const int64_t rowoff = (int64_t(b) * p.dim + (active ? d : 0)) * L;
  const T* gu = p.u + rowoff;
  const T* gdelta = p.delta + rowoff;
  const T* gz = !kCkpt && p.z ? p.z + rowoff : nullptr;
  const T* gB = p.B + int64_t(b) * p.B_bstride;
  const T* gC = p.C + int64_t(b) * p.C_bstride;

  float A2[kStates], h[kStates];
#pragma unroll
  for (int i = 0; i < kStates; ++i) {
    const int n = kStates * g + i;
    const bool ok = active && n < N;
    A2[i] = ok ? p.A[int64_t(d) * N + n] * kLog2e : 0.f;
    h[i] = ok && p.h0 ? p.h0[(int64_t(b) * p.dim + d) * N + n] : 0.f;
  }
  const float bias_d = active && p.bias ? p.bias[d] : 0.f, D_d = active && p.D ? p.D[d] : 0.f;

  Run<T, 8> nu{}, ndelta{}, nz{}, cu{}, cdelta{}, cz{};
  unsigned char nrst = 0, crst = 0;
  auto fetch = [&](int c) {
    const int t = c * kTf + k0;
    if (tid < 32) nrst = fetch_reset(p.reset, b, c * kTf, L, kTf, tid);
    load_run(nu, gu, t, L, nown, p.aligned);
    load_run(ndelta, gdelta, t, L, nown, p.aligned);
    if (gz) load_run(nz, gz, t, L, nown, p.aligned);
  };
  auto issue_bc = [&](int c) {
    const int t0 = c * kTf;
    T* st = stage0 + (c & 1) * stage_elems;
    load_tile<T, kTf>(st, gB, L, N, N, t0, p.aligned, tid, kThreads);
    if (!kCkpt) load_tile<T, kTf>(st + N * kTf, gC, L, N, N, t0, p.aligned, tid, kThreads);
    cp_async_commit();
  };

  const int nch = (L + kTf - 1) / kTf;
  const int nck = (L + kTb - 1) / kTb;
  issue_bc(0);
  fetch(0);
  for (int c = 0; c < nch; ++c) {
    const int t0 = c * kTf;
    const T* st = stage0 + (c & 1) * stage_elems;
    cu = nu, cdelta = ndelta, cz = nz, crst = nrst;
    cp_async_wait_all();
    __syncthreads();  // B/C tile c is in; every thread is done with tile c-1
    if (c + 1 < nch) {
      issue_bc(c + 1);
      fetch(c + 1);
    }

    // Prep: Δ and Δ·u of this lane's columns (padding steps get Δ = 0, a no-op step).
    {
      float dtv[8], dtuv[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float x = to<float>(cdelta.get(j)) + bias_d;  // zero-filled past L: finite
        const float dt = p.softplus ? softplus_fast(x) : x;
        dtv[j] = j < nown && t0 + k0 + j < L ? dt : 0.f;
        dtuv[j] = dtv[j] * to<float>(cu.get(j));
      }
      float* wdt = s_dt + dl * RS + k0;
      float* wdtu = s_dtu + dl * RS + k0;
      if (per == 8) {
        *reinterpret_cast<float4*>(wdt) = make_float4(dtv[0], dtv[1], dtv[2], dtv[3]);
        *reinterpret_cast<float4*>(wdt + 4) = make_float4(dtv[4], dtv[5], dtv[6], dtv[7]);
        *reinterpret_cast<float4*>(wdtu) = make_float4(dtuv[0], dtuv[1], dtuv[2], dtuv[3]);
        *reinterpret_cast<float4*>(wdtu + 4) = make_float4(dtuv[4], dtuv[5], dtuv[6], dtuv[7]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (j < per) wdt[j] = dtv[j], wdtu[j] = dtuv[j];
      }
    }
    convert_bc<T, kTf>(s_B, st, N, Np, t0, L, tid);
    if (!kCkpt) convert_bc<T, kTf>(s_C, st + N * kTf, N, Np, t0, L, tid);
    build_mask(s_mask, crst, tid);
    __syncthreads();

    // Scan. Tiles without a reset (the common case) take a loop with no reset test.
    const unsigned mask = *s_mask;
    const float* my_dt = s_dt + dl * RS;
    const float* my_dtu = s_dtu + dl * RS;
    float* my_y = s_y + tid * RS;
    auto scan_tile = [&](auto with_reset) {
#pragma unroll
      for (int j4 = 0; j4 < kTf / 4; ++j4) {
        if (kCkpt && (4 * j4) % kTb == 0) {
          const int t = t0 + 4 * j4;
          if (active && t < L)
            *reinterpret_cast<float4*>(p.ckpt + ((int64_t(b) * nck + t / kTb) * p.dim + d) * Np + kStates * g) =
                make_float4(h[0], h[1], h[2], h[3]);
        }
        const float4 dt4 = *reinterpret_cast<const float4*>(my_dt + 4 * j4);
        const float4 dtu4 = *reinterpret_cast<const float4*>(my_dtu + 4 * j4);
        const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, dtus[4] = {dtu4.x, dtu4.y, dtu4.z, dtu4.w};
        float yv[4];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int k = 4 * j4 + jj;
          const float4 Bv = *reinterpret_cast<const float4*>(s_B + k * BS + kStates * g);
          const float Bs[4] = {Bv.x, Bv.y, Bv.z, Bv.w};
          if (decltype(with_reset)::value && (mask & (1u << k))) {
#pragma unroll
            for (int i = 0; i < kStates; ++i) h[i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < kStates; ++i) h[i] = fmaf(exp_scaled(dts[jj] * A2[i]), h[i], dtus[jj] * Bs[i]);
          if (!kCkpt) {
            const float4 Cv = *reinterpret_cast<const float4*>(s_C + k * BS + kStates * g);
            float acc = 0.f;
            acc = fmaf(Cv.x, h[0], acc);
            acc = fmaf(Cv.y, h[1], acc);
            acc = fmaf(Cv.z, h[2], acc);
            acc = fmaf(Cv.w, h[3], acc);
            yv[jj] = acc;
          }
        }
        if (!kCkpt) *reinterpret_cast<float4*>(my_y + 4 * j4) = make_float4(yv[0], yv[1], yv[2], yv[3]);
      }
    };
    if (mask) scan_tile(std::true_type{});
    else scan_tile(std::false_type{});

    // Epilogue: y = (Σ over the channel's lanes + D·u) · silu(z) for this lane's columns. The
    // channel's lanes share the warp, so the partial sums need no block barrier.
    if (!kCkpt) {
      __syncwarp();
      float yv[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int gg = 0; gg < G; ++gg) {
        const float* src = s_y + (dl * G + gg) * RS + k0;
        if (per == 8) {
          const float4 a = *reinterpret_cast<const float4*>(src), c4 = *reinterpret_cast<const float4*>(src + 4);
          yv[0] += a.x, yv[1] += a.y, yv[2] += a.z, yv[3] += a.w;
          yv[4] += c4.x, yv[5] += c4.y, yv[6] += c4.z, yv[7] += c4.w;
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (j < per) yv[j] += src[j];
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        yv[j] = fmaf(D_d, to<float>(cu.get(j)), yv[j]);
        if (gz) yv[j] *= silu(to<float>(cz.get(j)));
      }
      if (nown) store_run(p.y + rowoff, t0 + k0, L, nown, p.aligned, yv);
    }
  }
  if (!kCkpt && active && p.hT) {
#pragma unroll
    for (int i = 0; i < kStates; ++i) {
      const int n = kStates * g + i;
      if (n < N) p.hT[(int64_t(b) * p.dim + d) * N + n] = h[i];
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------

template <typename T, int kG>
__global__ void __launch_bounds__(kThreads, 2) scan_bwd_kernel(const ScanParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int RS = kTb + kPad;
  const int G = kG ? kG : p.G, DT = kThreads / G, Np = kStates * G, N = p.dstate, BS = Np + kPad;
  const int L = int(p.L);  // < 2^31, checked on the host
  const int tid = threadIdx.x, dl = tid / G, g = tid % G;
  const int b = blockIdx.y, d0 = blockIdx.x * DT, d = d0 + dl;
  const int rows = min(DT, p.dim - d0);
  const bool active = dl < rows;
  // This lane's tile columns (with 32 lanes per channel, lanes 16.. own none).
  const int per = max(1, kTb / G), k0 = g * per, ncols = k0 < kTb ? per : 0, nown = active ? ncols : 0;
  const Layout lay = make_layout(true, G, N, sizeof(T));
  // Tile c's B/C stage: stage0 + (c & 1) * stage_elems (arithmetic, so no local-memory array).
  T* const stage0 = reinterpret_cast<T*>(smem + lay.stage0);
  const int stage_elems = int(lay.stage / sizeof(T));
  float* s_dt = reinterpret_cast<float*>(smem + lay.dt);
  float* s_dtu = reinterpret_cast<float*>(smem + lay.dtu);
  float* s_gyc = reinterpret_cast<float*>(smem + lay.gyc);
  float* s_B = reinterpret_cast<float*>(smem + lay.Bf);
  float* s_C = reinterpret_cast<float*>(smem + lay.Cf);
  float* s_p1 = reinterpret_cast<float*>(smem + lay.p1);
  float* s_p2 = reinterpret_cast<float*>(smem + lay.p2);
  float* s_red = reinterpret_cast<float*>(smem + lay.red);
  float4* s_hs = reinterpret_cast<float4*>(smem + lay.hs);  // [kTb][kThreads]: h after each step
  unsigned* s_mask = reinterpret_cast<unsigned*>(smem + lay.mask);

  const int64_t rowoff = (int64_t(b) * p.dim + (active ? d : 0)) * L;
  const T* gu = p.u + rowoff;
  const T* gdelta = p.delta + rowoff;
  const T* gz = p.z ? p.z + rowoff : nullptr;
  const T* ggy = p.gy + rowoff;
  const T* gB = p.B + int64_t(b) * p.B_bstride;
  const T* gC = p.C + int64_t(b) * p.C_bstride;

  float A2[kStates], dh[kStates], dAacc[kStates];
#pragma unroll
  for (int i = 0; i < kStates; ++i) {
    const int n = kStates * g + i;
    const bool ok = active && n < N;
    A2[i] = ok ? p.A[int64_t(d) * N + n] * kLog2e : 0.f;
    dh[i] = ok && p.gfinal ? p.gfinal[(int64_t(b) * p.dim + d) * N + n] : 0.f;
    dAacc[i] = 0.f;
  }
  const float bias_d = active && p.bias ? p.bias[d] : 0.f, D_d = active && p.D ? p.D[d] : 0.f;
  float accD = 0.f, accBias = 0.f;

  Run<T, 4> nu{}, ndelta{}, nz{}, ngy{}, cu{}, cdelta{}, cz{}, cgy{};
  unsigned char nrst = 0, crst = 0;
  auto fetch = [&](int c) {
    const int t = c * kTb + k0;
    if (tid < 32) nrst = fetch_reset(p.reset, b, c * kTb, L, kTb, tid);
    load_run(nu, gu, t, L, nown, p.aligned);
    load_run(ndelta, gdelta, t, L, nown, p.aligned);
    if (gz) load_run(nz, gz, t, L, nown, p.aligned);
    load_run(ngy, ggy, t, L, nown, p.aligned);
  };
  auto issue_bc = [&](int c) {
    const int t0 = c * kTb;
    T* st = stage0 + (c & 1) * stage_elems;
    load_tile<T, kTb>(st, gB, L, N, N, t0, p.aligned, tid, kThreads);
    load_tile<T, kTb>(st + N * kTb, gC, L, N, N, t0, p.aligned, tid, kThreads);
    cp_async_commit();
  };

  const int nch = (L + kTb - 1) / kTb;
  issue_bc(nch - 1);
  fetch(nch - 1);
  for (int c = nch - 1; c >= 0; --c) {
    const int t0 = c * kTb;
    const T* st = stage0 + (c & 1) * stage_elems;
    cu = nu, cdelta = ndelta, cz = nz, cgy = ngy, crst = nrst;
    float hst[kStates] = {0.f, 0.f, 0.f, 0.f};
    if (active) {
      const float4 v =
          *reinterpret_cast<const float4*>(p.ckpt + ((int64_t(b) * nch + c) * p.dim + d) * Np + kStates * g);
      hst[0] = v.x, hst[1] = v.y, hst[2] = v.z, hst[3] = v.w;
    }
    cp_async_wait_all();
    __syncthreads();
    if (c > 0) {
      issue_bc(c - 1);
      fetch(c - 1);
    }

    float dtv[4], gyv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool ok = j < nown && t0 + k0 + j < L;
      const float x = to<float>(cdelta.get(j)) + bias_d;
      const float dt = p.softplus ? softplus_fast(x) : x;
      dtv[j] = ok ? dt : 0.f;
      gyv[j] = ok ? to<float>(cgy.get(j)) : 0.f;
      if (j < ncols) {
        s_dt[dl * RS + k0 + j] = dtv[j];
        s_dtu[dl * RS + k0 + j] = dtv[j] * to<float>(cu.get(j));
        if (!gz) s_gyc[dl * RS + k0 + j] = gyv[j];
      }
    }
    convert_bc<T, kTb>(s_B, st, N, Np, t0, L, tid);
    convert_bc<T, kTb>(s_C, st + N * kTb, N, Np, t0, L, tid);
    build_mask(s_mask, crst, tid);
    __syncthreads();

    const unsigned mask = *s_mask;
    const float* my_dt = s_dt + dl * RS;
    const float* my_dtu = s_dtu + dl * RS;
    const float* my_gyc = s_gyc + dl * RS;

    // Recompute the tile's states (s_hs[j] = h after step t0 + j; shared memory, so the adjoint
    // loop below keeps few registers) and, with z, y before the gate.
    auto recompute = [&](auto with_reset) {
      float hc[kStates] = {hst[0], hst[1], hst[2], hst[3]};
#pragma unroll
      for (int j4 = 0; j4 < kTb / 4; ++j4) {
        const float4 dt4 = *reinterpret_cast<const float4*>(my_dt + 4 * j4);
        const float4 dtu4 = *reinterpret_cast<const float4*>(my_dtu + 4 * j4);
        const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, dtus[4] = {dtu4.x, dtu4.y, dtu4.z, dtu4.w};
        float yv[4];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int j = 4 * j4 + jj;
          const float4 Bv = *reinterpret_cast<const float4*>(s_B + j * BS + kStates * g);
          const float Bs[4] = {Bv.x, Bv.y, Bv.z, Bv.w};
          if (decltype(with_reset)::value && (mask & (1u << j))) {
#pragma unroll
            for (int i = 0; i < kStates; ++i) hc[i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < kStates; ++i) hc[i] = fmaf(exp_scaled(dts[jj] * A2[i]), hc[i], dtus[jj] * Bs[i]);
          s_hs[j * kThreads + tid] = make_float4(hc[0], hc[1], hc[2], hc[3]);
          if (gz) {
            const float4 Cv = *reinterpret_cast<const float4*>(s_C + j * BS + kStates * g);
            float acc = 0.f;
            acc = fmaf(Cv.x, hc[0], acc);
            acc = fmaf(Cv.y, hc[1], acc);
            acc = fmaf(Cv.z, hc[2], acc);
            acc = fmaf(Cv.w, hc[3], acc);
            yv[jj] = acc;
          }
        }
        if (gz) *reinterpret_cast<float4*>(s_p1 + tid * RS + 4 * j4) = make_float4(yv[0], yv[1], yv[2], yv[3]);
      }
    };
    if (mask) recompute(std::true_type{});
    else recompute(std::false_type{});
    // With z: the gate's gradient needs y before the gate, summed over the channel's lanes.
    if (gz) {
      __syncwarp();
      float yc[4] = {0.f, 0.f, 0.f, 0.f}, dzv[4];
#pragma unroll
      for (int gg = 0; gg < G; ++gg)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (j < nown) yc[j] += s_p1[(dl * G + gg) * RS + k0 + j];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float zz = to<float>(cz.get(j));
        yc[j] = fmaf(D_d, to<float>(cu.get(j)), yc[j]);
        dzv[j] = gyv[j] * yc[j] * silu_grad(zz);
        if (j < ncols) s_gyc[dl * RS + k0 + j] = gyv[j] * silu(zz);
      }
      if (nown) store_run(p.dz + rowoff, t0 + k0, L, nown, p.aligned, dzv);
    }
    __syncwarp();

    // Adjoint recurrence, newest step first; dh is the gradient w.r.t. the state after the step.
    float hcur[kStates];  // h after step j (read from s_hs, carried down as the next step's prev)
    {
      const float4 v = s_hs[(kTb - 1) * kThreads + tid];
      hcur[0] = v.x, hcur[1] = v.y, hcur[2] = v.z, hcur[3] = v.w;
    }
    auto adjoint = [&](int half, auto with_reset) {
      float sBq[4], qq[4];
#pragma unroll
      for (int jj = kSub - 1; jj >= 0; --jj) {
        const int j = half * kSub + jj;
        const float gyc = my_gyc[j], dt = my_dt[j], dtu = my_dtu[j];
        const float4 Bv = *reinterpret_cast<const float4*>(s_B + j * BS + kStates * g);
        const float4 Cv = *reinterpret_cast<const float4*>(s_C + j * BS + kStates * g);
        const float Bs[4] = {Bv.x, Bv.y, Bv.z, Bv.w}, Cs[4] = {Cv.x, Cv.y, Cv.z, Cv.w};
        const bool rst = decltype(with_reset)::value && (mask & (1u << j));
        float hprev[kStates];  // h before step j, ahead of its reset
        if (j > 0) {
          const float4 v = s_hs[(j > 0 ? j - 1 : 0) * kThreads + tid];
          hprev[0] = v.x, hprev[1] = v.y, hprev[2] = v.z, hprev[3] = v.w;
        } else {
#pragma unroll
          for (int i = 0; i < kStates; ++i) hprev[i] = hst[i];
        }
        float sB = 0.f, q = 0.f, dBv[kStates], dCv[kStates];
#pragma unroll
        for (int i = 0; i < kStates; ++i) {
          dh[i] = fmaf(gyc, Cs[i], dh[i]);
          dCv[i] = gyc * hcur[i];
          dBv[i] = dh[i] * dtu;
          sB = fmaf(dh[i], Bs[i], sB);
          const float da = dh[i] * exp_scaled(dt * A2[i]);  // gradient carried to the state before
          const float x = rst ? 0.f : da * hprev[i];         // ∂/∂(Δ·A) of this step
          dAacc[i] = fmaf(x, dt, dAacc[i]);
          q = fmaf(x, A2[i], q);
          dh[i] = rst ? 0.f : da;
          hcur[i] = hprev[i];
        }
        float* red = s_red + (jj * DT + dl) * Np + kStates * g;
        *reinterpret_cast<float4*>(red) = make_float4(dBv[0], dBv[1], dBv[2], dBv[3]);
        *reinterpret_cast<float4*>(red + kSub * DT * Np) = make_float4(dCv[0], dCv[1], dCv[2], dCv[3]);
        sBq[j % 4] = sB, qq[j % 4] = q;
        if (j % 4 == 0) {
          *reinterpret_cast<float4*>(s_p1 + tid * RS + j) = make_float4(sBq[0], sBq[1], sBq[2], sBq[3]);
          *reinterpret_cast<float4*>(s_p2 + tid * RS + j) = make_float4(qq[0], qq[1], qq[2], qq[3]);
        }
      }
    };
#pragma unroll
    for (int half = kTb / kSub - 1; half >= 0; --half) {
      if (mask) adjoint(half, std::true_type{});
      else adjoint(half, std::false_type{});
      __syncthreads();
      // dB/dC of these kSub steps summed over the block's channels: pairs of lanes split the rows
      // (interleaved, which keeps the 16-byte reads off shared banks), then one adds to global.
      const int nq = Np / 4;
      for (int e = tid; e < 2 * kSub * nq * 2; e += kThreads) {
        const int rh = e & 1, q4 = (e >> 1) % nq, jj = (e >> 1) / nq % kSub, which = (e >> 1) / nq / kSub;
        const float* src = s_red + (which * kSub + jj) * DT * Np + kStates * q4;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int r = rh; r < rows; r += 2) {
          const float4 v = *reinterpret_cast<const float4*>(src + r * Np);
          acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
        }
        acc.x += __shfl_xor_sync(0xffffffffu, acc.x, 1);
        acc.y += __shfl_xor_sync(0xffffffffu, acc.y, 1);
        acc.z += __shfl_xor_sync(0xffffffffu, acc.z, 1);
        acc.w += __shfl_xor_sync(0xffffffffu, acc.w, 1);
        const int t = t0 + half * kSub + jj;
        if (rh == 0 && t < L) {
          float* dst = (which ? p.dC : p.dB) + int64_t(b) * N * L + t;
          const float vals[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (kStates * q4 + i < N) atomicAdd(dst + int64_t(kStates * q4 + i) * L, vals[i]);
        }
      }
      __syncthreads();
    }

    // du, ddelta for this lane's columns; dD and ddelta_bias accumulate per lane.
    {
      float S[4] = {0.f, 0.f, 0.f, 0.f}, Q[4] = {0.f, 0.f, 0.f, 0.f}, du[4], dd[4];
#pragma unroll
      for (int gg = 0; gg < G; ++gg)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (j < nown) S[j] += s_p1[(dl * G + gg) * RS + k0 + j], Q[j] += s_p2[(dl * G + gg) * RS + k0 + j];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const bool ok = j < nown && t0 + k0 + j < L;
        const float gyc = j < nown ? my_gyc[k0 + j] : 0.f;
        const float uu = to<float>(cu.get(j));
        const float ddt = fmaf(uu, S[j], Q[j] * kLn2);  // q was summed against A·log2(e)
        dd[j] = p.softplus ? ddt * softplus_grad(to<float>(cdelta.get(j)) + bias_d) : ddt;
        du[j] = fmaf(dtv[j], S[j], gyc * D_d);
        if (ok) accD = fmaf(gyc, uu, accD), accBias += dd[j];
      }
      if (nown) {
        store_run(p.du + rowoff, t0 + k0, L, nown, p.aligned, du);
        store_run(p.ddelta + rowoff, t0 + k0, L, nown, p.aligned, dd);
      }
    }
  }

  if (active) {
#pragma unroll
    for (int i = 0; i < kStates; ++i) {
      const int n = kStates * g + i;
      if (n < N) {
        if (p.dh0) p.dh0[(int64_t(b) * p.dim + d) * N + n] = dh[i];
        atomicAdd(p.dA + int64_t(d) * N + n, dAacc[i]);
      }
    }
  }
  // dD, ddelta_bias: sum the channel's lanes (adjacent in the warp), one atomic per channel.
  for (int o = G / 2; o > 0; o >>= 1) {
    accD += __shfl_xor_sync(0xffffffffu, accD, o);
    accBias += __shfl_xor_sync(0xffffffffu, accBias, o);
  }
  if (active && g == 0) {
    if (p.dD) atomicAdd(p.dD + d, accD);
    if (p.dbias) atomicAdd(p.dbias + d, accBias);
  }
}

// ---- simple kernels (float64, large d_state) -----------------------------------------------------

template <typename S>
struct SimpleParams {
  const S *u, *delta, *A, *B, *C, *D, *z, *bias, *h0, *gy, *gfinal;
  const bool* reset;
  S *y, *hT, *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *dbias, *dh, *ckpt, *states, *h;
  int batch, dim, dstate;
  int64_t L;
  bool softplus;
};

constexpr int kSimpleChunk = 64;

template <typename S>
__device__ __forceinline__ S simple_dt(const SimpleParams<S>& p, int64_t row, int d, int64_t t) {
  const S raw = p.delta[row * p.L + t] + (p.bias ? p.bias[d] : S(0));
  return p.softplus ? softplus(raw) : raw;
}

template <typename S>
__device__ __forceinline__ void simple_step(const SimpleParams<S>& p, S* h, int64_t row, int b, int d, int64_t t) {
  const int N = p.dstate;
  const S dt = simple_dt(p, row, d, t), dtu = dt * p.u[row * p.L + t];
  const bool rst = p.reset && p.reset[int64_t(b) * p.L + t];
  for (int n = 0; n < N; ++n)
    h[n] = exp(dt * p.A[int64_t(d) * N + n]) * (rst ? S(0) : h[n]) + dtu * p.B[(int64_t(b) * N + n) * p.L + t];
}

template <typename S>
__global__ void scan_fwd_simple(const SimpleParams<S> p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= int64_t(p.batch) * p.dim) return;
  const int b = int(row / p.dim), d = int(row % p.dim), N = p.dstate;
  S* h = p.hT + row * N;
  for (int n = 0; n < N; ++n) h[n] = p.h0 ? p.h0[row * N + n] : S(0);
  for (int64_t t = 0; t < p.L; ++t) {
    simple_step(p, h, row, b, d, t);
    const S uu = p.u[row * p.L + t];
    S acc = (p.D ? p.D[d] : S(0)) * uu;
    for (int n = 0; n < N; ++n) acc += p.C[(int64_t(b) * N + n) * p.L + t] * h[n];
    if (p.z) acc *= silu(p.z[row * p.L + t]);
    p.y[row * p.L + t] = acc;
  }
}

template <typename S>
__global__ void scan_bwd_simple(const SimpleParams<S> p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= int64_t(p.batch) * p.dim) return;
  const int b = int(row / p.dim), d = int(row % p.dim), N = p.dstate;
  const int64_t L = p.L, nch = (L + kSimpleChunk - 1) / kSimpleChunk;
  S* ck = p.ckpt + row * nch * N;
  S* st = p.states + row * kSimpleChunk * N;
  S* h = p.h + row * N;
  S* dh = p.dh + row * N;
  for (int n = 0; n < N; ++n) h[n] = p.h0 ? p.h0[row * N + n] : S(0);
  for (int64_t t = 0; t < L; ++t) {
    if (t % kSimpleChunk == 0)
      for (int n = 0; n < N; ++n) ck[(t / kSimpleChunk) * N + n] = h[n];
    simple_step(p, h, row, b, d, t);
  }
  for (int n = 0; n < N; ++n) dh[n] = p.gfinal ? p.gfinal[row * N + n] : S(0);
  const S Dv = p.D ? p.D[d] : S(0);
  S dD = 0, db = 0;
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t t0 = c * kSimpleChunk, t1 = L < t0 + kSimpleChunk ? L : t0 + kSimpleChunk;
    for (int n = 0; n < N; ++n) h[n] = ck[c * N + n];
    for (int64_t t = t0; t < t1; ++t) {
      simple_step(p, h, row, b, d, t);
      for (int n = 0; n < N; ++n) st[(t - t0) * N + n] = h[n];
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const S* ht = st + (t - t0) * N;
      const bool rst = p.reset && p.reset[int64_t(b) * L + t];
      const S* prev = rst ? nullptr : (t > t0 ? st + (t - t0 - 1) * N : ck + c * N);
      const S uu = p.u[row * L + t];
      S gyc = p.gy[row * L + t];
      if (p.z) {
        S yc = Dv * uu;
        for (int n = 0; n < N; ++n) yc += p.C[(int64_t(b) * N + n) * L + t] * ht[n];
        const S zz = p.z[row * L + t];
        p.dz[row * L + t] = gyc * yc * silu_grad(zz);
        gyc *= silu(zz);
      }
      dD += gyc * uu;
      const S raw = p.delta[row * L + t] + (p.bias ? p.bias[d] : S(0));
      const S dt = p.softplus ? softplus(raw) : raw;
      S du = gyc * Dv, ddt = 0;
      for (int n = 0; n < N; ++n) {
        const int64_t bn = (int64_t(b) * N + n) * L + t;
        const S An = p.A[int64_t(d) * N + n], Bn = p.B[bn], a = exp(dt * An), pv = prev ? prev[n] : S(0);
        dh[n] += gyc * p.C[bn];
        atomicAdd(p.dC + bn, gyc * ht[n]);
        atomicAdd(p.dB + bn, dh[n] * dt * uu);
        du += dh[n] * dt * Bn;
        ddt += dh[n] * (Bn * uu + pv * a * An);
        atomicAdd(p.dA + int64_t(d) * N + n, dh[n] * pv * a * dt);
        dh[n] *= rst ? S(0) : a;
      }
      const S draw = p.softplus ? ddt * softplus_grad(raw) : ddt;
      p.du[row * L + t] = du;
      p.ddelta[row * L + t] = draw;
      db += draw;
    }
  }
  atomicAdd(p.dD + d, dD);
  atomicAdd(p.dbias + d, db);
}

// ---- host side -----------------------------------------------------------------------------------


bool use_fast_path(const ScanDims& s) { return s.state_dtype == at::kFloat && s.dstate <= kMaxFastN; }

int lanes_for(int64_t N) { return std::max(kMinLanes, pow2_ceil(ceil_div(N, kStates))); }

// B or C as the fast kernels read it: rows of L contiguous elements, L apart within a batch entry,
// batch entries any distance apart (B and C are narrow()s of x_proj's [batch, rows, L] output,
// read in place). Any other layout is copied.
at::Tensor batch_strided_rows(const at::Tensor& t) {
  const bool rows = (t.size(2) == 1 || t.stride(2) == 1) && (t.size(1) == 1 || t.stride(1) == t.size(2));
  return rows && t.stride(0) >= 0 ? t : t.contiguous();
}

template <typename T>
ScanParams<T> fast_params(const ScanDims& s, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                          const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& z,
                          const at::Tensor& bias, const at::Tensor& h0, const at::Tensor& reset, bool softplus) {
  ScanParams<T> p{};
  p.u = u.data_ptr<T>(), p.delta = delta.data_ptr<T>(), p.B = B.data_ptr<T>(), p.C = C.data_ptr<T>();
  p.B_bstride = B.stride(0), p.C_bstride = C.stride(0);  // B, C from batch_strided_rows
  p.z = ptr<T>(z);
  p.A = A.data_ptr<float>(), p.D = ptr<float>(D), p.bias = ptr<float>(bias), p.h0 = ptr<float>(h0);
  p.reset = ptr<bool>(reset);
  p.batch = int(s.batch), p.dim = int(s.dim), p.dstate = int(s.dstate), p.L = s.seqlen;
  p.G = lanes_for(s.dstate);
  p.softplus = softplus;
  return p;
}

// 16-byte paths: every row of every [.., L] tensor starts 16-byte aligned (B's and C's batch
// strides included).
template <typename T>
bool rows_aligned(const ScanParams<T>& p) {
  const int64_t elem = sizeof(T);
  bool ok = p.L * elem % 16 == 0 && p.B_bstride * elem % 16 == 0 && p.C_bstride * elem % 16 == 0;
  for (const void* q : {(const void*)p.u, (const void*)p.delta, (const void*)p.z, (const void*)p.B, (const void*)p.C,
                        (const void*)p.gy, (const void*)p.y, (const void*)p.du, (const void*)p.ddelta,
                        (const void*)p.dz})
    ok = ok && (!q || aligned16(q));
  return ok;
}

template <typename T, bool kCkpt>
void launch_fwd(const ScanParams<T>& p) {
  const Layout lay = make_layout(false, p.G, p.dstate, sizeof(T));
  const dim3 grid(ceil_div(p.dim, kThreads / p.G), p.batch);
  if (p.G == 4) {
    opt_in_smem<scan_fwd_kernel<T, kCkpt, 4>>();
    scan_fwd_kernel<T, kCkpt, 4><<<grid, kThreads, lay.total, current_stream()>>>(p);
  } else {
    opt_in_smem<scan_fwd_kernel<T, kCkpt, 0>>();
    scan_fwd_kernel<T, kCkpt, 0><<<grid, kThreads, lay.total, current_stream()>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bwd(const ScanParams<T>& p) {
  const Layout lay = make_layout(true, p.G, p.dstate, sizeof(T));
  const dim3 grid(ceil_div(p.dim, kThreads / p.G), p.batch);
  if (p.G == 4) {
    opt_in_smem<scan_bwd_kernel<T, 4>>();
    scan_bwd_kernel<T, 4><<<grid, kThreads, lay.total, current_stream()>>>(p);
  } else {
    opt_in_smem<scan_bwd_kernel<T, 0>>();
    scan_bwd_kernel<T, 0><<<grid, kThreads, lay.total, current_stream()>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct SimpleInputs {
  at::Tensor u, delta, A, B, C, D, z, bias, h0, reset;
};

SimpleInputs simple_inputs(at::ScalarType acc, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                           const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& reset) {
  return {u.to(acc).contiguous(), delta.to(acc).contiguous(), A.to(acc).contiguous(), B.to(acc).contiguous(),
          C.to(acc).contiguous(), as_dtype(D, acc), as_dtype(z, acc), as_dtype(bias, acc), as_dtype(h0, acc),
          contig_or_undef(reset)};
}

template <typename S>
SimpleParams<S> simple_params(const ScanDims& s, const SimpleInputs& in, bool softplus) {
  SimpleParams<S> p{};
  p.u = in.u.data_ptr<S>(), p.delta = in.delta.data_ptr<S>(), p.A = in.A.data_ptr<S>();
  p.B = in.B.data_ptr<S>(), p.C = in.C.data_ptr<S>();
  p.D = ptr<S>(in.D), p.z = ptr<S>(in.z), p.bias = ptr<S>(in.bias), p.h0 = ptr<S>(in.h0);
  p.reset = ptr<bool>(in.reset);
  p.batch = int(s.batch), p.dim = int(s.dim), p.dstate = int(s.dstate), p.L = s.seqlen;
  p.softplus = softplus;
  return p;
}

int simple_blocks(const ScanDims& s) { return ceil_div(s.batch * s.dim, 128); }

std::tuple<at::Tensor, at::Tensor> selective_scan_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset) {
  const ScanDims s = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  TORCH_CHECK(s.seqlen < (int64_t(1) << 31), "selective_scan: CUDA kernels take L < 2^31, got ", s.seqlen);
  c10::cuda::CUDAGuard guard(u.device());
  const auto opts = u.options().dtype(s.state_dtype);
  auto final_state = at::empty({s.batch, s.dim, s.dstate}, opts);

  if (!use_fast_path(s)) {
    const SimpleInputs in = simple_inputs(s.state_dtype, u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
    auto y = at::empty({s.batch, s.dim, s.seqlen}, opts);
    AT_DISPATCH_FLOATING_TYPES(s.state_dtype, "selective_scan_cuda_simple", [&] {
      auto p = simple_params<scalar_t>(s, in, delta_softplus);
      p.y = y.data_ptr<scalar_t>(), p.hT = final_state.data_ptr<scalar_t>();
      scan_fwd_simple<scalar_t><<<simple_blocks(s), 128, 0, current_stream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {y.to(u.scalar_type()), final_state};
  }

  const at::Tensor uc = u.contiguous(), deltac = delta.contiguous(), Bc = batch_strided_rows(B),
                   Cc = batch_strided_rows(C);
  const at::Tensor zc = contig_or_undef(z), Af = A.to(at::kFloat).contiguous();
  const at::Tensor Df = as_dtype(D, at::kFloat), biasf = as_dtype(delta_bias, at::kFloat);
  const at::Tensor h0 = contig_or_undef(initial_state), rst = contig_or_undef(reset);
  auto y = at::empty_like(uc);
  SM_DISPATCH_FAST(u.scalar_type(), "selective_scan_cuda", [&] {
    auto p = fast_params<scalar_t>(s, uc, deltac, Af, Bc, Cc, Df, zc, biasf, h0, rst, delta_softplus);
    p.y = y.data_ptr<scalar_t>(), p.hT = final_state.data_ptr<float>();
    p.aligned = rows_aligned(p);
    launch_fwd<scalar_t, false>(p);
  });
  return {y, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_backward_cuda(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                             const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const std::optional<at::Tensor>& D,
                             const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                             bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                             const std::optional<at::Tensor>& reset) {
  const ScanDims s = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  TORCH_CHECK(grad_y.sizes() == u.sizes(), "selective_scan_backward: argument 'grad_y' must have the shape of u ",
              u.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == u.device(), "selective_scan_backward: argument 'grad_y' is on ", grad_y.device(),
              " but the inputs are on ", u.device());
  TORCH_CHECK(s.seqlen < (int64_t(1) << 31), "selective_scan_backward: CUDA kernels take L < 2^31, got ", s.seqlen);
  at::Tensor gfinal;
  if (grad_final_state && grad_final_state->defined()) {
    TORCH_CHECK(grad_final_state->sizes() == at::IntArrayRef({s.batch, s.dim, s.dstate}),
                "selective_scan_backward: argument 'grad_final_state' must have shape [batch, d_inner, d_state]");
    gfinal = grad_final_state->to(s.state_dtype).contiguous();
  }
  c10::cuda::CUDAGuard guard(u.device());
  const auto f = u.options().dtype(s.state_dtype);
  auto dA = at::zeros({s.dim, s.dstate}, f), dB = at::zeros({s.batch, s.dstate, s.seqlen}, f);
  auto dC = at::zeros({s.batch, s.dstate, s.seqlen}, f), dD = at::zeros({s.dim}, f), dbias = at::zeros({s.dim}, f);
  auto dh0 = at::empty({s.batch, s.dim, s.dstate}, f);
  at::Tensor du, ddelta, dz;

  if (!use_fast_path(s)) {
    const SimpleInputs in = simple_inputs(s.state_dtype, u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
    const at::Tensor gy = grad_y.to(s.state_dtype).contiguous();
    du = at::empty({s.batch, s.dim, s.seqlen}, f), ddelta = at::empty_like(du);
    if (z) dz = at::empty_like(du);
    const int64_t rows = s.batch * s.dim, nch = (s.seqlen + kSimpleChunk - 1) / kSimpleChunk;
    auto ckpt = at::empty({rows, nch, s.dstate}, f), states = at::empty({rows, kSimpleChunk, s.dstate}, f);
    auto hbuf = at::empty({rows, s.dstate}, f);
    AT_DISPATCH_FLOATING_TYPES(s.state_dtype, "selective_scan_backward_cuda_simple", [&] {
      using S = scalar_t;
      auto p = simple_params<S>(s, in, delta_softplus);
      p.gy = gy.data_ptr<S>(), p.gfinal = ptr<S>(gfinal);
      p.du = du.data_ptr<S>(), p.ddelta = ddelta.data_ptr<S>(), p.dz = mptr<S>(dz);
      p.dA = dA.data_ptr<S>(), p.dB = dB.data_ptr<S>(), p.dC = dC.data_ptr<S>();
      p.dD = dD.data_ptr<S>(), p.dbias = dbias.data_ptr<S>(), p.dh = dh0.data_ptr<S>();
      p.ckpt = ckpt.data_ptr<S>(), p.states = states.data_ptr<S>(), p.h = hbuf.data_ptr<S>();
      scan_bwd_simple<S><<<simple_blocks(s), 128, 0, current_stream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    const at::Tensor uc = u.contiguous(), deltac = delta.contiguous(), Bc = batch_strided_rows(B),
                   Cc = batch_strided_rows(C);
    const at::Tensor zc = contig_or_undef(z), Af = A.to(at::kFloat).contiguous();
    const at::Tensor Df = as_dtype(D, at::kFloat), biasf = as_dtype(delta_bias, at::kFloat);
    const at::Tensor h0 = contig_or_undef(initial_state), rst = contig_or_undef(reset);
    const at::Tensor gy = grad_y.to(u.scalar_type()).contiguous();
    du = at::empty_like(uc), ddelta = at::empty_like(uc);
    if (z) dz = at::empty_like(uc);
    const int G = lanes_for(s.dstate);
    const int64_t nck = (s.seqlen + kTb - 1) / kTb;
    auto ckpt = at::empty({s.batch, nck, s.dim, int64_t(kStates) * G}, f);
    SM_DISPATCH_FAST(u.scalar_type(), "selective_scan_backward_cuda", [&] {
      {
        using T = scalar_t;
        auto p = fast_params<T>(s, uc, deltac, Af, Bc, Cc, Df, zc, biasf, h0, rst, delta_softplus);
        p.ckpt = ckpt.data_ptr<float>();
        p.gy = gy.data_ptr<T>(), p.gfinal = ptr<float>(gfinal);
        p.du = du.data_ptr<T>(), p.ddelta = ddelta.data_ptr<T>(), p.dz = mptr<T>(dz);
        p.aligned = rows_aligned(p);
        launch_fwd<T, true>(p);
        p.dA = dA.data_ptr<float>(), p.dB = dB.data_ptr<float>(), p.dC = dC.data_ptr<float>();
        p.dD = dD.data_ptr<float>(), p.dbias = dbias.data_ptr<float>(), p.dh0 = initial_state ? dh0.data_ptr<float>() : nullptr;
        launch_bwd<T>(p);
      }
    });
  }
  auto like = [](const at::Tensor& g, const at::Tensor& ref) { return g.to(ref.scalar_type()); };
  return {like(du, u),
          like(ddelta, delta),
          like(dA, A),
          like(dB, B),
          like(dC, C),
          D ? like(dD, *D) : at::Tensor(),
          z ? like(dz, *z) : at::Tensor(),
          delta_bias ? like(dbias, *delta_bias) : at::Tensor(),
          initial_state ? like(dh0, *initial_state) : at::Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) {
  m.impl("selective_scan", &selective_scan_cuda);
  m.impl("selective_scan_backward", &selective_scan_backward_cuda);
}

}  // namespace statemamba::ops
