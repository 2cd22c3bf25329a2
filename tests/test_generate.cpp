// Generation with explicit state: the sampler against naive references, prefill in chunks, states
// as cartridges, checkpoint/resume, batched prompts, scoring, the state library, and the
// statemamba-generate / statemamba-state programs end to end.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>

#include "mamba/generate.h"
#include "mamba/safetensors.h"
#include "mamba/sampler.h"
#include "mamba/state_library.h"
#include "mamba/checkpoint.h"
#include "mamba/tokenizer.h"
#include "support/expect_error.h"
#include "support/program.h"
#include "support/tmpdir.h"

namespace statemamba {
namespace {

using test::expect_error;
using test::TempDir;

const bool kSingleThreaded = (at::set_num_threads(1), true);
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- the sampler against naive references ------------------------------------------------------

at::Tensor random_logits(int64_t batch, int64_t vocab, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn({batch, vocab}, at::kDouble) * 3;
}

std::vector<double> row(const at::Tensor& t, int64_t b) {
  const at::Tensor r = t[b].to(at::kDouble).contiguous();
  return {r.data_ptr<double>(), r.data_ptr<double>() + r.numel()};
}

TEST(Sampler, GreedyIsArgmaxAndTakesTheFirstOfTies) {
  Sampler sampler(SamplingOptions{});
  const at::Tensor logits = random_logits(5, 50, 1).to(at::kFloat);
  const auto ids = sampler.sample(logits);
  for (int64_t b = 0; b < 5; ++b) {
    const auto v = row(logits, b);
    EXPECT_EQ(ids[b], std::max_element(v.begin(), v.end()) - v.begin());
  }
  const at::Tensor ties = torch::tensor({{1.0, 3.0, 0.5, 3.0}});
  EXPECT_EQ(sampler.sample(ties)[0], 1);
  EXPECT_EQ(sampler.rng_state().counter, 0u) << "greedy draws no random numbers";
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogitsOnce) {
  const at::Tensor logits = random_logits(2, 20, 2);
  const std::vector<std::vector<int64_t>> history = {{3, 3, 7, 0, 19}, {}};
  const at::Tensor out = Sampler::apply_repetition_penalty(logits, history, 1.7);
  for (int64_t b = 0; b < 2; ++b) {
    const std::set<int64_t> seen(history[b].begin(), history[b].end());
    auto before = row(logits, b), after = row(out, b);
    for (int64_t v = 0; v < 20; ++v) {
      const double expected = !seen.count(v) ? before[v] : before[v] > 0 ? before[v] / 1.7 : before[v] * 1.7;
      EXPECT_DOUBLE_EQ(after[v], expected) << "row " << b << " token " << v;
    }
  }
  expect_error([&] { Sampler::apply_repetition_penalty(logits, {{20}, {}}, 1.5); }, {"id 20", "vocabulary [0, 20)"});
  expect_error([&] { Sampler::apply_repetition_penalty(logits, {{1}}, 1.5); }, {"one entry per row", "2"});
}

TEST(Sampler, TopKKeepsTheKLargestAndTheirTies) {
  const at::Tensor logits = random_logits(4, 30, 3);
  for (int64_t k : {1, 5, 29}) {
    const at::Tensor out = Sampler::apply_top_k(logits, k);
    for (int64_t b = 0; b < 4; ++b) {
      auto v = row(logits, b), o = row(out, b), sorted = v;
      std::sort(sorted.begin(), sorted.end(), std::greater<>());
      for (int64_t i = 0; i < 30; ++i) EXPECT_EQ(o[i], v[i] >= sorted[k - 1] ? v[i] : -kInf) << "k " << k;
    }
  }
  const at::Tensor tied = torch::tensor({{2.0, 1.0, 1.0, 0.0}}, at::kDouble);
  EXPECT_TRUE(torch::equal(Sampler::apply_top_k(tied, 2), torch::tensor({{2.0, 1.0, 1.0, -kInf}}, at::kDouble)));
  EXPECT_TRUE(torch::equal(Sampler::apply_top_k(tied, 0), tied)) << "0 is off";
}

TEST(Sampler, TopPKeepsTheSmallestMostLikelySetWithThatMass) {
  const at::Tensor logits = random_logits(4, 40, 4);
  for (double p : {0.05, 0.3, 0.9, 0.999}) {
    const at::Tensor out = Sampler::apply_top_p(logits, p);
    for (int64_t b = 0; b < 4; ++b) {
      const auto v = row(logits, b), o = row(out, b);
      const double mx = *std::max_element(v.begin(), v.end());
      double z = 0;
      for (double x : v) z += std::exp(x - mx);
      std::vector<int64_t> order(40);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return v[a] > v[c]; });
      double above = 0;  // mass of the tokens more likely than this one
      for (int64_t i : order) {
        EXPECT_EQ(o[i], above < p ? v[i] : -kInf) << "p " << p << " row " << b << " token " << i;
        above += std::exp(v[i] - mx) / z;
      }
    }
  }
  EXPECT_TRUE(torch::equal(Sampler::apply_top_p(logits, 1.0), logits)) << "1 is off";
}

TEST(Sampler, DrawIsTheInverseCdfAndMatchesTheDistribution) {
  const at::Tensor w = torch::tensor({0.0, 1.0, 0.0, 2.0, 1.0}, at::kDouble);  // total 4
  EXPECT_EQ(Sampler::draw(w, 0.0), 1);
  EXPECT_EQ(Sampler::draw(w, 0.2499), 1);
  EXPECT_EQ(Sampler::draw(w, 0.25), 3);
  EXPECT_EQ(Sampler::draw(w, 0.7499), 3);
  EXPECT_EQ(Sampler::draw(w, 0.75), 4);
  EXPECT_EQ(Sampler::draw(w, 0.9999999999), 4);
  expect_error([] { Sampler::draw(torch::zeros({3}, at::kDouble), 0.5); }, {"sum to 0"});

  // Frequencies over 20000 draws at temperature 0.5 against softmax(logits / 0.5).
  const at::Tensor logits = torch::tensor({{0.0, 0.5, -1.0, 1.0}});
  Sampler sampler(SamplingOptions().temperature(0.5).seed(11));
  std::vector<int> counts(4);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[sampler.sample(logits)[0]];
  const at::Tensor p = (logits.to(at::kDouble) / 0.5).softmax(-1)[0];
  for (int v = 0; v < 4; ++v) {
    const double expected = p[v].item<double>(), sd = std::sqrt(expected * (1 - expected) / n);
    EXPECT_NEAR(counts[v] / double(n), expected, 5 * sd) << "token " << v;
  }
  EXPECT_EQ(sampler.rng_state().counter, static_cast<uint64_t>(n));
}

