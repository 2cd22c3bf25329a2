// CUDA causal depthwise conv1d, forward and backward, with carried state and resets.
//
// Forward: one thread per 8 consecutive outputs of a (batch, channel) row; it reads its 8 inputs
// and the 8 before them (16-byte loads where rows are aligned; the halo hits L1 since the
// neighbouring lane loaded it) and writes 8 outputs with 16-byte stores. Memory-bound: x read
// once, y written once. Inputs before t = 0 come from initial_state.
// Backward: one warp per row, lanes over groups of 8 positions; each lane recomputes the pre-SiLU
// outputs it needs, then dx by the transposed taps; dweight/dbias are summed in registers, reduced
// over the warp and added with one atomic per (channel, tap).
//
// Taps run newest first (m = 0 is x_t, weight[W-1]) in every kernel here and in the decode
// kernel, so stepping reproduces the sequence kernel bit for bit. A reset at r hides every input
// before r from outputs at r and later; within a window that is a bitmask test.
#include <torch/library.h>

#include "ops/args.h"
#include "ops/cuda/common.cuh"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kV = 8;  // positions per thread

template <typename T, typename S>
struct ConvParams {
  const T *x, *gy;
  const S *w, *bias, *h0, *gfinal;
  const bool* reset;
  T *y, *dx;
  S *hT, *dw, *db, *dh0;
  int batch, dim, W;
  int64_t L;
  bool silu, vec, vec_reset;
};

// Positions [s0, s0 + 8) of row `row` (s0 a multiple of 8): x, initial_state before 0, zeros past L.
template <typename T, typename S>
__device__ __forceinline__ void load_group(const ConvParams<T, S>& p, int64_t row, int64_t s0, S* out) {
  if (s0 >= 0 && p.vec && s0 + kV <= p.L) {
    T v[kV];
    load8(p.x + row * p.L + s0, v);
#pragma unroll
    for (int i = 0; i < kV; ++i) out[i] = to<S>(v[i]);
    return;
  }
  const int Wm1 = p.W - 1;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    const int64_t s = s0 + i;
    out[i] = s >= p.L ? S(0)
             : s >= 0 ? to<S>(p.x[row * p.L + s])
                      : (p.h0 && s >= -Wm1 ? p.h0[row * Wm1 + Wm1 + s] : S(0));
  }
}

template <typename T, typename S>
__device__ __forceinline__ void load_grad_group(const ConvParams<T, S>& p, int64_t row, int64_t s0, S* out) {
  if (p.vec && s0 + kV <= p.L) {
    T v[kV];
    load8(p.gy + row * p.L + s0, v);
#pragma unroll
    for (int i = 0; i < kV; ++i) out[i] = to<S>(v[i]);
    return;
  }
#pragma unroll
  for (int i = 0; i < kV; ++i) out[i] = s0 + i < p.L ? to<S>(p.gy[row * p.L + s0 + i]) : S(0);
}

// Bit i: reset at position s0 + i, for the 8 positions from s0 (a multiple of 8).
__device__ __forceinline__ unsigned reset_bits8(const bool* r, int64_t s0, int64_t L, bool vec) {
  if (!r || s0 < 0 || s0 >= L) return 0;
  if (vec && s0 + kV <= L) {
    const uint2 v = *reinterpret_cast<const uint2*>(r + s0);
    const unsigned long long x = (v.x | (static_cast<unsigned long long>(v.y) << 32)) & 0x0101010101010101ull;
    return static_cast<unsigned>((x * 0x0102040810204080ull) >> 56);  // gathers byte i's bit 0 into bit i
  }
  unsigned bits = 0;
  for (int i = 0; i < kV && s0 + i < L; ++i) bits |= unsigned(r[s0 + i]) << i;
  return bits;
}

