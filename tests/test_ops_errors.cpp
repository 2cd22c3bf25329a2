// Bad inputs: every op rejects them with a c10::Error that names the op, the argument and what was
// expected. Each case starts from valid inputs and breaks one thing.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "ops/ops.h"
#include "support/expect_error.h"
#include "support/op_cases.h"

namespace {

using namespace statemamba::test;
namespace ops = statemamba::ops;

// Sizes of the valid cases below.
constexpr int64_t kB = 2, kD = 3, kN = 4, kL = 9, kW = 4;

ScanCase valid_scan() {
  ScanOptions o;
  o.batch = kB, o.dim = kD, o.dstate = kN, o.seqlen = kL;
  return ScanCase::random(o);
}

ConvCase valid_conv() {
  ConvOptions o;
  o.batch = kB, o.dim = kD, o.width = kW, o.seqlen = kL;
  return ConvCase::random(o);
}

// Runs the scan with one field changed.
void scan_with(const std::function<void(ScanCase&)>& change) {
  ScanCase c = valid_scan();
  change(c);
  c.run();
}

void conv_with(const std::function<void(ConvCase&)>& change) {
  ConvCase c = valid_conv();
  change(c);
  c.run();
}

TEST(OpErrors, ValidInputsPass) {
  EXPECT_NO_THROW(valid_scan().run());
  EXPECT_NO_THROW(valid_conv().run());
}

TEST(OpErrors, SelectiveScan) {
  expect_error([] { scan_with([](ScanCase& c) { c.u = c.u[0]; }); },
               {"selective_scan", "'u'", "[batch, d_inner, L]", "got [3, 9]"});
  expect_error([] { scan_with([](ScanCase& c) { c.u = c.u.to(at::kInt); }); },
               {"'u'", "float32, float64, float16 or bfloat16"});
  expect_error([] { scan_with([](ScanCase& c) { c.delta = at::zeros({kB, kD, kL + 1}); }); },
               {"selective_scan", "'delta'", "[batch, d_inner, L]", "[2, 3, 9]", "got [2, 3, 10]"});
  expect_error([] { scan_with([](ScanCase& c) { c.delta = c.delta.to(at::kDouble); }); },
               {"'delta'", "dtype of 'u'"});
  expect_error([] { scan_with([](ScanCase& c) { c.A = at::zeros({kD + 1, kN}); }); },
               {"'A'", "[d_inner, d_state]"});
  expect_error([] { scan_with([](ScanCase& c) { c.A = at::zeros({kD * kN}); }); }, {"'A'", "[d_inner, d_state]"});
  expect_error([] { scan_with([](ScanCase& c) { c.A = c.A.to(at::kDouble); }); },
               {"'A'", "float32", "the inputs' dtype"});
  expect_error([] { scan_with([](ScanCase& c) { c.A = at::zeros({kD, 0}); }); }, {"d_state", "at least 1"});
  expect_error([] { scan_with([](ScanCase& c) { c.B = at::zeros({kB, kN + 1, kL}); }); },
               {"'B'", "[batch, d_state, L]"});
  expect_error([] { scan_with([](ScanCase& c) { c.C = at::zeros({kB, kN, kL - 1}); }); },
               {"'C'", "[batch, d_state, L]"});
  expect_error([] { scan_with([](ScanCase& c) { c.C = c.C.to(at::kHalf); }); }, {"'C'", "dtype of 'u'"});
  expect_error([] { scan_with([](ScanCase& c) { c.D = at::zeros({kD + 1}); }); }, {"'D'", "[d_inner]"});
  expect_error([] { scan_with([](ScanCase& c) { c.z = at::zeros({kB, kD}); }); }, {"'z'", "[batch, d_inner, L]"});
  expect_error([] { scan_with([](ScanCase& c) { c.delta_bias = at::zeros({kD, 1}); }); },
               {"'delta_bias'", "[d_inner]"});
  expect_error([] { scan_with([](ScanCase& c) { c.initial_state = at::zeros({kB, kD, kN + 1}); }); },
               {"'initial_state'", "[batch, d_inner, d_state]"});
  // State is float32 for reduced-precision and float32 inputs, float64 for float64 inputs.
  expect_error([] { scan_with([](ScanCase& c) { c.initial_state = c.initial_state->to(at::kBFloat16); }); },
               {"'initial_state'", "state is kept in float32"});
  expect_error([] { scan_with([](ScanCase& c) { c.initial_state = c.initial_state->to(at::kDouble); }); },
               {"'initial_state'", "state is kept in float32"});
  expect_error(
      [] {
        scan_with([](ScanCase& c) {
          for (at::Tensor* t : {&c.u, &c.delta, &c.B, &c.C}) *t = t->to(at::kBFloat16);
          c.z = c.z->to(at::kBFloat16);
          c.initial_state = c.initial_state->to(at::kBFloat16);
        });
      },
      {"'initial_state'", "Float"});
  expect_error([] { scan_with([](ScanCase& c) { c.reset = c.reset->to(at::kByte); }); }, {"'reset'", "must be bool"});
  expect_error([] { scan_with([](ScanCase& c) { c.reset = c.reset->to(at::kFloat); }); }, {"'reset'", "must be bool"});
  expect_error([] { scan_with([](ScanCase& c) { c.reset = at::zeros({kB}, at::kBool); }); },
               {"'reset'", "[batch, L]"});
}

TEST(OpErrors, SelectiveScanEmptySequence) {
  expect_error(
      [] {
        scan_with([](ScanCase& c) {
          for (at::Tensor* t : {&c.u, &c.delta, &c.B, &c.C}) *t = t->slice(2, 0, 0);
          c.z = c.z->slice(2, 0, 0);
          c.reset = c.reset->slice(1, 0, 0);
        });
      },
      {"selective_scan", "L", "at least 1", "got 0"});
}

// Inputs that need gradients take the autograd path first; the message must be the same.
TEST(OpErrors, SelectiveScanWithGradients) {
  expect_error(
      [] {
        scan_with([](ScanCase& c) {
          c.u.requires_grad_(true);
          c.delta = at::zeros({kB, kD + 1, kL}).requires_grad_(true);
        });
      },
      {"'delta'", "[batch, d_inner, L]"});
}

// A tensor on another device (meta stands in for an accelerator): named, whichever kernel runs.
TEST(OpErrors, MixedDevices) {
  expect_error([] { scan_with([](ScanCase& c) { c.delta = c.delta.to(at::kMeta); }); }, {"'delta'", "meta"});
  expect_error([] { conv_with([](ConvCase& c) { c.weight = c.weight.to(at::kMeta); }); }, {"'weight'", "meta"});
}

TEST(OpErrors, CausalConv1d) {
  expect_error([] { conv_with([](ConvCase& c) { c.x = c.x[0]; }); }, {"causal_conv1d", "'x'", "[batch, d_inner, L]"});
  expect_error([] { conv_with([](ConvCase& c) { c.x = c.x.to(at::kLong); }); }, {"'x'", "float32"});
  expect_error([] { conv_with([](ConvCase& c) { c.x = c.x.slice(2, 0, 0), c.reset = c.reset->slice(1, 0, 0); }); },
               {"causal_conv1d", "L", "at least 1"});
  expect_error([] { conv_with([](ConvCase& c) { c.weight = at::zeros({kD}); }); }, {"'weight'", "[d_inner, width]"});
  expect_error([] { conv_with([](ConvCase& c) { c.weight = at::zeros({kD, 1}); }); }, {"width", "between 2 and 8", "got 1"});
  expect_error([] { conv_with([](ConvCase& c) { c.weight = at::zeros({kD, 9}); }); }, {"width", "between 2 and 8", "got 9"});
  expect_error([] { conv_with([](ConvCase& c) { c.weight = at::zeros({kD + 1, kW}); }); },
               {"'weight'", "[d_inner, width]", "[3, 4]"});
  expect_error([] { conv_with([](ConvCase& c) { c.weight = c.weight.to(at::kHalf); }); }, {"'weight'", "float32"});
  expect_error([] { conv_with([](ConvCase& c) { c.bias = at::zeros({kD + 1}); }); }, {"'bias'", "[d_inner]"});
  // An HF-style state keeps W columns; ours keeps W-1.
  expect_error([] { conv_with([](ConvCase& c) { c.initial_state = at::zeros({kB, kD, kW}); }); },
               {"'initial_state'", "[batch, d_inner, width-1]", "[2, 3, 3]", "got [2, 3, 4]"});
  expect_error([] { conv_with([](ConvCase& c) { c.initial_state = c.initial_state->to(at::kHalf); }); },
               {"'initial_state'", "state is kept in float32"});
  expect_error([] { conv_with([](ConvCase& c) { c.reset = c.reset->to(at::kInt); }); }, {"'reset'", "must be bool"});
  expect_error([] { conv_with([](ConvCase& c) { c.reset = c.reset->t(); }); }, {"'reset'", "[batch, L]"});
}

TEST(OpErrors, SelectiveStateUpdate) {
  auto call = [](const std::function<void(at::Tensor& state, at::Tensor& x, at::Tensor& dt, at::Tensor& B,
                                           OptTensor& dt_bias, OptTensor& reset)>& change) {
    const ScanCase c = valid_scan();
    at::Tensor state = c.initial_state->clone(), x = c.u.select(2, 0), dt = c.delta.select(2, 0),
               B = c.B.select(2, 0);
    OptTensor dt_bias = c.delta_bias, reset = c.reset->select(1, 0);
    change(state, x, dt, B, dt_bias, reset);
    ops::selective_state_update(state, x, dt, c.A, B, c.C.select(2, 0), c.D, c.z->select(2, 0), dt_bias, true, reset);
  };
  EXPECT_NO_THROW(call([](auto&...) {}));
  expect_error([&] { call([](at::Tensor& s, auto&...) { s = s.to(at::kBFloat16); }); },
               {"selective_state_update", "'state'", "state is kept in float32"});
  expect_error([&] { call([](at::Tensor& s, auto&...) { s = s.slice(2, 1); }); },
               {"'state'", "[batch, d_inner, d_state]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor& x, auto&...) { x = x.unsqueeze(2); }); },
               {"'x'", "[batch, d_inner]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor& dt, auto&...) { dt = dt.unsqueeze(2); }); },
               {"'dt'", "[batch, d_inner]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor& B, auto&...) { B = B.unsqueeze(2); }); },
               {"'B'", "[batch, d_state]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, OptTensor& bias, OptTensor&) {
                 bias = at::zeros({kD + 1});
               }); },
               {"'dt_bias'", "[d_inner]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, OptTensor&, OptTensor& reset) {
                 reset = reset->unsqueeze(1);
               }); },
               {"'reset'", "[batch]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, OptTensor&, OptTensor& reset) {
                 reset = reset->to(at::kLong);
               }); },
               {"'reset'", "must be bool"});
}

