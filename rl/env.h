#pragma once
// Memory tasks for recurrent RL, vectorised: num_envs environments live as tensors on one device
// and step together. Episodes start staggered (each environment begins at a random point of its
// first episode), so episode boundaries fall anywhere inside a rollout chunk.
//
//   DelayedMemory   at an episode's first step the agent sees k random bits, then `delay` steps of
//                   nothing (or distractor noise), then a query step where it must answer with the
//                   action sum_i bit_i 2^i. Reward 1 for the right answer, 0 otherwise (and on
//                   every other step). Episode length delay + 2.
//   RepeatPrevious  (POPGym) every step shows one of `cards` cards; from step `lag` on the agent
//                   must name the card shown `lag` steps earlier. Reward 1/(length - lag) per right
//                   answer, so a perfect episode returns 1.
//
// Every step grades some environments' actions (`answered`); accuracy is the share of graded
// answers that were right. The first, partial episode of each environment is never graded: its
// start was not seen.
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <torch/serialize/archive.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace statemamba::rl {

struct EnvStep {
  at::Tensor obs;       // [N, obs_dim] float: the next observation (a new episode's first where done)
  at::Tensor reward;    // [N] float
  at::Tensor done;      // [N] bool: the episode ended with this step
  at::Tensor answered;  // [N] bool: this step's action was graded
  at::Tensor correct;   // [N] bool: ...and was right
  at::Tensor graded;    // [N] bool: this step belongs to a graded episode (its start was seen)
};

class Env {
 public:
  virtual ~Env() = default;
  virtual std::string name() const = 0;
  virtual int64_t num_envs() const = 0;
  virtual int64_t obs_dim() const = 0;
  virtual int64_t num_actions() const = 0;
  // The length of episodes that start from now on (a curriculum may change it between steps).
  virtual int64_t episode_length() const = 0;
  virtual at::Device device() const = 0;
  // The current observation [N, obs_dim] (what the last step or the start produced).
  virtual at::Tensor observe() const = 0;
  // Applies actions (int64 [N]) and moves every environment one step on.
  virtual EnvStep step(const at::Tensor& actions) = 0;
  // The random generator the environment draws from (a CUDA graph capturing step() registers it).
  virtual at::Generator generator() const = 0;
  // Everything that decides the future (random generator included), for checkpoints.
  virtual void save(torch::serialize::OutputArchive& archive) const = 0;
  virtual void load(torch::serialize::InputArchive& archive) = 0;
};

// What the two tasks share: a phase per environment (its position in the episode), episode
// restarts, grading bookkeeping and the random generator. A task says what an episode holds
// (new_episodes), what the agent sees (make_obs) and how an action is graded (grade).
class EpisodicEnv : public Env {
 public:
  EpisodicEnv(int64_t num_envs, int64_t length, at::Device device, uint64_t seed);

  int64_t num_envs() const override { return num_envs_; }
  int64_t episode_length() const override { return length_; }
  at::Device device() const override { return device_; }
  // The same tensor throughout the environment's life: step() updates it (and the rest of the
  // environment's tensors) in place. EnvStep::obs is a fresh copy.
  at::Tensor observe() const override { return obs_; }
  at::Generator generator() const override { return gen_; }
  // The generic step: grade, move on, new_episodes where episodes ended, make_obs. A task may
  // override it with a fused one that must equal it (tests call EpisodicEnv::step as the reference).
  EnvStep step(const at::Tensor& actions) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  const at::Tensor& phase() const { return phase_; }      // int64 [N], in [0, lengths[n])
  const at::Tensor& lengths() const { return lengths_; }  // int64 [N]: each current episode's length

 protected:
  // Draws fresh content for the environments in `mask` (bool [N]); all of them when undefined.
  virtual void new_episodes(const at::Tensor& mask) = 0;
  // The observation at the current phases (random noise, if any, is drawn here: once a step).
  virtual at::Tensor make_obs() = 0;
  // (reward [N] float, answered [N] bool, correct [N] bool) for actions taken at the current phase.
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> grade(const at::Tensor& actions) = 0;
  // The task's own state tensors, by name, for save/load.
  virtual std::vector<std::pair<std::string, at::Tensor*>> task_tensors() = 0;

  // actions as int64 on the environments' device; c10::Error unless [num_envs].
  at::Tensor checked_actions(const at::Tensor& actions) const;

  // Call at the end of a derived constructor: staggers the phases and draws the first episodes.
  void start();

  at::TensorOptions float_opts() const;
  at::TensorOptions long_opts() const;

  int64_t num_envs_, length_;  // length_: of the episodes that start next
  at::Device device_;
  at::Generator gen_;
  at::Tensor phase_;    // int64 [N]
  at::Tensor lengths_;  // int64 [N]: the length each environment's current episode was given at its start
  at::Tensor graded_;  // bool [N]: this environment's episode began in view (not the first, partial one)
  at::Tensor obs_;     // float [N, obs_dim]: the current observation
};

class DelayedMemoryEnv : public EpisodicEnv {
 public:
  // obs: k bit channels (+-1 at the first step, distractor noise +-1 in the delay if distractors,
  // else 0), a start flag, a query flag.
  // start_delay >= 0: a horizon curriculum's first stage (episodes begin with that delay until
  // set_delay moves them on); the task, and name(), stay those of `delay`.
  DelayedMemoryEnv(int64_t num_envs, int64_t num_bits, int64_t delay, bool distractors, at::Device device,
                   uint64_t seed, int64_t start_delay = -1);
  std::string name() const override;
  int64_t obs_dim() const override { return num_bits_ + 2; }
  int64_t num_actions() const override { return int64_t{1} << num_bits_; }
  // The whole step in one pass (rl/kernels.h), drawing the same random numbers as EpisodicEnv::step.
  EnvStep step(const at::Tensor& actions) override;
  // A horizon curriculum's knob: episodes that start from now on have this delay (at most the
  // task's). Episodes under way end after a uniformly random 1..delay + 2 more steps, so that the
  // new stage's episodes are staggered too (their delay changes, their bits do not), and the
  // current observation is made again (a query in it moved on). Saved with the environment.
  void set_delay(int64_t delay);
  int64_t delay() const { return length_ - 2; }  // of episodes that start now
  int64_t task_delay() const { return task_delay_; }

  const at::Tensor& bits() const { return bits_; }  // float [N, k], 0/1
  at::Tensor answer() const;                         // int64 [N]: the action that scores

 protected:
  void new_episodes(const at::Tensor& mask) override;
  at::Tensor make_obs() override;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grade(const at::Tensor& actions) override;
  std::vector<std::pair<std::string, at::Tensor*>> task_tensors() override { return {{"bits", &bits_}}; }

 private:
  int64_t num_bits_, task_delay_;
  bool distractors_;
  at::Tensor bits_;
};

class RepeatPreviousEnv : public EpisodicEnv {
 public:
  // obs: the current card, one-hot over `cards`.
  RepeatPreviousEnv(int64_t num_envs, int64_t cards, int64_t lag, int64_t length, at::Device device,
                    uint64_t seed);
  std::string name() const override;
  int64_t obs_dim() const override { return cards_; }
  int64_t num_actions() const override { return cards_; }

 protected:
  void new_episodes(const at::Tensor& mask) override;
  at::Tensor make_obs() override;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grade(const at::Tensor& actions) override;
  std::vector<std::pair<std::string, at::Tensor*>> task_tensors() override { return {{"deck", &deck_}}; }

 private:
  at::Tensor card_at(const at::Tensor& phase) const;  // int64 [N]

  int64_t cards_, lag_;
  at::Tensor deck_;  // int64 [N, length]: the whole episode's cards, drawn at its start
};

struct EnvOptions {
  std::string task = "memory";  // memory | repeat-previous
  int64_t num_envs = 32;
  int64_t num_bits = 2;         // memory
  int64_t horizon = 16;         // memory: the delay; repeat-previous: the lag
  bool distractors = false;     // memory
  int64_t curriculum_start = -1;  // memory: the first delay of a horizon curriculum (-1: none)
  int64_t cards = 4;            // repeat-previous
  int64_t length = 0;           // repeat-previous: episode length (0: 4 * lag + 8)
};

// The named task; c10::Error naming the option when one is out of range.
std::unique_ptr<Env> make_env(const EnvOptions& options, at::Device device, uint64_t seed);

// A generator for `device` seeded with `seed` (a copy of the device's default, so it has its type).
at::Generator make_generator(at::Device device, uint64_t seed);

}  // namespace statemamba::rl
