// The Mamba modules with explicit state: chunking, stepping, resets, forks, files, devices,
// dtypes, training, names and initialisation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "mamba/derived_tensor.h"
#include "mamba/modules.h"
#include "support/expect_error.h"
#include "support/tmpdir.h"

namespace statemamba {
namespace {

using test::expect_error;
using test::TempDir;

// Tiny tensors: extra threads only contend with each other (and with a busy machine).
const bool kSingleThreaded = (at::set_num_threads(1), true);

// d_inner 32, dt_rank 1, vocab 37 padded to 40, two layers.
MambaConfig tiny_config() { return MambaConfig(16, 2, 37).d_state(8); }

MambaLMHeadModel make_model(at::ScalarType dtype = at::kFloat, MambaConfig config = tiny_config()) {
  torch::manual_seed(0);
  MambaLMHeadModel model(config);
  model->to(dtype);
  return model;
}

MambaStackState zeros_for(const MambaLMHeadModel& model, int64_t batch) {
  return MambaStackState::zeros(model->options, batch, at::kCPU, model->state_dtype());
}

at::Tensor tokens(int64_t batch, int64_t length, uint64_t seed = 1) {
  torch::manual_seed(seed);
  return torch::randint(0, 37, {batch, length});
}

// Sorted distinct cut points in (0, length).
std::vector<int64_t> random_cuts(int64_t length, int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::set<int64_t> cuts;
  while (static_cast<int>(cuts.size()) < count) cuts.insert(1 + static_cast<int64_t>(rng() % (length - 1)));
  return {cuts.begin(), cuts.end()};
}

struct Tol {
  double rtol, atol;
};
Tol tol_for(at::ScalarType t) { return t == at::kDouble ? Tol{1e-9, 1e-12} : Tol{1e-4, 1e-6}; }

void expect_close(const at::Tensor& actual, const at::Tensor& expected, Tol tol, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const auto a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  const double err = (a - e).abs().sub(e.abs().mul(tol.rtol)).max().item<double>();
  EXPECT_LE(err, tol.atol) << what << ": max |actual - expected| = " << (a - e).abs().max().item<double>();
}

void expect_states_close(const MambaStackState& a, const MambaStackState& b, Tol tol, const std::string& what) {
  ASSERT_EQ(a.n_layer(), b.n_layer());
  EXPECT_EQ(a.tokens, b.tokens) << what;
  for (int64_t i = 0; i < a.n_layer(); ++i) {
    expect_close(a.layers[i].conv_state, b.layers[i].conv_state, tol, what + " layer " + std::to_string(i) + " conv");
    expect_close(a.layers[i].ssm_state, b.layers[i].ssm_state, tol, what + " layer " + std::to_string(i) + " ssm");
  }
}

void expect_bit_equal(const MambaStackState& a, const MambaStackState& b) {
  ASSERT_EQ(a.n_layer(), b.n_layer());
  EXPECT_EQ(a.tokens, b.tokens);
  for (int64_t i = 0; i < a.n_layer(); ++i) {
    EXPECT_TRUE(at::equal(a.layers[i].conv_state, b.layers[i].conv_state)) << "layer " << i;
    EXPECT_TRUE(at::equal(a.layers[i].ssm_state, b.layers[i].ssm_state)) << "layer " << i;
  }
}

// The largest difference between two outputs: tests that compare a carried state against a fresh
// one first check that the state matters this much, so that they could fail.
double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

// ---- one pass == chunks == steps ----------------------------------------------------------------

class Equivalence : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(Equivalence, ChunksAndStepsReproduceOnePass) {
  const auto dtype = GetParam();
  const auto tol = tol_for(dtype);
  auto model = make_model(dtype);
  torch::NoGradGuard no_grad;
  const int64_t batch = 3, length = 24;
  const auto ids = tokens(batch, length);

  auto full_state = zeros_for(model, batch);
  const auto full = model->forward(ids, &full_state);
  EXPECT_EQ(full_state.tokens, length);
  expect_close(model->forward(ids), full, tol, "no state == zero state");

