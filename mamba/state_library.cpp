#include "mamba/state_library.h"

#include <c10/util/Exception.h>
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mamba/safetensors.h"

namespace statemamba {

namespace {

using nlohmann::json;

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// mkdir -p (POSIX: libtorch's std::filesystem is not usable here).
void make_dirs(const std::string& dir) {
  std::string partial;
  std::stringstream parts(dir);
  for (std::string part; std::getline(parts, part, '/');) {
    partial += part + "/";
    if (part.empty() || exists(partial)) continue;
    TORCH_CHECK(::mkdir(partial.c_str(), 0755) == 0 || errno == EEXIST, "StateLibrary: cannot create directory '",
                partial, "': ", std::strerror(errno));
  }
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "StateLibrary: cannot read '", path, "': ", std::strerror(errno));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

StateInfo from_json(const std::string& text, const std::string& path) {
  try {
    const json j = json::parse(text);
    StateInfo info;
    info.name = j.at("name").get<std::string>();
    info.source = j.at("source").get<std::string>();
    info.model = j.at("model").get<std::string>();
    info.weights = j.at("weights").get<std::string>();
    info.fingerprint = j.at("fingerprint").get<std::string>();
    info.date = j.at("date").get<std::string>();
    info.tokens = j.at("tokens").get<int64_t>();
    info.batch = j.at("batch").get<int64_t>();
    info.n_layer = j.at("n_layer").get<int64_t>();
    return info;
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "StateLibrary: metadata file '", path, "' is malformed: ", e.what());
  }
}

}  // namespace

std::string StateLibrary::default_dir() {
  if (const char* d = std::getenv("STATEMAMBA_STATE_DIR"); d && *d) return d;
  if (const char* d = std::getenv("XDG_CACHE_HOME"); d && *d) return std::string(d) + "/statemamba/states";
  const char* home = std::getenv("HOME");
  TORCH_CHECK(home && *home, "StateLibrary: neither STATEMAMBA_STATE_DIR, XDG_CACHE_HOME nor HOME is set; "
              "name the library directory explicitly");
  return std::string(home) + "/.cache/statemamba/states";
}

StateLibrary::StateLibrary(std::string dir) : dir_(std::move(dir)) {
  TORCH_CHECK(!dir_.empty(), "StateLibrary: the directory name is empty");
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
}

void StateLibrary::check_name(const std::string& name) {
  TORCH_CHECK(!name.empty() && name.size() <= 100, "StateLibrary: a state name must have 1 to 100 characters, got '",
              name, "'");
  TORCH_CHECK(name[0] != '.', "StateLibrary: a state name must not start with '.', got '", name, "'");
  for (unsigned char c : name)
    TORCH_CHECK(std::isalnum(c) || c == '.' || c == '_' || c == '-', "StateLibrary: a state name may hold only ",
                "letters, digits, '.', '_' and '-'; '", name, "' has '", std::string(1, static_cast<char>(c)), "'");
}

bool StateLibrary::contains(const std::string& name) const {
  check_name(name);
  return exists(meta_path(name));
}

StateInfo StateLibrary::add(const std::string& name, const MambaStackState& state, const StateInfo& given,
                            bool replace) {
  check_name(name);
  TORCH_CHECK(replace || !contains(name), "StateLibrary: '", name, "' already exists in ", dir_,
              " (remove it first, or ask to replace it)");
  TORCH_CHECK(state.n_layer() > 0, "StateLibrary: the state for '", name, "' has no layers");
  make_dirs(dir_);
  StateInfo info = given;
  info.name = name;
  info.fingerprint = state.fingerprint;
  info.tokens = state.tokens;
  info.batch = state.batch();
  info.n_layer = state.n_layer();
  info.date = utc_now();
  info.file = state_path(name);
  state.save(info.file);
  const json j = {{"name", info.name},       {"source", info.source}, {"model", info.model},
                  {"weights", info.weights}, {"fingerprint", info.fingerprint},
                  {"tokens", info.tokens},   {"batch", info.batch},   {"n_layer", info.n_layer},
                  {"date", info.date},       {"file", name + ".h5"},  {"config", json::parse(state.config, nullptr, false)}};
  safetensors::write_file_atomically(meta_path(name), j.dump(2) + "\n", "StateLibrary::add");
  return info;
}

std::vector<StateInfo> StateLibrary::list() const {
  std::vector<StateInfo> out;
  DIR* d = ::opendir(dir_.c_str());
  if (!d) return out;  // no library yet: nothing in it
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d)) {
    const std::string file = e->d_name;
    if (file.size() > 5 && file.compare(file.size() - 5, 5, ".json") == 0 && file[0] != '.')
      names.push_back(file.substr(0, file.size() - 5));
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  for (const auto& name : names) out.push_back(info(name));
  return out;
}

std::string StateLibrary::metadata_json(const std::string& name) const {
  TORCH_CHECK(contains(name), "StateLibrary: no state named '", name, "' in ", dir_);
  return read_text(meta_path(name));
}

StateInfo StateLibrary::info(const std::string& name) const {
  StateInfo info = from_json(metadata_json(name), meta_path(name));
  info.file = state_path(name);
  return info;
}

MambaStackState StateLibrary::load(const std::string& name) const {
  TORCH_CHECK(contains(name), "StateLibrary: no state named '", name, "' in ", dir_);
  return MambaStackState::load(state_path(name));
}

MambaStackState StateLibrary::load(const std::string& name, const StateSpec& spec) const {
  TORCH_CHECK(contains(name), "StateLibrary: no state named '", name, "' in ", dir_);
  return MambaStackState::load(state_path(name), spec);
}

void StateLibrary::remove(const std::string& name) {
  TORCH_CHECK(contains(name), "StateLibrary: no state named '", name, "' in ", dir_);
  // Metadata first: an entry is listed only while its metadata exists.
  for (const auto& path : {meta_path(name), state_path(name)})
    TORCH_CHECK(std::remove(path.c_str()) == 0 || errno == ENOENT, "StateLibrary: cannot remove '", path, "': ",
                std::strerror(errno));
}

}  // namespace statemamba
