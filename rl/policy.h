#pragma once
// Recurrent actor-critic policies with explicit state, one interface for Mamba and GRU:
//
//   auto policy = make_policy({"mamba"}, env.obs_dim(), env.num_actions());
//   RecurrentState state = policy->initial_state(num_envs);            // zeros, on the policy's device
//   auto out = policy->step(obs, state);       // obs [N, obs_dim] -> logits [N, A], values [N], out.state
//   auto chunk = policy->forward_chunk(obs_T, state0, resets_T);       // [T, N, ...], time-major
//
// resets[t, n] starts environment n afresh before step t (its state is zeroed there): an episode
// boundary inside the chunk. Neither call changes the state it is given; both return the next one.
// forward_chunk is differentiable, through state0 too (the Mamba ops' initial-state gradient).
//
// Rollout and replay. step() runs forward_chunk's own path with T = 1 (for Mamba the full-sequence
// ops, not the decode ops: one set of kernels for both). Replaying a stored chunk with
// stepwise = true repeats the rollout's calls one step at a time, so its logits and values equal
// the rollout's bit for bit. Whole-chunk replay (stepwise = false) is faster but matches only to
// rounding: dense kernels (MKL, cuBLAS) and CPU pointwise loops (vector body vs scalar tail) give
// results that depend on the number of rows, not just on each row.
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/rnn.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <vector>

#include "mamba/config.h"
#include "mamba/modules.h"
#include "state/state.h"

namespace statemamba::rl {

// A policy's recurrent state: tensors whose first dimension is the environment. Copying shares the
// tensors; every operation here returns or assigns new tensors and never writes into them, so a
// stored copy (a chunk's initial state) stays valid while the rollout moves on.
struct RecurrentState {
  std::vector<at::Tensor> tensors;

  int64_t batch() const { return tensors.empty() ? 0 : tensors[0].size(0); }
  RecurrentState clone() const;
  RecurrentState detach() const;
  RecurrentState to(at::Device device) const;
  // Zeroes the rows n where mask[n] (bool [N]) is true: those environments start afresh.
  void reset(const at::Tensor& mask);
  // The same in place (the tensors keep their storage, as a captured CUDA graph needs).
  void reset_inplace(const at::Tensor& mask);
  // Rows [start, start + length): one group of environments.
  RecurrentState narrow(int64_t start, int64_t length) const;
  static RecurrentState cat(const std::vector<RecurrentState>& parts);
  // Exact equality of every tensor.
  bool equal(const RecurrentState& other) const;
};

struct PolicyOutput {
  at::Tensor logits;  // [T, N, A] ([N, A] from step)
  at::Tensor values;  // [T, N] ([N] from step)
  RecurrentState state;
};

struct PolicyOptions {
  std::string controller = "mamba";  // mamba | gru
  int64_t width = 64;                // d_model (Mamba) / hidden size (GRU)
  int64_t layers = 1;
  // Mamba only.
  int64_t d_state = 16, d_conv = 4, expand = 2;
  // Initial Δ range: a channel holds memory for about 1/(Δ·|A|) steps, |A| >= 1, so dt_min sets the
  // longest memory at initialisation.
  double dt_min = 1e-3, dt_max = 0.1;
  // The rows of x_proj that make B and C start this many times larger than nn.Linear's default.
  // The bits reach an answer only through B (the write into the state) times C (the read): with
  // both at the default size the product is tiny in a one-layer policy, and learning sits on a
  // plateau (2 bits, delay 16, supervised: no progress in 400 steps at 1x; 90% after ~180 at 4x).
  // Longer delays want more (PPO, 4 bits, 1024 envs, H100): delay 16, 90% after 91 updates at 4x,
  // 57 at 16x; delay 100, still at chance after 623 updates at 4x, 93% after 350 at 16x.
  double bc_init_scale = 16;
  // GRU only: chrono initialisation (Tallec & Ollivier, 2018) when > 1. The update gate's bias
  // starts at log(u), u ~ U(1, gru_memory - 1), so unit i keeps its value for about 1 + u_i steps
  // instead of ~2 (nn::GRU's default bias, zero on average, forgets half of the state every step).
  double gru_memory = 0;
};

// Encoder -> recurrent core -> actor and critic heads. Subclasses supply the core and its state.
class RecurrentPolicyImpl : public torch::nn::Module {
 public:
  RecurrentPolicyImpl(int64_t obs_dim, int64_t num_actions, int64_t width);

