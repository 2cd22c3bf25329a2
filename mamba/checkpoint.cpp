// load_pretrained / save_pretrained: HF transformers' and mamba_ssm's checkpoint layouts mapped onto
// MambaLMHeadModel, whose parameter names are HF's (mamba_ssm differs only in
// backbone.embedding.weight).
#include "mamba/checkpoint.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <caffe2/serialize/inline_container.h>

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <vector>

#include "mamba/safetensors.h"

namespace statemamba {
namespace {

using nlohmann::json;

constexpr const char* kConfigFile = "config.json";
constexpr const char* kSafetensorsFile = "model.safetensors";
constexpr const char* kSafetensorsIndexFile = "model.safetensors.index.json";
constexpr const char* kTorchBinFile = "pytorch_model.bin";
constexpr const char* kEmbeddingName = "backbone.embeddings.weight";
constexpr const char* kMambaSsmEmbeddingName = "backbone.embedding.weight";
constexpr const char* kLmHeadName = "lm_head.weight";

// POSIX, not std::filesystem (libtorch's bundled copy crashes here).
bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string join(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string read_text(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, what, ": cannot open '", path, "': ", std::strerror(errno));
  std::ostringstream s;
  s << in.rdbuf();
  TORCH_CHECK(!in.bad(), what, ": cannot read '", path, "'");
  return s.str();
}

json read_json(const std::string& path, const char* what) {
  const std::string text = read_text(path, what);
  try {
    json j = json::parse(text);
    TORCH_CHECK(j.is_object(), what, ": '", path, "' must hold a JSON object, got ", j.type_name());
    return j;
  } catch (const json::exception& e) {
    TORCH_CHECK(false, what, ": '", path, "' is not valid JSON: ", e.what());
  }
}

// Reads one config.json field with a clear error for a wrong type; absent (or null) keeps `field`.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string path, std::string prefix = "")
      : j_(j), path_(std::move(path)), prefix_(std::move(prefix)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  template <typename T>
  void optional(const char* key, T& field) const {
    if (!has(key)) return;
    const json& v = j_.at(key);
    // JSON numbers: an integer field refuses 2.5; a float field takes 1 as 1.0.
    bool ok;
    if constexpr (std::is_same_v<T, bool>) ok = v.is_boolean();
    else if constexpr (std::is_integral_v<T>) ok = v.is_number_integer();
    else if constexpr (std::is_floating_point_v<T>) ok = v.is_number();
    else ok = v.is_string();
    TORCH_CHECK(ok, "read_pretrained_config: '", path_, "': \"", prefix_, key, "\" has the wrong type: ", v.dump());
    field = v.get<T>();
  }

  template <typename T>
  T required(const char* key) const {
    TORCH_CHECK(has(key), "read_pretrained_config: '", path_, "' has no \"", prefix_, key, "\"");
    T value{};
    optional(key, value);
    return value;
  }

  // "auto" or an integer.
  std::optional<int64_t> rank(const char* key) const {
    if (!has(key) || (j_.at(key).is_string() && j_.at(key) == "auto")) return std::nullopt;
    return required<int64_t>(key);
  }

 private:
  const json& j_;
  std::string path_, prefix_;
};

bool is_mamba_ssm_config(const json& j) { return j.contains("d_model"); }

// transformers' MambaConfig (configuration_mamba.py). Its vocab_size is the embedding's row count.
MambaConfig hf_config(const json& j, const std::string& path) {
  ConfigReader r(j, path);
  if (r.has("model_type")) {
    const auto type = r.required<std::string>("model_type");
    TORCH_CHECK(type == "mamba", "read_pretrained_config: '", path, "' has model_type \"", type,
                "\"; only \"mamba\" (Mamba-1) models load");
  }
  if (r.has("hidden_act")) {
    const auto act = r.required<std::string>("hidden_act");
    TORCH_CHECK(act == "silu", "read_pretrained_config: '", path, "' has hidden_act \"", act,
                "\"; the Mamba mixer here uses silu");
  }
  MambaConfig c(r.required<int64_t>("hidden_size"), r.required<int64_t>("num_hidden_layers"),
                r.required<int64_t>("vocab_size"));
  r.optional("state_size", c.d_state());
  r.optional("conv_kernel", c.d_conv());
  r.optional("expand", c.expand());
  c.dt_rank(r.rank("time_step_rank"));
  r.optional("time_step_min", c.dt_min());
  r.optional("time_step_max", c.dt_max());
  r.optional("time_step_floor", c.dt_init_floor());
  r.optional("use_conv_bias", c.conv_bias());
  r.optional("use_bias", c.bias());
  r.optional("layer_norm_epsilon", c.norm_eps());
  r.optional("residual_in_fp32", c.residual_in_fp32());
  c.tie_embeddings(true);  // PretrainedConfig's default
  r.optional("tie_word_embeddings", c.tie_embeddings());
  c.rms_norm(true);  // transformers' Mamba has RMSNorm only
  if (r.has("intermediate_size")) {
    const auto inner = r.required<int64_t>("intermediate_size");
    TORCH_CHECK(inner == c.expand() * c.d_model(), "read_pretrained_config: '", path, "': intermediate_size ", inner,
                " must be expand * hidden_size = ", c.expand() * c.d_model());
  }
  // HF's vocab_size is already the row count: keep its pad multiple only when it divides it, so
  // padded_vocab_size() == vocab_size.
  int64_t multiple = 1;
  r.optional("pad_vocab_size_multiple", multiple);
  c.pad_vocab_size_multiple(multiple >= 1 && c.vocab_size() % multiple == 0 ? multiple : 1);
  c.validate();
  return c;
}

// mamba_ssm's MambaConfig (models/config_mamba.py) with its ssm_cfg for the Mamba-1 mixer.
MambaConfig mamba_ssm_config(const json& j, const std::string& path) {
  ConfigReader r(j, path);
  MambaConfig c(r.required<int64_t>("d_model"), r.required<int64_t>("n_layer"), r.required<int64_t>("vocab_size"));
  int64_t d_intermediate = 0;
  r.optional("d_intermediate", d_intermediate);
  TORCH_CHECK(d_intermediate == 0, "read_pretrained_config: '", path, "': d_intermediate = ", d_intermediate,
              " (an MLP after each mixer) is not supported");
  TORCH_CHECK(!j.contains("attn_layer_idx") || j["attn_layer_idx"].is_null() || j["attn_layer_idx"].empty(),
              "read_pretrained_config: '", path, "': attention layers (attn_layer_idx) are not supported");
  r.optional("rms_norm", c.rms_norm());
  r.optional("residual_in_fp32", c.residual_in_fp32());
  r.optional("pad_vocab_size_multiple", c.pad_vocab_size_multiple());
  c.tie_embeddings(true);
  r.optional("tie_embeddings", c.tie_embeddings());
  c.norm_eps(1e-5);  // MixerModel's norm_epsilon; config.json does not carry it
  if (j.contains("ssm_cfg") && !j["ssm_cfg"].is_null()) {
    const json& ssm = j["ssm_cfg"];
    TORCH_CHECK(ssm.is_object(), "read_pretrained_config: '", path, "': ssm_cfg must be an object, got ", ssm.dump());
    // Keys that only affect initialisation or kernel choice are accepted; anything else would change
    // the computation in a way this model does not implement.
    static const std::set<std::string> known = {"layer",   "d_state", "d_conv",        "expand",    "dt_rank",
                                                "dt_min",  "dt_max",  "dt_init_floor", "dt_init",   "dt_scale",
                                                "conv_bias", "bias",  "use_fast_path", "layer_idx"};
    for (const auto& item : ssm.items())
      TORCH_CHECK(known.count(item.key()), "read_pretrained_config: '", path, "': ssm_cfg.", item.key(),
                  " is not supported");
    ConfigReader s(ssm, path, "ssm_cfg.");
    if (s.has("layer")) {
      const auto layer = s.required<std::string>("layer");
      TORCH_CHECK(layer == "Mamba1", "read_pretrained_config: '", path, "': ssm_cfg.layer is \"", layer,
                  "\"; only Mamba1 models load");
    }
    s.optional("d_state", c.d_state());
    s.optional("d_conv", c.d_conv());
    s.optional("expand", c.expand());
    c.dt_rank(s.rank("dt_rank"));
    s.optional("dt_min", c.dt_min());
    s.optional("dt_max", c.dt_max());
    s.optional("dt_init_floor", c.dt_init_floor());
    s.optional("conv_bias", c.conv_bias());
    s.optional("bias", c.bias());
  }
  c.validate();
  return c;
}

// A tensor under our name; duplicates (two shards, or both embedding spellings) are refused.
void add_tensor(std::map<std::string, at::Tensor>& out, std::string name, at::Tensor t, const std::string& source) {
  if (name == kMambaSsmEmbeddingName) name = kEmbeddingName;
  TORCH_CHECK(out.emplace(name, std::move(t)).second, "load_pretrained: '", source, "' holds tensor '", name,
              "' a second time (backbone.embedding.weight and backbone.embeddings.weight name the same tensor)");
}

std::map<std::string, at::Tensor> read_safetensors_index(const std::string& dir) {
  const std::string index_path = join(dir, kSafetensorsIndexFile);
  const json index = read_json(index_path, "load_pretrained");
  TORCH_CHECK(index.contains("weight_map") && index["weight_map"].is_object(), "load_pretrained: '", index_path,
              "' has no \"weight_map\" object");
  std::map<std::string, std::set<std::string>> names_by_file;
  for (const auto& item : index["weight_map"].items()) {
    TORCH_CHECK(item.value().is_string(), "load_pretrained: '", index_path, "': the file of '", item.key(),
                "' must be a string, got ", item.value().dump());
    const std::string file = item.value().get<std::string>();
    // Shards live beside the index: a path would let a hostile index read any file.
    TORCH_CHECK(!file.empty() && file.find('/') == std::string::npos && file != "." && file != "..",
                "load_pretrained: '", index_path, "': shard name '", file, "' must be a file name in the directory");
    names_by_file[file].insert(item.key());
  }
  for (const auto& entry : names_by_file)
    TORCH_CHECK(is_file(join(dir, entry.first)), "load_pretrained: '", index_path, "' names shard '", entry.first,
                "', which does not exist");
  std::map<std::string, at::Tensor> out;
  for (const auto& [file, names] : names_by_file) {
    const std::string shard = join(dir, file);
    auto tensors = safetensors::load(shard);
    for (const auto& name : names)
      TORCH_CHECK(tensors.count(name), "load_pretrained: '", index_path, "' places '", name, "' in '", file,
                  "', which does not hold it");
    for (auto& [name, t] : tensors) {
      TORCH_CHECK(names.count(name), "load_pretrained: shard '", shard, "' holds '", name, "', which '", index_path,
                  "' does not place there");
      add_tensor(out, name, std::move(t), shard);
    }
  }
  return out;
}

// ---- pytorch_model.bin -----------------------------------------------------------------------------
// torch.save's zip archive: data.pkl (a protocol-2 pickle) and data/<key> (each storage's bytes).
// torch::pickle_load cannot read state dicts (it turns collections.OrderedDict into None), so this
// is a small pickle machine that knows just the opcodes and globals torch.save emits for a dict of
// tensors. It builds data only and calls nothing: a hostile file gets an error, not execution.

struct PyObj;
using PyPtr = std::shared_ptr<PyObj>;
struct PyObj {
  enum class Kind { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kDict, kGlobal, kTensor, kMark };
  Kind kind = Kind::kNone;
  int64_t i = 0;
  double f = 0;
  std::string s;  // string; global "module.name"
  std::vector<PyPtr> items;                     // tuple, list
  std::vector<std::pair<PyPtr, PyPtr>> entries;  // dict, in order
  at::Tensor tensor;                            // storage (1-d) or tensor
};

PyPtr make(PyObj::Kind kind) {
  auto o = std::make_shared<PyObj>();
  o->kind = kind;
  return o;
}

std::optional<at::ScalarType> storage_dtype(const std::string& global) {
  static const std::map<std::string, at::ScalarType> types = {
      {"torch.DoubleStorage", at::kDouble}, {"torch.FloatStorage", at::kFloat}, {"torch.HalfStorage", at::kHalf},
      {"torch.BFloat16Storage", at::kBFloat16}, {"torch.LongStorage", at::kLong}, {"torch.IntStorage", at::kInt},
      {"torch.ShortStorage", at::kShort}, {"torch.CharStorage", at::kChar}, {"torch.ByteStorage", at::kByte},
      {"torch.BoolStorage", at::kBool}};
  const auto it = types.find(global);
  return it == types.end() ? std::nullopt : std::optional<at::ScalarType>(it->second);
}

class TorchPickleReader {
 public:
  TorchPickleReader(caffe2::serialize::PyTorchStreamReader& archive, std::string path)
      : archive_(archive), path_(std::move(path)) {
    auto [data, size] = archive_.getRecord("data.pkl");
    pickle_.assign(static_cast<const char*>(data.get()), size);
  }

