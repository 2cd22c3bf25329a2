// The CUDA kernels against the CPU kernels on the same inputs (forward and backward, every
// optional argument, odd and long lengths, batch 1 to 4096), plus the CUDA-only invariants:
// chunking and episode resets bit for bit, and decode steps equal to the sequence kernels.
// Skipped where no CUDA GPU is present.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "ops/ops.h"
#include "support/expect_error.h"
#include "support/op_cases.h"

namespace {

using namespace statemamba::test;
namespace ops = statemamba::ops;

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU: the CUDA kernels are tested on a GPU machine"

const at::Device kCuda("cuda");

OptTensor on(const OptTensor& t, at::Device dev) { return t ? OptTensor(t->to(dev)) : std::nullopt; }
at::Tensor on(const at::Tensor& t, at::Device dev) { return t.defined() ? t.to(dev) : t; }

ScanCase on(const ScanCase& c, at::Device dev) {
  ScanCase o = c;
  for (at::Tensor* t : {&o.u, &o.delta, &o.A, &o.B, &o.C}) *t = t->to(dev);
  for (OptTensor* t : {&o.D, &o.z, &o.delta_bias, &o.initial_state, &o.reset}) *t = on(*t, dev);
  return o;
}
ConvCase on(const ConvCase& c, at::Device dev) {
  ConvCase o = c;
  o.x = o.x.to(dev), o.weight = o.weight.to(dev);
  for (OptTensor* t : {&o.bias, &o.initial_state, &o.reset}) *t = on(*t, dev);
  return o;
}

// CUDA vs CPU on the same inputs: both accumulate in float32 (float64 for float64 inputs) but in
// another order and with the GPU's fast exp/log, so float32 agrees to ~1e-5 of the tensor's scale;
// a 16-bit output may round to the neighbouring value (one ulp: 2^-7 bfloat16, 2^-10 float16).
void expect_matches(const at::Tensor& cuda, const at::Tensor& cpu, const std::string& what) {
  ASSERT_EQ(cuda.defined(), cpu.defined()) << what;
  if (!cpu.defined()) return;
  ASSERT_TRUE(cuda.is_cuda()) << what;
  EXPECT_EQ(cuda.scalar_type(), cpu.scalar_type()) << what;
  const auto t = cpu.scalar_type();
  const double ulp = t == at::kBFloat16 ? std::ldexp(1.0, -7) : t == at::kHalf ? std::ldexp(1.0, -10) : 0.0;
  const double rel = t == at::kDouble ? 1e-10 : 1e-4;
  const double scale = cpu.numel() ? cpu.to(at::kDouble).abs().max().item<double>() : 0.0;
  expect_close(cuda.cpu(), cpu, {ulp + rel, rel * std::max(scale, 1.0)}, what);
}

// support's expect_episodes_equal_separate_runs builds its reset mask on the CPU; this is the same
// check with the mask on the case's device.
template <typename Case>
void expect_cuda_episodes_equal_separate_runs(Case c, const std::vector<std::vector<int64_t>>& starts) {
  const int64_t batch = int64_t(starts.size()), L = c.seqlen();
  at::Tensor mask = at::zeros({batch, L}, at::kBool);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t : starts[b]) mask.index_put_({b, t}, true);
  c.reset = mask.to(kCuda);
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

const std::pair<const char*, at::ScalarType> kDtypes[] = {
    {"f32", at::kFloat}, {"bf16", at::kBFloat16}, {"f16", at::kHalf}, {"f64", at::kDouble}};

// ---- selective scan ------------------------------------------------------------------------------

struct ScanCudaCase {
  std::string name;
  ScanOptions options;
};
// gtest prints parameters in test listings; the name says it all (the default dumps raw bytes).
void PrintTo(const ScanCudaCase& c, std::ostream* os) { *os << c.name; }

std::vector<ScanCudaCase> scan_cases() {
  std::vector<ScanCudaCase> cases;
  for (auto [dname, dtype] : kDtypes) {
    auto add = [&, dname = dname, dtype = dtype](std::string name, ScanOptions o) {
      o.dtype = dtype;
      o.param_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      o.seed = 1000 + cases.size();
      cases.push_back({std::string(dname) + "_" + name, o});
    };
    ScanOptions base;  // 70 channels: several blocks and a partial one; L = 37: a partial tile
    base.batch = 3, base.dim = 70, base.dstate = 16, base.seqlen = 37;
    add("all", base);
    ScanOptions none = base;
    none.D = none.z = none.delta_bias = none.softplus = none.initial_state = none.reset = false;
    add("none", none);
    const std::pair<const char*, bool ScanOptions::*> flags[] = {
        {"D", &ScanOptions::D},         {"z", &ScanOptions::z},
        {"delta_bias", &ScanOptions::delta_bias}, {"softplus", &ScanOptions::softplus},
        {"initial_state", &ScanOptions::initial_state}, {"reset", &ScanOptions::reset}};
    for (auto [fname, flag] : flags) {
      ScanOptions o = none;
      o.*flag = true;
      add(std::string("only_") + fname, o);
    }
    // d_state buckets (lanes per channel 1..32) and the simple kernel past 128.
    for (int64_t N : {1, 4, 13, 32, 64, 128, 130}) {
      ScanOptions o = base;
      o.dstate = N, o.dim = 9;
      add("dstate" + std::to_string(N), o);
    }
    // Lengths around the forward (32) and backward (16) tiles; multiples of 8 take the 16-byte path.
    for (int64_t L : {1, 15, 16, 17, 31, 32, 33, 64, 256, 1000}) {
      ScanOptions o = base;
      o.seqlen = L, o.dim = 33;
      o.reset_probability = L == 1 ? 0.5 : 0.05;
      add("L" + std::to_string(L), o);
    }
    ScanOptions long_seq = base;
    long_seq.batch = 2, long_seq.dim = 4, long_seq.seqlen = 8192, long_seq.reset_probability = 0.002;
    add("L8192", long_seq);
    ScanOptions wide = base;
    wide.batch = 256, wide.dim = 8, wide.seqlen = 24;
    add("batch256", wide);
    ScanOptions one = base;
    one.batch = 1;
    add("batch1", one);
    if (dtype == at::kBFloat16 || dtype == at::kHalf) {
      ScanOptions params = base;  // A, D, delta_bias in the inputs' dtype
      params.dtype = dtype;
      params.param_dtype = dtype;
      params.seed = 1000 + cases.size();
      cases.push_back({std::string(dname) + "_params_in_dtype", params});
    }
  }
  return cases;
}

class CudaScan : public ::testing::TestWithParam<ScanCudaCase> {};

TEST_P(CudaScan, ForwardMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const ScanCase c = ScanCase::random(GetParam().options);
  const auto [y, final_state] = c.run();
  const auto [y_gpu, state_gpu] = on(c, kCuda).run();
  expect_matches(y_gpu, y, "y");
  expect_matches(state_gpu, final_state, "final_state");
}

TEST_P(CudaScan, BackwardMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const ScanOptions& o = GetParam().options;
  const ScanCase c = ScanCase::random(o);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 77);
  const at::Tensor gy = at::randn(c.u.sizes(), gen, at::kDouble).to(o.dtype);
  for (bool with_gfinal : {true, false}) {
    SCOPED_TRACE(with_gfinal ? "with grad_final_state" : "without grad_final_state");
    const OptTensor gfinal = with_gfinal ? OptTensor(at::randn({o.batch, o.dim, o.dstate}, gen, at::kDouble)
                                                         .to(o.dtype == at::kDouble ? at::kDouble : at::kFloat))
                                         : std::nullopt;
    const auto cpu = ops::selective_scan_backward(gy, gfinal, c.u, c.delta, c.A, c.B, c.C, c.D, c.z, c.delta_bias,
                                                  c.softplus, c.initial_state, c.reset);
    const ScanCase g = on(c, kCuda);
    const auto gpu = ops::selective_scan_backward(gy.to(kCuda), on(gfinal, kCuda), g.u, g.delta, g.A, g.B, g.C, g.D,
                                                  g.z, g.delta_bias, g.softplus, g.initial_state, g.reset);
    expect_matches(std::get<0>(gpu), std::get<0>(cpu), "du");
    expect_matches(std::get<1>(gpu), std::get<1>(cpu), "ddelta");
    expect_matches(std::get<2>(gpu), std::get<2>(cpu), "dA");
    expect_matches(std::get<3>(gpu), std::get<3>(cpu), "dB");
    expect_matches(std::get<4>(gpu), std::get<4>(cpu), "dC");
    expect_matches(std::get<5>(gpu), std::get<5>(cpu), "dD");
    expect_matches(std::get<6>(gpu), std::get<6>(cpu), "dz");
    expect_matches(std::get<7>(gpu), std::get<7>(cpu), "ddelta_bias");
    expect_matches(std::get<8>(gpu), std::get<8>(cpu), "dinitial_state");
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, CudaScan, ::testing::ValuesIn(scan_cases()),
                         [](const auto& info) { return info.param.name; });

// Autograd through the CUDA kernels gives the CPU gradients (the autograd kernel calls the
// backward op, which dispatches to CUDA).
TEST(CudaScanAutograd, GradientsMatchCpu) {
  SKIP_WITHOUT_CUDA();
  ScanOptions o;
  o.batch = 2, o.dim = 40, o.dstate = 16, o.seqlen = 50, o.seed = 5;
  const ScanCase c = ScanCase::random(o);
  const WeightedLoss loss = weighted_loss_for(c, 9);
  const auto cpu = autograd_gradients(loss_of(c, loss), c.differentiable());
  const ScanCase g = on(c, kCuda);
  WeightedLoss loss_gpu = loss;
  loss_gpu.y_weight = loss.y_weight.to(kCuda), loss_gpu.state_weight = loss.state_weight.to(kCuda);
  const auto gpu = autograd_gradients(loss_of(g, loss_gpu), g.differentiable());
  const auto names = c.differentiable_names();
  for (size_t i = 0; i < names.size(); ++i) expect_matches(gpu[i], cpu[i], "d loss / d " + names[i]);
}

// One sequential recurrence per lane, whatever the tile a step lands in: chunks carried through
// final_state equal one pass bit for bit, also with resets on chunk edges.
TEST(CudaScanChunking, CarriedStateEqualsOnePassBitForBit) {
  SKIP_WITHOUT_CUDA();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (uint64_t seed = 0; seed < 4; ++seed) {
      ScanOptions o;
      o.batch = 3, o.dim = 40, o.dstate = 16, o.seqlen = 150;
      o.dtype = dtype;
      o.param_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      o.seed = 200 + seed;
      ScanCase c = on(ScanCase::random(o), kCuda);
      const auto cuts = random_cuts(o.seqlen, 1 + seed % 4, seed);
      c.reset->index_put_({0, cuts[0]}, true);
      SCOPED_TRACE(std::string(c10::toString(dtype)) + ", cuts " + join(cuts));
      const auto [y, final_state] = c.run();
      const auto [y_chunked, state_chunked] = run_in_chunks(c, cuts);
      expect_bit_equal(y_chunked, y, "y");
      expect_bit_equal(state_chunked, final_state, "final_state");
    }
  }
}

