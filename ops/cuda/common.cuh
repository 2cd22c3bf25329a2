#pragma once
// Device helpers shared by the CUDA kernels in ops/cuda and mamba/cuda. Internal: not installed.
// Lighter than <ATen/ATen.h>, which dominates each file's compile time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "ops/math.h"

namespace statemamba::ops::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Input dtypes the fast kernels take (float64 goes to simple kernels): the lambda sees `scalar_t`
// as float, at::Half or at::BFloat16 only, so no float64 instance of a fast kernel is compiled.
#define SM_DISPATCH_FAST(TYPE, NAME, ...)                                                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                          \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                       \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }
inline int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename S, typename T> __device__ __forceinline__ S to(T v) { return static_cast<S>(v); }

// exp(x) for the recurrence: one MUFU op on x pre-scaled by log2(e) (float); exact exp for double.
__device__ __forceinline__ float exp_scaled(float x_log2e) { return exp2f(x_log2e); }
__device__ __forceinline__ double exp_scaled(double x_log2e) { return exp2(x_log2e); }

// softplus through the fast exp/log intrinsics (torch's threshold of 20). Near 0 it is off from
// log1p(exp(x)) by ~1e-7 absolute, far below what a step Δ of that size contributes. Every CUDA
// kernel that computes Δ uses this one, so decode steps and sequence kernels agree bit for bit.
__device__ __forceinline__ float softplus_fast(float x) {
  return x > float(kSoftplusThreshold) ? x : __logf(1.f + __expf(x));
}

// ---- 16-byte asynchronous copies (sm_80+) into shared memory -----------------------------------
// src_bytes < 16 zero-fills the rest of the 16 bytes; 0 reads nothing (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Copies rows [0, rows) × time [t0, t0 + Tc) of a row-major [*, L] tensor into smem [rows][Tc],
// zero-filling rows >= valid_rows and times >= L. `aligned` (every row start 16-byte aligned and
// L a multiple of the vector width) selects asynchronous 16-byte copies; otherwise plain loads.
template <typename T, int Tc>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int L, int rows, int valid_rows, int t0,
                                          bool aligned, int tid, int nthreads) {
  constexpr int V = 16 / sizeof(T);
  static_assert(Tc % V == 0, "tile width must be a whole number of 16-byte vectors");
  constexpr int per_row = Tc / V;
  if (aligned) {
    for (int e = tid; e < rows * per_row; e += nthreads) {
      const int r = e / per_row, k = (e % per_row) * V;
      const bool ok = r < valid_rows && t0 + k < L;
      cp_async16(dst + r * Tc + k, ok ? src + int64_t(r) * L + t0 + k : src, ok ? 16 : 0);
    }
  } else {
    for (int e = tid; e < rows * Tc; e += nthreads) {
      const int r = e / Tc, k = e % Tc;
      dst[e] = (r < valid_rows && t0 + k < L) ? src[int64_t(r) * L + t0 + k] : T(0);
    }
  }
}

// 8 consecutive elements through 16-byte accesses (p must be 16-byte aligned).
template <typename T> __device__ __forceinline__ void load8(const T* p, T (&v)[8]) {
  constexpr int n = 8 * sizeof(T) / 16;
  uint4 buf[n];
#pragma unroll
  for (int i = 0; i < n; ++i) buf[i] = reinterpret_cast<const uint4*>(p)[i];
  memcpy(&v, buf, sizeof(buf));
}
template <typename T> __device__ __forceinline__ void store8(T* p, const T (&v)[8]) {
  constexpr int n = 8 * sizeof(T) / 16;
  uint4 buf[n];
  memcpy(buf, &v, sizeof(buf));
#pragma unroll
  for (int i = 0; i < n; ++i) reinterpret_cast<uint4*>(p)[i] = buf[i];
}

// Up to kN consecutive elements of a row kept as raw bits in registers, so a prefetch stays in
// flight until its values are used (converting on arrival would wait for the load).
template <typename T, int kN>
struct Run {
  static constexpr int kBytes = kN * int(sizeof(T));
  uint4 v[(kBytes + 15) / 16];
  __device__ __forceinline__ T get(int j) const {
    T tmp[kN];
    memcpy(tmp, v, sizeof(tmp));
    return tmp[j];
  }
};

