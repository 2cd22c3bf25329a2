// rl/: environment semantics, recurrent-state resets, exact replay of stored chunks, GAE, learning,
// checkpoint/resume, and the PNG plot writer. CPU only.
#include <gtest/gtest.h>

#include <numeric>
#include <torch/torch.h>

#include <chrono>
#include <fstream>
#include <iterator>

#include "rl/env.h"
#include "rl/plot.h"
#include "rl/policy.h"
#include "rl/ppo.h"
#include "rl/throughput.h"
#include "rl/kernels.h"
#include "support/expect_error.h"
#include "support/rl_kernel_checks.h"
#include "support/tmpdir.h"

namespace rl = statemamba::rl;
using statemamba::test::expect_error;
using statemamba::test::TempDir;

namespace {

// One thread: the ops here are tiny, and on a busy machine OpenMP's barriers cost far more than
// a second thread gains (an update measured 60x slower with two threads on two loaded cores).
class OneThread : public ::testing::Environment {
  void SetUp() override { at::set_num_threads(1); }
};
[[maybe_unused]] ::testing::Environment* const kOneThread = ::testing::AddGlobalTestEnvironment(new OneThread);

const std::vector<std::string> kControllers = {"mamba", "gru"};

rl::PolicyOptions small_policy(const std::string& controller) {
  rl::PolicyOptions o;
  o.controller = controller;
  o.width = 16;
  o.d_state = 8;
  return o;
}

// A trainer on the delayed-memory task whose episodes are shorter than a chunk, so that every
// chunk holds episode boundaries at staggered places.
rl::PPOTrainer make_trainer(const std::string& controller, rl::PPOOptions ppo, int64_t num_envs = 8,
                            int64_t delay = 5, uint64_t seed = 3) {
  rl::EnvOptions e;
  e.num_envs = num_envs, e.num_bits = 2, e.horizon = delay;
  torch::manual_seed(seed);
  auto env = rl::make_env(e, torch::kCPU, seed);
  auto policy = rl::make_policy(small_policy(controller), env->obs_dim(), env->num_actions());
  ppo.seed = seed;
  return rl::PPOTrainer(std::move(env), policy, ppo);
}

rl::PPOOptions small_ppo() {
  rl::PPOOptions o;
  o.rollout_len = 16;
  o.minibatches = 2;
  o.epochs = 2;
  return o;
}

at::Tensor group_rows(const at::Tensor& t, const rl::PPOTrainer& trainer, int64_t g) {
  return t.narrow(1, g * trainer.group_size(), trainer.group_size());
}

}  // namespace

// ---- environments --------------------------------------------------------------------------------

TEST(RlEnv, DelayedMemoryEpisodes) {
  const int64_t N = 16, k = 3, delay = 4, length = delay + 2;
  rl::DelayedMemoryEnv env(N, k, delay, /*distractors=*/false, torch::kCPU, 7);
  EXPECT_EQ(env.obs_dim(), k + 2);
  EXPECT_EQ(env.num_actions(), 8);
  EXPECT_EQ(env.episode_length(), length);
  EXPECT_GT(std::get<0>(at::_unique(env.phase())).numel(), 2) << "episode starts are not staggered";

  std::vector<bool> seen_start(N, false);
  int64_t graded_answers = 0;
  for (int64_t t = 0; t < 3 * length; ++t) {
    const at::Tensor phase = env.phase().clone(), obs = env.observe(), bits = env.bits().clone();
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = phase[n].item<int64_t>();
      const at::Tensor o = obs[n];
      if (p == 0) {
        EXPECT_TRUE(at::equal(o.slice(0, 0, k), 2 * bits[n] - 1)) << "the bits are shown at the first step";
        EXPECT_EQ(o[k].item<float>(), 1);
        EXPECT_EQ(o[k + 1].item<float>(), 0);
      } else {
        EXPECT_EQ(o.slice(0, 0, k + 1).abs().sum().item<float>(), 0) << "nothing is shown during the delay";
        EXPECT_EQ(o[k + 1].item<float>(), p == length - 1 ? 1 : 0) << "the query flag, at phase " << p;
      }
    }
    // Odd environments answer right, even ones wrong.
    const at::Tensor right = env.answer();
    const at::Tensor odd = at::arange(N) % 2 == 1;
    const at::Tensor actions = at::where(odd, right, (right + 1) % 8);
    const rl::EnvStep s = env.step(actions);
    for (int64_t n = 0; n < N; ++n) {
      const bool query = phase[n].item<int64_t>() == length - 1;
      EXPECT_EQ(s.done[n].item<bool>(), query);
      EXPECT_EQ(s.reward[n].item<float>(), query && n % 2 == 1 ? 1.0f : 0.0f);
      // The first episode began before anything was seen: never graded.
      EXPECT_EQ(s.answered[n].item<bool>(), query && seen_start[n]);
      EXPECT_EQ(s.correct[n].item<bool>(), query && seen_start[n] && n % 2 == 1);
      graded_answers += s.answered[n].item<bool>();
      if (query) {
        seen_start[n] = true;
        EXPECT_EQ(env.phase()[n].item<int64_t>(), 0) << "a new episode starts after the query";
      }
    }
  }
  EXPECT_GE(graded_answers, N);
}

TEST(RlEnv, FusedMemoryStepEqualsTheGenericStep) { statemamba::test::expect_fused_memory_step_equals_generic(torch::kCPU); }

TEST(RlEnv, MemoryStepKernelNamesTheBadArgument) {
  rl::DelayedMemoryEnv env(4, 2, 3, false, torch::kCPU, 0);
  expect_error([&] { env.step(at::zeros({4}, at::kFloat)); }, {"actions must be integers", "Float"});
  expect_error([&] { env.step(at::zeros({5}, at::kLong)); }, {"actions must be [4]", "[5]"});
  at::Tensor phase = at::zeros({4}, at::kLong), lengths = at::full({4}, 5, at::kLong), graded = at::zeros({4}, at::kBool), bits = at::zeros({4, 2}),
             obs = at::zeros({4, 4});
  const at::Tensor actions = at::zeros({4}, at::kLong), fresh = at::zeros({4, 2});
  expect_error([&] { rl::delayed_memory_step(phase, lengths, graded, bits, obs, actions.to(at::kInt), fresh, {}, 5); },
               {"delayed_memory_step", "actions must be Long", "Int"});
  expect_error([&] { rl::delayed_memory_step(phase, lengths, graded, bits, obs, actions, at::zeros({4, 3}), {}, 5); },
               {"fresh must have shape [4, 2]", "[4, 3]"});
  at::Tensor narrow_obs = at::zeros({4, 3});
  expect_error([&] { rl::delayed_memory_step(phase, lengths, graded, bits, narrow_obs, actions, fresh, {}, 5); },
               {"obs must have shape [4, 4]", "[4, 3]"});
  expect_error([&] { rl::delayed_memory_step(phase, lengths, graded, bits, obs, actions, fresh, {}, 1); },
               {"episode length must be at least 2", "got 1"});
  at::Tensor int_lengths = lengths.to(at::kInt);
  expect_error([&] { rl::delayed_memory_step(phase, int_lengths, graded, bits, obs, actions, fresh, {}, 5); },
               {"lengths must be Long", "Int"});
  expect_error([&] { env.set_delay(-1); }, {"delay must be in [0, 3]", "-1"});
  expect_error([&] { env.set_delay(4); }, {"delay must be in [0, 3] (the task's)", "got 4"});
  expect_error([&] { rl::DelayedMemoryEnv(4, 2, 3, false, torch::kCPU, 0, 5); }, {"first delay (5)", "the task's (3)"});
}

