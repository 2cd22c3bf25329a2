#include "mamba/sampler.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

namespace statemamba {

namespace {

// SplitMix64's i-th output for this seed (Steele, Lea, Flood 2014): a bijective mix of
// seed + (i + 1) * golden gamma.
uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

at::Tensor as_cpu_double(const at::Tensor& logits, const char* who) {
  TORCH_CHECK(logits.defined() && logits.dim() == 2 && logits.size(1) > 0, who,
              ": argument 'logits' must have shape [batch, vocab] with vocab > 0, got ",
              logits.defined() ? c10::str(logits.sizes()) : std::string("an undefined tensor"));
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), who, ": argument 'logits' must be a float tensor, got ",
              logits.scalar_type());
  return logits.to(at::kCPU, at::kDouble).contiguous().clone();
}

}  // namespace

// ---- SamplingOptions ---------------------------------------------------------------------------

void SamplingOptions::validate() const {
  TORCH_CHECK(std::isfinite(temperature()) && temperature() >= 0.0,
              "SamplingOptions: temperature must be finite and >= 0 (0 is greedy), got ", temperature());
  TORCH_CHECK(top_k() >= 0, "SamplingOptions: top_k must be >= 0 (0 is off), got ", top_k());
  TORCH_CHECK(top_p() > 0.0 && top_p() <= 1.0, "SamplingOptions: top_p must be in (0, 1] (1 is off), got ",
              top_p());
  TORCH_CHECK(std::isfinite(repetition_penalty()) && repetition_penalty() > 0.0,
              "SamplingOptions: repetition_penalty must be finite and > 0 (1 is off), got ", repetition_penalty());
}

std::string SamplingOptions::to_json() const {
  nlohmann::json j = {{"temperature", temperature()},
                      {"top_k", top_k()},
                      {"top_p", top_p()},
                      {"repetition_penalty", repetition_penalty()},
                      {"seed", seed()}};
  return j.dump();
}

SamplingOptions SamplingOptions::from_json(const std::string& json) {
  try {
    const auto j = nlohmann::json::parse(json);
    return SamplingOptions()
        .temperature(j.at("temperature").get<double>())
        .top_k(j.at("top_k").get<int64_t>())
        .top_p(j.at("top_p").get<double>())
        .repetition_penalty(j.at("repetition_penalty").get<double>())
        .seed(j.at("seed").get<uint64_t>());
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "SamplingOptions::from_json: ", e.what());
  }
}

bool SamplingOptions::operator==(const SamplingOptions& o) const {
  return temperature() == o.temperature() && top_k() == o.top_k() && top_p() == o.top_p() &&
         repetition_penalty() == o.repetition_penalty() && seed() == o.seed();
}

// ---- Sampler -----------------------------------------------------------------------------------

Sampler::Sampler(SamplingOptions options) : options_(std::move(options)) {
  options_.validate();
  rng_.seed = options_.seed();
}

double Sampler::next_uniform() { return static_cast<double>(splitmix64(rng_.seed, rng_.counter++) >> 11) * 0x1.0p-53; }

void Sampler::set_rng_state(const SamplerRngState& state) {
  TORCH_CHECK(state.seed == options_.seed(), "Sampler::set_rng_state: the state's seed is ", state.seed,
              " but this sampler's seed is ", options_.seed());
  rng_ = state;
}

at::Tensor Sampler::apply_repetition_penalty(const at::Tensor& logits,
                                             const std::vector<std::vector<int64_t>>& history, double penalty) {
  at::Tensor out = as_cpu_double(logits, "Sampler::apply_repetition_penalty");
  if (penalty == 1.0 || history.empty()) return out;
  const int64_t batch = out.size(0), vocab = out.size(1);
  TORCH_CHECK(static_cast<int64_t>(history.size()) == batch, "Sampler: argument 'history' must have one entry per ",
              "row of logits (", batch, "), got ", history.size());
  auto a = out.accessor<double, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<bool> seen(vocab, false);
    for (int64_t id : history[b]) {
      TORCH_CHECK(id >= 0 && id < vocab, "Sampler: history of row ", b, " holds id ", id, ", outside the vocabulary [0, ",
                  vocab, ")");
      if (seen[id]) continue;  // each token is penalised once, however often it came
      seen[id] = true;
      a[b][id] = a[b][id] < 0 ? a[b][id] * penalty : a[b][id] / penalty;
    }
  }
  return out;
}