  for (uint64_t seed = 0; seed < 4; ++seed) {
    auto cuts = random_cuts(length, 1 + seed % 3, seed);
    cuts.push_back(length);
    auto state = zeros_for(model, batch);
    std::vector<at::Tensor> pieces;
    int64_t from = 0;
    for (int64_t to : cuts) {
      pieces.push_back(model->forward(ids.slice(1, from, to), &state));
      from = to;
    }
    const std::string what = "split at " + std::to_string(cuts[0]) + "...";
    expect_close(at::cat(pieces, 1), full, tol, what);
    expect_states_close(state, full_state, tol, what);
  }

  auto state = zeros_for(model, batch);
  std::vector<at::Tensor> steps;
  for (int64_t t = 0; t < length; ++t) steps.push_back(model->step(ids.select(1, t), state));
  expect_close(at::stack(steps, 1), full, tol, "token by token");
  expect_states_close(state, full_state, tol, "token by token");

  // The carried state matters: the second half from a zero state is far from the carried one.
  EXPECT_GT(max_diff(model->forward(ids.slice(1, 12)), full.slice(1, 12)), 1e3 * tol.atol);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Equivalence, ::testing::Values(at::kFloat, at::kDouble),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

// ---- save, load, move: continuing is bit-identical ------------------------------------------------

TEST(Continuation, SaveLoadContinueIsBitIdentical) {
  TempDir dir;
  for (auto dtype : {at::kFloat, at::kDouble}) {
    auto model = make_model(dtype);
    torch::NoGradGuard no_grad;
    const auto ids = tokens(2, 16);
    auto state = zeros_for(model, 2);
    model->forward(ids.slice(1, 0, 7), &state);
    for (const char* ext : {".pt", ".h5"}) {
      const auto path = dir.file(std::string("state") + ext);
      state.save(path);
      auto loaded = MambaStackState::load(path, model->options);
      EXPECT_EQ(loaded.dtype(), model->state_dtype());
      auto kept = state.clone();
      EXPECT_TRUE(at::equal(model->forward(ids.slice(1, 7, 15), &loaded), model->forward(ids.slice(1, 7, 15), &kept)))
          << c10::toString(dtype) << ext;
      EXPECT_TRUE(at::equal(model->step(ids.select(1, 15), loaded), model->step(ids.select(1, 15), kept)));
      expect_bit_equal(loaded, kept);
      EXPECT_EQ(loaded.tokens, 16);
    }
  }
}

// Whether this build registered CUDA kernels for every op the model runs.
bool has_cuda_kernels() {
  for (const char* name : {"statemamba::selective_scan", "statemamba::causal_conv1d",
                           "statemamba::selective_state_update", "statemamba::causal_conv1d_update"}) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return false;
  }
  return true;
}

TEST(Continuation, CpuToCudaAndBackContinuesIdentically) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device here: the CPU->CUDA->CPU round trip needs one";
  auto model = make_model();
  torch::NoGradGuard no_grad;
  const auto ids = tokens(2, 16);
  auto state = zeros_for(model, 2);
  model->forward(ids.slice(1, 0, 8), &state);
  const auto on_gpu = state.to(torch::kCUDA);
  EXPECT_TRUE(on_gpu.device().is_cuda());
  auto back = on_gpu.to(torch::kCPU);
  auto kept = state.clone();
  expect_bit_equal(back, kept);
  EXPECT_TRUE(at::equal(model->forward(ids.slice(1, 8), &back), model->forward(ids.slice(1, 8), &kept)));

