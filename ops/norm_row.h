#pragma once
// add_rms_norm's arithmetic for one row, shared by the CPU and CUDA kernels. Internal: not installed.
//
// Dtypes are run-time codes (one kernel per layout, not one per dtype combination). A row's sum of
// squares is taken in a fixed order on every backend and layout: 32 interleaved partial sums
// (partial j over channels c ≡ j mod 32), combined as a warp's xor butterfly combines its lanes.
// The CUDA kernels accumulate with fused multiply-adds, the CPU one without, so each backend's
// layouts and batch sizes agree bit for bit, and CPU and CUDA agree to rounding.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "ops/args.h"
#include "ops/math.h"

namespace statemamba::ops {

enum class Dt : int8_t { f32, f64, f16, bf16 };

constexpr int kNormLanes = 32;

template <typename S> SM_HD S load_as(const void* p, int64_t i, Dt d) {
  switch (d) {
    case Dt::f32: return S(static_cast<const float*>(p)[i]);
    case Dt::f64: return S(static_cast<const double*>(p)[i]);
    case Dt::f16: return S(float(static_cast<const c10::Half*>(p)[i]));
    default: return S(float(static_cast<const c10::BFloat16*>(p)[i]));
  }
}

template <typename S> SM_HD void store_as(void* p, int64_t i, Dt d, S v) {
  switch (d) {
    case Dt::f32: static_cast<float*>(p)[i] = float(v); break;
    case Dt::f64: static_cast<double*>(p)[i] = double(v); break;
    case Dt::f16: static_cast<c10::Half*>(p)[i] = c10::Half(float(v)); break;
    default: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(float(v)); break;
  }
}

// v rounded to dtype d and back (what a cast to d and back to S gives).
template <typename S> SM_HD S round_to(Dt d, S v) {
  switch (d) {
    case Dt::f32: return S(float(v));
    case Dt::f64: return v;
    case Dt::f16: return S(float(c10::Half(float(v))));
    default: return S(float(c10::BFloat16(float(v))));
  }
}

struct NormRow {
  const void *hidden, *residual, *weight;  // residual: nullptr when absent
  void *normed, *residual_out;
  Dt hidden_dt, residual_dt, weight_dt, promoted_dt, residual_out_dt;
  int64_t rows, channels, length;  // length > 1: channel-major [B, C, L] memory
  bool channel_major;
  double eps;

  // Element offset of (row, channel), the same in every tensor of the call.
  SM_HD int64_t offset(int64_t row, int64_t c) const {
    if (!channel_major) return row * channels + c;
    const int64_t b = row / length, t = row - b * length;
    return (b * channels + c) * length + t;
  }
  // r = hidden + residual at offset o, in the promoted dtype.
  template <typename S> SM_HD S sum_at(int64_t o) const {
    const S h = load_as<S>(hidden, o, hidden_dt);
    return residual ? round_to(promoted_dt, h + load_as<S>(residual, o, residual_dt)) : h;
  }
};

// Combines 32 partial sums as the xor butterfly (v_i += v_{i^s}, s = 16 .. 1) leaves them in lane 0.
template <typename S> SM_HD S butterfly_total(S (&p)[kNormLanes]) {
  for (int s = kNormLanes / 2; s >= 1; s /= 2)
    for (int i = 0; i < s; ++i) p[i] = p[i] + p[i + s];
  return p[0];
}

template <typename S> SM_HD S inverse_rms(const NormRow& a, S sum_sq) {
  return S(1) / sqrt(sum_sq / S(a.channels) + S(a.eps));
}

// The whole row by one thread (the CPU kernel): writes residual_out and normed.
template <typename S> void norm_row_serial(const NormRow& a, int64_t row) {
  S p[kNormLanes] = {};
  const int64_t C = a.channels;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = a.offset(row, c);
    const S r = a.sum_at<S>(o);
    store_as(a.residual_out, o, a.residual_out_dt, r);
    const S x = round_to(a.weight_dt, r);
    p[c % kNormLanes] += x * x;
  }
  const S inv = inverse_rms(a, butterfly_total(p));
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = a.offset(row, c);
    const S x = round_to(a.weight_dt, a.sum_at<S>(o));
    store_as(a.normed, o, a.weight_dt, x * inv * load_as<S>(a.weight, c, a.weight_dt));
  }
}

inline Dt dt_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dt::f32;
    case at::kDouble: return Dt::f64;
    case at::kHalf: return Dt::f16;
    default: return Dt::bf16;  // prepare_add_rms_norm admits only these four
  }
}

inline NormRow make_norm_row(const NormIO& io, double eps) {
  NormRow a{};
  a.hidden = io.hidden.data_ptr();
  a.residual = io.residual.defined() ? io.residual.data_ptr() : nullptr;
  a.weight = io.weight.data_ptr();
  a.normed = io.normed.data_ptr();
  a.residual_out = io.residual_out.data_ptr();
  a.hidden_dt = dt_code(io.hidden.scalar_type());
  a.residual_dt = io.residual.defined() ? dt_code(io.residual.scalar_type()) : a.hidden_dt;
  a.weight_dt = dt_code(io.weight.scalar_type());
  a.promoted_dt = dt_code(io.promoted);
  a.residual_out_dt = dt_code(io.residual_out.scalar_type());
  a.rows = io.rows, a.channels = io.channels, a.length = io.length;
  a.channel_major = io.channel_major;
  a.eps = eps;
  return a;
}

}  // namespace statemamba::ops