  PyPtr run() {
    while (true) {
      const uint8_t op = byte();
      switch (op) {
        case 0x80: byte(); break;                 // PROTO
        case 0x95: bytes(8); break;               // FRAME
        case '(': push(make(PyObj::Kind::kMark)); break;
        case ')': push(make(PyObj::Kind::kTuple)); break;
        case 't': { auto t = make(PyObj::Kind::kTuple); t->items = pop_to_mark(); push(t); break; }
        case 0x85: case 0x86: case 0x87: {        // TUPLE1..3
          auto t = make(PyObj::Kind::kTuple);
          t->items.resize(op - 0x84);
          for (auto it = t->items.rbegin(); it != t->items.rend(); ++it) *it = pop();
          push(t);
          break;
        }
        case ']': push(make(PyObj::Kind::kList)); break;
        case '}': push(make(PyObj::Kind::kDict)); break;
        case 'a': { auto v = pop(); expect(top(), PyObj::Kind::kList, "APPEND")->items.push_back(v); break; }
        case 'e': { auto vs = pop_to_mark(); auto& l = expect(top(), PyObj::Kind::kList, "APPENDS")->items; l.insert(l.end(), vs.begin(), vs.end()); break; }
        case 's': { auto v = pop(); auto k = pop(); expect(top(), PyObj::Kind::kDict, "SETITEM")->entries.emplace_back(k, v); break; }
        case 'u': {
          auto vs = pop_to_mark();
          check(vs.size() % 2 == 0, "SETITEMS with an odd number of items");
          auto d = expect(top(), PyObj::Kind::kDict, "SETITEMS");
          for (size_t k = 0; k < vs.size(); k += 2) d->entries.emplace_back(vs[k], vs[k + 1]);
          break;
        }
        case 'X': string_of(le(4)); break;        // BINUNICODE
        case 0x8c: string_of(le(1)); break;       // SHORT_BINUNICODE
        case 'K': int_of(le(1)); break;
        case 'M': int_of(le(2)); break;
        case 'J': int_of(static_cast<int32_t>(le(4))); break;
        case 0x8a: {                              // LONG1: little-endian two's complement
          const size_t n = le(1);
          check(n <= 8, "LONG1 wider than 64 bits");
          const std::string b = bytes(n);
          uint64_t v = 0;
          for (size_t k = 0; k < n; ++k) v |= uint64_t(uint8_t(b[k])) << (8 * k);
          if (n > 0 && n < 8 && (uint8_t(b[n - 1]) & 0x80)) v |= ~uint64_t(0) << (8 * n);
          int_of(static_cast<int64_t>(v));
          break;
        }
        case 'G': {                               // BINFLOAT, big-endian
          const std::string b = bytes(8);
          uint64_t v = 0;
          for (int k = 0; k < 8; ++k) v = (v << 8) | uint8_t(b[k]);
          auto o = make(PyObj::Kind::kFloat);
          std::memcpy(&o->f, &v, 8);
          push(o);
          break;
        }
        case 'N': push(make(PyObj::Kind::kNone)); break;
        case 0x88: case 0x89: { auto o = make(PyObj::Kind::kBool); o->i = op == 0x88; push(o); break; }
        case 'c': {                               // GLOBAL "module\nname\n"
          auto g = make(PyObj::Kind::kGlobal);
          const std::string module = line();
          g->s = module + "." + line();
          push(g);
          break;
        }
        case 0x93: {                              // STACK_GLOBAL
          auto name = expect(pop(), PyObj::Kind::kString, "STACK_GLOBAL"), module = expect(pop(), PyObj::Kind::kString, "STACK_GLOBAL");
          auto g = make(PyObj::Kind::kGlobal);
          g->s = module->s + "." + name->s;
          push(g);
          break;
        }
        case 'q': memo_[le(1)] = top(); break;    // BINPUT
        case 'r': memo_[le(4)] = top(); break;    // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;  // MEMOIZE
        case 'h': push(memo(le(1))); break;       // BINGET
        case 'j': push(memo(le(4))); break;       // LONG_BINGET
        case '0': pop(); break;
        case '2': push(top()); break;
        case 'Q': push(persistent_load(pop())); break;
        case 'R': { auto args = expect(pop(), PyObj::Kind::kTuple, "REDUCE"); push(reduce(pop(), args->items)); break; }
        case 'b': {                               // BUILD: a state dict's _metadata; nothing we need
          pop();
          check(top()->kind == PyObj::Kind::kDict || top()->kind == PyObj::Kind::kTensor, "BUILD on an unexpected object");
          break;
        }
        case '.': check(stack_.size() == 1, "STOP with ", stack_.size(), " values on the stack"); return pop();
        default: fail("unsupported pickle opcode ", int(op), " at byte ", pos_ - 1);
      }
    }
  }

