#include "ops/args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <vector>

namespace statemamba::ops {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  return o.str() + ']';
}

// One op's checks: remembers the op name and the reference tensor for device checks.
struct Checker {
  const char* op;
  const at::Tensor& ref;  // the first input; every other tensor must share its device

  void defined(const char* arg, const at::Tensor& t) const {
    TORCH_CHECK(t.defined(), op, ": argument '", arg, "' is an undefined tensor");
  }
  void shape(const char* arg, const at::Tensor& t, std::vector<int64_t> want, const char* layout) const {
    defined(arg, t);
    TORCH_CHECK(t.sizes().vec() == want, op, ": argument '", arg, "' must have shape ", layout, " = ",
                shape_str(want), ", got ", shape_str(t.sizes()));
  }
  void device(const char* arg, const at::Tensor& t) const {
    TORCH_CHECK(t.device() == ref.device(), op, ": argument '", arg, "' is on ", t.device(),
                " but the inputs are on ", ref.device());
  }
  void floating(const char* arg, const at::Tensor& t) const {
    auto d = t.scalar_type();
    TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op,
                ": argument '", arg, "' must be float32, float64, float16 or bfloat16, got ", d);
  }
  void same_dtype(const char* arg, const at::Tensor& t, const char* ref_arg, const at::Tensor& r) const {
    TORCH_CHECK(t.scalar_type() == r.scalar_type(), op, ": argument '", arg, "' must have the dtype of '",
                ref_arg, "' (", r.scalar_type(), "), got ", t.scalar_type());
  }
  // Parameters (A, D, biases, weights) may be float32 or the inputs' own dtype.
  void param_dtype(const char* arg, const at::Tensor& t, at::ScalarType input) const {
    auto d = t.scalar_type();
    TORCH_CHECK(d == at::kFloat || d == input, op, ": argument '", arg, "' must be float32 or ", input,
                " (the inputs' dtype), got ", d);
  }
  void state(const char* arg, const at::Tensor& t, std::vector<int64_t> want, const char* layout,
             at::ScalarType dtype) const {
    shape(arg, t, std::move(want), layout);
    device(arg, t);
    TORCH_CHECK(t.scalar_type() == dtype, op, ": argument '", arg, "' must be ", dtype,
                " (state is kept in float32, float64 for float64 inputs), got ", t.scalar_type());
  }
  void mask(const char* arg, const at::Tensor& t, std::vector<int64_t> want, const char* layout) const {
    shape(arg, t, std::move(want), layout);
    device(arg, t);
    TORCH_CHECK(t.scalar_type() == at::kBool, op, ": argument '", arg, "' must be bool, got ", t.scalar_type());
  }
  void input(const char* arg, const at::Tensor& t, std::vector<int64_t> want, const char* layout,
             const char* ref_arg) const {
    shape(arg, t, std::move(want), layout);
    device(arg, t);
    same_dtype(arg, t, ref_arg, ref);
  }
  void param(const char* arg, const at::Tensor& t, std::vector<int64_t> want, const char* layout) const {
    shape(arg, t, std::move(want), layout);
    device(arg, t);
    param_dtype(arg, t, ref.scalar_type());
  }
};

}  // namespace

ScanDims check_selective_scan_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& C,
                                   const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                   const std::optional<at::Tensor>& delta_bias,
                                   const std::optional<at::Tensor>& initial_state,
                                   const std::optional<at::Tensor>& reset) {
  Checker c{"selective_scan", u};
  c.defined("u", u);
  TORCH_CHECK(u.dim() == 3, "selective_scan: argument 'u' must have shape [batch, d_inner, L], got ",
              shape_str(u.sizes()));
  c.floating("u", u);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(L >= 1, "selective_scan: sequence length L (u.size(2)) must be at least 1, got ", L);
  c.defined("A", A);
  TORCH_CHECK(A.dim() == 2, "selective_scan: argument 'A' must have shape [d_inner, d_state], got ",
              shape_str(A.sizes()));
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1, "selective_scan: d_state (A.size(1)) must be at least 1, got ", N);
  c.param("A", A, {dim, N}, "[d_inner, d_state]");
  c.input("delta", delta, {batch, dim, L}, "[batch, d_inner, L]", "u");
  c.input("B", B, {batch, N, L}, "[batch, d_state, L]", "u");
  c.input("C", C, {batch, N, L}, "[batch, d_state, L]", "u");
  if (D) c.param("D", *D, {dim}, "[d_inner]");
  if (z) c.input("z", *z, {batch, dim, L}, "[batch, d_inner, L]", "u");
  if (delta_bias) c.param("delta_bias", *delta_bias, {dim}, "[d_inner]");
  const auto sd = state_dtype_for(u.scalar_type());
  if (initial_state) c.state("initial_state", *initial_state, {batch, dim, N}, "[batch, d_inner, d_state]", sd);
  if (reset) c.mask("reset", *reset, {batch, L}, "[batch, L]");
  return {batch, dim, N, L, sd};
}

