// safetensors reader and writer. The reader trusts nothing in the file: the header length, the JSON,
// every dtype, shape and offset are checked before a byte of tensor data is touched, and the data
// is copied out of a read-only mapping, so the returned tensors outlive the file.
#include "mamba/safetensors.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace statemamba::safetensors {
namespace {

using nlohmann::json;

// The reference implementation's bound: a larger header is refused before it is read.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";

bool host_is_little_endian() {
  const uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},   {"BF16", at::kBFloat16}, {"I64", at::kLong},
    {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},    {"U8", at::kByte},       {"BOOL", at::kBool},
};

std::optional<at::ScalarType> dtype_from_name(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  return std::nullopt;
}

std::string known_dtypes() {
  std::string s;
  for (const auto& d : kDtypes) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

const char* dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes)
    if (type == d.type) return d.name;
  return nullptr;
}

// A read-only mapping of a whole file, unmapped and closed on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    TORCH_CHECK(fd_ >= 0, "safetensors::load: cannot open '", path, "': ", std::strerror(errno));
    struct stat st;
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd_);
      TORCH_CHECK(false, "safetensors::load: '", path, "' is not a regular file");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ == 0) return;  // mmap refuses length 0; the header check reports the empty file
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd_);
      TORCH_CHECK(false, "safetensors::load: cannot map '", path, "': ", std::strerror(err));
    }
    data_ = static_cast<const unsigned char*>(p);
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  std::string path_;
  int fd_ = -1;
  const unsigned char* data_ = nullptr;
  uint64_t size_ = 0;
};

struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // relative to the start of the data section
};

struct Header {
  std::vector<Entry> entries;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // 8 + header length
};

// nlohmann keeps the last of duplicated keys silently; a safetensors header with a name twice is
// ambiguous, so the parse callback refuses it.
json parse_header_json(const std::string& text, const std::string& path) {
  std::vector<std::set<std::string>> keys_per_object;
  std::string duplicate;
  auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys_per_object.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys_per_object.empty()) keys_per_object.pop_back();
    } else if (event == json::parse_event_t::key && !keys_per_object.empty()) {
      const std::string key = parsed.get<std::string>();
      if (!keys_per_object.back().insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text, callback);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "safetensors::load: '", path, "': the header is not valid JSON: ", e.what());
  }
  TORCH_CHECK(duplicate.empty(), "safetensors::load: '", path, "': the header names \"", duplicate, "\" twice");
  TORCH_CHECK(j.is_object(), "safetensors::load: '", path, "': the header must be a JSON object, got ", j.type_name());
  return j;
}

uint64_t as_offset(const json& v, const std::string& path, const std::string& name) {
  TORCH_CHECK(v.is_number_unsigned(), "safetensors::load: '", path, "': tensor '", name,
              "': data_offsets must be non-negative integers, got ", v.dump());
  return v.get<uint64_t>();
}

Entry parse_entry(const std::string& name, const json& info, const std::string& path) {
  const std::string where = "safetensors::load: '" + path + "': tensor '" + name + "'";
  TORCH_CHECK(info.is_object(), where, ": expected an object with dtype, shape and data_offsets, got ", info.dump());
  for (const char* key : {"dtype", "shape", "data_offsets"})
    TORCH_CHECK(info.contains(key), where, ": missing \"", key, "\"");
  for (const auto& item : info.items())
    TORCH_CHECK(item.key() == "dtype" || item.key() == "shape" || item.key() == "data_offsets", where,
                ": unknown field \"", item.key(), "\"");
  Entry e;
  e.name = name;
  const json& dtype = info["dtype"];
  TORCH_CHECK(dtype.is_string(), where, ": dtype must be a string, got ", dtype.dump());
  const auto type = dtype_from_name(dtype.get<std::string>());
  TORCH_CHECK(type, where, ": unsupported dtype \"", dtype.get<std::string>(), "\" (supported: ", known_dtypes(), ")");
  e.dtype = *type;

  const json& shape = info["shape"];
  TORCH_CHECK(shape.is_array(), where, ": shape must be an array, got ", shape.dump());
  // The element count times the item size must fit in 64 bits: overflow would let a huge shape
  // pass the byte-count check.
  unsigned __int128 bytes = c10::elementSize(e.dtype);
  for (const auto& d : shape) {
    TORCH_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= uint64_t(std::numeric_limits<int64_t>::max()), where,
                ": shape entries must be non-negative integers, got ", shape.dump());
    e.shape.push_back(d.get<int64_t>());
    bytes *= d.get<uint64_t>();
    TORCH_CHECK(bytes <= std::numeric_limits<uint64_t>::max(), where, ": shape ", shape.dump(), " is too large");
  }

  const json& offsets = info["data_offsets"];
  TORCH_CHECK(offsets.is_array() && offsets.size() == 2, where, ": data_offsets must be [begin, end], got ",
              offsets.dump());
  e.begin = as_offset(offsets[0], path, name);
  e.end = as_offset(offsets[1], path, name);
  TORCH_CHECK(e.begin <= e.end, where, ": data_offsets [", e.begin, ", ", e.end, "] end before they begin");
  TORCH_CHECK(e.end - e.begin == static_cast<uint64_t>(bytes), where, ": dtype ", dtype.get<std::string>(),
              " and shape ", shape.dump(), " need ", static_cast<uint64_t>(bytes), " bytes, but data_offsets [",
              e.begin, ", ", e.end, "] hold ", e.end - e.begin);
  return e;
}

