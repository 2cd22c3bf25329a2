// selective_scan on CPU against the float64 reference: values, chunking, resets, gradients.
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
  ScanOptions options;
};

// Variants for one input dtype, named for failure messages.
std::vector<ForwardCase> forward_cases(at::ScalarType dtype) {
  std::vector<ForwardCase> cases;
  {
    const std::string dname = dtype_name(dtype);
    // Odd sizes, so no kernel path can rely on even or power-of-two extents.
    ScanOptions base;
    base.batch = 3, base.dim = 5, base.dstate = 4, base.seqlen = 37;
    base.dtype = dtype;
    base.param_dtype = state_dtype_for(dtype);
    base.seed = cases.size();
    cases.push_back({std::string(dname) + "_all", base});

    ScanOptions none = base;
    none.D = none.z = none.delta_bias = none.softplus = none.initial_state = none.reset = false;
    cases.push_back({std::string(dname) + "_none", none});
    // Each optional argument alone, so a failure names it.
    const std::pair<const char*, bool ScanOptions::*> flags[] = {
        {"D", &ScanOptions::D},
        {"z", &ScanOptions::z},
        {"delta_bias", &ScanOptions::delta_bias},
        {"softplus", &ScanOptions::softplus},
        {"initial_state", &ScanOptions::initial_state},
        {"reset", &ScanOptions::reset}};
    for (auto [fname, flag] : flags) {
      ScanOptions o = none;
      o.*flag = true;
      o.seed = cases.size();
      cases.push_back({std::string(dname) + "_only_" + fname, o});
    }
    for (int64_t N : {1, 64}) {
      ScanOptions o = base;
      o.dstate = N;
      o.seed = cases.size();
      cases.push_back({std::string(dname) + "_dstate" + std::to_string(N), o});
    }
    ScanOptions one_step = base;
    one_step.seqlen = 1;
    one_step.reset_probability = 0.5;
    cases.push_back({std::string(dname) + "_L1", one_step});
    if (dtype == at::kHalf || dtype == at::kBFloat16) {
      ScanOptions params_in_dtype = base;  // A, D, delta_bias may also come in the inputs' dtype
      params_in_dtype.param_dtype = dtype;
      cases.push_back({std::string(dname) + "_params_" + dname, params_in_dtype});
    }
  }
  return cases;
}

// One test per dtype, looping over its variants: CTest runs every test in its own process, and
// loading torch costs ~0.5 s a process, so hundreds of tiny tests would dominate the suite's time.
class ScanForward : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(ScanForward, MatchesReference) {
  for (const auto& [name, o] : forward_cases(GetParam())) {
    SCOPED_TRACE(name);
    const ScanCase c = ScanCase::random(o);
    const auto [y, final_state] = c.run();
    const auto [y_ref, state_ref] = c.reference();
    EXPECT_EQ(y.scalar_type(), o.dtype);
    EXPECT_EQ(final_state.scalar_type(), state_dtype_for(o.dtype));
    expect_close(y, y_ref, output_tolerance(o.dtype), "y");
    expect_close(final_state, state_ref, output_tolerance(final_state.scalar_type()), "final_state");
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, ScanForward, ::testing::ValuesIn(input_dtypes()), DtypeTestName());

// torch's softplus is the identity above 20; log1p(exp(x)) differs from x there by ~exp(-x) (1e-9
// at 20.5), which float64 resolves.
TEST(ScanForward, SoftplusThresholdIs20) {
  ScanOptions o;
  o.dtype = o.param_dtype = at::kDouble;
  o.seqlen = 12;
  ScanCase c = ScanCase::random(o);
  c.delta = at::linspace(18.0, 23.0, o.batch * o.dim * o.seqlen, at::kDouble).view(c.delta.sizes());
  const auto [y, final_state] = c.run();
  const auto [y_ref, state_ref] = c.reference();
  expect_close(y, y_ref, {1e-13, 1e-13}, "y");
  expect_close(final_state, state_ref, {1e-13, 1e-13}, "final_state");
}

// ---- chunking and resets ------------------------------------------------------------------------

// Each chunk runs the same sequential float32 recurrence from the exact carried state, so a chunked
// run must reproduce one pass bit for bit (y is rounded per element, so also for bfloat16).
class ScanChunking : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(ScanChunking, CarriedStateEqualsOnePassBitForBit) {
  for (uint64_t seed = 0; seed < 6; ++seed) {
    ScanOptions o;
    o.batch = 3, o.dim = 5, o.dstate = 16, o.seqlen = 37;
    o.dtype = GetParam();
    o.param_dtype = state_dtype_for(o.dtype);
    o.seed = 100 + seed;
    ScanCase c = ScanCase::random(o);
    const auto cuts = random_cuts(o.seqlen, 1 + seed % 4, seed);
    // A reset exactly on a chunk edge (t = 0 of that chunk) for row 0, and one just after it for row 1.
    c.reset->index_put_({0, cuts[0]}, true);
    c.reset->index_put_({1, cuts[0] + 1 < o.seqlen ? cuts[0] + 1 : cuts[0]}, true);
    SCOPED_TRACE("seed " + std::to_string(seed) + ", cuts " + join(cuts));
    const auto [y, final_state] = c.run();
    const auto [y_chunked, state_chunked] = run_in_chunks(c, cuts);
    expect_bit_equal(y_chunked, y, "y");
    expect_bit_equal(state_chunked, final_state, "final_state");
  }
}

TEST_P(ScanChunking, OneStepChunksEqualOnePass) {
  ScanOptions o;
  o.dtype = GetParam();
  o.param_dtype = state_dtype_for(o.dtype);
  o.seqlen = 11;
  const ScanCase c = ScanCase::random(o);
  std::vector<int64_t> every_step;
  for (int64_t t = 1; t < o.seqlen; ++t) every_step.push_back(t);
  const auto [y, final_state] = c.run();
  const auto [y_chunked, state_chunked] = run_in_chunks(c, every_step);
  expect_bit_equal(y_chunked, y, "y");
  expect_bit_equal(state_chunked, final_state, "final_state");
}

INSTANTIATE_TEST_SUITE_P(Cpu, ScanChunking, ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16),
                         DtypeTestName());

