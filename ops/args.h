#pragma once
// Argument checks shared by every backend's kernels (CPU, CUDA, Meta), so that each op rejects bad
// input with the same message wherever it runs. Internal: not installed.
#include <ATen/core/Tensor.h>
#include <optional>

namespace statemamba::ops {

struct ScanDims {
  int64_t batch, dim, dstate, seqlen;
  at::ScalarType state_dtype;  // float32, or float64 for float64 inputs
};

struct ConvDims {
  int64_t batch, dim, width, seqlen;
  at::ScalarType state_dtype;
};

// Each checks shapes, dtypes and devices, and throws c10::Error naming the op, the argument, what
// was expected and what came. The decode checks take seqlen = 1.
ScanDims check_selective_scan_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& C,
                                   const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                   const std::optional<at::Tensor>& delta_bias,
                                   const std::optional<at::Tensor>& initial_state,
                                   const std::optional<at::Tensor>& reset);
ConvDims check_causal_conv1d_args(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& initial_state,
                                  const std::optional<at::Tensor>& reset);
ScanDims check_selective_state_update_args(const at::Tensor& state, const at::Tensor& x,
                                           const at::Tensor& dt, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const std::optional<at::Tensor>& D,
                                           const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& dt_bias,
                                           const std::optional<at::Tensor>& reset);
ConvDims check_causal_conv1d_update_args(const at::Tensor& x, const at::Tensor& conv_state,
                                         const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& reset);

// small_batch_linear: x [B, K], weight [N, K], bias [N], one floating dtype, one device. Returns {B, N, K}.
struct LinearDims {
  int64_t batch, out_features, in_features;
};
LinearDims check_small_batch_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias);

// add_rms_norm's arguments checked, and its tensors in one of the two layouts the kernels take:
// row-major rows (hidden viewed as [rows, C], channels contiguous) or channel-major [B, L, C] views
// of [B, C, L] memory (hidden.stride() == [C·L, 1, L]). Residual follows hidden's layout (copied
// when it does not); other layouts become row-major copies. The outputs are allocated in the
// chosen layout with hidden's shape.
struct NormIO {
  at::Tensor hidden, residual, weight;  // residual undefined when absent
  at::Tensor normed, residual_out;
  int64_t rows, channels, length;  // length: L of the channel-major layout (1 when row-major)
  bool channel_major;
  at::ScalarType promoted;  // dtype of hidden + residual, before the cast to residual_out
  bool use_double;          // arithmetic in float64 (an input is float64)
};
NormIO prepare_add_rms_norm(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                            const at::Tensor& weight, double eps, std::optional<at::ScalarType> residual_dtype,
                            bool allocate = true, const char* op = "add_rms_norm", const char* weight_arg = "weight");

// add_rms_norm_linear: add_rms_norm's checks on rows hidden [B, C] (nothing allocated), then
// weight [N, C] and bias [N] in norm_weight's dtype, on hidden's device.
NormIO check_add_rms_norm_linear_args(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                      const at::Tensor& norm_weight, double eps,
                                      std::optional<at::ScalarType> residual_dtype, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias);

// The state dtype for inputs of dtype t: float64 stays, everything else accumulates in float32.
inline at::ScalarType state_dtype_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace statemamba::ops
