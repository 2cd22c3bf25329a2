#include <ATen/Parallel.h>

#include "rl/kernels.h"
#include "rl/memory_step_row.h"

namespace statemamba::rl::detail {

void delayed_memory_step_cpu(at::Tensor& phase, at::Tensor& lengths, at::Tensor& graded, at::Tensor& bits, at::Tensor& obs,
                             const at::Tensor& actions, const at::Tensor& fresh, const at::Tensor& noise,
                             int64_t next_length, MemoryStepOut& out) {
  const MemoryStepPointers p = memory_step_pointers(phase, lengths, graded, bits, obs, actions, fresh, noise, out);
  const int64_t k = bits.size(1);
  at::parallel_for(0, phase.size(0), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) memory_step_row(p, n, k, next_length);
  });
}

}  // namespace statemamba::rl::detail