  virtual RecurrentState initial_state(int64_t num_envs) const = 0;
  PolicyOutput step(const at::Tensor& obs, const RecurrentState& state);
  PolicyOutput forward_chunk(const at::Tensor& obs, const RecurrentState& state0, const at::Tensor& resets,
                             bool stepwise = false);
  // Inference only, for rollouts that are never replayed (throughput): advances `state` in place
  // and returns (logits [N, A], values [N]). Rows marked in `reset` (bool [N], optional) forget
  // their past first. Mamba uses the decode ops (causal_conv1d_update, selective_state_update;
  // fused on CUDA, the reset inside the kernel), equal to step() to rounding, not bit for bit.
  virtual std::pair<at::Tensor, at::Tensor> step_inplace(const at::Tensor& obs, RecurrentState& state,
                                                         const at::Tensor& reset = {});
  virtual std::string describe() const = 0;
  at::Device device() const { return actor->weight.device(); }

  int64_t obs_dim, num_actions, width;
  torch::nn::Linear encoder{nullptr}, actor{nullptr}, critic{nullptr};

 protected:
  // x [T, N, width] -> features [T, N, width] and the state after step T-1; resets [T, N] bool or
  // undefined (no boundary in the chunk).
  virtual std::pair<at::Tensor, RecurrentState> core(const at::Tensor& x, const RecurrentState& state,
                                                     const at::Tensor& resets) = 0;

 private:
  PolicyOutput run(const at::Tensor& obs, const RecurrentState& state, const at::Tensor& resets);
};
TORCH_MODULE(RecurrentPolicy);

// A stack of MambaBlocks (pre-norm residual, mamba_ssm's Block) and a final norm. Its state holds,
// per layer, the MambaInferenceState's conv_state and ssm_state: tensors [2i] and [2i + 1].
class MambaPolicyImpl : public RecurrentPolicyImpl {
 public:
  MambaPolicyImpl(int64_t obs_dim, int64_t num_actions, const PolicyOptions& options);
  RecurrentState initial_state(int64_t num_envs) const override;
  std::pair<at::Tensor, at::Tensor> step_inplace(const at::Tensor& obs, RecurrentState& state,
                                                 const at::Tensor& reset = {}) override;
  std::string describe() const override;
  // The state as the library's state object (shares the tensors), e.g. to save it as .h5.
  MambaStackState stack_state(const RecurrentState& state) const;

  MambaConfig config;
  StateSpec spec;  // config.state_spec(), kept: it is built from JSON, too slow to redo every step
  torch::nn::ModuleList blocks{nullptr};
  Norm norm_f{nullptr};

 protected:
  std::pair<at::Tensor, RecurrentState> core(const at::Tensor& x, const RecurrentState& state,
                                             const at::Tensor& resets) override;
};

// torch::nn::GRU (cuDNN on GPU). Its state is the hidden state, batch first: [N, layers, width].
// Episodes that restart inside a chunk run as the sequences of a packed batch (see core).
class GruPolicyImpl : public RecurrentPolicyImpl {
 public:
  GruPolicyImpl(int64_t obs_dim, int64_t num_actions, const PolicyOptions& options);
  RecurrentState initial_state(int64_t num_envs) const override;
  std::string describe() const override;

  int64_t layers;
  double memory;  // PolicyOptions::gru_memory
  torch::nn::GRU gru{nullptr};

 protected:
  // nn::GRU cannot zero a row's state mid-sequence. Cutting the chunk at every step where some
  // environment restarts would cost one call per piece, and with many environments some restart
  // at almost every step (2048 envs, episodes of ~1000 steps: ~256 calls per layer for 256 steps).
  // Instead every environment's row is split at its own restarts and the pieces run as the
  // sequences of one packed batch (one cuDNN call on GPU), the first piece from the given state,
  // the later ones from zeros. On the CPU the chunk runs in blocks of a few steps, one packed call
  // each: nn::GRU's CPU backward of a packed sequence is quadratic in its length. A chunk (block)
  // with no restart after its first step, and step() (T = 1), run as one plain call.
  std::pair<at::Tensor, RecurrentState> core(const at::Tensor& x, const RecurrentState& state,
                                             const at::Tensor& resets) override;
};

// The named controller; c10::Error naming the option when one is out of range.
RecurrentPolicy make_policy(const PolicyOptions& options, int64_t obs_dim, int64_t num_actions);

}  // namespace statemamba::rl
