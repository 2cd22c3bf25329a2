#pragma once
// The statemamba operators, callable from C++ (these functions) and from Python
// (torch.ops.statemamba.<name> after torch.ops.load_library on libstatemamba.so).
//
// Shapes: batch B, channels D (= d_inner), state size N (= d_state), length L, conv width W.
// State tensors are float32 (float64 when the inputs are float64).
// A reset mask marks episode starts: where reset[b, t] is true, row b forgets everything before t.
#include "ops/add_rms_norm.h"
#include "ops/add_rms_norm_linear.h"
#include "ops/causal_conv1d.h"
#include "ops/causal_conv1d_update.h"
#include "ops/mamba_mixer_step.h"
#include "ops/selective_scan.h"
#include "ops/selective_state_update.h"
#include "ops/small_batch_linear.h"