// A curriculum's stages stay staggered. Were episodes under way to keep their lengths, 512
// environments that start within 3 steps of each other (delay 1) would still answer within 3
// steps of each other after the delay grew to 62: all of them in a few steps of every 64. (With
// the current queries kept, a third of them would: this steps whole episodes between stages.)
TEST(RlEnv, CurriculumStagesStayStaggered) {
  const int64_t N = 512;
  rl::DelayedMemoryEnv env(N, 1, 62, false, torch::kCPU, 3, /*start_delay=*/1);
  const at::Tensor actions = at::zeros({N}, at::kLong);
  for (int t = 0; t < 7; ++t) env.step(actions);
  for (int64_t delay : {6, 14, 30, 62}) {
    const at::Tensor phase = env.phase().clone(), lengths = env.lengths().clone();
    env.set_delay(delay);
    EXPECT_EQ(env.episode_length(), delay + 2);
    EXPECT_TRUE(env.phase().equal(phase)) << "the episodes go on where they were";
    const at::Tensor more = env.lengths() - phase - 1;
    EXPECT_GE(more.min().item<int64_t>(), 1);
    EXPECT_LE(more.max().item<int64_t>(), delay + 2);
    // The observation is made again: no query flag now (a query moved on), the start flags kept.
    EXPECT_EQ(env.observe().select(1, 2).sum().item<float>(), 0.0f);
    EXPECT_TRUE(at::equal(env.observe().select(1, 1), (phase == 0).to(at::kFloat)));
    for (int64_t t = 0; t < 2 * (delay + 2); ++t) env.step(actions);
  }
  // Every episode now has the task's length; episodes end in every step of a period, about
  // N / 64 = 8 of them each, as in the staggered start.
  std::vector<int64_t> ends;
  for (int t = 0; t < 64; ++t) ends.push_back(env.step(actions).done.sum().item<int64_t>());
  EXPECT_EQ(std::accumulate(ends.begin(), ends.end(), int64_t{0}), N);
  EXPECT_LE(*std::max_element(ends.begin(), ends.end()), 24) << "bunched episode ends: " << at::tensor(ends);
  EXPECT_LE(std::count(ends.begin(), ends.end(), 0), 4) << "steps without any episode ending";
}

TEST(RlEnv, DelayedMemoryDistractors) {
  rl::DelayedMemoryEnv env(64, 2, 6, /*distractors=*/true, torch::kCPU, 1);
  for (int t = 0; t < 8; ++t) {
    const at::Tensor delay = (env.phase() > 0) & (env.phase() < 7), obs = env.observe();
    const at::Tensor noise = obs.index({delay}).slice(1, 0, 2);
    EXPECT_TRUE(at::equal(noise.abs(), at::ones_like(noise))) << "noise is +-1 on the bit channels";
    EXPECT_EQ(obs.index({delay}).slice(1, 2).abs().sum().item<float>(), 0) << "no flags during the delay";
    env.step(at::zeros({64}, at::kLong));
  }
}

TEST(RlEnv, RepeatPrevious) {
  const int64_t N = 8, cards = 4, lag = 3, length = 10;
  rl::RepeatPreviousEnv env(N, cards, lag, length, torch::kCPU, 5);
  std::vector<std::vector<int64_t>> shown(N);
  std::vector<bool> seen_start(N, false);
  for (int64_t t = 0; t < 3 * length; ++t) {
    const at::Tensor phase = env.phase().clone();
    const at::Tensor card = env.observe().argmax(1);
    EXPECT_TRUE(at::equal(env.observe().sum(1), at::ones({N}))) << "one-hot cards";
    std::vector<int64_t> actions(N);
    for (int64_t n = 0; n < N; ++n) {
      if (phase[n].item<int64_t>() == 0) shown[n].clear();
      shown[n].push_back(card[n].item<int64_t>());
      const int64_t p = phase[n].item<int64_t>();
      // Right when the card `lag` steps back is known, else card 0.
      actions[n] = p >= lag && static_cast<int64_t>(shown[n].size()) > lag ? shown[n][shown[n].size() - 1 - lag] : 0;
    }
    const rl::EnvStep s = env.step(at::tensor(actions));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = phase[n].item<int64_t>();
      EXPECT_EQ(s.answered[n].item<bool>(), p >= lag && seen_start[n]);
      if (s.answered[n].item<bool>()) {
        EXPECT_TRUE(s.correct[n].item<bool>());
        EXPECT_FLOAT_EQ(s.reward[n].item<float>(), 1.0f / (length - lag));
      }
      EXPECT_EQ(s.done[n].item<bool>(), p == length - 1);
      if (p == length - 1) seen_start[n] = true;
    }
  }
}

TEST(RlEnv, SaveLoadContinuesTheSameWay) {
  TempDir dir;
  rl::DelayedMemoryEnv a(8, 2, 3, /*distractors=*/true, torch::kCPU, 11);
  for (int t = 0; t < 4; ++t) a.step(at::zeros({8}, at::kLong));
  torch::serialize::OutputArchive out;
  a.save(out);
  out.save_to(dir.file("env.pt"));
  rl::DelayedMemoryEnv b(8, 2, 3, /*distractors=*/true, torch::kCPU, 999);
  torch::serialize::InputArchive in;
  in.load_from(dir.file("env.pt"));
  b.load(in);
  for (int t = 0; t < 10; ++t) {
    const at::Tensor actions = at::randint(4, {8}, at::kLong);
    const rl::EnvStep sa = a.step(actions), sb = b.step(actions);
    ASSERT_TRUE(at::equal(sa.obs, sb.obs) && at::equal(sa.reward, sb.reward) && at::equal(sa.done, sb.done)) << t;
  }
}

TEST(RlEnv, BadOptions) {
  rl::EnvOptions o;
  o.task = "maze";
  expect_error([&] { rl::make_env(o, torch::kCPU, 0); }, {"unknown task 'maze'"});
  o.task = "memory", o.num_bits = 13;
  expect_error([&] { rl::make_env(o, torch::kCPU, 0); }, {"num_bits"});
  o.task = "repeat-previous", o.horizon = 5, o.length = 5;
  expect_error([&] { rl::make_env(o, torch::kCPU, 0); }, {"must exceed the lag"});
}

// ---- policies and state ----------------------------------------------------------------------------

TEST(RlPolicy, ResetGivesAFreshStateAndLeavesOtherEnvsAlone) {
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    torch::manual_seed(0);
    auto policy = rl::make_policy(small_policy(controller), 4, 4);
    torch::NoGradGuard no_grad;
    rl::RecurrentState state = policy->initial_state(4);
    for (int t = 0; t < 5; ++t) state = policy->step(at::randn({4, 4}), state).state;
    const rl::RecurrentState before = state.clone(), fresh = policy->initial_state(4);
    const at::Tensor mask = at::tensor({0, 1, 0, 1}).to(at::kBool);
    state.reset(mask);
    for (size_t i = 0; i < state.tensors.size(); ++i) {
      for (int64_t n : {1, 3}) EXPECT_TRUE(at::equal(state.tensors[i][n], fresh.tensors[i][n])) << "tensor " << i;
      for (int64_t n : {0, 2}) EXPECT_TRUE(at::equal(state.tensors[i][n], before.tensors[i][n])) << "tensor " << i;
    }
    // The reset rows now act as fresh ones.
    const at::Tensor obs = at::randn({4, 4});
    const rl::PolicyOutput a = policy->step(obs, state), b = policy->step(obs, fresh);
    for (int64_t n : {1, 3}) EXPECT_TRUE(at::equal(a.logits[n], b.logits[n]) && at::equal(a.values[n], b.values[n]));
  }
}

