// CUDA kernel of small_batch_linear: y[b, n] = Σ_k x[b, k]·w[n, k] + bias[n] for one or two rows b.
// At these batch sizes the product is bound by reading the weight once, but GEMM libraries tile
// for large batches and launch too few blocks to keep HBM busy (cuBLAS: about 6 µs for the
// 768 × 3072 bf16 in_proj at batch 1, whose 4.7 MB take 1.6 µs at 3 TB/s). Here a warp owns an
// output feature n: its lanes issue all their 16-byte loads of weight row n before using any, and
// x (a few KB, shared by every warp) comes through L1. Each lane adds its products in k order and
// the warp adds its lanes as a fixed tree, so the result is deterministic; it differs from
// at::linear's only in summation order (float32 accumulation in both).
#include <torch/library.h>

#include <ATen/ops/linear.h>

#include "ops/args.h"
#include "ops/cuda/common.cuh"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kWarps = 4;           // output features per block
constexpr int kUnroll = 8;          // 16-byte weight loads in flight per lane
// Larger batches: at::linear. Each row re-reads x for every weight vector, which at 16 rows made
// the in_proj GEMV 3x slower than cuBLAS (H100); at 1 row it is faster.
constexpr int kMaxRows = 2;

template <typename T, int kRows>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y,
                int batch, int N, int K, bool vec) {
  const int lane = threadIdx.x % 32, n = blockIdx.x * kWarps + threadIdx.x / 32;
  if (n >= N) return;  // a whole warp leaves together
  const float b = bias ? to<float>(bias[n]) : 0.f;
  const T* wn = w + int64_t(n) * K;
  float acc[kRows] = {};
  if (vec) {  // rows of x and w 16-byte aligned, K a multiple of the vector width
    constexpr int V = 16 / sizeof(T);
    const int nv = K / V;
    for (int v0 = 0; v0 < nv; v0 += 32 * kUnroll) {
      uint4 wv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * 32 + lane;
        wv[u] = v < nv ? __ldg(reinterpret_cast<const uint4*>(wn) + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * 32 + lane;
        if (v >= nv) break;
        T wt[V];
        memcpy(wt, &wv[u], 16);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= batch) break;
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + int64_t(r) * K) + v);
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
        if (r < batch) acc[r] = fmaf(wk, to<float>(x[int64_t(r) * K + k]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < batch) y[int64_t(r) * N + n] = T(acc[r] + b);
  }
}

template <typename T, int kRows>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& y, const LinearDims& s) {
  const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
  const bool vec = (s.in_features * int64_t(sizeof(T))) % 16 == 0 && aligned16(xp) && aligned16(wp);
  gemv_kernel<T, kRows><<<ceil_div(s.out_features, kWarps), kWarps * 32, 0, current_stream()>>>(
      xp, wp, ptr<T>(bias), y.data_ptr<T>(), int(s.batch), int(s.out_features), int(s.in_features), vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor small_batch_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const LinearDims s = check_small_batch_linear_args(x, weight, bias);
  const auto t = x.scalar_type();
  if (t == at::kDouble || s.batch == 0 || s.batch > kMaxRows || s.out_features == 0 || s.in_features == 0 ||
      s.out_features > (int64_t(1) << 30) || s.in_features > (int64_t(1) << 30))
    return at::linear(x, weight, bias);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), bc = contig_or_undef(bias);
  at::Tensor y = at::empty({s.batch, s.out_features}, x.options());
  SM_DISPATCH_FAST(t, "small_batch_linear_cuda", [&] {
    using T = scalar_t;
    if (s.batch == 1) launch<T, 1>(xc, wc, bc, y, s);
    else launch<T, 2>(xc, wc, bc, y, s);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("small_batch_linear", &small_batch_linear_cuda); }

}  // namespace statemamba::ops
