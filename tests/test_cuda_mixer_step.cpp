// mamba_mixer_step, a Mamba mixer's whole decode step in one op: the CPU kernel against a float64
// reference built from the naive references, the argument errors, the Meta kernel; then (on a GPU)
// the fused CUDA kernels against the separate ops on the same device and against the CPU, over
// several steps, shapes, dtypes, resets and strided states, and Mamba::step on CUDA against the CPU.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "mamba/modules.h"
#include "ops/mamba_mixer_step.h"
#include "support/expect_error.h"
#include "support/op_cases.h"
#include "support/reference.h"

namespace statemamba {
namespace {

namespace ops = statemamba::ops;
using test::expect_error;
using test::OptTensor;

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU: the fused CUDA kernels are tested on a GPU machine"

struct Shape {
  int64_t batch, dim, width, dstate, rank;
};

// One step's inputs with the mixer's parameters, as Mamba::step passes them.
struct MixerCase {
  at::Tensor xz, conv_state, ssm_state, conv_weight, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D;
  OptTensor conv_bias, reset;

  at::Tensor run() const {  // the op (advances this case's states)
    return ops::mamba_mixer_step(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                 dt_proj_bias, A, D, reset);
  }
  at::Tensor run_unfused() const {
    return ops::mamba_mixer_step_unfused(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight,
                                         dt_proj_weight, dt_proj_bias, A, D, reset);
  }
  // A copy on `device` with its own states.
  MixerCase to(at::Device device) const {
    MixerCase c = *this;
    for (at::Tensor* t : {&c.xz, &c.conv_state, &c.ssm_state, &c.conv_weight, &c.x_proj_weight, &c.dt_proj_weight,
                          &c.dt_proj_bias, &c.A, &c.D})
      *t = t->to(device).clone();
    if (c.conv_bias) c.conv_bias = c.conv_bias->to(device);
    if (c.reset) c.reset = c.reset->to(device);
    return c;
  }
};

// Values of a trained mixer's scale: Δ lands around softplus(-2..1), A = -(1..N), states nonzero.
MixerCase make_case(Shape s, at::ScalarType dtype, at::ScalarType param_dtype, bool conv_bias, bool reset,
                    uint64_t seed) {
  torch::manual_seed(seed);
  const auto opt = at::TensorOptions().dtype(dtype), popt = at::TensorOptions().dtype(param_dtype);
  const auto sopt = at::TensorOptions().dtype(test::state_dtype_for(dtype));
  MixerCase c;
  c.xz = at::randn({s.batch, 2 * s.dim}, opt);
  c.conv_state = at::randn({s.batch, s.dim, s.width - 1}, sopt);
  c.ssm_state = at::randn({s.batch, s.dim, s.dstate}, sopt);
  c.conv_weight = (at::randn({s.dim, s.width}) * 0.5).to(popt);
  c.x_proj_weight = (at::randn({s.rank + 2 * s.dstate, s.dim}) / std::sqrt(double(s.dim))).to(opt);
  c.dt_proj_weight = (at::randn({s.dim, s.rank}) / std::sqrt(double(s.rank))).to(opt);
  c.dt_proj_bias = (at::rand({s.dim}) * 3 - 2).to(popt);
  // A = -exp(A_log) of mamba's initialisation, log(1..N), jittered.
  c.A = -at::exp(at::log(at::arange(1, s.dstate + 1, at::kDouble)).repeat({s.dim, 1}).add(at::rand({s.dim, s.dstate}) * 0.1))
             .to(popt);
  c.D = at::randn({s.dim}).to(popt);
  if (conv_bias) c.conv_bias = (at::randn({s.dim}) * 0.1).to(popt);
  if (reset) c.reset = at::rand({s.batch}) < 0.5;
  return c;
}

// The step in float64 from the naive references, on the values the case holds; returns y and the
// states after it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> reference_step(const MixerCase& c) {
  const auto f64 = [](const at::Tensor& t) { return t.to(at::kDouble); };
  const int64_t dim = c.xz.size(1) / 2, rank = c.dt_proj_weight.size(1), dstate = c.ssm_state.size(2);
  OptTensor bias = c.conv_bias ? OptTensor(f64(*c.conv_bias)) : std::nullopt;
  const auto [xc, conv_state] = test::reference_causal_conv1d_update(
      f64(c.xz.narrow(1, 0, dim)), f64(c.conv_state), f64(c.conv_weight), bias, /*silu=*/true, c.reset);
  const auto x_dbl = at::matmul(xc, f64(c.x_proj_weight).t());
  const auto dt = at::matmul(x_dbl.narrow(1, 0, rank), f64(c.dt_proj_weight).t());
  const auto [y, ssm_state] = test::reference_selective_state_update(
      f64(c.ssm_state), xc, dt, f64(c.A), x_dbl.narrow(1, rank, dstate),
      x_dbl.narrow(1, rank + dstate, dstate), f64(c.D), f64(c.xz.narrow(1, dim, dim)), f64(c.dt_proj_bias),
      /*dt_softplus=*/true, c.reset);
  return {y, conv_state, ssm_state};
}

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.to(at::kDouble).cpu(), e = expected.to(at::kDouble).cpu();
  return ((a - e).norm() / e.norm().clamp_min(1e-300)).item<double>();
}

