#include "rl/ppo.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/nn/utils/clip_grad.h>
#include <torch/serialize/archive.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include "rl/kernels.h"

#ifdef STATEMAMBA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace statemamba::rl {

at::Tensor sample_actions(const at::Tensor& logits, const at::Generator& gen) {
  TORCH_CHECK(logits.dim() == 2, "sample_actions: logits must be [N, A], got ", logits.sizes());
  const at::Tensor u = at::rand({logits.size(0)}, gen, logits.options().dtype(at::kFloat));
  return categorical_from_uniform(logits.to(at::kFloat).contiguous(), u);
}

// ---- GAE -------------------------------------------------------------------------------------------

std::pair<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& dones,
                                      const at::Tensor& last_values, double gamma, double lambda) {
  at::Tensor advantages = at::empty_like(values);
  at::Tensor running = at::zeros_like(last_values), next_value = last_values;
  for (int64_t t = values.size(0) - 1; t >= 0; --t) {
    const at::Tensor alive = 1 - dones[t].to(values.scalar_type());  // no bootstrap across an episode's end
    const at::Tensor delta = rewards[t] + gamma * next_value * alive - values[t];
    running = delta + gamma * lambda * alive * running;
    advantages[t] = running;
    next_value = values[t];
  }
  return {advantages, advantages + values};
}

// ---- EpisodeStats ----------------------------------------------------------------------------------

EpisodeStats::EpisodeStats(int64_t num_envs, int64_t window)
    : window_(window), running_(num_envs, 0.0), counts_(num_envs, 1.0) {
  TORCH_CHECK(window >= 1, "accuracy window must be at least 1, got ", window);
}

void EpisodeStats::add(const Rollout& r) {
  const at::Tensor answered = r.answered.cpu(), correct = r.correct.cpu(), graded = r.graded.cpu(),
                   dones = r.dones.cpu(), rewards = r.rewards.cpu().to(at::kDouble);
  const auto ans = answered.accessor<bool, 2>(), cor = correct.accessor<bool, 2>(), gra = graded.accessor<bool, 2>(),
             don = dones.accessor<bool, 2>();
  const auto rew = rewards.accessor<double, 2>();
  auto push = [&](std::deque<double>& q, double v) {
    q.push_back(v);
    if (static_cast<int64_t>(q.size()) > window_) q.pop_front();
  };
  for (int64_t t = 0; t < answered.size(0); ++t)
    for (int64_t n = 0; n < answered.size(1); ++n) {
      const bool counts = counts_[n] > 0;
      if (ans[t][n] && counts) push(correct_, cor[t][n] ? 1.0 : 0.0), ++total_answers_;
      running_[n] += rew[t][n];
      if (don[t][n]) {
        if (gra[t][n] && counts) push(returns_, running_[n]), ++total_episodes_;
        running_[n] = 0;
        counts_[n] = 1;
      }
    }
}

namespace {
double mean(const std::deque<double>& q) {
  if (q.empty()) return std::numeric_limits<double>::quiet_NaN();
  double s = 0;
  for (double v : q) s += v;
  return s / static_cast<double>(q.size());
}
at::Tensor to_tensor(const std::deque<double>& q) { return at::tensor(std::vector<double>(q.begin(), q.end()), at::kDouble); }
std::vector<double> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.cpu().to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}
}  // namespace

double EpisodeStats::accuracy() const { return mean(correct_); }
void EpisodeStats::restart() {
  correct_.clear(), returns_.clear();
  std::fill(counts_.begin(), counts_.end(), 0.0);
}
double EpisodeStats::mean_return() const { return mean(returns_); }

void EpisodeStats::save(torch::serialize::OutputArchive& archive) const {
  archive.write("correct", to_tensor(correct_));
  archive.write("returns", to_tensor(returns_));
  archive.write("running", at::tensor(running_, at::kDouble));
  archive.write("counts", at::tensor(counts_, at::kDouble));
  archive.write("totals", at::tensor(std::vector<int64_t>{total_answers_, total_episodes_}, at::kLong));
}

