#pragma once
// CudaGraphDecoder: MambaLMHeadModel::step() for one fixed batch, captured once into a CUDA graph
// and replayed per token, so that decoding is not bound by kernel launches.
//
//   CudaGraphDecoder decoder(model, /*batch=*/1);  // model on a CUDA device; state starts at zero
//   decoder.set_state(prompt_state);               // optional: continue after a prefill
//   at::Tensor logits = decoder.step(ids);         // ids int64 [batch] → [batch, padded vocab]
//   MambaStackState now = decoder.state();         // a copy
//
// The decoder holds the state (its own static copy; step() advances it in place) and the input,
// reset and logits buffers the graph reads and writes. step() returns the logits buffer itself:
// the next step() overwrites it, so clone what you keep. Replays run on the current CUDA stream.
// The model's parameters are read where they lay at construction: do not move, reload or replace
// them (e.g. model->to()) while the decoder lives; their values may change (load_state_dict's copy_).
// Results equal model->step() on the same state and inputs to float rounding (the kernels are the
// same; cuBLAS may pick another algorithm under capture).
//
// Needs a build with CUDA (STATEMAMBA_WITH_CUDA) and the model on a CUDA device; otherwise the
// constructor throws a c10::Error saying which.
#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>

#include "mamba/modules.h"
#include "state/state.h"

namespace statemamba {

class CudaGraphDecoder {
 public:
  CudaGraphDecoder(MambaLMHeadModel model, int64_t batch);
  ~CudaGraphDecoder();
  CudaGraphDecoder(CudaGraphDecoder&&) noexcept;
  CudaGraphDecoder& operator=(CudaGraphDecoder&&) noexcept;

  // One token per row: ids int64 [batch] (any device); reset bool [batch] starts the marked rows
  // afresh before this token, as model->step(ids, state, reset). Returns the logits buffer.
  at::Tensor step(const at::Tensor& input_ids, const std::optional<at::Tensor>& reset = std::nullopt);

  MambaStackState state() const;                 // a copy of the held state
  void set_state(const MambaStackState& state);  // validated for the model and batch, copied in
  void reset_state();                            // every row back to zero, tokens 0

  int64_t batch() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace statemamba
