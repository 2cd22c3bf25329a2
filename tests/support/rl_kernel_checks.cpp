#include "support/rl_kernel_checks.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "rl/env.h"
#include "rl/kernels.h"

namespace statemamba::test {

namespace rl = statemamba::rl;

void expect_fused_memory_step_equals_generic(c10::Device device) {
  for (const bool distractors : {false, true})
    for (const int64_t delay : {0, 1, 4, 9}) {
      SCOPED_TRACE("distractors " + std::to_string(distractors) + ", delay " + std::to_string(delay));
      const int64_t N = 37, k = 3;
      // A curriculum from `delay` towards delay + 3.
      rl::DelayedMemoryEnv fused(N, k, delay + 3, distractors, device, 11, delay),
          generic(N, k, delay + 3, distractors, device, 11, delay);
      at::Generator action_gen = rl::make_generator(device, 5);
      for (int64_t t = 0; t < 6 * (delay + 2) + 10; ++t) {
        // A curriculum's change of delay halfway: new episodes get it, those under way keep theirs.
        if (t == 3 * (delay + 2)) fused.set_delay(delay + 3), generic.set_delay(delay + 3);
        // A third of the rows answer right; the rest at random.
        const at::Tensor random = at::randint(8, {N}, action_gen, at::TensorOptions(device).dtype(at::kLong));
        const at::Tensor right = at::arange(N, at::TensorOptions(device).dtype(at::kLong)) % 3 == 0;
        const at::Tensor actions = at::where(right, generic.answer(), random);
        const rl::EnvStep a = fused.step(actions), b = generic.rl::EpisodicEnv::step(actions);
        ASSERT_TRUE(at::equal(a.obs, b.obs)) << "step " << t;
        ASSERT_TRUE(at::equal(a.reward, b.reward)) << "step " << t;
        ASSERT_TRUE(at::equal(a.done, b.done)) << "step " << t;
        ASSERT_TRUE(at::equal(a.answered, b.answered)) << "step " << t;
        ASSERT_TRUE(at::equal(a.correct, b.correct)) << "step " << t;
        ASSERT_TRUE(at::equal(a.graded, b.graded)) << "step " << t;
        ASSERT_TRUE(at::equal(fused.phase(), generic.phase())) << "step " << t;
        ASSERT_TRUE(at::equal(fused.bits(), generic.bits())) << "step " << t;
        ASSERT_TRUE(at::equal(fused.lengths(), generic.lengths())) << "step " << t;
        ASSERT_TRUE(at::equal(fused.observe(), generic.observe())) << "step " << t;
        ASSERT_TRUE(at::equal(fused.observe(), a.obs)) << "the returned obs is the env's current one";
        // The generators moved on alike: the next draws agree.
        ASSERT_TRUE(at::equal(fused.generator().get_state(), generic.generator().get_state())) << "step " << t;
      }
    }
}

void expect_categorical_inverts_the_cdf(c10::Device device) {
  torch::manual_seed(3);
  const double inf = std::numeric_limits<double>::infinity();
  for (const int64_t A : {1, 2, 16, 33, 100}) {
    SCOPED_TRACE("A = " + std::to_string(A));
    const int64_t N = 400;
    at::Tensor logits = at::randn({N, A + 3}, at::kDouble) * 3;
    logits.slice(0, 0, 50).mul_(20);                 // peaked rows
    logits.slice(0, 50, 100).zero_();                // flat rows
    logits.slice(0, 100, 150).add_(80);              // large values (softmax must shift by the max)
    if (A > 1) logits.slice(0, 150, 200).select(1, 0).fill_(-inf);  // impossible first action
    logits = logits.slice(1, 1, A + 1);              // rows strided by A + 3
    at::Tensor u = at::rand({N}, at::kDouble);
    u.slice(0, 200, 210).fill_(0);
    u.slice(0, 210, 220).fill_(1 - 1e-7);
    const at::Tensor u32 = u.to(at::kFloat), logits32 = logits.to(at::kFloat);
    const at::Tensor actions =
        rl::categorical_from_uniform(logits32.to(device), u32.to(device)).cpu();
    ASSERT_EQ(actions.scalar_type(), at::kLong);
    // float64 reference from the float32 inputs the kernel saw.
    const at::Tensor p = at::softmax(logits32.to(at::kDouble), 1), cdf = p.cumsum(1);
    const at::Tensor uu = u32.to(at::kDouble);
    int64_t near_boundary = 0;
    for (int64_t n = 0; n < N; ++n) {
      int64_t expected = A - 1;
      for (int64_t a = 0; a < A; ++a)
        if (cdf[n][a].item<double>() > uu[n].item<double>()) {
          expected = a;
          break;
        }
      while (p[n][expected].item<double>() == 0 && expected > 0) --expected;  // never an impossible action
      const int64_t got = actions[n].item<int64_t>();
      ASSERT_GE(got, 0);
      ASSERT_LT(got, A);
      EXPECT_GT(p[n][got].item<double>(), 0) << "row " << n << " drew an impossible action";
      if (got != expected) {
        const double boundary = cdf[n][std::min(got, expected)].item<double>();
        ++near_boundary;
        EXPECT_LT(std::abs(boundary - uu[n].item<double>()), 1e-5) << "row " << n << ": " << got << " vs " << expected;
      }
    }
    EXPECT_LE(near_boundary, 2);
  }
}

}  // namespace statemamba::test