void EpisodeStats::load(torch::serialize::InputArchive& archive) {
  at::Tensor correct, returns, running, totals;
  archive.read("correct", correct);
  archive.read("returns", returns);
  archive.read("running", running);
  archive.read("totals", totals);
  at::Tensor counts;
  archive.read("counts", counts);
  TORCH_CHECK(running.numel() == static_cast<int64_t>(running_.size()), "checkpoint: statistics for ",
              running.numel(), " environments, this run has ", running_.size());
  const auto c = to_vector(correct), r = to_vector(returns);
  correct_.assign(c.begin(), c.end());
  returns_.assign(r.begin(), r.end());
  running_ = to_vector(running);
  counts_ = to_vector(counts);
  totals = totals.cpu();
  total_answers_ = totals[0].item<int64_t>();
  total_episodes_ = totals[1].item<int64_t>();
}

// ---- UpdateStats -----------------------------------------------------------------------------------

std::vector<std::pair<std::string, double>> UpdateStats::fields() const {
  return {{"update", double(update)},
          {"env_steps", double(env_steps)},
          {"accuracy", accuracy},
          {"mean_return", mean_return},
          {"answers", double(answers)},
          {"episodes", double(episodes)},
          {"policy_loss", policy_loss},
          {"value_loss", value_loss},
          {"entropy", entropy},
          {"approx_kl", approx_kl},
          {"clip_frac", clip_frac},
          {"grad_norm", grad_norm},
          {"first_ratio_dev", first_ratio_dev},
          {"seconds", seconds},
          {"steps_per_second", steps_per_second},
          {"rollout_seconds", rollout_seconds},
          {"window_answers", double(window_answers)},
          {"episode_length", double(episode_length)},
          {"grad_norm_max", grad_norm_max},
          {"skipped_steps", double(skipped_steps)}};
}

UpdateStats UpdateStats::from_fields(const std::vector<double>& v) {
  UpdateStats s;
  TORCH_CHECK(v.size() == s.fields().size(), "UpdateStats: ", v.size(), " values for ", s.fields().size(), " fields");
  s.update = int64_t(v[0]), s.env_steps = int64_t(v[1]), s.accuracy = v[2], s.mean_return = v[3];
  s.answers = int64_t(v[4]), s.episodes = int64_t(v[5]), s.policy_loss = v[6], s.value_loss = v[7];
  s.entropy = v[8], s.approx_kl = v[9], s.clip_frac = v[10], s.grad_norm = v[11], s.first_ratio_dev = v[12];
  s.seconds = v[13], s.steps_per_second = v[14], s.rollout_seconds = v[15];
  s.window_answers = int64_t(v[16]), s.episode_length = int64_t(v[17]);
  s.grad_norm_max = v[18], s.skipped_steps = int64_t(v[19]);
  return s;
}

// ---- PPOTrainer ------------------------------------------------------------------------------------

PPOTrainer::PPOTrainer(std::unique_ptr<Env> env, RecurrentPolicy policy, const PPOOptions& options)
    : env_(std::move(env)),
      policy_(std::move(policy)),
      options_(options),
      spike_guard_(options.skip_grad_spikes, options.grad_spike_window),
      stats_(env_->num_envs(), options.accuracy_window) {
  const int64_t N = env_->num_envs();
  auto at_least_1 = [](const char* name, int64_t v) { TORCH_CHECK(v >= 1, "ppo: ", name, " must be at least 1, got ", v); };
  at_least_1("rollout_len", options_.rollout_len);
  at_least_1("epochs", options_.epochs);
  at_least_1("minibatches", options_.minibatches);
  at_least_1("grad_chunks", options_.grad_chunks);
  at_least_1("grad_spike_window", options_.grad_spike_window);
  TORCH_CHECK(options_.skip_grad_spikes == 0 || options_.skip_grad_spikes > 1, "ppo: skip_grad_spikes must be 0 (off) ",
              "or a factor above 1 of the median gradient norm, got ", options_.skip_grad_spikes);
  TORCH_CHECK(options_.lr_anneal_updates >= 0, "ppo: lr_anneal_updates must be 0 (constant lr) or positive, got ",
              options_.lr_anneal_updates);
  TORCH_CHECK(N % options_.minibatches == 0, "ppo: minibatches (", options_.minibatches,
              ") must divide num_envs (", N, "): each minibatch is a fixed group of environments");
  TORCH_CHECK(policy_->obs_dim == env_->obs_dim() && policy_->num_actions == env_->num_actions(), "ppo: the policy ",
              "takes ", policy_->obs_dim, " inputs and ", policy_->num_actions, " actions, the env has ",
              env_->obs_dim(), " and ", env_->num_actions());
  groups_ = options_.minibatches;
  group_size_ = N / groups_;
  policy_->to(env_->device());
  optimizer_ = std::make_unique<torch::optim::Adam>(
      policy_->parameters(), torch::optim::AdamOptions(options_.lr).eps(options_.adam_eps));
  action_gen_ = make_generator(env_->device(), options_.seed + 1);
  order_gen_ = make_generator(at::kCPU, options_.seed + 2);
  for (int64_t g = 0; g < groups_; ++g) states_.push_back(policy_->initial_state(group_size_));
  for (const auto& item : policy_->named_parameters()) parameter_names_.push_back(item.key());
  first_ = at::ones({N}, at::TensorOptions(env_->device()).dtype(at::kBool));
}