TEST(RlPolicy, ChunkEqualsStepsAndResetsActInsideTheChunk) {
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    torch::manual_seed(1);
    auto policy = rl::make_policy(small_policy(controller), 3, 5);
    torch::NoGradGuard no_grad;
    const int64_t T = 12, N = 4;
    const at::Tensor obs = at::randn({T, N, 3}), resets = at::rand({T, N}) < 0.2;
    rl::RecurrentState state = policy->initial_state(N);
    for (int t = 0; t < 3; ++t) state = policy->step(at::randn({N, 3}), state).state;
    // Stepping by hand, zeroing states where an episode starts.
    rl::RecurrentState s = state;
    std::vector<at::Tensor> logits;
    for (int64_t t = 0; t < T; ++t) {
      s.reset(resets[t]);
      rl::PolicyOutput out = policy->step(obs[t], s);
      logits.push_back(out.logits);
      s = out.state;
    }
    const rl::PolicyOutput chunk = policy->forward_chunk(obs, state, resets, /*stepwise=*/true);
    EXPECT_TRUE(at::equal(chunk.logits, at::stack(logits))) << "stepwise chunk vs steps";
    EXPECT_TRUE(chunk.state.equal(s));
    const rl::PolicyOutput whole = policy->forward_chunk(obs, state, resets, /*stepwise=*/false);
    EXPECT_TRUE(at::allclose(whole.logits, chunk.logits, 1e-5, 1e-6)) << "whole chunk vs steps";
    for (size_t i = 0; i < s.tensors.size(); ++i) EXPECT_TRUE(at::allclose(whole.state.tensors[i], s.tensors[i], 1e-5, 1e-6));
  }
}

// One scalar loss of a chunk's outputs and final state (weighted by fixed random tensors) and its
// gradients. run(obs, state0) -> (logits, values, final state tensors) is the forward pass to check.
struct ChunkLoss {
  at::Tensor logits, values;
  std::vector<at::Tensor> state;

  ChunkLoss(const at::Tensor& obs, int64_t num_actions, const rl::RecurrentState& s0) {
    const auto o = obs.options();
    logits = at::randn({obs.size(0), obs.size(1), num_actions}, o), values = at::randn({obs.size(0), obs.size(1)}, o);
    for (const auto& t : s0.tensors) state.push_back(at::randn(t.sizes(), o));
  }

  // The outputs, the final state, then the gradients of every parameter, of the initial state and
  // of the observations.
  template <typename Run>
  std::vector<at::Tensor> outputs_and_gradients(rl::RecurrentPolicyImpl& policy, const at::Tensor& obs,
                                                const rl::RecurrentState& s0, Run&& run) const {
    rl::RecurrentState s = s0.clone();
    for (auto& t : s.tensors) t.requires_grad_(true);
    const at::Tensor o = obs.clone().requires_grad_(true);
    policy.zero_grad();
    auto [l, v, final_state] = run(o, s);
    at::Tensor loss = (l * logits).sum() + (v * values).sum();
    for (size_t i = 0; i < state.size(); ++i) loss = loss + (final_state[i] * state[i]).sum();
    loss.backward();
    std::vector<at::Tensor> all{l.detach(), v.detach()};
    for (const auto& t : final_state) all.push_back(t.detach());
    for (const auto& param : policy.parameters()) all.push_back(param.grad().clone());
    for (const auto& t : s.tensors) all.push_back(t.grad().clone());
    all.push_back(o.grad().clone());
    return all;
  }
};

void expect_all_close(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& expected, double rtol,
                      double atol) {
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_TRUE(at::allclose(got[i], expected[i], rtol, atol))
        << "item " << i << ": max difference " << (got[i] - expected[i]).abs().max().item<double>();
}

// The Mamba policy recomputed from its own parameters with plain differentiable libtorch ops, one
// step at a time, straight from the recurrence's definition (no statemamba op): conv window and
// SSM state zeroed where an episode starts, h = exp(dt A) h + dt B x, y = (C.h + D x) silu(z).
struct ReferenceOutput {
  at::Tensor logits, values;
  std::vector<at::Tensor> state;
};

// forward_chunk, whole chunk and stepwise, against a reference recurrence (obs, s0) -> ReferenceOutput:
// outputs, final state and every gradient of a ChunkLoss, to float64 rounding.
template <typename Reference>
void expect_chunk_matches_reference(rl::RecurrentPolicyImpl& policy, const at::Tensor& obs, const rl::RecurrentState& s0,
                                    const at::Tensor& resets, Reference&& reference) {
  const ChunkLoss loss(obs, policy.num_actions, s0);
  const auto expected = loss.outputs_and_gradients(policy, obs, s0, [&](const at::Tensor& x, const rl::RecurrentState& s) {
    ReferenceOutput r = reference(x, s);
    return std::make_tuple(r.logits, r.values, r.state);
  });
  for (bool stepwise : {false, true}) {
    SCOPED_TRACE(stepwise ? "stepwise" : "whole chunk");
    expect_all_close(loss.outputs_and_gradients(policy, obs, s0, [&](const at::Tensor& x, const rl::RecurrentState& s) {
      rl::PolicyOutput out = policy.forward_chunk(x, s, resets, stepwise);
      return std::make_tuple(out.logits, out.values, out.state.tensors);
    }), expected, 1e-9, 1e-11);
  }
}

ReferenceOutput reference_mamba_policy(rl::MambaPolicyImpl& p, const at::Tensor& obs, const rl::RecurrentState& s0,
                                       const at::Tensor& resets) {
  const auto& c = p.config;
  const int64_t T = obs.size(0), di = c.d_inner(), ds = c.d_state(), rank = c.resolved_dt_rank(), W = c.d_conv();
  auto rms = [&](const at::Tensor& x, const at::Tensor& w) {
    return x * at::rsqrt(x.square().mean(-1, true) + c.norm_eps()) * w;
  };
  std::vector<at::Tensor> state = s0.tensors;  // per layer: conv window, ssm state
  std::vector<at::Tensor> logits, values;
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor keep = (~resets[t]).to(obs.scalar_type()).view({-1, 1, 1});
    at::Tensor hidden = p.encoder->forward(obs[t]), residual;
    for (int64_t i = 0; i < c.n_layer(); ++i) {
      auto& block = *p.blocks->ptr<statemamba::MambaBlockImpl>(i);
      auto& m = *block.mixer;
      residual = residual.defined() ? hidden + residual : hidden;
      const at::Tensor xz = m.in_proj->forward(rms(residual, block.norm->weight));
      const at::Tensor x = xz.narrow(1, 0, di), z = xz.narrow(1, di, di);
      const at::Tensor window = at::cat({state[2 * i] * keep, x.unsqueeze(2)}, 2);  // [N, di, W]
      const at::Tensor xc = at::silu((window * m.conv1d->weight.squeeze(1)).sum(2) + m.conv1d->bias);
      state[2 * i] = window.narrow(2, 1, W - 1);
      const at::Tensor x_dbl = m.x_proj->forward(xc);
      const at::Tensor dt = at::softplus(m.dt_proj->forward(x_dbl.narrow(1, 0, rank)));  // [N, di]
      const at::Tensor B = x_dbl.narrow(1, rank, ds), C = x_dbl.narrow(1, rank + ds, ds);
      const at::Tensor A = -at::exp(m.A_log);
      const at::Tensor h = at::exp(dt.unsqueeze(2) * A) * (state[2 * i + 1] * keep) +
                           (dt * xc).unsqueeze(2) * B.unsqueeze(1);
      state[2 * i + 1] = h;
      const at::Tensor y = ((h * C.unsqueeze(1)).sum(2) + m.D * xc) * at::silu(z);
      hidden = m.out_proj->forward(y);
    }
    const at::Tensor features = rms(hidden + residual, p.norm_f->weight);
    logits.push_back(p.actor->forward(features));
    values.push_back(p.critic->forward(features).squeeze(-1));
  }
  return {at::stack(logits), at::stack(values), state};
}

