#pragma once
// Random, seeded inputs for the op tests, each runnable through our op and through the float64
// reference, plus the tolerance-aware comparisons the op tests share.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "support/gradcheck.h"

namespace statemamba::test {

using OptTensor = std::optional<at::Tensor>;

// The input dtypes every op accepts, and short names for test names ("f32", "bf16", ...).
const std::vector<at::ScalarType>& input_dtypes();
std::string dtype_name(at::ScalarType t);
// The dtype of state (and the default for parameters) for inputs of dtype t.
inline at::ScalarType state_dtype_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// For ::testing::TestWithParam<at::ScalarType> suites.
struct DtypeTestName {
  template <typename Info>
  std::string operator()(const Info& info) const { return dtype_name(info.param); }
};

// |actual - expected| <= atol + rtol·|expected| elementwise, as torch.allclose.
struct Tolerance {
  double rtol, atol;
};

// Tolerance of an op output of dtype t against the float64 reference, which reads the same
// (already rounded) inputs: the float32 state arithmetic, plus one rounding of the output to t.
//   float64 1e-11 · float32 1e-5 · float16 2^-11 + 1e-5 · bfloat16 2^-8 + 1e-5 (relative; absolute 1e-5)
Tolerance output_tolerance(at::ScalarType t);

void expect_close(const at::Tensor& actual, const at::Tensor& expected, Tolerance tol, const std::string& what);
// Same dtype, same shape, same bits.
void expect_bit_equal(const at::Tensor& actual, const at::Tensor& expected, const std::string& what);

// Sorted distinct cut points in (0, length), drawn with a seed.
std::vector<int64_t> random_cuts(int64_t length, int64_t count, uint64_t seed);
std::string join(const std::vector<int64_t>& values);

struct ScanOptions {
  int64_t batch = 2, dim = 3, dstate = 4, seqlen = 9;
  at::ScalarType dtype = at::kFloat;        // u, delta, B, C, z
  at::ScalarType param_dtype = at::kFloat;  // A, D, delta_bias: float32 or dtype
  bool D = true, z = true, delta_bias = true, softplus = true, initial_state = true, reset = true;
  double reset_probability = 0.2;
  uint64_t seed = 0;
};

struct ScanCase {
  at::Tensor u, delta, A, B, C;
  OptTensor D, z, delta_bias, initial_state, reset;
  bool softplus = false;

  static ScanCase random(const ScanOptions& o);
  std::tuple<at::Tensor, at::Tensor> run() const;        // statemamba::ops::selective_scan
  std::tuple<at::Tensor, at::Tensor> reference() const;  // float64
  // Steps [t0, t1), starting from `state`; time-independent tensors are shared.
  ScanCase steps(int64_t t0, int64_t t1, const OptTensor& state) const;
  ScanCase batch_row(int64_t b) const;  // batch entry b alone, as a batch of one
  int64_t seqlen() const { return u.size(2); }

  // The differentiable tensors, in schema order, for gradient checks; absent ones are skipped.
  std::vector<at::Tensor> differentiable() const;
  std::vector<std::string> differentiable_names() const;
  ScanCase with_differentiable(const std::vector<at::Tensor>& tensors) const;
};

struct ConvOptions {
  int64_t batch = 2, dim = 3, width = 4, seqlen = 9;
  at::ScalarType dtype = at::kFloat;        // x
  at::ScalarType param_dtype = at::kFloat;  // weight, bias: float32 or dtype
  bool bias = true, initial_state = true, reset = true, silu = false;
  double reset_probability = 0.2;
  uint64_t seed = 0;
};

struct ConvCase {
  at::Tensor x, weight;
  OptTensor bias, initial_state, reset;
  bool silu = false;

  static ConvCase random(const ConvOptions& o);
  std::tuple<at::Tensor, at::Tensor> run() const;        // statemamba::ops::causal_conv1d
  std::tuple<at::Tensor, at::Tensor> reference() const;  // float64
  ConvCase steps(int64_t t0, int64_t t1, const OptTensor& state) const;
  ConvCase batch_row(int64_t b) const;
  int64_t seqlen() const { return x.size(2); }

