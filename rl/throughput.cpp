#include "rl/throughput.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/utils.h>

#include <chrono>
#include <vector>

#include "rl/ppo.h"

#ifdef STATEMAMBA_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace statemamba::rl {

struct RolloutStepper::Graph {
#ifdef STATEMAMBA_WITH_CUDA
  at::cuda::CUDAGraph graph;
#endif
};

RolloutStepper::RolloutStepper(std::unique_ptr<Env> env, RecurrentPolicy policy, uint64_t seed, bool decode)
    : env_(std::move(env)), policy_(std::move(policy)), decode_(decode) {
  TORCH_CHECK(policy_->obs_dim == env_->obs_dim() && policy_->num_actions == env_->num_actions(),
              "rollout stepper: the policy takes ", policy_->obs_dim, " inputs and ", policy_->num_actions,
              " actions, the env has ", env_->obs_dim(), " and ", env_->num_actions());
  policy_->to(env_->device());
  policy_->eval();
  action_gen_ = make_generator(env_->device(), seed + 1);
  state_ = policy_->initial_state(env_->num_envs());
  pending_reset_ = at::zeros({env_->num_envs()}, at::TensorOptions(env_->device()).dtype(at::kBool));
}

RolloutStepper::~RolloutStepper() = default;

// The rows whose episode ended in the previous step forget their past at the start of this one:
// Mamba's decode step does that inside its kernels, so no separate kernels zero the state.
void RolloutStepper::eager_step() {
  torch::NoGradGuard no_grad;
  at::Tensor logits;
  if (decode_) {
    logits = policy_->step_inplace(env_->observe(), state_, pending_reset_).first;
  } else {
    state_.reset_inplace(pending_reset_);
    PolicyOutput out = policy_->step(env_->observe(), state_);
    for (size_t i = 0; i < state_.tensors.size(); ++i) state_.tensors[i].copy_(out.state.tensors[i]);  // in place
    logits = out.logits;
  }
  pending_reset_.copy_(env_->step(sample_actions(logits, action_gen_)).done);  // in place: a graph reads it
}

void RolloutStepper::step() {
#ifdef STATEMAMBA_WITH_CUDA
  if (graph_) {
    graph_->graph.replay();
    return;
  }
#endif
  eager_step();
}

bool RolloutStepper::captured() const { return graph_ != nullptr; }

void RolloutStepper::capture() {
  TORCH_CHECK(!graph_, "rollout stepper: already captured");
#ifndef STATEMAMBA_WITH_CUDA
  TORCH_CHECK(false, "rollout stepper: CUDA graphs need a build with CUDA (-DSTATEMAMBA_CUDA=ON)");
#else
  const at::Device device = env_->device();
  TORCH_CHECK(device.is_cuda(), "rollout stepper: CUDA graphs need the environments on a CUDA device, they are on ",
              device);
  c10::cuda::CUDAGuard device_guard(device);
  // Capture on a side stream (the default one cannot), after warm-up steps there, so that cuBLAS
  // and cuDNN set themselves up outside the capture.
  auto stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
  c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
  auto graph = std::make_unique<Graph>();
  {
    c10::cuda::CUDAStreamGuard stream_guard(stream);
    for (int i = 0; i < 2; ++i) eager_step();
    stream.synchronize();
    // Generators other than the default must be registered: each replay then draws fresh numbers.
    graph->graph.register_generator_state(env_->generator());
    graph->graph.register_generator_state(action_gen_);
    graph->graph.capture_begin();
    try {
      eager_step();
    } catch (...) {
      try {
        graph->graph.capture_end();  // leaves the stream out of capture mode; the graph is dropped
      } catch (...) {
      }
      throw;
    }
    graph->graph.capture_end();
    stream.synchronize();
  }
  graph_ = std::move(graph);
#endif
}

namespace {
void synchronize(at::Device device) {
#ifdef STATEMAMBA_WITH_CUDA
  if (device.is_cuda()) c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
#endif
}
}  // namespace

ThroughputResult measure_throughput(RolloutStepper& stepper, int64_t warmup, int64_t steps) {
  TORCH_CHECK(warmup >= 0 && steps >= 1, "measure_throughput: need warmup >= 0 and steps >= 1, got ", warmup, " and ",
              steps);
  const at::Device device = stepper.env().device();
  for (int64_t i = 0; i < warmup; ++i) stepper.step();
  synchronize(device);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < steps; ++i) stepper.step();
  synchronize(device);
  ThroughputResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.policy = stepper.policy()->describe();
  r.controller = r.policy.substr(0, r.policy.find('('));
  r.env = stepper.env().name();
  r.device = device.str();
  r.num_envs = stepper.env().num_envs();
  r.steps = steps;
  r.cuda_graph = stepper.captured();
  r.decode = stepper.decode();
  r.env_steps_per_second = static_cast<double>(steps * r.num_envs) / r.seconds;
  return r;
}

}  // namespace statemamba::rl