Header read_header(const MappedFile& file, const std::string& path) {
  TORCH_CHECK(host_is_little_endian(), "safetensors::load: this reader needs a little-endian host");
  TORCH_CHECK(file.size() >= 8, "safetensors::load: '", path, "' is truncated: ", file.size(),
              " bytes, fewer than the 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file.data(), 8);
  TORCH_CHECK(header_len <= kMaxHeaderBytes, "safetensors::load: '", path, "': header length ", header_len,
              " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  TORCH_CHECK(header_len <= file.size() - 8, "safetensors::load: '", path, "' is truncated: its header length ",
              header_len, " runs past the end of the file (", file.size() - 8, " bytes after the length)");
  TORCH_CHECK(header_len >= 2 && file.data()[8] == '{', "safetensors::load: '", path,
              "': the header must be a JSON object starting with '{'");

  const std::string text(reinterpret_cast<const char*>(file.data() + 8), header_len);
  const json j = parse_header_json(text, path);

  Header h;
  h.data_start = 8 + header_len;
  for (const auto& item : j.items()) {
    if (item.key() == kMetadataKey) {
      TORCH_CHECK(item.value().is_object(), "safetensors::load: '", path, "': \"", kMetadataKey,
                  "\" must be an object of strings, got ", item.value().dump());
      for (const auto& m : item.value().items()) {
        TORCH_CHECK(m.value().is_string(), "safetensors::load: '", path, "': metadata \"", m.key(),
                    "\" must be a string, got ", m.value().dump());
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    h.entries.push_back(parse_entry(item.key(), item.value(), path));
  }

  // The data section must be exactly covered: in range, no overlaps, no holes (as the reference
  // reader demands), so every byte belongs to one tensor.
  const uint64_t data_len = file.size() - h.data_start;
  std::vector<const Entry*> by_offset;
  for (const auto& e : h.entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return std::tie(a->begin, a->end) < std::tie(b->begin, b->end);
  });
  uint64_t covered = 0;
  const Entry* previous = nullptr;
  for (const Entry* e : by_offset) {
    TORCH_CHECK(e->end <= data_len, "safetensors::load: '", path, "': tensor '", e->name, "': data_offsets [", e->begin,
                ", ", e->end, "] run past the end of the data (", data_len, " bytes); the file may be truncated");
    TORCH_CHECK(e->begin >= covered, "safetensors::load: '", path, "': tensor '", e->name, "' (bytes ", e->begin, "..",
                e->end, ") overlaps tensor '", previous ? previous->name : "", "' (ending at byte ", covered, ")");
    TORCH_CHECK(e->begin == covered, "safetensors::load: '", path, "': bytes ", covered, "..", e->begin,
                " of the data belong to no tensor");
    covered = e->end;
    previous = e;
  }
  TORCH_CHECK(covered == data_len, "safetensors::load: '", path, "': the last ", data_len - covered,
              " bytes of the file belong to no tensor");
  return h;
}

// Writes through `write(file)` to a temporary file beside `path`, fsyncs it, then renames it over
// `path`; the temporary file is removed on any failure.
void write_atomically(const std::string& path, const char* what, const std::function<void(std::FILE*)>& write) {
  static std::atomic<int> counter{0};
  const std::string temp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  std::FILE* f = std::fopen(temp.c_str(), "wb");
  TORCH_CHECK(f, what, ": cannot create '", temp, "': ", std::strerror(errno));
  try {
    write(f);
    TORCH_CHECK(std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0, what, ": cannot write '", temp,
                "': ", std::strerror(errno));
  } catch (...) {
    std::fclose(f);
    std::remove(temp.c_str());
    throw;
  }
  const bool closed = std::fclose(f) == 0;
  const int close_err = errno;
  if (!closed) {
    std::remove(temp.c_str());
    TORCH_CHECK(false, what, ": cannot write '", temp, "': ", std::strerror(close_err));
  }
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(temp.c_str());
    TORCH_CHECK(false, what, ": cannot rename '", temp, "' to '", path, "': ", std::strerror(err));
  }
}

void write_bytes(std::FILE* f, const void* data, size_t n, const std::string& path) {
  TORCH_CHECK(n == 0 || std::fwrite(data, 1, n, f) == n, "safetensors::save: cannot write '", path,
              "': ", std::strerror(errno));
}

}  // namespace

