#include "state/state.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <sstream>

namespace statemamba {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  return o.str() + ']';
}

void check_dtype(at::ScalarType dtype, const char* what) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, what,
              ": state dtype must be float32 or float64 (float64 only for float64 models), got ", dtype);
}

at::Tensor bool_mask(const at::Tensor& mask, int64_t batch, at::Device device, const char* what) {
  TORCH_CHECK(mask.defined() && mask.scalar_type() == at::kBool && mask.dim() == 1 && mask.size(0) == batch,
              what, ": argument 'mask' must be bool [batch] = [", batch, "], got ",
              mask.defined() ? c10::toString(mask.scalar_type()) : "undefined", " ",
              mask.defined() ? shape_str(mask.sizes()) : "");
  return mask.to(device);
}

at::Tensor row_indices(const at::Tensor& indices, int64_t batch, at::Device device, const char* what) {
  TORCH_CHECK(indices.defined() && indices.dim() == 1 &&
                  (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt),
              what, ": argument 'indices' must be an int64 [k] tensor of rows, got ",
              indices.defined() ? c10::toString(indices.scalar_type()) : "undefined", " ",
              indices.defined() ? shape_str(indices.sizes()) : "");
  if (indices.numel() > 0) {
    const int64_t lo = indices.min().item<int64_t>(), hi = indices.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < batch, what, ": argument 'indices' selects row ", lo < 0 ? lo : hi,
                " of a batch of ", batch);
  }
  return indices.to(device, at::kLong);
}

// One layer's checks; `where` prefixes messages ("MambaStackState layer 2").
void check_layer(const MambaInferenceState& s, const StateSpec& spec, const std::string& where) {
  TORCH_CHECK(s.conv_state.defined() && s.ssm_state.defined(), where, ": conv_state or ssm_state is undefined");
  const int64_t batch = s.ssm_state.dim() > 0 ? s.ssm_state.size(0) : -1;
  auto check_shape = [&](const char* name, const at::Tensor& t, int64_t cols, const char* layout) {
    const std::vector<int64_t> want{batch, spec.d_inner, cols};
    TORCH_CHECK(t.sizes().vec() == want, where, ": ", name, " has shape ", shape_str(t.sizes()),
                ", expected ", layout, " = ", shape_str(want));
  };
  check_shape("ssm_state", s.ssm_state, spec.d_state, "[batch, d_inner, d_state]");
  check_shape("conv_state", s.conv_state, spec.d_conv - 1, "[batch, d_inner, d_conv-1]");
  check_dtype(s.ssm_state.scalar_type(), where.c_str());
  TORCH_CHECK(s.conv_state.scalar_type() == s.ssm_state.scalar_type(), where, ": conv_state is ",
              s.conv_state.scalar_type(), " but ssm_state is ", s.ssm_state.scalar_type());
  TORCH_CHECK(s.conv_state.device() == s.ssm_state.device(), where, ": conv_state is on ", s.conv_state.device(),
              " but ssm_state is on ", s.ssm_state.device());
}

void check_fits(const MambaInferenceState& s, int64_t batch, at::Device device, at::ScalarType dtype,
                const std::string& where) {
  TORCH_CHECK(s.batch() == batch, where, ": state has batch ", s.batch(), " but the input has batch ", batch);
  TORCH_CHECK(s.device() == device, where, ": state is on ", s.device(), " but the input is on ", device,
              " (move it with state.to(device))");
  TORCH_CHECK(s.dtype() == dtype, where, ": state is ", s.dtype(), " but this model needs ", dtype,
              " state (float32, or float64 for a float64 model)");
}

// Where two configs (JSON objects) differ, as "rms_norm (state: true, model: false)"; both whole
// when either is not a JSON object.
std::string config_difference(const std::string& state, const std::string& model) {
  using nlohmann::json;
  const json a = json::parse(state, nullptr, /*allow_exceptions=*/false);
  const json b = json::parse(model, nullptr, /*allow_exceptions=*/false);
  if (!a.is_object() || !b.is_object()) return "state config " + state + ", model config " + model;
  std::string out;
  auto describe = [](const json& j, const std::string& key) { return j.contains(key) ? j[key].dump() : "absent"; };
  json keys = a;
  keys.update(b);
  for (const auto& [key, unused] : keys.items()) {
    if (a.contains(key) && b.contains(key) && a[key] == b[key]) continue;
    out += (out.empty() ? "" : ", ") + key + " (state: " + describe(a, key) + ", model: " + describe(b, key) + ")";
  }
  return out.empty() ? "no field (the fingerprints differ all the same)" : out;
}