// ‖·‖-relative error allowed between two computations of the step that round differently: float32
// and float64 only by accumulation order; a 16-bit model rounds xc, (δ, B, C) and Δ to its dtype, and
// one rounding may land on the neighbouring value (2^-8 for bfloat16, 2^-11 for float16).
double tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-11;
    case at::kFloat: return 2e-5;
    case at::kHalf: return 5e-3;
    default: return 2e-2;
  }
}

std::string dtype_name(at::ScalarType t) { return test::dtype_name(t); }

// ---- CPU -------------------------------------------------------------------------------------------

class MixerStepCpu : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(MixerStepCpu, EqualsFloat64ReferenceWithEveryOption) {
  const auto dtype = GetParam();
  for (bool conv_bias : {false, true})
    for (bool reset : {false, true})
      for (Shape s : {Shape{3, 24, 4, 5, 3}, Shape{2, 10, 2, 16, 1}}) {
        SCOPED_TRACE("conv_bias " + std::to_string(conv_bias) + ", reset " + std::to_string(reset) + ", dim " +
                     std::to_string(s.dim));
        const MixerCase c = make_case(s, dtype, test::state_dtype_for(dtype), conv_bias, reset, 11);
        const auto [y_ref, conv_ref, ssm_ref] = reference_step(c);
        const MixerCase run = c.to(at::kCPU);
        const auto y = run.run();
        ASSERT_EQ(y.scalar_type(), dtype);
        ASSERT_EQ(y.sizes(), (std::vector<int64_t>{s.batch, s.dim}));
        EXPECT_LE(relative_error(y, y_ref), tolerance(dtype)) << "y";
        EXPECT_LE(relative_error(run.conv_state, conv_ref), tolerance(dtype)) << "conv_state";
        EXPECT_LE(relative_error(run.ssm_state, ssm_ref), tolerance(dtype)) << "ssm_state";
      }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MixerStepCpu, ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16),
                         test::DtypeTestName());

TEST(MixerStepCpu, ParametersInTheModelDtypeGiveTheSameStep) {
  // A bfloat16 model holds A, D and the biases in bfloat16; the op reads them as they are.
  const MixerCase mixed = make_case({2, 16, 4, 8, 2}, at::kBFloat16, at::kBFloat16, true, true, 3);
  MixerCase as_float = mixed.to(at::kCPU);
  for (at::Tensor* t : {&as_float.conv_weight, &as_float.dt_proj_bias, &as_float.A, &as_float.D})
    *t = t->to(at::kFloat);
  as_float.conv_bias = as_float.conv_bias->to(at::kFloat);
  const MixerCase run = mixed.to(at::kCPU);
  test::expect_bit_equal(run.run(), as_float.run(), "y");
  test::expect_bit_equal(run.ssm_state, as_float.ssm_state, "ssm_state");
}

TEST(MixerStepCpu, NamesTheBadArgument) {
  const MixerCase c = make_case({2, 8, 4, 4, 2}, at::kFloat, at::kFloat, true, false, 0);
  auto with = [&](auto edit) {
    MixerCase bad = c.to(at::kCPU);
    edit(bad);
    return [bad] { bad.run(); };
  };
  expect_error(with([](MixerCase& b) { b.xz = b.xz.narrow(1, 0, 15); }), {"mamba_mixer_step", "'xz'", "[2, 15]"});
  expect_error(with([](MixerCase& b) { b.x_proj_weight = b.x_proj_weight.narrow(0, 0, 9); }),
               {"'x_proj_weight'", "[dt_rank + 2·d_state, d_inner] = [10, 8]", "[9, 8]"});
  expect_error(with([](MixerCase& b) { b.dt_proj_weight = b.dt_proj_weight.to(at::kDouble); }),
               {"'dt_proj_weight'", "Float", "Double"});
  expect_error(with([](MixerCase& b) { b.conv_state = b.conv_state.narrow(2, 0, 2); }),
               {"'conv_state'", "[batch, d_inner, width-1] = [2, 8, 3]", "[2, 8, 2]"});
  expect_error(with([](MixerCase& b) { b.ssm_state = b.ssm_state.to(at::kDouble); }), {"'ssm_state'", "Double"});
  expect_error(with([](MixerCase& b) { b.A = b.A.t(); }), {"'A'", "[d_inner, d_state] = [8, 4]"});
  expect_error(with([](MixerCase& b) { b.D = b.D.to(at::kHalf); }), {"'D'", "float32 or Float", "Half"});
  expect_error(with([](MixerCase& b) { b.reset = at::zeros({2}, at::kInt); }), {"'reset'", "Bool", "Int"});
  expect_error(with([](MixerCase& b) { b.reset = at::zeros({3}, at::kBool); }), {"'reset'", "[batch] = [2]"});
}

