// CUDA kernels for add_rms_norm (ops/norm_row.h holds the arithmetic and the summation order).
//   row-major rows: a warp per row, lane j owning channels j, j+32, ... (the order's partial j);
//     rows of up to 1024 channels stay in registers between the two passes.
//   channel-major [B, C, L] memory: a thread per row (position), consecutive threads on
//     consecutive positions, so every load and store is coalesced; the prefill layout.
#include <torch/library.h>

#include "ops/args.h"
#include "ops/cuda/common.cuh"
#include "ops/norm_row.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kRowsPerBlock = 4;  // warps per block, row-major kernel
constexpr int kHeld = 32;         // channels per lane kept in registers (C <= 1024)

template <typename S>
__global__ void norm_rows_warp_kernel(const NormRow a) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.rows) return;  // uniform over the warp
  const int64_t C = a.channels;
  const bool held = C <= int64_t(kNormLanes) * kHeld;
  S v[kHeld];
  S p = S(0);
  if (held) {
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      const int64_t c = lane + int64_t(k) * kNormLanes;
      if (c < C) v[k] = a.sum_at<S>(a.offset(row, c));
    }
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      const int64_t c = lane + int64_t(k) * kNormLanes;
      if (c < C) {
        store_as(a.residual_out, a.offset(row, c), a.residual_out_dt, v[k]);
        v[k] = round_to(a.weight_dt, v[k]);
        p = p + v[k] * v[k];
      }
    }
  } else {
    for (int64_t c = lane; c < C; c += kNormLanes) {
      const S r = a.sum_at<S>(a.offset(row, c));
      store_as(a.residual_out, a.offset(row, c), a.residual_out_dt, r);
      const S x = round_to(a.weight_dt, r);
      p = p + x * x;
    }
  }
  for (int s = kNormLanes / 2; s >= 1; s /= 2) p = p + __shfl_xor_sync(0xffffffffu, p, s);
  const S inv = inverse_rms(a, p);
  if (held) {
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      const int64_t c = lane + int64_t(k) * kNormLanes;
      if (c < C)
        store_as(a.normed, a.offset(row, c), a.weight_dt, v[k] * inv * load_as<S>(a.weight, c, a.weight_dt));
    }
  } else {
    for (int64_t c = lane; c < C; c += kNormLanes) {
      const S x = round_to(a.weight_dt, a.sum_at<S>(a.offset(row, c)));
      store_as(a.normed, a.offset(row, c), a.weight_dt, x * inv * load_as<S>(a.weight, c, a.weight_dt));
    }
  }
}

template <typename S>
__global__ void norm_positions_kernel(const NormRow a) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < a.rows) norm_row_serial<S>(a, row);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, double eps,
                                                     std::optional<at::ScalarType> residual_dtype) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const NormIO io = prepare_add_rms_norm(hidden, residual, weight, eps, residual_dtype);
  const NormRow a = make_norm_row(io, eps);
  if (io.channel_major) {
    if (io.use_double) norm_positions_kernel<double><<<ceil_div(io.rows, 128), 128, 0, current_stream()>>>(a);
    else norm_positions_kernel<float><<<ceil_div(io.rows, 128), 128, 0, current_stream()>>>(a);
  } else {
    const int blocks = ceil_div(io.rows, kRowsPerBlock);
    if (io.use_double) norm_rows_warp_kernel<double><<<blocks, 32 * kRowsPerBlock, 0, current_stream()>>>(a);
    else norm_rows_warp_kernel<float><<<blocks, 32 * kRowsPerBlock, 0, current_stream()>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {io.normed, io.residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("add_rms_norm", &add_rms_norm_cuda); }

}  // namespace statemamba::ops
