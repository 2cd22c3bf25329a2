#include "rl/policy.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/init.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>

namespace statemamba::rl {

namespace nn = torch::nn;

// ---- RecurrentState --------------------------------------------------------------------------------

namespace {
template <typename F>
RecurrentState map(const RecurrentState& s, F&& f) {
  RecurrentState out;
  for (const auto& t : s.tensors) out.tensors.push_back(f(t));
  return out;
}
}  // namespace

RecurrentState RecurrentState::clone() const { return map(*this, [](const at::Tensor& t) { return t.clone(); }); }
RecurrentState RecurrentState::detach() const { return map(*this, [](const at::Tensor& t) { return t.detach(); }); }
RecurrentState RecurrentState::to(at::Device device) const {
  return map(*this, [&](const at::Tensor& t) { return t.to(device); });
}
RecurrentState RecurrentState::narrow(int64_t start, int64_t length) const {
  return map(*this, [&](const at::Tensor& t) { return t.narrow(0, start, length); });
}

void RecurrentState::reset(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 1 && mask.size(0) == batch(),
              "RecurrentState::reset: mask must be bool [", batch(), "], got ", mask.scalar_type(), " ", mask.sizes());
  for (auto& t : tensors) {
    std::vector<int64_t> shape(t.dim(), 1);
    shape[0] = t.size(0);
    t = t.masked_fill(mask.to(t.device()).view(shape), 0);
  }
}

RecurrentState RecurrentState::cat(const std::vector<RecurrentState>& parts) {
  TORCH_CHECK(!parts.empty(), "RecurrentState::cat: nothing to concatenate");
  RecurrentState out;
  for (size_t i = 0; i < parts[0].tensors.size(); ++i) {
    std::vector<at::Tensor> rows;
    for (const auto& p : parts) rows.push_back(p.tensors.at(i));
    out.tensors.push_back(at::cat(rows, 0));
  }
  return out;
}

bool RecurrentState::equal(const RecurrentState& other) const {
  if (tensors.size() != other.tensors.size()) return false;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].sizes() != other.tensors[i].sizes() || !at::equal(tensors[i], other.tensors[i])) return false;
  return true;
}

// ---- RecurrentPolicy -------------------------------------------------------------------------------

RecurrentPolicyImpl::RecurrentPolicyImpl(int64_t obs_dim, int64_t num_actions, int64_t width)
    : obs_dim(obs_dim), num_actions(num_actions), width(width) {
  TORCH_CHECK(obs_dim >= 1 && num_actions >= 1 && width >= 1, "policy: obs_dim, num_actions and width must be ",
              "at least 1, got ", obs_dim, ", ", num_actions, ", ", width);
  encoder = register_module("encoder", nn::Linear(obs_dim, width));
  actor = register_module("actor", nn::Linear(width, num_actions));
  critic = register_module("critic", nn::Linear(width, 1));
  // A near-uniform first policy, as PPO implementations start: every action gets explored.
  torch::NoGradGuard no_grad;
  actor->weight.mul_(0.01);
  actor->bias.zero_();
}

PolicyOutput RecurrentPolicyImpl::run(const at::Tensor& obs, const RecurrentState& state, const at::Tensor& resets) {
  // A fresh copy: the dense kernels then see the same (allocator-aligned) input in the rollout and
  // in the replay, whatever buffer the observations were sliced from.
  auto [features, next] = core(encoder->forward(obs.clone(at::MemoryFormat::Contiguous)), state, resets);
  return {actor->forward(features), critic->forward(features).squeeze(-1), std::move(next)};
}

PolicyOutput RecurrentPolicyImpl::step(const at::Tensor& obs, const RecurrentState& state) {
  TORCH_CHECK(obs.dim() == 2 && obs.size(1) == obs_dim, "policy step: obs must be [N, ", obs_dim, "], got ",
              obs.sizes());
  PolicyOutput out = run(obs.unsqueeze(0), state, at::Tensor());
  out.logits = out.logits.squeeze(0);
  out.values = out.values.squeeze(0);
  return out;
}

PolicyOutput RecurrentPolicyImpl::forward_chunk(const at::Tensor& obs, const RecurrentState& state0,
                                                const at::Tensor& resets, bool stepwise) {
  TORCH_CHECK(obs.dim() == 3 && obs.size(2) == obs_dim, "policy forward_chunk: obs must be [T, N, ", obs_dim,
              "], got ", obs.sizes());
  TORCH_CHECK(!resets.defined() || (resets.scalar_type() == at::kBool && resets.sizes() == obs.sizes().slice(0, 2)),
              "policy forward_chunk: resets must be bool [T, N] = ", obs.sizes().slice(0, 2), ", got ",
              resets.defined() ? resets.sizes() : at::IntArrayRef{});
  if (!stepwise) return run(obs, state0, resets);
  std::vector<at::Tensor> logits, values;
  RecurrentState state = state0;
  for (int64_t t = 0; t < obs.size(0); ++t) {
    PolicyOutput out = run(obs.narrow(0, t, 1), state, resets.defined() ? resets.narrow(0, t, 1) : at::Tensor());
    logits.push_back(out.logits);
    values.push_back(out.values);
    state = std::move(out.state);
  }
  return {at::cat(logits, 0), at::cat(values, 0), std::move(state)};
}