// The conv output at window index q (taps q, q-1, ..., newest first), given the window's reset bits.
template <typename S, int kWin>
__device__ __forceinline__ S conv_at(const S (&xw)[kWin], const S (&wr)[kV], S bias, int W, unsigned rb, int q) {
  // Taps m <= mlim are visible: mlim = q - (latest reset at or before q), or all of them.
  const unsigned upto = rb & (q >= 31 ? 0xffffffffu : ((2u << q) - 1));
  const int mlim = upto ? q - (31 - __clz(upto)) : kV;
  S acc = bias;
#pragma unroll
  for (int m = 0; m < kV; ++m)
    if (m < W && m <= mlim && q - m >= 0) acc = fma(wr[m], xw[q - m >= 0 ? q - m : 0], acc);
  return acc;
}

template <typename T, typename S>
__global__ void conv_fwd_kernel(const ConvParams<T, S> p) {
  const int64_t gpr = (p.L + kV - 1) / kV;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.batch) * p.dim * gpr) return;
  const int64_t row = idx / gpr, t0 = (idx % gpr) * kV;
  const int b = int(row / p.dim), d = int(row % p.dim), W = p.W;

  S xw[2 * kV];
  load_group(p, row, t0 - kV, xw);
  load_group(p, row, t0, xw + kV);
  const bool* rrow = p.reset ? p.reset + int64_t(b) * p.L : nullptr;
  const unsigned rb = reset_bits8(rrow, t0 - kV, p.L, p.vec_reset) | (reset_bits8(rrow, t0, p.L, p.vec_reset) << kV);
  S wr[kV];
#pragma unroll
  for (int m = 0; m < kV; ++m) wr[m] = m < W ? p.w[int64_t(d) * W + W - 1 - m] : S(0);
  const S bias = p.bias ? p.bias[d] : S(0);

  T out[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    const S acc = conv_at(xw, wr, bias, W, rb, kV + j);
    out[j] = T(p.silu ? silu(acc) : acc);
  }
  T* yrow = p.y + row * p.L;
  if (p.vec && t0 + kV <= p.L) {
    store8(yrow + t0, out);
  } else {
#pragma unroll
    for (int j = 0; j < kV; ++j)
      if (t0 + j < p.L) yrow[t0 + j] = out[j];
  }

  // The thread holding position L-1 writes the final state: the last W-1 inputs, zero where a
  // reset after them (up to L-1) hides them.
  if (p.hT && t0 <= p.L - 1 && p.L - 1 < t0 + kV) {
    const int Wm1 = W - 1;
#pragma unroll
    for (int i = 0; i < 2 * kV; ++i) {
      const int64_t s = t0 - kV + i;
      if (s >= p.L - Wm1 && s < p.L) {
        const int after = int(p.L - 1 - s);  // reset bits at window indices i+1 .. i+after
        const bool hidden = after > 0 && ((rb >> (i + 1)) & ((1u << after) - 1)) != 0;
        p.hT[row * Wm1 + (s - (p.L - Wm1))] = hidden ? S(0) : xw[i];
      }
    }
  }
}

template <typename T, typename S>
__global__ void conv_bwd_kernel(const ConvParams<T, S> p) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * warps + threadIdx.x / 32;
  if (row >= int64_t(p.batch) * p.dim) return;  // whole warps leave together
  const int b = int(row / p.dim), d = int(row % p.dim), W = p.W, Wm1 = W - 1;
  const int64_t L = p.L;
  const bool* rrow = p.reset ? p.reset + int64_t(b) * L : nullptr;
  S wr[kV], dwr[kV];
