// PPO's rollout as a CUDA graph (PPOOptions::cuda_graph_rollout): the chunks it collects equal the
// eager rollout's, the update's stepwise replay reproduces them bit for bit, and a run saved and
// resumed (its graph dropped at the load and captured again) ends as an uninterrupted one.
// GPU only: every test skips where no CUDA GPU is present.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "rl/env.h"
#include "rl/policy.h"
#include "rl/ppo.h"
#include "support/tmpdir.h"

namespace rl = statemamba::rl;
using statemamba::test::TempDir;

namespace {

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU: PPO's rollout graph is tested on a GPU machine"

const std::vector<std::string> kControllers = {"mamba", "gru"};

// 12 environments in 2 minibatches on 2-bit memory with episodes of 7 steps: every 24-step chunk
// holds episode boundaries at staggered places.
rl::PPOTrainer make_trainer(const std::string& controller, bool graph, bool stepwise = true, uint64_t seed = 3) {
  rl::EnvOptions e;
  e.num_envs = 12, e.num_bits = 2, e.horizon = 5;
  torch::manual_seed(seed);  // the policy's initialisation
  auto env = rl::make_env(e, torch::Device(torch::kCUDA), seed);
  rl::PolicyOptions p;
  p.controller = controller, p.width = 16, p.d_state = 8;
  auto policy = rl::make_policy(p, env->obs_dim(), env->num_actions());
  rl::PPOOptions o;
  o.rollout_len = 24, o.minibatches = 2, o.epochs = 2, o.grad_chunks = 2, o.seed = seed;
  o.stepwise_replay = stepwise;
  o.cuda_graph_rollout = graph;
  return rl::PPOTrainer(std::move(env), policy, o);
}

void expect_equal(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  ASSERT_TRUE(a.defined() && b.defined()) << what;
  EXPECT_EQ(a.scalar_type(), b.scalar_type()) << what;
  EXPECT_EQ(a.sizes(), b.sizes()) << what;
  if (a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes()) EXPECT_TRUE(at::equal(a, b)) << what;
}

void expect_same_chunk(const rl::Rollout& a, const rl::Rollout& b, const std::string& what) {
  const std::vector<std::pair<const char*, std::pair<at::Tensor, at::Tensor>>> fields = {
      {"obs", {a.obs, b.obs}},           {"resets", {a.resets, b.resets}},       {"logits", {a.logits, b.logits}},
      {"values", {a.values, b.values}},  {"actions", {a.actions, b.actions}},    {"rewards", {a.rewards, b.rewards}},
      {"dones", {a.dones, b.dones}},     {"answered", {a.answered, b.answered}}, {"correct", {a.correct, b.correct}},
      {"graded", {a.graded, b.graded}},  {"last_values", {a.last_values, b.last_values}}};
  for (const auto& [name, pair] : fields) expect_equal(pair.first, pair.second, what + ": " + name);
  ASSERT_EQ(a.state0.size(), b.state0.size()) << what;
  for (size_t g = 0; g < a.state0.size(); ++g) EXPECT_TRUE(a.state0[g].equal(b.state0[g])) << what << ": state0 " << g;
}

void expect_same_states(rl::PPOTrainer& a, rl::PPOTrainer& b, const std::string& what) {
  ASSERT_EQ(a.states().size(), b.states().size()) << what;
  for (size_t g = 0; g < a.states().size(); ++g) EXPECT_TRUE(a.states()[g].equal(b.states()[g])) << what << ": state " << g;
  EXPECT_TRUE(at::equal(a.env().observe(), b.env().observe())) << what << ": the envs' observations";
}

// Every UpdateStats field but the timings.
void expect_same_history(const rl::PPOTrainer& a, const rl::PPOTrainer& b) {
  ASSERT_EQ(a.history().size(), b.history().size());
  for (size_t u = 0; u < a.history().size(); ++u) {
    const auto x = a.history()[u].fields(), y = b.history()[u].fields();
    for (size_t i = 0; i < x.size(); ++i)
      if (x[i].first != "seconds" && x[i].first != "steps_per_second" && x[i].first != "rollout_seconds")
        EXPECT_TRUE(x[i].second == y[i].second || (std::isnan(x[i].second) && std::isnan(y[i].second)))
            << "update " << u + 1 << " " << x[i].first << ": " << x[i].second << " vs " << y[i].second;
  }
}

}  // namespace

