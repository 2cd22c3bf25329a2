#pragma once
// One environment's delayed-memory step, shared by the CPU loop and the CUDA kernel so the two
// cannot drift apart. Internal to rl/cpu and rl/cuda; see delayed_memory_step (rl/kernels.h).
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "rl/kernels.h"

#if defined(__CUDACC__)
#define STATEMAMBA_HOST_DEVICE __host__ __device__
#else
#define STATEMAMBA_HOST_DEVICE
#endif

namespace statemamba::rl::detail {

struct MemoryStepPointers {
  int64_t* phase;
  int64_t* lengths;
  bool* graded;
  float* bits;  // [N, k]
  float* obs;   // [N, k + 2]
  const int64_t* actions;
  const float* fresh;
  const float* noise;  // [N, k] 0/1, or nullptr: no distractors
  float* obs_out;
  float* reward;
  bool *done, *answered, *correct, *graded_out;
};

inline MemoryStepPointers memory_step_pointers(at::Tensor& phase, at::Tensor& lengths, at::Tensor& graded,
                                               at::Tensor& bits, at::Tensor& obs, const at::Tensor& actions,
                                               const at::Tensor& fresh, const at::Tensor& noise, MemoryStepOut& out) {
  return {phase.data_ptr<int64_t>(),
          lengths.data_ptr<int64_t>(),
          graded.data_ptr<bool>(),
          bits.data_ptr<float>(),
          obs.data_ptr<float>(),
          actions.data_ptr<int64_t>(),
          fresh.data_ptr<float>(),
          noise.defined() ? noise.data_ptr<float>() : nullptr,
          out.obs.data_ptr<float>(),
          out.reward.data_ptr<float>(),
          out.done.data_ptr<bool>(),
          out.answered.data_ptr<bool>(),
          out.correct.data_ptr<bool>(),
          out.graded.data_ptr<bool>()};
}

STATEMAMBA_HOST_DEVICE inline void memory_step_row(const MemoryStepPointers& p, int64_t n, int64_t k, int64_t next_length) {
  const int64_t phase = p.phase[n], length = p.lengths[n];
  const bool was_graded = p.graded[n];
  float* bits = p.bits + n * k;
  // Grade the action taken at the current phase: only the query step's, against sum_i bit_i 2^i.
  // The reward comes even in the first, partial episode; grading counts only seen episodes.
  const bool query = phase == length - 1;
  int64_t answer = 0;
  for (int64_t i = 0; i < k; ++i)
    if (bits[i] > 0.5f) answer |= int64_t{1} << i;
  const bool right = query && p.actions[n] == answer;
  p.reward[n] = right ? 1.f : 0.f;
  p.answered[n] = query && was_graded;
  p.correct[n] = right && was_graded;
  p.graded_out[n] = was_graded;
  // Move on; an ended episode restarts with fresh bits, and the next one is graded.
  const bool ends = phase + 1 == length;
  const int64_t next = ends ? 0 : phase + 1;
  p.phase[n] = next;
  if (ends) p.lengths[n] = next_length;
  p.graded[n] = was_graded || ends;
  p.done[n] = ends;
  if (ends)
    for (int64_t i = 0; i < k; ++i) bits[i] = p.fresh[n * k + i];
  // Observe: the bits as +-1 at the first step, nothing (or the noise) in the delay, then flags.
  const bool first = next == 0, ask = next == p.lengths[n] - 1;
  float* obs = p.obs + n * (k + 2);
  float* obs_out = p.obs_out + n * (k + 2);
  for (int64_t i = 0; i < k; ++i) {
    float signal = first ? 2.f * bits[i] - 1.f : 0.f;
    if (p.noise && !first && !ask) signal = 2.f * p.noise[n * k + i] - 1.f;
    obs[i] = obs_out[i] = signal;
  }
  obs[k] = obs_out[k] = first ? 1.f : 0.f;
  obs[k + 1] = obs_out[k + 1] = ask ? 1.f : 0.f;
}

}  // namespace statemamba::rl::detail
