#pragma once
// autograd::Function::apply takes optional tensors as they are (an undefined at::Tensor argument
// would make it throw "tensor does not have a device"), but saved variables must be tensors: absent
// optionals are saved as undefined tensors and turn back into optionals for the backward call.
#include <ATen/core/Tensor.h>
#include <optional>

namespace statemamba::ops {
inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }
inline std::optional<at::Tensor> or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
}  // namespace statemamba::ops