#pragma unroll
  for (int m = 0; m < kV; ++m) wr[m] = m < W ? p.w[int64_t(d) * W + W - 1 - m] : S(0), dwr[m] = S(0);
  const S bias = p.bias ? p.bias[d] : S(0);
  S dbias = 0;

  for (int64_t t0 = int64_t(lane) * kV; t0 < L; t0 += 32 * kV) {
    // Window: positions t0-8 .. t0+15 (x, resets); g needed at t0 .. t0+14.
    S xw[3 * kV];
    load_group(p, row, t0 - kV, xw);
    load_group(p, row, t0, xw + kV);
    load_group(p, row, t0 + kV, xw + 2 * kV);
    const unsigned rb = reset_bits8(rrow, t0 - kV, L, p.vec_reset) | (reset_bits8(rrow, t0, L, p.vec_reset) << kV) |
                        (reset_bits8(rrow, t0 + kV, L, p.vec_reset) << (2 * kV));
    S g[3 * kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) g[i] = S(0);
    load_grad_group(p, row, t0, g + kV);
    load_grad_group(p, row, t0 + kV, g + 2 * kV);
    if (p.silu) {
#pragma unroll
      for (int q = kV; q < 3 * kV - 1; ++q) g[q] *= silu_grad(conv_at(xw, wr, bias, W, rb, q));
    }
    // dweight, dbias from this lane's own outputs t0 .. t0+7.
#pragma unroll
    for (int q = kV; q < 2 * kV; ++q) {
      if (t0 + q - kV < L) {
        const unsigned upto = rb & ((2u << q) - 1);
        const int mlim = upto ? q - (31 - __clz(upto)) : kV;
        dbias += g[q];
#pragma unroll
        for (int m = 0; m < kV; ++m)
          if (m < W && m <= mlim) dwr[m] = fma(g[q], xw[q - m], dwr[m]);
      }
    }
    // dx at window index i: the outputs i .. i+W-1 that see it, then the final state's column.
    auto dx_at = [&](int i, int64_t s) {
      S acc = 0;
      bool alive = true;
#pragma unroll
      for (int m = 0; m < kV; ++m) {
        if (m < W && alive) acc = fma(g[i + m < 3 * kV ? i + m : 3 * kV - 1], wr[m], acc);
        alive = alive && !((rb >> (i + m + 1)) & 1u);
      }
      if (p.gfinal && s >= L - Wm1 && s < L) {
        const int after = int(L - 1 - s);
        const bool hidden = after > 0 && ((rb >> (i + 1)) & ((1u << after) - 1)) != 0;
        if (!hidden) acc += p.gfinal[row * Wm1 + (s - (L - Wm1))];
      }
      return acc;
    };
    T out[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) out[j] = T(dx_at(kV + j, t0 + j));
    T* dxrow = p.dx + row * L;
    if (p.vec && t0 + kV <= L) {
      store8(dxrow + t0, out);
    } else {
#pragma unroll
      for (int j = 0; j < kV; ++j)
        if (t0 + j < L) dxrow[t0 + j] = out[j];
    }
    if (t0 == 0 && p.dh0) {
#pragma unroll
      for (int i = 1; i < kV; ++i) {
        const int s = i - kV;
        if (s >= -Wm1) p.dh0[row * Wm1 + Wm1 + s] = dx_at(i, s);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kV; ++m) dwr[m] = warp_sum(dwr[m]);
  dbias = warp_sum(dbias);
  if (lane == 0) {
    for (int m = 0; m < W; ++m) atomicAdd(p.dw + int64_t(d) * W + W - 1 - m, dwr[m]);
    if (p.db) atomicAdd(p.db + d, dbias);
  }
}

template <typename T, typename S>
ConvParams<T, S> conv_params(const ConvDims& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                             const at::Tensor& h0, const at::Tensor& reset, bool silu) {
  ConvParams<T, S> p{};
  p.x = x.data_ptr<T>(), p.w = w.data_ptr<S>(), p.bias = ptr<S>(bias), p.h0 = ptr<S>(h0);
  p.reset = ptr<bool>(reset);
  p.batch = int(s.batch), p.dim = int(s.dim), p.W = int(s.width), p.L = s.seqlen, p.silu = silu;
  p.vec = s.seqlen % kV == 0 && aligned16(p.x);
  p.vec_reset = p.reset && s.seqlen % kV == 0 && (reinterpret_cast<uintptr_t>(p.reset) & 7) == 0;
  return p;
}

#define SM_DISPATCH_CONV(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> causal_conv1d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& initial_state,
                                                      const std::optional<at::Tensor>& reset, bool silu) {
  const ConvDims s = check_causal_conv1d_args(x, weight, bias, initial_state, reset);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = s.state_dtype;
  const at::Tensor xc = x.contiguous(), w = weight.to(acc).contiguous(), bc = as_dtype(bias, acc);
  const at::Tensor h0 = contig_or_undef(initial_state), rst = contig_or_undef(reset);
  auto y = at::empty_like(xc);
  auto final_state = at::empty({s.batch, s.dim, s.width - 1}, x.options().dtype(acc));
  SM_DISPATCH_CONV(x.scalar_type(), "causal_conv1d_cuda", [&] {
    using T = scalar_t;
    using S = acc_t<T>;
    auto p = conv_params<T, S>(s, xc, w, bc, h0, rst, silu);
    p.y = y.data_ptr<T>(), p.hT = final_state.data_ptr<S>();
    p.vec = p.vec && aligned16(p.y);
    const int64_t threads = s.batch * s.dim * ((s.seqlen + kV - 1) / kV);
    conv_fwd_kernel<T, S><<<ceil_div(threads, 128), 128, 0, current_stream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& reset, bool silu) {
  const ConvDims s = check_causal_conv1d_args(x, weight, bias, initial_state, reset);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "causal_conv1d_backward: argument 'grad_y' must have the shape of x ",
              x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x.device(), "causal_conv1d_backward: argument 'grad_y' is on ", grad_y.device(),
              " but the inputs are on ", x.device());
  const auto acc = s.state_dtype;
  at::Tensor gfinal;
  if (grad_final_state && grad_final_state->defined()) {
    TORCH_CHECK(grad_final_state->sizes() == at::IntArrayRef({s.batch, s.dim, s.width - 1}),
                "causal_conv1d_backward: argument 'grad_final_state' must have shape [batch, d_inner, width-1]");
    gfinal = grad_final_state->to(acc).contiguous();
  }
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), w = weight.to(acc).contiguous(), bc = as_dtype(bias, acc);
  const at::Tensor h0 = contig_or_undef(initial_state), rst = contig_or_undef(reset);
  const at::Tensor gy = grad_y.to(x.scalar_type()).contiguous();
  auto dx = at::empty_like(xc);
  auto dw = at::zeros({s.dim, s.width}, x.options().dtype(acc)), db = at::zeros({s.dim}, x.options().dtype(acc));
  auto dh0 = initial_state ? at::empty({s.batch, s.dim, s.width - 1}, x.options().dtype(acc)) : at::Tensor();
  SM_DISPATCH_CONV(x.scalar_type(), "causal_conv1d_backward_cuda", [&] {
    using T = scalar_t;
    using S = acc_t<T>;
    auto p = conv_params<T, S>(s, xc, w, bc, h0, rst, silu);
    p.gy = gy.data_ptr<T>(), p.gfinal = ptr<S>(gfinal);
    p.dx = dx.data_ptr<T>(), p.dw = dw.data_ptr<S>(), p.db = db.data_ptr<S>(), p.dh0 = mptr<S>(dh0);
    p.vec = p.vec && aligned16(p.gy) && aligned16(p.dx);
    constexpr int kWarps = 4;
    conv_bwd_kernel<T, S><<<ceil_div(s.batch * s.dim, kWarps), 32 * kWarps, 0, current_stream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw.to(weight.scalar_type()), bias ? db.to(bias->scalar_type()) : at::Tensor(),
          initial_state ? dh0.to(initial_state->scalar_type()) : at::Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) {
  m.impl("causal_conv1d", &causal_conv1d_cuda);
  m.impl("causal_conv1d_backward", &causal_conv1d_backward_cuda);
}

}  // namespace statemamba::ops
