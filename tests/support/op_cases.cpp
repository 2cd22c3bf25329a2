#include "support/op_cases.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <sstream>

#include "ops/ops.h"
#include "support/reference.h"

namespace statemamba::test {
namespace {

std::string index_str(at::IntArrayRef shape, int64_t flat) {
  std::vector<int64_t> idx(shape.size());
  for (int64_t i = int64_t(shape.size()) - 1; i >= 0; --i) {
    idx[i] = flat % shape[i];
    flat /= shape[i];
  }
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < idx.size(); ++i) o << (i ? ", " : "") << idx[i];
  return o.str() + ']';
}

// Seeded draws, made in float64 and then rounded to the wanted dtype, so every dtype sees the same values.
struct Draw {
  at::Generator gen;
  explicit Draw(uint64_t seed) : gen(at::make_generator<at::CPUGeneratorImpl>(seed)) {}
  at::Tensor normal(at::IntArrayRef shape, at::ScalarType t, double mean = 0, double std = 1) {
    return (at::randn(shape, gen, at::kDouble) * std + mean).to(t);
  }
  at::Tensor uniform(at::IntArrayRef shape, at::ScalarType t, double lo, double hi) {
    return (at::rand(shape, gen, at::kDouble) * (hi - lo) + lo).to(t);
  }
  at::Tensor mask(at::IntArrayRef shape, double p) { return at::rand(shape, gen, at::kDouble) < p; }
};

OptTensor slice_time(const OptTensor& t, int64_t dim, int64_t t0, int64_t t1) {
  return t ? OptTensor(t->slice(dim, t0, t1)) : std::nullopt;
}

}  // namespace

const std::vector<at::ScalarType>& input_dtypes() {
  static const std::vector<at::ScalarType> dtypes = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  return dtypes;
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "f32";
    case at::kDouble: return "f64";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "f16";
    default: return c10::toString(t);
  }
}

Tolerance output_tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return {1e-11, 1e-11};
    case at::kFloat: return {1e-5, 1e-5};
    case at::kHalf: return {std::ldexp(1.0, -11) + 1e-5, 1e-5};
    case at::kBFloat16: return {std::ldexp(1.0, -8) + 1e-5, 1e-5};
    default: ADD_FAILURE() << "no tolerance for " << t; return {0, 0};
  }
}

void expect_close(const at::Tensor& actual, const at::Tensor& expected, Tolerance tol, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const auto a = actual.to(at::kCPU, at::kDouble).contiguous(), e = expected.to(at::kCPU, at::kDouble).contiguous();
  const double *pa = a.data_ptr<double>(), *pe = e.data_ptr<double>();
  int64_t bad = 0, worst = -1;
  double worst_excess = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double excess = std::abs(pa[i] - pe[i]) - (tol.atol + tol.rtol * std::abs(pe[i]));
    if (excess > 0 || std::isnan(pa[i]) != std::isnan(pe[i])) {
      ++bad;
      if (worst < 0 || excess > worst_excess) worst = i, worst_excess = excess;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << a.numel() << " elements outside rtol " << tol.rtol
                    << ", atol " << tol.atol << "; worst at " << index_str(a.sizes(), worst) << ": got "
                    << (worst >= 0 ? pa[worst] : 0) << ", expected " << (worst >= 0 ? pe[worst] : 0);
}

void expect_bit_equal(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  if (at::equal(actual, expected)) return;
  const auto diff = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs();
  const int64_t worst = diff.flatten().argmax().item<int64_t>();
  ADD_FAILURE() << what << ": not bit-identical; " << diff.ne(0).sum().item<int64_t>() << " of " << diff.numel()
                << " elements differ, by at most " << diff.max().item<double>() << " at "
                << index_str(diff.sizes(), worst);
}

std::vector<int64_t> random_cuts(int64_t length, int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> pick(1, length - 1);
  std::set<int64_t> cuts;
  while (int64_t(cuts.size()) < std::min(count, length - 1)) cuts.insert(pick(rng));
  return {cuts.begin(), cuts.end()};
}

std::string join(const std::vector<int64_t>& values) {
  std::ostringstream o;
  for (size_t i = 0; i < values.size(); ++i) o << (i ? " " : "") << values[i];
  return o.str();
}

// ---- selective scan ----------------------------------------------------------------------------

ScanCase ScanCase::random(const ScanOptions& o) {
  Draw draw(o.seed);
  const auto t = o.dtype, p = o.param_dtype;
  ScanCase c;
  c.softplus = o.softplus;
  c.u = draw.normal({o.batch, o.dim, o.seqlen}, t);
  // Without softplus, delta is Δ itself: keep it a small positive step, as a trained model's.
  c.delta = o.softplus ? draw.normal({o.batch, o.dim, o.seqlen}, t, -1.0, 0.5)
                       : draw.uniform({o.batch, o.dim, o.seqlen}, t, 0.02, 0.5);
  c.A = -draw.uniform({o.dim, o.dstate}, at::kDouble, -1.0, 1.0).exp().to(p);  // in [-e, -1/e]
  c.B = draw.normal({o.batch, o.dstate, o.seqlen}, t);
  c.C = draw.normal({o.batch, o.dstate, o.seqlen}, t);
  if (o.D) c.D = draw.normal({o.dim}, p);
  if (o.z) c.z = draw.normal({o.batch, o.dim, o.seqlen}, t);
  if (o.delta_bias) c.delta_bias = o.softplus ? draw.uniform({o.dim}, p, -0.5, 0.5) : draw.uniform({o.dim}, p, 0, 0.1);
  if (o.initial_state) c.initial_state = draw.normal({o.batch, o.dim, o.dstate}, state_dtype_for(t));
  if (o.reset) c.reset = draw.mask({o.batch, o.seqlen}, o.reset_probability);
  return c;
}

std::tuple<at::Tensor, at::Tensor> ScanCase::run() const {
  return ops::selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, reset);
}