TEST(MixerStepMeta, GivesTheOutputShapeOnly) {
  const MixerCase c = make_case({3, 8, 4, 4, 2}, at::kBFloat16, at::kFloat, true, true, 0).to(at::Device("meta"));
  const auto y = c.run();
  EXPECT_TRUE(y.is_meta());
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{3, 8}));
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
}

// ---- CUDA ------------------------------------------------------------------------------------------

const at::Device kCuda("cuda");

struct CudaCase {
  Shape shape;
  at::ScalarType dtype, param_dtype;
};

class MixerStepCuda : public ::testing::TestWithParam<at::ScalarType> {};

// Several steps in a row (states carried), fused kernels vs the separate ops on the GPU and vs the
// CPU kernel; every combination of conv bias and resets; shapes that fill whole and partial tiles.
TEST_P(MixerStepCuda, FusedEqualsSeparateOpsAndCpuOverSteps) {
  SKIP_WITHOUT_CUDA();
  const auto dtype = GetParam();
  const std::vector<Shape> shapes{
      {1, 1536, 4, 16, 48},  // mamba-130m, batch 1
      {64, 1536, 4, 16, 48},  // mamba-130m, batch 64
      {5, 200, 3, 5, 3},      // partial tiles, d_state not a multiple of 4, width 3
      {3, 130, 8, 128, 9},    // widest conv, largest fast d_state
      {4096, 64, 4, 16, 4},   // many rows
      {2, 96, 2, 1, 1},       // one tap of history, one state
      {2, 100, 4, 16, 7},     // a partial 8-channel chunk of x_proj's weights (16-byte rows in float32)
      {37, 300, 4, 16, 5},    // blocks of 4 rows, the last one partial; 1 row per block below batch 32
      {9, 300, 4, 16, 5},
  };
  for (const Shape& s : shapes)
    for (auto param_dtype : {at::kFloat, dtype})
      for (bool conv_bias : {false, true})
        for (bool reset : {false, true}) {
          SCOPED_TRACE("batch " + std::to_string(s.batch) + ", dim " + std::to_string(s.dim) + ", width " +
                       std::to_string(s.width) + ", dstate " + std::to_string(s.dstate) + ", rank " +
                       std::to_string(s.rank) + ", params " + dtype_name(param_dtype) + ", conv_bias " +
                       std::to_string(conv_bias) + ", reset " + std::to_string(reset));
          const MixerCase start = make_case(s, dtype, param_dtype, conv_bias, reset, 5 + s.dim);
          MixerCase fused = start.to(kCuda), separate = start.to(kCuda), cpu = start.to(at::kCPU);
          for (int step = 0; step < 3; ++step) {
            SCOPED_TRACE("step " + std::to_string(step));
            const auto xz = at::randn_like(start.xz);
            fused.xz = xz.to(kCuda), separate.xz = xz.to(kCuda), cpu.xz = xz;
            const auto y = fused.run(), y_separate = separate.run_unfused(), y_cpu = cpu.run();
            ASSERT_TRUE(y.is_cuda());
            ASSERT_EQ(y.scalar_type(), dtype);
            ASSERT_FALSE(y.isnan().any().item<bool>());
            EXPECT_LE(relative_error(y, y_separate), tolerance(dtype)) << "y vs the separate CUDA ops";
            EXPECT_LE(relative_error(y, y_cpu), tolerance(dtype)) << "y vs the CPU";
            // The conv update's arithmetic is the separate op's: its state matches bit for bit.
            test::expect_bit_equal(fused.conv_state.cpu(), separate.conv_state.cpu(), "conv_state");
            EXPECT_LE(relative_error(fused.ssm_state, separate.ssm_state), tolerance(dtype)) << "ssm_state";
            EXPECT_LE(relative_error(fused.ssm_state, cpu.ssm_state), tolerance(dtype)) << "ssm_state vs CPU";
          }
        }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MixerStepCuda, ::testing::Values(at::kFloat, at::kBFloat16, at::kHalf),
                         test::DtypeTestName());

