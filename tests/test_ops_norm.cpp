// add_rms_norm on the CPU: against a float64 loop of the composite it replaces (hidden + residual in
// the promoted dtype, the cast to the weight's dtype, RMSNorm), layout and batch independence bit
// for bit, gradients against finite differences, Meta shapes, and argument errors.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <string>

#include "ops/ops.h"
#include "support/expect_error.h"
#include "support/gradcheck.h"

namespace {

namespace ops = statemamba::ops;
using statemamba::test::expect_error;

// The composite, with the sum of squares as a plain float64 loop (an independent reference).
std::tuple<at::Tensor, at::Tensor> reference(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                             const at::Tensor& weight, double eps, at::ScalarType residual_dtype) {
  const at::Tensor r = residual ? hidden + *residual : hidden;  // torch's promotion and rounding
  const at::Tensor x = r.to(weight.scalar_type()).to(at::kDouble).contiguous();
  const int64_t C = x.size(-1), rows = x.numel() / C;
  const at::Tensor x2 = x.view({rows, C});
  at::Tensor y = at::empty_like(x2);
  const at::Tensor w = weight.to(at::kDouble);
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += x2[i][c].item<double>() * x2[i][c].item<double>();
    y[i] = x2[i] * (1.0 / std::sqrt(ss / C + eps)) * w;
  }
  return {y.view(x.sizes()), r.to(residual_dtype)};
}

double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  const auto d = a.to(at::kDouble) - ref.to(at::kDouble);
  return (d.norm() / ref.to(at::kDouble).norm().clamp_min(1e-300)).item<double>();
}

at::Tensor channel_major(const at::Tensor& rowmajor) {  // [B, L, C] view of [B, C, L] memory
  return rowmajor.transpose(1, 2).contiguous().transpose(1, 2);
}

struct NormCase {
  at::ScalarType hidden, residual, weight;  // residual: Undefined for none
  at::ScalarType residual_out;
};

class AddRmsNormVsReference : public ::testing::TestWithParam<NormCase> {};

TEST_P(AddRmsNormVsReference, MatchesFloat64Composite) {
  const NormCase p = GetParam();
  torch::manual_seed(1);
  const int64_t B = 3, L = 5, C = 77;  // C not a multiple of 32: the partial sums' tail
  const at::Tensor hidden = torch::randn({B, L, C}, torch::kDouble).mul(3).to(p.hidden);
  std::optional<at::Tensor> residual;
  if (p.residual != at::ScalarType::Undefined) residual = torch::randn({B, L, C}, torch::kDouble).to(p.residual);
  const at::Tensor weight = torch::rand({C}, torch::kDouble).add(0.5).to(p.weight);
  const double eps = 1e-5;
  const auto [normed, residual_out] = ops::add_rms_norm(hidden, residual, weight, eps, p.residual_out);
  const auto [ref_normed, ref_residual] = reference(hidden, residual, weight, eps, p.residual_out);
  EXPECT_EQ(normed.scalar_type(), p.weight);
  EXPECT_EQ(residual_out.scalar_type(), p.residual_out);
  // The residual is a sum and a cast, exactly as torch computes them.
  EXPECT_TRUE(torch::equal(residual_out, ref_residual));
  // normed: its own rounding to the weight's dtype, plus float32 arithmetic (float64 inputs: ~1e-15).
  const bool f64 = p.hidden == at::kDouble || p.weight == at::kDouble || p.residual == at::kDouble;
  const double tol = p.weight == at::kBFloat16 ? 8e-3 : p.weight == at::kHalf ? 1e-3 : f64 ? 1e-13 : 1e-6;
  EXPECT_LT(rel_err(normed, ref_normed), tol);
}

const at::ScalarType kNone = at::ScalarType::Undefined;
INSTANTIATE_TEST_SUITE_P(Dtypes, AddRmsNormVsReference,
                         ::testing::Values(NormCase{at::kFloat, kNone, at::kFloat, at::kFloat},
                                           NormCase{at::kBFloat16, kNone, at::kBFloat16, at::kFloat},
                                           NormCase{at::kBFloat16, at::kFloat, at::kBFloat16, at::kFloat},
                                           NormCase{at::kBFloat16, at::kBFloat16, at::kBFloat16, at::kBFloat16},
                                           NormCase{at::kHalf, at::kFloat, at::kHalf, at::kFloat},
                                           NormCase{at::kFloat, at::kFloat, at::kBFloat16, at::kFloat},
                                           NormCase{at::kDouble, at::kDouble, at::kDouble, at::kDouble}));