TEST(ScanResets, EpisodesEqualSeparateRunsFromZeros) {
  ScanOptions o;
  o.batch = 2, o.dim = 5, o.dstate = 8, o.seqlen = 30;
  // Row 0: episodes of 7, 1, 12 and 10 steps; row 1: one from initial_state and one of a single step.
  expect_episodes_equal_separate_runs(ScanCase::random(o), {{0, 7, 8, 20}, {13, 29}});
}

// A reset at t = 0 makes initial_state irrelevant, and an all-false mask changes nothing.
TEST(ScanResets, ResetAtStartIgnoresInitialStateAndFalseMaskIsNoReset) {
  ScanOptions o;
  o.reset = false;
  const ScanCase c = ScanCase::random(o);
  ScanCase from_reset = c;
  from_reset.reset = at::zeros({o.batch, o.seqlen}, at::kBool);
  from_reset.reset->index_put_({at::indexing::Slice(), 0}, true);
  ScanCase from_zeros = c;
  from_zeros.initial_state = std::nullopt;
  expect_bit_equal(std::get<0>(from_reset.run()), std::get<0>(from_zeros.run()), "y");

  ScanCase all_false = c;
  all_false.reset = at::zeros({o.batch, o.seqlen}, at::kBool);
  expect_bit_equal(std::get<0>(all_false.run()), std::get<0>(c.run()), "y");
}

// ---- gradients ----------------------------------------------------------------------------------

ScanOptions small_f64(uint64_t seed) {
  ScanOptions o;
  o.batch = 2, o.dim = 3, o.dstate = 4, o.seqlen = 7;
  o.dtype = o.param_dtype = at::kDouble;
  o.reset_probability = 0.25;
  o.seed = seed;
  return o;
}

TEST(ScanGradients, AllInputsWithResetsAndFinalState) {
  for (bool softplus : {true, false}) {
    SCOPED_TRACE(softplus ? "softplus" : "no softplus");
    ScanOptions o = small_f64(7);
    o.softplus = softplus;
    ScanCase c = ScanCase::random(o);
    // Row 1 starts with a reset: its initial_state must get a zero gradient.
    c.reset->index_put_({1, 0}, true);
    c.reset->index_put_({0, 3}, true);
    expect_gradients_match_finite_differences(c, weighted_loss_for(c, 1));
  }
}

TEST(ScanGradients, LossOfYOnlyOrFinalStateOnly) {
  const ScanCase c = ScanCase::random(small_f64(8));
  WeightedLoss y_only = weighted_loss_for(c, 2), state_only = weighted_loss_for(c, 3);
  y_only.use_state = false;
  state_only.use_y = false;
  {
    SCOPED_TRACE("y only: no gradient flows into final_state");
    expect_gradients_match_finite_differences(c, y_only);
  }
  {
    SCOPED_TRACE("final_state only: no gradient flows into y");
    expect_gradients_match_finite_differences(c, state_only);
  }
}

TEST(ScanGradients, WithoutOptionalInputsAndAtL1) {
  ScanOptions bare = small_f64(9);
  bare.D = bare.z = bare.delta_bias = bare.initial_state = bare.reset = false;
  const ScanCase c = ScanCase::random(bare);
  expect_gradients_match_finite_differences(c, weighted_loss_for(c, 4));

  ScanOptions one_step = small_f64(10);
  one_step.seqlen = 1;
  const ScanCase c1 = ScanCase::random(one_step);
  expect_gradients_match_finite_differences(c1, weighted_loss_for(c1, 5));
}

// Longer than a backward kernel would reasonably checkpoint at (the CPU one: every 64 steps), so
// recomputation across segments is exercised.
TEST(ScanGradients, LongSequence) {
  ScanOptions o = small_f64(11);
  o.batch = 1, o.dim = 2, o.dstate = 2, o.seqlen = 150;
  o.reset_probability = 0.02;
  const ScanCase c = ScanCase::random(o);
  expect_gradients_match_finite_differences(c, weighted_loss_for(c, 6));
}

TEST(ScanGradients, ChunkedRunEqualsOnePass) {
  ScanOptions o = small_f64(12);
  o.seqlen = 20;
  ScanCase c = ScanCase::random(o);
  c.reset->index_put_({0, 13}, true);  // on a chunk edge
  expect_chunked_gradients_equal_one_pass(c, weighted_loss_for(c, 7), {5, 6, 13});
}

TEST(ScanGradients, ReducedPrecisionMatchesFloat64) {
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    SCOPED_TRACE(c10::toString(dtype));
    ScanOptions o = small_f64(13);
    o.seqlen = 12;
    o.dtype = dtype;
    o.param_dtype = at::kFloat;
    const ScanCase c = ScanCase::random(o);
    WeightedLoss loss = weighted_loss_for(c, 8);
    loss.y_weight = loss.y_weight.to(dtype).to(at::kDouble);
    expect_gradients_match_float64(c, loss);
  }
}

}  // namespace