TEST(Sampler, SampledTokensStayInsideTopKAndTopP) {
  const at::Tensor logits = random_logits(3, 100, 5);
  Sampler sampler(SamplingOptions().temperature(1.5).top_k(7).top_p(0.8).seed(3));
  const at::Tensor allowed = sampler.process(logits).isfinite();
  EXPECT_LE(allowed.sum(-1).max().item<int64_t>(), 7);
  for (int i = 0; i < 300; ++i) {
    const auto ids = sampler.sample(logits);
    for (int64_t b = 0; b < 3; ++b) ASSERT_TRUE(allowed[b][ids[b]].item<bool>()) << "row " << b << " drew " << ids[b];
  }
}

TEST(Sampler, SameSeedSameDrawsAndTheRngStateRestoresExactly) {
  const at::Tensor logits = random_logits(2, 64, 6);
  auto opts = SamplingOptions().temperature(1.0).seed(42);
  Sampler a(opts), b(opts), c(SamplingOptions().temperature(1.0).seed(43));
  std::vector<int64_t> da, db, dc;
  for (int i = 0; i < 50; ++i) {
    for (auto x : a.sample(logits)) da.push_back(x);
    for (auto x : b.sample(logits)) db.push_back(x);
    for (auto x : c.sample(logits)) dc.push_back(x);
  }
  EXPECT_EQ(da, db);
  EXPECT_NE(da, dc);

  const SamplerRngState saved = a.rng_state();
  std::vector<int64_t> next, again;
  for (int i = 0; i < 20; ++i) next.push_back(a.sample(logits)[0]);
  Sampler restored(opts);
  restored.set_rng_state(saved);
  for (int i = 0; i < 20; ++i) again.push_back(restored.sample(logits)[0]);
  EXPECT_EQ(next, again);
  expect_error([&] { c.set_rng_state(saved); }, {"seed is 42", "seed is 43"});
}

TEST(Sampler, BadOptionsAndLogitsAreNamed) {
  expect_error([] { Sampler(SamplingOptions().temperature(-1)); }, {"temperature", "-1"});
  expect_error([] { Sampler(SamplingOptions().temperature(NAN)); }, {"temperature"});
  expect_error([] { Sampler(SamplingOptions().top_k(-2)); }, {"top_k", "-2"});
  expect_error([] { Sampler(SamplingOptions().top_p(0)); }, {"top_p", "(0, 1]"});
  expect_error([] { Sampler(SamplingOptions().top_p(1.5)); }, {"top_p", "1.5"});
  expect_error([] { Sampler(SamplingOptions().repetition_penalty(0)); }, {"repetition_penalty"});
  Sampler s(SamplingOptions{});
  expect_error([&] { s.sample(torch::zeros({4})); }, {"logits", "[batch, vocab]", "[4]"});
  expect_error([&] { s.sample(torch::zeros({1, 4}, at::kLong)); }, {"logits", "float"});
  expect_error([&] { s.sample(torch::tensor({{0.0f, NAN}})); }, {"NaN"});
}

TEST(Sampler, OptionsRoundTripThroughJson) {
  const auto o = SamplingOptions().temperature(0.7).top_k(40).top_p(0.95).repetition_penalty(1.1).seed(1ULL << 63);
  EXPECT_EQ(SamplingOptions::from_json(o.to_json()), o);
  expect_error([] { SamplingOptions::from_json("{\"temperature\": 1}"); }, {"from_json"});
}

// ---- generation on a small random model ---------------------------------------------------------

// vocab 61 padded to 64: the padding ids must never come out.
MambaConfig small_config() { return MambaConfig(32, 2, 61).d_state(8); }

MambaLMHeadModel small_model(uint64_t seed = 0, MambaConfig config = small_config()) {
  torch::manual_seed(seed);
  MambaLMHeadModel model(config);
  torch::NoGradGuard no_grad;
  // Larger embeddings (so tied logits) than the N(0, 0.02) init: peaked distributions, far from ties.
  model->backbone->embeddings->weight.mul_(50);
  model->eval();
  return model;
}

std::vector<int64_t> random_ids(int64_t n, uint64_t seed, int64_t vocab = 61) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ids(n);
  for (auto& id : ids) id = static_cast<int64_t>(rng() % vocab);
  return ids;
}

at::Tensor as_batch(const std::vector<int64_t>& ids) { return torch::tensor(ids, at::kLong).unsqueeze(0); }

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

void expect_states_close(const MambaStackState& a, const MambaStackState& b, double atol, const std::string& what) {
  ASSERT_EQ(a.n_layer(), b.n_layer()) << what;
  EXPECT_EQ(a.tokens, b.tokens) << what;
  for (int64_t i = 0; i < a.n_layer(); ++i) {
    EXPECT_LE(max_diff(a.layers[i].conv_state, b.layers[i].conv_state), atol) << what << " layer " << i << " conv";
    EXPECT_LE(max_diff(a.layers[i].ssm_state, b.layers[i].ssm_state), atol) << what << " layer " << i << " ssm";
  }
}

// Greedy continuation recomputed from scratch each token with the full-sequence forward and no
// state at all: the reference the stateful decode must reproduce.
std::vector<int64_t> stateless_greedy(MambaLMHeadModel& model, std::vector<int64_t> ids, int64_t n) {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor logits = model->forward(as_batch(ids))[0][-1].narrow(0, 0, model->options.vocab_size());
    out.push_back(logits.argmax().item<int64_t>());
    ids.push_back(out.back());
  }
  return out;
}