ConvDims check_causal_conv1d_args(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& initial_state,
                                  const std::optional<at::Tensor>& reset) {
  Checker c{"causal_conv1d", x};
  c.defined("x", x);
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: argument 'x' must have shape [batch, d_inner, L], got ",
              shape_str(x.sizes()));
  c.floating("x", x);
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2);
  TORCH_CHECK(L >= 1, "causal_conv1d: sequence length L (x.size(2)) must be at least 1, got ", L);
  c.defined("weight", weight);
  TORCH_CHECK(weight.dim() == 2, "causal_conv1d: argument 'weight' must have shape [d_inner, width], got ",
              shape_str(weight.sizes()));
  const int64_t W = weight.size(1);
  TORCH_CHECK(W >= 2 && W <= 8, "causal_conv1d: width (weight.size(1)) must be between 2 and 8, got ", W);
  c.param("weight", weight, {dim, W}, "[d_inner, width]");
  if (bias) c.param("bias", *bias, {dim}, "[d_inner]");
  const auto sd = state_dtype_for(x.scalar_type());
  if (initial_state) c.state("initial_state", *initial_state, {batch, dim, W - 1}, "[batch, d_inner, width-1]", sd);
  if (reset) c.mask("reset", *reset, {batch, L}, "[batch, L]");
  return {batch, dim, W, L, sd};
}

ScanDims check_selective_state_update_args(const at::Tensor& state, const at::Tensor& x,
                                           const at::Tensor& dt, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const std::optional<at::Tensor>& D,
                                           const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& dt_bias,
                                           const std::optional<at::Tensor>& reset) {
  Checker c{"selective_state_update", x};
  c.defined("x", x);
  TORCH_CHECK(x.dim() == 2, "selective_state_update: argument 'x' must have shape [batch, d_inner], got ",
              shape_str(x.sizes()));
  c.floating("x", x);
  const int64_t batch = x.size(0), dim = x.size(1);
  c.defined("A", A);
  TORCH_CHECK(A.dim() == 2, "selective_state_update: argument 'A' must have shape [d_inner, d_state], got ",
              shape_str(A.sizes()));
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1, "selective_state_update: d_state (A.size(1)) must be at least 1, got ", N);
  c.param("A", A, {dim, N}, "[d_inner, d_state]");
  const auto sd = state_dtype_for(x.scalar_type());
  c.state("state", state, {batch, dim, N}, "[batch, d_inner, d_state]", sd);
  c.input("dt", dt, {batch, dim}, "[batch, d_inner]", "x");
  c.input("B", B, {batch, N}, "[batch, d_state]", "x");
  c.input("C", C, {batch, N}, "[batch, d_state]", "x");
  if (D) c.param("D", *D, {dim}, "[d_inner]");
  if (z) c.input("z", *z, {batch, dim}, "[batch, d_inner]", "x");
  if (dt_bias) c.param("dt_bias", *dt_bias, {dim}, "[d_inner]");
  if (reset) c.mask("reset", *reset, {batch}, "[batch]");
  return {batch, dim, N, 1, sd};
}

ConvDims check_causal_conv1d_update_args(const at::Tensor& x, const at::Tensor& conv_state,
                                         const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& reset) {
  Checker c{"causal_conv1d_update", x};
  c.defined("x", x);
  TORCH_CHECK(x.dim() == 2, "causal_conv1d_update: argument 'x' must have shape [batch, d_inner], got ",
              shape_str(x.sizes()));
  c.floating("x", x);
  const int64_t batch = x.size(0), dim = x.size(1);
  c.defined("weight", weight);
  TORCH_CHECK(weight.dim() == 2, "causal_conv1d_update: argument 'weight' must have shape [d_inner, width], got ",
              shape_str(weight.sizes()));
  const int64_t W = weight.size(1);
  TORCH_CHECK(W >= 2 && W <= 8, "causal_conv1d_update: width (weight.size(1)) must be between 2 and 8, got ", W);
  c.param("weight", weight, {dim, W}, "[d_inner, width]");
  if (bias) c.param("bias", *bias, {dim}, "[d_inner]");
  const auto sd = state_dtype_for(x.scalar_type());
  c.state("conv_state", conv_state, {batch, dim, W - 1}, "[batch, d_inner, width-1]", sd);
  if (reset) c.mask("reset", *reset, {batch}, "[batch]");
  return {batch, dim, W, 1, sd};
}

