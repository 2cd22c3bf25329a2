// CUDA kernel of add_rms_norm_linear at one or two rows: every block normalises the rows into
// shared memory (add_rms_norm's row arithmetic and summation order, ops/norm_row.h), then its warps
// run small_batch_linear's GEMV (gemv.cuh) on them, one output feature each; block 0 also writes
// the residual stream. The rows are a few KB, so recomputing them per block costs far less than the
// separate norm launch it replaces, and the bits equal the two ops'. Other inputs: the two ops.
#include <torch/library.h>

#include "ops/add_rms_norm_linear.h"
#include "ops/args.h"
#include "ops/cuda/gemv.cuh"
#include "ops/norm_row.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kWarps = 8;  // output features per block
constexpr int kMaxRows = 2;
constexpr int kMaxSharedBytes = 48 * 1024;

template <typename T, int kRows>
__global__ void __launch_bounds__(kWarps * 32)
    norm_gemv_kernel(const NormRow a, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y, int N,
                     bool vec) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float inv_rms[kRows];
  const int K = int(a.channels), rows = int(a.rows);
  float* xs = reinterpret_cast<float*>(smem);   // [rows][K]: hidden + residual, rounded to normed's dtype
  T* xn = reinterpret_cast<T*>(xs + kRows * K);  // [rows][K]: normed, in T
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n = blockIdx.x * kWarps + warp;
  const T* wn = w + int64_t(n) * K;
  // Launched overlapped: weight row n travels to L2 while the kernel producing hidden still runs.
  if (n < N) prefetch_l2_range(wn, int64_t(K) * sizeof(T), lane, 32);
  wait_for_previous_kernel();
  allow_next_kernel();
  for (int e = tid; e < rows * K; e += blockDim.x) {
    const float r = a.sum_at<float>(e);  // row-major rows: element e is (e / K, e % K)
    if (blockIdx.x == 0) store_as(a.residual_out, e, a.residual_out_dt, r);
    xs[e] = round_to(a.weight_dt, r);
  }
  __syncthreads();
  if (warp < rows) {  // warp r sums row r's squares as add_rms_norm's row kernel does
    float p = 0.f;
    for (int c = lane; c < K; c += kNormLanes) p = fmaf(xs[warp * K + c], xs[warp * K + c], p);
    for (int s = kNormLanes / 2; s >= 1; s /= 2) p = p + __shfl_xor_sync(0xffffffffu, p, s);
    if (lane == 0) inv_rms[warp] = inverse_rms(a, p);
  }
  __syncthreads();
  for (int e = tid; e < rows * K; e += blockDim.x)
    xn[e] = T(xs[e] * inv_rms[e / K] * load_as<float>(a.weight, e % K, a.weight_dt));
  __syncthreads();
  if (n >= N) return;
  float acc[kRows];
  gemv_warp<T, kRows, /*kSharedX=*/true>(wn, xn, rows, K, vec, lane, acc);
  gemv_store<T, kRows>(acc, bias, y, rows, N, n, lane);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cuda(const at::Tensor& hidden,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& norm_weight, double eps,
                                                            std::optional<at::ScalarType> residual_dtype,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias) {
  NormIO io = check_add_rms_norm_linear_args(hidden, residual, norm_weight, eps, residual_dtype, weight, bias);
  const auto t = weight.scalar_type();
  const int64_t B = io.rows, C = io.channels, N = weight.size(0);
  const int64_t smem = kMaxRows * C * int64_t(sizeof(float) + c10::elementSize(t));
  if (io.use_double || t == at::kDouble || B > kMaxRows || N == 0 || N > (int64_t(1) << 30) || smem > kMaxSharedBytes)
    return add_rms_norm_linear_unfused(hidden, residual, norm_weight, eps, residual_dtype, weight, bias);
  c10::cuda::CUDAGuard guard(hidden.device());
  io.residual_out = at::empty({B, C}, hidden.options().dtype(residual_dtype.value_or(io.promoted)));
  io.normed = io.residual_out;  // never written here: the normalised rows stay in shared memory
  const NormRow a = make_norm_row(io, eps);
  const at::Tensor w = weight.contiguous(), b = contig_or_undef(bias);
  at::Tensor y = at::empty({B, N}, hidden.options().dtype(t));
  SM_DISPATCH_FAST(t, "add_rms_norm_linear_cuda", [&] {
    using T = scalar_t;
    // small_batch_linear's choice for a freshly allocated (aligned) x: the same summation order.
    const bool vec = (C * int64_t(sizeof(T))) % 16 == 0 && aligned16(w.data_ptr<T>());
    const dim3 grid(ceil_div(N, kWarps)), block(kWarps * 32);
    if (B == 1)
      launch_overlapped(norm_gemv_kernel<T, 1>, grid, block, size_t(smem), current_stream(), a, w.data_ptr<T>(),
                        ptr<T>(b), y.data_ptr<T>(), int(N), vec);
    else
      launch_overlapped(norm_gemv_kernel<T, 2>, grid, block, size_t(smem), current_stream(), a, w.data_ptr<T>(),
                        ptr<T>(b), y.data_ptr<T>(), int(N), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, io.residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("add_rms_norm_linear", &add_rms_norm_linear_cuda); }

}  // namespace statemamba::ops