TEST(Prefill, ChunkedEqualsOnePassAndTheFullForward) {
  auto model = small_model();
  const auto ids = as_batch(random_ids(50, 1));
  auto one = zero_state(model);
  const at::Tensor logits_one = prefill(model, ids, one, 0);
  {
    torch::NoGradGuard no_grad;
    const at::Tensor full = model->forward(ids)[0][-1].narrow(0, 0, 61);
    EXPECT_LE(max_diff(logits_one[0], full), 1e-5);
  }
  EXPECT_EQ(logits_one.sizes(), (std::vector<int64_t>{1, 61}));
  EXPECT_EQ(one.tokens, 50);
  for (int64_t chunk : {1, 3, 7, 16, 49, 50, 64}) {
    auto chunked = zero_state(model);
    const at::Tensor logits = prefill(model, ids, chunked, chunk);
    EXPECT_LE(max_diff(logits, logits_one), 1e-5) << "chunk " << chunk;
    expect_states_close(chunked, one, 1e-5, "chunk " + std::to_string(chunk));
  }
}

TEST(Generation, GreedyDecodeEqualsStatelessRecomputation) {
  auto model = small_model();
  const auto prompt = random_ids(12, 2);
  Generation gen(model, {prompt}, GenerationOptions().max_new_tokens(15).prefill_chunk(5));
  std::vector<int64_t> streamed;
  gen.run([&](int64_t r, int64_t id) {
    EXPECT_EQ(r, 0);
    streamed.push_back(id);
  });
  EXPECT_EQ(gen.generated()[0], stateless_greedy(model, prompt, 15));
  EXPECT_EQ(streamed, gen.generated()[0]) << "the callback sees every token as it comes";
  EXPECT_TRUE(gen.done());
  expect_error([&] { gen.step(); }, {"done"});
  // The final state is the one-pass state of prompt + generated.
  auto all = prompt;
  all.insert(all.end(), gen.generated()[0].begin(), gen.generated()[0].end());
  auto reference = zero_state(model);
  prefill(model, as_batch(all), reference, 0);
  expect_states_close(gen.state(), reference, 1e-5, "final state");
}

TEST(Generation, StopsAtEosAndNeverEmitsPaddingIds) {
  auto model = small_model();
  const auto prompt = random_ids(8, 3);
  const auto free_run = stateless_greedy(model, prompt, 10);
  const int64_t eos = free_run[3];
  const auto first = std::find(free_run.begin(), free_run.end(), eos) - free_run.begin();
  Generation gen(model, {prompt}, GenerationOptions().max_new_tokens(10).eos_id(eos));
  gen.run();
  EXPECT_EQ(gen.generated()[0], std::vector<int64_t>(free_run.begin(), free_run.begin() + first + 1));
  EXPECT_TRUE(gen.finished()[0]);

  // Sampling at a high temperature with an untied head that favours the padding rows 61..63.
  auto untied = small_model(1, small_config().tie_embeddings(false));
  {
    torch::NoGradGuard no_grad;
    untied->lm_head->weight.narrow(0, 61, 3).fill_(10);
  }
  Generation hot(untied, {prompt}, GenerationOptions().max_new_tokens(200).sampling(SamplingOptions().temperature(3)));
  hot.run();
  for (int64_t id : hot.generated()[0]) ASSERT_LT(id, 61);
  // vocab_limit (a tokenizer smaller than the model) keeps the ids below it.
  Generation limited(untied, {prompt},
                     GenerationOptions().max_new_tokens(200).vocab_limit(50).sampling(SamplingOptions().temperature(3)));
  limited.run();
  for (int64_t id : limited.generated()[0]) ASSERT_LT(id, 50);
  expect_error([&] { Generation(untied, {prompt}, GenerationOptions().vocab_limit(50).eos_id(55)); },
               {"eos_id 55", "vocab_limit 50"});
}

TEST(Generation, BatchedPromptsOfDifferentLengthsEqualEachAlone) {
  auto model = small_model();
  const std::vector<std::vector<int64_t>> prompts = {random_ids(3, 10), random_ids(17, 11), random_ids(9, 12)};
  std::vector<std::vector<int64_t>> alone;
  for (const auto& p : prompts) {
    Generation g(model, {p}, GenerationOptions().max_new_tokens(12));
    g.run();
    alone.push_back(g.generated()[0]);
  }
  Generation batched(model, prompts, GenerationOptions().max_new_tokens(12).prefill_chunk(4));
  std::vector<std::vector<int64_t>> streamed(3);
  batched.run([&](int64_t r, int64_t id) { streamed[r].push_back(id); });
  EXPECT_EQ(batched.generated(), alone);
  EXPECT_EQ(streamed, alone);

  // Row 1 stops at its EOS while the others go on.
  const int64_t eos = alone[1][2];
  std::vector<std::vector<int64_t>> expected;
  for (const auto& a : alone) {
    const auto stop = std::find(a.begin(), a.end(), eos);
    expected.emplace_back(a.begin(), stop == a.end() ? stop : stop + 1);
  }
  Generation stopping(model, prompts, GenerationOptions().max_new_tokens(12).eos_id(eos));
  stopping.run();
  EXPECT_EQ(stopping.generated(), expected);
  EXPECT_TRUE(stopping.finished()[1]);
}