// The graph runs the eager step's kernels on the same shapes, and each replay draws the random
// numbers the eager step would have drawn next (the generators are registered with the graph, so
// their Philox offsets advance per replay as per eager call): the chunks are equal, actions
// included, not just the policy's outputs. Updates in between check that the graph reads the
// parameters the optimiser updated in place.
TEST(CudaRlPpo, GraphChunksEqualEagerChunks) {
  SKIP_WITHOUT_CUDA();
  for (const auto& controller : kControllers)
    for (bool stepwise : {true, false}) {  // the rollout calls the policy per group / once for all
      SCOPED_TRACE(controller + (stepwise ? ", stepwise replay" : ", whole-chunk replay"));
      rl::PPOTrainer graph = make_trainer(controller, /*graph=*/true, stepwise);
      rl::PPOTrainer eager = make_trainer(controller, /*graph=*/false, stepwise);
      for (int u = 0; u < 3; ++u) {
        const std::string what = "chunk " + std::to_string(u);
        const rl::Rollout a = graph.collect(), b = eager.collect();
        ASSERT_TRUE(graph.rollout_graph_captured()) << "the graph trainer stepped eagerly";
        ASSERT_FALSE(eager.rollout_graph_captured());
        ASSERT_TRUE(b.resets.slice(0, 1).any().item<bool>()) << "no episode boundary inside the chunk";
        expect_same_chunk(a, b, what);
        expect_same_states(graph, eager, what);
        graph.update();
        eager.update();
      }
      expect_same_history(graph, eager);
    }
}

// The update replays the graph's chunk eagerly, one step at a time: its logits and values must be
// the captured rollout's bit for bit, so the first ratio is exactly 1.
TEST(CudaRlPpo, StepwiseReplayReproducesTheGraphRollout) {
  SKIP_WITHOUT_CUDA();
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    rl::PPOTrainer trainer = make_trainer(controller, /*graph=*/true);
    for (int u = 0; u < 3; ++u) {  // later chunks start from carried, nonzero states
      const rl::Rollout r = trainer.collect();
      ASSERT_TRUE(trainer.rollout_graph_captured());
      for (int64_t g = 0; g < 2; ++g) {
        const rl::PolicyOutput out = trainer.replay(r, g);  // with autograd on, as in the update
        const int64_t n = trainer.group_size();
        EXPECT_TRUE(at::equal(out.logits, r.logits.narrow(1, g * n, n))) << "chunk " << u << ", group " << g;
        EXPECT_TRUE(at::equal(out.values, r.values.narrow(1, g * n, n))) << "chunk " << u << ", group " << g;
      }
      EXPECT_EQ(trainer.update().first_ratio_dev, 0.0) << "ratio != 1 before the first gradient step, update " << u + 1;
    }
  }
}

// Three updates, a checkpoint, a load into a trainer that had captured its own graph (on other
// tensors: the load must drop it), two more updates: equal to five uninterrupted updates.
TEST(CudaRlPpo, ResumeEqualsUninterrupted) {
  SKIP_WITHOUT_CUDA();
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    TempDir dir;
    rl::PPOTrainer straight = make_trainer(controller, /*graph=*/true);
    for (int u = 0; u < 5; ++u) straight.update();
    {
      rl::PPOTrainer first = make_trainer(controller, /*graph=*/true);
      for (int u = 0; u < 3; ++u) first.update();
      first.save(dir.file("ckpt.pt"));
    }
    rl::PPOTrainer resumed = make_trainer(controller, /*graph=*/true, true, /*seed=*/12345);
    resumed.update();  // captures a graph on this trainer's own tensors and generators
    ASSERT_TRUE(resumed.rollout_graph_captured());
    resumed.load(dir.file("ckpt.pt"));
    EXPECT_FALSE(resumed.rollout_graph_captured()) << "load() kept the graph captured before it";
    for (int u = 0; u < 2; ++u) resumed.update();
    EXPECT_TRUE(resumed.rollout_graph_captured());

    const auto a = straight.policy()->named_parameters(), b = resumed.policy()->named_parameters();
    for (const auto& item : a) EXPECT_TRUE(at::equal(item.value(), b[item.key()])) << item.key();
    expect_same_states(straight, resumed, "after five updates");
    expect_same_history(straight, resumed);
  }
}