  if (!has_cuda_kernels()) GTEST_SKIP() << "the ops have no CUDA kernels in this build: continuing on the GPU skipped";
  // Continue on the GPU, then come back to the CPU for the rest.
  auto gpu_model = make_model();
  gpu_model->to(torch::kCUDA);
  auto gpu_state = state.to(torch::kCUDA);
  auto cpu_state = state.clone();
  const auto mid = ids.slice(1, 8, 12), rest = ids.slice(1, 12);
  expect_close(gpu_model->forward(mid.cuda(), &gpu_state).cpu(), model->forward(mid, &cpu_state), tol_for(at::kFloat),
               "continued on the GPU");
  auto returned = gpu_state.to(torch::kCPU);
  expect_close(model->forward(rest, &returned), model->forward(rest, &cpu_state), tol_for(at::kFloat),
               "back on the CPU");
}

// ---- resets and forks -----------------------------------------------------------------------------

TEST(Resets, ResetRowsContinueAsIfFresh) {
  auto model = make_model(at::kDouble);
  const auto tol = tol_for(at::kDouble);
  torch::NoGradGuard no_grad;
  const auto ids = tokens(3, 20);
  const auto first = ids.slice(1, 0, 10), second = ids.slice(1, 10);
  auto state = zeros_for(model, 3);
  model->forward(first, &state);
  state.reset(torch::tensor({false, true, false}));
  const auto y = model->forward(second, &state);

  auto fresh_state = zeros_for(model, 3);
  const auto fresh = model->forward(second, &fresh_state);
  expect_close(y[1], fresh[1], tol, "reset row");
  expect_close(state.layers[1].ssm_state[1], fresh_state.layers[1].ssm_state[1], tol, "reset row's state");
  const auto uninterrupted = model->forward(ids).slice(1, 10);
  for (int64_t row : {0, 2}) expect_close(y[row], uninterrupted[row], tol, "row kept");
  EXPECT_GT(max_diff(fresh[0], uninterrupted[0]), 1e3 * tol.atol);
}

TEST(Resets, ResetsInsideAChunkStartThoseRowsAfresh) {
  auto model = make_model(at::kDouble);
  const auto tol = tol_for(at::kDouble);
  torch::NoGradGuard no_grad;
  const auto warmup = tokens(2, 5, 7), ids = tokens(2, 20);
  auto warm = zeros_for(model, 2);
  model->forward(warmup, &warm);

  auto reset = torch::zeros({2, 20}, torch::kBool);
  reset[0][8] = true;  // an episode of row 0 ends after position 7
  auto state = warm.clone();
  const auto y = model->forward(ids, &state, reset);

  auto fresh_state = zeros_for(model, 2);
  const auto fresh = model->forward(ids.slice(1, 8), &fresh_state);
  expect_close(y[0].slice(0, 8), fresh[0], tol, "row 0 after its reset");
  expect_close(state.layers[0].conv_state[0], fresh_state.layers[0].conv_state[0], tol, "row 0's conv state");
  expect_close(state.layers[1].ssm_state[0], fresh_state.layers[1].ssm_state[0], tol, "row 0's ssm state");
  auto no_reset = warm.clone();
  const auto continued = model->forward(ids, &no_reset);
  expect_close(y[1], continued[1], tol, "row 1, no reset");
  expect_close(y[0].slice(0, 0, 8), continued[0].slice(0, 0, 8), tol, "row 0 before its reset");

  // step() takes the same resets, one position at a time.
  auto stepped = warm.clone();
  std::vector<at::Tensor> steps;
  for (int64_t t = 0; t < 20; ++t) steps.push_back(model->step(ids.select(1, t), stepped, reset.select(1, t)));
  expect_close(at::stack(steps, 1), y, tol, "stepped with resets");
  expect_states_close(stepped, state, tol, "stepped with resets");
}

TEST(Forks, ForkedRowsContinueLikeTheOriginals) {
  auto model = make_model(at::kDouble);
  const auto tol = tol_for(at::kDouble);
  torch::NoGradGuard no_grad;
  const auto ids = tokens(2, 12);
  auto state = zeros_for(model, 2);
  model->forward(ids.slice(1, 0, 6), &state);

  const auto rows = torch::tensor({1, 0, 1});
  auto forked = state.select(rows);
  auto original = state.clone();
  const auto next = ids.slice(1, 6);
  const auto y = model->forward(next, &original);
  const auto y_forked = model->forward(next.index_select(0, rows), &forked);
  expect_close(y_forked[0], y[1], tol, "fork 0 of row 1");
  expect_close(y_forked[1], y[0], tol, "fork 1 of row 0");
  expect_close(y_forked[2], y[1], tol, "fork 2 of row 1");
  expect_states_close(forked, original.select(rows), tol, "forked states");

  // Beams: every step reorders the rows, as a beam search would.
  auto beams = state.clone();
  for (int64_t t = 6; t < 12; ++t) {
    beams = beams.select(torch::tensor({1, 0}));
    model->step(ids.select(1, t).flip(0), beams);
    beams = beams.select(torch::tensor({1, 0}));
  }
  expect_states_close(beams, original, tol, "beams reordered each step");
}

// ---- training -------------------------------------------------------------------------------------

std::vector<at::Tensor> parameter_grads(const MambaLMHeadModel& model) {
  std::vector<at::Tensor> grads;
  for (const auto& p : model->parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
  return grads;
}

TEST(Training, GradientsFlowThroughChunksAndIntoTheState) {
  auto model = make_model(at::kDouble);
  const auto ids = tokens(2, 12);
  torch::manual_seed(3);
  const auto weights = torch::randn({2, 12, tiny_config().padded_vocab_size()}, torch::kDouble);

  model->zero_grad();
  (model->forward(ids) * weights).sum().backward();
  const auto one_pass = parameter_grads(model);

  model->zero_grad();
  auto state = zeros_for(model, 2);
  auto loss = (model->forward(ids.slice(1, 0, 5), &state) * weights.slice(1, 0, 5)).sum();
  loss = loss + (model->forward(ids.slice(1, 5), &state) * weights.slice(1, 5)).sum();
  loss.backward();
  const auto chunked = parameter_grads(model);
  auto names = model->named_parameters().keys();
  for (size_t i = 0; i < one_pass.size(); ++i) expect_close(chunked[i], one_pass[i], {1e-8, 1e-12}, names[i]);

  // Into an initial state: autograd's gradient against central differences.
  torch::manual_seed(4);
  auto initial = zeros_for(model, 2);
  for (auto& l : initial.layers) {
    l.conv_state = torch::randn_like(l.conv_state).requires_grad_();
    l.ssm_state = torch::randn_like(l.ssm_state).requires_grad_();
  }
  auto loss_from = [&](const MambaStackState& s) {
    auto carried = s;
    return (model->forward(ids, &carried) * weights).sum();
  };
  loss_from(initial).backward();
  const double eps = 1e-6;
  for (int64_t layer : {0, 1}) {
    for (bool conv : {true, false}) {
      const auto& leaf = conv ? initial.layers[layer].conv_state : initial.layers[layer].ssm_state;
      ASSERT_TRUE(leaf.grad().defined());
      for (int64_t k : {0, 17, 40}) {
        auto perturbed = [&](double delta) {
          torch::NoGradGuard no_grad;
          auto s = initial.detach().clone();
          auto& t = conv ? s.layers[layer].conv_state : s.layers[layer].ssm_state;
          t.view(-1)[k] += delta;
          return loss_from(s).item<double>();
        };
        const double numeric = (perturbed(eps) - perturbed(-eps)) / (2 * eps);
        const double analytic = leaf.grad().view(-1)[k].item<double>();
        EXPECT_NEAR(analytic, numeric, 1e-6 * (1 + std::abs(numeric)))
            << "layer " << layer << (conv ? " conv_state" : " ssm_state") << " element " << k;
      }
    }
  }
}

// ---- parameter-derived tensors (A, D, the Δ bias, the conv's weight and bias) ------------------------
// Inference keeps them between calls (DerivedTensor); every change of a parameter must show.

// A new model of `model`'s config and dtype with its current parameter values (one that never ran).
MambaLMHeadModel fresh_copy(const MambaLMHeadModel& model) {
  MambaLMHeadModel fresh(model->options);
  fresh->to(model->backbone->embeddings->weight.scalar_type());
  torch::NoGradGuard no_grad;
  const auto source = model->named_parameters();
  for (auto& p : fresh->named_parameters()) p.value().copy_(source[p.key()]);
  return fresh;
}

// The parameters each forward derives tensors from, of one layer's mixer, by name.
std::vector<std::pair<std::string, at::Tensor>> derived_sources(const Mamba& mixer) {
  return {{"A_log", mixer->A_log},
          {"D", mixer->D},
          {"dt_proj.bias", mixer->dt_proj->bias},
          {"conv1d.weight", mixer->conv1d->weight},
          {"conv1d.bias", mixer->conv1d->bias}};
}

// The cache itself: in inference, derive() runs once per parameter value, not once per call.
TEST(DerivedParams, InferenceDerivesOncePerParameterValue) {
  statemamba::DerivedTensor cache;
  auto param = torch::nn::Linear(4, 3)->weight;  // requires grad, as a module's parameters do
  int calls = 0;
  auto derive = [&](const at::Tensor& w) { ++calls; return -at::exp(w.to(at::kDouble)); };
  {
    torch::NoGradGuard no_grad;
    const at::Tensor a = cache.get(param, 0, derive), b = cache.get(param, 0, derive);
    EXPECT_EQ(calls, 1);
    EXPECT_TRUE(a.is_same(b));
    cache.get(param, 1, derive);  // another tag (e.g. target dtype)
    EXPECT_EQ(calls, 2);
    param.add_(1);  // an in-place write bumps the version
    EXPECT_TRUE(at::allclose(cache.get(param, 1, derive), -at::exp(param.to(at::kDouble))));
    EXPECT_EQ(calls, 3);
  }
  cache.get(param, 1, derive);  // grad mode on and a parameter that requires grad: never cached
  cache.get(param, 1, derive);
  EXPECT_EQ(calls, 5);
}

TEST(DerivedParams, InPlaceChangesReachTheNextForward) {
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    auto model = make_model(dtype);
    const auto ids = tokens(2, 10);
    torch::NoGradGuard no_grad;
    at::Tensor before = model->forward(ids);  // derives (and keeps) every layer's tensors
    for (const auto& [name, param] : derived_sources(model->backbone->layer(1)->mixer)) {
      const std::string what = std::string(c10::toString(dtype)) + " " + name;
      param.mul_(1.5).add_(0.25);
      const auto after = model->forward(ids);
      EXPECT_TRUE(at::equal(after, fresh_copy(model)->forward(ids))) << what;
      EXPECT_GT(max_diff(after.to(at::kFloat), before.to(at::kFloat)), 0) << what << " changed nothing";
      before = after;
    }
  }
}

TEST(DerivedParams, OptimizerStepsAndDtypeMovesReachTheNextForward) {
  const auto ids = tokens(2, 10);
  torch::manual_seed(5);
  const auto weights = torch::randn({2, 10, tiny_config().padded_vocab_size()});
  // Adam's steps bump the parameters' versions; libtorch's SGD writes through .data(), which does
  // not: the gradient that changed before the step shows it.
  for (bool adam : {false, true}) {
    auto model = make_model(at::kFloat);
    std::unique_ptr<torch::optim::Optimizer> optimizer;
    if (adam) optimizer = std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
    else optimizer = std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.02));
    at::Tensor before;
    {
      torch::NoGradGuard no_grad;
      before = model->forward(ids);
    }
    for (int step = 0; step < 3; ++step) {
      const std::string what = std::string(adam ? "Adam" : "SGD") + " step " + std::to_string(step);
      optimizer->zero_grad(/*set_to_none=*/step != 1);
      (model->forward(ids) * weights).sum().backward();
      optimizer->step();
      torch::NoGradGuard no_grad;
      const auto after = model->forward(ids);
      EXPECT_TRUE(at::equal(after, fresh_copy(model)->forward(ids))) << what;
      EXPECT_GT(max_diff(after, before), 1e-3) << what << " changed nothing";
      before = after;
    }
  }
  // float32 -> bfloat16 -> float32: new storage each time (a freed one's address may come back).
  auto model = make_model(at::kFloat);
  torch::NoGradGuard no_grad;
  model->forward(ids);
  for (auto dtype : {at::kBFloat16, at::kFloat}) {
    model->to(dtype);
    EXPECT_TRUE(at::equal(model->forward(ids), fresh_copy(model)->forward(ids))) << c10::toString(dtype);
  }
}

