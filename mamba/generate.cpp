#include "mamba/generate.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>
#include <torch/utils.h>

#include <cmath>
#include <cstdio>
#include <sstream>
#include <nlohmann/json.hpp>

#include "mamba/safetensors.h"

namespace statemamba {

namespace {

using nlohmann::json;

constexpr const char* kCheckpointFormat = "statemamba.GenerationCheckpoint";
constexpr int64_t kCheckpointVersion = 1;

// MambaLMHeadModel's head (private there), applied here to the last position only, so that a
// prefill computes [batch, vocab] logits rather than [batch, L, vocab].
at::Tensor lm_head(MambaLMHeadModel& model, const at::Tensor& hidden) {
  return model->lm_head ? model->lm_head->forward(hidden) : at::linear(hidden, model->backbone->embeddings->weight);
}

at::Device model_device(MambaLMHeadModel& model) { return model->backbone->embeddings->weight.device(); }
at::ScalarType model_dtype(MambaLMHeadModel& model) { return model->backbone->embeddings->weight.scalar_type(); }

void check_ids(const std::vector<int64_t>& ids, int64_t vocab, const std::string& what) {
  TORCH_CHECK(!ids.empty(), what, " is empty: at least one token id is needed");
  for (size_t t = 0; t < ids.size(); ++t)
    TORCH_CHECK(ids[t] >= 0 && ids[t] < vocab, what, ": token id ", ids[t], " at position ", t,
                " is outside the model's vocabulary [0, ", vocab, ")");
}

at::Tensor ids_tensor(const std::vector<int64_t>& ids, at::Device device) {
  return at::tensor(ids, at::kLong).unsqueeze(0).to(device);
}

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

std::string hex16(uint64_t h) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

// "field: the checkpoint has X, this run has Y" unless equal.
template <typename T>
void check_same(const std::string& path, const char* field, const T& saved, const T& now) {
  if (saved == now) return;
  std::ostringstream a, b;
  a << json(saved).dump();
  b << json(now).dump();
  TORCH_CHECK(false, "Generation::resume: checkpoint '", path, "' was made with ", field, " = ", a.str(),
              ", but this run has ", field, " = ", b.str(),
              " (resume with the settings, prompts and model of the interrupted run)");
}

}  // namespace

void GenerationOptions::validate() const {
  TORCH_CHECK(max_new_tokens() >= 0, "GenerationOptions: max_new_tokens must be >= 0, got ", max_new_tokens());
  TORCH_CHECK(prefill_chunk() >= 0, "GenerationOptions: prefill_chunk must be >= 0 (0: one pass), got ",
              prefill_chunk());
  TORCH_CHECK(!eos_id() || *eos_id() >= 0, "GenerationOptions: eos_id must be >= 0, got ", eos_id().value_or(0));
  TORCH_CHECK(!vocab_limit() || *vocab_limit() >= 1, "GenerationOptions: vocab_limit must be >= 1, got ",
              vocab_limit().value_or(0));
  sampling().validate();
}

MambaStackState zero_state(MambaLMHeadModel& model, int64_t batch) {
  return MambaStackState::zeros(model->options, batch, model_device(model), model->state_dtype());
}

at::Tensor prefill(MambaLMHeadModel& model, const at::Tensor& ids, MambaStackState& state, int64_t chunk) {
  TORCH_CHECK(ids.defined() && ids.dim() == 2 && ids.size(1) >= 1 && ids.scalar_type() == at::kLong,
              "prefill: argument 'ids' must be int64 [batch, L] with L >= 1, got ",
              ids.defined() ? c10::str(ids.scalar_type(), " ", ids.sizes()) : std::string("undefined"));
  TORCH_CHECK(chunk >= 0, "prefill: argument 'chunk' must be >= 0 (0: one pass), got ", chunk);
  torch::NoGradGuard no_grad;
  const at::Tensor input = ids.to(model_device(model));
  const int64_t L = input.size(1), step = chunk > 0 ? chunk : L;
  at::Tensor hidden;
  for (int64_t t0 = 0; t0 < L; t0 += step)
    hidden = model->backbone->forward(input.narrow(1, t0, std::min(step, L - t0)), &state);
  return lm_head(model, hidden.select(1, -1)).narrow(-1, 0, model->options.vocab_size());
}

double ScoreResult::perplexity() const { return std::exp(nll / static_cast<double>(predicted)); }

ScoreResult score(MambaLMHeadModel& model, const std::vector<int64_t>& ids, int64_t chunk,
                  const MambaStackState* initial) {
  const int64_t vocab = model->options.vocab_size();
  check_ids(ids, vocab, "score: argument 'ids'");
  TORCH_CHECK(ids.size() >= 2, "score: argument 'ids' must hold at least 2 tokens (the first predicts the "
              "second), got ", ids.size());
  TORCH_CHECK(chunk >= 0, "score: argument 'chunk' must be >= 0 (0: one pass), got ", chunk);
  torch::NoGradGuard no_grad;
  MambaStackState state = initial ? initial->to(model_device(model), model->state_dtype()).clone() : zero_state(model);
  const at::Tensor input = ids_tensor(ids, model_device(model));
  const int64_t L = input.size(1), step = chunk > 0 ? chunk : L;
  std::vector<at::Tensor> parts;
  for (int64_t t0 = 0; t0 < L; t0 += step)
    parts.push_back(model->forward(input.narrow(1, t0, std::min(step, L - t0)), &state)
                        .squeeze(0)
                        .narrow(-1, 0, vocab)
                        .to(at::kCPU, at::kFloat));
  ScoreResult result;
  result.logits = at::cat(parts, 0);
  const at::Tensor logp = result.logits.narrow(0, 0, L - 1).to(at::kDouble).log_softmax(-1);
  const at::Tensor next = at::tensor(std::vector<int64_t>(ids.begin() + 1, ids.end()), at::kLong).unsqueeze(1);
  result.nll = -logp.gather(1, next).sum().item<double>();
  result.predicted = L - 1;
  return result;
}

std::string weights_digest(MambaLMHeadModel& model) {
  torch::NoGradGuard no_grad;
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const auto& item : model->named_parameters()) {
    const at::Tensor flat = item.value().detach().reshape(-1);
    const std::string header = item.key() + c10::str(item.value().sizes()) + c10::toString(flat.scalar_type());
    h = fnv1a(h, header.data(), header.size());
    const int64_t n = flat.numel(), k = std::min<int64_t>(n, 1024);
    if (k == 0) continue;
    // k indices spread evenly from the first element to the last.
    const at::Tensor idx = k == 1 ? at::zeros({1}, at::kLong)
                                  : at::arange(k, at::kLong).mul_(n - 1).div_(k - 1, "floor");
    const at::Tensor sample = flat.index_select(0, idx.to(flat.device())).to(at::kCPU, at::kDouble).contiguous();
    h = fnv1a(h, sample.data_ptr(), sample.numel() * sizeof(double));
  }
  return hex16(h);
}

