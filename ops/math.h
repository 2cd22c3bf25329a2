#pragma once
// Scalar math shared by the CPU and CUDA kernels, so every backend rounds the same way.
#include <cmath>

#if defined(__CUDACC__)
#define SM_HD __host__ __device__ __forceinline__
#else
#define SM_HD inline
#endif

namespace statemamba::ops {

// softplus with torch's threshold: above 20 it is the identity (and its derivative 1).
constexpr double kSoftplusThreshold = 20.0;

template <typename T> SM_HD T sigmoid(T x) { return T(1) / (T(1) + exp(-x)); }
template <typename T> SM_HD T softplus(T x) { return x > T(kSoftplusThreshold) ? x : log1p(exp(x)); }
template <typename T> SM_HD T softplus_grad(T x) { return x > T(kSoftplusThreshold) ? T(1) : sigmoid(x); }
template <typename T> SM_HD T silu(T x) { return x * sigmoid(x); }
template <typename T> SM_HD T silu_grad(T x) {
  T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

}  // namespace statemamba::ops