template <typename F>
MambaStackState map_layers(const MambaStackState& s, F f) {
  MambaStackState out{{}, s.tokens, s.fingerprint, s.config};
  out.layers.reserve(s.layers.size());
  for (const auto& layer : s.layers) out.layers.push_back(f(layer));
  return out;
}

}  // namespace

// ---- MambaInferenceState -------------------------------------------------------------------------

MambaInferenceState MambaInferenceState::zeros(const StateSpec& spec, int64_t batch, at::Device device,
                                               at::ScalarType dtype) {
  check_dtype(dtype, "MambaInferenceState::zeros");
  TORCH_CHECK(batch >= 0, "MambaInferenceState::zeros: batch must be >= 0, got ", batch);
  const auto opts = at::TensorOptions().device(device).dtype(dtype);
  return {at::zeros({batch, spec.d_inner, spec.d_conv - 1}, opts), at::zeros({batch, spec.d_inner, spec.d_state}, opts)};
}

MambaInferenceState MambaInferenceState::clone() const { return {conv_state.clone(), ssm_state.clone()}; }

MambaInferenceState MambaInferenceState::detach() const { return {conv_state.detach(), ssm_state.detach()}; }

MambaInferenceState MambaInferenceState::to(at::Device device, std::optional<at::ScalarType> dtype) const {
  const auto d = dtype.value_or(this->dtype());
  check_dtype(d, "MambaInferenceState::to");
  return {conv_state.to(device, d), ssm_state.to(device, d)};
}

void MambaInferenceState::reset(const at::Tensor& mask) {
  // Out of place, so that a state inside an autograd graph stays differentiable.
  const auto m = bool_mask(mask, batch(), device(), "MambaInferenceState::reset").view({-1, 1, 1});
  conv_state = conv_state.masked_fill(m, 0);
  ssm_state = ssm_state.masked_fill(m, 0);
}

MambaInferenceState MambaInferenceState::select(const at::Tensor& indices) const {
  const auto idx = row_indices(indices, batch(), device(), "MambaInferenceState::select");
  return {conv_state.index_select(0, idx), ssm_state.index_select(0, idx)};
}

MambaInferenceState MambaInferenceState::cat(const std::vector<MambaInferenceState>& states) {
  TORCH_CHECK(!states.empty(), "MambaInferenceState::cat: no states given");
  std::vector<at::Tensor> conv, ssm;
  for (size_t i = 0; i < states.size(); ++i) {
    const auto& s = states[i];
    const auto& first = states[0];
    TORCH_CHECK(s.device() == first.device() && s.dtype() == first.dtype(), "MambaInferenceState::cat: state ", i,
                " is ", s.dtype(), " on ", s.device(), " but state 0 is ", first.dtype(), " on ", first.device());
    TORCH_CHECK(s.ssm_state.sizes().slice(1) == first.ssm_state.sizes().slice(1) &&
                    s.conv_state.sizes().slice(1) == first.conv_state.sizes().slice(1),
                "MambaInferenceState::cat: state ", i, " has ssm_state ", shape_str(s.ssm_state.sizes()),
                " and conv_state ", shape_str(s.conv_state.sizes()), " but state 0 has ",
                shape_str(first.ssm_state.sizes()), " and ", shape_str(first.conv_state.sizes()));
    conv.push_back(s.conv_state);
    ssm.push_back(s.ssm_state);
  }
  return {at::cat(conv, 0), at::cat(ssm, 0)};
}

void MambaInferenceState::validate_for(const StateSpec& spec) const { check_layer(*this, spec, "MambaInferenceState"); }

void MambaInferenceState::validate_for(const StateSpec& spec, int64_t batch, at::Device device,
                                       at::ScalarType dtype) const {
  validate_for(spec);
  check_fits(*this, batch, device, dtype, "MambaInferenceState");
}

// ---- MambaStackState -----------------------------------------------------------------------------