std::string state_digest(const MambaStackState& state) {
  uint64_t h = fnv1a(0xcbf29ce484222325ULL, &state.tokens, sizeof state.tokens);
  for (const auto& layer : state.layers)
    for (const at::Tensor& t : {layer.conv_state, layer.ssm_state}) {
      const at::Tensor c = t.detach().to(at::kCPU).contiguous();
      h = fnv1a(h, c.data_ptr(), c.nbytes());
    }
  return hex16(h);
}

// ---- Generation --------------------------------------------------------------------------------

Generation::Generation(MambaLMHeadModel model, std::vector<std::vector<int64_t>> prompts, GenerationOptions options,
                       std::string context)
    : model_(std::move(model)),
      options_((options.validate(), std::move(options))),
      sampler_(options_.sampling()),
      context_(std::move(context)),
      prompts_(std::move(prompts)) {
  TORCH_CHECK(!prompts_.empty(), "Generation: no prompts given");
  const int64_t vocab = model_->options.vocab_size();
  for (size_t b = 0; b < prompts_.size(); ++b) check_ids(prompts_[b], vocab, c10::str("Generation: prompt ", b));
  TORCH_CHECK(!options_.eos_id() || *options_.eos_id() < vocab, "Generation: eos_id ", options_.eos_id().value_or(0),
              " is outside the model's vocabulary [0, ", vocab, ")");
  TORCH_CHECK(!options_.vocab_limit() || !options_.eos_id() || *options_.eos_id() < *options_.vocab_limit(),
              "Generation: eos_id ", options_.eos_id().value_or(0), " is not below vocab_limit ",
              options_.vocab_limit().value_or(0), ", so it could never be sampled");
  generated_.assign(prompts_.size(), {});
  finished_.assign(prompts_.size(), false);
}