TEST(CudaScanResets, EpisodesEqualSeparateRunsFromZeros) {
  SKIP_WITHOUT_CUDA();
  ScanOptions o;
  o.batch = 2, o.dim = 40, o.dstate = 16, o.seqlen = 100;
  expect_cuda_episodes_equal_separate_runs(on(ScanCase::random(o), kCuda), {{0, 31, 32, 64, 70}, {13, 99}});
}

// ---- decode steps --------------------------------------------------------------------------------

at::Tensor step_of(const at::Tensor& t, int64_t s) { return t.select(-1, s); }
OptTensor step_of(const OptTensor& t, int64_t s) { return t ? OptTensor(t->select(-1, s)) : std::nullopt; }

at::Tensor zero_or_initial(const OptTensor& init, at::IntArrayRef shape, const at::Tensor& like, at::ScalarType st) {
  return init ? init->clone() : at::zeros(shape, like.options().dtype(st));
}

// Stepping selective_state_update over a sequence equals selective_scan bit for bit on CUDA.
TEST(CudaDecode, ScanStepsEqualSequenceKernel) {
  SKIP_WITHOUT_CUDA();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    for (int64_t N : {16, 13, 200}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + ", d_state " + std::to_string(N));
      ScanOptions o;
      o.batch = 3, o.dim = 40, o.dstate = N, o.seqlen = 40, o.reset_probability = 0.1;
      o.dtype = dtype;
      o.param_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      o.seed = 300 + N;
      const ScanCase c = on(ScanCase::random(o), kCuda);
      const auto [y, final_state] = c.run();
      at::Tensor state = zero_or_initial(c.initial_state, {o.batch, o.dim, N}, c.u,
                                         dtype == at::kDouble ? at::kDouble : at::kFloat);
      std::vector<at::Tensor> ys;
      for (int64_t t = 0; t < o.seqlen; ++t)
        ys.push_back(ops::selective_state_update(state, step_of(c.u, t), step_of(c.delta, t), c.A, step_of(c.B, t),
                                                 step_of(c.C, t), c.D, step_of(c.z, t), c.delta_bias, c.softplus,
                                                 step_of(c.reset, t)));
      const at::Tensor y_steps = at::stack(ys, 2);
      if (N <= 128 || dtype == at::kDouble) {
        expect_bit_equal(y_steps, y, "y");
        expect_bit_equal(state, final_state, "state");
      } else {  // past 128 states the decode and sequence kernels are different simple kernels
        expect_matches(y_steps, y.cpu(), "y");
        expect_matches(state, final_state.cpu(), "state");
      }
    }
  }
}

