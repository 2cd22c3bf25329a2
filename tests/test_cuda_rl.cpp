// The rollout stepper's CUDA graph (rl/throughput.h, what `statemamba-rl --mode throughput
// --cuda-graph` times): replaying the captured step k times must do what k eager steps do — advance
// the environments (their random draws included), the recurrent state and its resets — or the
// throughput it reports counts work that never happened.
// GPU only: every test skips where no CUDA GPU is present.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "rl/env.h"
#include "rl/policy.h"
#include "rl/throughput.h"
#include "support/rl_kernel_checks.h"

namespace rl = statemamba::rl;

namespace {

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU: the rollout graph is tested on a GPU machine"

// 24 environments on 2-bit memory with episodes of 7 steps and distractor noise: every few steps
// some environment ends its episode (its state is zeroed) and the env draws random numbers.
rl::RolloutStepper make_stepper(const std::string& controller, bool decode) {
  rl::EnvOptions e;
  e.num_envs = 24, e.num_bits = 2, e.horizon = 5, e.distractors = true;
  torch::manual_seed(4);  // the policy's initialisation
  auto env = rl::make_env(e, torch::Device(torch::kCUDA), 4);
  rl::PolicyOptions p;
  p.controller = controller, p.width = 16, p.d_state = 8;
  auto policy = rl::make_policy(p, env->obs_dim(), env->num_actions());
  return rl::RolloutStepper(std::move(env), policy, 4, decode);
}

}  // namespace

TEST(CudaRlThroughput, GraphReplaysEqualEagerSteps) {
  SKIP_WITHOUT_CUDA();
  for (const std::string controller : {"mamba", "gru"})
    for (bool decode : {false, true}) {
      if (decode && controller == "gru") continue;  // the GRU has one step path
      SCOPED_TRACE(controller + (decode ? ", decode ops" : ", scan ops"));
      rl::RolloutStepper graph = make_stepper(controller, decode);
      rl::RolloutStepper eager = make_stepper(controller, decode);
      graph.capture();  // two eager warm-up steps, then the capture (which runs nothing)
      ASSERT_TRUE(graph.captured());
      for (int i = 0; i < 2; ++i) eager.step();
      int64_t ended_episodes = 0;
      for (int t = 0; t < 20; ++t) {
        graph.step();
        eager.step();
        torch::cuda::synchronize();
        const std::string what = "step " + std::to_string(t + 3);
        // The memory task's observations do not depend on the actions: the environments must
        // match exactly (same kernels, same Philox draws), whatever rounding the policy saw.
        ASSERT_TRUE(at::equal(graph.env().observe(), eager.env().observe())) << what << ": observations";
        ASSERT_TRUE(at::equal(graph.pending_reset(), eager.pending_reset())) << what << ": episodes ended";
        ended_episodes += eager.pending_reset().sum().item<int64_t>();
        const auto& a = graph.state().tensors;
        const auto& b = eager.state().tensors;
        ASSERT_EQ(a.size(), b.size());
        for (size_t i = 0; i < a.size(); ++i) {
          // Dense kernels may pick another algorithm on the capture stream: equal to rounding.
          EXPECT_TRUE(at::allclose(a[i], b[i], 1e-5, 1e-6))
              << what << ": state tensor " << i << " differs by " << (a[i] - b[i]).abs().max().item<double>();
        }
      }
      EXPECT_GT(ended_episodes, 0) << "no episode ended: the resets went untested";
    }
}

// The rollout kernels (rl/kernels.h) on the GPU: the fused memory step against the torch-op step on
// the same CUDA generator, and the categorical sampler against a float64 CDF inversion.
TEST(CudaRlKernels, FusedMemoryStepEqualsTheGenericStep) {
  SKIP_WITHOUT_CUDA();
  statemamba::test::expect_fused_memory_step_equals_generic(torch::Device(torch::kCUDA));
}

TEST(CudaRlKernels, CategoricalSamplingInvertsTheCdf) {
  SKIP_WITHOUT_CUDA();
  statemamba::test::expect_categorical_inverts_the_cdf(torch::Device(torch::kCUDA));
}