// forward_chunk through the ops (whole chunk and stepwise) equals the reference above in float64:
// outputs, final state, and the gradients of every parameter and of the initial state, with
// episode starts inside the chunk and a nonzero initial state.
TEST(RlPolicy, MambaMatchesAPlainLibtorchRecurrenceWithGradients) {
  torch::manual_seed(4);
  rl::PolicyOptions o = small_policy("mamba");
  o.layers = 2, o.dt_min = 0.01, o.dt_max = 0.5;  // large steps: the state changes noticeably
  auto policy = rl::make_policy(o, 3, 5);
  policy->to(at::kDouble);
  auto& mamba = dynamic_cast<rl::MambaPolicyImpl&>(*policy);
  const int64_t T = 9, N = 3;
  const at::Tensor obs = at::randn({T, N, 3}, at::kDouble);
  at::Tensor resets = at::zeros({T, N}, at::kBool);
  resets.index_put_({3, 0}, true), resets.index_put_({6, 1}, true), resets.index_put_({1, 2}, true);
  rl::RecurrentState s0 = policy->initial_state(N);
  for (auto& t : s0.tensors) t = at::randn(t.sizes(), at::kDouble) * 0.5;
  expect_chunk_matches_reference(*policy, obs, s0, resets, [&](const at::Tensor& x, const rl::RecurrentState& s) {
    return reference_mamba_policy(mamba, x, s, resets);
  });
}

// The GRU policy recomputed from its own parameters, one step at a time, with nn::GRU's equations
// (gates stacked reset, update, new) and each layer's state zeroed where an episode starts:
// r = s(W_ir x + b_ir + W_hr h + b_hr), z = s(... z ...), n = tanh(W_in x + b_in + r (W_hn h + b_hn)),
// h' = (1 - z) n + z h.
ReferenceOutput reference_gru_policy(rl::GruPolicyImpl& p, const at::Tensor& obs, const rl::RecurrentState& s0,
                                     const at::Tensor& resets) {
  auto params = p.gru->named_parameters();
  std::vector<at::Tensor> h = s0.tensors[0].unbind(1);  // per layer [N, width]
  std::vector<at::Tensor> logits, values;
  for (int64_t t = 0; t < obs.size(0); ++t) {
    const at::Tensor keep = (~resets[t]).to(obs.scalar_type()).unsqueeze(1);
    at::Tensor input = p.encoder->forward(obs[t]);
    for (int64_t l = 0; l < p.layers; ++l) {
      const std::string suffix = "_l" + std::to_string(l);
      const at::Tensor h_prev = h[l] * keep;
      const auto gi = at::linear(input, params["weight_ih" + suffix], params["bias_ih" + suffix]).chunk(3, 1);
      const auto gh = at::linear(h_prev, params["weight_hh" + suffix], params["bias_hh" + suffix]).chunk(3, 1);
      const at::Tensor r = at::sigmoid(gi[0] + gh[0]), z = at::sigmoid(gi[1] + gh[1]);
      const at::Tensor n = at::tanh(gi[2] + r * gh[2]);
      h[l] = (1 - z) * n + z * h_prev;
      input = h[l];
    }
    logits.push_back(p.actor->forward(input));
    values.push_back(p.critic->forward(input).squeeze(-1));
  }
  return {at::stack(logits), at::stack(values), {at::stack(h, 1)}};
}

// resets[t, n] from one string per environment, 'x' where it restarts.
at::Tensor resets_from(const std::vector<std::string>& rows) {
  at::Tensor resets = at::zeros({static_cast<int64_t>(rows[0].size()), static_cast<int64_t>(rows.size())}, at::kBool);
  for (size_t n = 0; n < rows.size(); ++n)
    for (size_t t = 0; t < rows[n].size(); ++t) resets.index_put_({int64_t(t), int64_t(n)}, rows[n][t] == 'x');
  return resets;
}

// Restarts of every kind: none, at t = 0 (the given state is dropped), in the middle, at
// consecutive steps, at the last step, at every step.
const std::vector<std::string> kRestartPatterns = {
    "..........", "x...x.....", "...xx....x", "xxxxxxxxxx", ".........x", "x.x.......", ".x.x.x.x.x",
};

// forward_chunk (the whole chunk as one packed-sequence call, and stepwise) equals the reference
// above in float64: outputs, final state and the gradients of every parameter, the initial state and
// the observations. Also a chunk whose only restarts are at t = 0 and one with none (plain calls).
TEST(RlPolicy, GruMatchesAPlainLibtorchRecurrenceWithGradients) {
  torch::manual_seed(6);
  rl::PolicyOptions o = small_policy("gru");
  o.layers = 2, o.gru_memory = 10;
  auto policy = rl::make_policy(o, 3, 5);
  policy->to(at::kDouble);
  auto& gru = dynamic_cast<rl::GruPolicyImpl&>(*policy);
  const at::Tensor many = resets_from(kRestartPatterns);
  const int64_t T = many.size(0), N = many.size(1);
  at::Tensor first_only = at::zeros({T, N}, at::kBool);
  first_only[0] = many[0];
  for (const at::Tensor& resets : {many, first_only, at::zeros({T, N}, at::kBool)}) {
    SCOPED_TRACE(::testing::Message() << resets.sum().item<int64_t>() << " restarts");
    const at::Tensor obs = at::randn({T, N, 3}, at::kDouble);
    const rl::RecurrentState s0{{at::randn({N, o.layers, o.width}, at::kDouble) * 0.5}};
    expect_chunk_matches_reference(*policy, obs, s0, resets, [&](const at::Tensor& x, const rl::RecurrentState& s) {
      return reference_gru_policy(gru, x, s, resets);
    });
  }
}

// In float32, at a larger size and over several of the CPU's blocks of 16 steps (random restarts
// in most environments, the patterns above in the others, and a block with restarts only at its
// first step): the whole chunk equals the stepwise replay and the reference to rounding, outputs
// and gradients alike.
TEST(RlPolicy, GruPackedChunkEqualsStepwiseWithManyRestarts) {
  torch::manual_seed(7);
  rl::PolicyOptions o = small_policy("gru");
  o.layers = 2, o.gru_memory = 20;
  auto policy = rl::make_policy(o, 3, 5);
  auto& gru = dynamic_cast<rl::GruPolicyImpl&>(*policy);
  const int64_t T = 40, N = 40;
  at::Tensor resets = at::rand({T, N}) < 0.2;
  resets.narrow(0, 17, 15).zero_();
  resets.narrow(0, 32, 8).narrow(1, 0, kRestartPatterns.size()).copy_(resets_from(kRestartPatterns).narrow(0, 2, 8));
  resets.narrow(0, 0, 10).narrow(1, 0, kRestartPatterns.size()).copy_(resets_from(kRestartPatterns));
  const at::Tensor obs = at::randn({T, N, 3});
  const rl::RecurrentState s0{{at::randn({N, o.layers, o.width}) * 0.5}};
  const ChunkLoss loss(obs, 5, s0);
  auto chunk = [&](bool stepwise) {
    return loss.outputs_and_gradients(*policy, obs, s0, [&](const at::Tensor& x, const rl::RecurrentState& s) {
      rl::PolicyOutput out = policy->forward_chunk(x, s, resets, stepwise);
      return std::make_tuple(out.logits, out.values, out.state.tensors);
    });
  };
  const auto whole = chunk(false);
  {
    SCOPED_TRACE("stepwise");
    expect_all_close(chunk(true), whole, 1e-5, 1e-5);
  }
  SCOPED_TRACE("reference");
  expect_all_close(loss.outputs_and_gradients(*policy, obs, s0, [&](const at::Tensor& x, const rl::RecurrentState& s) {
    ReferenceOutput r = reference_gru_policy(gru, x, s, resets);
    return std::make_tuple(r.logits, r.values, r.state);
  }), whole, 1e-5, 1e-5);
}