std::pair<at::Tensor, at::Tensor> RecurrentPolicyImpl::step_inplace(const at::Tensor& obs, RecurrentState& state) {
  torch::NoGradGuard no_grad;
  PolicyOutput out = step(obs, state);
  for (size_t i = 0; i < state.tensors.size(); ++i) state.tensors[i].copy_(out.state.tensors[i]);
  return {out.logits, out.values};
}

// ---- Mamba -----------------------------------------------------------------------------------------

namespace {
MambaConfig mamba_config(const PolicyOptions& o) {
  TORCH_CHECK(o.dt_min > 0 && o.dt_min <= o.dt_max, "mamba policy: need 0 < dt_min <= dt_max, got dt_min = ",
              o.dt_min, ", dt_max = ", o.dt_max);
  return MambaConfig(o.width, o.layers, /*vocab_size=*/1)
      .d_state(o.d_state)
      .d_conv(o.d_conv)
      .expand(o.expand)
      .dt_min(o.dt_min)
      .dt_max(o.dt_max)
      .dt_init_floor(std::min(1e-4, o.dt_min));  // the floor would otherwise undo a small dt_min
}
}  // namespace

MambaPolicyImpl::MambaPolicyImpl(int64_t obs_dim, int64_t num_actions, const PolicyOptions& options)
    : RecurrentPolicyImpl(obs_dim, num_actions, options.width), config(mamba_config(options)), spec(config.state_spec()) {
  config.validate();
  TORCH_CHECK(options.bc_init_scale > 0, "mamba policy: bc_init_scale must be positive, got ", options.bc_init_scale);
  blocks = register_module("blocks", nn::ModuleList());
  for (int64_t i = 0; i < config.n_layer(); ++i) blocks->push_back(MambaBlock(config));
  norm_f = register_module("norm_f", Norm(config.d_model(), config.norm_eps(), config.rms_norm()));
  // As MambaModel: out_proj scaled so the residual stream's variance does not grow with depth.
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < config.n_layer(); ++i) {
    const auto& mixer = blocks->ptr<MambaBlockImpl>(i)->mixer;
    mixer->out_proj->weight.div_(std::sqrt(static_cast<double>(config.n_layer())));
    mixer->x_proj->weight.narrow(0, config.resolved_dt_rank(), 2 * config.d_state()).mul_(options.bc_init_scale);
  }
}

RecurrentState MambaPolicyImpl::initial_state(int64_t num_envs) const {
  RecurrentState state;
  for (const auto& layer : MambaStackState::zeros(config, num_envs, device()).layers) {
    state.tensors.push_back(layer.conv_state);
    state.tensors.push_back(layer.ssm_state);
  }
  return state;
}

MambaStackState MambaPolicyImpl::stack_state(const RecurrentState& state) const {
  TORCH_CHECK(static_cast<int64_t>(state.tensors.size()) == 2 * config.n_layer(), "mamba policy: a state of ",
              state.tensors.size(), " tensors is not this policy's (", 2 * config.n_layer(), ")");
  MambaStackState stack;
  for (int64_t i = 0; i < config.n_layer(); ++i) stack.layers.push_back({state.tensors[2 * i], state.tensors[2 * i + 1]});
  stack.fingerprint = spec.fingerprint;
  stack.config = spec.config;
  return stack;
}

std::string MambaPolicyImpl::describe() const {
  return "mamba(d_model=" + std::to_string(config.d_model()) + ", layers=" + std::to_string(config.n_layer()) +
         ", d_state=" + std::to_string(config.d_state()) + ", expand=" + std::to_string(config.expand()) + ", dt=[" +
         c10::str(config.dt_min()) + ", " + c10::str(config.dt_max()) + "])";
}

std::pair<at::Tensor, RecurrentState> MambaPolicyImpl::core(const at::Tensor& x, const RecurrentState& state,
                                                            const at::Tensor& resets) {
  const MambaStackState stack = stack_state(state);
  // The blocks take [N, T, d] and a [N, T] reset mask.
  at::Tensor hidden = x.transpose(0, 1).contiguous(), residual;
  const OptionalMask reset = resets.defined() ? OptionalMask(resets.transpose(0, 1).contiguous()) : std::nullopt;
  RecurrentState next;
  for (int64_t i = 0; i < config.n_layer(); ++i) {
    MambaInferenceState layer = stack.layers[i];
    std::tie(hidden, residual) = blocks->ptr<MambaBlockImpl>(i)->forward(hidden, residual, &layer, reset);
    next.tensors.push_back(layer.conv_state);
    next.tensors.push_back(layer.ssm_state);
  }
  const at::Tensor features = norm_f->forward(hidden + residual);
  return {features.transpose(0, 1), std::move(next)};
}