at::Tensor Sampler::apply_top_k(const at::Tensor& logits, int64_t k) {
  at::Tensor out = as_cpu_double(logits, "Sampler::apply_top_k");
  if (k <= 0 || k >= out.size(1)) return out;
  // As HF's TopKLogitsWarper: everything below the k-th largest value goes, ties with it stay.
  const at::Tensor kth = std::get<0>(out.topk(k, -1)).narrow(-1, k - 1, 1);
  return out.masked_fill(out < kth, -std::numeric_limits<double>::infinity());
}

at::Tensor Sampler::apply_top_p(const at::Tensor& logits, double p) {
  at::Tensor out = as_cpu_double(logits, "Sampler::apply_top_p");
  if (p >= 1.0) return out;
  // As HF's TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is
  // <= 1 - p, always keeping the most likely one.
  auto [sorted, order] = out.sort(-1, /*descending=*/false);
  at::Tensor drop = sorted.softmax(-1).cumsum(-1) <= (1.0 - p);
  drop.narrow(-1, drop.size(-1) - 1, 1).fill_(false);
  return out.masked_fill(drop.scatter(-1, order, drop), -std::numeric_limits<double>::infinity());
}

int64_t Sampler::draw(const at::Tensor& probs, double u) {
  TORCH_CHECK(probs.dim() == 1 && probs.scalar_type() == at::kDouble && probs.device().is_cpu(),
              "Sampler::draw: argument 'probs' must be a float64 CPU vector");
  const auto p = probs.accessor<double, 1>();
  double total = 0;
  for (int64_t i = 0; i < p.size(0); ++i) total += p[i];
  TORCH_CHECK(total > 0 && std::isfinite(total), "Sampler::draw: the probabilities sum to ", total);
  const double target = u * total;
  double cumulative = 0;
  int64_t last_positive = -1;
  for (int64_t i = 0; i < p.size(0); ++i) {
    if (p[i] <= 0) continue;
    cumulative += p[i];
    last_positive = i;
    if (cumulative > target) return i;
  }
  return last_positive;  // u * total rounded up to the sum itself
}

at::Tensor Sampler::process(const at::Tensor& logits, const std::vector<std::vector<int64_t>>& history) const {
  at::Tensor out = apply_repetition_penalty(logits, history, options_.repetition_penalty());
  TORCH_CHECK(!at::isnan(out).any().item<bool>(), "Sampler: the logits contain NaN");
  if (options_.greedy()) return out;
  if (options_.temperature() != 1.0) out = out / options_.temperature();
  out = apply_top_k(out, options_.top_k());
  return apply_top_p(out, options_.top_p());
}

std::vector<int64_t> Sampler::sample(const at::Tensor& logits, const std::vector<std::vector<int64_t>>& history) {
  const at::Tensor processed = process(logits, history);
  const int64_t batch = processed.size(0);
  std::vector<int64_t> ids(batch);
  if (options_.greedy()) {
    const at::Tensor best = processed.argmax(-1);  // the first of equal maxima
    for (int64_t b = 0; b < batch; ++b) ids[b] = best[b].item<int64_t>();
    return ids;
  }
  // Unnormalised softmax weights; filtered tokens (-inf) weigh exactly 0.
  const at::Tensor weights = (processed - std::get<0>(processed.max(-1, /*keepdim=*/true))).exp();
  for (int64_t b = 0; b < batch; ++b) ids[b] = draw(weights[b], next_uniform());
  return ids;
}

}  // namespace statemamba
