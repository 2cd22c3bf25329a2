#pragma once
// Checks of the rollout kernels (rl/kernels.h) against the torch-op code they replace, run on the
// CPU by test_rl and on a GPU by test_cuda_rl.
#include <c10/core/Device.h>

namespace statemamba::test {

// A DelayedMemoryEnv's fused step against EpisodicEnv::step on a twin env (same seed): every
// output and every piece of env state equal, bit for bit, over several episodes, with and without
// distractors, delays 0 to 9 changed halfway (set_delay), some actions right, some episodes graded.
void expect_fused_memory_step_equals_generic(c10::Device device);

// categorical_from_uniform against a float64 inversion of softmax's CDF at the same u: the same
// action unless u lies within 1e-5 (relative) of a CDF boundary; peaked, flat, -inf, large and
// one-action rows; A up to 100 (several 32-wide blocks on CUDA); strided rows.
void expect_categorical_inverts_the_cdf(c10::Device device);

}  // namespace statemamba::test