std::map<std::string, at::Tensor> load(const std::string& path) {
  const MappedFile file(path);
  const Header h = read_header(file, path);
  std::map<std::string, at::Tensor> tensors;
  for (const auto& e : h.entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    const unsigned char* src = file.data() + h.data_start + e.begin;
    if (e.dtype == at::kBool) {
      // Any byte but 0 or 1 is not a bool, and torch's kernels assume they are.
      for (uint64_t i = 0; i < e.end - e.begin; ++i)
        TORCH_CHECK(src[i] <= 1, "safetensors::load: '", path, "': tensor '", e.name, "' is BOOL but holds byte ",
                    int(src[i]), " at element ", i);
    }
    if (e.end > e.begin) std::memcpy(t.data_ptr(), src, e.end - e.begin);
    tensors.emplace(e.name, std::move(t));
  }
  return tensors;
}

std::map<std::string, std::string> load_metadata(const std::string& path) {
  const MappedFile file(path);
  return read_header(file, path).metadata;
}

void save(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
          const std::map<std::string, std::string>& metadata) {
  TORCH_CHECK(host_is_little_endian(), "safetensors::save: this writer needs a little-endian host");
  TORCH_CHECK(tensors.count(kMetadataKey) == 0, "safetensors::save: '", path, "': a tensor may not be named \"",
              kMetadataKey, "\"");
  // Largest item size first, then by name (as the reference writer): every tensor starts aligned
  // to its own item size, since the header is padded to 8 bytes.
  std::vector<std::pair<std::string, at::Tensor>> ordered;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(tensor.defined(), "safetensors::save: '", path, "': tensor '", name, "' is undefined");
    TORCH_CHECK(dtype_name(tensor.scalar_type()), "safetensors::save: '", path, "': tensor '", name, "' has dtype ",
                tensor.scalar_type(), ", which safetensors cannot hold here (supported: ", known_dtypes(), ")");
    ordered.emplace_back(name, tensor.detach().to(at::kCPU).contiguous());
  }
  std::stable_sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) {
    return a.second.element_size() > b.second.element_size();
  });

  json header = json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : ordered) {
    const uint64_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_len = text.size();

  write_atomically(path, "safetensors::save", [&](std::FILE* f) {
    write_bytes(f, &header_len, 8, path);
    write_bytes(f, text.data(), text.size(), path);
    for (const auto& entry : ordered)
      write_bytes(f, entry.second.data_ptr(), entry.second.numel() * entry.second.element_size(), path);
  });
}

void write_file_atomically(const std::string& path, const std::string& bytes, const char* what) {
  write_atomically(path, what, [&](std::FILE* f) {
    TORCH_CHECK(bytes.empty() || std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size(), what,
                ": cannot write '", path, "': ", std::strerror(errno));
  });
}

}  // namespace statemamba::safetensors