TEST(CudaDecode, ConvStepsEqualSequenceKernel) {
  SKIP_WITHOUT_CUDA();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (int64_t W : {2, 4, 8}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + ", width " + std::to_string(W));
      ConvOptions o;
      o.batch = 3, o.dim = 20, o.width = W, o.seqlen = 30, o.silu = true, o.reset_probability = 0.15;
      o.dtype = dtype;
      o.param_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      o.seed = 400 + W;
      const ConvCase c = on(ConvCase::random(o), kCuda);
      const auto [y, final_state] = c.run();
      at::Tensor state = zero_or_initial(c.initial_state, {o.batch, o.dim, W - 1}, c.x,
                                         dtype == at::kDouble ? at::kDouble : at::kFloat);
      std::vector<at::Tensor> ys;
      for (int64_t t = 0; t < o.seqlen; ++t)
        ys.push_back(ops::causal_conv1d_update(step_of(c.x, t), state, c.weight, c.bias, c.silu, step_of(c.reset, t)));
      expect_bit_equal(at::stack(ys, 2), y, "y");
      expect_bit_equal(state, final_state, "state");
    }
  }
}

// Decode ops against the CPU ops at batch 1 to 4096.
TEST(CudaDecode, MatchCpuFromBatch1To4096) {
  SKIP_WITHOUT_CUDA();
  for (auto [dname, dtype] : kDtypes) {
    for (int64_t batch : {1, 5, 256, 4096}) {
      SCOPED_TRACE(std::string(dname) + ", batch " + std::to_string(batch));
      ScanOptions o;
      o.batch = batch, o.dim = 24, o.dstate = 16, o.seqlen = 1, o.reset_probability = 0.3;
      o.dtype = dtype;
      o.param_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      o.seed = 500 + batch;
      const ScanCase c = ScanCase::random(o);
      const ScanCase g = on(c, kCuda);
      at::Tensor st = c.initial_state->clone(), st_gpu = g.initial_state->clone();
      const auto y = ops::selective_state_update(st, step_of(c.u, 0), step_of(c.delta, 0), c.A, step_of(c.B, 0),
                                                 step_of(c.C, 0), c.D, step_of(c.z, 0), c.delta_bias, c.softplus,
                                                 step_of(c.reset, 0));
      const auto y_gpu = ops::selective_state_update(st_gpu, step_of(g.u, 0), step_of(g.delta, 0), g.A,
                                                     step_of(g.B, 0), step_of(g.C, 0), g.D, step_of(g.z, 0),
                                                     g.delta_bias, g.softplus, step_of(g.reset, 0));
      expect_matches(y_gpu, y, "selective_state_update y");
      expect_matches(st_gpu, st, "selective_state_update state");

      ConvOptions co;
      co.batch = batch, co.dim = 24, co.width = 4, co.seqlen = 1, co.silu = true, co.reset_probability = 0.3;
      co.dtype = dtype;
      co.param_dtype = o.param_dtype;
      co.seed = 600 + batch;
      const ConvCase cc = ConvCase::random(co);
      const ConvCase cg = on(cc, kCuda);
      at::Tensor cs = cc.initial_state->clone(), cs_gpu = cg.initial_state->clone();
      const auto yc = ops::causal_conv1d_update(step_of(cc.x, 0), cs, cc.weight, cc.bias, true, step_of(cc.reset, 0));
      const auto yc_gpu =
          ops::causal_conv1d_update(step_of(cg.x, 0), cs_gpu, cg.weight, cg.bias, true, step_of(cg.reset, 0));
      expect_matches(yc_gpu, yc, "causal_conv1d_update y");
      expect_matches(cs_gpu, cs, "causal_conv1d_update state");
    }
  }
}