Generation::Generation(MambaLMHeadModel model, std::vector<std::vector<int64_t>> prompts, GenerationOptions options,
                       const MambaStackState* initial, std::string context)
    : Generation(std::move(model), std::move(prompts), std::move(options), std::move(context)) {
  torch::NoGradGuard no_grad;
  std::optional<MambaStackState> start;
  if (initial) {
    initial->validate_for(model_->options);
    TORCH_CHECK(initial->batch() == 1, "Generation: argument 'initial' must be a batch-1 state (one context that "
                "every prompt continues), got batch ", initial->batch());
    start = initial->to(model_device(model_), model_->state_dtype());
  }
  std::vector<MambaStackState> states;
  std::vector<at::Tensor> logits;
  for (const auto& prompt : prompts_) {
    MambaStackState state = start ? start->clone() : zero_state(model_);
    logits.push_back(prefill(model_, ids_tensor(prompt, model_device(model_)), state, options_.prefill_chunk()));
    states.push_back(std::move(state));
  }
  state_ = states.size() == 1 ? std::move(states[0]) : MambaStackState::cat(states);
  logits_ = at::cat(logits, 0);
}

bool Generation::done() const {
  if (steps_ >= options_.max_new_tokens()) return true;
  for (bool f : finished_)
    if (!f) return false;
  return true;
}

void Generation::feed_pending() {
  std::vector<int64_t> last;
  for (const auto& g : generated_) last.push_back(g.back());  // finished rows repeat theirs; ignored
  torch::NoGradGuard no_grad;
  const at::Tensor ids = at::tensor(last, at::kLong).to(model_device(model_));
  logits_ = model_->step(ids, state_).narrow(-1, 0, model_->options.vocab_size());
}

std::vector<std::optional<int64_t>> Generation::step() {
  TORCH_CHECK(!done(), "Generation::step: the generation is done (", steps_, " of ", options_.max_new_tokens(),
              " tokens)");
  if (!logits_.defined()) feed_pending();
  std::vector<std::vector<int64_t>> history;
  if (options_.sampling().repetition_penalty() != 1.0)
    for (size_t b = 0; b < prompts_.size(); ++b) {
      history.push_back(prompts_[b]);
      history.back().insert(history.back().end(), generated_[b].begin(), generated_[b].end());
    }
  const int64_t vocab = model_->options.vocab_size();
  const int64_t limit = std::min(options_.vocab_limit().value_or(vocab), vocab);
  const std::vector<int64_t> ids = sampler_.sample(logits_.narrow(-1, 0, limit), history);
  logits_ = at::Tensor();
  std::vector<std::optional<int64_t>> out(ids.size());
  for (size_t b = 0; b < ids.size(); ++b) {
    if (finished_[b]) continue;
    generated_[b].push_back(ids[b]);
    out[b] = ids[b];
    if (options_.eos_id() && ids[b] == *options_.eos_id()) finished_[b] = true;
  }
  ++steps_;
  return out;
}

