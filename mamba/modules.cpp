#include "mamba/modules.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "ops/args.h"
#include "ops/ops.h"

namespace statemamba {
namespace {

namespace nn = torch::nn;

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// W · x for x [batch, in, L] (any strides): [batch, out, L], plus bias [out] when defined. One
// batched matmul with W broadcast over the batch (stride 0), which cuBLAS takes without a copy.
at::Tensor project(const at::Tensor& W, const at::Tensor& bias, const at::Tensor& x) {
  at::Tensor y = at::bmm(W.unsqueeze(0).expand({x.size(0), W.size(0), W.size(1)}), x);
  return bias.defined() ? y + bias.view({1, -1, 1}) : y;
}

// The held state of the seed API, shared by the mixer (one layer) and the model (the stack).
template <typename Held>  // std::optional<State>, const or not
auto& held_state(Held& held, const char* who) {
  TORCH_CHECK(held.has_value(), who, ": no inference state is held; call set_inference_state first");
  return *held;
}

template <typename State>
void hold_state(std::optional<State>& held, const State& state, const StateSpec& spec, at::Device device,
                at::ScalarType dtype) {
  state.validate_for(spec, state.batch(), device, dtype);
  held = state.detach().clone();
}

}  // namespace

// ---- Norm ----------------------------------------------------------------------------------------

NormImpl::NormImpl(int64_t dim, double eps, bool rms) : dim(dim), eps(eps), rms(rms) { reset(); }

void NormImpl::reset() {
  weight = register_parameter("weight", at::ones({dim}));
  if (!rms) bias = register_parameter("bias", at::zeros({dim}));
}

at::Tensor NormImpl::forward(const at::Tensor& x) {
  const auto acc = ops::state_dtype_for(x.scalar_type());
  const auto xf = x.to(acc);
  const auto y = rms ? xf * at::rsqrt(xf.square().mean(-1, /*keepdim=*/true) + eps) * weight.to(acc)
                     : at::layer_norm(xf, {dim}, weight.to(acc), bias.to(acc), eps);
  return y.to(x.scalar_type());
}

at::Tensor NormImpl::forward_sum(const at::Tensor& hidden, const at::Tensor& residual) {
  if (rms) return std::get<0>(ops::add_rms_norm(hidden, maybe(residual), weight, eps));
  const at::Tensor r = residual.defined() ? hidden + residual : hidden;
  return forward(r.to(weight.scalar_type()));
}

// ---- Mamba (the mixer) -----------------------------------------------------------------------------

MambaImpl::MambaImpl(MambaConfig options) : options(std::move(options)) { reset(); }

void MambaImpl::reset() {
  options.validate();
  spec = options.state_spec();
  const int64_t d_model = options.d_model(), d_inner = options.d_inner(), d_state = options.d_state();
  const int64_t dt_rank = options.resolved_dt_rank(), d_conv = options.d_conv();

  in_proj = register_module("in_proj", nn::Linear(nn::LinearOptions(d_model, 2 * d_inner).bias(options.bias())));
  conv1d = register_module("conv1d", nn::Conv1d(nn::Conv1dOptions(d_inner, d_inner, d_conv)
                                                    .groups(d_inner)
                                                    .padding(d_conv - 1)
                                                    .bias(options.conv_bias())));
  x_proj = register_module("x_proj", nn::Linear(nn::LinearOptions(d_inner, dt_rank + 2 * d_state).bias(false)));
  dt_proj = register_module("dt_proj", nn::Linear(nn::LinearOptions(dt_rank, d_inner).bias(true)));
  out_proj = register_module("out_proj", nn::Linear(nn::LinearOptions(d_inner, d_model).bias(options.bias())));

  // S4D-real: A = -(1, 2, ..., d_state) in every channel.
  A_log = register_parameter("A_log", at::log(at::arange(1, d_state + 1, at::kFloat)).repeat({d_inner, 1}));
  D = register_parameter("D", at::ones({d_inner}));

  torch::NoGradGuard no_grad;
  const double std = 1.0 / std::sqrt(static_cast<double>(dt_rank));
  dt_proj->weight.uniform_(-std, std);
  // Δ starts log-uniform in [dt_min, dt_max] (floored); the bias is its inverse softplus, so that
  // softplus(bias) = Δ when the projection contributes nothing.
  const double lo = std::log(options.dt_min()), hi = std::log(options.dt_max());
  const auto dt = at::exp(at::rand({d_inner}) * (hi - lo) + lo).clamp_min(options.dt_init_floor());
  dt_proj->bias.copy_(dt + at::log(-at::expm1(-dt)));
}

at::ScalarType MambaImpl::state_dtype() const { return ops::state_dtype_for(in_proj->weight.scalar_type()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> MambaImpl::ssm_params() const {
  const auto t = state_dtype();
  const auto cast = [t](const at::Tensor& p) { return p.to(t); };
  return {derived_.A.get(A_log, int64_t(t), [t](const at::Tensor& a) { return -at::exp(a.to(t)); }),
          derived_.D.get(D, int64_t(t), cast), derived_.dt_bias.get(dt_proj->bias, int64_t(t), cast)};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> MambaImpl::conv_params() const {
  // Already in the op's arithmetic dtype, so that its own cast is a no-op.
  const auto t = state_dtype();
  const auto weight = derived_.conv_weight.get(conv1d->weight, int64_t(t), [t](const at::Tensor& w) {
    return w.squeeze(1).to(t).contiguous();
  });
  if (!conv1d->bias.defined()) return {weight, std::nullopt};
  return {weight, derived_.conv_bias.get(conv1d->bias, int64_t(t), [t](const at::Tensor& b) { return b.to(t); })};
}

at::Tensor MambaImpl::forward(const at::Tensor& x, MambaInferenceState* state, const OptionalMask& reset) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == options.d_model(),
              "Mamba::forward: argument 'x' must have shape [batch, L, d_model] with d_model = ", options.d_model(),
              ", got ", x.sizes());
  if (state) state->validate_for(spec, x.size(0), x.device(), state_dtype());
  const int64_t d_inner = options.d_inner(), dt_rank = options.resolved_dt_rank(), d_state = options.d_state();
  // Channels first, [batch, channels, L], as the ops take them: every projection is W · x, a
  // batched matmul with the weight broadcast, which yields that layout without a transpose.
  const auto xT = x.transpose(1, 2);
  const auto& w_in = in_proj->weight;
  const auto& b_in = in_proj->bias;
  const auto u = project(w_in.narrow(0, 0, d_inner), b_in.defined() ? b_in.narrow(0, 0, d_inner) : b_in, xT);
  const auto z = project(w_in.narrow(0, d_inner, d_inner), b_in.defined() ? b_in.narrow(0, d_inner, d_inner) : b_in, xT);
  const auto [conv_weight, conv_bias] = conv_params();
  const auto [xc, conv_state] = ops::causal_conv1d(u, conv_weight, conv_bias,
                                                   state ? maybe(state->conv_state) : std::nullopt, reset,
                                                   /*silu=*/true);
  const auto x_dbl = project(x_proj->weight, {}, xc);                        // [batch, dt_rank + 2N, L]
  const auto dt = project(dt_proj->weight, {}, x_dbl.narrow(1, 0, dt_rank));  // its bias goes to the scan
  const auto [A, D_, dt_bias] = ssm_params();
  const auto [y, ssm_state] =
      ops::selective_scan(xc, dt, A, x_dbl.narrow(1, dt_rank, d_state), x_dbl.narrow(1, dt_rank + d_state, d_state),
                          D_, z, dt_bias, /*delta_softplus=*/true, state ? maybe(state->ssm_state) : std::nullopt,
                          reset);
  if (state) *state = {conv_state, ssm_state};
  // [batch, L, d_model], a view of channels-first memory (the next block's norm reads it as is).
  return project(out_proj->weight, out_proj->bias, y).transpose(1, 2);
}

at::Tensor MambaImpl::step(const at::Tensor& x, MambaInferenceState& state, const OptionalMask& reset) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == options.d_model(),
              "Mamba::step: argument 'x' must have shape [batch, d_model] with d_model = ", options.d_model(),
              ", got ", x.sizes());
  torch::NoGradGuard no_grad;  // the decode ops have no backward
  // The projections around the mixer step read their weights once (GEMV kernels on CUDA;
  // at::linear itself elsewhere).
  return step_projected(ops::small_batch_linear(x, in_proj->weight, maybe(in_proj->bias)), state, reset);
}

