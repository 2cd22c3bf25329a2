#include "rl/kernels.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace statemamba::rl {

namespace {
void check(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape, at::Device device,
           const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (as the first argument), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}
}  // namespace

MemoryStepOut delayed_memory_step(at::Tensor& phase, at::Tensor& lengths, at::Tensor& graded, at::Tensor& bits, at::Tensor& obs,
                                  const at::Tensor& actions, const at::Tensor& fresh, const at::Tensor& noise,
                                  int64_t next_length) {
  constexpr const char* op = "delayed_memory_step";
  TORCH_CHECK(phase.defined() && phase.dim() == 1, op, ": phase must be [N], got ",
              phase.defined() ? phase.sizes() : at::IntArrayRef{});
  TORCH_CHECK(bits.defined() && bits.dim() == 2, op, ": bits must be [N, k]");
  const int64_t n = phase.size(0), k = bits.size(1);
  const at::Device device = phase.device();
  check(phase, "phase", at::kLong, {n}, device, op);
  check(lengths, "lengths", at::kLong, {n}, device, op);
  check(graded, "graded", at::kBool, {n}, device, op);
  check(bits, "bits", at::kFloat, {n, k}, device, op);
  check(obs, "obs", at::kFloat, {n, k + 2}, device, op);
  check(actions, "actions", at::kLong, {n}, device, op);
  check(fresh, "fresh", at::kFloat, {n, k}, device, op);
  if (noise.defined()) check(noise, "noise", at::kFloat, {n, k}, device, op);
  TORCH_CHECK(next_length >= 2, op, ": the episode length must be at least 2, got ", next_length);
  TORCH_CHECK(k >= 1 && k <= 30, op, ": k (bits) must be in [1, 30], got ", k);

  const auto bool_opts = phase.options().dtype(at::kBool);
  MemoryStepOut out{at::empty_like(obs), at::empty({n}, obs.options()), at::empty({n}, bool_opts),
                    at::empty({n}, bool_opts), at::empty({n}, bool_opts), at::empty({n}, bool_opts)};
  if (device.is_cpu()) {
    detail::delayed_memory_step_cpu(phase, lengths, graded, bits, obs, actions, fresh, noise, next_length, out);
  } else {
#ifdef STATEMAMBA_WITH_CUDA
    TORCH_CHECK(device.is_cuda(), op, ": tensors must be on the CPU or a CUDA device, got ", device);
    detail::delayed_memory_step_cuda(phase, lengths, graded, bits, obs, actions, fresh, noise, next_length, out);
#else
    TORCH_CHECK(false, op, ": tensors on ", device, " need a build with CUDA");
#endif
  }
  return out;
}

at::Tensor categorical_from_uniform(const at::Tensor& logits, const at::Tensor& u) {
  constexpr const char* op = "categorical_from_uniform";
  TORCH_CHECK(logits.defined() && logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be [N, A] with A >= 1, got ",
              logits.defined() ? logits.sizes() : at::IntArrayRef{});
  const int64_t n = logits.size(0);
  TORCH_CHECK(logits.scalar_type() == at::kFloat, op, ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits' rows must be contiguous (stride 1 along A), got strides ",
              logits.strides());
  check(u, "u", at::kFloat, {n}, logits.device(), op);
  at::Tensor actions = at::empty({n}, logits.options().dtype(at::kLong));
  if (n == 0) return actions;
  if (logits.is_cpu()) {
    detail::categorical_from_uniform_cpu(logits, u, actions);
  } else {
#ifdef STATEMAMBA_WITH_CUDA
    TORCH_CHECK(logits.is_cuda(), op, ": tensors must be on the CPU or a CUDA device, got ", logits.device());
    detail::categorical_from_uniform_cuda(logits, u, actions);
#else
    TORCH_CHECK(false, op, ": tensors on ", logits.device(), " need a build with CUDA");
#endif
  }
  return actions;
}

}  // namespace statemamba::rl