// A strided (non-contiguous) state is advanced in place all the same.
TEST(CudaDecode, NonContiguousStateIsUpdatedInPlace) {
  SKIP_WITHOUT_CUDA();
  ScanOptions o;
  o.batch = 4, o.dim = 8, o.dstate = 16, o.seqlen = 1;
  const ScanCase g = on(ScanCase::random(o), kCuda);
  at::Tensor backing = at::zeros({o.batch, o.dstate, o.dim}, g.u.options());
  at::Tensor state = backing.transpose(1, 2);  // [B, D, N], not contiguous
  state.copy_(*g.initial_state);
  at::Tensor expected = g.initial_state->clone();
  ops::selective_state_update(expected, step_of(g.u, 0), step_of(g.delta, 0), g.A, step_of(g.B, 0), step_of(g.C, 0),
                              g.D, step_of(g.z, 0), g.delta_bias, g.softplus, step_of(g.reset, 0));
  ops::selective_state_update(state, step_of(g.u, 0), step_of(g.delta, 0), g.A, step_of(g.B, 0), step_of(g.C, 0),
                              g.D, step_of(g.z, 0), g.delta_bias, g.softplus, step_of(g.reset, 0));
  expect_bit_equal(state.contiguous(), expected, "state");
}

// ---- causal conv1d ------------------------------------------------------------------------------

struct ConvCudaCase {
  std::string name;
  ConvOptions options;
};
void PrintTo(const ConvCudaCase& c, std::ostream* os) { *os << c.name; }

std::vector<ConvCudaCase> conv_cases() {
  std::vector<ConvCudaCase> cases;
  for (auto [dname, dtype] : kDtypes) {
    auto add = [&, dname = dname, dtype = dtype](std::string name, ConvOptions o) {
      o.dtype = dtype;
      o.param_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      o.seed = 2000 + cases.size();
      cases.push_back({std::string(dname) + "_" + name, o});
    };
    ConvOptions base;
    base.batch = 3, base.dim = 7, base.width = 4, base.seqlen = 37, base.silu = true;
    add("all", base);
    ConvOptions none = base;
    none.bias = none.initial_state = none.reset = none.silu = false;
    add("none", none);
    for (int64_t W : {2, 3, 5, 8}) {
      ConvOptions o = base;
      o.width = W;
      add("width" + std::to_string(W), o);
    }
    for (int64_t L : {1, 2, 7, 8, 9, 64, 1000, 8192}) {
      ConvOptions o = base;
      o.seqlen = L;
      o.reset_probability = L <= 2 ? 0.5 : 0.05;
      add("L" + std::to_string(L), o);
    }
    ConvOptions no_silu = base;
    no_silu.silu = false;
    add("no_silu", no_silu);
    ConvOptions wide = base;
    wide.batch = 256, wide.dim = 4, wide.seqlen = 24;
    add("batch256", wide);
    if (dtype == at::kBFloat16 || dtype == at::kHalf) {
      ConvOptions params = base;
      params.dtype = dtype, params.param_dtype = dtype, params.seed = 2000 + cases.size();
      cases.push_back({std::string(dname) + "_params_in_dtype", params});
    }
  }
  return cases;
}

class CudaConv : public ::testing::TestWithParam<ConvCudaCase> {};

TEST_P(CudaConv, ForwardMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const ConvCase c = ConvCase::random(GetParam().options);
  const auto [y, final_state] = c.run();
  const auto [y_gpu, state_gpu] = on(c, kCuda).run();
  expect_matches(y_gpu, y, "y");
  expect_matches(state_gpu, final_state, "final_state");
}

TEST_P(CudaConv, BackwardMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const ConvOptions& o = GetParam().options;
  const ConvCase c = ConvCase::random(o);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 77);
  const at::Tensor gy = at::randn(c.x.sizes(), gen, at::kDouble).to(o.dtype);
  for (bool with_gfinal : {true, false}) {
    SCOPED_TRACE(with_gfinal ? "with grad_final_state" : "without grad_final_state");
    const OptTensor gfinal = with_gfinal ? OptTensor(at::randn({o.batch, o.dim, o.width - 1}, gen, at::kDouble)
                                                         .to(o.dtype == at::kDouble ? at::kDouble : at::kFloat))
                                         : std::nullopt;
    const auto cpu = ops::causal_conv1d_backward(gy, gfinal, c.x, c.weight, c.bias, c.initial_state, c.reset, c.silu);
    const ConvCase g = on(c, kCuda);
    const auto gpu = ops::causal_conv1d_backward(gy.to(kCuda), on(gfinal, kCuda), g.x, g.weight, g.bias,
                                                 g.initial_state, g.reset, g.silu);
    expect_matches(std::get<0>(gpu), std::get<0>(cpu), "dx");
    expect_matches(std::get<1>(gpu), std::get<1>(cpu), "dweight");
    expect_matches(std::get<2>(gpu), std::get<2>(cpu), "dbias");
    expect_matches(std::get<3>(gpu), std::get<3>(cpu), "dinitial_state");
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, CudaConv, ::testing::ValuesIn(conv_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(CudaConvChunking, CarriedStateEqualsOnePassBitForBit) {
  SKIP_WITHOUT_CUDA();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (uint64_t seed = 0; seed < 4; ++seed) {
      ConvOptions o;
      o.batch = 3, o.dim = 6, o.width = 4, o.seqlen = 70, o.silu = true;
      o.dtype = dtype;
      o.param_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      o.seed = 700 + seed;
      ConvCase c = on(ConvCase::random(o), kCuda);
      const auto cuts = random_cuts(o.seqlen, 1 + seed % 4, seed);
      c.reset->index_put_({0, cuts[0]}, true);
      SCOPED_TRACE(std::string(c10::toString(dtype)) + ", cuts " + join(cuts));
      const auto [y, final_state] = c.run();
      const auto [y_chunked, state_chunked] = run_in_chunks(c, cuts);
      expect_bit_equal(y_chunked, y, "y");
      expect_bit_equal(state_chunked, final_state, "final_state");
    }
  }
}

TEST(CudaConvResets, EpisodesEqualSeparateRunsFromZeros) {
  SKIP_WITHOUT_CUDA();
  ConvOptions o;
  o.batch = 2, o.dim = 5, o.width = 4, o.seqlen = 40, o.silu = true;
  expect_cuda_episodes_equal_separate_runs(on(ConvCase::random(o), kCuda), {{0, 7, 8, 9, 20}, {13, 39}});
}

// ---- argument checks ----------------------------------------------------------------------------

TEST(CudaArgs, MixedDevicesAreRejected) {
  SKIP_WITHOUT_CUDA();
  const ScanCase c = ScanCase::random(ScanOptions{});
  ScanCase g = on(c, kCuda);
  g.A = c.A;  // on the CPU
  EXPECT_THROW(g.run(), c10::Error);
  ConvCase cc = on(ConvCase::random(ConvOptions{}), kCuda);
  cc.reset = cc.reset->cpu();
  EXPECT_THROW(cc.run(), c10::Error);
}

// ---- add_rms_norm --------------------------------------------------------------------------------

at::Tensor channel_major(const at::Tensor& t) { return t.transpose(1, 2).contiguous().transpose(1, 2); }

double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  const auto d = a.cpu().to(at::kDouble) - ref.cpu().to(at::kDouble);
  return (d.norm() / ref.cpu().to(at::kDouble).norm().clamp_min(1e-300)).item<double>();
}