 private:
  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) const {
    C10_THROW_ERROR(Error, c10::str("load_pretrained: '", path_, "': cannot read its pickle: ", args...));
  }
  template <typename... Args>
  void check(bool ok, const Args&... args) const {
    if (!ok) fail(args...);
  }
  uint8_t byte() {
    check(pos_ < pickle_.size(), "it ends before STOP");
    return static_cast<uint8_t>(pickle_[pos_++]);
  }
  std::string bytes(size_t n) {
    check(n <= pickle_.size() - pos_, "it ends inside an argument");
    std::string b = pickle_.substr(pos_, n);
    pos_ += n;
    return b;
  }
  uint64_t le(size_t n) {
    const std::string b = bytes(n);
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= uint64_t(uint8_t(b[k])) << (8 * k);
    return v;
  }
  std::string line() {
    const size_t end = pickle_.find('\n', pos_);
    check(end != std::string::npos, "a GLOBAL without its newline");
    std::string l = pickle_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return l;
  }
  void string_of(uint64_t n) {
    auto o = make(PyObj::Kind::kString);
    o->s = bytes(n);
    push(o);
  }
  void int_of(int64_t v) {
    auto o = make(PyObj::Kind::kInt);
    o->i = v;
    push(o);
  }
  void push(PyPtr o) { stack_.push_back(std::move(o)); }
  PyPtr pop() {
    check(!stack_.empty(), "pop from an empty stack");
    auto o = stack_.back();
    stack_.pop_back();
    return o;
  }
  const PyPtr& top() {
    check(!stack_.empty(), "an empty stack");
    return stack_.back();
  }
  std::vector<PyPtr> pop_to_mark() {
    std::vector<PyPtr> items;
    while (true) {
      auto o = pop();
      if (o->kind == PyObj::Kind::kMark) break;
      items.push_back(o);
    }
    return {items.rbegin(), items.rend()};
  }
  PyPtr memo(uint64_t key) {
    const auto it = memo_.find(key);
    check(it != memo_.end(), "memo entry ", key, " is not set");
    return it->second;
  }
  PyPtr expect(const PyPtr& o, PyObj::Kind kind, const char* where) {
    check(o->kind == kind, where, " applied to the wrong kind of value");
    return o;
  }
  int64_t int_arg(const PyPtr& o, const char* what) {
    check(o->kind == PyObj::Kind::kInt, what, " must be an integer");
    return o->i;
  }
  std::vector<int64_t> int_tuple(const PyPtr& o, const char* what) {
    check(o->kind == PyObj::Kind::kTuple, what, " must be a tuple");
    std::vector<int64_t> v;
    for (const auto& x : o->items) v.push_back(int_arg(x, what));
    return v;
  }

