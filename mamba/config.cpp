#include "mamba/config.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cstdio>

namespace statemamba {
namespace {

using nlohmann::json;

// The fields that decide what the model computes and the shape of its state.
json architecture(const MambaConfig& c) {
  return {{"d_model", c.d_model()},
          {"n_layer", c.n_layer()},
          {"vocab_size", c.padded_vocab_size()},
          {"d_state", c.d_state()},
          {"d_conv", c.d_conv()},
          {"expand", c.expand()},
          {"dt_rank", c.resolved_dt_rank()},
          {"conv_bias", c.conv_bias()},
          {"bias", c.bias()},
          {"rms_norm", c.rms_norm()},
          {"norm_eps", c.norm_eps()},
          {"residual_in_fp32", c.residual_in_fp32()},
          {"tie_embeddings", c.tie_embeddings()}};
}

// FNV-1a, 64 bits: stable across platforms and builds, unlike std::hash.
std::string fnv1a_hex(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace

int64_t MambaConfig::padded_vocab_size() const {
  const int64_t m = std::max<int64_t>(1, pad_vocab_size_multiple());
  return (vocab_size() + m - 1) / m * m;
}

void MambaConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    TORCH_CHECK(v >= 1, "MambaConfig: ", name, " must be at least 1, got ", v);
  };
  positive("d_model", d_model());
  positive("n_layer", n_layer());
  positive("vocab_size", vocab_size());
  positive("d_state", d_state());
  positive("expand", expand());
  positive("dt_rank", resolved_dt_rank());
  positive("pad_vocab_size_multiple", pad_vocab_size_multiple());
  TORCH_CHECK(d_conv() >= 2 && d_conv() <= 8, "MambaConfig: d_conv must be between 2 and 8 (what the conv ops take), got ",
              d_conv());
  TORCH_CHECK(dt_min() > 0 && dt_min() <= dt_max(), "MambaConfig: need 0 < dt_min <= dt_max, got dt_min = ", dt_min(),
              ", dt_max = ", dt_max());
  TORCH_CHECK(dt_init_floor() > 0, "MambaConfig: dt_init_floor must be positive, got ", dt_init_floor());
  TORCH_CHECK(norm_eps() > 0, "MambaConfig: norm_eps must be positive, got ", norm_eps());
}

std::string MambaConfig::to_json() const {
  json j = architecture(*this);
  j["vocab_size"] = vocab_size();
  j["dt_rank"] = dt_rank() ? json(*dt_rank()) : json("auto");
  j["dt_min"] = dt_min();
  j["dt_max"] = dt_max();
  j["dt_init_floor"] = dt_init_floor();
  j["pad_vocab_size_multiple"] = pad_vocab_size_multiple();
  return j.dump();
}

MambaConfig MambaConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "MambaConfig::from_json: not JSON: ", e.what());
  }
  TORCH_CHECK(j.is_object(), "MambaConfig::from_json: expected a JSON object, got ", j.type_name());
  MambaConfig c(0, 0, 0);
  // Fields missing from the JSON keep their defaults; d_model, n_layer and vocab_size are required.
  auto read = [&](const char* key, auto& field, bool required) {
    if (!j.contains(key)) {
      TORCH_CHECK(!required, "MambaConfig::from_json: missing \"", key, "\"");
      return;
    }
    try {
      j.at(key).get_to(field);
    } catch (const json::exception& e) {
      TORCH_CHECK(false, "MambaConfig::from_json: \"", key, "\" has the wrong type: ", e.what());
    }
  };
  read("d_model", c.d_model(), true);
  read("n_layer", c.n_layer(), true);
  read("vocab_size", c.vocab_size(), true);
  read("d_state", c.d_state(), false);
  read("d_conv", c.d_conv(), false);
  read("expand", c.expand(), false);
  if (j.contains("dt_rank") && !(j["dt_rank"].is_string() && j["dt_rank"] == "auto")) {
    int64_t rank = 0;
    read("dt_rank", rank, true);
    c.dt_rank(rank);
  }
  read("dt_min", c.dt_min(), false);
  read("dt_max", c.dt_max(), false);
  read("dt_init_floor", c.dt_init_floor(), false);
  read("conv_bias", c.conv_bias(), false);
  read("bias", c.bias(), false);
  read("rms_norm", c.rms_norm(), false);
  read("norm_eps", c.norm_eps(), false);
  read("residual_in_fp32", c.residual_in_fp32(), false);
  read("pad_vocab_size_multiple", c.pad_vocab_size_multiple(), false);
  read("tie_embeddings", c.tie_embeddings(), false);
  c.validate();
  return c;
}

std::string MambaConfig::fingerprint() const { return fnv1a_hex(architecture(*this).dump()); }

StateSpec MambaConfig::state_spec() const {
  return {n_layer(), d_inner(), d_conv(), d_state(), fingerprint(), to_json()};
}

}  // namespace statemamba