TEST(Generation, LoadStateEqualsPrefillingDocumentAndQuestionTogether) {
  auto model = small_model();
  const auto document = random_ids(40, 20), question = random_ids(6, 21);
  TempDir dir;
  for (const char* file : {"doc.h5", "doc.pt"}) {
    auto built = zero_state(model);
    prefill(model, as_batch(document), built, 16);
    built.save(dir.file(file));
    const MambaStackState loaded = MambaStackState::load(dir.file(file), model->options);
    EXPECT_EQ(loaded.tokens, 40);

    Generation from_cartridge(model, {question}, GenerationOptions().max_new_tokens(10), &loaded);
    from_cartridge.run();
    auto whole = document;
    whole.insert(whole.end(), question.begin(), question.end());
    Generation in_one_run(model, {whole}, GenerationOptions().max_new_tokens(10));
    in_one_run.run();
    EXPECT_EQ(from_cartridge.generated(), in_one_run.generated()) << file;
    EXPECT_EQ(from_cartridge.generated()[0], stateless_greedy(model, whole, 10)) << file;
    expect_states_close(from_cartridge.state(), in_one_run.state(), 1e-5, file);
  }
  // The initial state is copied, not consumed; and it must be batch 1 of this model.
  auto built = zero_state(model);
  prefill(model, as_batch(document), built, 0);
  const auto snapshot = built.clone();
  Generation g(model, {question, question}, GenerationOptions().max_new_tokens(3), &built);
  g.run();
  expect_states_close(built, snapshot, 0, "initial state untouched");
  EXPECT_EQ(g.generated()[0], g.generated()[1]);
  auto two = zero_state(model, 2);
  expect_error([&] { Generation(model, {question}, GenerationOptions(), &two); }, {"batch-1", "batch 2"});
  auto other = small_model(0, MambaConfig(32, 3, 61).d_state(8));
  auto foreign = zero_state(other);
  expect_error([&] { Generation(model, {question}, GenerationOptions(), &foreign); }, {"3 layers"});
}

// A sampling run that checkpoints every `every` tokens and is "killed" (an exception out of the
// token callback) after `kill_after` tokens; resumed, it must give the uninterrupted run's tokens.
TEST(Generation, ResumeEqualsAnUninterruptedSamplingRun) {
  auto model = small_model();
  const std::vector<std::vector<int64_t>> prompts = {random_ids(9, 30), random_ids(4, 31)};
  const auto options =
      GenerationOptions().max_new_tokens(25).eos_id(60).sampling(
          SamplingOptions().temperature(1.3).top_k(30).top_p(0.95).repetition_penalty(1.2).seed(77));
  Generation uninterrupted(model, prompts, options);
  uninterrupted.run();

  TempDir dir;
  const std::string ckpt = dir.file("run.ckpt");
  for (int64_t kill_after : {5, 13, 24}) {
    struct Killed {};
    Generation first(model, prompts, options);
    try {
      first.run([&](int64_t, int64_t) {
        if (first.steps() == kill_after) throw Killed{};  // before that step's checkpoint
      }, ckpt, 4);
    } catch (const Killed&) {
    }
    Generation resumed = Generation::resume(model, ckpt, prompts, options);
    EXPECT_EQ(resumed.steps(), (kill_after - 1) / 4 * 4);
    resumed.run();
    EXPECT_EQ(resumed.generated(), uninterrupted.generated()) << "killed at token " << kill_after;
    EXPECT_EQ(resumed.sampler().rng_state(), uninterrupted.sampler().rng_state());
    std::remove(ckpt.c_str());
  }
  // Before any token too (the prefill's logits travel in the file).
  Generation fresh(model, prompts, options);
  fresh.save_checkpoint(ckpt);
  Generation resumed = Generation::resume(model, ckpt, prompts, options);
  resumed.run();
  EXPECT_EQ(resumed.generated(), uninterrupted.generated());
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"run.ckpt"}) << "no temporary files left behind";
}