void Generation::run(const TokenCallback& on_token, const std::string& checkpoint_path, int64_t every) {
  TORCH_CHECK(every >= 0, "Generation::run: argument 'every' must be >= 0, got ", every);
  const bool checkpoints = !checkpoint_path.empty() && every > 0;
  while (!done()) {
    const auto ids = step();
    if (on_token)
      for (size_t b = 0; b < ids.size(); ++b)
        if (ids[b]) on_token(static_cast<int64_t>(b), *ids[b]);
    if (checkpoints && steps_ % every == 0) save_checkpoint(checkpoint_path);
  }
  if (checkpoints && steps_ % every != 0) save_checkpoint(checkpoint_path);
}

MambaStackState Generation::state() {
  MambaStackState copy = state_.clone();
  if (logits_.defined()) return copy;
  std::vector<int64_t> last;
  for (const auto& g : generated_) last.push_back(g.back());
  model_->step(at::tensor(last, at::kLong).to(model_device(model_)), copy);
  return copy;
}

void Generation::save_checkpoint(const std::string& path) const {
  std::map<std::string, at::Tensor> tensors;
  for (int64_t i = 0; i < state_.n_layer(); ++i) {
    tensors["state.layer_" + std::to_string(i) + ".conv_state"] = state_.layers[i].conv_state.detach().cpu();
    tensors["state.layer_" + std::to_string(i) + ".ssm_state"] = state_.layers[i].ssm_state.detach().cpu();
  }
  if (logits_.defined()) tensors["logits"] = logits_.detach().cpu();
  auto& model = const_cast<MambaLMHeadModel&>(model_);
  if (weights_digest_.empty()) weights_digest_ = weights_digest(model);
  const json meta = {
      {"format", kCheckpointFormat},
      {"format_version", kCheckpointVersion},
      {"fingerprint", model_->options.fingerprint()},
      {"config", json::parse(model_->options.to_json())},
      {"weights", weights_digest_},
      {"dtype", c10::toString(model_dtype(model))},
      {"device_type", c10::DeviceTypeName(model_device(model).type(), /*lower_case=*/true)},
      {"max_new_tokens", options_.max_new_tokens()},
      {"eos_id", options_.eos_id() ? json(*options_.eos_id()) : json(nullptr)},
      {"vocab_limit", options_.vocab_limit() ? json(*options_.vocab_limit()) : json(nullptr)},
      {"sampling", json::parse(options_.sampling().to_json())},
      {"context", context_},
      {"prompts", prompts_},
      {"generated", generated_},
      {"finished", finished_},
      {"steps", steps_},
      {"rng_seed", sampler_.rng_state().seed},
      {"rng_counter", sampler_.rng_state().counter},
      {"state_tokens", state_.tokens},
  };
  safetensors::save(path, tensors, {{"format", kCheckpointFormat}, {"generation", meta.dump()}});
}