  // ('storage', torch.<Type>Storage, key, location, numel) -> the storage as a 1-d CPU tensor.
  PyPtr persistent_load(const PyPtr& pid) {
    check(pid->kind == PyObj::Kind::kTuple && pid->items.size() == 5 && pid->items[0]->kind == PyObj::Kind::kString &&
              pid->items[0]->s == "storage" && pid->items[1]->kind == PyObj::Kind::kGlobal &&
              pid->items[2]->kind == PyObj::Kind::kString,
          "a persistent id that is not a tensor storage");
    const auto dtype = storage_dtype(pid->items[1]->s);
    check(dtype.has_value(), "unsupported storage type ", pid->items[1]->s);
    const std::string& key = pid->items[2]->s;
    const int64_t numel = int_arg(pid->items[4], "a storage's size");
    auto o = make(PyObj::Kind::kTensor);
    const auto cached = storages_.find(key);
    if (cached != storages_.end()) {
      o->tensor = cached->second;
    } else {
      const std::string record = "data/" + key;
      check(archive_.hasRecord(record), "storage '", key, "' is missing from the archive");
      auto [data, size] = archive_.getRecord(record);
      check(numel >= 0 && size == static_cast<size_t>(numel) * c10::elementSize(*dtype), "storage '", key, "' has ",
            size, " bytes, expected ", numel, " elements of ", *dtype);
      o->tensor = at::empty({numel}, at::TensorOptions().dtype(*dtype));
      if (size) std::memcpy(o->tensor.data_ptr(), data.get(), size);
      storages_.emplace(key, o->tensor);
    }
    return o;
  }

