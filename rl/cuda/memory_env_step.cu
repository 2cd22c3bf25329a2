#include "ops/cuda/common.cuh"
#include "rl/kernels.h"
#include "rl/memory_step_row.h"

namespace statemamba::rl::detail {

namespace {
__global__ void memory_step_kernel(MemoryStepPointers p, int64_t num_envs, int64_t k, int64_t next_length) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < num_envs) memory_step_row(p, n, k, next_length);
}
}  // namespace

void delayed_memory_step_cuda(at::Tensor& phase, at::Tensor& lengths, at::Tensor& graded, at::Tensor& bits, at::Tensor& obs,
                              const at::Tensor& actions, const at::Tensor& fresh, const at::Tensor& noise,
                              int64_t next_length, MemoryStepOut& out) {
  const c10::cuda::CUDAGuard guard(phase.device());
  const MemoryStepPointers p = memory_step_pointers(phase, lengths, graded, bits, obs, actions, fresh, noise, out);
  const int64_t n = phase.size(0);
  constexpr int kThreads = 256;
  memory_step_kernel<<<ops::cuda::ceil_div(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, n, bits.size(1), next_length);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace statemamba::rl::detail
