// CUDA kernel of small_batch_linear: y[b, n] = Σ_k x[b, k]·w[n, k] + bias[n] for one or two rows b.
// At these batch sizes the product is bound by reading the weight once, but GEMM libraries tile
// for large batches and launch too few blocks to keep HBM busy (cuBLAS: about 6 µs for the
// 768 × 3072 bf16 in_proj at batch 1, whose 4.7 MB take 1.6 µs at 3 TB/s). The GEMV itself, a
// warp per output feature, is in gemv.cuh.
#include <torch/library.h>

#include <ATen/ops/linear.h>

#include "ops/args.h"
#include "ops/cuda/gemv.cuh"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kWarps = 4;           // output features per block
// Larger batches: at::linear. Each row re-reads x for every weight vector, which at 16 rows made
// the in_proj GEMV 3x slower than cuBLAS (H100); at 1 row it is faster.
constexpr int kMaxRows = 2;

template <typename T, int kRows>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y,
                int batch, int N, int K, bool vec) {
  const int lane = threadIdx.x % 32, n = blockIdx.x * kWarps + threadIdx.x / 32;
  const T* wn = w + int64_t(n) * K;
  // Launched overlapped: weight row n travels to L2 while the kernel producing x still runs.
  if (n < N) prefetch_l2_range(wn, int64_t(K) * sizeof(T), lane, 32);
  wait_for_previous_kernel();
  allow_next_kernel();
  if (n >= N) return;  // a whole warp leaves together
  float acc[kRows];
  gemv_warp<T, kRows, /*kSharedX=*/false>(wn, x, batch, K, vec, lane, acc);
  gemv_store<T, kRows>(acc, bias, y, batch, N, n, lane);
}

template <typename T, int kRows>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& y, const LinearDims& s) {
  const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
  const bool vec = (s.in_features * int64_t(sizeof(T))) % 16 == 0 && aligned16(xp) && aligned16(wp);
  launch_overlapped(gemv_kernel<T, kRows>, dim3(ceil_div(s.out_features, kWarps)), dim3(kWarps * 32), 0,
                    current_stream(), xp, wp, ptr<T>(bias), y.data_ptr<T>(), int(s.batch), int(s.out_features),
                    int(s.in_features), vec);
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