  PyPtr reduce(const PyPtr& callable, const std::vector<PyPtr>& args) {
    check(callable->kind == PyObj::Kind::kGlobal, "REDUCE of something that is not a global");
    const std::string& name = callable->s;
    if (name == "collections.OrderedDict") {
      check(args.empty(), "OrderedDict with arguments");
      return make(PyObj::Kind::kDict);
    }
    if (name == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      check(args.size() >= 6 && args[0]->kind == PyObj::Kind::kTensor, "_rebuild_tensor_v2 with unexpected arguments");
      const int64_t offset = int_arg(args[1], "a tensor's storage offset");
      const auto sizes = int_tuple(args[2], "a tensor's size"), strides = int_tuple(args[3], "a tensor's stride");
      check(sizes.size() == strides.size(), "a tensor's size and stride differ in length");
      auto o = make(PyObj::Kind::kTensor);
      try {
        // as_strided checks the view stays inside the storage.
        o->tensor = args[0]->tensor.as_strided(sizes, strides, offset).clone();
      } catch (const c10::Error& e) {
        fail("a tensor does not fit its storage: ", e.what_without_backtrace());
      }
      return o;
    }
    if (name == "torch._utils._rebuild_parameter") {  // (data, requires_grad, backward_hooks)
      check(!args.empty() && args[0]->kind == PyObj::Kind::kTensor, "_rebuild_parameter with unexpected arguments");
      return args[0];
    }
    fail("unsupported global ", name, " (only state dicts of tensors load)");
  }

