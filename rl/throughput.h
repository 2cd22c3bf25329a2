#pragma once
// Rollout throughput: how many environment steps per second a policy can drive, counting what a
// rollout step does — the policy's step, sampling the actions, the environments' step, and zeroing
// the recurrent state of environments whose episode ended. No learning.
//
//   RolloutStepper stepper(make_env(options, device, seed), make_policy(...), seed);
//   stepper.capture();           // optional, CUDA only: the whole step becomes one CUDA graph
//   ThroughputResult r = measure_throughput(stepper, /*warmup=*/20, /*steps=*/200);
//
// Every tensor a step reads is updated in place (the environment's, the recurrent state, the
// observation), so a captured step replays on the current values: replaying the graph k times is
// k eager steps, by construction.
#include <memory>
#include <string>

#include "rl/env.h"
#include "rl/policy.h"

namespace statemamba::rl {

class RolloutStepper {
 public:
  // decode: the policy steps with step_inplace (Mamba: the decode ops) rather than step() (Mamba:
  // the scan ops over one step, as PPO's rollout, whose update replays it bit for bit).
  RolloutStepper(std::unique_ptr<Env> env, RecurrentPolicy policy, uint64_t seed, bool decode = false);
  ~RolloutStepper();

  // One step of every environment (eager, or the captured graph's replay).
  void step();
  // Captures step() into a CUDA graph (after two warm-up steps); c10::Error saying why when the
  // environments are not on a CUDA device or this build has no CUDA.
  void capture();
  bool captured() const;
  bool decode() const { return decode_; }

  Env& env() { return *env_; }
  RecurrentPolicy& policy() { return policy_; }
  // The state after the last step. Rows whose episode just ended (pending_reset()) are zeroed at
  // the start of the next step, not at the end of this one.
  const RecurrentState& state() const { return state_; }
  const at::Tensor& pending_reset() const { return pending_reset_; }

 private:
  void eager_step();

  std::unique_ptr<Env> env_;
  RecurrentPolicy policy_;
  bool decode_;
  at::Generator action_gen_;
  RecurrentState state_;
  at::Tensor pending_reset_;  // bool [N]
  struct Graph;
  std::unique_ptr<Graph> graph_;
};

struct ThroughputResult {
  std::string controller, policy, env, device;
  int64_t num_envs = 0, steps = 0;
  bool cuda_graph = false, decode = false;
  double seconds = 0, env_steps_per_second = 0;
};

// Times `steps` steps after `warmup` untimed ones (synchronising the device around the timing).
ThroughputResult measure_throughput(RolloutStepper& stepper, int64_t warmup, int64_t steps);

}  // namespace statemamba::rl
