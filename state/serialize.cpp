// MambaStackState::save / load: a torch archive (.pt) or HDF5 (.h5), one layout in both: a group
// per layer holding conv_state and ssm_state, and a header (format, version, n_layer, tokens,
// fingerprint, config). Both formats read into the same Header and share every check.
#include <H5Cpp.h>
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>

#include "state/state.h"

namespace statemamba {
namespace {

constexpr const char* kFormatName = "statemamba.MambaStackState";

enum class Format { kTorch, kHdf5 };

// POSIX rather than std::filesystem: libtorch.so exports its own, partly broken, copy of
// std::filesystem's functions, which then stand in for libstdc++'s in every program linking torch.
bool is_kind(const std::string& path, mode_t kind) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && (st.st_mode & S_IFMT) == kind;
}

std::string directory_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

Format format_of(const std::string& path, const char* what) {
  const auto slash = path.rfind('/'), dot = path.rfind('.');
  std::string ext = dot != std::string::npos && (slash == std::string::npos || dot > slash + 1) ? path.substr(dot) : "";
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  if (ext == ".pt") return Format::kTorch;
  if (ext == ".h5" || ext == ".hdf5") return Format::kHdf5;
  TORCH_CHECK(false, what, ": '", path, "' has extension '", ext,
              "'; use .pt (torch archive) or .h5 (HDF5) to choose the format");
}

std::string layer_name(int64_t i) { return "layer_" + std::to_string(i); }

struct Header {
  std::string format;
  int64_t format_version = 0, n_layer = 0, tokens = 0;
  std::string fingerprint, config;
};

// Checked as soon as format and version are read, so a newer format fails on its version.
void check_format(const Header& h, const std::string& path) {
  TORCH_CHECK(h.format == kFormatName, "MambaStackState::load: '", path, "' is not a statemamba state file (its format is '",
              h.format, "', expected '", kFormatName, "')");
  TORCH_CHECK(h.format_version == MambaStackState::kFormatVersion, "MambaStackState::load: '", path,
              "' has state format version ", h.format_version, ", but this build reads version ",
              MambaStackState::kFormatVersion);
}

void check_n_layer(const Header& h, const std::string& path) {
  TORCH_CHECK(h.n_layer >= 1, "MambaStackState::load: '", path, "' has n_layer = ", h.n_layer);
}

// The file's own consistency: every layer fits the shapes of layer 0.
void check_layers(const MambaStackState& s, const std::string& path) {
  const auto& l0 = s.layers.at(0);
  TORCH_CHECK(l0.ssm_state.dim() == 3 && l0.conv_state.dim() == 3, "MambaStackState::load: '", path,
              "': layer 0 tensors must be 3-d, got ssm_state ", l0.ssm_state.sizes(), " and conv_state ",
              l0.conv_state.sizes());
  StateSpec own{s.n_layer(), l0.ssm_state.size(1), l0.conv_state.size(2) + 1, l0.ssm_state.size(2), "", ""};
  try {
    s.validate_for(own);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "MambaStackState::load: '", path, "' is inconsistent: ", e.what_without_backtrace());
  }
}

// ---- atomic writes ---------------------------------------------------------------------------------

void sync_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

// Writes through `write(temp)` to a temporary file beside `path`, flushes it, then renames it over
// `path`: the rename is atomic within one file system, so `path` is always a whole file.
void write_atomically(const std::string& path, const std::function<void(const std::string&)>& write) {
  const std::string dir = directory_of(path);
  TORCH_CHECK(is_kind(dir, S_IFDIR), "MambaStackState::save: cannot write '", path, "': directory '", dir,
              "' does not exist");
  static std::atomic<int> counter{0};
  const std::string temp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  try {
    write(temp);
    sync_file(temp);
  } catch (...) {
    std::remove(temp.c_str());
    throw;
  }
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(temp.c_str());
    TORCH_CHECK(false, "MambaStackState::save: cannot rename '", temp, "' to '", path, "': ", std::strerror(err));
  }
}

// ---- torch archive ---------------------------------------------------------------------------------

void save_torch(const MambaStackState& s, const std::string& path) {
  torch::serialize::OutputArchive root;
  root.write("format", std::string(kFormatName));
  root.write("format_version", MambaStackState::kFormatVersion);
  root.write("n_layer", s.n_layer());
  root.write("tokens", s.tokens);
  root.write("fingerprint", s.fingerprint);
  root.write("config", s.config);
  for (int64_t i = 0; i < s.n_layer(); ++i) {
    torch::serialize::OutputArchive layer;
    layer.write("conv_state", s.layers[i].conv_state.detach().cpu().contiguous(), /*is_buffer=*/true);
    layer.write("ssm_state", s.layers[i].ssm_state.detach().cpu().contiguous(), /*is_buffer=*/true);
    root.write(layer_name(i), layer);
  }
  root.save_to(path);
}

