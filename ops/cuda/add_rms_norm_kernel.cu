// CUDA kernels for add_rms_norm (ops/norm_row.h holds the arithmetic and the summation order:
// partial j sums channels j, j+32, ... in order with fused multiply-adds, then the partials
// combine as a warp's xor butterfly). Every kernel keeps that order, so they agree bit for bit.
//   row-major rows (decode): a block per row, a thread per channel; the channels' values meet in
//     shared memory, where warp 0 takes the partial sums (lane j = partial j).
//   channel-major [B, C, L] memory (prefill): a block per tile of consecutive positions of one
//     sequence, thread (g, j) taking partial j of positions [g*V, g*V + V) of the tile. Pass 1
//     reads hidden and residual once, writes residual_out and keeps the values to normalise in
//     shared memory; pass 2 writes normed from there. The usual dtype combinations get kernels
//     with compile-time types and 16-byte accesses (V = 8); the rest take run-time dtypes (V = 1).
//     A tile that would not fit in shared memory (very large C) falls back to a kernel that
//     re-reads the inputs in pass 2.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ops/args.h"
#include "ops/cuda/common.cuh"
#include "ops/norm_row.h"

namespace statemamba::ops {
namespace {

using namespace statemamba::ops::cuda;

constexpr int kMaxSharedBytes = 48 * 1024;  // the row kernel's [C] values, without an opt-in

template <typename S>
__global__ void norm_rows_kernel(const NormRow a) {
  extern __shared__ __align__(16) unsigned char smem[];
  S* xs = reinterpret_cast<S*>(smem);  // [C]: the normalised row's inputs, in weight's dtype
  __shared__ S s_inv;
  const int64_t row = blockIdx.x, C = a.channels;
  // Launched overlapped (a decode step's chain): every input may come from the previous kernel.
  wait_for_previous_kernel();
  allow_next_kernel();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t o = a.offset(row, c);
    const S r = a.sum_at<S>(o);
    store_as(a.residual_out, o, a.residual_out_dt, r);
    xs[c] = round_to(a.weight_dt, r);
  }
  __syncthreads();
  if (threadIdx.x < kNormLanes) {
    S p = S(0);
    for (int64_t c = threadIdx.x; c < C; c += kNormLanes) p = fma(xs[c], xs[c], p);
    for (int s = kNormLanes / 2; s >= 1; s /= 2) p = p + __shfl_xor_sync(0xffffffffu, p, s);
    if (threadIdx.x == 0) s_inv = inverse_rms(a, p);
  }
  __syncthreads();
  const S inv = s_inv;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    store_as(a.normed, a.offset(row, c), a.weight_dt, xs[c] * inv * load_as<S>(a.weight, c, a.weight_dt));
}

// Channel-major memory when a tile does not fit in shared memory: a block per 32 positions, thread
// (x, y) summing partial y of position x; pass 2 re-reads hidden and residual.
template <typename S>
__global__ void norm_positions_kernel(const NormRow a) {
  __shared__ S part[kNormLanes][kNormLanes + 1];  // [partial][position]
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t row = int64_t(blockIdx.x) * kNormLanes + x, C = a.channels;
  const bool active = row < a.rows;
  S p = S(0);
  if (active)
    for (int64_t c = y; c < C; c += kNormLanes) {
      const int64_t o = a.offset(row, c);
      const S r = a.sum_at<S>(o);
      store_as(a.residual_out, o, a.residual_out_dt, r);
      const S v = round_to(a.weight_dt, r);
      p = fma(v, v, p);
    }
  part[y][x] = p;
  __syncthreads();
  if (y == 0) {
    S q[kNormLanes];
#pragma unroll
    for (int j = 0; j < kNormLanes; ++j) q[j] = part[j][x];
    part[0][x] = inverse_rms(a, butterfly_total(q));
  }
  __syncthreads();
  const S inv = part[0][x];
  if (active)
    for (int64_t c = y; c < C; c += kNormLanes) {
      const int64_t o = a.offset(row, c);
      const S v = round_to(a.weight_dt, a.sum_at<S>(o));
      store_as(a.normed, o, a.weight_dt, v * inv * load_as<S>(a.weight, c, a.weight_dt));
    }
}

// ---- channel-major tiles kept on chip ----------------------------------------------------------

template <typename T> constexpr Dt dt_of();
template <> constexpr Dt dt_of<float>() { return Dt::f32; }
template <> constexpr Dt dt_of<c10::Half>() { return Dt::f16; }
template <> constexpr Dt dt_of<c10::BFloat16>() { return Dt::bf16; }

// V consecutive elements between p and registers: 16-byte accesses when V = 8 (p 16-byte aligned),
// else one element at a time.
template <typename T, int V> __device__ __forceinline__ void load_v(const T* p, T (&v)[V]) {
  if constexpr (V == 8) {
    load8(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = p[k];
  }
}
template <typename T, int V> __device__ __forceinline__ void store_v(T* p, const T (&v)[V]) {
  if constexpr (V == 8) {
    store8(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = v[k];
  }
}
// Global memory: the vector path only when `vec` (every pointer 16-byte aligned, L a multiple of
// V, so a thread's V positions are all in range); else element by element, up to n positions.
template <typename T, int V> __device__ __forceinline__ void load_positions(const T* p, int n, bool vec, T (&v)[V]) {
  if (vec) {
    load_v(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = k < n ? p[k] : T(0.f);
  }
}
template <typename T, int V> __device__ __forceinline__ void store_positions(T* p, int n, bool vec, const T (&v)[V]) {
  if (vec) {
    store_v(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) p[k] = v[k];
  }
}

constexpr int kTypedVec = 8;  // positions per thread of the compile-time-dtype kernels: 16-byte accesses

// Compile-time dtypes: hidden H, residual R (read only when kResidual; hidden + residual is
// rounded to P, torch's promotion of H and R), residual_out O, weight W. The same arithmetic as
// NormRow::sum_at / store_as / round_to with S = float, without their run-time switches.
template <typename H, typename R, typename O, typename W, typename P, bool kResidual>
struct TypedIO {
  using S = float;
  using Stash = W;  // the values to normalise are rounded to W: kept exactly in W
  // 2 channels' loads in flight per thread (more needs over 128 registers, spilling at 2 blocks per SM)
  static constexpr int kVec = kTypedVec, kUnroll = 2, kMaxGroups = 8, kMinGroups = 1;  // tiles of 8 to 64 positions
  struct Raw {  // one channel's inputs at a thread's positions, as loaded
    H h[kVec];
    R r[kVec];
  };

  static bool matches(const NormRow& a) {
    return a.hidden_dt == dt_of<H>() && a.residual_out_dt == dt_of<O>() && a.weight_dt == dt_of<W>() &&
           (a.residual != nullptr) == kResidual &&
           (!kResidual || (a.residual_dt == dt_of<R>() && a.promoted_dt == dt_of<P>()));
  }
  __device__ static void load(const NormRow& a, int64_t o, int n, bool vec, Raw& x) {
    load_positions(static_cast<const H*>(a.hidden) + o, n, vec, x.h);
    if constexpr (kResidual) load_positions(static_cast<const R*>(a.residual) + o, n, vec, x.r);
  }
  __device__ static S sum(const NormRow&, const Raw& x, int k) {
    const S h = float(x.h[k]);
    return kResidual ? S(float(P(h + float(x.r[k])))) : h;
  }
  __device__ static void store_residual(const NormRow& a, int64_t o, int n, bool vec, const S (&r)[kVec]) {
    O v[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = O(r[k]);
    store_positions(static_cast<O*>(a.residual_out) + o, n, vec, v);
  }
  __device__ static Stash to_stash(const NormRow&, S r) { return W(r); }
  __device__ static S weight(const NormRow& a, int64_t c) { return float(static_cast<const W*>(a.weight)[c]); }
  __device__ static void store_normed(const NormRow& a, int64_t o, int n, bool vec, const S (&y)[kVec]) {
    W v[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = W(y[k]);
    store_positions(static_cast<W*>(a.normed) + o, n, vec, v);
  }
};

// Run-time dtypes (any combination, float64 included): NormRow's own accessors, a position per thread.
template <typename S_>
struct DynamicIO {
  using S = S_;
  using Stash = S;
  static constexpr int kVec = 1, kUnroll = 1, kMaxGroups = 16, kMinGroups = 4;  // tiles of 4 to 16 positions
  struct Raw {
    S r;  // hidden + residual: loaded and summed at once
  };

  __device__ static void load(const NormRow& a, int64_t o, int, bool, Raw& x) { x.r = a.sum_at<S>(o); }
  __device__ static S sum(const NormRow&, const Raw& x, int) { return x.r; }
  __device__ static void store_residual(const NormRow& a, int64_t o, int, bool, const S (&r)[kVec]) {
    store_as(a.residual_out, o, a.residual_out_dt, r[0]);
  }
  __device__ static Stash to_stash(const NormRow& a, S r) { return round_to(a.weight_dt, r); }
  __device__ static S weight(const NormRow& a, int64_t c) { return load_as<S>(a.weight, c, a.weight_dt); }
  __device__ static void store_normed(const NormRow& a, int64_t o, int, bool, const S (&y)[kVec]) {
    store_as(a.normed, o, a.weight_dt, y[0]);
  }
};

// Shared memory of a tile of `tile` positions: the partial sums [32][tile] (S), then the values to
// normalise [C][tile] (Stash). Consecutive threads touch consecutive words of both.
template <typename IO> size_t tile_bytes(int64_t channels, int tile) {
  return size_t(tile) * (kNormLanes * sizeof(typename IO::S) + size_t(channels) * sizeof(typename IO::Stash));
}

// Block (G, 32): thread (g, j) sums partial j (channels j, j+32, ...) of V positions; the tile is
// blockIdx.x's tile of G*V positions of one sequence.
template <typename IO>
__global__ void __launch_bounds__(IO::kMaxGroups * kNormLanes, 2)  // two blocks per SM, as launch_tiles
    norm_tile_kernel(const NormRow a, const int tiles_per_sequence, const bool vec) {
  using S = typename IO::S;
  using Stash = typename IO::Stash;
  constexpr int V = IO::kVec, U = IO::kUnroll;
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = blockDim.x, tile = G * V;
  S* part = reinterpret_cast<S*>(smem);                             // [32][tile]
  Stash* stash = reinterpret_cast<Stash*>(part + kNormLanes * tile);  // [C][tile]
  const int g = threadIdx.x, j = threadIdx.y, col = g * V;  // col: this thread's first position in the tile
  const int64_t C = a.channels, L = a.length;
  const int64_t b = blockIdx.x / tiles_per_sequence;
  const int64_t t = int64_t(blockIdx.x % tiles_per_sequence) * tile + col;  // its first position in the sequence
  const int n = int(L - t < V ? L - t : V);                                  // its positions in range (<= 0: none)
  auto offset = [&](int64_t c) { return (b * C + c) * L + t; };

  // Pass 1: residual_out, the values to normalise (into shared memory) and partial j of each position.
  S p[V];
#pragma unroll
  for (int k = 0; k < V; ++k) p[k] = S(0);
  if (n > 0) {
    for (int64_t c0 = j; c0 < C; c0 += U * kNormLanes) {
      typename IO::Raw x[U];  // U channels' loads issued before any is used
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c0 + u * kNormLanes < C) IO::load(a, offset(c0 + u * kNormLanes), n, vec, x[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * kNormLanes;
        if (c >= C) break;
        S r[V];
        Stash s[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          r[k] = IO::sum(a, x[u], k);
          s[k] = IO::to_stash(a, r[k]);
          const S v = S(s[k]);
          p[k] = fma(v, v, p[k]);  // channels of partial j in increasing order, as norm_row.h
        }
        IO::store_residual(a, offset(c), n, vec, r);
        store_v(stash + c * tile + col, s);
      }
    }
  }
  store_v(part + j * tile + col, p);
  __syncthreads();
  const int tid = j * G + g;  // tile <= 32 * G threads: one per position
  if (tid < tile) {
    S q[kNormLanes];
#pragma unroll
    for (int i = 0; i < kNormLanes; ++i) q[i] = part[i * tile + tid];
    part[tid] = inverse_rms(a, butterfly_total(q));  // column tid is this thread's alone
  }
  __syncthreads();
  S inv[V];
  load_v(part + col, inv);

  // Pass 2: normed from shared memory.
  if (n > 0) {
    for (int64_t c0 = j; c0 < C; c0 += U * kNormLanes) {
      Stash s[U][V];
      S w[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * kNormLanes;
        if (c < C) {
          load_v(stash + c * tile + col, s[u]);
          w[u] = IO::weight(a, c);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * kNormLanes;
        if (c >= C) break;
        S y[V];
#pragma unroll
        for (int k = 0; k < V; ++k) y[k] = S(s[u][k]) * inv[k] * w[u];  // as norm_row.h: x * inv * weight
        IO::store_normed(a, offset(c), n, vec, y);
      }
    }
  }
}

// Launches the largest tile (G from kMaxGroups down to kMinGroups, no longer than a sequence needs)
// of which two blocks fit in an SM's shared memory; false when none fits.
template <typename IO> bool launch_tiles(const NormRow& a, bool vec) {
  int dev = 0, per_block = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  const size_t budget = std::min<size_t>(per_block, per_sm / 2 - 1024);  // 1 KB per block is the driver's
  const int needed = pow2_ceil(std::min(IO::kMaxGroups, ceil_div(a.length, IO::kVec)));  // kMaxGroups: a power of 2
  for (int G = std::max(IO::kMinGroups, needed); G >= IO::kMinGroups; G /= 2) {
    const int tile = G * IO::kVec;
    const size_t bytes = tile_bytes<IO>(a.channels, tile);
    if (bytes > budget) continue;
    const int tiles = ceil_div(a.length, tile);
    const int64_t blocks = a.rows / a.length * tiles;
    TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "add_rms_norm: ", a.rows,
                " positions are too many for one launch");
    opt_in_smem<norm_tile_kernel<IO>>();
    norm_tile_kernel<IO><<<int(blocks), dim3(G, kNormLanes), bytes, current_stream()>>>(a, tiles, vec);
    return true;
  }
  return false;
}

// hidden, residual, residual_out and normed 16-byte aligned, L a multiple of the typed kernels' V.
bool vector_accesses(const NormRow& a) {
  return a.length % kTypedVec == 0 && aligned16(a.hidden) && (!a.residual || aligned16(a.residual)) &&
         aligned16(a.residual_out) && aligned16(a.normed);
}

// True when `a` has IO's dtypes; `ran` then says whether its tile fitted and the kernel ran.
template <typename IO> bool launch_if_typed(const NormRow& a, bool& ran) {
  if (!IO::matches(a)) return false;
  ran = launch_tiles<IO>(a, vector_accesses(a));
  return true;
}

template <typename S> void launch_rereading(const NormRow& a) {
  norm_positions_kernel<S><<<ceil_div(a.rows, kNormLanes), dim3(kNormLanes, kNormLanes), 0, current_stream()>>>(a);
}

using bf16 = c10::BFloat16;
using f16 = c10::Half;

void launch_channel_major(const NormRow& a, bool use_double) {
  if (use_double) {
    if (!launch_tiles<DynamicIO<double>>(a, false)) launch_rereading<double>(a);
    return;
  }
  // Model dtype T for hidden and weight, the residual kept in float32 (residual_in_fp32) or in T;
  // and the first layer's call, without a residual.
  bool ran = false;
  const bool typed = launch_if_typed<TypedIO<bf16, float, float, bf16, float, true>>(a, ran) ||
                     launch_if_typed<TypedIO<bf16, bf16, float, bf16, bf16, false>>(a, ran) ||
                     launch_if_typed<TypedIO<bf16, bf16, bf16, bf16, bf16, true>>(a, ran) ||
                     launch_if_typed<TypedIO<bf16, bf16, bf16, bf16, bf16, false>>(a, ran) ||
                     launch_if_typed<TypedIO<f16, float, float, f16, float, true>>(a, ran) ||
                     launch_if_typed<TypedIO<f16, f16, float, f16, f16, false>>(a, ran) ||
                     launch_if_typed<TypedIO<float, float, float, float, float, true>>(a, ran) ||
                     launch_if_typed<TypedIO<float, float, float, float, float, false>>(a, ran);
  // A typed tile too large for shared memory goes to the re-reading kernel: a run-time-dtype tile
  // (float Stash) would need about as much.
  if (!typed) ran = launch_tiles<DynamicIO<float>>(a, false);
  if (!ran) launch_rereading<float>(a);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, double eps,
                                                     std::optional<at::ScalarType> residual_dtype) {
  c10::cuda::CUDAGuard guard(hidden.device());
  const NormIO io = prepare_add_rms_norm(hidden, residual, weight, eps, residual_dtype);
  const NormRow a = make_norm_row(io, eps);
  const size_t elem = io.use_double ? sizeof(double) : sizeof(float);
  if (io.channel_major) {
    launch_channel_major(a, io.use_double);
  } else {
    TORCH_CHECK(io.channels * elem <= kMaxSharedBytes, "add_rms_norm: the CUDA kernel takes rows of up to ",
                kMaxSharedBytes / elem, " channels in this dtype, got ", io.channels);
    const int threads = int(std::min<int64_t>(1024, (io.channels + 31) / 32 * 32));
    const size_t shared = io.channels * elem;
    if (io.use_double) launch_overlapped(norm_rows_kernel<double>, dim3(io.rows), dim3(threads), shared, current_stream(), a);
    else launch_overlapped(norm_rows_kernel<float>, dim3(io.rows), dim3(threads), shared, current_stream(), a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {io.normed, io.residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CUDA, m) { m.impl("add_rms_norm", &add_rms_norm_cuda); }

}  // namespace statemamba::ops
