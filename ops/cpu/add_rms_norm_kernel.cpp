// CPU kernel for add_rms_norm: rows in parallel, each by ops/norm_row.h's serial row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/args.h"
#include "ops/norm_row.h"

namespace statemamba::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& weight, double eps,
                                                    std::optional<at::ScalarType> residual_dtype) {
  const NormIO io = prepare_add_rms_norm(hidden, residual, weight, eps, residual_dtype);
  const NormRow row = make_norm_row(io, eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / io.channels);
  at::parallel_for(0, io.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (io.use_double) norm_row_serial<double>(row, r);
      else norm_row_serial<float>(row, r);
    }
  });
  return {io.normed, io.residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) { m.impl("add_rms_norm", &add_rms_norm_cpu); }

}  // namespace statemamba::ops