// ---- rollout ---------------------------------------------------------------------------------------

Rollout PPOTrainer::collect() {
  torch::NoGradGuard no_grad;
  const int64_t T = options_.rollout_len, n = group_size_;
  std::vector<at::Tensor> obs, resets, logits, values, actions, rewards, dones, answered, correct, graded;
  Rollout r;
  r.state0 = states_;  // shares tensors: nothing below writes into them
  at::Tensor o = env_->observe().clone();  // the env updates its own tensor in place
  // A stepwise replay must see the rollout's shapes, so the rollout steps group by group; a
  // whole-chunk replay matches only to rounding anyway, and one call for every environment saves
  // the per-call overhead (kernel launches on a GPU) groups - 1 times over.
  std::vector<RecurrentState> states = by_group() ? states_ : std::vector<RecurrentState>{RecurrentState::cat(states_)};
  const int64_t rows = by_group() ? n : env_->num_envs();
  for (int64_t t = 0; t < T; ++t) {
    obs.push_back(o);
    resets.push_back(first_);
    std::vector<at::Tensor> part_logits, part_values;
    for (size_t g = 0; g < states.size(); ++g) {
      PolicyOutput out = policy_->step(o.narrow(0, g * rows, rows), states[g]);
      part_logits.push_back(out.logits);
      part_values.push_back(out.values);
      states[g] = std::move(out.state);
    }
    logits.push_back(part_logits.size() == 1 ? part_logits[0] : at::cat(part_logits, 0));
    values.push_back(part_values.size() == 1 ? part_values[0] : at::cat(part_values, 0));
    const at::Tensor a = sample_actions(logits.back(), action_gen_);
    EnvStep s = env_->step(a);
    for (size_t g = 0; g < states.size(); ++g) states[g].reset(s.done.narrow(0, g * rows, rows));
    actions.push_back(a);
    rewards.push_back(s.reward);
    dones.push_back(s.done);
    answered.push_back(s.answered);
    correct.push_back(s.correct);
    graded.push_back(s.graded);
    first_ = s.done;
    o = s.obs;
  }
  std::vector<at::Tensor> last;
  for (size_t g = 0; g < states.size(); ++g) last.push_back(policy_->step(o.narrow(0, g * rows, rows), states[g]).values);
  if (by_group()) states_ = std::move(states);
  else
    for (int64_t g = 0; g < groups_; ++g) states_[g] = states[0].narrow(g * n, n).clone();  // own storage: saved alone
  r.obs = at::stack(obs), r.resets = at::stack(resets), r.logits = at::stack(logits), r.values = at::stack(values);
  r.actions = at::stack(actions), r.rewards = at::stack(rewards), r.dones = at::stack(dones);
  r.answered = at::stack(answered), r.correct = at::stack(correct), r.graded = at::stack(graded);
  r.last_values = at::cat(last, 0);
  env_steps_ += T * env_->num_envs();
  return r;
}

namespace {
// Waits for the device's work, so that the rollout's time counts its kernels, not their launch.
void synchronize(at::Device device) {
#ifdef STATEMAMBA_WITH_CUDA
  if (device.is_cuda()) c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
#else
  (void)device;
#endif
}
}  // namespace