// Loads row[t, t + n) (n <= kN) into r, zeros past L; vector loads when `vec` (row 16-byte
// aligned, t a multiple of n) and the whole run is in range.
template <typename T, int kN>
__device__ __forceinline__ void load_run(Run<T, kN>& r, const T* row, int t, int L, int n, bool vec) {
  const int bytes = n * int(sizeof(T));
  if (vec && t + n <= L) {
    if (bytes == 32 && Run<T, kN>::kBytes >= 32) {
      r.v[0] = *reinterpret_cast<const uint4*>(row + t);
      r.v[Run<T, kN>::kBytes >= 32 ? 1 : 0] = *reinterpret_cast<const uint4*>(row + t + 16 / sizeof(T));
      return;
    }
    if (bytes == 16 && Run<T, kN>::kBytes >= 16) {
      r.v[0] = *reinterpret_cast<const uint4*>(row + t);
      return;
    }
    if (bytes == 8) {
      const uint2 x = *reinterpret_cast<const uint2*>(row + t);
      r.v[0].x = x.x, r.v[0].y = x.y;
      return;
    }
  }
  T tmp[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) tmp[j] = (j < n && t + j < L) ? row[t + j] : T(0);
  memcpy(r.v, tmp, sizeof(tmp));
}

// Stores v[0, n) to row[t, ...), skipping positions past L; vector stores as load_run.
template <typename T, int kN>
__device__ __forceinline__ void store_run(T* row, int t, int L, int n, bool vec, const float (&v)[kN]) {
  T tmp[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) tmp[j] = T(v[j]);
  const int bytes = n * int(sizeof(T));
  if (vec && t + n <= L && (bytes == 8 || bytes == 16 || bytes == 32) && bytes <= int(sizeof(tmp))) {
    uint4 buf[(sizeof(tmp) + 15) / 16] = {};
    memcpy(buf, tmp, sizeof(tmp));
    if (bytes == 8) {
      *reinterpret_cast<uint2*>(row + t) = make_uint2(buf[0].x, buf[0].y);
    } else {
      *reinterpret_cast<uint4*>(row + t) = buf[0];
      if (bytes == 32) *reinterpret_cast<uint4*>(row + t + 16 / sizeof(T)) = buf[sizeof(tmp) > 16 ? 1 : 0];
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kN; ++j)
    if (j < n && t + j < L) row[t + j] = tmp[j];
}

template <typename S> __device__ __forceinline__ S warp_sum(S v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A kernel may take more than 48 KB of dynamic shared memory only after opting in; done once per
// kernel and device, before any launch (so never inside a CUDA-graph capture after warm-up).
template <auto kKernel>
void opt_in_smem() {
  constexpr int kMaxDevices = 64;
  static std::once_flag flags[kMaxDevices];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::call_once(flags[dev % kMaxDevices], [dev] {
    int max_optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
  });
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---- Overlapped launches: programmatic dependent launch (Hopper and later) ----------------------
// A decode step is a chain of small kernels, each bound by its launch and its first trip to HBM.
// A kernel started by launch_overlapped may begin while the kernel before it in the stream still
// runs, as soon as that kernel's blocks have all called allow_next_kernel() (or exited). Until it
// has called wait_for_previous_kernel() it must write nothing and read nothing it will use: it
// may only warm L2 with the weights it will need (prefetch_l2_range), which is safe whatever still
// runs (L2 is the GPU's point of coherence; no stale value can be kept). The wait returns once
// every earlier kernel has finished and its writes are visible; each of our kernels calls it on
// every path, so the ordering stays transitive along the chain. STATEMAMBA_OVERLAP=0 in the
// environment launches them plainly (for A/B timing); so does a GPU older than sm_90.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Every 128-byte line of [p, p + bytes), threads tid = 0 .. nthreads-1 taking every nthreads-th.
__device__ __forceinline__ void prefetch_l2_range(const void* p, int64_t bytes, int tid, int nthreads) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(127);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes);
  for (uintptr_t a = first + uintptr_t(tid) * 128; a < end; a += uintptr_t(nthreads) * 128)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(a));
}

inline bool overlapped_launches_enabled() {
  static const bool wanted = [] {
    const char* v = std::getenv("STATEMAMBA_OVERLAP");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  constexpr int kMaxDevices = 64;
  static std::atomic<int8_t> capable[kMaxDevices];  // 0 unknown, 1 yes, -1 no (threads agree on it)
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int8_t>& c = capable[dev % kMaxDevices];
  if (c.load(std::memory_order_relaxed) == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    c.store(major >= 9 ? 1 : -1, std::memory_order_relaxed);
  }
  return wanted && c.load(std::memory_order_relaxed) == 1;
}

template <typename... Params, typename... Args>
void launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = smem, config.stream = stream;
  config.attrs = &attribute, config.numAttrs = overlapped_launches_enabled() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// Optional-tensor helpers for the host wrappers.
inline at::Tensor contig_or_undef(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? t->contiguous() : at::Tensor();
}
inline at::Tensor as_dtype(const std::optional<at::Tensor>& t, at::ScalarType s) {
  return t && t->defined() ? t->to(s).contiguous() : at::Tensor();
}
template <typename T> inline const T* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }
template <typename T> inline T* mptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

}  // namespace statemamba::ops::cuda
