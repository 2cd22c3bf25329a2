#pragma once
// The recurrent state of a Mamba model, as plain values you can hold, copy, fork, move and save.
//
//   MambaInferenceState  one layer:  conv_state [batch, d_inner, d_conv-1]  (the last d_conv-1 conv
//                                    inputs, oldest first) and ssm_state [batch, d_inner, d_state]
//   MambaStackState      every layer, plus how many tokens the stack has consumed and which model
//                        config it belongs to
//
// Tensors are float32 (float64 for a float64 model) on any device. The structs hold tensors the
// way at::Tensor does: copying a struct shares them, clone() copies them. A model's forward() and
// the state's reset() replace its tensors (so gradients can flow through them); a model's step()
// writes them in place, which is why a snapshot you want to keep must be a clone().
//
// This layer knows nothing of the modules: it takes a StateSpec, which MambaConfig (mamba/config.h)
// converts to implicitly, so `MambaStackState::zeros(config, batch)` and `state.validate_for(model->options)`
// read as expected.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace statemamba {

// What a model's state looks like.
struct StateSpec {
  int64_t n_layer = 0, d_inner = 0, d_conv = 0, d_state = 0;
  std::string fingerprint;  // names the model architecture; states of another one are refused
  std::string config;       // that architecture as JSON, saved with the state for people and tools
};

struct MambaInferenceState {
  at::Tensor conv_state;  // [batch, d_inner, d_conv-1]
  at::Tensor ssm_state;   // [batch, d_inner, d_state]

  static MambaInferenceState zeros(const StateSpec& spec, int64_t batch, at::Device device = at::kCPU,
                                   at::ScalarType dtype = at::kFloat);

  int64_t batch() const { return ssm_state.size(0); }
  at::Device device() const { return ssm_state.device(); }
  at::ScalarType dtype() const { return ssm_state.scalar_type(); }

  MambaInferenceState clone() const;
  MambaInferenceState detach() const;
  // dtype: float32 or float64. Like at::Tensor::to, returns the same tensors when nothing changes.
  MambaInferenceState to(at::Device device, std::optional<at::ScalarType> dtype = std::nullopt) const;
  // Zeroes the rows b where mask[b] (bool [batch]) is true: those sequences start afresh.
  void reset(const at::Tensor& mask);
  // Rows indices[0], indices[1], ... (int64 [k], repeats allowed): forks and reorders sequences.
  MambaInferenceState select(const at::Tensor& indices) const;
  MambaInferenceState index_select(const at::Tensor& indices) const { return select(indices); }
  // Rows of every state, in order.
  static MambaInferenceState cat(const std::vector<MambaInferenceState>& states);

  // Throws c10::Error naming the tensor, the expected and the actual shape/dtype/device unless
  // this state fits a layer of `spec` (any batch; float32 or float64; one device).
  void validate_for(const StateSpec& spec) const;
  // ...and has this batch, device and dtype: what a forward pass over such inputs needs.
  void validate_for(const StateSpec& spec, int64_t batch, at::Device device, at::ScalarType dtype) const;
};

struct MambaStackState {
  std::vector<MambaInferenceState> layers;
  int64_t tokens = 0;       // positions consumed since zeros(); resets do not rewind it
  std::string fingerprint;  // StateSpec::fingerprint of the model it belongs to
  std::string config;       // StateSpec::config

  static MambaStackState zeros(const StateSpec& spec, int64_t batch, at::Device device = at::kCPU,
                               at::ScalarType dtype = at::kFloat);

  int64_t n_layer() const { return static_cast<int64_t>(layers.size()); }
  int64_t batch() const;
  at::Device device() const;
  at::ScalarType dtype() const;

  // As MambaInferenceState's, layer by layer.
  MambaStackState clone() const;
  MambaStackState detach() const;
  MambaStackState to(at::Device device, std::optional<at::ScalarType> dtype = std::nullopt) const;
  void reset(const at::Tensor& mask);
  MambaStackState select(const at::Tensor& indices) const;
  MambaStackState index_select(const at::Tensor& indices) const { return select(indices); }
  // All states must belong to one model; tokens becomes the largest of theirs.
  static MambaStackState cat(const std::vector<MambaStackState>& states);

  // Errors name the layer and tensor, and what was expected and found; a state of another
  // architecture (fingerprint) is refused even when its shapes fit.
  void validate_for(const StateSpec& spec) const;
  void validate_for(const StateSpec& spec, int64_t batch, at::Device device, at::ScalarType dtype) const;

  // Files, by extension, one layout in both: a group "layer_{i}" per layer holding conv_state and
  // ssm_state, and at the root format ("statemamba.MambaStackState"), format_version, n_layer,
  // tokens, fingerprint and config (a JSON string).
  //   .pt         a torch archive (nested archives; Python reads it with torch.jit.load)
  //   .h5, .hdf5  HDF5 groups, datasets and attributes (h5py reads it as is)
  // save() writes a temporary file beside `path` and renames it over `path`, so readers see the old
  // file or the new one, never half of one. load() returns CPU tensors in the saved dtype; with a
  // spec it also validates the state for that model. Unreadable, truncated, foreign or newer-format
  // files are c10::Errors that say which and name the file.
  static constexpr int64_t kFormatVersion = 1;
  void save(const std::string& path) const;
  static MambaStackState load(const std::string& path);
  static MambaStackState load(const std::string& path, const StateSpec& spec);
};

}  // namespace statemamba
