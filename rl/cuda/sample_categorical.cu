#include "ops/cuda/common.cuh"
#include "rl/kernels.h"

namespace statemamba::rl::detail {

namespace {
constexpr unsigned kFull = 0xffffffffu;

// One warp per row: max and sum of exp by warp reductions, then the CDF walked 32 actions at a time
// (a warp prefix sum), stopping at the first block where it passes u * sum.
__global__ void categorical_kernel(const float* __restrict__ logits, int64_t rows, int64_t a_count, int64_t stride,
                                   const float* __restrict__ u, int64_t* __restrict__ actions) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (n >= rows) return;  // whole warps leave together
  const float* row = logits + n * stride;
  float m = -INFINITY;
  for (int64_t a = lane; a < a_count; a += 32) m = fmaxf(m, row[a]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, o));
  float total = 0;
  for (int64_t a = lane; a < a_count; a += 32) total += __expf(row[a] - m);
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(kFull, total, o);
  const float target = u[n] * total;
  float base = 0;
  int64_t chosen = -1, last_possible = 0;
  for (int64_t start = 0; start < a_count; start += 32) {
    const int64_t a = start + lane;
    const float p = a < a_count ? __expf(row[a] - m) : 0.f;
    float cumulative = p;
    for (int o = 1; o < 32; o <<= 1) {
      const float below = __shfl_up_sync(kFull, cumulative, o);
      if (lane >= o) cumulative += below;
    }
    cumulative += base;
    const unsigned possible = __ballot_sync(kFull, p > 0.f);
    if (possible) last_possible = start + 31 - __clz(possible);
    const unsigned passed = __ballot_sync(kFull, a < a_count && cumulative > target);
    if (passed) {
      chosen = start + __ffs(passed) - 1;
      break;
    }
    base = __shfl_sync(kFull, cumulative, 31);
  }
  if (lane == 0) actions[n] = chosen >= 0 ? chosen : last_possible;
}
}  // namespace

void categorical_from_uniform_cuda(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  constexpr int kWarps = 8;
  categorical_kernel<<<ops::cuda::ceil_div(rows, kWarps), kWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), rows, logits.size(1), logits.stride(0), u.data_ptr<float>(),
      actions.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace statemamba::rl::detail
