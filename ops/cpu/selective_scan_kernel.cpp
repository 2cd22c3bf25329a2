// CPU selective scan: one sequential pass per (batch, channel) row, rows in parallel.
// Inputs are converted once to the state dtype (float32, or float64) so the recurrence and its
// accumulation run at state precision whatever the input dtype. The per-step state update is
// ssm_row.h's, shared with the decode kernel; the row loops are built for AVX2 and baseline x86-64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/args.h"
#include "ops/cpu/ssm_row.h"
#include "ops/math.h"

namespace statemamba::ops {
namespace {

// Checkpoint spacing for the backward pass: it stores the state every kChunk steps and recomputes
// the steps in between, so memory is O(L/kChunk + kChunk) per row rather than O(L).
constexpr int64_t kChunk = 64;

struct ScanInputs {
  at::Tensor u, delta, A, Bt, Ct, D, z, bias, h0, reset;  // Bt, Ct: [batch, L, N]
};

ScanInputs prepare(const ScanDims& dims, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                   const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset) {
  const auto acc = dims.state_dtype;
  auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  ScanInputs in;
  in.u = as_acc(u);
  in.delta = as_acc(delta);
  in.A = as_acc(A);
  in.Bt = B.to(acc).transpose(1, 2).contiguous();
  in.Ct = C.to(acc).transpose(1, 2).contiguous();
  if (D) in.D = as_acc(*D);
  if (z) in.z = as_acc(*z);
  if (delta_bias) in.bias = as_acc(*delta_bias);
  if (initial_state) in.h0 = as_acc(*initial_state);
  if (reset) in.reset = reset->contiguous();
  return in;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The inputs' base pointers, fetched once per call: data_ptr() checks dtype and storage each time,
// which costs as much as the scan itself when rows are short (L = 1 in an RL rollout).
template <typename T>
struct ScanPointers {
  const T *u, *delta, *A, *Bt, *Ct, *D, *z, *bias, *h0;
  const bool* reset;
  explicit ScanPointers(const ScanInputs& in)
      : u(in.u.data_ptr<T>()), delta(in.delta.data_ptr<T>()), A(in.A.data_ptr<T>()), Bt(in.Bt.data_ptr<T>()),
        Ct(in.Ct.data_ptr<T>()), D(ptr_or_null<T>(in.D)), z(ptr_or_null<T>(in.z)), bias(ptr_or_null<T>(in.bias)),
        h0(ptr_or_null<T>(in.h0)), reset(in.reset.defined() ? in.reset.data_ptr<bool>() : nullptr) {}
};

// Raw pointers of one (batch b, channel d) row.
template <typename T>
struct Row {
  const T *u, *delta, *A, *Bt, *Ct, *z, *h0;
  const bool* reset;
  T D, bias;
  bool softplus;
  int64_t L, N;

  Row(const ScanPointers<T>& in, const ScanDims& s, int64_t b, int64_t d, bool softplus_)
      : softplus(softplus_), L(s.seqlen), N(s.dstate) {
    const int64_t row = b * s.dim + d;
    u = in.u + row * L;
    delta = in.delta + row * L;
    A = in.A + d * N;
    Bt = in.Bt + b * L * N;
    Ct = in.Ct + b * L * N;
    z = in.z ? in.z + row * L : nullptr;
    h0 = in.h0 ? in.h0 + row * N : nullptr;
    reset = in.reset ? in.reset + b * L : nullptr;
    D = in.D ? in.D[d] : T(0);
    bias = in.bias ? in.bias[d] : T(0);
  }
  T dt_raw(int64_t t) const { return delta[t] + bias; }
  T dt(int64_t t) const { return softplus ? ops::softplus(dt_raw(t)) : dt_raw(t); }
  bool resets(int64_t t) const { return reset && reset[t]; }
  // h <- exp(dt A) h + dt B_t u_t, with h zeroed first on a reset.
  SM_ALWAYS_INLINE void step(T* h, int64_t t) const { cpu::ssm_step(h, A, Bt + t * N, dt(t), u[t], resets(t), N); }
  void load_initial(T* h) const {
    if (h0) std::copy(h0, h0 + N, h);
    else std::fill(h, h + N, T(0));
  }
};

int64_t grain_for(const ScanDims& s) { return std::max<int64_t>(1, 32768 / (s.seqlen * s.dstate)); }

// Rows [begin, end) of the forward scan: y and the final state.
template <typename T>
SM_ALWAYS_INLINE void forward_rows(const ScanInputs& in, const ScanDims& s, bool softplus, const at::Tensor& y,
                                   const at::Tensor& final_state, int64_t begin, int64_t end) {
  const ScanPointers<T> p(in);
  T* const h_base = final_state.data_ptr<T>();
  T* const y_base = y.data_ptr<T>();
  for (int64_t row = begin; row < end; ++row) {
    const Row<T> r(p, s, row / s.dim, row % s.dim, softplus);
    T* h = h_base + row * s.dstate;
    T* out = y_base + row * s.seqlen;
    r.load_initial(h);
    for (int64_t t = 0; t < s.seqlen; ++t) {
      r.step(h, t);
      T acc = cpu::ssm_output(r.Ct + t * s.dstate, h, r.D, r.u[t], s.dstate);
      if (r.z) acc *= silu(r.z[t]);
      out[t] = acc;
    }
  }
}
SM_CPU_CLONES void forward_rows_f32(const ScanInputs& in, const ScanDims& s, bool softplus, const at::Tensor& y,
                                    const at::Tensor& final_state, int64_t begin, int64_t end) {
  forward_rows<float>(in, s, softplus, y, final_state, begin, end);
}
void forward_rows_f64(const ScanInputs& in, const ScanDims& s, bool softplus, const at::Tensor& y,
                      const at::Tensor& final_state, int64_t begin, int64_t end) {
  forward_rows<double>(in, s, softplus, y, final_state, begin, end);
}

std::tuple<at::Tensor, at::Tensor> selective_scan_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset) {
  const ScanDims s = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  const ScanInputs in = prepare(s, u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  auto y = at::empty({s.batch, s.dim, s.seqlen}, u.options().dtype(s.state_dtype));
  auto final_state = at::empty({s.batch, s.dim, s.dstate}, u.options().dtype(s.state_dtype));
  at::parallel_for(0, s.batch * s.dim, grain_for(s), [&](int64_t begin, int64_t end) {
    if (s.state_dtype == at::kDouble) forward_rows_f64(in, s, delta_softplus, y, final_state, begin, end);
    else forward_rows_f32(in, s, delta_softplus, y, final_state, begin, end);
  });
  return {y.to(u.scalar_type()), final_state};
}

// The backward pass's inputs beyond the forward's, and its outputs (per row, or per channel group
// for dB and dC, which sum over channels).
struct BackwardOutputs {
  at::Tensor gy, gfinal, du, ddelta, dz, dA_rows, dD_rows, dbias_rows, dB_parts, dC_parts, dh0;
  int64_t groups;
};

// One step of the recurrence with Δ_t given (the backward computes it once per step): the same
// arithmetic as Row::step (cpu::ssm_step), so the recomputed states are the forward's to the bit;
// `a` receives e^(Δ_t·A), which the gradient needs too.
template <typename T>
SM_ALWAYS_INLINE void replay_step(const Row<T>& r, T* __restrict h, T* __restrict a, T dt, int64_t t) {
  const int64_t N = r.N;
  if (r.resets(t)) std::fill(h, h + N, T(0));
  const T dtu = dt * r.u[t];
  const T* __restrict Bv = r.Bt + t * N;
  cpu::decay(a, r.A, dt, N);
  for (int64_t n = 0; n < N; ++n) h[n] = a[n] * h[n] + dtu * Bv[n];
}

// The backward step's elementwise part: dh += gy·C, then the gradients w.r.t. C, B and A that
// read it. No pointer aliases another (restrict), so GCC vectorises it; no sum is reordered.
template <typename T>
SM_ALWAYS_INLINE void accumulate_state_grads(T* __restrict dh, T* __restrict dC, T* __restrict dB, T* __restrict dA,
                                             const T* __restrict C, const T* __restrict h,
                                             const T* __restrict prev, const T* __restrict a, T gy, T dtu, T dt,
                                             int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    dh[n] += gy * C[n];
    dC[n] += gy * h[n];
    dB[n] += dh[n] * dtu;
    dA[n] += dh[n] * prev[n] * a[n] * dt;
  }
}

// Tasks [begin, end) of the backward pass; a task is one batch entry's group of channels.
template <typename T>
SM_ALWAYS_INLINE void backward_tasks(const ScanInputs& in, const ScanDims& s, bool softplus_,
                                     const BackwardOutputs& o, int64_t begin, int64_t end) {
  const int64_t Dn = s.dim, N = s.dstate, L = s.seqlen, groups = o.groups;
  const int64_t per_group = (Dn + groups - 1) / groups;
  const int64_t nchunks = (L + kChunk - 1) / kChunk;
  std::vector<T> checkpoints(nchunks * N), states(kChunk * N), decays(kChunk * N), dh(N), prev(N), h(N);
  std::vector<T> dts(L), dt_grads(L);  // Δ_t after softplus, and dΔ_t/dΔ_raw
  const ScanPointers<T> p(in);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / groups, g = task % groups;
    T* dB = o.dB_parts.data_ptr<T>() + (b * groups + g) * L * N;
    T* dC = o.dC_parts.data_ptr<T>() + (b * groups + g) * L * N;
    for (int64_t d = g * per_group; d < std::min(Dn, (g + 1) * per_group); ++d) {
      const Row<T> r(p, s, b, d, softplus_);
      const int64_t row = b * Dn + d;
      const T* gyr = o.gy.data_ptr<T>() + row * L;
      T* du_r = o.du.data_ptr<T>() + row * L;
      T* ddelta_r = o.ddelta.data_ptr<T>() + row * L;
      T* dz_r = o.dz.defined() ? o.dz.data_ptr<T>() + row * L : nullptr;
      T* dA_r = o.dA_rows.data_ptr<T>() + row * N;
      T dD = 0, dbias = 0;
      // Δ once per step (softplus and its derivative are scalar libm calls), not once per pass.
      for (int64_t t = 0; t < L; ++t) {
        dts[t] = r.dt(t);
        dt_grads[t] = r.softplus ? softplus_grad(r.dt_raw(t)) : T(1);
      }
      // Pass 1: the state before each chunk.
      r.load_initial(h.data());
      for (int64_t t = 0; t < L; ++t) {
        if (t % kChunk == 0) std::copy(h.begin(), h.end(), checkpoints.begin() + (t / kChunk) * N);
        replay_step(r, h.data(), decays.data(), dts[t], t);
      }
      // Pass 2: chunks in reverse; dh is the gradient w.r.t. the state after step t.
      if (o.gfinal.defined()) std::copy_n(o.gfinal.data_ptr<T>() + row * N, N, dh.begin());
      else std::fill(dh.begin(), dh.end(), T(0));
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, t1 = std::min(L, t0 + kChunk);
        std::copy_n(checkpoints.begin() + c * N, N, h.begin());
        for (int64_t t = t0; t < t1; ++t) {
          replay_step(r, h.data(), decays.data() + (t - t0) * N, dts[t], t);
          std::copy(h.begin(), h.end(), states.begin() + (t - t0) * N);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const T* ht = states.data() + (t - t0) * N;
          const T* a = decays.data() + (t - t0) * N;
          // The state this step started from, after its reset.
          if (r.resets(t)) std::fill(prev.begin(), prev.end(), T(0));
          else if (t > t0) std::copy_n(states.data() + (t - t0 - 1) * N, N, prev.begin());
          else std::copy_n(checkpoints.begin() + c * N, N, prev.begin());
          const T* Bv = r.Bt + t * N;
          const T* Cv = r.Ct + t * N;
          T* dBv = dB + t * N;
          T* dCv = dC + t * N;
          T gyc = gyr[t];
          if (r.z) {
            const T yc = cpu::ssm_output(Cv, ht, r.D, r.u[t], N);
            dz_r[t] = gyc * yc * silu_grad(r.z[t]);
            gyc *= silu(r.z[t]);
          }
          dD += gyc * r.u[t];
          const T dt = dts[t], dtu = dt * r.u[t];
          // Elementwise over the state (vectorised), then the two sums over it in a fixed order.
          accumulate_state_grads(dh.data(), dCv, dBv, dA_r, Cv, ht, prev.data(), a, gyc, dtu, dt, N);
          T du_t = gyc * r.D, ddt = 0;
          for (int64_t n = 0; n < N; ++n) {
            du_t += dh[n] * dt * Bv[n];
            ddt += dh[n] * (Bv[n] * r.u[t] + prev[n] * a[n] * r.A[n]);
          }
          if (r.resets(t)) std::fill(dh.begin(), dh.end(), T(0));
          else for (int64_t n = 0; n < N; ++n) dh[n] *= a[n];
          const T ddt_raw = r.softplus ? ddt * dt_grads[t] : ddt;
          du_r[t] = du_t;
          ddelta_r[t] = ddt_raw;
          dbias += ddt_raw;
        }
      }
      std::copy(dh.begin(), dh.end(), o.dh0.data_ptr<T>() + row * N);
      o.dD_rows.data_ptr<T>()[row] = dD;
      o.dbias_rows.data_ptr<T>()[row] = dbias;
    }
  }
}
SM_CPU_CLONES void backward_tasks_f32(const ScanInputs& in, const ScanDims& s, bool softplus,
                                      const BackwardOutputs& o, int64_t begin, int64_t end) {
  backward_tasks<float>(in, s, softplus, o, begin, end);
}
void backward_tasks_f64(const ScanInputs& in, const ScanDims& s, bool softplus, const BackwardOutputs& o,
                        int64_t begin, int64_t end) {
  backward_tasks<double>(in, s, softplus, o, begin, end);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
selective_scan_backward_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                            const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                            bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                            const std::optional<at::Tensor>& reset) {
  const ScanDims s = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  TORCH_CHECK(grad_y.sizes() == u.sizes(), "selective_scan_backward: argument 'grad_y' must have the shape of u ",
              u.sizes(), ", got ", grad_y.sizes());
  const ScanInputs in = prepare(s, u, delta, A, B, C, D, z, delta_bias, initial_state, reset);
  const auto acc = s.state_dtype;
  const auto opts = u.options().dtype(acc);
  const at::Tensor gy = grad_y.to(acc).contiguous();
  at::Tensor gfinal;
  if (grad_final_state && grad_final_state->defined()) {
    TORCH_CHECK(grad_final_state->sizes() == at::IntArrayRef({s.batch, s.dim, s.dstate}),
                "selective_scan_backward: argument 'grad_final_state' must have shape [batch, d_inner, d_state]");
    gfinal = grad_final_state->to(acc).contiguous();
  }
  const int64_t Bn = s.batch, Dn = s.dim, N = s.dstate, L = s.seqlen;
  // dB and dC sum over channels: each task owns a group of channels and its own partial sums.
  const int64_t groups = std::clamp<int64_t>((2 * at::get_num_threads() + Bn - 1) / Bn, 1, Dn);
  auto du = at::empty({Bn, Dn, L}, opts), ddelta = at::empty({Bn, Dn, L}, opts);
  auto dz = z ? at::empty({Bn, Dn, L}, opts) : at::Tensor();
  auto dA_rows = at::zeros({Bn, Dn, N}, opts), dD_rows = at::zeros({Bn, Dn}, opts);
  auto dbias_rows = at::zeros({Bn, Dn}, opts);
  auto dB_parts = at::zeros({Bn, groups, L, N}, opts), dC_parts = at::zeros({Bn, groups, L, N}, opts);
  auto dh0 = at::empty({Bn, Dn, N}, opts);

  const BackwardOutputs out{gy, gfinal, du, ddelta, dz, dA_rows, dD_rows, dbias_rows, dB_parts, dC_parts, dh0, groups};
  at::parallel_for(0, Bn * groups, 1, [&](int64_t begin, int64_t end) {
    if (acc == at::kDouble) backward_tasks_f64(in, s, delta_softplus, out, begin, end);
    else backward_tasks_f32(in, s, delta_softplus, out, begin, end);
  });

  auto like = [](const at::Tensor& g, const at::Tensor& ref) { return g.to(ref.scalar_type()); };
  auto dB = like(dB_parts.sum(1).transpose(1, 2).contiguous(), B);
  auto dC = like(dC_parts.sum(1).transpose(1, 2).contiguous(), C);
  return {like(du, u),
          like(ddelta, delta),
          like(dA_rows.sum(0), A),
          dB,
          dC,
          D ? like(dD_rows.sum(0), *D) : at::Tensor(),
          z ? like(dz, *z) : at::Tensor(),
          delta_bias ? like(dbias_rows.sum(0), *delta_bias) : at::Tensor(),
          initial_state ? dh0.to(initial_state->scalar_type()) : at::Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(statemamba, CPU, m) {
  m.impl("selective_scan", &selective_scan_cpu);
  m.impl("selective_scan_backward", &selective_scan_backward_cpu);
}

}  // namespace statemamba::ops