MambaStackState load_torch(const std::string& path) {
  torch::serialize::InputArchive root;
  try {
    root.load_from(path, at::kCPU);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "MambaStackState::load: cannot read '", path,
                "' as a torch archive (truncated, corrupt or not a .pt file): ", e.what_without_backtrace());
  }
  auto value = [&](const char* key, bool is_int) {
    c10::IValue v;
    TORCH_CHECK(root.try_read(key, v) && (is_int ? v.isInt() : v.isString()), "MambaStackState::load: '", path,
                "' is not a statemamba state file (no ", is_int ? "integer" : "string", " entry '", key, "')");
    return v;
  };
  Header h;
  h.format = value("format", false).toStringRef();
  h.format_version = value("format_version", true).toInt();
  check_format(h, path);
  h.n_layer = value("n_layer", true).toInt();
  h.tokens = value("tokens", true).toInt();
  h.fingerprint = value("fingerprint", false).toStringRef();
  h.config = value("config", false).toStringRef();
  check_n_layer(h, path);
  MambaStackState s{{}, h.tokens, h.fingerprint, h.config};
  for (int64_t i = 0; i < h.n_layer; ++i) {
    torch::serialize::InputArchive layer;
    MambaInferenceState l;
    TORCH_CHECK(root.try_read(layer_name(i), layer) && layer.try_read("conv_state", l.conv_state) &&
                    layer.try_read("ssm_state", l.ssm_state),
                "MambaStackState::load: '", path, "' lacks ", layer_name(i), "/conv_state or ", layer_name(i),
                "/ssm_state (n_layer = ", h.n_layer, ")");
    s.layers.push_back(std::move(l));
  }
  return s;
}

// ---- HDF5 --------------------------------------------------------------------------------------------

// Holds HDF5 for one save or load: the library may be built without thread safety, and its
// error-stack printing is turned off (failures become our exceptions) for the guard's lifetime.
class Hdf5Guard {
 public:
  Hdf5Guard() : lock_(mutex()) {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~Hdf5Guard() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  Hdf5Guard(const Hdf5Guard&) = delete;
  Hdf5Guard& operator=(const Hdf5Guard&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  std::lock_guard<std::mutex> lock_;
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// The innermost entries of HDF5's error stack ("truncated file: eof = ..."), which say more than the
// C++ wrapper's "H5Fopen failed".
std::string hdf5_error(const H5::Exception& e) {
  std::string out;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* err, void* data) -> herr_t {
        auto& s = *static_cast<std::string*>(data);
        if (n < 2 && err->desc && *err->desc) s += (s.empty() ? "" : "; ") + std::string(err->desc);
        return 0;
      },
      &out);
  return out.empty() ? e.getDetailMsg() : out;
}

H5::StrType string_type() {
  H5::StrType t(H5::PredType::C_S1, H5T_VARIABLE);
  t.setCset(H5T_CSET_UTF8);  // so h5py reads the attributes as str
  return t;
}

void write_attr(H5::H5Object& obj, const char* name, const std::string& value) {
  const auto t = string_type();
  obj.createAttribute(name, t, H5::DataSpace(H5S_SCALAR)).write(t, value);
}

void write_attr(H5::H5Object& obj, const char* name, int64_t value) {
  obj.createAttribute(name, H5::PredType::NATIVE_INT64, H5::DataSpace(H5S_SCALAR))
      .write(H5::PredType::NATIVE_INT64, &value);
}

void write_dataset(H5::Group& group, const char* name, const at::Tensor& t) {
  const at::Tensor c = t.detach().cpu().contiguous();
  const auto& type = c.scalar_type() == at::kDouble ? H5::PredType::NATIVE_DOUBLE : H5::PredType::NATIVE_FLOAT;
  std::vector<hsize_t> dims(c.sizes().begin(), c.sizes().end());
  group.createDataSet(name, type, H5::DataSpace(static_cast<int>(dims.size()), dims.data())).write(c.data_ptr(), type);
}

void save_hdf5(const MambaStackState& s, const std::string& path) {
  H5::H5File file(path, H5F_ACC_TRUNC);
  write_attr(file, "format", std::string(kFormatName));
  write_attr(file, "format_version", MambaStackState::kFormatVersion);
  write_attr(file, "n_layer", s.n_layer());
  write_attr(file, "tokens", s.tokens);
  write_attr(file, "fingerprint", s.fingerprint);
  write_attr(file, "config", s.config);
  for (int64_t i = 0; i < s.n_layer(); ++i) {
    H5::Group g = file.createGroup(layer_name(i));
    write_dataset(g, "conv_state", s.layers[i].conv_state);
    write_dataset(g, "ssm_state", s.layers[i].ssm_state);
  }
  file.close();
}

struct Hdf5Reader {
  const std::string& path;