TEST(CudaAddRmsNorm, MatchesCpuInBothLayouts) {
  SKIP_WITHOUT_CUDA();
  struct Case { at::ScalarType hidden, residual, weight; double tol; };
  for (const Case k : {Case{at::kBFloat16, at::kFloat, at::kBFloat16, 1e-2}, Case{at::kFloat, at::kFloat, at::kFloat, 1e-5},
                       Case{at::kHalf, at::kHalf, at::kHalf, 2e-3}, Case{at::kDouble, at::kDouble, at::kDouble, 1e-12}}) {
    for (int64_t C : {77, 768, 2560}) {  // 2560 > 1024: the row kernel's streaming path
      for (bool cm : {false, true}) {
        SCOPED_TRACE(std::string(c10::toString(k.hidden)) + " C=" + std::to_string(C) + (cm ? " channel-major" : " row-major"));
        torch::manual_seed(C);
        at::Tensor h = torch::randn({3, 37, C}).to(k.hidden), r = torch::randn({3, 37, C}).to(k.residual);
        if (cm) h = channel_major(h), r = channel_major(r);
        const at::Tensor w = torch::rand({C}).add(0.5).to(k.weight);
        const auto [n_cpu, r_cpu] = ops::add_rms_norm(h, r, w, 1e-5, at::kFloat);
        const auto [n_gpu, r_gpu] = ops::add_rms_norm(h.to(kCuda), r.to(kCuda), w.to(kCuda), 1e-5, at::kFloat);
        EXPECT_EQ(n_gpu.strides(), n_cpu.strides());
        EXPECT_TRUE(torch::equal(r_gpu.cpu(), r_cpu));  // a sum and a cast: the same bits
        EXPECT_LT(rel_err(n_gpu, n_cpu), k.tol);
      }
    }
  }
}

TEST(CudaAddRmsNorm, LayoutsAndBatchAgreeBitForBit) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(5);
  const int64_t B = 4, L = 300, C = 768;
  const at::Tensor h = torch::randn({B, L, C}, torch::TensorOptions(kCuda)).to(at::kBFloat16);
  const at::Tensor r = torch::randn({B, L, C}, torch::TensorOptions(kCuda));
  const at::Tensor w = torch::rand({C}, torch::TensorOptions(kCuda)).add(0.5).to(at::kBFloat16);
  // The warp-per-row kernel (row-major) and the thread-per-position kernel (channel-major).
  const auto [n_row, r_row] = ops::add_rms_norm(h, r, w, 1e-5, at::kFloat);
  const auto [n_cm, r_cm] = ops::add_rms_norm(channel_major(h), channel_major(r), w, 1e-5, at::kFloat);
  EXPECT_TRUE(torch::equal(n_cm.contiguous(), n_row));
  EXPECT_TRUE(torch::equal(r_cm.contiguous(), r_row));
  // A decode step's rows ([B, C]) equal the sequence's rows at that position.
  const auto [n_step, r_step] = ops::add_rms_norm(h.select(1, 123), r.select(1, 123), w, 1e-5, at::kFloat);
  EXPECT_TRUE(torch::equal(n_step, n_row.select(1, 123)));
  EXPECT_TRUE(torch::equal(r_step, r_row.select(1, 123)));
}

TEST(CudaAddRmsNorm, BackwardMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(6);
  const int64_t C = 96;
  const at::Tensor h = channel_major(torch::randn({2, 11, C})), r = torch::randn({2, 11, C});
  const at::Tensor w = torch::rand({C}).add(0.5), gn = torch::randn({2, 11, C}), gr = torch::randn({2, 11, C});
  auto grads = [&](at::Device dev) {
    at::Tensor hh = h.to(dev).detach().requires_grad_(), rr = r.to(dev).detach().requires_grad_();
    at::Tensor ww = w.to(dev).detach().requires_grad_();
    const auto [n, ro] = ops::add_rms_norm(hh, rr, ww, 1e-5, at::kFloat);
    ((n * gn.to(dev)).sum() + (ro * gr.to(dev)).sum()).backward();
    return std::vector<at::Tensor>{hh.grad().cpu(), rr.grad().cpu(), ww.grad().cpu()};
  };
  const auto cpu = grads(at::kCPU), gpu = grads(kCuda);
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(gpu[i], cpu[i]), 1e-5) << "gradient " << i;
}