// With grad enabled the derived tensors are recomputed in the graph: the parameters' gradients
// match central differences (whose perturbations in place also exercise the kept tensors).
TEST(DerivedParams, GradientsStillReachTheParameters) {
  auto model = make_model(at::kDouble);
  const auto ids = tokens(2, 8);
  torch::manual_seed(6);
  const auto weights = torch::randn({2, 8, tiny_config().padded_vocab_size()}, torch::kDouble);
  auto loss = [&] { return (model->forward(ids) * weights).sum(); };
  {
    torch::NoGradGuard no_grad;
    loss();  // derived tensors kept from an inference call first
  }
  model->zero_grad();
  loss().backward();
  const double eps = 1e-6;
  for (const auto& [name, param] : derived_sources(model->backbone->layer(0)->mixer)) {
    ASSERT_TRUE(param.grad().defined()) << name;
    for (int64_t k : {int64_t(0), int64_t(5), param.numel() - 1}) {
      auto perturbed = [&, &param = param](double delta) {
        torch::NoGradGuard no_grad;
        param.view(-1)[k] += delta;
        const double l = loss().item<double>();
        param.view(-1)[k] -= delta;
        return l;
      };
      const double numeric = (perturbed(eps) - perturbed(-eps)) / (2 * eps);
      const double analytic = param.grad().view(-1)[k].item<double>();
      EXPECT_NEAR(analytic, numeric, 1e-6 * (1 + std::abs(numeric))) << name << " element " << k;
      EXPECT_GT(std::abs(analytic), 1e-8) << name << " element " << k << ": a test that cannot fail";
    }
  }

  // Frozen parameters (the kept tensors serve a grad-enabled call): the state's gradient is unchanged.
  auto state_grad = [&] {
    auto state = zeros_for(model, 2);
    torch::manual_seed(7);
    auto& leaf = state.layers[0].ssm_state;
    leaf = torch::randn_like(leaf).requires_grad_();
    const auto initial = leaf;
    (model->forward(ids, &state) * weights).sum().backward();
    return initial.grad();
  };
  const auto trained = state_grad();
  for (auto& p : model->parameters()) p.requires_grad_(false);
  expect_close(state_grad(), trained, {1e-12, 1e-12}, "frozen model's state gradient");
}