TEST(Generation, ResumeRefusesAnotherModelOrOtherSettings) {
  auto model = small_model();
  const std::vector<std::vector<int64_t>> prompts = {random_ids(5, 40)};
  const auto sampling = SamplingOptions().temperature(0.8).seed(5);
  const auto options = GenerationOptions().max_new_tokens(10).sampling(sampling);
  TempDir dir;
  const std::string ckpt = dir.file("c.safetensors");
  Generation g(model, prompts, options);
  g.step();
  g.save_checkpoint(ckpt);

  auto resume = [&](MambaLMHeadModel m, std::vector<std::vector<int64_t>> p, GenerationOptions o, std::string ctx = "") {
    Generation::resume(m, ckpt, p, o, ctx);
  };
  expect_error([&] { resume(small_model(1), prompts, options); }, {"model weights", ckpt});
  expect_error([&] { resume(small_model(0, MambaConfig(32, 3, 61).d_state(8)), prompts, options); },
               {"architecture"});
  auto as_double = small_model();
  as_double->to(at::kDouble);
  expect_error([&] { resume(as_double, prompts, options); }, {"dtype", "Float", "Double"});
  expect_error([&] { resume(model, {random_ids(5, 41)}, options); }, {"the prompts"});
  expect_error([&] { resume(model, prompts, GenerationOptions(options).max_new_tokens(11)); },
               {"max_new_tokens", "10", "11"});
  expect_error([&] { resume(model, prompts, GenerationOptions(options).eos_id(3)); }, {"eos_id", "null", "3"});
  expect_error([&] { resume(model, prompts, GenerationOptions(options).sampling(SamplingOptions(sampling).seed(6))); },
               {"seed", "5", "6"});
  expect_error([&] { resume(model, prompts, GenerationOptions(options).sampling(SamplingOptions(sampling).temperature(0.9))); },
               {"temperature", "0.8", "0.9"});
  expect_error([&] { resume(model, prompts, GenerationOptions(options).sampling(SamplingOptions(sampling).top_k(3))); },
               {"top_k"});
  expect_error([&] { resume(model, prompts, options, "initial state 0123"); }, {"context", "initial state 0123"});
  // The prefill chunk does not change what a resumed run computes.
  Generation::resume(model, ckpt, prompts, GenerationOptions(options).prefill_chunk(3)).run();

  // Files that are not (whole) checkpoints.
  safetensors::save(dir.file("other.safetensors"), {{"x", torch::zeros({2})}});
  expect_error([&] { Generation::resume(model, dir.file("other.safetensors"), prompts, options); },
               {"not a generation checkpoint", "other.safetensors"});
  std::ifstream in(ckpt, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  std::ofstream(dir.file("cut.safetensors"), std::ios::binary) << bytes.substr(0, bytes.size() - 100);
  expect_error([&] { Generation::resume(model, dir.file("cut.safetensors"), prompts, options); }, {"cut.safetensors"});
  expect_error([&] { Generation::resume(model, dir.file("missing"), prompts, options); }, {"missing"});
}

TEST(Generation, BadInputsAreNamed) {
  auto model = small_model();
  expect_error([&] { Generation(model, {}, GenerationOptions()); }, {"no prompts"});
  expect_error([&] { Generation(model, {{1, 2}, {}}, GenerationOptions()); }, {"prompt 1", "empty"});
  expect_error([&] { Generation(model, {{1, 61, 2}}, GenerationOptions()); }, {"prompt 0", "61", "position 1", "[0, 61)"});
  expect_error([&] { Generation(model, {{-1}}, GenerationOptions()); }, {"-1", "position 0"});
  expect_error([&] { Generation(model, {{1}}, GenerationOptions().eos_id(64)); }, {"eos_id 64"});
  expect_error([&] { Generation(model, {{1}}, GenerationOptions().max_new_tokens(-1)); }, {"max_new_tokens", "-1"});
  expect_error([&] { Generation(model, {{1}}, GenerationOptions().prefill_chunk(-2)); }, {"prefill_chunk"});
  expect_error([&] { Generation(model, {{1}}, GenerationOptions().sampling(SamplingOptions().top_p(2))); },
               {"top_p", "2"});
  auto state = zero_state(model);
  expect_error([&] { prefill(model, torch::zeros({1, 3}), state, 0); }, {"ids", "int64", "Float"});
  expect_error([&] { prefill(model, torch::zeros({1, 0}, at::kLong), state, 0); }, {"ids", "L >= 1"});
  expect_error([&] { prefill(model, torch::zeros({2, 3}, at::kLong), state, 0); }, {"batch 1", "batch 2"});
  Generation zero(model, {{1, 2}}, GenerationOptions().max_new_tokens(0));
  EXPECT_TRUE(zero.done());
}

// ---- scoring ------------------------------------------------------------------------------------

TEST(Score, LogitsAndPerplexityMatchTheForwardAndANaiveSum) {
  auto model = small_model();
  const auto ids = random_ids(33, 50);
  const ScoreResult one = score(model, ids, 0);
  ASSERT_EQ(one.logits.sizes(), (std::vector<int64_t>{33, 61}));
  EXPECT_EQ(one.logits.scalar_type(), at::kFloat);
  EXPECT_EQ(one.predicted, 32);
  torch::NoGradGuard no_grad;
  const at::Tensor full = model->forward(as_batch(ids))[0].narrow(-1, 0, 61);
  EXPECT_LE(max_diff(one.logits, full), 1e-6);
  double nll = 0;
  for (int64_t t = 0; t + 1 < 33; ++t) {
    const auto v = row(full, t);
    double z = 0;
    const double mx = *std::max_element(v.begin(), v.end());
    for (double x : v) z += std::exp(x - mx);
    nll -= v[ids[t + 1]] - mx - std::log(z);
  }
  EXPECT_NEAR(one.nll, nll, 1e-4);
  EXPECT_NEAR(one.perplexity(), std::exp(nll / 32), 1e-4 * std::exp(nll / 32));
  // Chunks of 5 multiply in float32 with other blockings than one pass of 33 (MKL's choice depends
  // on L and on the processor): equal to rounding, relative to the logits' size.
  const ScoreResult chunked = score(model, ids, 5);
  const double scale = std::max(1.0, one.logits.abs().max().item<double>());
  EXPECT_LE(max_diff(chunked.logits, one.logits), 1e-5 * scale) << "logits up to " << scale;

  // From a state: the document's continuation scores as the tail of the whole.
  const auto doc = random_ids(20, 51);
  auto state = zero_state(model);
  prefill(model, as_batch(doc), state, 0);
  const ScoreResult tail = score(model, ids, 0, &state);
  auto whole = doc;
  whole.insert(whole.end(), ids.begin(), ids.end());
  EXPECT_LE(max_diff(tail.logits, score(model, whole, 0).logits.narrow(0, 20, 33)), 1e-5);
  EXPECT_EQ(state.tokens, 20) << "score leaves the initial state alone";

  expect_error([&] { score(model, {5}, 0); }, {"at least 2"});
  expect_error([&] { score(model, {5, 99}, 0); }, {"99", "position 1"});
}

// ---- the state library --------------------------------------------------------------------------

TEST(StateLibrary, AddListShowLoadRemove) {
  auto model = small_model();
  TempDir dir;
  StateLibrary library(dir.file("lib/states"));  // created on the first add
  EXPECT_TRUE(library.list().empty());
  auto state = zero_state(model);
  prefill(model, as_batch(random_ids(11, 60)), state, 0);
  StateInfo info;
  info.source = "notes.txt";
  info.model = "small";
  info.weights = weights_digest(model);
  const StateInfo stored = library.add("notes-v1.2_a", state, info);
  EXPECT_EQ(stored.tokens, 11);
  EXPECT_EQ(stored.fingerprint, model->options.fingerprint());
  EXPECT_EQ(stored.date.size(), 20u) << stored.date;
  library.add("b", state, info);

  const auto entries = library.list();
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].name, "b");
  EXPECT_EQ(entries[1].name, "notes-v1.2_a");
  EXPECT_EQ(entries[1].source, "notes.txt");
  EXPECT_EQ(entries[1].weights, weights_digest(model));
  EXPECT_NE(library.metadata_json("b").find("\"config\""), std::string::npos);
  expect_states_close(library.load("b", model->options), state, 0, "loaded");

  expect_error([&] { library.add("b", state, info); }, {"'b' already exists"});
  library.add("b", state, info, /*replace=*/true);
  library.remove("b");
  EXPECT_EQ(library.list().size(), 1u);
  expect_error([&] { library.remove("b"); }, {"no state named 'b'"});
  expect_error([&] { library.load("b"); }, {"no state named 'b'"});
  for (const char* bad : {"", ".hidden", "a/b", "a b", "ü"})
    expect_error([&] { library.add(bad, state, info); }, {"state name"});
  auto other = small_model(0, MambaConfig(32, 3, 61).d_state(8));
  expect_error([&] { library.load("notes-v1.2_a", other->options); }, {"does not fit this model", "2 layers"});
}