// ---- add_rms_norm: channel-major tile kernels (begin) --------------------------------------------
// ops/cuda/add_rms_norm_kernel.cu picks, for channel-major memory, a compile-time-dtype tile kernel
// (16-byte accesses when every pointer is 16-byte aligned and L % 8 == 0, else element accesses), a
// run-time-dtype tile kernel for other dtype combinations, or the re-reading kernel when C is too
// large for a tile in shared memory. Each must give the row kernel's bits.

// A channel-major copy of t ([B, L, C]) placed `shift` elements into its buffer (1: misaligned).
at::Tensor channel_major_shifted(const at::Tensor& t, int64_t shift) {
  const int64_t B = t.size(0), L = t.size(1), C = t.size(2);
  const at::Tensor buffer = at::empty({B * C * L + shift}, t.options());
  at::Tensor cm = buffer.narrow(0, shift, B * C * L).view({B, C, L}).transpose(1, 2);
  cm.copy_(t);
  return cm;
}

TEST(CudaAddRmsNorm, ChannelMajorKernelsEqualRowKernelBitForBit) {
  SKIP_WITHOUT_CUDA();
  using OptType = std::optional<at::ScalarType>;
  struct Case {
    const char* what;
    at::ScalarType hidden, weight;
    OptType residual, residual_dtype;
    int64_t L, C, shift;
  };
  const auto bf16 = at::kBFloat16, f32 = at::kFloat;
  const Case cases[] = {
      {"bf16, fp32 residual: 16-byte accesses", bf16, bf16, f32, f32, 64, 768, 0},
      {"bf16, fp32 residual: L % 8 != 0", bf16, bf16, f32, f32, 61, 768, 0},
      {"bf16, fp32 residual: misaligned", bf16, bf16, f32, f32, 64, 768, 1},
      {"bf16, no residual, fp32 residual_out", bf16, bf16, std::nullopt, f32, 72, 768, 0},
      {"bf16, bf16 residual", bf16, bf16, bf16, std::nullopt, 40, 200, 0},
      {"fp32", f32, f32, f32, std::nullopt, 24, 96, 0},
      {"fp16 hidden, fp32 weight: run-time dtypes", at::kHalf, f32, f32, f32, 64, 768, 0},
      {"fp64: run-time dtypes", at::kDouble, at::kDouble, at::kDouble, std::nullopt, 40, 256, 0},
      {"C too large for a tile: re-reading kernel", bf16, bf16, f32, f32, 16, 8192, 0},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    torch::manual_seed(k.L + k.C);
    const int64_t B = 3;
    const auto on_gpu = torch::TensorOptions(kCuda);
    const at::Tensor h = torch::randn({B, k.L, k.C}, on_gpu).to(k.hidden);
    const at::Tensor r = k.residual ? torch::randn({B, k.L, k.C}, on_gpu).to(*k.residual) : at::Tensor();
    const at::Tensor w = torch::rand({k.C}, on_gpu).add(0.5).to(k.weight);
    const auto maybe = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const auto [n_row, r_row] = ops::add_rms_norm(h, maybe(r), w, 1e-5, k.residual_dtype);
    const at::Tensor h_cm = channel_major_shifted(h, k.shift);
    const at::Tensor r_cm = r.defined() ? channel_major_shifted(r, k.shift) : at::Tensor();
    const auto [n_cm, r_out_cm] = ops::add_rms_norm(h_cm, maybe(r_cm), w, 1e-5, k.residual_dtype);
    EXPECT_EQ(n_cm.strides(), h_cm.strides());
    expect_bit_equal(n_cm.contiguous(), n_row, "normed");
    expect_bit_equal(r_out_cm.contiguous(), r_row, "residual_out");
  }
}
// ---- add_rms_norm: channel-major tile kernels (end) ----------------------------------------------


// ---- selective scan: B and C read in place (begin) -----------------------------------------------
// Mamba's forward passes B and C as narrow()s of x_proj's [batch, dt_rank + 2N, L] output; the
// fast kernels read them with that batch stride instead of copying them. Same bits as contiguous
// copies, forward and backward (atomically reduced gradients: to rounding), on the 16-byte path (L a multiple of 8), the element path (L = 37)
// and a batch stride that is not a whole number of 16-byte vectors.

// The case with B and C moved into `B`/`C` views of other memory (values unchanged).
ScanCase with_bc_views(const ScanCase& c, const at::Tensor& B, const at::Tensor& C) {
  ScanCase o = c;
  o.B = B, o.C = C;
  o.B.copy_(c.B), o.C.copy_(c.C);
  return o;
}

