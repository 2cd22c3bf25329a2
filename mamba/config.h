#pragma once
// MambaConfig: the hyperparameters of a Mamba language model, in LibTorch's Options style:
//   auto config = MambaConfig(/*d_model=*/768, /*n_layer=*/24, /*vocab_size=*/50277).d_state(16);
// Defaults are mamba_ssm's (Mamba and MambaConfig).
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <string>

#include "state/state.h"

namespace statemamba {

struct MambaConfig {
  MambaConfig(int64_t d_model, int64_t n_layer, int64_t vocab_size)
      : d_model_(d_model), n_layer_(n_layer), vocab_size_(vocab_size) {}

  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, n_layer);
  TORCH_ARG(int64_t, vocab_size);
  TORCH_ARG(int64_t, d_state) = 16;
  TORCH_ARG(int64_t, d_conv) = 4;
  TORCH_ARG(int64_t, expand) = 2;
  // Rank of the Δ projection; nullopt is mamba_ssm's "auto", ceil(d_model / 16).
  TORCH_ARG(std::optional<int64_t>, dt_rank) = std::nullopt;
  // Initial Δ: log-uniform in [dt_min, dt_max], floored at dt_init_floor.
  TORCH_ARG(double, dt_min) = 0.001;
  TORCH_ARG(double, dt_max) = 0.1;
  TORCH_ARG(double, dt_init_floor) = 1e-4;
  TORCH_ARG(bool, conv_bias) = true;
  TORCH_ARG(bool, bias) = false;  // of in_proj and out_proj
  TORCH_ARG(bool, rms_norm) = true;  // RMSNorm, else LayerNorm
  TORCH_ARG(double, norm_eps) = 1e-5;
  TORCH_ARG(bool, residual_in_fp32) = true;
  TORCH_ARG(int64_t, pad_vocab_size_multiple) = 8;
  TORCH_ARG(bool, tie_embeddings) = true;

 public:
  int64_t d_inner() const { return expand() * d_model(); }
  int64_t resolved_dt_rank() const { return dt_rank().value_or((d_model() + 15) / 16); }
  // vocab_size rounded up to a multiple of pad_vocab_size_multiple: the rows of the embedding
  // and of the logits.
  int64_t padded_vocab_size() const;

  // Throws c10::Error naming the first field out of range.
  void validate() const;

  // Every field, as a JSON object ("dt_rank": "auto" when unset).
  std::string to_json() const;
  static MambaConfig from_json(const std::string& json);

  // A short hash of the fields that shape the computation (not the initialisation ones), which
  // states carry to refuse being fed to another architecture.
  std::string fingerprint() const;

  // What this model's recurrent state looks like. Implicit, so the state API takes a config.
  StateSpec state_spec() const;
  operator StateSpec() const { return state_spec(); }  // NOLINT(google-explicit-constructor)
};

}  // namespace statemamba