// The logits of a channels-first hidden (forward's) are computed without copying it: the same as
// linear on a contiguous copy, tied or untied, and whether or not the head takes a gradient.
TEST(DerivedParams, LogitsMatchLinearOnAContiguousHidden) {
  for (bool tied : {true, false}) {
    auto model = make_model(at::kFloat, tiny_config().tie_embeddings(tied));
    const auto ids = tokens(3, 9);
    const auto& W = tied ? model->backbone->embeddings->weight : model->lm_head->weight;
    const auto with_grad = model->forward(ids);  // the head's weight takes a gradient: linear
    torch::NoGradGuard no_grad;
    const auto hidden = model->backbone->forward(ids);
    ASSERT_EQ(hidden.stride(1), 1) << "the test needs forward's channels-first hidden";
    const auto logits = model->forward(ids);
    EXPECT_TRUE(logits.is_contiguous());
    expect_close(logits, at::linear(hidden.contiguous(), W), tol_for(at::kFloat), tied ? "tied" : "untied");
    expect_close(logits, with_grad.detach(), tol_for(at::kFloat), tied ? "tied, grad" : "untied, grad");
  }
}

// ---- dtypes -----------------------------------------------------------------------------------------

TEST(Dtypes, StateStaysFloat32ForReducedPrecisionModels) {
  auto reference = make_model(at::kFloat);
  torch::NoGradGuard no_grad;
  const auto ids = tokens(2, 10);
  const auto expected = reference->forward(ids);
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    auto model = make_model(dtype);
    EXPECT_EQ(model->state_dtype(), at::kFloat);
    auto state = zeros_for(model, 2);
    const auto y = model->forward(ids.slice(1, 0, 9), &state);
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_EQ(state.dtype(), at::kFloat);
    const auto last = model->step(ids.select(1, 9), state);
    EXPECT_EQ(last.scalar_type(), dtype);
    const auto got = at::cat({y, last.unsqueeze(1)}, 1);
    const double scale = expected.abs().max().item<double>();
    EXPECT_LT(max_diff(got.to(at::kFloat), expected), 0.05 * scale) << c10::toString(dtype);
  }
  EXPECT_EQ(make_model(at::kDouble)->state_dtype(), at::kDouble);
}