RecurrentState PPOTrainer::replay_start(const Rollout& r, int64_t group) {
  RecurrentState start = r.state0[group];
  if (carried_.empty()) return start;
  RecurrentState s = carried_.front().state0[group];
  for (const Carried& c : carried_)
    s = policy_->forward_chunk(rows(c.obs, group), s, rows(c.resets, group), options_.stepwise_replay).state;
  // Straight through: the stored values, so the chunk replays as it was rolled out, and the
  // gradient of the replayed ones, which flows on into the earlier chunks.
  for (size_t i = 0; i < start.tensors.size(); ++i)
    start.tensors[i] = start.tensors[i].detach() + (s.tensors[i] - s.tensors[i].detach());
  return start;
}

PolicyOutput PPOTrainer::replay(const Rollout& r, int64_t group) {
  TORCH_CHECK(group >= 0 && group < groups_, "ppo replay: group ", group, " of ", groups_);
  return policy_->forward_chunk(rows(r.obs, group), replay_start(r, group), rows(r.resets, group),
                                options_.stepwise_replay);
}

void PPOTrainer::train(const Rollout& r, UpdateStats& stats) {
  const auto& o = options_;
  const auto [advantages, returns] = gae(r.rewards, r.values, r.dones, r.last_values, o.gamma, o.gae_lambda);
  std::vector<at::Tensor> logs;  // per minibatch: policy loss, value loss, entropy, kl, clip fraction, grad norm
  std::vector<at::Tensor> parameter_norms;  // per minibatch, with record_parameter_grad_norms
  for (int64_t epoch = 0; epoch < o.epochs; ++epoch) {
    const at::Tensor order = at::randperm(groups_, order_gen_, at::kLong);
    for (int64_t k = 0; k < groups_; ++k) {
      const int64_t g = order[k].item<int64_t>();
      const PolicyOutput out = replay(r, g);
      const at::Tensor actions = rows(r.actions, g).unsqueeze(-1);
      const at::Tensor logp_all = at::log_softmax(out.logits, -1);
      // The old log-probabilities from the stored logits, through the same kernel and shape as
      // the new ones: equal logits then give a ratio of exactly 1.
      const at::Tensor old_logp = at::log_softmax(rows(r.logits, g).contiguous(), -1).gather(-1, actions).squeeze(-1);
      const at::Tensor log_ratio = logp_all.gather(-1, actions).squeeze(-1) - old_logp;
      const at::Tensor ratio = log_ratio.exp();
      at::Tensor adv = rows(advantages, g);
      if (o.normalize_advantages) adv = (adv - adv.mean()) / (adv.std() + 1e-8);
      const at::Tensor policy_loss = -at::min(ratio * adv, ratio.clamp(1 - o.clip, 1 + o.clip) * adv).mean();
      const at::Tensor value_loss = 0.5 * (out.values - rows(returns, g)).square().mean();
      const at::Tensor entropy = -(logp_all.exp() * logp_all).sum(-1).mean();
      const at::Tensor loss = policy_loss + o.value_coef * value_loss - o.entropy_coef * entropy;
      if (epoch == 0 && k == 0) stats.first_ratio_dev = (ratio - 1).abs().max().item<double>();
      optimizer_->zero_grad();
      loss.backward();
      if (o.record_parameter_grad_norms) {
        std::vector<at::Tensor> norms;
        for (const auto& p : policy_->parameters())
          norms.push_back(p.grad().defined() ? p.grad().norm().to(at::kDouble) : at::zeros({}, p.options().dtype(at::kDouble)));
        parameter_norms.push_back(at::stack(norms));
      }
      const double grad_norm = torch::nn::utils::clip_grad_norm_(policy_->parameters(), o.max_grad_norm);
      stats.grad_norm_max = std::max(stats.grad_norm_max, grad_norm);
      if (spike_guard_.is_spike(grad_norm)) ++stats.skipped_steps;
      else optimizer_->step();
      torch::NoGradGuard no_grad;
      logs.push_back(at::stack({policy_loss, value_loss, entropy, ((ratio - 1) - log_ratio).mean(),
                                ((ratio - 1).abs() > o.clip).to(at::kFloat).mean(),
                                at::scalar_tensor(grad_norm, ratio.options())}));
    }
  }
  const at::Tensor m = at::stack(logs).mean(0).to(at::kDouble).cpu();
  const auto v = m.accessor<double, 1>();
  stats.policy_loss = v[0], stats.value_loss = v[1], stats.entropy = v[2], stats.approx_kl = v[3];
  stats.clip_frac = v[4], stats.grad_norm = v[5];
  if (o.record_parameter_grad_norms) parameter_grad_norms_ = at::stack(parameter_norms).cpu();
}

