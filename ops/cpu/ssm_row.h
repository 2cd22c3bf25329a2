#pragma once
// The SSM recurrence of one (batch, channel) row on the CPU, shared by the scan (forward and
// backward) and the decode kernel, so that stepping token by token rounds exactly as the scan.
//
// Speed: the per-state exp is most of the work. std::exp does not vectorise, so float rows use
// exp_vectorizable below (within 1 ulp of exp on the range that does not underflow), and the
// kernels that call these helpers are built twice (target_clones: AVX2 and baseline x86-64) with
// -fno-trapping-math so GCC vectorises the loops over the state. Neither build uses FMA and no
// reduction is reordered, so both builds give the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SM_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SM_CPU_CLONES
#endif
#define SM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace statemamba::ops::cpu {

// e^x for float with plain arithmetic that GCC vectorises: Cody–Waite reduction to
// r = x - k·ln2 (|r| ≤ ln2/2), a degree-7 polynomial for e^r (Cephes' expf), then scaling by 2^k
// through the exponent bits. Inputs are clamped to [-87.34, 88.38]: below, the result is the
// smallest normal float (1.2e-38) where exp would give a subnormal or 0.
SM_ALWAYS_INLINE float exp_vectorizable(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.f;  // 1.5·2^23: adding and subtracting it rounds to an integer
  x = std::min(std::max(x, -87.33654f), 88.37626f);
  const float k = (x * kLog2e + kRound) - kRound;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
SM_ALWAYS_INLINE float state_exp(float x) { return exp_vectorizable(x); }
SM_ALWAYS_INLINE double state_exp(double x) { return std::exp(x); }

// decay[n] = e^(Δ·A[n]).
template <typename T>
SM_ALWAYS_INLINE void decay(T* __restrict out, const T* __restrict A, T dt, int64_t N) {
  for (int64_t n = 0; n < N; ++n) out[n] = state_exp(dt * A[n]);
}

// h ← e^(Δ·A) ⊙ h + Δ·u·B, with h zeroed first when the step starts an episode.
template <typename T>
SM_ALWAYS_INLINE void ssm_step(T* __restrict h, const T* __restrict A, const T* __restrict B, T dt, T u,
                               bool reset, int64_t N) {
  if (reset) std::fill(h, h + N, T(0));
  const T dtu = dt * u;
  for (int64_t n = 0; n < N; ++n) h[n] = state_exp(dt * A[n]) * h[n] + dtu * B[n];
}

// y = C·h + D·u, in a fixed order (so the scan and decode kernels agree to the bit): 8 interleaved
// partial sums (partial j over n ≡ j mod 8, in order), which GCC keeps in one vector register
// instead of a chain of N dependent adds, combined pairwise, then D·u added.
template <typename T>
SM_ALWAYS_INLINE T ssm_output(const T* __restrict C, const T* __restrict h, T D, T u, int64_t N) {
  constexpr int64_t kParts = 8;
  T part[kParts] = {};
  int64_t n = 0;
  for (; n + kParts <= N; n += kParts)
    for (int64_t j = 0; j < kParts; ++j) part[j] += C[n + j] * h[n + j];
  for (int64_t j = 0; n + j < N; ++j) part[j] += C[n + j] * h[n + j];
  const T sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  return D * u + sum;
}

}  // namespace statemamba::ops::cpu