// ---- errors -----------------------------------------------------------------------------------------

TEST(Errors, BadInputsAreClearErrors) {
  auto model = make_model();
  torch::NoGradGuard no_grad;
  const auto ids = tokens(2, 5);
  auto state = zeros_for(model, 2);
  expect_error([&] { model->forward(tokens(3, 5), &state); }, {"state has batch 2", "input has batch 3"});
  auto wide = MambaStackState::zeros(tiny_config().d_state(4), 2);
  expect_error([&] { model->forward(ids, &wide); }, {"layer 0", "ssm_state", "[2, 32, 4]", "[2, 32, 8]"});
  auto foreign = MambaStackState::zeros(tiny_config().rms_norm(false), 2);
  expect_error([&] { model->forward(ids, &foreign); }, {"another model"});
  auto f64 = MambaStackState::zeros(model->options, 2, at::kCPU, at::kDouble);
  expect_error([&] { model->step(ids.select(1, 0), f64); }, {"state is Double", "needs Float"});
  expect_error([&] { model->forward(ids.unsqueeze(0), &state); }, {"input_ids", "[batch, L]"});
  expect_error([&] { model->step(ids, state); }, {"input_ids", "[batch]"});
  expect_error([&] { model->forward(ids, &state, torch::zeros({2, 4}, torch::kBool)); }, {"reset", "[2, 5]"});
  Mamba mixer(tiny_config());
  expect_error([&] { mixer->forward(torch::randn({2, 5, 8})); }, {"Mamba::forward", "d_model = 16"});
  expect_error([&] { MambaLMHeadModel(MambaConfig(16, 2, 37).d_conv(1)); }, {"d_conv", "between 2 and 8"});
}

