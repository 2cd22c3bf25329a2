// CPU kernel of mamba_mixer_step: the separate ops, so that Mamba::step on the CPU computes what it
// did before the fused CUDA kernels existed, bit for bit.
#include <torch/library.h>

#include "ops/mamba_mixer_step.h"

namespace statemamba::ops {

TORCH_LIBRARY_IMPL(statemamba, CPU, m) { m.impl("mamba_mixer_step", &mamba_mixer_step_unfused); }

}  // namespace statemamba::ops