TEST(OpErrors, CausalConv1dUpdate) {
  auto call = [](const std::function<void(at::Tensor& x, at::Tensor& state, at::Tensor& weight, OptTensor& reset)>& change) {
    const ConvCase c = valid_conv();
    at::Tensor x = c.x.select(2, 0), state = c.initial_state->clone(), weight = c.weight;
    OptTensor reset = c.reset->select(1, 0);
    change(x, state, weight, reset);
    ops::causal_conv1d_update(x, state, weight, c.bias, true, reset);
  };
  EXPECT_NO_THROW(call([](auto&...) {}));
  expect_error([&] { call([](at::Tensor& x, auto&...) { x = x.unsqueeze(2); }); },
               {"causal_conv1d_update", "'x'", "[batch, d_inner]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor& s, auto&...) { s = at::zeros({kB, kD, kW}); }); },
               {"'conv_state'", "[batch, d_inner, width-1]"});
  expect_error([&] { call([](at::Tensor&, at::Tensor& s, auto&...) { s = s.to(at::kDouble); }); },
               {"'conv_state'", "state is kept in float32"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor& w, OptTensor&) { w = at::zeros({kD, 1}); }); },
               {"width", "between 2 and 8"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor&, OptTensor& reset) { reset = reset->to(at::kFloat); }); },
               {"'reset'", "must be bool"});
  expect_error([&] { call([](at::Tensor&, at::Tensor&, at::Tensor&, OptTensor& reset) { reset = at::zeros({kB, 1}, at::kBool); }); },
               {"'reset'", "[batch]"});
}

