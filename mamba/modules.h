#pragma once
// The Mamba modules, mamba_ssm's architecture with its parameter names (so its and HF's
// checkpoints load), in LibTorch's TORCH_MODULE style:
//
//   Mamba             the selective SSM mixer: in_proj → causal conv + SiLU → x_proj → (Δ, B, C) →
//                     selective scan (+ D skip, gated by SiLU(z)) → out_proj
//   MambaBlock        pre-norm residual block around a Mamba mixer
//   MambaModel        embeddings → n_layer blocks → norm_f
//   MambaLMHeadModel  backbone (a MambaModel) → lm_head (tied to the embeddings by default)
//
// Recurrence is explicit. forward(x, state) continues the sequences from `state` and advances it;
// with no state (nullptr) they start from zero. step(x_t, state) consumes one token with the decode
// ops. An optional bool reset mask, [batch, L] for forward and [batch] for step, starts a row afresh
// at the marked positions (an episode boundary inside a chunk). Any chunking of a sequence gives the
// outputs of one pass.
//
//   MambaLMHeadModel model(MambaConfig(256, 4, 1000));
//   auto state = MambaStackState::zeros(model->options, /*batch=*/8);
//   auto logits = model->forward(tokens, &state);        // [8, L, padded vocab]; state advanced
//   auto next = model->step(tokens.select(1, -1), state);  // [8, padded vocab]
//
// Dtypes: the model may be float32, float64, bfloat16 or float16 (module->to(dtype)); its state is
// float32, or float64 for a float64 model (state_dtype()). A_log, D and the Δ bias enter the ops in
// the state dtype whatever the model's dtype.
//
// Training: forward() is differentiable, through a state passed in too (its tensors may require
// grad; forward() replaces them by the graph's outputs). step() is for inference: it writes the
// state in place and has no backward.
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <tuple>

#include "mamba/config.h"
#include "mamba/derived_tensor.h"
#include "state/state.h"

namespace statemamba {

using OptionalMask = std::optional<at::Tensor>;

// RMSNorm (config.rms_norm) or LayerNorm over the last dim, computed in float32 (float64 for
// float64 inputs) and returned in the input's dtype, as mamba_ssm's reference norms. Parameters:
// weight, and bias for LayerNorm.
class NormImpl : public torch::nn::Cloneable<NormImpl> {
 public:
  NormImpl(int64_t dim, double eps, bool rms);
  void reset() override;
  at::Tensor forward(const at::Tensor& x);
  // forward(hidden + residual) (residual may be undefined); RMSNorm as one fused op, equal to
  // forward to rounding.
  at::Tensor forward_sum(const at::Tensor& hidden, const at::Tensor& residual);

  int64_t dim;
  double eps;
  bool rms;
  at::Tensor weight, bias;
};
TORCH_MODULE(Norm);

// The selective SSM mixer; input and output [batch, L, d_model] (forward) or [batch, d_model] (step).
class MambaImpl : public torch::nn::Cloneable<MambaImpl> {
 public:
  explicit MambaImpl(MambaConfig options);
  void reset() override;  // (re)creates and initialises the parameters, as mamba_ssm's Mamba.__init__

  at::Tensor forward(const at::Tensor& x, MambaInferenceState* state = nullptr, const OptionalMask& reset = {});
  at::Tensor step(const at::Tensor& x, MambaInferenceState& state, const OptionalMask& reset = {});
  // step() from in_proj's output xz = in_proj(x), [batch, 2·d_inner] (a block's fused norm + in_proj).
  at::Tensor step_projected(const at::Tensor& xz, MambaInferenceState& state, const OptionalMask& reset = {});

  // The state dtype for this mixer's current parameter dtype.
  at::ScalarType state_dtype() const;

  // The seed API: a state the module holds, for callers that stream one batch through it.
  //   mixer->set_inference_state(MambaInferenceState::zeros(mixer->options, batch));
  //   y = mixer->forward(x, &mixer->inference_state());   // continues and advances it
  MambaInferenceState get_inference_state() const;            // a detached clone
  void set_inference_state(const MambaInferenceState& state);  // validates, then holds a copy
  MambaInferenceState& inference_state();                     // the held state itself

  MambaConfig options;
  StateSpec spec;  // options.state_spec(), kept since every call validates against it
  torch::nn::Linear in_proj{nullptr}, x_proj{nullptr}, dt_proj{nullptr}, out_proj{nullptr};
  torch::nn::Conv1d conv1d{nullptr};  // depthwise; its weight [d_inner, 1, d_conv] feeds the conv ops
  at::Tensor A_log;                   // [d_inner, d_state]; A = -exp(A_log)
  at::Tensor D;                       // [d_inner]