TEST(RlPolicy, BadInputs) {
  auto policy = rl::make_policy(small_policy("mamba"), 3, 5);
  const auto state = policy->initial_state(2);
  expect_error([&] { policy->step(at::randn({2, 4}), state); }, {"obs must be [N, 3]"});
  expect_error([&] { policy->forward_chunk(at::randn({4, 2, 3}), state, at::zeros({4, 3}, at::kBool)); },
               {"resets must be bool [T, N]"});
  rl::PolicyOptions o = small_policy("lstm");
  expect_error([&] { rl::make_policy(o, 3, 5); }, {"unknown controller 'lstm'"});
  o = small_policy("mamba"), o.dt_min = 0.5, o.dt_max = 0.1;
  expect_error([&] { rl::make_policy(o, 3, 5); }, {"dt_min"});
  o = small_policy("gru"), o.gru_memory = 1.5;
  expect_error([&] { rl::make_policy(o, 3, 5); }, {"gru_memory", "1.5"});
}

// Chrono initialisation: the update gate starts at z = sigmoid(log u) = u / (1 + u), u in [1, T - 1],
// so with no input a unit keeps a share z of its value per step: after k steps at least
// (1 - 1/2)^k and, for the slowest units, close to (1 - 1/T)^k. The default GRU forgets ~half per step.
TEST(RlPolicy, GruChronoInitKeepsTheStateForLong) {
  const int64_t T = 200, width = 64, steps = 50;
  auto retained = [&](double memory) {
    rl::PolicyOptions o = small_policy("gru");
    o.width = width, o.gru_memory = memory;
    torch::manual_seed(5);
    auto policy = rl::make_policy(o, 3, 4);
    auto* gru = dynamic_cast<rl::GruPolicyImpl*>(policy.ptr().get());
    torch::NoGradGuard no_grad;
    // Two states that differ, then `steps` zero inputs: the share of their difference that is left
    // (what the state still says about where it started, whatever fixed point it drifts to).
    const at::Tensor v = at::ones({1, 1, width}) * (0.5 / std::sqrt(double(width))), x = at::zeros({steps, 1, width});
    const at::Tensor a = std::get<1>(gru->gru->forward(x, v)), b = std::get<1>(gru->gru->forward(x, -v));
    return ((a - b).norm() / (2 * v).norm()).item<double>();
  };
  {
    rl::PolicyOptions o = small_policy("gru");
    o.width = width, o.gru_memory = T;
    auto policy = rl::make_policy(o, 3, 4);
    auto* gru = dynamic_cast<rl::GruPolicyImpl*>(policy.ptr().get());
    const auto params = gru->gru->named_parameters();
    const at::Tensor b_iz = params["bias_ih_l0"].narrow(0, width, width), b_hz = params["bias_hh_l0"].narrow(0, width, width);
    EXPECT_EQ(b_iz.abs().max().item<double>(), 0.0);
    EXPECT_GE(b_hz.min().item<double>(), 0.0);
    EXPECT_LE(b_hz.max().item<double>(), std::log(double(T - 1)) + 1e-6);
    EXPECT_GT(b_hz.max().item<double>(), std::log(T / 4.0)) << "no slow units among " << width;
    EXPECT_NE(params["bias_hh_l0"].narrow(0, 0, width).abs().max().item<double>(), 0.0) << "reset gate bias untouched";
  }
  const double chrono = retained(T), plain = retained(0);
  EXPECT_GT(chrono, 0.3) << "chrono-initialised units forgot within " << steps << " steps";
  EXPECT_LT(plain, 0.1) << "the default GRU was expected to forget";
  EXPECT_GT(chrono, 5 * plain);
}

// ---- PPO -------------------------------------------------------------------------------------------

TEST(RlPpo, CategoricalSamplingInvertsTheCdf) { statemamba::test::expect_categorical_inverts_the_cdf(torch::kCPU); }

// 200k draws from fixed logits: Pearson's chi-square against softmax. The generator is seeded, so
// the statistic is one fixed number; the bound is the 99.99th percentile of chi-square with 5
// degrees of freedom (25.7), which a wrong distribution (e.g. off by 1% in one action) exceeds.
TEST(RlPpo, SampleActionsFollowTheSoftmax) {
  const at::Tensor row = at::tensor({1.5f, -0.5f, 0.0f, 2.0f, -3.0f, 0.7f});
  const int64_t N = 200000;
  const at::Tensor logits = row.expand({N, 6}).contiguous();
  const at::Tensor actions = rl::sample_actions(logits, rl::make_generator(torch::kCPU, 9));
  const at::Tensor counts = at::bincount(actions, {}, 6).to(at::kDouble);
  const at::Tensor expected = at::softmax(row.to(at::kDouble), 0) * N;
  const double chi2 = ((counts - expected).pow(2) / expected).sum().item<double>();
  EXPECT_LT(chi2, 25.7) << "counts " << counts << " expected " << expected;
  expect_error([&] { rl::categorical_from_uniform(logits, at::zeros({N - 1})); }, {"u must have shape", "[199999]"});
  expect_error([&] { rl::sample_actions(row, rl::make_generator(torch::kCPU, 9)); }, {"logits must be [N, A]", "[6]"});
}

TEST(RlPpo, GaeMatchesHandComputation) {
  const double g = 0.9, l = 0.8;
  // Two environments, three steps; env 0's episode ends at t = 1.
  const at::Tensor rewards = at::tensor({0.0, 1.0, 1.0, 0.0, 0.5, 2.0}, at::kDouble).view({3, 2});
  const at::Tensor values = at::tensor({0.1, 0.2, 0.3, 0.4, 0.5, 0.6}, at::kDouble).view({3, 2});
  const at::Tensor dones = at::tensor({0, 0, 1, 0, 0, 0}).to(at::kBool).view({3, 2});
  const at::Tensor last = at::tensor({0.7, 0.8}, at::kDouble);
  auto [adv, ret] = rl::gae(rewards, values, dones, last, g, l);
  const double d00 = 0 + g * 0.3 - 0.1, d10 = 1 + 0 - 0.3, d20 = 0.5 + g * 0.7 - 0.5;  // env 0
  const double d01 = 1 + g * 0.4 - 0.2, d11 = 0 + g * 0.6 - 0.4, d21 = 2 + g * 0.8 - 0.6;  // env 1
  const at::Tensor expected = at::tensor({d00 + g * l * d10, d01 + g * l * (d11 + g * l * d21),  //
                                          d10, d11 + g * l * d21,                                //
                                          d20, d21},
                                         at::kDouble)
                                  .view({3, 2});
  EXPECT_TRUE(at::allclose(adv, expected, 1e-12, 1e-12)) << adv << expected;
  EXPECT_TRUE(at::allclose(ret, expected + values, 1e-12, 1e-12));
}