TEST(AddRmsNorm, LayoutAndBatchDoNotChangeBits) {
  torch::manual_seed(2);
  const int64_t B = 2, L = 9, C = 768;
  const at::Tensor hidden = torch::randn({B, L, C}).to(at::kBFloat16);
  const at::Tensor residual = torch::randn({B, L, C});
  const at::Tensor weight = torch::rand({C}).add(0.5).to(at::kBFloat16);
  const auto [n_row, r_row] = ops::add_rms_norm(hidden, residual, weight, 1e-5, at::kFloat);
  const auto [n_cm, r_cm] = ops::add_rms_norm(channel_major(hidden), channel_major(residual), weight, 1e-5, at::kFloat);
  // Channel-major in, channel-major out.
  EXPECT_EQ(n_cm.strides(), channel_major(n_row).strides());
  EXPECT_EQ(r_cm.strides(), channel_major(r_row).strides());
  EXPECT_TRUE(torch::equal(n_cm.contiguous(), n_row));
  EXPECT_TRUE(torch::equal(r_cm.contiguous(), r_row));
  // Mixed layouts (hidden channel-major, residual row-major) give the same values.
  const auto [n_mix, r_mix] = ops::add_rms_norm(channel_major(hidden), residual, weight, 1e-5, at::kFloat);
  EXPECT_TRUE(torch::equal(n_mix.contiguous(), n_row));
  // A decode step's [B, C] row equals that row of the sequence.
  const auto [n_step, r_step] =
      ops::add_rms_norm(hidden.select(1, 4), residual.select(1, 4), weight, 1e-5, at::kFloat);
  EXPECT_TRUE(torch::equal(n_step, n_row.select(1, 4)));
  EXPECT_TRUE(torch::equal(r_step, r_row.select(1, 4)));
  // One row alone equals it within the batch.
  const auto [n_one, r_one] =
      ops::add_rms_norm(hidden.narrow(0, 1, 1), residual.narrow(0, 1, 1), weight, 1e-5, at::kFloat);
  EXPECT_TRUE(torch::equal(n_one, n_row.narrow(0, 1, 1)));
}

TEST(AddRmsNorm, GradientsMatchFiniteDifferences) {
  torch::manual_seed(3);
  const int64_t B = 2, L = 3, C = 37;
  for (bool with_residual : {false, true}) {
    for (bool cm : {false, true}) {
      at::Tensor hidden = torch::randn({B, L, C}, torch::kDouble);
      at::Tensor residual = torch::randn({B, L, C}, torch::kDouble);
      if (cm) hidden = channel_major(hidden), residual = channel_major(residual);
      const at::Tensor weight = torch::rand({C}, torch::kDouble).add(0.5);
      const at::Tensor wn = torch::randn({B, L, C}, torch::kDouble), wr = torch::randn({B, L, C}, torch::kDouble);
      std::vector<at::Tensor> inputs{hidden, weight};
      if (with_residual) inputs.push_back(residual);
      auto loss = [&](const std::vector<at::Tensor>& in) {
        const std::optional<at::Tensor> res = with_residual ? std::optional<at::Tensor>(in[2]) : std::nullopt;
        const auto [n, r] = ops::add_rms_norm(in[0], res, in[1], 1e-3, at::kDouble);
        return (n * wn).sum() + (r * wr).sum();  // both outputs carry gradient
      };
      std::vector<std::string> names{"hidden", "weight"};
      if (with_residual) names.push_back("residual");
      SCOPED_TRACE(std::string(with_residual ? "with" : "without") + " residual, " + (cm ? "channel-major" : "row-major"));
      statemamba::test::expect_gradients_match_finite_differences(loss, inputs, names);
    }
  }
}

TEST(AddRmsNorm, MetaGivesShapesAndLayout) {
  const auto meta = torch::TensorOptions(at::kMeta);
  const at::Tensor hidden = torch::empty({2, 16, 6}, meta.dtype(at::kBFloat16)).transpose(1, 2);  // [2, 6, 16] channel-major
  const at::Tensor weight = torch::empty({16}, meta.dtype(at::kBFloat16));
  const auto [n, r] = ops::add_rms_norm(hidden, std::nullopt, weight, 1e-5, at::kFloat);
  EXPECT_EQ(n.sizes(), hidden.sizes());
  EXPECT_EQ(n.strides(), hidden.strides());
  EXPECT_EQ(n.scalar_type(), at::kBFloat16);
  EXPECT_EQ(r.scalar_type(), at::kFloat);
}

TEST(AddRmsNorm, RejectsBadArguments) {
  const at::Tensor h = torch::randn({2, 3, 8}), w = torch::ones({8});
  expect_error([&] { ops::add_rms_norm(h, std::nullopt, torch::ones({7}), 1e-5); },
               {"add_rms_norm", "'weight'", "[8]", "[7]"});
  expect_error([&] { ops::add_rms_norm(h, torch::randn({2, 3, 7}), w, 1e-5); },
               {"add_rms_norm", "'residual'", "hidden's shape"});
  expect_error([&] { ops::add_rms_norm(h.to(at::kInt), std::nullopt, w, 1e-5); }, {"'hidden'", "Int"});
  expect_error([&] { ops::add_rms_norm(h, std::nullopt, w, -1.0); }, {"'eps'", "-1"});
  expect_error([&] { ops::add_rms_norm(h, std::nullopt, w, 1e-5, at::kLong); }, {"'residual_dtype'", "Long"});
  expect_error([&] { ops::add_rms_norm(torch::randn({0, 8}), std::nullopt, w, 1e-5); }, {"'hidden'", "non-empty"});
}

}  // namespace