TEST(WeightsDigest, TellsCheckpointsApart) {
  auto a = small_model(0), b = small_model(0), c = small_model(1);
  EXPECT_EQ(weights_digest(a), weights_digest(b));
  EXPECT_NE(weights_digest(a), weights_digest(c));
  EXPECT_EQ(weights_digest(a).size(), 16u);
  {
    torch::NoGradGuard no_grad;
    b->backbone->norm_f->weight[0].add_(1);  // one value of a small tensor: always in the sample
  }
  EXPECT_NE(weights_digest(a), weights_digest(b));
}

// ---- the programs, end to end ------------------------------------------------------------------

// STATEMAMBA_TEST_DATA (set by CTest), else the source tree beside this file (__FILE__ is relative
// to the build folder when Ninja compiles it).
std::string data_dir(const std::string& name) {
  const char* env = std::getenv("STATEMAMBA_TEST_DATA");
  if (env && *env) return std::string(env) + "/" + name;
  std::string source = __FILE__;
  if (source[0] != '/') {
    const std::string build = test::program_path("");
    source = build.substr(0, build.rfind('/')) + "/" + source;
  }
  return source.substr(0, source.rfind('/')) + "/data/" + name;
}

using statemamba::test::read_text;

void write_text(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

std::string join_ids(const std::vector<int64_t>& ids) {
  std::string out;
  for (int64_t id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return out;
}

bool file_exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

class Programs : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const auto& p : {generate_, state_})
      if (::access(p.c_str(), X_OK) != 0) GTEST_FAIL() << "no program " << p << " (build all targets first)";
  }
  test::ProgramResult generate(const std::vector<std::string>& args) {
    return test::run_program(generate_, args, dir_.file("stderr"));
  }
  test::ProgramResult state(const std::vector<std::string>& args) {
    return test::run_program(state_, args, dir_.file("stderr"));
  }

  const std::string generate_ = test::program_path("generate"), state_ = test::program_path("state");
  const std::string tiny_ = data_dir("tiny-mamba-hf");
  TempDir dir_;
};

// tests/data/tiny-mamba-hf's reference.json: HF transformers' greedy continuations of two prompts.
nlohmann::json tiny_reference() { return nlohmann::json::parse(read_text(data_dir("tiny-mamba-hf/reference.json"))); }

TEST_F(Programs, GreedyIdsMatchTransformers) {
  const auto ref = tiny_reference();
  const auto prompts = ref.at("input_ids").get<std::vector<std::vector<int64_t>>>();
  const auto greedy = ref.at("greedy_ids").get<std::vector<std::vector<int64_t>>>();
  const std::string n = std::to_string(ref.at("new_tokens").get<int>());

  auto r = generate({"-m", tiny_, "--ids", join_ids(prompts[0]) + ";" + join_ids(prompts[1]), "-n", n});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, join_ids(greedy[0]) + "\n" + join_ids(greedy[1]) + "\n");
  EXPECT_NE(r.err.find("prefill: 18 tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("decode: 8 steps x 2 rows"), std::string::npos) << r.err;
  for (const char* chunk : {"1", "4", "0"}) {
    r = generate({"-m", tiny_, "--ids", join_ids(prompts[1]), "-n", n, "--prefill-chunk", chunk, "--dtype", "float64"});
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, join_ids(greedy[1]) + "\n") << "chunk " << chunk;
  }
}

TEST_F(Programs, ScoreWritesTheLogitsOfTransformers) {
  const auto ref = tiny_reference();
  const auto prompt = ref.at("input_ids")[0].get<std::vector<int64_t>>();
  const std::string out = dir_.file("logits.safetensors");
  auto r = generate({"-m", tiny_, "--ids", join_ids(prompt), "--score", "--logits-out", out, "--prefill-chunk", "4"});
  ASSERT_EQ(r.status, 0) << r.err;
  const at::Tensor logits = safetensors::load(out).at("logits");
  const at::Tensor expected = safetensors::load(data_dir("tiny-mamba-hf/reference.safetensors")).at("logits")[0];
  EXPECT_EQ(logits.scalar_type(), at::kFloat);
  ASSERT_EQ(logits.sizes(), expected.sizes());
  EXPECT_LE(max_diff(logits, expected), 1e-4);
  // The printed perplexity is exp(mean -log p(next)) under those logits.
  const at::Tensor logp = expected.to(at::kDouble).log_softmax(-1);
  double nll = 0;
  for (size_t t = 0; t + 1 < prompt.size(); ++t) nll -= logp[t][prompt[t + 1]].item<double>();
  const double ppl = std::exp(nll / (prompt.size() - 1));
  ASSERT_EQ(r.out.rfind("perplexity: ", 0), 0u) << r.out;
  EXPECT_NEAR(std::stod(r.out.substr(12)), ppl, 1e-4 * ppl) << r.out;
}

// A random model with the tiny tokenizer's vocabulary (801, padded to 808), saved in the HF layout
// beside a copy of that tokenizer.json.
std::string make_text_model(const std::string& dir) {
  auto model = small_model(3, MambaConfig(32, 2, 801).d_state(8));
  save_pretrained(model, dir);
  write_text(dir + "/tokenizer.json", read_text(data_dir("tiny-tokenizer/tokenizer.json")));
  return dir;
}

