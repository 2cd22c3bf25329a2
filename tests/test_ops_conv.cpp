// causal_conv1d on CPU against the float64 reference: values, chunking, resets, gradients.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>
#include <string>
#include <vector>

#include "ops/ops.h"
#include "support/gradcheck.h"
#include "support/op_cases.h"

namespace {

using namespace statemamba::test;

// ---- forward vs the reference -------------------------------------------------------------------

struct ForwardCase {
  std::string name;
  ConvOptions options;
};

// Variants for one input dtype, named for failure messages.
std::vector<ForwardCase> forward_cases(at::ScalarType dtype) {
  std::vector<ForwardCase> cases;
  {
    const std::string dname = dtype_name(dtype);
    for (int64_t width : {2, 3, 4}) {
      const std::string prefix = std::string(dname) + "_w" + std::to_string(width);
      ConvOptions base;
      base.batch = 3, base.dim = 5, base.width = width, base.seqlen = 37;
      base.dtype = dtype;
      base.param_dtype = state_dtype_for(dtype);
      base.seed = cases.size();
      cases.push_back({prefix + "_all", base});
      ConvOptions with_silu = base;
      with_silu.silu = true;
      cases.push_back({prefix + "_silu", with_silu});

      ConvOptions none = base;
      none.bias = none.initial_state = none.reset = false;
      cases.push_back({prefix + "_none", none});
      const std::pair<const char*, bool ConvOptions::*> flags[] = {
          {"bias", &ConvOptions::bias}, {"initial_state", &ConvOptions::initial_state}, {"reset", &ConvOptions::reset}};
      for (auto [fname, flag] : flags) {
        ConvOptions o = none;
        o.*flag = true;
        o.seed = cases.size();
        cases.push_back({prefix + "_only_" + fname, o});
      }
      // Shorter than the state: the final state still holds initial_state columns.
      for (int64_t L : {1, 2}) {
        ConvOptions o = base;
        o.seqlen = L;
        o.reset_probability = 0.4;
        o.seed = cases.size();
        cases.push_back({prefix + "_L" + std::to_string(L), o});
      }
    }
    if (dtype == at::kHalf || dtype == at::kBFloat16) {
      ConvOptions params_in_dtype;
      params_in_dtype.batch = 3, params_in_dtype.dim = 5, params_in_dtype.seqlen = 37;
      params_in_dtype.dtype = params_in_dtype.param_dtype = dtype;
      cases.push_back({std::string(dname) + "_params_" + dname, params_in_dtype});
    }
  }
  return cases;
}

// One test per dtype, looping over its variants (a process per test costs ~0.5 s under CTest).
class ConvForward : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(ConvForward, MatchesReference) {
  for (const auto& [name, o] : forward_cases(GetParam())) {
    SCOPED_TRACE(name);
    const ConvCase c = ConvCase::random(o);
    const auto [y, final_state] = c.run();
    const auto [y_ref, state_ref] = c.reference();
    EXPECT_EQ(y.scalar_type(), o.dtype);
    EXPECT_EQ(final_state.scalar_type(), state_dtype_for(o.dtype));
    expect_close(y, y_ref, output_tolerance(o.dtype), "y");
    // The final state holds inputs (or zeros), not sums: it must be exact.
    expect_bit_equal(final_state, state_ref.to(final_state.scalar_type()), "final_state");
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, ConvForward, ::testing::ValuesIn(input_dtypes()), DtypeTestName());

// The reference's reading of the reset rule, pinned down on one row small enough to do by hand:
// width 3, state [a, b], x = [x0, x1, x2, x3], reset at t = 2.
TEST(ConvForward, ResetHidesEarlierInputsWorkedExample) {
  auto x = at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble).view({1, 1, 4});
  auto weight = at::tensor({100.0, 10.0, 1.0}, at::kDouble).view({1, 3});  // [oldest .. newest]
  auto state = at::tensor({5.0, 6.0}, at::kDouble).view({1, 1, 2});
  auto reset = at::tensor({0, 0, 1, 0}).to(at::kBool).view({1, 4});
  const auto [y, final_state] = statemamba::ops::causal_conv1d(x, weight, std::nullopt, state, reset, false);
  // t0: 5,6,1 · t1: 6,1,2 · t2: only x2 (x0, x1 hidden) · t3: x2, x3.
  const auto y_expected = at::tensor({561.0, 612.0, 3.0, 34.0}, at::kDouble).view({1, 1, 4});
  expect_bit_equal(y, y_expected, "y");
  expect_bit_equal(final_state, at::tensor({3.0, 4.0}, at::kDouble).view({1, 1, 2}), "final_state");
  // A reset at the last step hides everything but that step's input from the final state.
  reset = at::tensor({0, 0, 0, 1}).to(at::kBool).view({1, 4});
  const auto [y2, state2] = statemamba::ops::causal_conv1d(x, weight, std::nullopt, state, reset, false);
  expect_bit_equal(state2, at::tensor({0.0, 4.0}, at::kDouble).view({1, 1, 2}), "final_state, reset at the end");
}

// ---- chunking and resets ------------------------------------------------------------------------

// Every output is the same W-term sum over the same values whether the older ones come from x or
// from the carried state (which holds them exactly), so chunking must be bit-exact.
class ConvChunking : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(ConvChunking, CarriedStateEqualsOnePassBitForBit) {
  for (uint64_t seed = 0; seed < 6; ++seed) {
    ConvOptions o;
    o.batch = 3, o.dim = 5, o.width = 2 + seed % 3, o.seqlen = 37;
    o.dtype = GetParam();
    o.param_dtype = state_dtype_for(o.dtype);
    o.silu = seed % 2;
    o.seed = 200 + seed;
    ConvCase c = ConvCase::random(o);
    auto cuts = random_cuts(o.seqlen, 1 + seed % 4, seed);
    cuts.push_back(36);  // a last chunk of one step, shorter than the state
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    c.reset->index_put_({0, cuts[0]}, true);  // a reset on a chunk edge
    SCOPED_TRACE("seed " + std::to_string(seed) + ", width " + std::to_string(o.width) + ", cuts " + join(cuts));
    const auto [y, final_state] = c.run();
    const auto [y_chunked, state_chunked] = run_in_chunks(c, cuts);
    expect_bit_equal(y_chunked, y, "y");
    expect_bit_equal(state_chunked, final_state, "final_state");
  }
}

TEST_P(ConvChunking, OneStepChunksEqualOnePass) {
  ConvOptions o;
  o.dtype = GetParam();
  o.param_dtype = state_dtype_for(o.dtype);
  o.seqlen = 11;
  const ConvCase c = ConvCase::random(o);
  std::vector<int64_t> every_step;
  for (int64_t t = 1; t < o.seqlen; ++t) every_step.push_back(t);
  const auto [y, final_state] = c.run();
  const auto [y_chunked, state_chunked] = run_in_chunks(c, every_step);
  expect_bit_equal(y_chunked, y, "y");
  expect_bit_equal(state_chunked, final_state, "final_state");
}

INSTANTIATE_TEST_SUITE_P(Cpu, ConvChunking, ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16),
                         DtypeTestName());

