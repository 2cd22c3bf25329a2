// CUDA decode step of the causal conv, conv_state shifted in place. One thread per (batch,
// channel) row; taps newest first, as ops/cuda/causal_conv1d_kernel.cu, so stepping reproduces
// the sequence kernel bit for bit.
#include <torch/library.h>

#include "ops/args.h"
#include "ops/cuda/common.cuh"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kMaxW = 8;

template <typename T, typename S>
__global__ void conv_update_kernel(const T* __restrict__ x, S* __restrict__ state, const S* __restrict__ w,
                                   const S* __restrict__ bias, const bool* __restrict__ reset, T* __restrict__ y,
                                   int batch, int dim, int W, bool silu_out) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= int64_t(batch) * dim) return;
  const int b = int(row / dim), d = int(row % dim), Wm1 = W - 1;
  S* st = state + row * Wm1;
  const S* wr = w + int64_t(d) * W;
  const bool rst = reset && reset[b];
  S old[kMaxW];  // old[k]: the state's column k (oldest first); index k+1 read below stays in range
#pragma unroll
  for (int k = 0; k < kMaxW; ++k) old[k] = k < Wm1 && !rst ? st[k] : S(0);
  const S xv = to<S>(x[row]);
  S acc = bias ? bias[d] : S(0);
  acc = fma(wr[W - 1], xv, acc);
#pragma unroll
  for (int k = kMaxW - 2; k >= 0; --k)
    if (k < Wm1) acc = fma(wr[k], old[k], acc);
  y[row] = T(silu_out ? silu(acc) : acc);
#pragma unroll
  for (int j = 0; j < kMaxW - 1; ++j)
    if (j < Wm1) st[j] = j == Wm1 - 1 ? xv : old[j + 1];
}

at::Tensor causal_conv1d_update_cuda(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, bool silu,
                                     const std::optional<at::Tensor>& reset) {
  const ConvDims s = check_causal_conv1d_update_args(x, conv_state, weight, bias, reset);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = s.state_dtype;
  at::Tensor st = conv_state.is_contiguous() ? conv_state : conv_state.contiguous();
  const at::Tensor xc = x.contiguous(), w = weight.to(acc).contiguous(), bc = as_dtype(bias, acc);
  const at::Tensor rst = contig_or_undef(reset);
  auto y = at::empty({s.batch, s.dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_update_cuda", [&] {
    using T = scalar_t;
    using S = acc_t<T>;
    conv_update_kernel<T, S><<<ceil_div(s.batch * s.dim, 256), 256, 0, current_stream()>>>(
        xc.data_ptr<T>(), st.data_ptr<S>(), w.data_ptr<S>(), ptr<S>(bc), ptr<bool>(rst), y.data_ptr<T>(),
        int(s.batch), int(s.dim), int(s.width), silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!st.is_same(conv_state)) const_cast<at::Tensor&>(conv_state).copy_(st);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("causal_conv1d_update", &causal_conv1d_update_cuda); }

}  // namespace statemamba::ops