MambaStackState MambaStackState::zeros(const StateSpec& spec, int64_t batch, at::Device device,
                                       at::ScalarType dtype) {
  TORCH_CHECK(spec.n_layer >= 1, "MambaStackState::zeros: spec.n_layer must be >= 1, got ", spec.n_layer);
  MambaStackState s{{}, 0, spec.fingerprint, spec.config};
  for (int64_t i = 0; i < spec.n_layer; ++i) s.layers.push_back(MambaInferenceState::zeros(spec, batch, device, dtype));
  return s;
}

int64_t MambaStackState::batch() const {
  TORCH_CHECK(!layers.empty(), "MambaStackState: the state has no layers");
  return layers[0].batch();
}

at::Device MambaStackState::device() const {
  TORCH_CHECK(!layers.empty(), "MambaStackState: the state has no layers");
  return layers[0].device();
}

at::ScalarType MambaStackState::dtype() const {
  TORCH_CHECK(!layers.empty(), "MambaStackState: the state has no layers");
  return layers[0].dtype();
}

MambaStackState MambaStackState::clone() const {
  return map_layers(*this, [](const MambaInferenceState& l) { return l.clone(); });
}

MambaStackState MambaStackState::detach() const {
  return map_layers(*this, [](const MambaInferenceState& l) { return l.detach(); });
}

MambaStackState MambaStackState::to(at::Device device, std::optional<at::ScalarType> dtype) const {
  return map_layers(*this, [&](const MambaInferenceState& l) { return l.to(device, dtype); });
}

void MambaStackState::reset(const at::Tensor& mask) {
  for (auto& layer : layers) layer.reset(mask);
}

MambaStackState MambaStackState::select(const at::Tensor& indices) const {
  const auto idx = row_indices(indices, batch(), device(), "MambaStackState::select");
  return map_layers(*this, [&](const MambaInferenceState& l) { return l.select(idx); });
}

MambaStackState MambaStackState::cat(const std::vector<MambaStackState>& states) {
  TORCH_CHECK(!states.empty(), "MambaStackState::cat: no states given");
  const auto& first = states[0];
  MambaStackState out{{}, 0, first.fingerprint, first.config};
  for (size_t i = 0; i < states.size(); ++i) {
    TORCH_CHECK(states[i].fingerprint == first.fingerprint && states[i].n_layer() == first.n_layer(),
                "MambaStackState::cat: state ", i, " (", states[i].n_layer(), " layers, model ",
                states[i].fingerprint, ") belongs to another model than state 0 (", first.n_layer(),
                " layers, model ", first.fingerprint, ")");
    out.tokens = std::max(out.tokens, states[i].tokens);
  }
  for (int64_t l = 0; l < first.n_layer(); ++l) {
    std::vector<MambaInferenceState> rows;
    for (const auto& s : states) rows.push_back(s.layers[l]);
    out.layers.push_back(MambaInferenceState::cat(rows));
  }
  return out;
}

void MambaStackState::validate_for(const StateSpec& spec) const {
  TORCH_CHECK(n_layer() == spec.n_layer, "MambaStackState: the state has ", n_layer(),
              " layers but the model has ", spec.n_layer);
  for (int64_t i = 0; i < n_layer(); ++i) {
    const std::string where = "MambaStackState layer " + std::to_string(i);
    check_layer(layers[i], spec, where);
    if (i == 0) continue;
    // Every layer advances the same sequences, so they must agree on rows, device and dtype.
    TORCH_CHECK(layers[i].batch() == batch(), where, ": batch ", layers[i].batch(), " but layer 0 has ", batch());
    TORCH_CHECK(layers[i].device() == device(), where, ": on ", layers[i].device(), " but layer 0 is on ", device());
    TORCH_CHECK(layers[i].dtype() == dtype(), where, ": ", layers[i].dtype(), " but layer 0 is ", dtype());
  }
  TORCH_CHECK(fingerprint.empty() || spec.fingerprint.empty() || fingerprint == spec.fingerprint,
              "MambaStackState: the state belongs to another model (fingerprint ", fingerprint, ", not ",
              spec.fingerprint, "); the configs differ in ", config_difference(config, spec.config));
}

void MambaStackState::validate_for(const StateSpec& spec, int64_t batch, at::Device device,
                                   at::ScalarType dtype) const {
  validate_for(spec);
  check_fits(layers[0], batch, device, dtype, "MambaStackState");
}

}  // namespace statemamba
