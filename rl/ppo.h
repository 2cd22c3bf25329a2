#pragma once
// PPO with GAE for recurrent policies, trained on chunks of a never-ending stream of episodes.
//
// Each update collects rollout_len steps from every environment, then runs epochs x minibatches
// of gradient steps. The recurrent state is carried from chunk to chunk and zeroed only for
// environments whose episode ended. The state before a chunk's first step is stored with it, so
// the update replays the chunk exactly from there, the episode starts inside it passed as reset
// masks. Minibatches are fixed groups of environments with their sequences whole; the rollout
// steps the policy group by group, so a stepwise replay sees the shapes the rollout saw and
// reproduces its logits and values bit for bit (the ratio is exactly 1 before the first gradient
// step; see rl/policy.h). With whole-chunk replay (equal to rounding only) the rollout steps every
// environment in one call instead.
//
//   PPOTrainer trainer(make_env(env_options, device, seed), make_policy(policy_options, ...), ppo, seed);
//   for (int i = 0; i < 300; ++i) UpdateStats s = trainer.update();
//   trainer.save("run/checkpoint.pt");     // later: trainer.load(...) continues exactly
#include <torch/optim/adam.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "rl/env.h"
#include "rl/policy.h"

namespace statemamba::rl {

struct PPOOptions {
  int64_t rollout_len = 64;   // T: steps per environment per update
  int64_t epochs = 4;
  int64_t minibatches = 2;    // groups of environments; must divide num_envs
  double lr = 1e-3;
  // > 0: the learning rate falls linearly from lr to 0 over this many updates (PPO's usual
  // schedule); update u (from 0) uses lr * (1 - u / lr_anneal_updates), at least 0.
  int64_t lr_anneal_updates = 0;
  double adam_eps = 1e-5;
  double gamma = 0.99;
  double gae_lambda = 0.95;
  double clip = 0.2;
  double value_coef = 0.5;
  double entropy_coef = 0.01;
  double max_grad_norm = 0.5;
  // > 0: a gradient step whose norm (before clipping) is more than this many times the median of
  // the last grad_spike_window steps' norms, or not finite, is skipped: parameters and Adam's
  // moments stay as they were. Clipping alone keeps a spike's direction, and Adam then moves the
  // few parameters it sits in by whole learning rates. 0: every step is taken.
  double skip_grad_spikes = 0;
  int64_t grad_spike_window = 100;  // steps; the guard acts once it has seen a fifth of them
  bool normalize_advantages = true;
  // Replay one step at a time (bit-exact with the rollout) or the whole chunk in one pass (faster,
  // equal to rounding).
  bool stepwise_replay = true;
  // Chunks the gradient flows back through. 1: truncated at the chunk's start. K > 1: the previous
  // K-1 chunks are replayed too (no loss on them) and the gradient reaches them through the
  // chunk's initial state; its value stays the stored one, so the replay still matches the rollout.
  int64_t grad_chunks = 1;
  int64_t accuracy_window = 256;  // graded answers (and episode returns) that accuracy is over
  // Record every parameter's gradient norm (before clipping) at each gradient step, to find which
  // parameters a spike of the total norm comes from (PPOTrainer::parameter_grad_norms()).
  bool record_parameter_grad_norms = false;
  uint64_t seed = 0;
};

// One chunk, time-major: [T, N, ...].
struct Rollout {
  at::Tensor obs;       // [T, N, obs_dim]
  at::Tensor resets;    // [T, N] bool: the observation at t starts an episode (state zeroed before t)
  at::Tensor logits;    // [T, N, A]
  at::Tensor values;    // [T, N]
  at::Tensor actions;   // [T, N] int64
  at::Tensor rewards;   // [T, N]
  at::Tensor dones;     // [T, N] bool: the episode ended with step t
  at::Tensor answered, correct, graded;  // [T, N] bool, as EnvStep's
  at::Tensor last_values;                // [N]: V of the observation after the chunk
  std::vector<RecurrentState> state0;    // per group: the state before step 0
};

// One action per row of logits [N, A], drawn from softmax(logits): one uniform per row, the CDF
// inverted in one kernel (rl/kernels.h). No host synchronisation, so a CUDA graph can capture it.
at::Tensor sample_actions(const at::Tensor& logits, const at::Generator& gen);

// GAE(gamma, lambda) over a chunk; dones cut the bootstrap. Returns (advantages, returns), [T, N].
std::pair<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& dones,
                                      const at::Tensor& last_values, double gamma, double lambda);

// Accuracy and return over recently finished work, on the CPU.
class EpisodeStats {
 public:
  EpisodeStats(int64_t num_envs, int64_t window);
  void add(const Rollout& r);
  double accuracy() const;     // NaN until something was graded
  double mean_return() const;  // NaN until an episode finished
  int64_t answers() const { return total_answers_; }
  int64_t window_answers() const { return static_cast<int64_t>(correct_.size()); }  // what accuracy() is over
  // Empties the windows (totals stay): accuracy then measures only episodes that start after this,
  // e.g. once a curriculum made the task harder (episodes under way are still the easier ones).
  void restart();
  int64_t episodes() const { return total_episodes_; }
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

