// CudaGraphDecoder: graph replays against eager model->step() over many tokens (with resets), the
// held state's round trip, and its argument errors. GPU tests skip where no CUDA GPU is present.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>

#include "mamba/cuda_graph_decoder.h"
#include "mamba/modules.h"
#include "support/expect_error.h"

namespace statemamba {
namespace {

using test::expect_error;

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU: CudaGraphDecoder is tested on a GPU machine"

// d_inner 128, dt_rank 4, vocab 100 padded to 104, three layers.
MambaConfig small_config() { return MambaConfig(64, 3, 100).d_state(16); }

MambaLMHeadModel cuda_model(at::ScalarType dtype) {
  torch::manual_seed(0);
  MambaLMHeadModel model(small_config());
  model->to(torch::Device(torch::kCUDA), dtype);
  return model;
}

// ‖actual − expected‖ / ‖expected‖, in float64.
double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.to(at::kDouble).cpu(), e = expected.to(at::kDouble).cpu();
  return ((a - e).norm() / e.norm().clamp_min(1e-300)).item<double>();
}

// Graph and eager run the same kernels on the same values; only cuBLAS's choice of algorithm under
// capture may differ, so float32 agrees to float32 rounding and bfloat16 to a few bf16 roundings.
double tolerance_for(at::ScalarType dtype) { return dtype == at::kFloat ? 1e-5 : 1e-2; }

void expect_states_close(const MambaStackState& actual, const MambaStackState& expected, double tol,
                         const std::string& what) {
  ASSERT_EQ(actual.n_layer(), expected.n_layer()) << what;
  EXPECT_EQ(actual.tokens, expected.tokens) << what;
  for (int64_t i = 0; i < actual.n_layer(); ++i) {
    EXPECT_LE(relative_error(actual.layers[i].conv_state, expected.layers[i].conv_state), tol)
        << what << ": conv_state of layer " << i;
    EXPECT_LE(relative_error(actual.layers[i].ssm_state, expected.layers[i].ssm_state), tol)
        << what << ": ssm_state of layer " << i;
  }
}

TEST(CudaGraphDecoder, RefusesAModelOffTheGpu) {
  torch::manual_seed(0);
  MambaLMHeadModel model(small_config());  // on the CPU
  expect_error([&] { CudaGraphDecoder decoder(model, 2); }, {"CudaGraphDecoder", "cpu"});
}

class CudaGraphDecoderDtype : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(CudaGraphDecoderDtype, ReplaysEqualEagerStepsOverManyTokensWithResets) {
  SKIP_WITHOUT_CUDA();
  const auto dtype = GetParam();
  const double tol = tolerance_for(dtype);
  for (int64_t batch : {1, 5, 64}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    auto model = cuda_model(dtype);
    CudaGraphDecoder decoder(model, batch);
    auto eager = MambaStackState::zeros(model->options, batch, torch::kCUDA, model->state_dtype());
    torch::manual_seed(batch);
    int64_t bit_equal = 0;
    const int64_t steps = 48;
    for (int64_t t = 0; t < steps; ++t) {
      SCOPED_TRACE("token " + std::to_string(t));
      const auto ids = torch::randint(0, 100, {batch}, torch::kLong).to(torch::kCUDA);
      std::optional<at::Tensor> reset;
      if (t % 7 == 3) reset = (torch::rand({batch}) < 0.5).to(torch::kCUDA);  // and no reset on the others
      const auto expected = model->step(ids, eager, reset);
      const auto logits = decoder.step(ids, reset);
      ASSERT_EQ(logits.sizes(), expected.sizes());
      ASSERT_EQ(logits.scalar_type(), expected.scalar_type());
      EXPECT_LE(relative_error(logits, expected), tol);
      EXPECT_FALSE(logits.isnan().any().item<bool>());
      bit_equal += at::equal(logits, expected);
    }
    expect_states_close(decoder.state(), eager, tol, "state after " + std::to_string(steps) + " tokens");
    RecordProperty("bit_equal_steps_batch_" + std::to_string(batch), std::to_string(bit_equal));
  }
}

TEST_P(CudaGraphDecoderDtype, StateRoundTripsAndContinuesAsEager) {
  SKIP_WITHOUT_CUDA();
  const auto dtype = GetParam();
  const int64_t batch = 3;
  auto model = cuda_model(dtype);
  CudaGraphDecoder decoder(model, batch);
  // A state with history: a prefill of 20 tokens (on the CPU, to cross devices on the way in).
  torch::manual_seed(7);
  auto prompt = torch::randint(0, 100, {batch, 20}, torch::kLong).to(torch::kCUDA);
  auto prefilled = MambaStackState::zeros(model->options, batch, torch::kCUDA, model->state_dtype());
  {
    torch::NoGradGuard no_grad;
    model->forward(prompt, &prefilled);
  }
  decoder.set_state(prefilled.to(torch::kCPU));
  const auto held = decoder.state();
  ASSERT_EQ(held.tokens, 20);
  for (int64_t i = 0; i < held.n_layer(); ++i) {
    EXPECT_TRUE(at::equal(held.layers[i].conv_state, prefilled.layers[i].conv_state)) << "layer " << i;
    EXPECT_TRUE(at::equal(held.layers[i].ssm_state, prefilled.layers[i].ssm_state)) << "layer " << i;
  }
  // state() is a copy: writing it leaves the decoder alone.
  held.layers[0].ssm_state.fill_(123);
  EXPECT_TRUE(at::equal(decoder.state().layers[0].ssm_state, prefilled.layers[0].ssm_state));

  auto eager = prefilled.clone();
  for (int t = 0; t < 10; ++t) {
    const auto ids = torch::randint(0, 100, {batch}, torch::kLong).to(torch::kCUDA);
    EXPECT_LE(relative_error(decoder.step(ids), model->step(ids, eager)), tolerance_for(dtype)) << "token " << t;
  }
  expect_states_close(decoder.state(), eager, tolerance_for(dtype), "after continuing");
  EXPECT_EQ(decoder.state().tokens, 30);

  decoder.reset_state();
  const auto zero = decoder.state();
  EXPECT_EQ(zero.tokens, 0);
  for (const auto& layer : zero.layers) {
    EXPECT_EQ(layer.conv_state.abs().max().item<double>(), 0.0);
    EXPECT_EQ(layer.ssm_state.abs().max().item<double>(), 0.0);
  }
  // From zero again, the decoder matches a fresh eager state.
  auto fresh = MambaStackState::zeros(model->options, batch, torch::kCUDA, model->state_dtype());
  const auto ids = torch::randint(0, 100, {batch}, torch::kLong).to(torch::kCUDA);
  EXPECT_LE(relative_error(decoder.step(ids), model->step(ids, fresh)), tolerance_for(dtype));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaGraphDecoderDtype, ::testing::Values(at::kFloat, at::kBFloat16),
                         [](const auto& info) { return info.param == at::kFloat ? "f32" : "bf16"; });

TEST(CudaGraphDecoder, RejectsBadArguments) {
  SKIP_WITHOUT_CUDA();
  auto model = cuda_model(at::kFloat);
  expect_error([&] { CudaGraphDecoder decoder(model, 0); }, {"'batch'", "at least 1", "0"});
  CudaGraphDecoder decoder(model, 2);
  EXPECT_EQ(decoder.batch(), 2);
  expect_error([&] { decoder.step(torch::zeros({3}, torch::kLong)); }, {"'input_ids'", "[batch] = [2]", "[3]"});
  expect_error([&] { decoder.step(torch::zeros({2}, torch::kFloat)); }, {"'input_ids'", "int64", "Float"});
  expect_error([&] { decoder.step(torch::tensor({0, 104}, torch::kLong)); }, {"'input_ids'", "104", "[0, 104)"});
  expect_error([&] { decoder.step(torch::zeros({2}, torch::kLong), torch::zeros({2}, torch::kLong)); },
               {"'reset'", "bool", "Long"});
  auto other_batch = MambaStackState::zeros(model->options, 3, torch::kCUDA, model->state_dtype());
  expect_error([&] { decoder.set_state(other_batch); }, {"set_state", "batch 3", "batch 2"});
  MambaLMHeadModel other(MambaConfig(64, 2, 100));
  expect_error([&] { decoder.set_state(MambaStackState::zeros(other->options, 2)); }, {"2 layers", "has 3"});
  // The decoder still works after refusing those.
  EXPECT_EQ(decoder.step(torch::zeros({2}, torch::kLong)).size(0), 2);
}

}  // namespace
}  // namespace statemamba
