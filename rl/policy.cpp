#include "rl/policy.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/init.h>
#include <torch/nn/utils/rnn.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

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

namespace {
// mask [N] as [N, 1, ...] against t [N, ...], on t's device; checked against the state's batch.
at::Tensor row_mask(const at::Tensor& mask, const at::Tensor& t, int64_t batch) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 1 && mask.size(0) == batch,
              "RecurrentState::reset: mask must be bool [", batch, "], got ", mask.scalar_type(), " ", mask.sizes());
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = t.size(0);
  return mask.to(t.device()).view(shape);
}
}  // namespace

void RecurrentState::reset(const at::Tensor& mask) {
  for (auto& t : tensors) t = t.masked_fill(row_mask(mask, t, batch()), 0);
}

void RecurrentState::reset_inplace(const at::Tensor& mask) {
  for (auto& t : tensors) t.masked_fill_(row_mask(mask, t, batch()), 0);
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

std::pair<at::Tensor, at::Tensor> RecurrentPolicyImpl::step_inplace(const at::Tensor& obs, RecurrentState& state,
                                                                    const at::Tensor& reset) {
  torch::NoGradGuard no_grad;
  if (reset.defined()) state.reset_inplace(reset);
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

std::pair<at::Tensor, at::Tensor> MambaPolicyImpl::step_inplace(const at::Tensor& obs, RecurrentState& state,
                                                                const at::Tensor& reset) {
  TORCH_CHECK(obs.dim() == 2 && obs.size(1) == obs_dim, "policy step_inplace: obs must be [N, ", obs_dim, "], got ",
              obs.sizes());
  torch::NoGradGuard no_grad;
  MambaStackState stack = stack_state(state);  // shares the tensors: the blocks' step() writes them
  at::Tensor hidden = encoder->forward(obs), residual;
  for (int64_t i = 0; i < config.n_layer(); ++i)
    std::tie(hidden, residual) = blocks->ptr<MambaBlockImpl>(i)->step(
        hidden, residual, stack.layers[i], reset.defined() ? OptionalMask(reset) : std::nullopt);
  const at::Tensor features = norm_f->forward_sum(hidden, residual);  // one kernel, not seven
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

namespace {
// A chunk's rows cut at their episode starts: every segment is one sequence of a packed batch, in
// PackedSequence's layout (segments sorted by length, longest first; step k of all segments that
// are longer than k, then step k + 1, ...). Every step of the chunk lies in exactly one segment,
// so the packed rows are a permutation of the chunk's T * N rows.
struct EpisodePacking {
  at::Tensor batch_sizes;  // int64 [longest segment], CPU (as PackedSequence wants): segments longer than k
  // int64, in one buffer (one copy to the device), each a narrow of it:
  at::Tensor chunk_row;    // [T * N]: packed row p holds the chunk's row t * N + n = chunk_row[p]
  at::Tensor packed_row;   // [T * N]: the inverse, chunk row -> packed row
  at::Tensor initial_row;  // [segments]: the initial state's row n (N: the zero row) of each segment
  at::Tensor final_segment;  // [N]: environment n's last segment, whose final state is n's
};

// starts: the chunk's resets [T, N], bool, contiguous on the CPU.
EpisodePacking pack_episodes(const at::Tensor& starts, at::Device device) {
  const int64_t T = starts.size(0), N = starts.size(1);
  const bool* start = starts.data_ptr<bool>();
  struct Segment {
    int64_t env, begin, length;
  };
  std::vector<Segment> segments;
  for (int64_t n = 0; n < N; ++n) {
    int64_t begin = 0;
    for (int64_t t = 1; t < T; ++t)
      if (start[t * N + n]) segments.push_back({n, begin, t - begin}), begin = t;
    segments.push_back({n, begin, T - begin});
  }
  std::stable_sort(segments.begin(), segments.end(), [](const Segment& a, const Segment& b) { return a.length > b.length; });
  const int64_t S = static_cast<int64_t>(segments.size()), longest = segments[0].length;
  EpisodePacking p;
  p.batch_sizes = at::zeros({longest}, at::kLong);
  int64_t* batch = p.batch_sizes.data_ptr<int64_t>();
  for (const Segment& s : segments) ++batch[s.length - 1];
  for (int64_t k = longest - 2; k >= 0; --k) batch[k] += batch[k + 1];  // segments with length > k
  std::vector<int64_t> offset(longest, 0);  // packed row of step k's first segment
  for (int64_t k = 1; k < longest; ++k) offset[k] = offset[k - 1] + batch[k - 1];
  at::Tensor buffer = at::empty({2 * T * N + S + N}, at::kLong);
  int64_t* const chunk_row = buffer.data_ptr<int64_t>();
  int64_t* const packed_row = chunk_row + T * N;
  int64_t* const initial_row = packed_row + T * N;
  int64_t* const final_segment = initial_row + S;
  for (int64_t j = 0; j < S; ++j) {
    const Segment& s = segments[j];
    for (int64_t k = 0; k < s.length; ++k) {
      const int64_t row = (s.begin + k) * N + s.env, packed = offset[k] + j;
      chunk_row[packed] = row;
      packed_row[row] = packed;
    }
    initial_row[j] = s.begin == 0 && !start[s.env] ? s.env : N;
    if (s.begin + s.length == T) final_segment[s.env] = j;
  }
  buffer = buffer.to(device);
  p.chunk_row = buffer.narrow(0, 0, T * N);
  p.packed_row = buffer.narrow(0, T * N, T * N);
  p.initial_row = buffer.narrow(0, 2 * T * N, S);
  p.final_segment = buffer.narrow(0, 2 * T * N + S, N);
  return p;
}

// On the CPU, nn::GRU's backward of a packed sequence fills a zero gradient the size of the whole
// input at every time step (quadratic in the length), so chunks run there in blocks of this many
// steps. Forward + backward of 256 envs x 256 steps, width 32, episodes of 100 steps, one thread:
// 292 / 256 / 301 / 763 ms (medians) in blocks of 8 / 16 / 32 / 256 (one call), 575 cut at restarts.
constexpr int64_t kCpuBlockSteps = 16;

// nn::GRU over x [T, N, width] from h [layers, N, width] (nn::GRU's layout), rows restarting where
// resets [T, N] (on x's device; starts: the same on the CPU, or undefined when T = 1) says. Returns
// the outputs and the state after step T - 1.
std::pair<at::Tensor, at::Tensor> run_gru(nn::GRU& gru, const at::Tensor& x, const at::Tensor& h,
                                          const at::Tensor& resets, const at::Tensor& starts) {
  const int64_t T = x.size(0), N = x.size(1), width = x.size(2), layers = h.size(0);
  if (!starts.defined() || !starts.narrow(0, 1, T - 1).any().item<bool>()) {
    auto [y, h_next] = gru->forward(x, h.masked_fill(resets[0].view({1, -1, 1}), 0));
    return {y, h_next};
  }
  // Every episode piece is its own sequence: the given state starts the first, zeros the others.
  const EpisodePacking p = pack_episodes(starts, x.device());
  const at::Tensor data = x.reshape({T * N, width}).index_select(0, p.chunk_row);
  const at::Tensor h0 = at::cat({h, h.new_zeros({layers, 1, width})}, 1).index_select(1, p.initial_row);
  auto [out, h_n] = gru->forward_with_packed_input(nn::utils::rnn::PackedSequence(data, p.batch_sizes), h0);
  return {out.data().index_select(0, p.packed_row).view({T, N, width}), h_n.index_select(1, p.final_segment)};
}
}  // namespace

std::pair<at::Tensor, RecurrentState> GruPolicyImpl::core(const at::Tensor& x, const RecurrentState& state,
                                                          const at::Tensor& resets) {
  TORCH_CHECK(state.tensors.size() == 1, "gru policy: a state of ", state.tensors.size(), " tensors is not this policy's (1)");
  at::Tensor h = state.tensors[0].transpose(0, 1).contiguous();  // nn::GRU's [layers, N, width]
  if (!resets.defined()) {
    auto [y, h_next] = gru->forward(x, h);
    return {y, {{h_next.transpose(0, 1)}}};
  }
  const int64_t T = x.size(0);
  const at::Tensor starts = T > 1 ? resets.to(at::kCPU).contiguous() : at::Tensor();  // one copy, none per step()
  const bool restarts_inside = starts.defined() && starts.narrow(0, 1, T - 1).any().item<bool>();
  const int64_t block = x.is_cuda() || !restarts_inside ? T : kCpuBlockSteps;
  std::vector<at::Tensor> ys;
  for (int64_t a = 0; a < T; a += block) {
    const int64_t steps = std::min(block, T - a);
    at::Tensor y;
    std::tie(y, h) = run_gru(gru, x.narrow(0, a, steps), h, resets.narrow(0, a, steps),
                             steps > 1 ? starts.narrow(0, a, steps) : at::Tensor());
    ys.push_back(y);
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