// ---- the seed API ---------------------------------------------------------------------------------

TEST(SeedApi, HeldStateIsValidatedCopiedInAndClonedOut) {
  auto model = make_model();
  torch::NoGradGuard no_grad;
  const auto ids = tokens(2, 8);
  expect_error([&] { model->get_inference_state(); }, {"set_inference_state first"});

  const auto given = zeros_for(model, 2);
  model->set_inference_state(given);
  model->forward(ids.slice(1, 0, 4), &model->inference_state());
  auto snapshot = model->get_inference_state();
  EXPECT_EQ(given.layers[0].ssm_state.count_nonzero().item<int64_t>(), 0) << "set_inference_state must copy";
  auto reference = zeros_for(model, 2);
  model->forward(ids.slice(1, 0, 4), &reference);
  expect_bit_equal(snapshot, reference);
  snapshot.layers[0].ssm_state.fill_(1);
  expect_bit_equal(model->get_inference_state(), reference);
  expect_error([&] { model->set_inference_state(MambaStackState::zeros(tiny_config().d_state(4), 2)); }, {"ssm_state"});

  // The mixer holds one layer's state the same way.
  Mamba mixer(tiny_config());
  mixer->set_inference_state(MambaInferenceState::zeros(mixer->options, 2));
  const auto x = torch::randn({2, 6, 16});
  const auto y = mixer->forward(x, &mixer->inference_state());
  auto layer_state = MambaInferenceState::zeros(mixer->options, 2);
  EXPECT_TRUE(at::equal(y, mixer->forward(x, &layer_state)));
  EXPECT_TRUE(at::equal(mixer->get_inference_state().ssm_state, layer_state.ssm_state));
}

// ---- names and initialisation ---------------------------------------------------------------------