bool GradSpikeGuard::is_spike(double norm) {
  if (factor_ <= 0) return false;
  bool spike = !std::isfinite(norm);
  if (!spike && static_cast<int64_t>(recent_.size()) * 5 >= window_) {  // a fifth of the window is a median
    std::vector<double> sorted(recent_.begin(), recent_.end());
    std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
    spike = norm > factor_ * sorted[sorted.size() / 2];
  }
  if (std::isfinite(norm)) recent_.push_back(norm);
  while (static_cast<int64_t>(recent_.size()) > window_) recent_.pop_front();
  return spike;
}

UpdateStats PPOTrainer::update() {
  const auto t0 = std::chrono::steady_clock::now();
  const Rollout r = collect();
  synchronize(env_->device());
  UpdateStats s;
  s.rollout_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.add(r);
  if (options_.lr_anneal_updates > 0) {  // from the update's index alone: a resumed run gets the same rates
    const double left = 1.0 - static_cast<double>(history_.size()) / static_cast<double>(options_.lr_anneal_updates);
    for (auto& group : optimizer_->param_groups())
      static_cast<torch::optim::AdamOptions&>(group.options()).lr(options_.lr * std::max(0.0, left));
  }
  train(r, s);
  if (options_.grad_chunks > 1) {
    carried_.push_back({r.obs, r.resets, r.state0});
    while (static_cast<int64_t>(carried_.size()) > options_.grad_chunks - 1) carried_.pop_front();
  }
  s.update = static_cast<int64_t>(history_.size()) + 1;
  s.env_steps = env_steps_;
  s.accuracy = stats_.accuracy();
  s.mean_return = stats_.mean_return();
  s.answers = stats_.answers();
  s.window_answers = stats_.window_answers();
  s.episodes = stats_.episodes();
  s.episode_length = env_->episode_length();
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  s.steps_per_second = static_cast<double>(options_.rollout_len * env_->num_envs()) / s.seconds;
  history_.push_back(s);
  return s;
}

// ---- checkpoints -----------------------------------------------------------------------------------

namespace {
// Into a fresh tensor: InputArchive::read into a defined one would set_() it, keeping its dtype.
at::Tensor read_tensor(torch::serialize::InputArchive& archive, const std::string& key) {
  at::Tensor t;
  archive.read(key, t);
  return t;
}

std::string state_key(const std::string& prefix, size_t g, size_t i) {
  return prefix + "state." + std::to_string(g) + "." + std::to_string(i);
}
}  // namespace