TEST(OpErrors, SmallBatchLinearNamesTheBadArgument) {
  const at::Tensor x = at::randn({2, 5}), w = at::randn({3, 5}), b = at::randn({3});
  EXPECT_TRUE(at::equal(ops::small_batch_linear(x, w, b), at::linear(x, w, b)));  // the CPU kernel is at::linear
  expect_error([&] { ops::small_batch_linear(x.view({10}), w); }, {"small_batch_linear", "'x'", "[batch, in_features]", "[10]"});
  expect_error([&] { ops::small_batch_linear(x, w.narrow(1, 0, 4)); },
               {"small_batch_linear", "'weight'", "[out_features, in_features] = [3, 5]", "[3, 4]"});
  expect_error([&] { ops::small_batch_linear(x, w, b.narrow(0, 0, 2)); }, {"'bias'", "[out_features] = [3]", "[2]"});
  expect_error([&] { ops::small_batch_linear(x, w.to(at::kDouble)); }, {"'weight'", "dtype of 'x'", "Double"});
  expect_error([&] { ops::small_batch_linear(x.to(at::kInt), w.to(at::kInt)); }, {"'x'", "must be float32"});
}

// add_rms_norm_linear on the CPU: the two ops it fuses (the CUDA kernel is compared with them
// bit for bit in test_cuda_ops), the norm checked against a float64 loop; bad arguments named.
TEST(OpErrors, AddRmsNormLinearIsTheTwoOpsAndNamesTheBadArgument) {
  at::manual_seed(11);
  const at::Tensor h = at::randn({2, 6}), r = at::randn({2, 6}), g = at::rand({6}) + 0.5;
  const at::Tensor w = at::randn({4, 6}), b = at::randn({4});
  const auto [y, res] = ops::add_rms_norm_linear(h, r, g, 1e-5, at::kFloat, w, b);
  const auto [normed, res2] = ops::add_rms_norm(h, r, g, 1e-5, at::kFloat);
  EXPECT_TRUE(at::equal(res, res2));
  EXPECT_TRUE(at::equal(y, at::linear(normed, w, b)));
  const at::Tensor sd = (h + r).to(at::kDouble);
  const at::Tensor ref_normed = sd * at::rsqrt(sd.square().mean(-1, true) + 1e-5) * g.to(at::kDouble);
  EXPECT_TRUE(at::allclose(y.to(at::kDouble), at::linear(ref_normed, w.to(at::kDouble), b.to(at::kDouble)), 1e-5, 1e-5));
  const auto [y0, res0] = ops::add_rms_norm_linear(h, std::nullopt, g, 1e-5, std::nullopt, w);  // first layer
  EXPECT_TRUE(at::equal(res0, h));
  EXPECT_TRUE(at::equal(y0, at::linear(std::get<0>(ops::add_rms_norm(h, std::nullopt, g, 1e-5)), w)));

  expect_error([&] { ops::add_rms_norm_linear(h.view({2, 2, 3}), std::nullopt, g, 1e-5, std::nullopt, w); },
               {"add_rms_norm_linear", "'hidden'", "[batch, C]", "[2, 2, 3]"});
  expect_error([&] { ops::add_rms_norm_linear(h, r, g.narrow(0, 0, 5), 1e-5, std::nullopt, w); },
               {"add_rms_norm_linear", "'norm_weight'", "[C]", "[6]", "[5]"});
  expect_error([&] { ops::add_rms_norm_linear(h, r.narrow(1, 0, 5), g, 1e-5, std::nullopt, w); },
               {"add_rms_norm_linear", "'residual'", "[2, 5]"});
  expect_error([&] { ops::add_rms_norm_linear(h, r, g, 1e-5, std::nullopt, w.narrow(1, 0, 5)); },
               {"add_rms_norm_linear", "'weight'", "[out_features, C] with C = 6", "[4, 5]"});
  expect_error([&] { ops::add_rms_norm_linear(h, r, g, 1e-5, std::nullopt, w.to(at::kDouble)); },
               {"add_rms_norm_linear", "'weight'", "dtype of 'norm_weight'", "Double"});
  expect_error([&] { ops::add_rms_norm_linear(h, r, g, 1e-5, std::nullopt, w, b.narrow(0, 0, 3)); },
               {"add_rms_norm_linear", "'bias'", "[out_features] = [4]", "[3]"});
  expect_error([&] { ops::add_rms_norm_linear(h, r, g, 2.0, std::nullopt, w); }, {"add_rms_norm_linear", "'eps'"});
}

}  // namespace