Generation Generation::resume(MambaLMHeadModel model, const std::string& path,
                              std::vector<std::vector<int64_t>> prompts, GenerationOptions options, std::string context) {
  const auto metadata = safetensors::load_metadata(path);
  const auto format = metadata.find("format"), body = metadata.find("generation");
  TORCH_CHECK(format != metadata.end() && format->second == kCheckpointFormat && body != metadata.end(),
              "Generation::resume: '", path, "' is not a generation checkpoint (no \"format\": \"", kCheckpointFormat,
              "\" in its metadata)");
  Generation g(std::move(model), std::move(prompts), std::move(options), std::move(context));
  try {
    const json meta = json::parse(body->second);
    const int64_t version = meta.at("format_version").get<int64_t>();
    TORCH_CHECK(version <= kCheckpointVersion, "Generation::resume: checkpoint '", path, "' has format version ",
                version, "; this build reads up to ", kCheckpointVersion);
    check_same(path, "the model architecture (fingerprint)", meta.at("fingerprint").get<std::string>(),
               g.model_->options.fingerprint());
    check_same(path, "the model dtype", meta.at("dtype").get<std::string>(),
               std::string(c10::toString(model_dtype(g.model_))));
    check_same(path, "the device type", meta.at("device_type").get<std::string>(),
               c10::DeviceTypeName(model_device(g.model_).type(), true));
    check_same(path, "the model weights (digest)", meta.at("weights").get<std::string>(), weights_digest(g.model_));
    check_same(path, "max_new_tokens", meta.at("max_new_tokens").get<int64_t>(), g.options_.max_new_tokens());
    check_same(path, "eos_id", meta.at("eos_id"),
               g.options_.eos_id() ? json(*g.options_.eos_id()) : json(nullptr));
    check_same(path, "vocab_limit", meta.at("vocab_limit"),
               g.options_.vocab_limit() ? json(*g.options_.vocab_limit()) : json(nullptr));
    const SamplingOptions saved = SamplingOptions::from_json(meta.at("sampling").dump());
    const SamplingOptions& now = g.options_.sampling();
    check_same(path, "temperature", saved.temperature(), now.temperature());
    check_same(path, "top_k", saved.top_k(), now.top_k());
    check_same(path, "top_p", saved.top_p(), now.top_p());
    check_same(path, "repetition_penalty", saved.repetition_penalty(), now.repetition_penalty());
    check_same(path, "seed", saved.seed(), now.seed());
    check_same(path, "the context (initial state)", meta.at("context").get<std::string>(), g.context_);
    check_same(path, "the prompts", meta.at("prompts").get<std::vector<std::vector<int64_t>>>(), g.prompts_);

    const size_t batch = g.prompts_.size();
    g.generated_ = meta.at("generated").get<std::vector<std::vector<int64_t>>>();
    g.finished_ = meta.at("finished").get<std::vector<bool>>();
    g.steps_ = meta.at("steps").get<int64_t>();
    TORCH_CHECK(g.generated_.size() == batch && g.finished_.size() == batch && g.steps_ >= 0 &&
                    g.steps_ <= g.options_.max_new_tokens(),
                "Generation::resume: checkpoint '", path, "' is inconsistent (rows or step count)");
    for (size_t b = 0; b < batch; ++b) {
      TORCH_CHECK(static_cast<int64_t>(g.generated_[b].size()) <= g.steps_ &&
                      (g.steps_ == 0 || !g.generated_[b].empty()),
                  "Generation::resume: checkpoint '", path, "' is inconsistent (row ", b, " has ",
                  g.generated_[b].size(), " tokens after ", g.steps_, " steps)");
      if (!g.generated_[b].empty())
        check_ids(g.generated_[b], g.model_->options.vocab_size(),
                  c10::str("Generation::resume: checkpoint '", path, "' row ", b));
    }
    g.sampler_.set_rng_state({meta.at("rng_seed").get<uint64_t>(), meta.at("rng_counter").get<uint64_t>()});

    const auto tensors = safetensors::load(path);
    const auto device = model_device(g.model_);
    auto get = [&](const std::string& name) {
      const auto it = tensors.find(name);
      TORCH_CHECK(it != tensors.end(), "Generation::resume: checkpoint '", path, "' lacks tensor '", name, "'");
      return it->second.to(device);
    };
    const StateSpec spec = g.model_->options.state_spec();
    g.state_.fingerprint = spec.fingerprint;
    g.state_.config = spec.config;
    g.state_.tokens = meta.at("state_tokens").get<int64_t>();
    for (int64_t i = 0; i < spec.n_layer; ++i)
      g.state_.layers.push_back({get("state.layer_" + std::to_string(i) + ".conv_state"),
                                 get("state.layer_" + std::to_string(i) + ".ssm_state")});
    g.state_.validate_for(spec, static_cast<int64_t>(batch), device, g.model_->state_dtype());
    if (g.steps_ == 0) {
      g.logits_ = get("logits");
      TORCH_CHECK(g.logits_.dim() == 2 && g.logits_.size(0) == static_cast<int64_t>(batch) &&
                      g.logits_.size(1) == g.model_->options.vocab_size(),
                  "Generation::resume: checkpoint '", path, "' has logits of shape ", g.logits_.sizes(),
                  ", expected [", batch, ", ", g.model_->options.vocab_size(), "]");
    }
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "Generation::resume: checkpoint '", path, "' has malformed metadata: ", e.what());
  }
  return g;
}

}  // namespace statemamba