TEST(ConvResets, EpisodesEqualSeparateRunsFromZeros) {
  ConvOptions o;
  o.batch = 2, o.dim = 5, o.width = 4, o.seqlen = 30;
  // Episodes shorter than the width (7, 8) and one that starts on the last step (29).
  expect_episodes_equal_separate_runs(ConvCase::random(o), {{0, 7, 8, 20}, {13, 29}});
}

// ---- gradients ----------------------------------------------------------------------------------

ConvOptions small_f64(uint64_t seed) {
  ConvOptions o;
  o.batch = 2, o.dim = 3, o.seqlen = 9;
  o.dtype = o.param_dtype = at::kDouble;
  o.reset_probability = 0.2;
  o.seed = seed;
  return o;
}

TEST(ConvGradients, AllInputsWithResetsAndFinalState) {
  for (int64_t width : {2, 4}) {
    for (bool silu : {false, true}) {
      SCOPED_TRACE("width " + std::to_string(width) + (silu ? ", silu" : ""));
      ConvOptions o = small_f64(20 + width);
      o.width = width;
      o.silu = silu;
      ConvCase c = ConvCase::random(o);
      c.reset->index_put_({1, 0}, true);  // row 1's initial_state is hidden: zero gradient
      c.reset->index_put_({0, 4}, true);
      expect_gradients_match_finite_differences(c, weighted_loss_for(c, 30 + width));
    }
  }
}

TEST(ConvGradients, YOnlyStateOnlyBareAndShort) {
  const ConvCase c = ConvCase::random(small_f64(40));
  WeightedLoss y_only = weighted_loss_for(c, 41), state_only = weighted_loss_for(c, 42);
  y_only.use_state = false;
  state_only.use_y = false;
  expect_gradients_match_finite_differences(c, y_only);
  expect_gradients_match_finite_differences(c, state_only);

  ConvOptions bare = small_f64(43);
  bare.bias = bare.initial_state = bare.reset = false;
  const ConvCase cb = ConvCase::random(bare);
  expect_gradients_match_finite_differences(cb, weighted_loss_for(cb, 44));

  ConvOptions short_seq = small_f64(45);
  short_seq.seqlen = 2;  // shorter than the state: final_state passes gradient to initial_state
  const ConvCase cs = ConvCase::random(short_seq);
  expect_gradients_match_finite_differences(cs, weighted_loss_for(cs, 46));
}

TEST(ConvGradients, ChunkedRunEqualsOnePass) {
  ConvOptions o = small_f64(50);
  o.seqlen = 20;
  o.silu = true;
  ConvCase c = ConvCase::random(o);
  c.reset->index_put_({0, 13}, true);  // on a chunk edge
  expect_chunked_gradients_equal_one_pass(c, weighted_loss_for(c, 51), {5, 6, 13, 19});
}

TEST(ConvGradients, ReducedPrecisionMatchesFloat64) {
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    SCOPED_TRACE(c10::toString(dtype));
    ConvOptions o = small_f64(60);
    o.dtype = dtype;
    o.param_dtype = at::kFloat;
    o.silu = true;
    const ConvCase c = ConvCase::random(o);
    WeightedLoss loss = weighted_loss_for(c, 61);
    loss.y_weight = loss.y_weight.to(dtype).to(at::kDouble);
    expect_gradients_match_float64(c, loss);
  }
}

}  // namespace