  caffe2::serialize::PyTorchStreamReader& archive_;
  std::string path_;
  std::string pickle_;
  size_t pos_ = 0;
  std::vector<PyPtr> stack_;
  std::map<uint64_t, PyPtr> memo_;
  std::map<std::string, at::Tensor> storages_;
};

std::map<std::string, at::Tensor> read_torch_bin(const std::string& path) {
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> archive;
  try {
    archive = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "load_pretrained: '", path, "' is not a readable torch.save archive (",
                e.what_without_backtrace(), "); save it with torch.save(state_dict, path) from torch >= 1.6");
  }
  TORCH_CHECK(archive->hasRecord("data.pkl"), "load_pretrained: '", path, "' is a zip archive without data.pkl, not torch.save's");
  if (archive->hasRecord("byteorder")) {
    auto [data, size] = archive->getRecord("byteorder");
    const std::string order(static_cast<const char*>(data.get()), size);
    TORCH_CHECK(order == "little", "load_pretrained: '", path, "' was saved with byte order '", order, "'");
  }
  const PyPtr root = TorchPickleReader(*archive, path).run();
  TORCH_CHECK(root->kind == PyObj::Kind::kDict, "load_pretrained: '", path,
              "' must hold a state dict (name -> tensor)");
  std::map<std::string, at::Tensor> out;
  for (const auto& [key, value] : root->entries) {
    TORCH_CHECK(key->kind == PyObj::Kind::kString, "load_pretrained: '", path, "': state dict keys must be strings");
    TORCH_CHECK(value->kind == PyObj::Kind::kTensor, "load_pretrained: '", path, "': '", key->s, "' is not a tensor");
    add_tensor(out, key->s, value->tensor, path);
  }
  return out;
}

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