void PPOTrainer::save(const std::string& path) const {
  torch::serialize::OutputArchive root, policy, optimizer, env, stats;
  policy_->save(policy);
  optimizer_->save(optimizer);
  env_->save(env);
  stats_.save(stats);
  root.write("policy", policy);
  root.write("optimizer", optimizer);
  root.write("env", env);
  root.write("stats", stats);
  // What the rest must match on load.
  const nlohmann::json meta = {{"env", env_->name()}, {"num_envs", env_->num_envs()}, {"policy", policy_->describe()},
                               {"groups", groups_}, {"rollout_len", options_.rollout_len},
                               {"grad_chunks", options_.grad_chunks}};
  root.write("meta", c10::IValue(meta.dump()));
  root.write("action_generator", action_gen_.get_state());
  root.write("order_generator", order_gen_.get_state());
  for (size_t g = 0; g < states_.size(); ++g)
    for (size_t i = 0; i < states_[g].tensors.size(); ++i) root.write(state_key("", g, i), states_[g].tensors[i]);
  root.write("first", first_);
  root.write("env_steps", c10::IValue(env_steps_));
  root.write("carried", c10::IValue(static_cast<int64_t>(carried_.size())));
  root.write("recent_grad_norms", at::tensor(spike_guard_.recent(), at::kDouble));
  for (size_t k = 0; k < carried_.size(); ++k) {
    const std::string prefix = "carried." + std::to_string(k) + ".";
    root.write(prefix + "obs", carried_[k].obs);
    root.write(prefix + "resets", carried_[k].resets);
    for (size_t g = 0; g < carried_[k].state0.size(); ++g)
      for (size_t i = 0; i < carried_[k].state0[g].tensors.size(); ++i)
        root.write(state_key(prefix, g, i), carried_[k].state0[g].tensors[i]);
  }
  std::vector<double> history;
  for (const auto& h : history_)
    for (const auto& [name, value] : h.fields()) history.push_back(value);
  const auto columns = static_cast<int64_t>(UpdateStats().fields().size());
  root.write("history", at::tensor(history, at::kDouble).view({static_cast<int64_t>(history_.size()), columns}));
  // Written beside, then renamed over: a crash mid-save leaves the previous checkpoint whole.
  const std::string tmp = path + ".tmp";
  root.save_to(tmp);
  TORCH_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "checkpoint: cannot rename ", tmp, " to ", path);
}

void PPOTrainer::load(const std::string& path) {
  torch::serialize::InputArchive root, policy, optimizer, env, stats;
  try {
    root.load_from(path, env_->device());
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "checkpoint: cannot read ", path, ": ", e.what_without_backtrace());
  }
  c10::IValue value;
  root.read("meta", value);
  const nlohmann::json meta = nlohmann::json::parse(value.toStringRef()),
                       want = {{"env", env_->name()}, {"num_envs", env_->num_envs()}, {"policy", policy_->describe()},
                               {"groups", groups_}, {"rollout_len", options_.rollout_len},
                               {"grad_chunks", options_.grad_chunks}};
  TORCH_CHECK(meta == want, "checkpoint ", path, " is for another setup: it has ", meta.dump(), ", this run is ",
              want.dump());
  const at::Tensor t = read_tensor(root, "history").cpu().contiguous();  // checked before anything is changed
  const auto columns = static_cast<int64_t>(UpdateStats().fields().size());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == columns, "checkpoint ", path, " was written by another version: it has ",
              t.dim() == 2 ? t.size(1) : -1, " statistics per update, this program keeps ", columns);
  root.read("policy", policy);
  root.read("optimizer", optimizer);
  root.read("env", env);
  root.read("stats", stats);
  policy_->load(policy);
  optimizer_->load(optimizer);
  env_->load(env);
  stats_.load(stats);
  action_gen_.set_state(read_tensor(root, "action_generator").cpu());
  order_gen_.set_state(read_tensor(root, "order_generator").cpu());
  auto read_states = [&](const std::string& prefix, std::vector<RecurrentState>& states) {
    for (int64_t g = 0; g < groups_; ++g) {
      RecurrentState s = policy_->initial_state(group_size_);
      for (size_t i = 0; i < s.tensors.size(); ++i) s.tensors[i] = read_tensor(root, state_key(prefix, g, i));
      states.push_back(s);
    }
  };
  states_.clear();
  read_states("", states_);
  first_ = read_tensor(root, "first");
  root.read("env_steps", value);
  env_steps_ = value.toInt();
  root.read("carried", value);
  carried_.clear();
  for (int64_t k = 0; k < value.toInt(); ++k) {
    const std::string prefix = "carried." + std::to_string(k) + ".";
    Carried c{read_tensor(root, prefix + "obs"), read_tensor(root, prefix + "resets"), {}};
    read_states(prefix, c.state0);
    carried_.push_back(std::move(c));
  }
  spike_guard_.set_recent(to_vector(read_tensor(root, "recent_grad_norms").cpu()));
  history_.clear();
  for (int64_t u = 0; u < t.size(0); ++u) history_.push_back(UpdateStats::from_fields(to_vector(t[u])));
}

}  // namespace statemamba::rl
