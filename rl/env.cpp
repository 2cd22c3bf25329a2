#include "rl/env.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include "rl/kernels.h"

namespace statemamba::rl {

at::Generator make_generator(at::Device device, uint64_t seed) {
  at::Generator gen = at::globalContext().defaultGenerator(device).clone();
  gen.set_current_seed(seed);
  return gen;
}

// ---- EpisodicEnv -----------------------------------------------------------------------------------

EpisodicEnv::EpisodicEnv(int64_t num_envs, int64_t length, at::Device device, uint64_t seed)
    : num_envs_(num_envs), length_(length), device_(device), gen_(make_generator(device, seed)) {
  TORCH_CHECK(num_envs >= 1, "env: num_envs must be at least 1, got ", num_envs);
}

at::TensorOptions EpisodicEnv::float_opts() const { return at::TensorOptions(device_).dtype(at::kFloat); }
at::TensorOptions EpisodicEnv::long_opts() const { return at::TensorOptions(device_).dtype(at::kLong); }

void EpisodicEnv::start() {
  // A random point of the first episode, so that boundaries do not line up across environments.
  phase_ = at::randint(length_, {num_envs_}, gen_, long_opts());
  lengths_ = at::full({num_envs_}, length_, long_opts());
  graded_ = at::zeros({num_envs_}, at::TensorOptions(device_).dtype(at::kBool));
  new_episodes(at::Tensor());
  obs_ = make_obs();
}

at::Tensor EpisodicEnv::checked_actions(const at::Tensor& actions) const {
  TORCH_CHECK(actions.defined() && actions.dim() == 1 && actions.size(0) == num_envs_, name(), ": actions must be [",
              num_envs_, "], got ", actions.defined() ? actions.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!actions.is_floating_point() && !actions.is_complex(), name(), ": actions must be integers, got ",
              actions.scalar_type());
  return actions.to(device_, at::kLong).contiguous();
}

EnvStep EpisodicEnv::step(const at::Tensor& actions) {
  const at::Tensor a = checked_actions(actions);
  const at::Tensor graded = graded_.clone();
  auto [reward, answered, correct] = grade(a);
  answered = answered & graded_;
  correct = correct & answered;
  // In place: the tensors stay where they are, so a CUDA graph that captured a step replays it on
  // the current values (a step must not hand out or keep tensors that the next one overwrites).
  const at::Tensor next_phase = phase_ + 1;
  const at::Tensor done = next_phase == lengths_;
  phase_.copy_(next_phase.masked_fill(done, 0));
  lengths_.masked_fill_(done, length_);
  graded_.copy_(graded_ | done);
  new_episodes(done);
  const at::Tensor obs = make_obs();
  obs_.copy_(obs);
  return {obs, reward, done, answered, correct, graded};
}

void EpisodicEnv::save(torch::serialize::OutputArchive& archive) const {
  archive.write("phase", phase_);
  archive.write("lengths", lengths_);
  archive.write("length", at::tensor(length_));
  archive.write("graded", graded_);
  archive.write("obs", obs_);
  archive.write("generator", gen_.get_state());
  for (auto& [key, tensor] : const_cast<EpisodicEnv*>(this)->task_tensors()) archive.write(key, *tensor);
}

void EpisodicEnv::load(torch::serialize::InputArchive& archive) {
  auto read = [&](const std::string& key, at::Tensor& into) {
    at::Tensor t;
    archive.read(key, t);
    TORCH_CHECK(!into.defined() || t.sizes() == into.sizes(), name(), ": checkpoint tensor '", key, "' has shape ",
                t.sizes(), ", this environment needs ", into.sizes(), " (another num_envs or task?)");
    if (into.defined()) into.copy_(t);  // in place, as step() keeps them
    else into = t.to(device_);
  };
  read("phase", phase_);
  read("lengths", lengths_);
  at::Tensor length;
  archive.read("length", length);
  length_ = length.item<int64_t>();
  read("graded", graded_);
  read("obs", obs_);
  for (auto& [key, tensor] : task_tensors()) read(key, *tensor);
  at::Tensor state;
  archive.read("generator", state);
  gen_.set_state(state.cpu());
}

// ---- DelayedMemoryEnv ----------------------------------------------------------------------------

DelayedMemoryEnv::DelayedMemoryEnv(int64_t num_envs, int64_t num_bits, int64_t delay, bool distractors,
                                   at::Device device, uint64_t seed, int64_t start_delay)
    : EpisodicEnv(num_envs, (start_delay >= 0 ? start_delay : delay) + 2, device, seed),
      num_bits_(num_bits),
      task_delay_(delay),
      distractors_(distractors) {
  TORCH_CHECK(start_delay <= delay, "memory env: the curriculum's first delay (", start_delay,
              ") must not exceed the task's (", delay, ")");
  // 2^k actions must stay a sane number of logits.
  TORCH_CHECK(num_bits >= 1 && num_bits <= 12, "memory env: num_bits must be in [1, 12], got ", num_bits);
  TORCH_CHECK(delay >= 0, "memory env: horizon (the delay) must be at least 0, got ", delay);
  start();
}

std::string DelayedMemoryEnv::name() const {
  return "memory(bits=" + std::to_string(num_bits_) + ", delay=" + std::to_string(task_delay_) +
         (distractors_ ? ", distractors" : "") + ")";
}

EnvStep DelayedMemoryEnv::step(const at::Tensor& actions) {
  const at::Tensor a = checked_actions(actions);
  // The draws of EpisodicEnv::step, in its order: new_episodes' fresh bits, then make_obs' noise.
  const at::Tensor fresh = at::randint(2, {num_envs_, num_bits_}, gen_, float_opts());
  const at::Tensor noise = distractors_ ? at::randint(2, {num_envs_, num_bits_}, gen_, float_opts()) : at::Tensor();
  MemoryStepOut s = delayed_memory_step(phase_, lengths_, graded_, bits_, obs_, a, fresh, noise, length_);
  return {s.obs, s.reward, s.done, s.answered, s.correct, s.graded};
}

void DelayedMemoryEnv::set_delay(int64_t delay) {
  TORCH_CHECK(delay >= 0 && delay <= task_delay_, "memory env: the delay must be in [0, ", task_delay_,
              "] (the task's), got ", delay);
  if (delay + 2 == length_) return;
  length_ = delay + 2;
  // Stagger the new stage. Were the episodes under way to keep their lengths, every environment
  // would begin it within one old episode of the others; a few doublings later they all answer in
  // the same step, and the rollout chunks between carry no reward at all (PPO then normalises pure
  // value noise into advantages). So each episode under way ends after 1..length_ more steps,
  // uniformly, its query moved there, and the current observation is made again: where it was a
  // query it is now a delay step.
  const at::Tensor more = at::randint(1, length_ + 1, {num_envs_}, gen_, long_opts());
  lengths_.copy_(phase_ + 1 + more);
  obs_.copy_(make_obs());
}

at::Tensor DelayedMemoryEnv::answer() const {
  const auto weights = at::pow(2.0, at::arange(num_bits_, float_opts()));
  return (bits_ * weights).sum(1).round().to(at::kLong);
}

void DelayedMemoryEnv::new_episodes(const at::Tensor& mask) {
  const auto fresh = at::randint(2, {num_envs_, num_bits_}, gen_, float_opts());
  if (mask.defined()) bits_.copy_(at::where(mask.unsqueeze(1), fresh, bits_));
  else bits_ = fresh;
}

at::Tensor DelayedMemoryEnv::make_obs() {
  const auto first = (phase_ == 0).unsqueeze(1), query = (phase_ == lengths_ - 1).unsqueeze(1);
  at::Tensor signal = at::where(first, 2 * bits_ - 1, at::zeros_like(bits_));
  if (distractors_) {
    const auto noise = 2 * at::randint(2, {num_envs_, num_bits_}, gen_, float_opts()) - 1;
    signal = at::where(first | query, signal, noise);
  }
  return at::cat({signal, first.to(at::kFloat), query.to(at::kFloat)}, 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> DelayedMemoryEnv::grade(const at::Tensor& actions) {
  const auto answered = phase_ == lengths_ - 1;
  const auto correct = answered & (actions == answer());
  return {correct.to(at::kFloat), answered, correct};
}

// ---- RepeatPreviousEnv ---------------------------------------------------------------------------

RepeatPreviousEnv::RepeatPreviousEnv(int64_t num_envs, int64_t cards, int64_t lag, int64_t length,
                                     at::Device device, uint64_t seed)
    : EpisodicEnv(num_envs, length, device, seed), cards_(cards), lag_(lag) {
  TORCH_CHECK(cards >= 2, "repeat-previous env: cards must be at least 2, got ", cards);
  TORCH_CHECK(lag >= 1, "repeat-previous env: horizon (the lag) must be at least 1, got ", lag);
  TORCH_CHECK(length > lag, "repeat-previous env: the episode length (", length, ") must exceed the lag (", lag, ")");
  start();
}

std::string RepeatPreviousEnv::name() const {
  return "repeat-previous(cards=" + std::to_string(cards_) + ", lag=" + std::to_string(lag_) +
         ", length=" + std::to_string(length_) + ")";
}

at::Tensor RepeatPreviousEnv::card_at(const at::Tensor& phase) const {
  return deck_.gather(1, phase.clamp_min(0).unsqueeze(1)).squeeze(1);
}

void RepeatPreviousEnv::new_episodes(const at::Tensor& mask) {
  const auto fresh = at::randint(cards_, {num_envs_, length_}, gen_, long_opts());
  if (mask.defined()) deck_.copy_(at::where(mask.unsqueeze(1), fresh, deck_));
  else deck_ = fresh;
}

at::Tensor RepeatPreviousEnv::make_obs() { return at::one_hot(card_at(phase_), cards_).to(at::kFloat); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> RepeatPreviousEnv::grade(const at::Tensor& actions) {
  const auto answered = phase_ >= lag_;
  const auto correct = answered & (actions == card_at(phase_ - lag_));
  return {correct.to(at::kFloat) / static_cast<double>(length_ - lag_), answered, correct};
}

// ---- factory ---------------------------------------------------------------------------------------

std::unique_ptr<Env> make_env(const EnvOptions& o, at::Device device, uint64_t seed) {
  if (o.task == "memory")
    return std::make_unique<DelayedMemoryEnv>(o.num_envs, o.num_bits, o.horizon, o.distractors, device, seed,
                                              o.curriculum_start);
  if (o.task == "repeat-previous")
    return std::make_unique<RepeatPreviousEnv>(o.num_envs, o.cards, o.horizon, o.length > 0 ? o.length : o.horizon + 32,
                                               device, seed);
  TORCH_CHECK(false, "env: unknown task '", o.task, "' (memory, repeat-previous)");
}

}  // namespace statemamba::rl