 private:
  // A, D and Δ's bias in the state dtype; the conv's weight [d_inner, d_conv] and bias in the
  // state dtype (the conv op's arithmetic dtype). Kept between inference calls (DerivedTensor).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> ssm_params() const;
  std::tuple<at::Tensor, std::optional<at::Tensor>> conv_params() const;

  struct DerivedParams {
    DerivedTensor A, D, dt_bias, conv_weight, conv_bias;
  };
  mutable DerivedParams derived_;

  std::optional<MambaInferenceState> held_;
};
TORCH_MODULE(Mamba);

// mamba_ssm's Block: residual = hidden + residual; hidden = mixer(norm(residual)). The residual
// stream is kept in float32 when options.residual_in_fp32. Takes and returns (hidden, residual);
// residual is undefined on the first block.
class MambaBlockImpl : public torch::nn::Cloneable<MambaBlockImpl> {
 public:
  explicit MambaBlockImpl(MambaConfig options);
  void reset() override;

  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& residual = {},
                                             MambaInferenceState* state = nullptr, const OptionalMask& reset = {});
  std::tuple<at::Tensor, at::Tensor> step(const at::Tensor& hidden, const at::Tensor& residual,
                                          MambaInferenceState& state, const OptionalMask& reset = {});

  MambaConfig options;
  Mamba mixer{nullptr};
  Norm norm{nullptr};

 private:
  // (norm(residual'), residual') with residual' = hidden + residual.
  std::tuple<at::Tensor, at::Tensor> pre_norm(const at::Tensor& hidden, const at::Tensor& residual);
  at::ScalarType residual_dtype(const at::Tensor& hidden, const at::Tensor& residual) const;
};
TORCH_MODULE(MambaBlock);

// The backbone: token ids [batch, L] (forward) or [batch] (step) → final hidden states.
class MambaModelImpl : public torch::nn::Cloneable<MambaModelImpl> {
 public:
  explicit MambaModelImpl(MambaConfig options);
  // Creates the layers and initialises as mamba_ssm's MixerModel (_init_weights): embeddings
  // N(0, 0.02), Linear biases zero, out_proj weights scaled by 1/sqrt(n_layer).
  void reset() override;

  at::Tensor forward(const at::Tensor& input_ids, MambaStackState* state = nullptr, const OptionalMask& reset = {});
  at::Tensor step(const at::Tensor& input_ids, MambaStackState& state, const OptionalMask& reset = {});

  at::ScalarType state_dtype() const;
  MambaBlock layer(int64_t i) const;

  // The seed API, for the whole stack (see MambaImpl).
  MambaStackState get_inference_state() const;
  void set_inference_state(const MambaStackState& state);
  MambaStackState& inference_state();

  MambaConfig options;
  StateSpec spec;
  torch::nn::Embedding embeddings{nullptr};  // [padded vocab, d_model]
  torch::nn::ModuleList layers{nullptr};     // MambaBlocks
  Norm norm_f{nullptr};

 private:
  void check_state(const MambaStackState& state, const at::Tensor& input_ids) const;
  // norm_f(hidden + residual): the last block's output joined to the residual stream.
  at::Tensor final_norm(const at::Tensor& hidden, const at::Tensor& residual);

  std::optional<MambaStackState> held_;
};
TORCH_MODULE(MambaModel);

// The language model: logits [batch, L, padded vocab] (forward) or [batch, padded vocab] (step).
class MambaLMHeadModelImpl : public torch::nn::Cloneable<MambaLMHeadModelImpl> {
 public:
  explicit MambaLMHeadModelImpl(MambaConfig options);
  void reset() override;

  at::Tensor forward(const at::Tensor& input_ids, MambaStackState* state = nullptr, const OptionalMask& reset = {});
  at::Tensor step(const at::Tensor& input_ids, MambaStackState& state, const OptionalMask& reset = {});

  at::ScalarType state_dtype() const { return backbone->state_dtype(); }

  // The seed API, held by the backbone.
  MambaStackState get_inference_state() const { return backbone->get_inference_state(); }
  void set_inference_state(const MambaStackState& state) { backbone->set_inference_state(state); }
  MambaStackState& inference_state() { return backbone->inference_state(); }

  MambaConfig options;
  MambaModel backbone{nullptr};
  // Untied only: a tied head multiplies by backbone->embeddings->weight, and (as PyTorch's
  // named_parameters()) lists no second copy of it.
  torch::nn::Linear lm_head{nullptr};

 private:
  at::Tensor logits(const at::Tensor& hidden);
};
TORCH_MODULE(MambaLMHeadModel);

}  // namespace statemamba