at::Tensor MambaImpl::step_projected(const at::Tensor& xz, MambaInferenceState& state, const OptionalMask& reset) {
  TORCH_CHECK(xz.dim() == 2 && xz.size(1) == 2 * options.d_inner(),
              "Mamba::step_projected: argument 'xz' must have shape [batch, 2 * d_inner] with d_inner = ",
              options.d_inner(), ", got ", xz.sizes());
  state.validate_for(spec, xz.size(0), xz.device(), state_dtype());
  torch::NoGradGuard no_grad;
  // conv update + SiLU, x_proj, dt_proj, state update and gate in one op: fused kernels on CUDA,
  // the separate decode ops (as forward's arithmetic) on the CPU.
  // The small parameters in float32, derived once as forward's (A = -exp(A_log)): no casts per step.
  const auto [conv_weight, conv_bias] = conv_params();
  const auto [A, D_, dt_bias] = ssm_params();
  const auto y = ops::mamba_mixer_step(xz, state.conv_state, state.ssm_state, conv_weight, conv_bias, x_proj->weight,
                                       dt_proj->weight, dt_bias, A, D_, reset);
  return ops::small_batch_linear(y, out_proj->weight, maybe(out_proj->bias));
}

MambaInferenceState MambaImpl::get_inference_state() const {
  return held_state(held_, "Mamba::get_inference_state").detach().clone();
}