void expect_scan_bit_equal(const ScanCase& strided, const ScanCase& contiguous, uint64_t seed) {
  const auto [y, final_state] = contiguous.run();
  const auto [y_s, final_state_s] = strided.run();
  expect_bit_equal(y_s, y, "y");
  expect_bit_equal(final_state_s, final_state, "final_state");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor gy = at::randn(y.sizes(), gen, at::kDouble).to(y.scalar_type()).to(kCuda);
  const OptTensor gfinal = at::randn(final_state.sizes(), gen, at::kDouble).to(at::kFloat).to(kCuda);
  auto backward = [&](const ScanCase& c) {
    return ops::selective_scan_backward(gy, gfinal, c.u, c.delta, c.A, c.B, c.C, c.D, c.z, c.delta_bias, c.softplus,
                                        c.initial_state, c.reset);
  };
  const auto g = backward(contiguous), g_s = backward(strided);
  expect_bit_equal(std::get<0>(g_s), std::get<0>(g), "du");
  expect_bit_equal(std::get<1>(g_s), std::get<1>(g), "ddelta");
  expect_bit_equal(std::get<6>(g_s), std::get<6>(g), "dz");
  expect_bit_equal(std::get<8>(g_s), std::get<8>(g), "dinitial_state");
  // dA, dB, dC, dD and ddelta_bias are sums over channels or positions that the kernels gather
  // with atomicAdd, in an order that differs from run to run even on identical inputs (the H100
  // showed differences of up to 2e-6 between two runs): equal to rounding.
  const bool half = std::get<3>(g).scalar_type() != at::kFloat;
  const Tolerance reduced = half ? Tolerance{1e-2, 1e-3} : Tolerance{1e-5, 1e-5};
  expect_close(std::get<2>(g_s), std::get<2>(g), {1e-5, 1e-5}, "dA");
  expect_close(std::get<3>(g_s), std::get<3>(g), reduced, "dB");
  expect_close(std::get<4>(g_s), std::get<4>(g), reduced, "dC");
  expect_close(std::get<5>(g_s), std::get<5>(g), {1e-5, 1e-5}, "dD");
  expect_close(std::get<7>(g_s), std::get<7>(g), {1e-5, 1e-5}, "ddelta_bias");
  EXPECT_TRUE(std::get<3>(g_s).is_contiguous() && std::get<4>(g_s).is_contiguous()) << "dB, dC come contiguous";
}

TEST(CudaScanStridedBC, NarrowedBAndCEqualContiguousCopies) {
  SKIP_WITHOUT_CUDA();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (int64_t N : {16, 32}) {
      for (int64_t L : {37, 64}) {
        ScanOptions o;  // with D, z, delta_bias, softplus, an initial state and resets
        o.batch = 3, o.dim = 40, o.dstate = N, o.seqlen = L, o.dtype = dtype, o.reset_probability = 0.05;
        o.seed = 300 + N + L;
        const ScanCase c = on(ScanCase::random(o), kCuda);
        const int64_t rank = 3;  // x_proj's rows: Δ's rank, then B, then C
        const auto x_dbl = at::zeros({o.batch, rank + 2 * N, L}, c.B.options());
        const ScanCase narrowed = with_bc_views(c, x_dbl.narrow(1, rank, N), x_dbl.narrow(1, rank + N, N));
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " N " + std::to_string(N) + " L " + std::to_string(L));
        ASSERT_FALSE(narrowed.B.is_contiguous());
        expect_scan_bit_equal(narrowed, c, o.seed);

        // A batch stride of an odd number of elements: rows stay contiguous, not 16-byte aligned.
        const int64_t stride = 2 * N * L + 3;
        const auto flat = at::zeros({o.batch * stride}, c.B.options());
        const ScanCase odd = with_bc_views(c, flat.as_strided({o.batch, N, L}, {stride, L, 1}, 0),
                                           flat.as_strided({o.batch, N, L}, {stride, L, 1}, N * L));
        SCOPED_TRACE("odd batch stride");
        expect_scan_bit_equal(odd, c, o.seed + 1);
      }
    }
  }
}
// ---- selective scan: B and C read in place (end) -------------------------------------------------

// ---- small_batch_linear ----------------------------------------------------------------------------

// The GEMV kernels (batch <= 2) against float64 on the rounded inputs: float32 accumulation over
// K terms in another order, then one rounding to the output dtype. Larger batches are at::linear
// itself (whose bfloat16 GEMMs may reduce in reduced precision, so they are compared with it).
TEST(CudaSmallBatchLinear, MatchesFloat64AtEveryBatchShapeAndLayout) {
  SKIP_WITHOUT_CUDA();
  struct Shape { int64_t out, in; };
  // mamba-130m's in_proj and out_proj; a K that is no whole number of 16-byte vectors; a long K
  // (several rounds of loads per lane); fewer features than a block's warps.
  const std::vector<Shape> shapes = {{3072, 768}, {768, 1536}, {37, 13}, {5, 4104}, {2, 64}};
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const Shape& sh : shapes) {
      for (int64_t batch : {1, 2, 3, 16}) {
        for (int layout = 0; layout < 3; ++layout) {  // contiguous; x a column slice; x misaligned by one element
          const std::string what = std::string(c10::toString(dtype)) + " [" + std::to_string(batch) + ", " +
                                   std::to_string(sh.in) + "] x [" + std::to_string(sh.out) + ", " +
                                   std::to_string(sh.in) + "]ᵀ layout " + std::to_string(layout);
          SCOPED_TRACE(what);
          at::manual_seed(batch * 7 + sh.out + layout);
          const auto opt = at::TensorOptions(kCuda).dtype(dtype);
          at::Tensor x;
          if (layout == 0) x = at::randn({batch, sh.in}, opt);
          if (layout == 1) x = at::randn({batch, sh.in + 5}, opt).narrow(1, 2, sh.in);
          if (layout == 2) x = at::randn({batch * sh.in + 1}, opt).narrow(0, 1, batch * sh.in).view({batch, sh.in});
          const at::Tensor w = at::randn({sh.out, sh.in}, opt).div(std::sqrt(double(sh.in)));
          const at::Tensor b = at::randn({sh.out}, opt);
          for (bool with_bias : {false, true}) {
            const at::Tensor y = with_bias ? ops::small_batch_linear(x, w, b) : ops::small_batch_linear(x, w);
            ASSERT_EQ(y.sizes(), (at::IntArrayRef{batch, sh.out}));
            ASSERT_EQ(y.scalar_type(), dtype);
            if (batch > 2) {
              EXPECT_TRUE(at::equal(y, with_bias ? at::linear(x, w, b) : at::linear(x, w)));
              continue;
            }
            const at::Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble);
            at::Tensor ref = at::matmul(xd, wd.t());
            at::Tensor magnitude = at::matmul(xd.abs(), wd.abs().t());
            if (with_bias) ref = ref + b.to(at::kDouble), magnitude = magnitude + b.to(at::kDouble).abs();
            const double ulp = dtype == at::kBFloat16 ? std::ldexp(1.0, -8) : dtype == at::kHalf ? std::ldexp(1.0, -11) : 0.0;
            const at::Tensor err = (y.to(at::kDouble) - ref).abs();
            const at::Tensor bound = ref.abs() * (ulp + 1e-6) + magnitude * 2e-6 + 1e-30;
            EXPECT_TRUE((err <= bound).all().item<bool>())
                << "max error " << err.max().item<double>() << ", worst ratio to the bound "
                << (err / bound).max().item<double>();
            // Deterministic: the same call gives the same bits.
            const at::Tensor again = with_bias ? ops::small_batch_linear(x, w, b) : ops::small_batch_linear(x, w);
            EXPECT_TRUE(at::equal(y, again));
          }
        }
      }
    }
  }
}