// The update replays a stored chunk from its stored initial state with its resets as masks; the
// logits and values must be the rollout's exactly, so the first ratio is exactly 1.
TEST(RlPpo, ReplayReproducesTheRolloutExactly) {
  for (const auto& controller : kControllers)
    for (int64_t grad_chunks : {1, 3}) {
      SCOPED_TRACE(controller + ", grad_chunks " + std::to_string(grad_chunks));
      rl::PPOOptions o = small_ppo();
      o.grad_chunks = grad_chunks;
      rl::PPOTrainer trainer = make_trainer(controller, o);
      for (int u = 0; u < 3; ++u) {  // later chunks start from carried, nonzero states
        const rl::Rollout r = trainer.collect();
        ASSERT_TRUE(r.resets.slice(0, 1).any().item<bool>()) << "no episode boundary inside the chunk";
        for (int64_t g = 0; g < 2; ++g) {
          const rl::PolicyOutput out = trainer.replay(r, g);  // with autograd on, as in the update
          EXPECT_TRUE(at::equal(out.logits, group_rows(r.logits, trainer, g))) << "update " << u << ", group " << g;
          EXPECT_TRUE(at::equal(out.values, group_rows(r.values, trainer, g))) << "update " << u << ", group " << g;
        }
        EXPECT_EQ(trainer.update().first_ratio_dev, 0.0) << "ratio != 1 before the first gradient step";
      }
    }
}

TEST(RlPpo, WholeChunkReplayMatchesToRounding) {
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    rl::PPOOptions o = small_ppo();
    o.stepwise_replay = false;
    rl::PPOTrainer trainer = make_trainer(controller, o);
    trainer.update();
    const rl::Rollout r = trainer.collect();
    for (int64_t g = 0; g < 2; ++g) {
      const rl::PolicyOutput out = trainer.replay(r, g);
      EXPECT_TRUE(at::allclose(out.logits, group_rows(r.logits, trainer, g), 1e-5, 1e-6));
      EXPECT_TRUE(at::allclose(out.values, group_rows(r.values, trainer, g), 1e-5, 1e-6));
    }
    EXPECT_LT(trainer.update().first_ratio_dev, 1e-5);
  }
}

// The annealed learning rate reaches 0 at update lr_anneal_updates: from then on the weights stay
// where they are (Adam's step is lr times its direction), while a constant rate keeps moving them.
TEST(RlPpo, AnnealedLearningRateStopsAtZero) {
  auto weights = [](rl::PPOTrainer& t) {
    std::vector<at::Tensor> w;
    for (const auto& p : t.policy()->parameters()) w.push_back(p.detach().clone());
    return w;
  };
  auto same = [](const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
    for (size_t i = 0; i < a.size(); ++i)
      if (!at::equal(a[i], b[i])) return false;
    return true;
  };
  for (int64_t anneal : {2, 0}) {
    SCOPED_TRACE("lr_anneal_updates " + std::to_string(anneal));
    rl::PPOOptions o = small_ppo();
    o.lr_anneal_updates = anneal;
    rl::PPOTrainer trainer = make_trainer("mamba", o);
    auto before = weights(trainer);
    trainer.update();  // lr
    EXPECT_FALSE(same(before, weights(trainer)));
    before = weights(trainer);
    trainer.update();  // lr / 2 when annealed
    EXPECT_FALSE(same(before, weights(trainer)));
    before = weights(trainer);
    trainer.update();  // 0 when annealed
    EXPECT_EQ(same(before, weights(trainer)), anneal == 2);
  }
  rl::PPOOptions o = small_ppo();
  o.lr_anneal_updates = -1;
  expect_error([&] { make_trainer("gru", o); }, {"lr_anneal_updates must be 0 (constant lr) or positive, got -1"});
}

TEST(RlPpo, GradSpikeGuardSkipsNormsFarAboveTheRecentMedian) {
  rl::GradSpikeGuard guard(/*factor=*/10, /*window=*/20);
  for (double n : {1.0, 2.0, 0.5}) EXPECT_FALSE(guard.is_spike(100 * n)) << "fewer than a fifth of the window seen";
  for (int i = 0; i < 7; ++i) EXPECT_FALSE(guard.is_spike(1.0 + 0.1 * i));
  EXPECT_FALSE(guard.is_spike(11.0));  // the median of the 10 seen is 1.5
  EXPECT_TRUE(guard.is_spike(16.0));   // of the 11 seen, still 1.5
  EXPECT_TRUE(guard.is_spike(std::nan("")));
  EXPECT_TRUE(guard.is_spike(INFINITY));
  EXPECT_EQ(guard.recent().size(), 12u) << "non-finite norms are not remembered";
  // Norms that settle 100x higher are spikes only until they are the median of the window.
  int skipped = 0;
  for (int i = 0; i < 40; ++i) skipped += guard.is_spike(150.0);
  EXPECT_EQ(skipped, 4) << "until the median is 16, with 16 of the 20 norms seen";
  EXPECT_EQ(guard.recent().size(), 20u);
  rl::GradSpikeGuard copy(10, 20);
  copy.set_recent(guard.recent());
  EXPECT_EQ(copy.is_spike(2000.0), guard.is_spike(2000.0));
  rl::GradSpikeGuard off(0, 20);
  for (int i = 0; i < 10; ++i) EXPECT_FALSE(off.is_spike(i == 9 ? 1e9 : 1.0));
}

// A skipped step changes nothing; a taken one does. One gradient step per update, and a guard that
// calls a step a spike as soon as its norm is above the previous one's.
TEST(RlPpo, SkippedGradientStepsLeaveTheWeightsAlone) {
  rl::PPOOptions o = small_ppo();
  o.epochs = 1, o.minibatches = 1, o.skip_grad_spikes = 1.0001, o.grad_spike_window = 1;
  rl::PPOTrainer trainer = make_trainer("mamba", o);
  int skipped = 0, taken = 0;
  for (int u = 0; u < 10; ++u) {
    std::vector<at::Tensor> before;
    for (const auto& p : trainer.policy()->parameters()) before.push_back(p.detach().clone());
    const rl::UpdateStats s = trainer.update();
    EXPECT_EQ(s.grad_norm_max, s.grad_norm) << "one step per update";
    bool same = true;
    const auto after = trainer.policy()->parameters();
    for (size_t i = 0; i < after.size(); ++i) same = same && at::equal(before[i], after[i]);
    EXPECT_EQ(same, s.skipped_steps == 1) << "update " << s.update;
    (s.skipped_steps ? skipped : taken) += 1;
  }
  EXPECT_GT(skipped, 0);
  EXPECT_GT(taken, 1);
  o.skip_grad_spikes = 0.5;
  expect_error([&] { make_trainer("gru", o); }, {"skip_grad_spikes must be 0 (off) or a factor above 1", "got 0.5"});
}