void MambaImpl::set_inference_state(const MambaInferenceState& state) {
  hold_state(held_, state, spec, in_proj->weight.device(), state_dtype());
}

MambaInferenceState& MambaImpl::inference_state() { return held_state(held_, "Mamba::inference_state"); }

// ---- MambaBlock ----------------------------------------------------------------------------------

MambaBlockImpl::MambaBlockImpl(MambaConfig options) : options(std::move(options)) { reset(); }

void MambaBlockImpl::reset() {
  mixer = register_module("mixer", Mamba(options));
  norm = register_module("norm", Norm(options.d_model(), options.norm_eps(), options.rms_norm()));
}

at::ScalarType MambaBlockImpl::residual_dtype(const at::Tensor& hidden, const at::Tensor& residual) const {
  const auto promoted =
      residual.defined() ? at::promote_types(hidden.scalar_type(), residual.scalar_type()) : hidden.scalar_type();
  // "fp32" means at least fp32: a float64 model keeps its residual in float64.
  return options.residual_in_fp32() && promoted != at::kDouble ? at::kFloat : promoted;
}

std::tuple<at::Tensor, at::Tensor> MambaBlockImpl::pre_norm(const at::Tensor& hidden, const at::Tensor& residual) {
  const auto dtype = residual_dtype(hidden, residual);
  if (norm->rms) return ops::add_rms_norm(hidden, maybe(residual), norm->weight, norm->eps, dtype);
  const at::Tensor r = residual.defined() ? hidden + residual : hidden;
  return {norm->forward(r.to(norm->weight.scalar_type())), r.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor> MambaBlockImpl::forward(const at::Tensor& hidden, const at::Tensor& residual,
                                                           MambaInferenceState* state, const OptionalMask& reset) {
  const auto [h, r] = pre_norm(hidden, residual);
  return {mixer->forward(h, state, reset), r};
}

std::tuple<at::Tensor, at::Tensor> MambaBlockImpl::step(const at::Tensor& hidden, const at::Tensor& residual,
                                                        MambaInferenceState& state, const OptionalMask& reset) {
  if (norm->rms) {  // the norm and in_proj in one pass (one kernel at batch 1-2 on CUDA), same values
    torch::NoGradGuard no_grad;
    const auto& in_proj = mixer->in_proj;
    const auto [xz, r] = ops::add_rms_norm_linear(hidden, maybe(residual), norm->weight, norm->eps,
                                                  residual_dtype(hidden, residual), in_proj->weight,
                                                  maybe(in_proj->bias));
    return {mixer->step_projected(xz, state, reset), r};
  }
  const auto [h, r] = pre_norm(hidden, residual);
  return {mixer->step(h, state, reset), r};
}

// ---- MambaModel ----------------------------------------------------------------------------------

MambaModelImpl::MambaModelImpl(MambaConfig options) : options(std::move(options)) { reset(); }

void MambaModelImpl::reset() {
  options.validate();
  spec = options.state_spec();
  embeddings = register_module("embeddings", nn::Embedding(options.padded_vocab_size(), options.d_model()));
  layers = register_module("layers", nn::ModuleList());
  for (int64_t i = 0; i < options.n_layer(); ++i) layers->push_back(MambaBlock(options));
  norm_f = register_module("norm_f", Norm(options.d_model(), options.norm_eps(), options.rms_norm()));

  // mamba_ssm's _init_weights (one residual branch per layer).
  torch::NoGradGuard no_grad;
  embeddings->weight.normal_(0, 0.02);
  for (int64_t i = 0; i < options.n_layer(); ++i) {
    const Mamba mixer = layer(i)->mixer;
    for (const auto& linear : {mixer->in_proj, mixer->out_proj})
      if (linear->bias.defined()) linear->bias.zero_();
    // out_proj keeps its kaiming-uniform init, scaled down so the residual stream's variance
    // does not grow with depth.
    mixer->out_proj->weight.div_(std::sqrt(static_cast<double>(options.n_layer())));
  }
}

at::ScalarType MambaModelImpl::state_dtype() const { return ops::state_dtype_for(embeddings->weight.scalar_type()); }

MambaBlock MambaModelImpl::layer(int64_t i) const { return MambaBlock(layers->ptr<MambaBlockImpl>(i)); }

void MambaModelImpl::check_state(const MambaStackState& state, const at::Tensor& input_ids) const {
  state.validate_for(spec, input_ids.size(0), input_ids.device(), state_dtype());
}

at::Tensor MambaModelImpl::final_norm(const at::Tensor& hidden, const at::Tensor& residual) {
  return norm_f->forward_sum(hidden, residual);
}

at::Tensor MambaModelImpl::forward(const at::Tensor& input_ids, MambaStackState* state, const OptionalMask& reset) {
  TORCH_CHECK(input_ids.dim() == 2, "MambaModel::forward: argument 'input_ids' must have shape [batch, L], got ",
              input_ids.sizes());
  if (state) check_state(*state, input_ids);
  at::Tensor hidden = embeddings->forward(input_ids), residual;
  // Into channels-first memory, as every mixer's output is, so that each block's norm reads its
  // inputs in one layout without copying the residual stream.
  if (input_ids.size(1) > 1) hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2);
  for (int64_t i = 0; i < options.n_layer(); ++i)
    std::tie(hidden, residual) = layer(i)->forward(hidden, residual, state ? &state->layers[i] : nullptr, reset);
  if (state) state->tokens += input_ids.size(1);
  return final_norm(hidden, residual);
}

at::Tensor MambaModelImpl::step(const at::Tensor& input_ids, MambaStackState& state, const OptionalMask& reset) {
  TORCH_CHECK(input_ids.dim() == 1, "MambaModel::step: argument 'input_ids' must have shape [batch], got ",
              input_ids.sizes());
  check_state(state, input_ids);
  torch::NoGradGuard no_grad;
  at::Tensor hidden = embeddings->forward(input_ids), residual;
  for (int64_t i = 0; i < options.n_layer(); ++i)
    std::tie(hidden, residual) = layer(i)->step(hidden, residual, state.layers[i], reset);
  state.tokens += 1;
  return final_norm(hidden, residual);
}

MambaStackState MambaModelImpl::get_inference_state() const {
  return held_state(held_, "MambaModel::get_inference_state").detach().clone();
}

void MambaModelImpl::set_inference_state(const MambaStackState& state) {
  hold_state(held_, state, spec, embeddings->weight.device(), state_dtype());
}

MambaStackState& MambaModelImpl::inference_state() { return held_state(held_, "MambaModel::inference_state"); }

// ---- MambaLMHeadModel ----------------------------------------------------------------------------

MambaLMHeadModelImpl::MambaLMHeadModelImpl(MambaConfig options) : options(std::move(options)) { reset(); }

void MambaLMHeadModelImpl::reset() {
  backbone = register_module("backbone", MambaModel(options));
  if (!options.tie_embeddings())
    lm_head = register_module(
        "lm_head", nn::Linear(nn::LinearOptions(options.d_model(), options.padded_vocab_size()).bias(false)));
}

at::Tensor MambaLMHeadModelImpl::logits(const at::Tensor& hidden) {
  const at::Tensor& W = lm_head ? lm_head->weight : backbone->embeddings->weight;  // [vocab, d], no bias
  // forward's final hidden is a [batch, L, d] view of channels-first memory, which linear would
  // first copy; a batched matmul takes each [L, d] matrix as a transposed operand instead. Not
  // where W takes a gradient: the broadcast W's backward would build a [batch, d, vocab] buffer.
  if (hidden.dim() == 3 && hidden.size(1) > 1 && hidden.stride(1) == 1 &&
      !(at::GradMode::is_enabled() && W.requires_grad()))
    return at::bmm(hidden, W.t().unsqueeze(0).expand({hidden.size(0), W.size(1), W.size(0)}));
  // A decode step's [batch, d] rows in inference: the GEMV kernel at batch 1-2 on CUDA (reads the
  // head once), at::linear otherwise.
  if (hidden.dim() == 2 && !(at::GradMode::is_enabled() && W.requires_grad()))
    return ops::small_batch_linear(hidden, W, std::nullopt);
  return at::linear(hidden, W);
}

at::Tensor MambaLMHeadModelImpl::forward(const at::Tensor& input_ids, MambaStackState* state,
                                         const OptionalMask& reset) {
  return logits(backbone->forward(input_ids, state, reset));
}

at::Tensor MambaLMHeadModelImpl::step(const at::Tensor& input_ids, MambaStackState& state, const OptionalMask& reset) {
  const auto hidden = backbone->step(input_ids, state, reset);
  torch::NoGradGuard no_grad;
  return logits(hidden);
}

}  // namespace statemamba