std::tuple<at::Tensor, at::Tensor> ScanCase::reference() const {
  return reference_selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, reset);
}

ScanCase ScanCase::steps(int64_t t0, int64_t t1, const OptTensor& state) const {
  ScanCase c = *this;
  c.u = u.slice(2, t0, t1);
  c.delta = delta.slice(2, t0, t1);
  c.B = B.slice(2, t0, t1);
  c.C = C.slice(2, t0, t1);
  c.z = slice_time(z, 2, t0, t1);
  c.reset = slice_time(reset, 1, t0, t1);
  c.initial_state = state;
  return c;
}

ScanCase ScanCase::batch_row(int64_t b) const {
  ScanCase c = *this;
  for (at::Tensor* t : {&c.u, &c.delta, &c.B, &c.C}) *t = t->slice(0, b, b + 1);
  for (OptTensor* t : {&c.z, &c.initial_state, &c.reset})
    if (*t) **t = (*t)->slice(0, b, b + 1);
  return c;
}

std::vector<at::Tensor> ScanCase::differentiable() const {
  std::vector<at::Tensor> out{u, delta, A, B, C};
  for (const auto* t : {&D, &z, &delta_bias, &initial_state})
    if (*t) out.push_back(**t);
  return out;
}

std::vector<std::string> ScanCase::differentiable_names() const {
  std::vector<std::string> out{"u", "delta", "A", "B", "C"};
  if (D) out.push_back("D");
  if (z) out.push_back("z");
  if (delta_bias) out.push_back("delta_bias");
  if (initial_state) out.push_back("initial_state");
  return out;
}

ScanCase ScanCase::with_differentiable(const std::vector<at::Tensor>& t) const {
  ScanCase c = *this;
  size_t i = 0;
  for (at::Tensor* required : {&c.u, &c.delta, &c.A, &c.B, &c.C}) *required = t.at(i++);
  for (OptTensor* optional : {&c.D, &c.z, &c.delta_bias, &c.initial_state})
    if (*optional) *optional = t.at(i++);
  return c;
}

// ---- causal conv1d -----------------------------------------------------------------------------

ConvCase ConvCase::random(const ConvOptions& o) {
  Draw draw(o.seed);
  ConvCase c;
  c.silu = o.silu;
  c.x = draw.normal({o.batch, o.dim, o.seqlen}, o.dtype);
  c.weight = draw.normal({o.dim, o.width}, o.param_dtype, 0, 0.5);
  if (o.bias) c.bias = draw.normal({o.dim}, o.param_dtype, 0, 0.3);
  if (o.initial_state) c.initial_state = draw.normal({o.batch, o.dim, o.width - 1}, state_dtype_for(o.dtype));
  if (o.reset) c.reset = draw.mask({o.batch, o.seqlen}, o.reset_probability);
  return c;
}

std::tuple<at::Tensor, at::Tensor> ConvCase::run() const {
  return ops::causal_conv1d(x, weight, bias, initial_state, reset, silu);
}

std::tuple<at::Tensor, at::Tensor> ConvCase::reference() const {
  return reference_causal_conv1d(x, weight, bias, initial_state, reset, silu);
}

ConvCase ConvCase::steps(int64_t t0, int64_t t1, const OptTensor& state) const {
  ConvCase c = *this;
  c.x = x.slice(2, t0, t1);
  c.reset = slice_time(reset, 1, t0, t1);
  c.initial_state = state;
  return c;
}

ConvCase ConvCase::batch_row(int64_t b) const {
  ConvCase c = *this;
  c.x = x.slice(0, b, b + 1);
  for (OptTensor* t : {&c.initial_state, &c.reset})
    if (*t) **t = (*t)->slice(0, b, b + 1);
  return c;
}

std::vector<at::Tensor> ConvCase::differentiable() const {
  std::vector<at::Tensor> out{x, weight};
  if (bias) out.push_back(*bias);
  if (initial_state) out.push_back(*initial_state);
  return out;
}

std::vector<std::string> ConvCase::differentiable_names() const {
  std::vector<std::string> out{"x", "weight"};
  if (bias) out.push_back("bias");
  if (initial_state) out.push_back("initial_state");
  return out;
}

ConvCase ConvCase::with_differentiable(const std::vector<at::Tensor>& t) const {
  ConvCase c = *this;
  size_t i = 0;
  c.x = t.at(i++);
  c.weight = t.at(i++);
  if (c.bias) c.bias = t.at(i++);
  if (c.initial_state) c.initial_state = t.at(i++);
  return c;
}

}  // namespace statemamba::test