// The per-parameter norms are the pieces of the total: with one gradient step per update, their
// root sum of squares is the update's (unclipped) grad_norm; with more, one row per step.
TEST(RlPpo, ParameterGradNormsAddUpToTheTotal) {
  for (const char* controller : {"mamba", "gru"}) {
    SCOPED_TRACE(controller);
    rl::PPOOptions o = small_ppo();
    o.epochs = 1, o.minibatches = 1, o.record_parameter_grad_norms = true;
    o.max_grad_norm = 1e-3;  // so that it clips: the norms must be those from before
    rl::PPOTrainer trainer = make_trainer(controller, o);
    const rl::UpdateStats s = trainer.update();
    const at::Tensor& norms = trainer.parameter_grad_norms();
    ASSERT_EQ(norms.sizes(), (at::IntArrayRef{1, static_cast<int64_t>(trainer.parameter_names().size())}));
    EXPECT_EQ(norms.scalar_type(), at::kDouble);
    EXPECT_GT(norms.min().item<double>(), 0.0) << "every parameter takes part in the loss";
    EXPECT_NEAR(norms.square().sum().sqrt().item<double>(), s.grad_norm, 1e-5 * s.grad_norm);
    EXPECT_GT(s.grad_norm, 10 * o.max_grad_norm);
    const auto& names = trainer.parameter_names();
    EXPECT_NE(std::find(names.begin(), names.end(), "actor.weight"), names.end());

    o = small_ppo(), o.record_parameter_grad_norms = true;
    rl::PPOTrainer two = make_trainer(controller, o);
    two.update();
    EXPECT_EQ(two.parameter_grad_norms().size(0), o.epochs * o.minibatches);
  }
}

TEST(RlPpo, BadOptions) {
  rl::PPOOptions o = small_ppo();
  o.minibatches = 3;
  expect_error([&] { make_trainer("gru", o); }, {"minibatches (3) must divide num_envs (8)"});
  o = small_ppo(), o.rollout_len = 0;
  expect_error([&] { make_trainer("gru", o); }, {"rollout_len must be at least 1"});
}

// Both controllers learn the short task (2 bits, a delay of 16) to 90% accuracy within the budget.
TEST(RlPpo, LearnsShortDelayedMemory) {
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    rl::PPOOptions o;
    o.rollout_len = 64, o.minibatches = 2, o.epochs = 4, o.lr = 2e-3;
    o.stepwise_replay = false;  // the exactness is tested above; here speed matters
    rl::EnvOptions e;
    e.num_envs = 64, e.num_bits = 2, e.horizon = 16;
    torch::manual_seed(0);
    auto env = rl::make_env(e, torch::kCPU, 0);
    rl::PolicyOptions p;
    p.controller = controller, p.width = 32;
    auto policy = rl::make_policy(p, env->obs_dim(), env->num_actions());
    rl::PPOTrainer trainer(std::move(env), policy, o);
    const auto t0 = std::chrono::steady_clock::now();
    double best = 0;
    int updates = 0;
    for (; updates < 150 && best < 0.9; ++updates) {
      const double acc = trainer.update().accuracy;
      if (trainer.history().back().answers >= 256) best = std::max(best, acc);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << "[ " << controller << " ] accuracy " << best << " after " << updates << " updates, " << seconds
              << " s" << std::endl;
    EXPECT_GE(best, 0.9);
  }
}

// A run saved halfway and resumed in a new process (here: new objects) ends exactly as an
// uninterrupted one: parameters, states, environments and statistics.
TEST(RlPpo, ResumeEqualsUninterrupted) {
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    TempDir dir;
    rl::PPOOptions o = small_ppo();
    o.grad_chunks = 2;         // the carried chunk is part of what must be saved
    o.lr_anneal_updates = 6;   // and the learning rate's schedule must go on where it was
    o.skip_grad_spikes = 1.01, o.grad_spike_window = 3;  // and the spike guard's recent norms
    rl::PPOTrainer straight = make_trainer(controller, o);
    for (int u = 0; u < 4; ++u) straight.update();
    std::vector<double> guard_norms;
    int64_t skipped = 0;
    for (const auto& s : straight.history()) skipped += s.skipped_steps;
    EXPECT_GT(skipped, 0) << "the guard must act for this to test it";

    {
      rl::PPOTrainer first = make_trainer(controller, o);
      for (int u = 0; u < 2; ++u) first.update();
      first.save(dir.file("ckpt.pt"));
      guard_norms = first.spike_guard().recent();
    }
    rl::PPOTrainer resumed = make_trainer(controller, o, 8, 5, /*seed=*/12345);  // everything comes from the file
    resumed.load(dir.file("ckpt.pt"));
    EXPECT_EQ(resumed.spike_guard().recent(), guard_norms);
    EXPECT_EQ(guard_norms.size(), 3u);
    for (int u = 0; u < 2; ++u) resumed.update();

    const auto a = straight.policy()->named_parameters(), b = resumed.policy()->named_parameters();
    for (const auto& item : a) EXPECT_TRUE(at::equal(item.value(), b[item.key()])) << item.key();
    for (size_t g = 0; g < straight.states().size(); ++g) EXPECT_TRUE(straight.states()[g].equal(resumed.states()[g]));
    EXPECT_TRUE(at::equal(straight.env().observe(), resumed.env().observe()));
    ASSERT_EQ(straight.history().size(), resumed.history().size());
    for (size_t u = 0; u < straight.history().size(); ++u) {
      const auto x = straight.history()[u].fields(), y = resumed.history()[u].fields();
      for (size_t i = 0; i < x.size(); ++i)
        if (x[i].first != "seconds" && x[i].first != "steps_per_second" && x[i].first != "rollout_seconds")
          EXPECT_TRUE(x[i].second == y[i].second || (std::isnan(x[i].second) && std::isnan(y[i].second)))
              << "update " << u + 1 << " " << x[i].first << ": " << x[i].second << " vs " << y[i].second;
    }
  }
}

TEST(RlPpo, CheckpointOfAnotherSetupIsRefused) {
  TempDir dir;
  rl::PPOTrainer a = make_trainer("gru", small_ppo());
  a.save(dir.file("ckpt.pt"));
  rl::PPOTrainer b = make_trainer("gru", small_ppo(), 8, /*delay=*/6);
  expect_error([&] { b.load(dir.file("ckpt.pt")); }, {"is for another setup", "delay=5", "delay=6"});
  expect_error([&] { b.load(dir.file("missing.pt")); }, {"cannot read", "missing.pt"});

  // A checkpoint of the same setup with fewer statistics per update (as an older version wrote):
  // refused by name before anything is loaded, the trainer left as it was.
  a.update();
  a.save(dir.file("ckpt.pt"));
  torch::serialize::InputArchive in;
  in.load_from(dir.file("ckpt.pt"));
  std::function<void(torch::serialize::InputArchive&, torch::serialize::OutputArchive&)> copy =
      [&](torch::serialize::InputArchive& from, torch::serialize::OutputArchive& to) {
        for (const auto& key : from.keys()) {
          torch::serialize::InputArchive child;
          at::Tensor tensor;
          c10::IValue value;
          if (from.try_read(key, child)) {
            torch::serialize::OutputArchive out_child;
            copy(child, out_child);
            to.write(key, out_child);
          } else if (key == "history" && from.try_read(key, tensor)) {
            to.write(key, tensor.narrow(1, 0, tensor.size(1) - 2).contiguous());
          } else if (from.try_read(key, tensor)) {
            to.write(key, tensor);
          } else {
            ASSERT_TRUE(from.try_read(key, value)) << key;
            to.write(key, value);
          }
        }
      };
  torch::serialize::OutputArchive old;
  copy(in, old);
  old.save_to(dir.file("old.pt"));
  rl::PPOTrainer c = make_trainer("gru", small_ppo());
  const auto before = c.policy()->named_parameters();
  std::vector<at::Tensor> weights;
  for (const auto& item : before) weights.push_back(item.value().detach().clone());
  expect_error([&] { c.load(dir.file("old.pt")); },
               {"was written by another version", "it has 18 statistics per update, this program keeps 20"});
  EXPECT_TRUE(c.history().empty());
  size_t i = 0;
  for (const auto& item : c.policy()->named_parameters()) EXPECT_TRUE(at::equal(item.value(), weights[i++])) << item.key();
  c.load(dir.file("ckpt.pt"));  // the untouched copy loads
  EXPECT_EQ(c.history().size(), 1u);
}