TEST(CudaSmallBatchLinear, LargeBatchesAreAtLinearAndBadArgumentsAreNamed) {
  SKIP_WITHOUT_CUDA();
  const auto opt = at::TensorOptions(kCuda).dtype(at::kBFloat16);
  const at::Tensor x = at::randn({33, 64}, opt), w = at::randn({48, 64}, opt), b = at::randn({48}, opt);
  EXPECT_TRUE(at::equal(ops::small_batch_linear(x, w, b), at::linear(x, w, b)));
  expect_error([&] { ops::small_batch_linear(x.narrow(0, 0, 2), w.to(at::kFloat)); },
               {"small_batch_linear", "'weight'", "dtype"});
  expect_error([&] { ops::small_batch_linear(x.narrow(0, 0, 2), w.cpu()); }, {"small_batch_linear", "'weight'", "cpu"});
  expect_error([&] { ops::small_batch_linear(x.narrow(0, 0, 2), w, b.narrow(0, 0, 40)); },
               {"small_batch_linear", "'bias'", "[out_features] = [48]", "[40]"});
}
// ---- small_batch_linear (end) ----------------------------------------------------------------------

// ---- add_rms_norm_linear ---------------------------------------------------------------------------

// The fused kernel (batch <= 2) against the two ops it replaces, add_rms_norm then
// small_batch_linear, on the same device: the same bits, y and the residual stream, across dtypes,
// residual dtypes, the first layer's call without a residual, shapes whose C is no whole number of
// 16-byte vectors, and biases. Larger batches take the two ops themselves.
TEST(CudaAddRmsNormLinear, EqualsAddRmsNormThenSmallBatchLinearBitForBit) {
  SKIP_WITHOUT_CUDA();
  struct Shape { int64_t out, in; };
  const std::vector<Shape> shapes = {{3072, 768}, {768, 1536}, {37, 13}, {9, 1000}, {2, 64}};
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const Shape& sh : shapes) {
      for (int64_t batch : {1, 2, 3}) {
        for (int residual_kind = 0; residual_kind < 3; ++residual_kind) {  // none; float32; the model dtype
          for (bool with_bias : {false, true}) {
            SCOPED_TRACE(std::string(c10::toString(dtype)) + " batch " + std::to_string(batch) + " C " +
                         std::to_string(sh.in) + " N " + std::to_string(sh.out) + " residual " +
                         std::to_string(residual_kind) + " bias " + std::to_string(with_bias));
            at::manual_seed(batch * 13 + sh.out + residual_kind);
            const auto opt = at::TensorOptions(kCuda).dtype(dtype);
            const at::Tensor hidden = at::randn({batch, sh.in}, opt);
            std::optional<at::Tensor> residual;
            if (residual_kind == 1) residual = at::randn({batch, sh.in}, opt.dtype(at::kFloat)) * 3;
            if (residual_kind == 2) residual = at::randn({batch, sh.in}, opt) * 3;
            const at::Tensor g = at::rand({sh.in}, opt) + 0.5;
            const at::Tensor w = at::randn({sh.out, sh.in}, opt).div(std::sqrt(double(sh.in)));
            const std::optional<at::Tensor> b = with_bias ? std::optional<at::Tensor>(at::randn({sh.out}, opt)) : std::nullopt;
            const auto res_dtype = residual_kind == 1 ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt;
            const auto [y, r] = ops::add_rms_norm_linear(hidden, residual, g, 1e-5, res_dtype, w, b);
            const auto [normed, r2] = ops::add_rms_norm(hidden, residual, g, 1e-5, res_dtype);
            const at::Tensor y2 = ops::small_batch_linear(normed, w, b);
            ASSERT_EQ(y.sizes(), y2.sizes());
            ASSERT_EQ(y.scalar_type(), dtype);
            ASSERT_EQ(r.scalar_type(), r2.scalar_type());
            EXPECT_TRUE(at::equal(r, r2));
            EXPECT_TRUE(at::equal(y, y2)) << "max difference "
                                          << (y.to(at::kDouble) - y2.to(at::kDouble)).abs().max().item<double>();
          }
        }
      }
    }
  }
  const auto opt = at::TensorOptions(kCuda).dtype(at::kBFloat16);
  expect_error([&] { ops::add_rms_norm_linear(at::randn({1, 8}, opt), std::nullopt, at::ones({8}, opt), 1e-5,
                                              std::nullopt, at::randn({4, 8}, opt).cpu()); },
               {"add_rms_norm_linear", "'weight'", "cpu"});
}
// ---- add_rms_norm_linear (end) ---------------------------------------------------------------------

}  // namespace
