// CUDA kernels for add_rms_norm (ops/norm_row.h holds the arithmetic and the summation order:
// partial j sums channels j, j+32, ... in order with fused multiply-adds, then the partials
// combine as a warp's xor butterfly). Both kernels keep that order, so they agree bit for bit.
//   row-major rows (decode): a block per row, a thread per channel; the channels' values meet in
//     shared memory, where warp 0 takes the partial sums (lane j = partial j).
//   channel-major [B, C, L] memory (prefill): a block per 32 positions, thread (x, y) summing
//     partial y of position x; consecutive x are consecutive addresses, so accesses coalesce.
#include <torch/library.h>

#include "ops/args.h"
#include "ops/cuda/common.cuh"
#include "ops/norm_row.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kMaxSharedBytes = 48 * 1024;  // the row kernel's [C] values, without an opt-in

template <typename S>
__global__ void norm_rows_kernel(const NormRow a) {
  extern __shared__ __align__(16) unsigned char smem[];
  S* xs = reinterpret_cast<S*>(smem);  // [C]: the normalised row's inputs, in weight's dtype
  __shared__ S s_inv;
  const int64_t row = blockIdx.x, C = a.channels;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t o = a.offset(row, c);
    const S r = a.sum_at<S>(o);
    store_as(a.residual_out, o, a.residual_out_dt, r);
    xs[c] = round_to(a.weight_dt, r);
  }
  __syncthreads();
  if (threadIdx.x < kNormLanes) {
    S p = S(0);
    for (int64_t c = threadIdx.x; c < C; c += kNormLanes) p = fma(xs[c], xs[c], p);
    for (int s = kNormLanes / 2; s >= 1; s /= 2) p = p + __shfl_xor_sync(0xffffffffu, p, s);
    if (threadIdx.x == 0) s_inv = inverse_rms(a, p);
  }
  __syncthreads();
  const S inv = s_inv;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    store_as(a.normed, a.offset(row, c), a.weight_dt, xs[c] * inv * load_as<S>(a.weight, c, a.weight_dt));
}

template <typename S>
__global__ void norm_positions_kernel(const NormRow a) {
  __shared__ S part[kNormLanes][kNormLanes + 1];  // [partial][position]
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t row = int64_t(blockIdx.x) * kNormLanes + x, C = a.channels;
  const bool active = row < a.rows;
  S p = S(0);
  if (active)
    for (int64_t c = y; c < C; c += kNormLanes) {
      const int64_t o = a.offset(row, c);
      const S r = a.sum_at<S>(o);
      store_as(a.residual_out, o, a.residual_out_dt, r);
      const S v = round_to(a.weight_dt, r);
      p = fma(v, v, p);
    }
  part[y][x] = p;
  __syncthreads();
  if (y == 0) {
    S q[kNormLanes];
#pragma unroll
    for (int j = 0; j < kNormLanes; ++j) q[j] = part[j][x];
    part[0][x] = inverse_rms(a, butterfly_total(q));
  }
  __syncthreads();
  const S inv = part[0][x];
  if (active)
    for (int64_t c = y; c < C; c += kNormLanes) {
      const int64_t o = a.offset(row, c);
      const S v = round_to(a.weight_dt, a.sum_at<S>(o));
      store_as(a.normed, o, a.weight_dt, v * inv * load_as<S>(a.weight, c, a.weight_dt));
    }
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, double eps,
                                                     std::optional<at::ScalarType> residual_dtype) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const NormIO io = prepare_add_rms_norm(hidden, residual, weight, eps, residual_dtype);
  const NormRow a = make_norm_row(io, eps);
  const size_t elem = io.use_double ? sizeof(double) : sizeof(float);
  if (io.channel_major) {
    const dim3 block(kNormLanes, kNormLanes);
    const int blocks = ceil_div(io.rows, kNormLanes);
    if (io.use_double) norm_positions_kernel<double><<<blocks, block, 0, current_stream()>>>(a);
    else norm_positions_kernel<float><<<blocks, block, 0, current_stream()>>>(a);
  } else {
    TORCH_CHECK(io.channels * elem <= kMaxSharedBytes, "add_rms_norm: the CUDA kernel takes rows of up to ",
                kMaxSharedBytes / elem, " channels in this dtype, got ", io.channels);
    const int threads = int(std::min<int64_t>(1024, (io.channels + 31) / 32 * 32));
    const size_t shared = io.channels * elem;
    if (io.use_double) norm_rows_kernel<double><<<io.rows, threads, shared, current_stream()>>>(a);
    else norm_rows_kernel<float><<<io.rows, threads, shared, current_stream()>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {io.normed, io.residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("add_rms_norm", &add_rms_norm_cuda); }

}  // namespace statemamba::ops