TEST(MixerStepCudaOnly, StridedStatesAreWrittenBack) {
  SKIP_WITHOUT_CUDA();
  const Shape s{4, 160, 4, 16, 8};
  const MixerCase start = make_case(s, at::kFloat, at::kFloat, true, true, 9);
  MixerCase strided = start.to(kCuda), contiguous = start.to(kCuda);
  // States as views into larger buffers (every other row), as a caller's slices may be.
  auto conv_big = at::zeros({2 * s.batch, s.dim, s.width - 1}, strided.conv_state.options());
  auto ssm_big = at::zeros({2 * s.batch, s.dim, s.dstate}, strided.ssm_state.options());
  strided.conv_state = conv_big.slice(0, 0, 2 * s.batch, 2).copy_(start.conv_state);
  strided.ssm_state = ssm_big.slice(0, 0, 2 * s.batch, 2).copy_(start.ssm_state);
  ASSERT_FALSE(strided.ssm_state.is_contiguous());
  const auto y = strided.run(), y_contiguous = contiguous.run();
  test::expect_bit_equal(y.cpu(), y_contiguous.cpu(), "y");
  test::expect_bit_equal(strided.ssm_state.cpu(), contiguous.ssm_state.cpu(), "ssm_state");
  test::expect_bit_equal(strided.conv_state.cpu(), contiguous.conv_state.cpu(), "conv_state");
  EXPECT_EQ(ssm_big.slice(0, 1, 2 * s.batch, 2).abs().max().item<double>(), 0.0) << "rows between the views";
}

TEST(MixerStepCudaOnly, ShapesOutsideTheFastKernelsTakeTheSeparateOps) {
  SKIP_WITHOUT_CUDA();
  // (Conv widths above 8 are refused by every backend's conv ops, so only float64 and a large
  // d_state reach the fallback.)
  for (auto [s, dtype] : {std::pair{Shape{2, 40, 4, 16, 4}, at::kDouble}, std::pair{Shape{2, 40, 4, 130, 4}, at::kFloat}}) {
    SCOPED_TRACE("width " + std::to_string(s.width) + ", dstate " + std::to_string(s.dstate));
    const MixerCase start = make_case(s, dtype, test::state_dtype_for(dtype), true, true, 1);
    MixerCase gpu = start.to(kCuda), cpu = start.to(at::kCPU);
    EXPECT_LE(relative_error(gpu.run(), cpu.run()), dtype == at::kDouble ? 1e-10 : 2e-5);
    EXPECT_LE(relative_error(gpu.ssm_state, cpu.ssm_state), dtype == at::kDouble ? 1e-10 : 2e-5);
  }
}

// The module: Mamba::step on CUDA (fused) against the same model on the CPU (the separate ops),
// and against forward() over the same tokens on CUDA (step == scan).
TEST(MixerStepCudaOnly, ModelStepsOnCudaMatchTheCpuAndForward) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(0);
  MambaLMHeadModel cpu_model(MambaConfig(64, 2, 50).d_state(16));
  MambaLMHeadModel gpu_model(MambaConfig(64, 2, 50).d_state(16));
  {
    torch::NoGradGuard no_grad;
    auto src = cpu_model->named_parameters();
    for (auto& p : gpu_model->named_parameters()) p.value().copy_(src[p.key()]);
  }
  gpu_model->to(kCuda);
  // Batches 1 and 2 take the fused norm + in_proj and GEMV kernels; 3 the norm op and cuBLAS.
  for (int64_t batch : {1, 2, 3}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    const int64_t steps = 12;
    const auto tokens = torch::randint(0, 50, {batch, steps});
    auto cpu_state = MambaStackState::zeros(cpu_model->options, batch);
    auto gpu_state = MambaStackState::zeros(gpu_model->options, batch, kCuda);
    std::vector<at::Tensor> gpu_logits;
    for (int64_t t = 0; t < steps; ++t) {
      const auto ids = tokens.select(1, t);
      const auto expected = cpu_model->step(ids, cpu_state);
      gpu_logits.push_back(gpu_model->step(ids.to(kCuda), gpu_state));
      EXPECT_LE(relative_error(gpu_logits.back(), expected), 1e-4) << "token " << t;
    }
    torch::NoGradGuard no_grad;
    const auto forward = gpu_model->forward(tokens.to(kCuda));
    EXPECT_LE(relative_error(at::stack(gpu_logits, 1), forward), 1e-4) << "steps vs forward";
  }
}

}  // namespace
}  // namespace statemamba
