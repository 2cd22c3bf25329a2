#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace statemamba::ops {

// One decode step of the causal conv; `conv_state` [B, D, W-1] (oldest first) is shifted in place
// to hold x as its newest column. x: [B, D]; weight: [D, W]; bias: [D]; reset: [B] bool (forget the
// row's past inputs before the step). Returns y [B, D] in x's dtype. Equals causal_conv1d, L = 1.
at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state,
                                const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias = std::nullopt,
                                bool silu = false,
                                const std::optional<at::Tensor>& reset = std::nullopt);

}  // namespace statemamba::ops