LinearDims check_small_batch_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias) {
  Checker c{"small_batch_linear", x};
  c.defined("x", x);
  TORCH_CHECK(x.dim() == 2, "small_batch_linear: argument 'x' must have shape [batch, in_features], got ",
              shape_str(x.sizes()));
  c.floating("x", x);
  c.defined("weight", weight);
  TORCH_CHECK(weight.dim() == 2, "small_batch_linear: argument 'weight' must have shape [out_features, ",
              "in_features], got ", shape_str(weight.sizes()));
  const int64_t N = weight.size(0), K = x.size(1);
  c.input("weight", weight, {N, K}, "[out_features, in_features]", "x");
  if (bias) c.input("bias", *bias, {N}, "[out_features]", "x");
  return {x.size(0), N, K};
}

namespace {
bool channel_major_3d(const at::Tensor& t) {
  return t.dim() == 3 && t.size(1) > 1 && t.stride(1) == 1 && t.stride(2) == t.size(1) &&
         t.stride(0) == t.size(1) * t.size(2);
}
bool rows_contiguous(const at::Tensor& t) { return t.is_contiguous(); }
}  // namespace

NormIO prepare_add_rms_norm(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                            const at::Tensor& weight, double eps, std::optional<at::ScalarType> residual_dtype,
                            bool allocate, const char* op, const char* weight_arg) {
  Checker c{op, hidden};
  c.defined("hidden", hidden);
  TORCH_CHECK(hidden.dim() >= 1 && hidden.numel() > 0, op, ": argument 'hidden' must be a non-empty [..., C] tensor, got ",
              shape_str(hidden.sizes()));
  c.floating("hidden", hidden);
  const int64_t C = hidden.size(-1);
  c.defined(weight_arg, weight);
  c.shape(weight_arg, weight, {C}, "[C] (C = hidden.size(-1))");
  c.device(weight_arg, weight);
  c.floating(weight_arg, weight);
  const bool has_res = residual && residual->defined();
  if (has_res) {
    c.shape("residual", *residual, hidden.sizes().vec(), "hidden's shape");
    c.device("residual", *residual);
    c.floating("residual", *residual);
  }
  TORCH_CHECK(eps >= 0 && eps < 1, op, ": argument 'eps' must be in [0, 1), got ", eps);
  NormIO io;
  io.promoted = has_res ? at::promote_types(hidden.scalar_type(), residual->scalar_type()) : hidden.scalar_type();
  const at::ScalarType out_res = residual_dtype.value_or(io.promoted);
  TORCH_CHECK(out_res == at::kFloat || out_res == at::kDouble || out_res == at::kHalf || out_res == at::kBFloat16, op,
              ": argument 'residual_dtype' must be float32, float64, float16 or bfloat16, got ", out_res);
  io.use_double = hidden.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble ||
                  (has_res && residual->scalar_type() == at::kDouble);
  io.channels = C;
  io.rows = hidden.numel() / C;
  io.channel_major = channel_major_3d(hidden);
  io.length = io.channel_major ? hidden.size(1) : 1;
  io.hidden = io.channel_major || rows_contiguous(hidden) ? hidden : hidden.contiguous();
  if (has_res) {
    const at::Tensor& r = *residual;
    io.residual = io.channel_major ? (r.strides() == hidden.strides() ? r : r.transpose(1, 2).contiguous().transpose(1, 2))
                                   : r.contiguous();
  }
  io.weight = weight.contiguous();
  if (allocate) {
    auto make = [&](at::ScalarType dt) {
      const auto opts = hidden.options().dtype(dt);
      if (!io.channel_major) return at::empty(hidden.sizes(), opts);
      return at::empty({hidden.size(0), C, hidden.size(1)}, opts).transpose(1, 2);
    };
    io.normed = make(weight.scalar_type());
    io.residual_out = make(out_res);
  }
  return io;
}

NormIO check_add_rms_norm_linear_args(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                      const at::Tensor& norm_weight, double eps,
                                      std::optional<at::ScalarType> residual_dtype, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  const char* op = "add_rms_norm_linear";
  Checker c{op, hidden};
  c.defined("hidden", hidden);
  TORCH_CHECK(hidden.dim() == 2, op, ": argument 'hidden' must have shape [batch, C], got ", shape_str(hidden.sizes()));
  NormIO io = prepare_add_rms_norm(hidden, residual, norm_weight, eps, residual_dtype, /*allocate=*/false, op,
                                   "norm_weight");
  c.defined("weight", weight);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == io.channels, op, ": argument 'weight' must have shape ",
              "[out_features, C] with C = ", io.channels, ", got ", shape_str(weight.sizes()));
  c.device("weight", weight);
  c.same_dtype("weight", weight, "norm_weight", norm_weight);
  if (bias) {
    c.shape("bias", *bias, {weight.size(0)}, "[out_features]");
    c.device("bias", *bias);
    c.same_dtype("bias", *bias, "norm_weight", norm_weight);
  }
  return io;
}

}  // namespace statemamba::ops
