#pragma once
// Text generation with the state in plain sight:
//
//   prefill()     runs prompt tokens through the full-sequence forward, prefill_chunk tokens at a
//                 time (exact: any chunking equals one pass), continuing and advancing a state
//   Generation    a batch of prompts of any lengths: each is prefilled alone, the states are joined
//                 (MambaStackState::cat) and decoded together with step(); a row stops at EOS, all
//                 stop after max_new_tokens. It saves and resumes checkpoints (state, tokens, RNG,
//                 settings) so an interrupted run continues token for token.
//   score()       per-position logits and the perplexity of a token sequence
//
//   Generation gen(model, {prompt_ids}, GenerationOptions().max_new_tokens(50).eos_id(0));
//   gen.run([](int64_t row, int64_t id) { std::cout << id << ","; });
//
// Vocabulary: logits are cut to the model's vocab_size columns; the padding rows of the embedding
// (up to padded_vocab_size) are never sampled nor scored.
#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "mamba/modules.h"
#include "mamba/sampler.h"
#include "state/state.h"

namespace statemamba {

struct GenerationOptions {
  TORCH_ARG(int64_t, max_new_tokens) = 20;
  TORCH_ARG(int64_t, prefill_chunk) = 512;                   // tokens per forward; 0: all at once
  TORCH_ARG(std::optional<int64_t>, eos_id) = std::nullopt;  // a row stops once it emits this id
  // Only ids below this are sampled: the tokenizer's vocabulary, when the model has more rows.
  TORCH_ARG(std::optional<int64_t>, vocab_limit) = std::nullopt;
  TORCH_ARG(SamplingOptions, sampling) = {};

 public:
  void validate() const;  // c10::Error naming the field
};

// Runs ids [batch, L] (L >= 1) through the model from `state` (which must fit the model, batch and
// device), `chunk` tokens per forward (0: one pass), and advances the state. Returns the logits at
// the last position, [batch, vocab_size], in the model's dtype.
at::Tensor prefill(MambaLMHeadModel& model, const at::Tensor& ids, MambaStackState& state, int64_t chunk);

// A batch-1 zero state for the model, on its device in its state dtype.
MambaStackState zero_state(MambaLMHeadModel& model, int64_t batch = 1);

struct ScoreResult {
  at::Tensor logits;      // float32 [L, vocab_size] on the CPU; row t predicts ids[t + 1]
  double nll = 0;         // sum of -log p(ids[t + 1] | ids[0..t]) over the L - 1 predictions
  int64_t predicted = 0;  // L - 1
  double perplexity() const;
};
// Scores ids (at least 2) from `initial` (a batch-1 state, not modified) or from zeros.
ScoreResult score(MambaLMHeadModel& model, const std::vector<int64_t>& ids, int64_t chunk,
                  const MambaStackState* initial = nullptr);

// 16 hex digits naming the weights as loaded (names, shapes, dtype and a strided sample of each
// parameter's values): tells two checkpoints of one architecture apart, cheaply.
std::string weights_digest(MambaLMHeadModel& model);
// 16 hex digits naming a state's every value (and its token count).
std::string state_digest(const MambaStackState& state);

class Generation {
 public:
  using TokenCallback = std::function<void(int64_t row, int64_t token)>;

  // Prefills every prompt (each non-empty) alone from a copy of `initial` (a batch-1 state, e.g. a
  // document read earlier) or from zeros. `context` names anything else the output depends on
  // (such as which initial state); resume() insists on the same.
  Generation(MambaLMHeadModel model, std::vector<std::vector<int64_t>> prompts, GenerationOptions options,
             const MambaStackState* initial = nullptr, std::string context = "");

  // Continues the generation checkpointed at `path`. The model (architecture, weights, dtype,
  // device type), prompts, options (but prefill_chunk) and context must be those of the run that
  // saved it; any difference is refused with a c10::Error naming it.
  static Generation resume(MambaLMHeadModel model, const std::string& path, std::vector<std::vector<int64_t>> prompts,
                           GenerationOptions options, std::string context = "");

  bool done() const;
  // One token for each unfinished row (nullopt for finished ones). Throws when done().
  std::vector<std::optional<int64_t>> step();
  // Steps until done, calling on_token(row, id) for each token as it comes. With a checkpoint
  // path and every > 0, saves a checkpoint after every `every` tokens and at the end.
  void run(const TokenCallback& on_token = {}, const std::string& checkpoint_path = "", int64_t every = 0);

  // Everything resume() needs, in one safetensors file written atomically (temp + rename).
  void save_checkpoint(const std::string& path) const;

  const std::vector<std::vector<int64_t>>& prompts() const { return prompts_; }
  const std::vector<std::vector<int64_t>>& generated() const { return generated_; }
  const std::vector<bool>& finished() const { return finished_; }
  int64_t steps() const { return steps_; }
  const Sampler& sampler() const { return sampler_; }
  // The state after every prompt token and every generated token (a copy; the generation's own
  // state lags by the tokens not yet fed back).
  MambaStackState state();

 private:
  Generation(MambaLMHeadModel model, std::vector<std::vector<int64_t>> prompts, GenerationOptions options,
             std::string context);
  // Feeds the tokens sampled last back into the model, giving the logits of the next step.
  void feed_pending();

  MambaLMHeadModel model_;
  GenerationOptions options_;
  Sampler sampler_;
  std::string context_;
  std::vector<std::vector<int64_t>> prompts_, generated_;
  std::vector<bool> finished_;
  int64_t steps_ = 0;
  MambaStackState state_;  // has consumed the prompts and every generated token but the pending ones
  at::Tensor logits_;      // [batch, vocab_size] for the next sample; undefined while tokens are pending
  mutable std::string weights_digest_;  // computed at the first checkpoint
};

}  // namespace statemamba
