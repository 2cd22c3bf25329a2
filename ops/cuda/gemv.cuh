#pragma once
// The GEMV at the heart of small_batch_linear, shared with add_rms_norm_linear (whose x is normalised
// into shared memory first), so that both give the same bits. A warp owns an output feature n: its
// lanes issue all their 16-byte loads of weight row n before using any, and x (a few KB, shared by
// every warp) comes through L1 or shared memory. Each lane adds its products in k order and the warp
// adds its lanes as a fixed tree, so the result is deterministic; it differs from at::linear's only
// in summation order (float32 accumulation in both). Internal: not installed.
#include "ops/cuda/common.cuh"

namespace statemamba::ops::cuda {

constexpr int kGemvUnroll = 8;  // 16-byte weight loads in flight per lane

// Row n of y for rows r < rows of x ([rows, K], row stride K), summed over the warp: every lane
// returns the totals. vec: rows of x and w 16-byte aligned and K a multiple of the vector width
// (the same choice must be made wherever the same bits are wanted: it sets the summation order).
// kSharedX: x lies in shared memory (plain loads) rather than global memory (read-only loads).
template <typename T, int kRows, bool kSharedX>
__device__ __forceinline__ void gemv_warp(const T* __restrict__ wn, const T* __restrict__ x, int rows, int K,
                                          bool vec, int lane, float (&acc)[kRows]) {
  auto x16 = [&](int r, int v) {
    const uint4* p = reinterpret_cast<const uint4*>(x + int64_t(r) * K) + v;
    if constexpr (kSharedX) return *p;
    else return __ldg(p);
  };
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    const int nv = K / V;
    for (int v0 = 0; v0 < nv; v0 += 32 * kGemvUnroll) {
      uint4 wv[kGemvUnroll];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int v = v0 + u * 32 + lane;
        wv[u] = v < nv ? __ldg(reinterpret_cast<const uint4*>(wn) + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int v = v0 + u * 32 + lane;
        if (v >= nv) break;
        T wt[V];
        memcpy(wt, &wv[u], 16);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= rows) break;
          const uint4 xv = x16(r, v);
          T xt[V];
          memcpy(xt, &xv, 16);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[r] = fmaf(to<float>(wt[i]), to<float>(xt[i]), acc[r]);
        }
      }
    }
  } else {
    for (int k = lane; k < K; k += 32) {
      const float wk = to<float>(wn[k]);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) acc[r] = fmaf(wk, to<float>(x[int64_t(r) * K + k]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
}

// Lane 0 writes y[r, n] = acc[r] + bias[n] for r < rows (y of row stride N).
template <typename T, int kRows>
__device__ __forceinline__ void gemv_store(const float (&acc)[kRows], const T* bias, T* y, int rows, int N, int n,
                                           int lane) {
  if (lane != 0) return;
  const float b = bias ? to<float>(bias[n]) : 0.f;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    if (r < rows) y[int64_t(r) * N + n] = T(acc[r] + b);
}

}  // namespace statemamba::ops::cuda