  void require(bool ok, const std::string& what) const {
    TORCH_CHECK(ok, "MambaStackState::load: '", path, "' is not a statemamba state file (", what, ")");
  }
  std::string str(const H5::H5Object& obj, const char* name) const {
    require(obj.attrExists(name), std::string("no attribute '") + name + "'");
    const H5::Attribute a = obj.openAttribute(name);
    require(a.getTypeClass() == H5T_STRING, std::string("attribute '") + name + "' is not a string");
    std::string value;
    a.read(a.getStrType(), value);
    return value;
  }
  int64_t integer(const H5::H5Object& obj, const char* name) const {
    require(obj.attrExists(name), std::string("no attribute '") + name + "'");
    const H5::Attribute a = obj.openAttribute(name);
    require(a.getTypeClass() == H5T_INTEGER && a.getSpace().getSimpleExtentNpoints() == 1,
            std::string("attribute '") + name + "' is not one integer");
    int64_t value = 0;
    a.read(H5::PredType::NATIVE_INT64, &value);
    return value;
  }
  at::Tensor tensor(const H5::Group& g, const std::string& group, const char* name) const {
    const std::string where = group + "/" + name;
    require(g.nameExists(name), "no dataset " + where);
    const H5::DataSet ds = g.openDataSet(name);
    const H5::DataSpace space = ds.getSpace();
    const int rank = space.getSimpleExtentNdims();
    require(rank == 3, where + " is not 3-d");
    std::vector<hsize_t> dims(rank);
    space.getSimpleExtentDims(dims.data());
    require(ds.getTypeClass() == H5T_FLOAT, where + " is not floating point");
    const bool f64 = ds.getFloatType().getSize() == 8;
    const auto& type = f64 ? H5::PredType::NATIVE_DOUBLE : H5::PredType::NATIVE_FLOAT;
    at::Tensor t = at::empty(std::vector<int64_t>(dims.begin(), dims.end()), f64 ? at::kDouble : at::kFloat);
    ds.read(t.data_ptr(), type);
    return t;
  }
};

MambaStackState load_hdf5(const std::string& path) {
  TORCH_CHECK(H5::H5File::isHdf5(path), "MambaStackState::load: '", path, "' is not an HDF5 file");
  H5::H5File file(path, H5F_ACC_RDONLY);
  const Hdf5Reader r{path};
  Header h;
  h.format = r.str(file, "format");
  h.format_version = r.integer(file, "format_version");
  check_format(h, path);
  h.n_layer = r.integer(file, "n_layer");
  h.tokens = r.integer(file, "tokens");
  h.fingerprint = r.str(file, "fingerprint");
  h.config = r.str(file, "config");
  check_n_layer(h, path);
  MambaStackState s{{}, h.tokens, h.fingerprint, h.config};
  for (int64_t i = 0; i < h.n_layer; ++i) {
    const std::string name = layer_name(i);
    r.require(file.nameExists(name), "no group " + name + " though n_layer = " + std::to_string(h.n_layer));
    const H5::Group g = file.openGroup(name);
    s.layers.push_back({r.tensor(g, name, "conv_state"), r.tensor(g, name, "ssm_state")});
  }
  return s;
}

}  // namespace

void MambaStackState::save(const std::string& path) const {
  const Format format = format_of(path, "MambaStackState::save");
  TORCH_CHECK(!layers.empty(), "MambaStackState::save: the state has no layers");
  write_atomically(path, [&](const std::string& temp) {
    if (format == Format::kTorch) return save_torch(*this, temp);
    const Hdf5Guard guard;
    try {
      save_hdf5(*this, temp);
    } catch (const H5::Exception& e) {
      TORCH_CHECK(false, "MambaStackState::save: HDF5 could not write '", temp, "': ", hdf5_error(e));
    }
  });
}

MambaStackState MambaStackState::load(const std::string& path) {
  const Format format = format_of(path, "MambaStackState::load");
  TORCH_CHECK(is_kind(path, S_IFREG), "MambaStackState::load: no such file '", path, "'");
  MambaStackState s;
  if (format == Format::kTorch) {
    s = load_torch(path);
  } else {
    const Hdf5Guard guard;
    try {
      s = load_hdf5(path);
    } catch (const H5::Exception& e) {
      TORCH_CHECK(false, "MambaStackState::load: cannot read '", path,
                  "' as HDF5 (truncated or corrupt?): ", hdf5_error(e));
    }
  }
  check_layers(s, path);
  return s;
}

MambaStackState MambaStackState::load(const std::string& path, const StateSpec& spec) {
  MambaStackState s = load(path);
  try {
    s.validate_for(spec);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "MambaStackState::load: '", path, "' does not fit this model: ", e.what_without_backtrace());
  }
  return s;
}

}  // namespace statemamba