TEST(Modules, ParameterNamesAndShapesMatchMambaSsm) {
  for (bool tied : {true, false}) {
    MambaLMHeadModel model(tiny_config().tie_embeddings(tied));
    std::map<std::string, std::vector<int64_t>> expected{{"backbone.embeddings.weight", {40, 16}},
                                                         {"backbone.norm_f.weight", {16}}};
    if (!tied) expected["lm_head.weight"] = {40, 16};
    for (int i = 0; i < 2; ++i) {
      const std::string p = "backbone.layers." + std::to_string(i) + ".";
      expected[p + "norm.weight"] = {16};
      expected[p + "mixer.in_proj.weight"] = {64, 16};
      expected[p + "mixer.conv1d.weight"] = {32, 1, 4};
      expected[p + "mixer.conv1d.bias"] = {32};
      expected[p + "mixer.x_proj.weight"] = {1 + 2 * 8, 32};
      expected[p + "mixer.dt_proj.weight"] = {32, 1};
      expected[p + "mixer.dt_proj.bias"] = {32};
      expected[p + "mixer.A_log"] = {32, 8};
      expected[p + "mixer.D"] = {32};
      expected[p + "mixer.out_proj.weight"] = {16, 32};
    }
    std::map<std::string, std::vector<int64_t>> actual;
    for (const auto& p : model->named_parameters()) actual[p.key()] = p.value().sizes().vec();
    EXPECT_EQ(actual, expected) << (tied ? "tied" : "untied");
  }
}

TEST(Modules, InitialisationFollowsMambaSsm) {
  const auto config = tiny_config().dt_min(0.002).dt_max(0.05);
  torch::manual_seed(0);
  MambaLMHeadModel model(config);
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < config.n_layer(); ++i) {
    const auto mixer = model->backbone->layer(i)->mixer;
    EXPECT_TRUE(at::allclose(mixer->A_log, torch::arange(1, 9, torch::kFloat).log().expand({32, 8})));
    EXPECT_TRUE(at::equal(mixer->D, torch::ones({32})));
    const auto dt = at::softplus(mixer->dt_proj->bias);
    EXPECT_GE(dt.min().item<double>(), 0.002 * (1 - 1e-4));
    EXPECT_LE(dt.max().item<double>(), 0.05 * (1 + 1e-4));
    EXPECT_LE(mixer->dt_proj->weight.abs().max().item<double>(), 1.0);  // dt_rank^-0.5 with dt_rank 1
    // out_proj: the Linear default bound 1/sqrt(d_inner), scaled by 1/sqrt(n_layer).
    EXPECT_LE(mixer->out_proj->weight.abs().max().item<double>(), 1 / std::sqrt(32.0) / std::sqrt(2.0));
    EXPECT_TRUE(at::equal(model->backbone->layer(i)->norm->weight, torch::ones({16})));
  }
  const double std = model->backbone->embeddings->weight.std().item<double>();
  EXPECT_NEAR(std, 0.02, 0.004);
}

TEST(Modules, UntiedHeadHasItsOwnWeights) {
  auto model = make_model(at::kFloat, tiny_config().tie_embeddings(false));
  torch::NoGradGuard no_grad;
  const auto ids = tokens(1, 3);
  const auto before = model->forward(ids);
  model->lm_head->weight.zero_();
  EXPECT_EQ(model->forward(ids).abs().max().item<float>(), 0);
  EXPECT_GT(before.abs().max().item<float>(), 0);
}

TEST(Config, JsonRoundTripAndFingerprint) {
  const auto config = tiny_config().dt_rank(3).tie_embeddings(false);
  const auto back = MambaConfig::from_json(config.to_json());
  EXPECT_EQ(back.to_json(), config.to_json());
  EXPECT_EQ(back.fingerprint(), config.fingerprint());
  EXPECT_FALSE(MambaConfig::from_json(tiny_config().to_json()).dt_rank().has_value());
  EXPECT_EQ(tiny_config().resolved_dt_rank(), 1);
  EXPECT_EQ(MambaConfig(768, 24, 50277).resolved_dt_rank(), 48);
  EXPECT_EQ(MambaConfig(768, 24, 50277).padded_vocab_size(), 50280);
  // Initialisation ranges do not change what a state means; sizes do.
  EXPECT_EQ(tiny_config().dt_max(0.2).fingerprint(), tiny_config().fingerprint());
  EXPECT_NE(tiny_config().d_state(4).fingerprint(), tiny_config().fingerprint());
  expect_error([] { MambaConfig::from_json("{\"n_layer\": 2}"); }, {"missing \"d_model\""});
  expect_error([] { MambaConfig::from_json("[1"); }, {"not JSON"});
}

}  // namespace
}  // namespace statemamba