std::pair<at::Tensor, at::Tensor> MambaPolicyImpl::step_inplace(const at::Tensor& obs, RecurrentState& state) {
  TORCH_CHECK(obs.dim() == 2 && obs.size(1) == obs_dim, "policy step_inplace: obs must be [N, ", obs_dim, "], got ",
              obs.sizes());
  torch::NoGradGuard no_grad;
  MambaStackState stack = stack_state(state);  // shares the tensors: the blocks' step() writes them
  at::Tensor hidden = encoder->forward(obs), residual;
  for (int64_t i = 0; i < config.n_layer(); ++i)
    std::tie(hidden, residual) = blocks->ptr<MambaBlockImpl>(i)->step(hidden, residual, stack.layers[i]);
  const at::Tensor features = norm_f->forward(hidden + residual);
  return {actor->forward(features), critic->forward(features).squeeze(-1)};
}

// ---- GRU -------------------------------------------------------------------------------------------

GruPolicyImpl::GruPolicyImpl(int64_t obs_dim, int64_t num_actions, const PolicyOptions& options)
    : RecurrentPolicyImpl(obs_dim, num_actions, options.width), layers(options.layers), memory(options.gru_memory) {
  TORCH_CHECK(layers >= 1, "gru policy: layers must be at least 1, got ", layers);
  gru = register_module("gru", nn::GRU(nn::GRUOptions(width, width).num_layers(layers)));
  TORCH_CHECK(options.gru_memory == 0 || options.gru_memory > 2, "gru policy: gru_memory must be 0 (default ",
              "initialisation) or more than 2 steps, got ", options.gru_memory);
  if (options.gru_memory > 0) {
    torch::NoGradGuard no_grad;
    // Gates are stacked (reset, update, new); h' = (1 - z) n + z h, z = sigmoid(... + b_iz + b_hz).
    for (int64_t l = 0; l < layers; ++l) {
      const std::string suffix = "_l" + std::to_string(l);
      gru->named_parameters()["bias_ih" + suffix].narrow(0, width, width).zero_();
      gru->named_parameters()["bias_hh" + suffix].narrow(0, width, width).uniform_(1, options.gru_memory - 1).log_();
    }
  }
}

RecurrentState GruPolicyImpl::initial_state(int64_t num_envs) const {
  return {{at::zeros({num_envs, layers, width}, at::TensorOptions(device()).dtype(at::kFloat))}};
}

std::string GruPolicyImpl::describe() const {
  return "gru(hidden=" + std::to_string(width) + ", layers=" + std::to_string(layers) +
         (memory > 0 ? ", chrono init " + c10::str(memory) : std::string()) + ")";
}

std::pair<at::Tensor, RecurrentState> GruPolicyImpl::core(const at::Tensor& x, const RecurrentState& state,
                                                          const at::Tensor& resets) {
  TORCH_CHECK(state.tensors.size() == 1, "gru policy: a state of ", state.tensors.size(), " tensors is not this policy's (1)");
  at::Tensor h = state.tensors[0].transpose(0, 1).contiguous();  // nn::GRU's [layers, N, width]
  const int64_t T = x.size(0);
  // nn::GRU cannot reset rows mid-sequence, so the chunk is cut where any row restarts; each piece
  // runs whole (one cuDNN call on GPU) after zeroing the restarting rows.
  std::vector<int64_t> starts{0};
  if (resets.defined() && T > 1) {
    const at::Tensor cut = resets.any(1).cpu();
    const auto any = cut.accessor<bool, 1>();
    for (int64_t t = 1; t < T; ++t)
      if (any[t]) starts.push_back(t);
  }
  starts.push_back(T);
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i + 1 < starts.size(); ++i) {
    const int64_t a = starts[i], b = starts[i + 1];
    if (resets.defined()) h = h.masked_fill(resets[a].view({1, -1, 1}), 0);
    auto [y, h_next] = gru->forward(x.narrow(0, a, b - a), h);
    ys.push_back(y);
    h = h_next;
  }
  return {ys.size() == 1 ? ys[0] : at::cat(ys, 0), {{h.transpose(0, 1)}}};
}

// ---- factory ---------------------------------------------------------------------------------------

RecurrentPolicy make_policy(const PolicyOptions& options, int64_t obs_dim, int64_t num_actions) {
  // Through the base pointer: ModuleHolder's forwarding constructor would try to build the base.
  using Base = std::shared_ptr<RecurrentPolicyImpl>;
  if (options.controller == "mamba") return RecurrentPolicy(Base(std::make_shared<MambaPolicyImpl>(obs_dim, num_actions, options)));
  if (options.controller == "gru") return RecurrentPolicy(Base(std::make_shared<GruPolicyImpl>(obs_dim, num_actions, options)));
  TORCH_CHECK(false, "policy: unknown controller '", options.controller, "' (mamba, gru)");
}

}  // namespace statemamba::rl