TEST_F(Programs, TextStatesAsCartridgesAndTheLibrary) {
  const std::string model_dir = make_text_model(dir_.file("model"));
  auto model = load_pretrained(model_dir);
  const Tokenizer tok = Tokenizer::from_file(model_dir + "/tokenizer.json");
  const auto options = GenerationOptions().max_new_tokens(12).eos_id(tok.eos_id()).vocab_limit(801);

  // Plain text in, the prompt and its continuation out.
  const std::string prompt = "Hello world, Zürich";
  Generation expected(model, {tok.encode(prompt)}, options);
  expected.run();
  auto r = generate({"-m", model_dir, "-i", prompt, "-n", "12"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, prompt + tok.decode(expected.generated()[0]) + "\n");

  // A batch, one prompt per line, each row printed at the end; and a prompt from a file.
  const std::vector<std::string> lines = {"Hello", "statemamba keeps state", "\u6771\u4eac"};
  write_text(dir_.file("batch.txt"), lines[0] + "\n" + lines[1] + "\n\n" + lines[2] + "\n");
  std::vector<std::vector<int64_t>> batch_ids;
  for (const auto& l : lines) batch_ids.push_back(tok.encode(l));
  Generation batch(model, batch_ids, GenerationOptions(options).max_new_tokens(6));
  batch.run();
  std::string expected_batch;
  for (size_t b = 0; b < lines.size(); ++b)
    expected_batch += "--- " + std::to_string(b) + " ---\n" + lines[b] + tok.decode(batch.generated()[b]) + "\n";
  r = generate({"-m", model_dir, "--batch-file", dir_.file("batch.txt"), "-n", "6"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, expected_batch);
  write_text(dir_.file("prompt.txt"), prompt);
  r = generate({"-m", model_dir, "-f", dir_.file("prompt.txt"), "-n", "12"});
  EXPECT_EQ(r.out, prompt + tok.decode(expected.generated()[0]) + "\n");

  // A document read once into a state file, then questions continue from it.
  const std::string document = "statemamba keeps the state of a model in plain sight.\nHello world!\n";
  const std::string question = " What does it keep?";
  write_text(dir_.file("doc.txt"), document);
  r = generate({"-m", model_dir, "--build-state", dir_.file("doc.txt"), "--save-state", dir_.file("doc.h5")});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "") << "building a state generates nothing";
  auto doc_state = zero_state(model);
  prefill(model, as_batch(tok.encode(document)), doc_state, 512);
  expect_states_close(MambaStackState::load(dir_.file("doc.h5"), model->options), doc_state, 1e-6, "built state");
  Generation answer(model, {tok.encode(question)}, options, &doc_state);
  answer.run();
  const std::string expected_answer = question + tok.decode(answer.generated()[0]) + "\n";
  r = generate({"-m", model_dir, "--load-state", dir_.file("doc.h5"), "-i", question, "-n", "12"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, expected_answer);

  // The same through the library, by name.
  const std::string lib = dir_.file("states");
  r = generate({"-m", model_dir, "--build-state", dir_.file("doc.txt"), "--state-name", "doc", "--state-dir", lib});
  ASSERT_EQ(r.status, 0) << r.err;
  r = generate({"-m", model_dir, "--load-state", "doc", "--state-dir", lib, "-i", question, "-n", "12"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, expected_answer);
  r = state({"--dir", lib, "list"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("doc"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(std::to_string(tok.encode(document).size())), std::string::npos) << r.out;
  r = state({"--dir", lib, "show", "doc"});
  const auto meta = nlohmann::json::parse(r.out);
  EXPECT_EQ(meta.at("source").get<std::string>(), dir_.file("doc.txt"));
  EXPECT_EQ(meta.at("model").get<std::string>(), model_dir);
  EXPECT_EQ(meta.at("weights").get<std::string>(), weights_digest(model));
  EXPECT_EQ(meta.at("fingerprint").get<std::string>(), model->options.fingerprint());
  EXPECT_EQ(meta.at("tokens").get<int64_t>(), static_cast<int64_t>(tok.encode(document).size()));
  r = state({"--dir", lib, "add", "copy", dir_.file("doc.h5"), "--source", "by hand"});
  ASSERT_EQ(r.status, 0) << r.err;
  r = state({"--dir", lib, "path", "copy"});
  EXPECT_EQ(r.out, lib + "/copy.h5\n");
  r = state({"--dir", lib, "add", "copy", dir_.file("doc.h5")});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("already exists"), std::string::npos) << r.err;
  r = state({"--dir", lib, "rm", "doc"});
  ASSERT_EQ(r.status, 0) << r.err;
  r = state({"--dir", lib, "list"});
  EXPECT_EQ(r.out.find("doc "), std::string::npos) << r.out;
  r = state({"--dir", lib, "rm", "doc"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("no state named 'doc'"), std::string::npos) << r.err;
  r = generate({"-m", model_dir, "--load-state", "doc", "--state-dir", lib, "-i", question});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("no state named 'doc'"), std::string::npos) << r.err;
  r = state({"--dir", lib, "frobnicate"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("unknown command 'frobnicate'"), std::string::npos) << r.err;
  r = state({"--dir", lib, "add", "x/y", dir_.file("doc.h5")});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("state name"), std::string::npos) << r.err;
  // A state of another architecture is refused by the model.
  r = generate({"-m", tiny_, "--load-state", dir_.file("doc.h5"), "--ids", "1,2"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("does not fit this model"), std::string::npos) << r.err;
}

// Starts the program, reads its stdout until it has printed `commas` commas, then SIGKILLs it.
void run_and_kill(const std::string& program, const std::vector<std::string>& args, int commas) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::dup2(fds[1], 1);
    const int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 2);
    ::close(fds[0]);
    std::vector<char*> argv{const_cast<char*>(program.c_str())};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(program.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  int seen = 0;
  char c;
  while (seen < commas && ::read(fds[0], &c, 1) == 1) seen += c == ',';
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ::close(fds[0]);
  EXPECT_TRUE(WIFSIGNALED(status)) << "the program ended before it was killed";
}

TEST_F(Programs, ResumeAfterAKillGivesTheUninterruptedOutput) {
  const std::string ckpt = dir_.file("run.ckpt");
  const std::vector<std::string> args = {"-m", tiny_, "--ids", "3,17,42", "-n", "1500", "-t", "1.0", "--top-k",
                                         "50", "--top-p", "0.95", "--repetition-penalty", "1.1", "--seed", "9"};
  const auto full = generate(args);
  ASSERT_EQ(full.status, 0) << full.err;
  ASSERT_EQ(std::count(full.out.begin(), full.out.end(), ','), 1499);

  auto with_checkpoints = args;
  for (const char* a : {"--checkpoint", "--checkpoint-every", "7"}) with_checkpoints.push_back(a);
  with_checkpoints.insert(with_checkpoints.end() - 2, ckpt);  // after --checkpoint
  run_and_kill(generate_, with_checkpoints, 100);
  ASSERT_TRUE(file_exists(ckpt)) << "no checkpoint after 100 tokens";

  auto resuming = with_checkpoints;
  resuming.push_back("--resume");
  resuming.push_back(ckpt);
  const auto resumed = generate(resuming);
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("resumed from"), std::string::npos) << resumed.err;
  EXPECT_EQ(resumed.err.find("after 1500 tokens"), std::string::npos) << "the kill came after the end: " << resumed.err;
  EXPECT_EQ(resumed.out, full.out);

  // The checkpoint now holds the finished run: resuming it prints the same and generates nothing.
  const auto again = generate(resuming);
  EXPECT_EQ(again.out, full.out);
  EXPECT_EQ(again.err.find("decode:"), std::string::npos) << again.err;

  // Other settings are refused, naming what differs.
  auto other_seed = resuming;
  *std::find(other_seed.begin(), other_seed.end(), "9") = "10";
  auto r = generate(other_seed);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("seed = 9, but this run has seed = 10"), std::string::npos) << r.err;
  auto other_prompt = resuming;
  *std::find(other_prompt.begin(), other_prompt.end(), "3,17,42") = "3,17,43";
  r = generate(other_prompt);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("the prompts"), std::string::npos) << r.err;
}

TEST_F(Programs, BadFlagsAndFilesAreNamed) {
  write_text(dir_.file("junk.h5"), "not hdf5");
  struct Case {
    std::vector<std::string> args;
    int status;
    std::string says;
  };
  const std::vector<Case> cases = {
      {{"--ids", "1,2"}, 2, "-m/--model DIR is required"},
      {{"-m", tiny_}, 2, "give exactly one of"},
      {{"-m", tiny_, "--ids", "1,2", "-i", "x"}, 2, "got 2"},
      {{"-m", tiny_, "--ids", "1,x"}, 2, "--ids: expected non-negative integers"},
      {{"-m", tiny_, "--ids", "1,,2"}, 2, "--ids"},
      {{"-m", tiny_, "--ids", "1;"}, 2, "ends in ';'"},
      {{"-m", tiny_, "--ids", "1,-3"}, 2, "'-3'"},
      {{"-m", tiny_, "--ids", "1,104"}, 1, "token id 104 at position 1 is outside the model's vocabulary [0, 104)"},
      {{"-m", tiny_, "-i", "hello"}, 2, "needs a tokenizer"},
      {{"-m", tiny_, "--ids", "1", "--top-p", "2"}, 1, "top_p must be in (0, 1]"},
      {{"-m", tiny_, "--ids", "1", "-t", "-1"}, 1, "temperature"},
      {{"-m", tiny_, "--ids", "1", "-n", "x"}, 2, "the value of -n"},
      {{"-m", tiny_, "--ids", "1", "--top-k", "1.5"}, 2, "the value of --top-k"},
      {{"-m", tiny_, "--ids", "1", "--dtype", "int8"}, 2, "--dtype: expected float32"},
      {{"-m", tiny_, "--ids", "1", "--device", "tpu"}, 2, "--device"},
      {{"-m", tiny_, "--ids", "1", "--frobnicate"}, 2, "frobnicate"},
      {{"-m", dir_.file("nowhere"), "--ids", "1"}, 1, "nowhere"},
      {{"-m", tiny_, "--ids", "1", "--logits-out", "x.safetensors"}, 2, "--logits-out needs --score"},
      {{"-m", tiny_, "--ids", "1", "--score"}, 1, "at least 2"},
      {{"-m", tiny_, "--ids", "1;2", "--score"}, 2, "--score takes one prompt"},
      {{"-m", tiny_, "--ids", "1", "--save-state", "s.txt"}, 2, "must end in .h5, .hdf5 or .pt"},
      {{"-m", tiny_, "--build-state", dir_.file("none.txt"), "--save-state", "s.h5"}, 2, "none.txt"},
      {{"-m", tiny_, "--build-state", dir_.file("none.txt")}, 2, "needs --save-state"},
      {{"-m", tiny_, "--ids", "1", "--load-state", dir_.file("junk.h5")}, 1, "junk.h5"},
      {{"-m", tiny_, "--ids", "1", "--resume", dir_.file("none.ckpt")}, 2, "--resume: no such file"},
      {{"-m", tiny_, "--ids", "1", "--resume", dir_.file("junk.h5")}, 1, "junk.h5"},
      {{"-m", tiny_, "--ids", "1", "--checkpoint", "c", "--checkpoint-every", "0"}, 2, "--checkpoint-every"},
      {{"-m", tiny_, "--ids", "1", "--state-name", "a b"}, 1, "state name"},
  };
  for (const auto& c : cases) {
    const auto r = generate(c.args);
    std::string line;
    for (const auto& a : c.args) line += a + " ";
    EXPECT_EQ(r.status, c.status) << line << "\n" << r.err;
    EXPECT_NE(r.err.find(c.says), std::string::npos) << line << "\nlacks '" << c.says << "':\n" << r.err;
    EXPECT_EQ(r.out, "") << line;
  }
  const auto help = generate({"--help"});
  EXPECT_EQ(help.status, 0);
  for (const char* flag : {"--ids", "--top-p", "--repetition-penalty", "--score", "--build-state", "--resume"})
    EXPECT_NE(help.out.find(flag), std::string::npos) << flag;
  EXPECT_EQ(state({"--help"}).status, 0);
}

}  // namespace
}  // namespace statemamba