  std::vector<at::Tensor> differentiable() const;
  std::vector<std::string> differentiable_names() const;
  ConvCase with_differentiable(const std::vector<at::Tensor>& tensors) const;
};

// ---- the same checks for either op (Case: ScanCase or ConvCase) --------------------------------

// Runs c in chunks cut at `cuts`, carrying each chunk's final_state into the next's initial_state;
// returns (y of all chunks, the last final_state).
template <typename Case>
std::tuple<at::Tensor, at::Tensor> run_in_chunks(const Case& c, const std::vector<int64_t>& cuts) {
  std::vector<at::Tensor> ys;
  OptTensor state = c.initial_state;
  int64_t t0 = 0;
  std::vector<int64_t> ends = cuts;
  ends.push_back(c.seqlen());
  for (int64_t t1 : ends) {
    auto [y, next] = c.steps(t0, t1, state).run();
    ys.push_back(y);
    state = next;
    t0 = t1;
  }
  return {at::cat(ys, 2), *state};
}

template <typename Case>
WeightedLoss weighted_loss_for(const Case& c, uint64_t seed) {
  const auto [y, final_state] = c.run();
  return WeightedLoss(y.sizes(), final_state.sizes(), seed);
}

// loss(op(c with its differentiable tensors replaced)), run in chunks when `cuts` are given.
template <typename Case>
LossFn loss_of(const Case& c, const WeightedLoss& loss, std::vector<int64_t> cuts = {}) {
  return [c, loss, cuts](const std::vector<at::Tensor>& tensors) {
    const Case with = c.with_differentiable(tensors);
    auto [y, final_state] = cuts.empty() ? with.run() : run_in_chunks(with, cuts);
    return loss(y, final_state);
  };
}

template <typename Case>
void expect_gradients_match_finite_differences(const Case& c, const WeightedLoss& loss) {
  expect_gradients_match_finite_differences(loss_of(c, loss), c.differentiable(), c.differentiable_names());
}

// Gradients through the carried state: a chunked run's gradients equal one pass's. Per-chunk
// partial sums (of dA, dweight, ...) add up in another order, so up to float64 rounding.
template <typename Case>
void expect_chunked_gradients_equal_one_pass(const Case& c, const WeightedLoss& loss,
                                             const std::vector<int64_t>& cuts) {
  const auto one_pass = autograd_gradients(loss_of(c, loss), c.differentiable());
  const auto chunked = autograd_gradients(loss_of(c, loss, cuts), c.differentiable());
  const auto names = c.differentiable_names();
  for (size_t i = 0; i < names.size(); ++i) {
    ASSERT_TRUE(chunked[i].defined() && one_pass[i].defined()) << names[i];
    expect_close(chunked[i], one_pass[i], {1e-12, 1e-12}, "d loss / d " + names[i]);
  }
}

// Reduced-precision inputs: gradients come back in each input's dtype and equal the float64
// gradients of the same (rounded) values up to that dtype's rounding of the result (plus float32
// accumulation). The loss' y weights should be representable in the dtype, so that grad_y is
// not rounded on its way in.
template <typename Case>
void expect_gradients_match_float64(const Case& c, const WeightedLoss& loss) {
  const auto inputs = c.differentiable();
  std::vector<at::Tensor> as_f64;
  for (const auto& t : inputs) as_f64.push_back(t.to(at::kDouble));
  const auto grads = autograd_gradients(loss_of(c, loss), inputs);
  const auto expected = autograd_gradients(loss_of(c, loss), as_f64);
  const auto names = c.differentiable_names();
  for (size_t i = 0; i < names.size(); ++i) {
    ASSERT_TRUE(grads[i].defined()) << names[i];
    EXPECT_EQ(grads[i].scalar_type(), inputs[i].scalar_type()) << "d loss / d " << names[i];
    const auto dtype = inputs[i].scalar_type();
    const double rounding = dtype == at::kFloat || dtype == at::kDouble ? 0 : output_tolerance(dtype).rtol;
    expect_close(grads[i], expected[i], {rounding + 1e-4, 1e-4}, "d loss / d " + names[i]);
  }
}

// A reset starts an episode: with resets at `starts[b]` in row b (and no others), each stretch
// from one reset to the next equals that stretch run alone from a zero state (the first, if no
// reset at t = 0, from initial_state). Zeroing then stepping is the same arithmetic as stepping
// from zeros, so this must hold bit for bit.
template <typename Case>
void expect_episodes_equal_separate_runs(Case c, const std::vector<std::vector<int64_t>>& starts) {
  const int64_t batch = int64_t(starts.size()), L = c.seqlen();
  c.reset = at::zeros({batch, L}, at::kBool);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t : starts[b]) c.reset->index_put_({b, t}, true);
  const auto [y, final_state] = c.run();
  for (int64_t b = 0; b < batch; ++b) {
    const Case row = c.batch_row(b);
    std::vector<int64_t> bounds = starts[b];
    const bool starts_fresh = !bounds.empty() && bounds.front() == 0;
    if (!starts_fresh) bounds.insert(bounds.begin(), 0);
    bounds.push_back(L);
    for (size_t e = 0; e + 1 < bounds.size(); ++e) {
      const int64_t t0 = bounds[e], t1 = bounds[e + 1];
      SCOPED_TRACE("row " + std::to_string(b) + ", steps [" + std::to_string(t0) + ", " + std::to_string(t1) + ")");
      Case episode = row.steps(t0, t1, t0 == 0 && !starts_fresh ? row.initial_state : std::nullopt);
      episode.reset = std::nullopt;
      const auto [y_episode, state_episode] = episode.run();
      expect_bit_equal(y_episode, y.slice(0, b, b + 1).slice(2, t0, t1), "y");
      if (t1 == L) expect_bit_equal(state_episode, final_state.slice(0, b, b + 1), "final_state");
    }
  }
}

}  // namespace statemamba::test