// ---- rollout throughput stepper --------------------------------------------------------------------

// The stepper updates everything in place (what lets a CUDA graph replay it); k of its steps must
// equal k steps of the plain functional loop.
TEST(RlThroughput, InPlaceStepsEqualAFunctionalLoop) {
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    rl::EnvOptions e;
    e.num_envs = 6, e.num_bits = 2, e.horizon = 3, e.distractors = true;
    torch::manual_seed(2);
    auto policy = rl::make_policy(small_policy(controller), 4, 4);
    rl::RolloutStepper stepper(rl::make_env(e, torch::kCPU, 9), policy, 9);
    auto env = rl::make_env(e, torch::kCPU, 9);
    const at::Generator gen = rl::make_generator(torch::kCPU, 10);
    torch::NoGradGuard no_grad;
    rl::RecurrentState state = policy->initial_state(6);
    at::Tensor obs = env->observe().clone();
    for (int t = 0; t < 12; ++t) {
      stepper.step();
      const rl::PolicyOutput out = policy->step(obs, state);
      const rl::EnvStep s = env->step(rl::sample_actions(out.logits, gen));
      state = out.state;
      state.reset(s.done);
      obs = s.obs;
    }
    // The stepper zeroes the rows of ended episodes at the start of the next step.
    auto after_resets = [](const rl::RolloutStepper& s) {
      rl::RecurrentState r = s.state();
      r.reset(s.pending_reset());
      return r;
    };
    EXPECT_TRUE(after_resets(stepper).equal(state));
    EXPECT_TRUE(at::equal(stepper.env().observe(), obs));
    const rl::ThroughputResult r = rl::measure_throughput(stepper, 1, 3);
    EXPECT_EQ(r.controller, controller);
    EXPECT_EQ(r.num_envs, 6);
    EXPECT_GT(r.env_steps_per_second, 0);
    EXPECT_FALSE(r.cuda_graph);
    expect_error([&] { stepper.capture(); }, {"CUDA"});

    // With the decode ops the same steps agree to rounding.
    rl::RolloutStepper decoding(rl::make_env(e, torch::kCPU, 9), policy, 9, /*decode=*/true);
    for (int t = 0; t < 12; ++t) decoding.step();
    EXPECT_TRUE(at::equal(decoding.env().observe(), obs));
    for (size_t i = 0; i < state.tensors.size(); ++i)
      EXPECT_TRUE(at::allclose(after_resets(decoding).tensors[i], state.tensors[i], 1e-5, 1e-6)) << "tensor " << i;
  }
}

// Steps must advance the live tensors (what a CUDA graph's replay needs): phases move on by one,
// the flags in the observation follow them, the rows whose episode just ended are the ones marked
// for a reset at the next step, and the others hold some state.
void expect_live_steps(rl::RolloutStepper& stepper, int64_t length) {
  const auto& env = dynamic_cast<const rl::EpisodicEnv&>(stepper.env());
  for (int64_t t = 0; t < 2 * length; ++t) {
    const at::Tensor before = env.phase().clone();
    stepper.step();
    const at::Tensor phase = env.phase().cpu(), obs = stepper.env().observe().cpu();
    ASSERT_TRUE(at::equal(phase, ((before + 1) % length).cpu())) << "step " << t;
    EXPECT_TRUE(at::equal(obs.select(1, 3), (phase == 0).to(at::kFloat))) << "start flag, step " << t;
    EXPECT_TRUE(at::equal(obs.select(1, 4), (phase == length - 1).to(at::kFloat))) << "query flag, step " << t;
    const at::Tensor fresh = (phase == 0).to(env.device());
    ASSERT_TRUE(at::equal(stepper.pending_reset(), fresh)) << "ended episodes are marked for a reset, step " << t;
    for (const auto& s : stepper.state().tensors) {
      const at::Tensor row_norm = s.flatten(1).abs().sum(1);
      if (t > length) EXPECT_TRUE((row_norm.index({~fresh}) > 0).all().item<bool>()) << "other rows hold state";
    }
  }
}

TEST(RlThroughput, StepsAdvanceTheLiveState) {
  rl::EnvOptions e;
  e.num_envs = 16, e.num_bits = 3, e.horizon = 5;
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    for (bool decode : {false, true}) {
      rl::RolloutStepper stepper(rl::make_env(e, torch::kCPU, 4), rl::make_policy(small_policy(controller), 5, 8), 4,
                                 decode);
      expect_live_steps(stepper, e.horizon + 2);
    }
  }
}

// The same through a captured graph. (Its random draws differ from eager steps': a graph's
// generator runs its own way, so the check is on what does not depend on them.)
TEST(RlThroughput, CudaGraphReplayAdvancesTheLiveState) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  rl::EnvOptions e;
  e.num_envs = 64, e.num_bits = 3, e.horizon = 5;
  for (const auto& controller : kControllers) {
    SCOPED_TRACE(controller);
    for (bool decode : {false, true}) {
      torch::manual_seed(3);
      rl::RolloutStepper stepper(rl::make_env(e, torch::kCUDA, 4), rl::make_policy(small_policy(controller), 5, 8), 4,
                                 decode);
      stepper.capture();  // two warm-up steps run; the captured one only records
      EXPECT_TRUE(stepper.captured());
      expect_live_steps(stepper, e.horizon + 2);
    }
  }
}

// ---- plot ------------------------------------------------------------------------------------------

TEST(RlPlot, WritesAPngWithAxesLinesAndText) {
  TempDir dir;
  rl::Image img(40, 20);
  img.line(0, 10, 39, 10, {255, 0, 0}, 1);
  EXPECT_EQ(img.at(20, 10).r, 255);
  EXPECT_EQ(img.at(20, 10).g, 0);
  EXPECT_EQ(img.at(20, 5).g, 255) << "background";
  img.text(1, 1, "A", {0, 0, 0});
  EXPECT_EQ(img.at(1, 2).r, 0) << "the left stroke of 'A'";

  rl::Series s{"mamba H=16", {1, 2, 3, 4}, {0.1, 0.5, std::nan(""), 0.9}};
  rl::PlotOptions o;
  o.title = "test", o.x_label = "update", o.y_label = "accuracy", o.y_min = 0, o.y_max = 1;
  rl::plot_lines(dir.file("plot.png"), {s}, o);
  std::ifstream in(dir.file("plot.png"), std::ios::binary);
  const std::string png((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(png.size(), 100u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(png.substr(12, 4), "IHDR");
  auto u32 = [&](size_t at) {
    return (uint32_t(uint8_t(png[at])) << 24) | (uint32_t(uint8_t(png[at + 1])) << 16) |
           (uint32_t(uint8_t(png[at + 2])) << 8) | uint32_t(uint8_t(png[at + 3]));
  };
  EXPECT_EQ(u32(16), 1000u);
  EXPECT_EQ(u32(20), 600u);
  EXPECT_EQ(png.substr(37, 4), "IDAT");
  EXPECT_EQ(png.substr(png.size() - 8, 4), "IEND");
  expect_error([&] { rl::plot_lines("/nonexistent/dir/plot.png", {s}, o); }, {"cannot write", "/nonexistent/dir/plot.png"});
}
