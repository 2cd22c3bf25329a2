#pragma once
// The rollout's per-step work as single passes over the environments: one kernel each on CUDA, one
// loop each on the CPU. Written as torch ops, the delayed-memory step and the action sampling were
// ~35 tiny kernels per step, which bounded rollout throughput (a CUDA graph removes the launches,
// not the kernels). rl/env.cpp and rl/ppo.cpp call these; tests compare them with the torch-op
// versions they replace.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace statemamba::rl {

// One step of the delayed-memory task for every environment. In place: phase (int64 [N]), lengths
// (int64 [N]: each episode's; an episode that starts gets next_length), graded (bool [N]), bits
// (float [N, k], 0/1) and obs (float [N, k + 2]). Reads actions (int64 [N]),
// fresh (float [N, k]: the bits of episodes that start now) and, with distractors, noise (float
// [N, k], 0/1: the delay's bit channels are 2 noise - 1). Semantics: DelayedMemoryEnv (rl/env.h).
struct MemoryStepOut {
  at::Tensor obs, reward, done, answered, correct, graded;  // as EnvStep's
};
MemoryStepOut delayed_memory_step(at::Tensor& phase, at::Tensor& lengths, at::Tensor& graded, at::Tensor& bits, at::Tensor& obs,
                                  const at::Tensor& actions, const at::Tensor& fresh, const at::Tensor& noise,
                                  int64_t next_length);

// One action per row of logits [N, A] (float), drawn from softmax(logits) by inverting its CDF at
// u[n] (float [N], in [0, 1)): the first a whose cumulative probability exceeds u[n]. int64 [N].
at::Tensor categorical_from_uniform(const at::Tensor& logits, const at::Tensor& u);

namespace detail {
void delayed_memory_step_cpu(at::Tensor& phase, at::Tensor& lengths, at::Tensor& graded, at::Tensor& bits, at::Tensor& obs,
                             const at::Tensor& actions, const at::Tensor& fresh, const at::Tensor& noise,
                             int64_t next_length, MemoryStepOut& out);
void categorical_from_uniform_cpu(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions);
#ifdef STATEMAMBA_WITH_CUDA
void delayed_memory_step_cuda(at::Tensor& phase, at::Tensor& lengths, at::Tensor& graded, at::Tensor& bits, at::Tensor& obs,
                              const at::Tensor& actions, const at::Tensor& fresh, const at::Tensor& noise,
                              int64_t next_length, MemoryStepOut& out);
void categorical_from_uniform_cuda(const at::Tensor& logits, const at::Tensor& u, at::Tensor& actions);
#endif
}  // namespace detail

}  // namespace statemamba::rl
