// Checkpoints: our safetensors reader/writer (including hostile files), load_pretrained in both the
// HF and mamba_ssm layouts against transformers' own outputs (tests/data/make_hf_fixtures.py), and
// save_pretrained round trips.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>

#include <sys/stat.h>

#include <caffe2/serialize/inline_container.h>

#include "mamba/checkpoint.h"
#include "mamba/safetensors.h"
#include "support/expect_error.h"
#include "support/tmpdir.h"

namespace statemamba {
namespace {

using nlohmann::json;
using test::expect_error;
using test::TempDir;

const bool kSingleThreaded = (at::set_num_threads(1), true);

// STATEMAMBA_TEST_DATA (set by CTest), else the source tree beside this file when the compiler
// gave its absolute path.
std::string data_dir(const std::string& name) {
  const char* env = std::getenv("STATEMAMBA_TEST_DATA");
  if (env && *env) return std::string(env) + "/" + name;
  const std::string source = __FILE__;
  if (source.empty() || source[0] != '/')
    throw std::runtime_error("set STATEMAMBA_TEST_DATA to the repository's tests/data directory");
  return source.substr(0, source.rfind('/')) + "/data/" + name;
}

using statemamba::test::read_text;

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

void copy_file(const std::string& from, const std::string& to) { write_file(to, read_text(from)); }

// ---- transformers' reference outputs -------------------------------------------------------------

struct Reference {
  at::Tensor input_ids, logits;
  std::vector<at::Tensor> conv_states, ssm_states;  // conv: HF's with the oldest column dropped
  at::Tensor greedy_ids;                            // [batch, new tokens]
};

Reference load_reference(const std::string& fixture) {
  auto t = safetensors::load(data_dir(fixture) + "/reference.safetensors");
  const json j = json::parse(read_text(data_dir(fixture) + "/reference.json"));
  Reference r;
  r.input_ids = t.at("input_ids");
  r.logits = t.at("logits");
  for (int i = 0; t.count("ssm_state." + std::to_string(i)); ++i) {
    r.conv_states.push_back(t.at("conv_state." + std::to_string(i)));
    r.ssm_states.push_back(t.at("ssm_state." + std::to_string(i)));
  }
  std::vector<int64_t> flat;
  for (const auto& row : j.at("greedy_ids"))
    for (const auto& id : row) flat.push_back(id.get<int64_t>());
  r.greedy_ids = at::tensor(flat, at::kLong).view({static_cast<int64_t>(j.at("greedy_ids").size()), -1});
  return r;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// max |a - ref| in units of the reference's own size (at least 1): float32 sums of values of size s
// differ by rounding ~s·1e-7 per term between matmul algorithms (MKL's blocking depends on the
// shapes and thread count), so an absolute bound alone fails on large states.
double scaled_diff(const at::Tensor& a, const at::Tensor& ref) {
  return max_abs_diff(a, ref) / std::max(1.0, ref.to(at::kDouble).abs().max().item<double>());
}

// Our logits, final states and greedy continuation (forward over the prompt, then step()) against
// transformers'.
void expect_matches_transformers(MambaLMHeadModel& model, const Reference& ref, double tolerance) {
  torch::NoGradGuard no_grad;
  const int64_t batch = ref.input_ids.size(0);
  auto state = MambaStackState::zeros(model->options, batch, at::kCPU, model->state_dtype());
  const at::Tensor logits = model->forward(ref.input_ids, &state);
  EXPECT_LT(scaled_diff(logits, ref.logits), tolerance) << "logits";
  ASSERT_EQ(state.n_layer(), static_cast<int64_t>(ref.ssm_states.size()));
  for (int64_t i = 0; i < state.n_layer(); ++i) {
    EXPECT_LT(scaled_diff(state.layers[i].conv_state, ref.conv_states[i]), tolerance) << "conv_state " << i;
    EXPECT_LT(scaled_diff(state.layers[i].ssm_state, ref.ssm_states[i]), tolerance) << "ssm_state " << i;
  }
  std::vector<at::Tensor> generated;
  at::Tensor next = logits.select(1, -1).argmax(-1);
  for (int64_t n = 0; n < ref.greedy_ids.size(1); ++n) {
    generated.push_back(next);
    if (n + 1 < ref.greedy_ids.size(1)) next = model->step(next, state).argmax(-1);
  }
  const at::Tensor ours = at::stack(generated, 1);
  EXPECT_TRUE(at::equal(ours, ref.greedy_ids)) << "greedy ids\nours:\n" << ours << "\ntransformers:\n" << ref.greedy_ids;
}

void expect_same_parameters(MambaLMHeadModel& a, MambaLMHeadModel& b) {
  const auto pa = a->named_parameters(), pb = b->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& p : pa) {
    ASSERT_TRUE(pb.contains(p.key())) << p.key();
    const auto& q = pb[p.key()];
    EXPECT_EQ(p.value().scalar_type(), q.scalar_type()) << p.key();
    EXPECT_TRUE(p.value().sizes() == q.sizes() && at::equal(p.value(), q)) << p.key() << " differs";
  }
}

// ---- load_pretrained against transformers ---------------------------------------------------------

TEST(Checkpoint, HfTiedMatchesTransformers) {
  auto model = load_pretrained(data_dir("tiny-mamba-hf"));
  EXPECT_TRUE(model->options.tie_embeddings());
  EXPECT_FALSE(model->lm_head);
  expect_matches_transformers(model, load_reference("tiny-mamba-hf"), 1e-4);
}

TEST(Checkpoint, HfShardedUntiedMatchesTransformers) {
  auto model = load_pretrained(data_dir("tiny-mamba-hf-sharded"));
  EXPECT_FALSE(model->options.tie_embeddings());
  ASSERT_TRUE(model->lm_head);
  EXPECT_FALSE(at::equal(model->lm_head->weight.narrow(0, 0, 10), model->backbone->embeddings->weight.narrow(0, 0, 10)));
  expect_matches_transformers(model, load_reference("tiny-mamba-hf-sharded"), 1e-4);
}

TEST(Checkpoint, MambaSsmLayoutLoadsTheSameWeights) {
  auto ssm = load_pretrained(data_dir("tiny-mamba-ssm"));
  auto hf = load_pretrained(data_dir("tiny-mamba-hf"));
  expect_same_parameters(ssm, hf);
  expect_matches_transformers(ssm, load_reference("tiny-mamba-hf"), 1e-4);
}

TEST(Checkpoint, ConfigsMapOntoMambaConfig) {
  const auto hf = read_pretrained_config(data_dir("tiny-mamba-hf"));
  EXPECT_EQ(hf.d_model(), 32);
  EXPECT_EQ(hf.n_layer(), 2);
  EXPECT_EQ(hf.d_state(), 8);
  EXPECT_EQ(hf.d_conv(), 4);
  EXPECT_EQ(hf.resolved_dt_rank(), 2);
  EXPECT_EQ(hf.padded_vocab_size(), 104);  // HF's vocab_size is the row count
  EXPECT_TRUE(hf.tie_embeddings());
  EXPECT_TRUE(hf.rms_norm());

  const auto sharded = read_pretrained_config(data_dir("tiny-mamba-hf-sharded"));
  EXPECT_EQ(sharded.d_model(), 24);
  EXPECT_EQ(sharded.n_layer(), 3);
  EXPECT_EQ(sharded.d_state(), 4);
  EXPECT_EQ(sharded.d_conv(), 3);
  EXPECT_EQ(sharded.resolved_dt_rank(), 3);
  EXPECT_TRUE(sharded.bias());
  EXPECT_FALSE(sharded.conv_bias());
  EXPECT_DOUBLE_EQ(sharded.norm_eps(), 1e-6);
  EXPECT_EQ(sharded.vocab_size(), 100);
  EXPECT_EQ(sharded.padded_vocab_size(), 100);  // not padded to 104: the checkpoint has 100 rows
  EXPECT_FALSE(sharded.tie_embeddings());

  const auto ssm = read_pretrained_config(data_dir("tiny-mamba-ssm"));
  EXPECT_EQ(ssm.vocab_size(), 100);  // mamba_ssm's: the tokenizer's size, padded to 8 in the model
  EXPECT_EQ(ssm.padded_vocab_size(), 104);
  EXPECT_EQ(ssm.d_state(), 8);
  EXPECT_EQ(ssm.fingerprint(), hf.fingerprint());  // the same architecture
}

TEST(Checkpoint, LoadsInOtherDtypes) {
  const auto ref = load_reference("tiny-mamba-hf");
  auto fp64 = load_pretrained(data_dir("tiny-mamba-hf"), {at::kCPU, at::kDouble});
  for (const auto& p : fp64->parameters()) EXPECT_EQ(p.scalar_type(), at::kDouble);
  expect_matches_transformers(fp64, ref, 1e-4);

  auto bf16 = load_pretrained(data_dir("tiny-mamba-hf"), {at::kCPU, at::kBFloat16});
  auto fp32 = load_pretrained(data_dir("tiny-mamba-hf"));
  for (const auto& p : bf16->named_parameters()) {
    EXPECT_EQ(p.value().scalar_type(), at::kBFloat16) << p.key();
    EXPECT_TRUE(at::equal(p.value(), fp32->named_parameters()[p.key()].to(at::kBFloat16))) << p.key();
  }
}

TEST(Checkpoint, RefusesNonFloatDtypes) {
  for (auto dtype : {at::kInt, at::kLong, at::kBool, at::kComplexFloat})
    expect_error([&] { load_pretrained(data_dir("tiny-mamba-hf"), {at::kCPU, dtype}); },
                 {"LoadOptions.dtype", "float32, float64, bfloat16 or float16"});
}

TEST(Checkpoint, LoadsOnCuda) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto model = load_pretrained(data_dir("tiny-mamba-hf"), {at::Device(at::kCUDA, 0), at::kFloat});
  for (const auto& p : model->parameters()) EXPECT_TRUE(p.is_cuda());
  model->to(at::kCPU);
  expect_matches_transformers(model, load_reference("tiny-mamba-hf"), 1e-4);
}

// ---- save_pretrained ------------------------------------------------------------------------------

TEST(Checkpoint, SaveLoadRoundTripIsBitExact) {
  for (const char* fixture : {"tiny-mamba-hf", "tiny-mamba-hf-sharded", "tiny-mamba-ssm"}) {
    SCOPED_TRACE(fixture);
    auto model = load_pretrained(data_dir(fixture));
    TempDir dir;
    const std::string out = dir.file("saved/nested");  // created as needed
    save_pretrained(model, out);
    auto again = load_pretrained(out);
    expect_same_parameters(model, again);
    EXPECT_EQ(again->options.fingerprint(), model->options.fingerprint());
    EXPECT_EQ(again->options.padded_vocab_size(), model->options.padded_vocab_size());

    // transformers' names and config fields.
    const auto tensors = safetensors::load(out + "/model.safetensors");
    EXPECT_EQ(tensors.count("lm_head.weight"), model->options.tie_embeddings() ? 0u : 1u);
    EXPECT_EQ(tensors.count("backbone.embeddings.weight"), 1u);
    EXPECT_EQ(safetensors::load_metadata(out + "/model.safetensors").at("format"), "pt");
    const json config = json::parse(read_text(out + "/config.json"));
    EXPECT_EQ(config.at("model_type"), "mamba");
    EXPECT_EQ(config.at("architectures"), json::array({"MambaForCausalLM"}));
    EXPECT_EQ(config.at("vocab_size"), model->options.padded_vocab_size());
    EXPECT_EQ(config.at("hidden_size"), model->options.d_model());
    EXPECT_EQ(config.at("num_hidden_layers"), model->options.n_layer());
    EXPECT_EQ(config.at("intermediate_size"), model->options.d_inner());
    EXPECT_EQ(config.at("time_step_rank"), model->options.resolved_dt_rank());
    EXPECT_EQ(config.at("tie_word_embeddings"), model->options.tie_embeddings());
    EXPECT_EQ(config.at("torch_dtype"), "float32");
  }
}

TEST(Checkpoint, SaveLeavesOnlyItsFiles) {
  auto model = load_pretrained(data_dir("tiny-mamba-hf"));
  TempDir dir;
  save_pretrained(model, dir.path());
  save_pretrained(model, dir.path());  // over an earlier save
  auto entries = dir.entries();
  std::sort(entries.begin(), entries.end());
  EXPECT_EQ(entries, (std::vector<std::string>{"config.json", "model.safetensors"}));
}

TEST(Checkpoint, SaveRoundTripInBfloat16) {
  auto model = load_pretrained(data_dir("tiny-mamba-hf-sharded"), {at::kCPU, at::kBFloat16});
  TempDir dir;
  save_pretrained(model, dir.path());
  EXPECT_EQ(json::parse(read_text(dir.file("config.json"))).at("torch_dtype"), "bfloat16");
  EXPECT_EQ(safetensors::load(dir.file("model.safetensors")).at("backbone.norm_f.weight").scalar_type(), at::kBFloat16);
  auto again = load_pretrained(dir.path(), {at::kCPU, at::kBFloat16});
  expect_same_parameters(model, again);
}

// With STATEMAMBA_KEEP_SAVED=DIR, leaves our saves of the fixtures in DIR/tiny-mamba-hf (read from
// the mamba_ssm layout) and DIR/tiny-mamba-hf-sharded (untied, vocab 100) for
//   make_hf_fixtures.py --check-saved DIR
// which loads each with transformers and compares its logits to the fixture's reference.
TEST(Checkpoint, KeepSavedForTransformers) {
  const char* keep = std::getenv("STATEMAMBA_KEEP_SAVED");
  if (!keep || !*keep) GTEST_SKIP() << "set STATEMAMBA_KEEP_SAVED=DIR to keep saved models for the Python check";
  auto from_ssm = load_pretrained(data_dir("tiny-mamba-ssm"));
  save_pretrained(from_ssm, std::string(keep) + "/tiny-mamba-hf");
  auto untied = load_pretrained(data_dir("tiny-mamba-hf-sharded"));
  save_pretrained(untied, std::string(keep) + "/tiny-mamba-hf-sharded");
}

TEST(Checkpoint, SaveRefusesWhatTransformersCannotHold) {
  MambaLMHeadModel layer_norm(MambaConfig(16, 1, 32).rms_norm(false));
  TempDir dir;
  expect_error([&] { save_pretrained(layer_norm, dir.path()); }, {"RMSNorm only", "rms_norm = false"});
  EXPECT_TRUE(dir.entries().empty());

  MambaLMHeadModel mixed(MambaConfig(16, 1, 32));
  mixed->backbone->norm_f->weight.set_data(mixed->backbone->norm_f->weight.to(at::kDouble));
  expect_error([&] { save_pretrained(mixed, dir.path()); }, {"backbone.norm_f.weight", "Double"});

  MambaLMHeadModel fine(MambaConfig(16, 1, 32));
  write_file(dir.file("a-file"), "x");
  expect_error([&] { save_pretrained(fine, dir.file("a-file/sub")); }, {"save_pretrained", "a-file"});
}

// ---- what load_pretrained refuses ---------------------------------------------------------------

// A copy of a fixture's config with the weights given.
void write_checkpoint(const TempDir& dir, const std::string& fixture, const std::map<std::string, at::Tensor>& tensors) {
  copy_file(data_dir(fixture) + "/config.json", dir.file("config.json"));
  safetensors::save(dir.file("model.safetensors"), tensors);
}

TEST(Checkpoint, ReportsEveryMissingUnexpectedAndMisShapedTensorAtOnce) {
  auto tensors = safetensors::load(data_dir("tiny-mamba-hf") + "/model.safetensors");
  tensors.erase("backbone.layers.1.mixer.D");
  tensors.erase("backbone.norm_f.weight");
  tensors["backbone.layers.2.mixer.D"] = at::zeros({64});
  tensors["backbone.layers.0.mixer.A_log"] = at::zeros({64, 9});
  tensors["backbone.layers.0.mixer.x_proj.weight"] = at::zeros({18, 65});
  TempDir dir;
  write_checkpoint(dir, "tiny-mamba-hf", tensors);
  expect_error([&] { load_pretrained(dir.path()); },
               {dir.path(), "missing tensors (2)", "backbone.layers.1.mixer.D [64]", "backbone.norm_f.weight [32]",
                "unexpected tensors (1)", "backbone.layers.2.mixer.D [64]", "mis-shaped tensors (2)",
                "backbone.layers.0.mixer.A_log: expected [64, 8], got [64, 9]",
                "backbone.layers.0.mixer.x_proj.weight: expected [18, 64], got [18, 65]"});
}

TEST(Checkpoint, RefusesUntiedHeadUnderTiedConfigAndIntegerWeights) {
  auto tensors = safetensors::load(data_dir("tiny-mamba-hf") + "/model.safetensors");
  tensors["lm_head.weight"] = tensors.at("backbone.embeddings.weight") + 1;
  tensors["backbone.norm_f.weight"] = at::ones({32}, at::kLong);
  TempDir dir;
  write_checkpoint(dir, "tiny-mamba-hf", tensors);
  expect_error([&] { load_pretrained(dir.path()); },
               {"lm_head.weight differs from backbone.embeddings.weight", "ties them",
                "backbone.norm_f.weight: stored as Long, expected a floating-point type"});

  // The same head as the embedding (as mamba_ssm's state dicts list it) is fine.
  tensors["lm_head.weight"] = tensors.at("backbone.embeddings.weight");
  tensors["backbone.norm_f.weight"] = at::ones({32});
  write_checkpoint(dir, "tiny-mamba-hf", tensors);
  EXPECT_NO_THROW(load_pretrained(dir.path()));
}

TEST(Checkpoint, RefusesBothEmbeddingSpellings) {
  auto tensors = safetensors::load(data_dir("tiny-mamba-hf") + "/model.safetensors");
  tensors["backbone.embedding.weight"] = tensors.at("backbone.embeddings.weight");
  TempDir dir;
  write_checkpoint(dir, "tiny-mamba-hf", tensors);
  expect_error([&] { load_pretrained(dir.path()); }, {"backbone.embeddings.weight", "a second time"});
}

TEST(Checkpoint, DirectoryErrors) {
  TempDir dir;
  expect_error([&] { load_pretrained(dir.file("nope")); }, {"not a directory", "nope"});
  expect_error([&] { load_pretrained(dir.path()); }, {"has no config.json"});
  copy_file(data_dir("tiny-mamba-hf") + "/config.json", dir.file("config.json"));
  expect_error([&] { load_pretrained(dir.path()); },
               {"holds no weights", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"});
  write_file(dir.file("pytorch_model.bin.index.json"), "{}");
  expect_error([&] { load_pretrained(dir.path()); }, {"sharded pytorch_model", "not supported"});
  write_file(dir.file("pytorch_model.bin"), "not a zip archive at all");
  expect_error([&] { load_pretrained(dir.path()); }, {"pytorch_model.bin", "not a readable torch.save archive"});
  write_file(dir.file("model.safetensors"), std::string(4, '\0'));
  expect_error([&] { load_pretrained(dir.path()); }, {"model.safetensors", "truncated"});
}

// Edits a fixture's config.json and expects read_pretrained_config to refuse it.
void expect_config_error(const std::string& fixture, const std::function<void(json&)>& edit,
                         std::initializer_list<std::string> parts) {
  TempDir dir;
  json j = json::parse(read_text(data_dir(fixture) + "/config.json"));
  edit(j);
  write_file(dir.file("config.json"), j.dump());
  expect_error([&] { read_pretrained_config(dir.path()); }, parts);
}

TEST(Checkpoint, ConfigErrors) {
  expect_config_error("tiny-mamba-hf", [](json& j) { j["model_type"] = "mamba2"; }, {"model_type \"mamba2\""});
  expect_config_error("tiny-mamba-hf", [](json& j) { j["hidden_size"] = "32"; }, {"\"hidden_size\" has the wrong type"});
  expect_config_error("tiny-mamba-hf", [](json& j) { j.erase("num_hidden_layers"); }, {"no \"num_hidden_layers\""});
  expect_config_error("tiny-mamba-hf", [](json& j) { j["intermediate_size"] = 65; },
                      {"intermediate_size 65", "expand * hidden_size = 64"});
  expect_config_error("tiny-mamba-hf", [](json& j) { j["hidden_act"] = "gelu"; }, {"hidden_act \"gelu\""});
  expect_config_error("tiny-mamba-hf", [](json& j) { j["conv_kernel"] = 1; }, {"config.json", "d_conv"});
  expect_config_error("tiny-mamba-ssm", [](json& j) { j["ssm_cfg"]["layer"] = "Mamba2"; }, {"ssm_cfg.layer", "Mamba2"});
  expect_config_error("tiny-mamba-ssm", [](json& j) { j["ssm_cfg"]["headdim"] = 64; }, {"ssm_cfg.headdim", "not supported"});
  expect_config_error("tiny-mamba-ssm", [](json& j) { j["ssm_cfg"]["d_state"] = 2.5; }, {"\"ssm_cfg.d_state\" has the wrong type"});
  expect_config_error("tiny-mamba-ssm", [](json& j) { j["attn_layer_idx"] = {1}; }, {"attn_layer_idx"});
  expect_config_error("tiny-mamba-ssm", [](json& j) { j["d_intermediate"] = 128; }, {"d_intermediate = 128"});
  TempDir dir;
  write_file(dir.file("config.json"), "{\"d_model\": ");
  expect_error([&] { read_pretrained_config(dir.path()); }, {"config.json", "not valid JSON"});
}

// A copy of the sharded fixture whose index is edited.
void expect_index_error(const std::function<void(json&)>& edit, std::initializer_list<std::string> parts) {
  TempDir dir;
  const std::string src = data_dir("tiny-mamba-hf-sharded");
  for (const char* f : {"config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                        "model-00003-of-00003.safetensors"})
    copy_file(src + "/" + f, dir.file(f));
  json index = json::parse(read_text(src + "/model.safetensors.index.json"));
  edit(index);
  write_file(dir.file("model.safetensors.index.json"), index.dump());
  expect_error([&] { load_pretrained(dir.path()); }, parts);
}

TEST(Checkpoint, ShardIndexErrors) {
  expect_index_error([](json& j) { j["weight_map"]["backbone.norm_f.weight"] = "../../etc/passwd"; },
                     {"shard name '../../etc/passwd'", "file name in the directory"});
  expect_index_error([](json& j) { j["weight_map"]["backbone.norm_f.weight"] = "model-00009-of-00009.safetensors"; },
                     {"model-00009-of-00009.safetensors", "does not exist"});
  expect_index_error(
      [](json& j) {
        const std::string a = j["weight_map"]["backbone.embeddings.weight"], b = j["weight_map"]["lm_head.weight"];
        ASSERT_NE(a, b) << "the fixture should spread these over two shards";
        j["weight_map"]["lm_head.weight"] = a;
      },
      {"'lm_head.weight'", "which does not hold it"});
  expect_index_error([](json& j) { j["weight_map"].erase("backbone.layers.0.mixer.D"); },
                     {"holds 'backbone.layers.0.mixer.D'", "does not place there"});
  expect_index_error([](json& j) { j.erase("weight_map"); }, {"no \"weight_map\""});
}

// ---- pytorch_model.bin: our pickle reader against hand-made archives -------------------------------

// Protocol-2 pickle opcodes, enough to spell torch.save's state dicts (and break them).
struct Pickle {
  std::string bytes = "\x80\x02";
  Pickle& op(const std::string& o) { bytes += o; return *this; }
  Pickle& str(const std::string& v) {
    const uint32_t n = v.size();
    bytes += 'X';
    bytes.append(reinterpret_cast<const char*>(&n), 4);
    bytes += v;
    return *this;
  }
  Pickle& small_int(uint8_t v) { bytes += 'K'; bytes += char(v); return *this; }
  Pickle& global(const std::string& module, const std::string& name) { bytes += "c" + module + "\n" + name + "\n"; return *this; }
  // torch._utils._rebuild_tensor_v2(storage <key> of <numel> floats, offset, (size,), (stride,), False, OrderedDict())
  Pickle& tensor(const std::string& key, uint8_t numel, uint8_t offset, uint8_t size, uint8_t stride) {
    global("torch._utils", "_rebuild_tensor_v2").op("((").str("storage").global("torch", "FloatStorage").str(key).str("cpu");
    small_int(numel).op("tQ").small_int(offset).small_int(size).op("\x85").small_int(stride).op("\x85\x89");
    return global("collections", "OrderedDict").op(")Rt").op("R");
  }
};

// A torch.save-style zip: data.pkl plus float storages data/<key>.
void write_torch_zip(const std::string& path, const std::string& pickle, const std::map<std::string, std::vector<float>>& storages) {
  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  writer.writeRecord("byteorder", "little", 6);
  for (const auto& [key, values] : storages) writer.writeRecord("data/" + key, values.data(), values.size() * sizeof(float));
  writer.writeEndOfFile();
}

std::map<std::string, at::Tensor> load_bin(const TempDir& dir, const std::string& pickle,
                                           const std::map<std::string, std::vector<float>>& storages) {
  write_file(dir.file("config.json"), R"({"d_model": 16, "n_layer": 1, "vocab_size": 8})");
  write_torch_zip(dir.file("pytorch_model.bin"), pickle, storages);
  return read_pretrained_tensors(dir.path());
}

TEST(TorchBin, ReadsAStateDictWithSharedStoragesAndViews) {
  TempDir dir;
  Pickle p;
  p.global("collections", "OrderedDict").op(")R(");
  p.str("backbone.embedding.weight").tensor("0", 6, 0, 4, 1);  // renamed to backbone.embeddings.weight
  p.str("view").tensor("0", 6, 2, 2, 2);                       // elements 2 and 4 of the same storage
  p.op(std::string("r\xe8\x03\x00\x00", 5));                   // LONG_BINPUT 1000, as large state dicts use
  p.str("again").op(std::string("j\xe8\x03\x00\x00", 5));      // LONG_BINGET 1000: the view once more
  p.op("u");
  p.op("}(").str("version").small_int(1).op("u").op("b");     // BUILD with _metadata-like state
  p.op(".");
  const auto t = load_bin(dir, p.bytes, {{"0", {0, 1, 2, 3, 4, 5}}});
  ASSERT_EQ(t.size(), 3u);
  EXPECT_TRUE(at::equal(t.at("backbone.embeddings.weight"), at::tensor({0.f, 1.f, 2.f, 3.f})));
  EXPECT_TRUE(at::equal(t.at("view"), at::tensor({2.f, 4.f})));
  EXPECT_TRUE(at::equal(t.at("again"), at::tensor({2.f, 4.f})));
}

TEST(TorchBin, RefusesHostilePickles) {
  const std::map<std::string, std::vector<float>> one = {{"0", {1, 2, 3, 4}}};
  auto expect_bin_error = [&](const std::string& pickle, const std::map<std::string, std::vector<float>>& storages,
                              std::initializer_list<std::string> parts) {
    TempDir dir;
    expect_error([&] { load_bin(dir, pickle, storages); }, parts);
  };
  auto dict_with = [](const std::function<void(Pickle&)>& value) {
    Pickle p;
    p.op("}(").str("x");
    value(p);
    p.op("u.");
    return p.bytes;
  };
  // Code execution is not on the menu.
  expect_bin_error(Pickle().global("os", "system").str("echo hi").op("\x85R.").bytes, one, {"unsupported global os.system"});
  expect_bin_error(Pickle().op("}(").str("x").bytes, one, {"ends before STOP"});
  expect_bin_error(Pickle().op("\xff").bytes, one, {"unsupported pickle opcode 255"});
  expect_bin_error(Pickle().op("h\x07.").bytes, one, {"memo entry 7"});
  expect_bin_error(Pickle().op("0.").bytes, one, {"empty stack"});
  expect_bin_error(Pickle().op("](").op("l.").bytes, one, {"unsupported pickle opcode"});
  expect_bin_error(Pickle().op("].").bytes, one, {"must hold a state dict"});
  expect_bin_error(dict_with([](Pickle& p) { p.small_int(3); }), one, {"'x' is not a tensor"});
  expect_bin_error(dict_with([](Pickle& p) { p.tensor("0", 4, 0, 4, 1); }), {{"0", {1, 2}}},
                   {"storage '0' has 8 bytes, expected 4 elements"});
  expect_bin_error(dict_with([](Pickle& p) { p.tensor("1", 4, 0, 4, 1); }), one, {"storage '1' is missing"});
  expect_bin_error(dict_with([](Pickle& p) { p.tensor("0", 4, 3, 4, 1); }), one, {"does not fit its storage"});
  expect_bin_error(dict_with([](Pickle& p) {
                     p.global("torch._utils", "_rebuild_tensor_v2").op("((").str("storage").global("torch", "ComplexFloatStorage");
                     p.str("0").str("cpu").small_int(2).op("tQ").small_int(0).small_int(2).op("\x85").small_int(1).op("\x85\x89)t").op("R");
                   }),
                   one, {"unsupported storage type torch.ComplexFloatStorage"});
}

// ---- safetensors ----------------------------------------------------------------------------------

TEST(Safetensors, RoundTripsEveryDtypeAndShape) {
  std::map<std::string, at::Tensor> tensors = {
      {"f64", at::randn({2, 3}, at::kDouble)},
      {"f32", at::randn({4}, at::kFloat)},
      {"f16", at::randn({3, 1, 2}).to(at::kHalf)},
      {"bf16", at::randn({5}).to(at::kBFloat16)},
      {"i64", at::randint(-1000, 1000, {3}, at::kLong)},
      {"i32", at::randint(-1000, 1000, {2, 2}, at::kInt)},
      {"i16", at::randint(-1000, 1000, {3}, at::kShort)},
      {"i8", at::randint(-100, 100, {7}, at::kChar)},
      {"u8", at::randint(0, 255, {5}, at::kByte)},
      {"bool", at::randint(0, 2, {9}, at::kByte).to(at::kBool)},
      {"scalar", at::tensor(2.5, at::kFloat).reshape({})},
      {"empty", at::zeros({0, 3}, at::kFloat)},
      {"strided", at::arange(12, at::kFloat).view({3, 4}).t()},  // saved contiguous
  };
  TempDir dir;
  safetensors::save(dir.file("t.safetensors"), tensors, {{"format", "pt"}, {"note", "héllo"}});
  const auto back = safetensors::load(dir.file("t.safetensors"));
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    const auto& b = back.at(name);
    EXPECT_EQ(b.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(b.sizes(), t.sizes()) << name;
    EXPECT_TRUE(at::equal(b, t)) << name;
  }
  const auto metadata = safetensors::load_metadata(dir.file("t.safetensors"));
  EXPECT_EQ(metadata.at("format"), "pt");
  EXPECT_EQ(metadata.at("note"), "héllo");

  // The header: padded to 8 bytes, as the reference writer's, with the names and dtypes it uses.
  const std::string bytes = read_text(dir.file("t.safetensors"));
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  const json header = json::parse(bytes.substr(8, header_len));
  EXPECT_EQ(header.at("bf16").at("dtype"), "BF16");
  EXPECT_EQ(header.at("bool").at("dtype"), "BOOL");
  EXPECT_EQ(header.at("__metadata__").at("format"), "pt");
  // Each tensor starts at a multiple of its item size.
  for (const auto& [name, t] : tensors)
    EXPECT_EQ(header.at(name).at("data_offsets")[0].get<uint64_t>() % t.element_size(), 0u) << name;
}

TEST(Safetensors, SaveRefusesWhatItCannotHold) {
  TempDir dir;
  expect_error([&] { safetensors::save(dir.file("c.safetensors"), {{"c", at::zeros({2}, at::kComplexFloat)}}); },
               {"tensor 'c'", "ComplexFloat"});
  expect_error([&] { safetensors::save(dir.file("u.safetensors"), {{"u", at::Tensor()}}); }, {"tensor 'u'", "undefined"});
  expect_error([&] { safetensors::save(dir.file("m.safetensors"), {{"__metadata__", at::zeros({1})}}); },
               {"__metadata__"});
  expect_error([&] { safetensors::save(dir.file("no/such/dir.safetensors"), {{"x", at::zeros({1})}}); },
               {"cannot create", "no/such/dir.safetensors"});
  EXPECT_TRUE(dir.entries().empty());  // nothing half-written
}

// A file from a header (JSON text as given, unpadded) and data bytes.
std::string safetensors_bytes(const std::string& header, const std::string& data, int64_t header_len = -1) {
  const uint64_t n = header_len < 0 ? header.size() : static_cast<uint64_t>(header_len);
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &n, 8);
  return bytes + header + data;
}

void expect_load_error(const std::string& bytes, std::initializer_list<std::string> parts) {
  TempDir dir;
  const std::string path = dir.file("hostile.safetensors");
  write_file(path, bytes);
  expect_error([&] { safetensors::load(path); }, parts);
  // Every message names the file.
  expect_error([&] { safetensors::load(path); }, {path});
}

TEST(Safetensors, HostileFiles) {
  const std::string f32x2 = std::string(8, '\1');  // two float32s
  const std::string ok_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  {  // the well-formed base case loads
    TempDir dir;
    write_file(dir.file("ok.safetensors"), safetensors_bytes(ok_header, f32x2));
    EXPECT_EQ(safetensors::load(dir.file("ok.safetensors")).at("a").numel(), 2);
  }
  expect_load_error("", {"truncated", "0 bytes"});
  expect_load_error(std::string(5, '\0'), {"truncated", "5 bytes"});
  expect_load_error(safetensors_bytes(ok_header, f32x2, 10'000), {"truncated", "header length 10000", "past the end"});
  expect_load_error(safetensors_bytes(ok_header, f32x2, 200'000'000), {"header length 200000000", "limit"});
  expect_load_error(safetensors_bytes(ok_header, f32x2, int64_t(1) << 62), {"limit"});
  expect_load_error(safetensors_bytes("{\"a\": [", ""), {"not valid JSON"});
  expect_load_error(safetensors_bytes("[1, 2]", ""), {"JSON object"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", f32x2),
                    {"tensor 'a'", "unsupported dtype \"F33\""});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f32x2),
                    {"tensor 'a'", "need 12 bytes", "hold 8"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", f32x2),
                    {"tensor 'a'", "past the end of the data"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                      f32x2),
                    {"overlaps"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f32x2),
                    {"bytes 0..4", "belong to no tensor"});
  expect_load_error(safetensors_bytes(ok_header, f32x2 + "xx"), {"last 2 bytes", "belong to no tensor"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", f32x2),
                    {"end before they begin"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-1,7]}})", f32x2),
                    {"non-negative integers"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f32x2),
                    {"shape entries must be non-negative"});
  expect_load_error(
      safetensors_bytes(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", f32x2),
      {"too large"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2]}})", f32x2), {"missing \"data_offsets\""});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                      f32x2),
                    {"names \"a\" twice"});
  expect_load_error(safetensors_bytes(R"({"a":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", "\1\7"),
                    {"BOOL", "byte 7"});
  expect_load_error(safetensors_bytes(R"({"__metadata__":{"n":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                      f32x2),
                    {"metadata \"n\" must be a string"});
}

TEST(Safetensors, TruncatedRealFile) {
  const std::string bytes = read_text(data_dir("tiny-mamba-hf") + "/model.safetensors");
  expect_load_error(bytes.substr(0, bytes.size() - 100), {"past the end of the data", "truncated"});
  expect_load_error(bytes.substr(0, 100), {"header length", "past the end of the file"});
}

TEST(Safetensors, MissingFile) {
  expect_error([] { safetensors::load("/nonexistent/x.safetensors"); }, {"cannot open", "/nonexistent/x.safetensors"});
  TempDir dir;
  expect_error([&] { safetensors::load(dir.path()); }, {"not a regular file"});
}

}  // namespace
}  // namespace statemamba