void make_dirs(const std::string& dir) {
  for (size_t pos = 1;; ++pos) {
    pos = dir.find('/', pos);
    const std::string prefix = dir.substr(0, pos);
    if (!prefix.empty() && !is_dir(prefix))
      TORCH_CHECK(::mkdir(prefix.c_str(), 0777) == 0 || errno == EEXIST, "save_pretrained: cannot create directory '",
                  prefix, "': ", std::strerror(errno));
    if (pos == std::string::npos) break;
  }
  TORCH_CHECK(is_dir(dir), "save_pretrained: '", dir, "' is not a directory");
}

const char* torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return nullptr;
  }
}

}  // namespace

MambaConfig read_pretrained_config(const std::string& dir) {
  TORCH_CHECK(is_dir(dir), "read_pretrained_config: '", dir, "' is not a directory");
  const std::string path = join(dir, kConfigFile);
  TORCH_CHECK(is_file(path), "read_pretrained_config: '", dir, "' has no ", kConfigFile);
  const json j = read_json(path, "read_pretrained_config");
  try {
    return is_mamba_ssm_config(j) ? mamba_ssm_config(j, path) : hf_config(j, path);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "read_pretrained_config: '", path, "': ", e.what());
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    if (message.rfind("read_pretrained_config", 0) == 0) throw;
    // MambaConfig::validate's errors, which know nothing of the file.
    TORCH_CHECK(false, "read_pretrained_config: '", path, "': ", message);
  }
}

std::map<std::string, at::Tensor> read_pretrained_tensors(const std::string& dir) {
  TORCH_CHECK(is_dir(dir), "load_pretrained: '", dir, "' is not a directory");
  // transformers' order of preference.
  if (is_file(join(dir, kSafetensorsFile))) {
    std::map<std::string, at::Tensor> out;
    for (auto& [name, t] : safetensors::load(join(dir, kSafetensorsFile)))
      add_tensor(out, name, std::move(t), join(dir, kSafetensorsFile));
    return out;
  }
  if (is_file(join(dir, kSafetensorsIndexFile))) return read_safetensors_index(dir);
  if (is_file(join(dir, kTorchBinFile))) return read_torch_bin(join(dir, kTorchBinFile));
  TORCH_CHECK(!is_file(join(dir, "pytorch_model.bin.index.json")), "load_pretrained: '", dir,
              "' holds a sharded pytorch_model-*.bin checkpoint, which is not supported; convert it to safetensors "
              "(transformers: model.save_pretrained(out, safe_serialization=True))");
  TORCH_CHECK(false, "load_pretrained: '", dir, "' holds no weights: expected ", kSafetensorsFile, ", ",
              kSafetensorsIndexFile, " (sharded) or ", kTorchBinFile);
}

