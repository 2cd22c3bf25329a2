#pragma once
// Sampler: picks the next token from a batch of logits, as Hugging Face's generate() does:
//   repetition penalty → temperature → top-k → top-p → draw (or argmax when temperature is 0).
//
//   Sampler sampler(SamplingOptions().temperature(0.8).top_p(0.9).seed(7));
//   auto next = sampler.sample(logits, history);   // logits [batch, vocab]; one id per row
//
// Its random numbers come from a counter-based generator (SplitMix64): draw i is a pure function of
// (seed, i), so the whole RNG state is two integers that save and restore exactly, and the same
// seed gives the same draws on any device. Probabilities are computed in float64 on the CPU.
#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <vector>

namespace statemamba {

struct SamplingOptions {
  TORCH_ARG(double, temperature) = 0.0;         // 0: greedy (argmax); else logits / temperature
  TORCH_ARG(int64_t, top_k) = 0;                // keep the k most likely tokens (ties kept); 0: off
  TORCH_ARG(double, top_p) = 1.0;               // keep the smallest set holding this mass; 1: off
  TORCH_ARG(double, repetition_penalty) = 1.0;  // HF's: seen tokens' logits / p if > 0, * p if < 0
  TORCH_ARG(uint64_t, seed) = 0;

 public:
  bool greedy() const { return temperature() == 0.0; }
  // Throws c10::Error naming the first field out of range.
  void validate() const;
  // The fields as a JSON object, and back (every field required).
  std::string to_json() const;
  static SamplingOptions from_json(const std::string& json);
  bool operator==(const SamplingOptions& other) const;
  bool operator!=(const SamplingOptions& other) const { return !(*this == other); }
};

// The generator's whole state: the seed and how many numbers have been drawn.
struct SamplerRngState {
  uint64_t seed = 0;
  uint64_t counter = 0;
  bool operator==(const SamplerRngState& o) const { return seed == o.seed && counter == o.counter; }
};

class Sampler {
 public:
  explicit Sampler(SamplingOptions options);

  // One id per row of logits [batch, vocab] (any float dtype and device). history[b] holds the ids
  // row b has seen so far (prompt and generated), for the repetition penalty; it may be empty
  // (no penalty) or have one entry per row. Draws one number per row unless greedy.
  std::vector<int64_t> sample(const at::Tensor& logits, const std::vector<std::vector<int64_t>>& history = {});

  // The logits after penalty, temperature, top-k and top-p: float64 [batch, vocab] on the CPU,
  // -inf where a token is filtered out.
  at::Tensor process(const at::Tensor& logits, const std::vector<std::vector<int64_t>>& history = {}) const;

  // Uniform in [0, 1) with 53 random bits; advances the counter.
  double next_uniform();

  const SamplingOptions& options() const { return options_; }
  SamplerRngState rng_state() const { return rng_; }
  // Refuses a state of another seed: it would not continue this sampler's sequence.
  void set_rng_state(const SamplerRngState& state);

  // The steps of process(), on float64 CPU logits [batch, vocab] (returned modified copies).
  static at::Tensor apply_repetition_penalty(const at::Tensor& logits,
                                             const std::vector<std::vector<int64_t>>& history, double penalty);
  static at::Tensor apply_top_k(const at::Tensor& logits, int64_t k);
  static at::Tensor apply_top_p(const at::Tensor& logits, double p);
  // The first index whose cumulative probability (in index order) exceeds u * total: inverse-CDF
  // sampling from the unnormalised weights `probs` (float64 [vocab], CPU).
  static int64_t draw(const at::Tensor& probs, double u);

 private:
  SamplingOptions options_;
  SamplerRngState rng_;
};

}  // namespace statemamba