 private:
  int64_t window_, total_answers_ = 0, total_episodes_ = 0;
  std::deque<double> correct_, returns_;  // the most recent window of each
  std::vector<double> running_;           // the return so far of each environment's episode
  std::vector<double> counts_;            // 1: each environment's current episode counts (began after restart)
};

struct UpdateStats {
  int64_t update = 0;       // 1-based
  int64_t env_steps = 0;    // total so far
  double accuracy = 0, mean_return = 0;
  int64_t answers = 0, episodes = 0;  // totals so far
  int64_t window_answers = 0;         // the answers `accuracy` is over (at most the window)
  int64_t episode_length = 0;         // of the episodes starting after this update (a curriculum's stage)
  double policy_loss = 0, value_loss = 0, entropy = 0, approx_kl = 0, clip_frac = 0;
  double grad_norm = 0, grad_norm_max = 0;  // mean and largest over the update's gradient steps, before clipping
  int64_t skipped_steps = 0;                // gradient steps skipped as spikes (PPOOptions::skip_grad_spikes)
  double first_ratio_dev = 0;  // max |ratio - 1| of the first minibatch before its gradient step
  double seconds = 0, steps_per_second = 0;
  double rollout_seconds = 0;  // of `seconds`: collecting the chunk (env, policy steps, sampling)

  // Every field by name, in a fixed order (the CSV columns); from_fields inverts it.
  std::vector<std::pair<std::string, double>> fields() const;
  static UpdateStats from_fields(const std::vector<double>& values);
};

// PPOOptions::skip_grad_spikes: whether a gradient step of a given norm is a spike, against the
// median of the last `window` norms seen (spikes included: should the norms settle higher for good,
// the median follows and steps resume). A non-finite norm is always one; factor 0 never sees any.
class GradSpikeGuard {
 public:
  GradSpikeGuard(double factor, int64_t window) : factor_(factor), window_(window) {}
  bool is_spike(double norm);  // and remembers the norm
  std::vector<double> recent() const { return {recent_.begin(), recent_.end()}; }  // for checkpoints
  void set_recent(const std::vector<double>& norms) { recent_.assign(norms.begin(), norms.end()); }

 private:
  double factor_;
  int64_t window_;
  std::deque<double> recent_;
};

class PPOTrainer {
 public:
  PPOTrainer(std::unique_ptr<Env> env, RecurrentPolicy policy, const PPOOptions& options);

  UpdateStats update();  // collect a chunk, then train on it

  // The pieces of update(), for tests: collect() steps every environment rollout_len times (no
  // gradient); replay() runs group g of a chunk through the current policy as the update does.
  Rollout collect();
  PolicyOutput replay(const Rollout& r, int64_t group);

  // Everything a run depends on: policy, optimiser, environments, recurrent states, random
  // generators, statistics, the chunks the gradient carries into, the history of UpdateStats.
  void save(const std::string& path) const;
  void load(const std::string& path);
  // Accuracy and returns from here on only (EpisodeStats::restart).
  void restart_statistics() { stats_.restart(); }

  Env& env() { return *env_; }
  RecurrentPolicy& policy() { return policy_; }
  const PPOOptions& options() const { return options_; }
  const std::vector<UpdateStats>& history() const { return history_; }
  const std::vector<RecurrentState>& states() const { return states_; }
  const GradSpikeGuard& spike_guard() const { return spike_guard_; }
  int64_t group_size() const { return group_size_; }
  // With record_parameter_grad_norms: the last update's norms, [epochs * minibatches, P] float64 on
  // the CPU, one row per gradient step, columns in the order of parameter_names().
  const std::vector<std::string>& parameter_names() const { return parameter_names_; }
  const at::Tensor& parameter_grad_norms() const { return parameter_grad_norms_; }

 private:
  struct Carried {  // an earlier chunk that the gradient flows back into
    at::Tensor obs, resets;
    std::vector<RecurrentState> state0;
  };
  // Whether a rollout step calls the policy once per group (a stepwise replay must see the
  // rollout's shapes) rather than once for every environment.
  bool by_group() const { return options_.stepwise_replay && groups_ > 1; }
  void train(const Rollout& r, UpdateStats& stats);
  RecurrentState replay_start(const Rollout& r, int64_t group);
  at::Tensor rows(const at::Tensor& t, int64_t group) const { return t.narrow(1, group * group_size_, group_size_); }

  std::unique_ptr<Env> env_;
  RecurrentPolicy policy_;
  PPOOptions options_;
  int64_t groups_, group_size_;
  std::unique_ptr<torch::optim::Adam> optimizer_;
  at::Generator action_gen_;  // on the device: action sampling
  at::Generator order_gen_;   // CPU: minibatch order
  std::vector<RecurrentState> states_;  // per group
  at::Tensor first_;                    // [N] bool: the current observation starts an episode
  std::deque<Carried> carried_;
  GradSpikeGuard spike_guard_;
  EpisodeStats stats_;
  int64_t env_steps_ = 0;
  std::vector<UpdateStats> history_;
  std::vector<std::string> parameter_names_;
  at::Tensor parameter_grad_norms_;
};

}  // namespace statemamba::rl