MambaLMHeadModel load_pretrained(const std::string& dir, const LoadOptions& options) {
  TORCH_CHECK(at::isFloatingType(options.dtype) && torch_dtype_name(options.dtype), "load_pretrained: LoadOptions.dtype must be "
              "float32, float64, bfloat16 or float16, got ", options.dtype);
  const MambaConfig config = read_pretrained_config(dir);
  auto tensors = read_pretrained_tensors(dir);
  MambaLMHeadModel model(config);

  // A tied model multiplies by the embedding; mamba_ssm's state dicts still list lm_head.weight
  // (the same tensor twice), which is fine as long as it really is the embedding.
  std::vector<std::string> problems;
  if (config.tie_embeddings() && tensors.count(kLmHeadName)) {
    const auto& head = tensors.at(kLmHeadName);
    const auto it = tensors.find(kEmbeddingName);
    if (it != tensors.end() && !head.equal(it->second))
      problems.push_back(std::string("lm_head.weight differs from ") + kEmbeddingName +
                         ", but the config ties them (tie_word_embeddings / tie_embeddings)");
    tensors.erase(kLmHeadName);
  }

  const auto params = model->named_parameters(/*recurse=*/true);
  std::vector<std::string> missing, mis_shaped, wrong_type;
  for (const auto& p : params) {
    const auto it = tensors.find(p.key());
    if (it == tensors.end()) {
      missing.push_back(p.key() + " " + shape_string(p.value().sizes()));
    } else if (!it->second.sizes().equals(p.value().sizes())) {
      mis_shaped.push_back(p.key() + ": expected " + shape_string(p.value().sizes()) + ", got " +
                           shape_string(it->second.sizes()));
    } else if (!at::isFloatingType(it->second.scalar_type())) {
      std::ostringstream s;
      s << p.key() << ": stored as " << it->second.scalar_type() << ", expected a floating-point type";
      wrong_type.push_back(s.str());
    }
  }
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : tensors)
    if (!params.contains(name)) unexpected.push_back(name + " " + shape_string(t.sizes()));

  if (!missing.empty() || !unexpected.empty() || !mis_shaped.empty() || !wrong_type.empty() || !problems.empty()) {
    std::ostringstream msg;
    msg << "load_pretrained: the checkpoint in '" << dir << "' does not fit the model its config describes ("
        << config.to_json() << "):";
    auto list = [&](const char* title, const std::vector<std::string>& names) {
      if (names.empty()) return;
      msg << "\n  " << title << " (" << names.size() << "):";
      for (const auto& n : names) msg << "\n    " << n;
    };
    list("missing tensors", missing);
    list("unexpected tensors", unexpected);
    list("mis-shaped tensors", mis_shaped);
    list("tensors of a wrong dtype", wrong_type);
    list("other problems", problems);
    TORCH_CHECK(false, msg.str());
  }

  // Converted once, from the stored dtype straight to the requested one, then moved.
  model->to(options.dtype);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->named_parameters(true)) p.value().copy_(tensors.at(p.key()));
  }
  model->to(options.device);
  return model;
}

void save_pretrained(MambaLMHeadModel& model, const std::string& dir) {
  TORCH_CHECK(model, "save_pretrained: the model is empty (a null MambaLMHeadModel)");
  const MambaConfig& c = model->options;
  TORCH_CHECK(c.rms_norm(), "save_pretrained: transformers' Mamba has RMSNorm only; this model uses LayerNorm "
              "(rms_norm = false) and cannot be saved in the HF layout");
  const at::ScalarType dtype = model->backbone->embeddings->weight.scalar_type();
  const char* dtype_name = torch_dtype_name(dtype);
  TORCH_CHECK(dtype_name, "save_pretrained: the model's dtype ", dtype, " is not float32, float64, bfloat16 or float16");

  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : model->named_parameters(true)) {
    TORCH_CHECK(p.value().scalar_type() == dtype, "save_pretrained: parameter '", p.key(), "' is ",
                p.value().scalar_type(), " while the model is ", dtype, "; convert the whole model with ->to(dtype)");
    tensors.emplace(p.key(), p.value().detach().to(at::kCPU).contiguous());
  }

  json config = {
      {"architectures", {"MambaForCausalLM"}},
      {"model_type", "mamba"},
      {"vocab_size", c.padded_vocab_size()},
      {"pad_vocab_size_multiple", c.pad_vocab_size_multiple()},
      {"hidden_size", c.d_model()},
      {"num_hidden_layers", c.n_layer()},
      {"state_size", c.d_state()},
      {"conv_kernel", c.d_conv()},
      {"expand", c.expand()},
      {"intermediate_size", c.d_inner()},
      {"time_step_rank", c.resolved_dt_rank()},
      {"time_step_min", c.dt_min()},
      {"time_step_max", c.dt_max()},
      {"time_step_floor", c.dt_init_floor()},
      {"use_bias", c.bias()},
      {"use_conv_bias", c.conv_bias()},
      {"hidden_act", "silu"},
      {"layer_norm_epsilon", c.norm_eps()},
      {"residual_in_fp32", c.residual_in_fp32()},
      {"tie_word_embeddings", c.tie_embeddings()},
      {"torch_dtype", dtype_name},
  };

  make_dirs(dir);
  // Weights first: a directory whose config.json is new never points at old weights of another shape.
  safetensors::save(join(dir, kSafetensorsFile), tensors, {{"format", "pt"}});
  safetensors::write_file_atomically(join(dir, kConfigFile), config.dump(2) + "\n", "save_pretrained");
}

}  // namespace statemamba
