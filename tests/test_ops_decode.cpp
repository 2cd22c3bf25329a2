// The decode ops (selective_state_update, causal_conv1d_update) on CPU: against the float64
// reference, against the sequence ops at L = 1, and stepped over a whole sequence.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ops/ops.h"
#include "support/op_cases.h"
#include "support/reference.h"

namespace {

using namespace statemamba::test;
namespace ops = statemamba::ops;


// The decode ops take one step's slices; select() makes them non-contiguous views on purpose.
at::Tensor step_of(const at::Tensor& t, int64_t step) { return t.select(-1, step); }
OptTensor step_of(const OptTensor& t, int64_t step) { return t ? OptTensor(t->select(-1, step)) : std::nullopt; }

at::Tensor scan_state(const ScanCase& c) {
  return c.initial_state ? c.initial_state->clone()
                         : at::zeros({c.u.size(0), c.u.size(1), c.A.size(1)}, state_dtype_for(c.u.scalar_type()));
}
at::Tensor conv_state(const ConvCase& c) {
  return c.initial_state ? c.initial_state->clone()
                         : at::zeros({c.x.size(0), c.x.size(1), c.weight.size(1) - 1}, state_dtype_for(c.x.scalar_type()));
}

// Advances `state` in place by step t of the sequence case; returns y [B, D].
at::Tensor decode_step(const ScanCase& c, const at::Tensor& state, int64_t t) {
  return ops::selective_state_update(state, step_of(c.u, t), step_of(c.delta, t), c.A, step_of(c.B, t),
                                     step_of(c.C, t), c.D, step_of(c.z, t), c.delta_bias, c.softplus,
                                     step_of(c.reset, t));
}
at::Tensor decode_step(const ConvCase& c, const at::Tensor& state, int64_t t) {
  return ops::causal_conv1d_update(step_of(c.x, t), state, c.weight, c.bias, c.silu, step_of(c.reset, t));
}

// ---- selective_state_update ---------------------------------------------------------------------

struct ScanDecodeCase {
  std::string name;
  ScanOptions options;
};

std::vector<ScanDecodeCase> scan_decode_cases(at::ScalarType dtype) {
  std::vector<ScanDecodeCase> cases;
  {
    const std::string dname = dtype_name(dtype);
    ScanOptions base;
    base.batch = 3, base.dim = 5, base.dstate = 4, base.seqlen = 1;
    base.dtype = dtype;
    base.param_dtype = state_dtype_for(dtype);
    base.reset_probability = 0.5;
    base.seed = 300 + cases.size();
    cases.push_back({std::string(dname) + "_all", base});
    ScanOptions none = base;
    none.D = none.z = none.delta_bias = none.softplus = none.reset = false;
    cases.push_back({std::string(dname) + "_none", none});
    for (int64_t N : {1, 64}) {
      ScanOptions o = base;
      o.dstate = N;
      o.seed = 300 + cases.size();
      cases.push_back({std::string(dname) + "_dstate" + std::to_string(N), o});
    }
  }
  return cases;
}

// One test per dtype, looping over its variants (a process per test costs ~0.5 s under CTest).
class ScanDecode : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(ScanDecode, MatchesReferenceAndScanAtL1) {
  for (const auto& [name, o] : scan_decode_cases(GetParam())) {
    SCOPED_TRACE(name);
    const ScanCase c = ScanCase::random(o);
    const at::Tensor before = scan_state(c);
    const auto [y_ref, state_ref] = reference_selective_state_update(
        before, step_of(c.u, 0), step_of(c.delta, 0), c.A, step_of(c.B, 0), step_of(c.C, 0), c.D, step_of(c.z, 0),
        c.delta_bias, c.softplus, step_of(c.reset, 0));

    const at::Tensor state = before.clone();
    const at::Tensor y = decode_step(c, state, 0);
    EXPECT_EQ(y.scalar_type(), o.dtype);
    EXPECT_EQ(y.sizes(), at::IntArrayRef({o.batch, o.dim}));
    expect_close(y, y_ref, output_tolerance(o.dtype), "y");
    expect_close(state, state_ref, output_tolerance(state.scalar_type()), "state");

    // The same step through the sequence op: same arithmetic, so the same bits.
    ScanCase seq = c;
    seq.initial_state = before;
    const auto [y_scan, state_scan] = seq.run();
    expect_bit_equal(y, y_scan.select(2, 0), "y vs selective_scan");
    expect_bit_equal(state, state_scan, "state vs selective_scan");
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, ScanDecode, ::testing::ValuesIn(input_dtypes()), DtypeTestName());

// Stepping the decode op over a sequence, resets included, equals one selective_scan.
TEST(ScanDecode, StepLoopEqualsSequence) {
  for (at::ScalarType dtype : input_dtypes()) {
    const std::string dname = dtype_name(dtype);
    SCOPED_TRACE(dname);
    ScanOptions o;
    o.batch = 3, o.dim = 5, o.dstate = 8, o.seqlen = 23;
    o.dtype = dtype;
    o.param_dtype = state_dtype_for(dtype);
    o.seed = 400;
    ScanCase c = ScanCase::random(o);
    c.reset->index_put_({1, 0}, true);
    const auto [y_seq, state_seq] = c.run();
    const at::Tensor state = scan_state(c);
    std::vector<at::Tensor> ys;
    for (int64_t t = 0; t < o.seqlen; ++t) ys.push_back(decode_step(c, state, t));
    expect_bit_equal(at::stack(ys, 2), y_seq, "y");
    expect_bit_equal(state, state_seq, "state");
  }
}

// ---- causal_conv1d_update -----------------------------------------------------------------------

struct ConvDecodeCase {
  std::string name;
  ConvOptions options;
};

std::vector<ConvDecodeCase> conv_decode_cases(at::ScalarType dtype) {
  std::vector<ConvDecodeCase> cases;
  {
    const std::string dname = dtype_name(dtype);
    for (int64_t width : {2, 3, 4}) {
      ConvOptions base;
      base.batch = 3, base.dim = 5, base.width = width, base.seqlen = 1;
      base.dtype = dtype;
      base.param_dtype = state_dtype_for(dtype);
      base.reset_probability = 0.5;
      base.seed = 500 + cases.size();
      const std::string prefix = std::string(dname) + "_w" + std::to_string(width);
      cases.push_back({prefix + "_all", base});
      ConvOptions with_silu = base;
      with_silu.silu = true;
      cases.push_back({prefix + "_silu", with_silu});
      ConvOptions none = base;
      none.bias = none.reset = false;
      cases.push_back({prefix + "_none", none});
    }
  }
  return cases;
}

class ConvDecode : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(ConvDecode, MatchesReferenceAndConvAtL1) {
  for (const auto& [name, o] : conv_decode_cases(GetParam())) {
    SCOPED_TRACE(name);
    const ConvCase c = ConvCase::random(o);
    const at::Tensor before = conv_state(c);
    const auto [y_ref, state_ref] =
        reference_causal_conv1d_update(step_of(c.x, 0), before, c.weight, c.bias, c.silu, step_of(c.reset, 0));

    const at::Tensor state = before.clone();
    const at::Tensor y = decode_step(c, state, 0);
    EXPECT_EQ(y.scalar_type(), o.dtype);
    EXPECT_EQ(y.sizes(), at::IntArrayRef({o.batch, o.dim}));
    expect_close(y, y_ref, output_tolerance(o.dtype), "y");
    expect_bit_equal(state, state_ref.to(state.scalar_type()), "state");  // holds inputs: exact

    ConvCase seq = c;
    seq.initial_state = before;
    const auto [y_conv, state_conv] = seq.run();
    expect_bit_equal(y, y_conv.select(2, 0), "y vs causal_conv1d");
    expect_bit_equal(state, state_conv, "state vs causal_conv1d");
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, ConvDecode, ::testing::ValuesIn(input_dtypes()), DtypeTestName());

TEST(ConvDecode, StepLoopEqualsSequence) {
  for (at::ScalarType dtype : input_dtypes()) {
    const std::string dname = dtype_name(dtype);
    for (int64_t width : {2, 4}) {
      SCOPED_TRACE(std::string(dname) + ", width " + std::to_string(width));
      ConvOptions o;
      o.batch = 3, o.dim = 5, o.width = width, o.seqlen = 23;
      o.dtype = dtype;
      o.param_dtype = state_dtype_for(dtype);
      o.silu = true;
      o.seed = 600 + width;
      ConvCase c = ConvCase::random(o);
      c.reset->index_put_({1, 0}, true);
      c.reset->index_put_({2, 22}, true);  // on the last step: the final state keeps only x_22
      const auto [y_seq, state_seq] = c.run();
      const at::Tensor state = conv_state(c);
      std::vector<at::Tensor> ys;
      for (int64_t t = 0; t < o.seqlen; ++t) ys.push_back(decode_step(c, state, t));
      expect_bit_equal(at::stack(ys, 2), y_seq, "y");
      expect_bit_equal(state, state_seq, "state");
    }
  }
}

// ---- in-place state updates ---------------------------------------------------------------------

// Callers keep per-layer states as views into larger buffers; the ops must write through them.
TEST(DecodeState, NonContiguousStatesAreUpdatedInPlace) {
  ScanOptions so;
  so.seqlen = 1;
  const ScanCase sc = ScanCase::random(so);
  // [B, N, D] storage seen as [B, D, N]: a transposed, non-contiguous view.
  const at::Tensor scan_storage = scan_state(sc).transpose(1, 2).contiguous();
  const at::Tensor scan_view = scan_storage.transpose(1, 2);
  const at::Tensor scan_expected = scan_view.clone();
  const at::Tensor y_expected = decode_step(sc, scan_expected, 0);
  const at::Tensor y = decode_step(sc, scan_view, 0);
  expect_bit_equal(y, y_expected, "selective_state_update y");
  expect_bit_equal(scan_storage.transpose(1, 2), scan_expected, "selective_state_update state, through the view");

  ConvOptions co;
  co.seqlen = 1;
  const ConvCase cc = ConvCase::random(co);
  // The newest W-1 columns of an HF-style [B, D, W] buffer.
  const at::Tensor conv_storage = at::randn({co.batch, co.dim, co.width}, at::kFloat);
  const at::Tensor conv_view = conv_storage.slice(2, 1);
  conv_view.copy_(conv_state(cc));
  const at::Tensor oldest = conv_storage.select(2, 0).clone();
  const at::Tensor conv_expected = conv_view.clone();
  const at::Tensor yc_expected = decode_step(cc, conv_expected, 0);
  const at::Tensor yc = decode_step(cc, conv_view, 0);
  expect_bit_equal(yc, yc_expected, "causal_conv1d_update y");
  expect_bit_equal(conv_storage.slice(2, 1), conv_expected, "causal_conv1d_update state, through the view");
  expect_bit_equal(conv_storage.select(2, 0), oldest, "causal_conv1d_update: the column outside the view");
}

}  // namespace
