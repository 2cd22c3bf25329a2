#pragma once
// StateLibrary: a directory of named states ("cartridges": a document read once, its state kept
// to continue from later). Each entry is NAME.h5 (a MambaStackState file) beside NAME.json, its
// metadata: the model it belongs to, where it came from, how many tokens it has read, when.
//
//   StateLibrary library;                              // ~/.cache/statemamba/states
//   StateInfo info;
//   info.source = "manual.txt";
//   library.add("manual", state, info);
//   MambaStackState s = library.load("manual");
//
// Names are 1-100 characters of [A-Za-z0-9._-], not starting with '.'. Files are written
// atomically (temp + rename), the state first, so an entry is listed only once both are whole.
#include <cstdint>
#include <string>
#include <vector>

#include "state/state.h"

namespace statemamba {

struct StateInfo {
  std::string source;   // what the state has read (a file name, "ids", ...)
  std::string model;    // the model it was built with (directory or name), for people
  std::string weights;  // that model's weights digest (mamba/generate.h), if known
  // Filled in by the library from the state and the clock:
  std::string name, fingerprint, date;  // date: UTC, ISO 8601
  int64_t tokens = 0, batch = 0, n_layer = 0;
  std::string file;  // the state file's path
};

class StateLibrary {
 public:
  // $STATEMAMBA_STATE_DIR, else $XDG_CACHE_HOME/statemamba/states, else ~/.cache/statemamba/states.
  static std::string default_dir();
  explicit StateLibrary(std::string dir = default_dir());

  // Throws c10::Error naming the name and the rule it breaks.
  static void check_name(const std::string& name);

  // Saves the state and its metadata under `name` (creating the directory); refuses to replace an
  // existing entry unless `replace`. Returns the stored metadata.
  StateInfo add(const std::string& name, const MambaStackState& state, const StateInfo& info, bool replace = false);
  bool contains(const std::string& name) const;
  // Every entry, sorted by name. Metadata files that cannot be read are reported in the error.
  std::vector<StateInfo> list() const;
  StateInfo info(const std::string& name) const;  // throws naming the library when absent
  std::string metadata_json(const std::string& name) const;
  MambaStackState load(const std::string& name) const;
  MambaStackState load(const std::string& name, const StateSpec& spec) const;
  void remove(const std::string& name);

  const std::string& dir() const { return dir_; }

 private:
  std::string state_path(const std::string& name) const { return dir_ + "/" + name + ".h5"; }
  std::string meta_path(const std::string& name) const { return dir_ + "/" + name + ".json"; }
  std::string dir_;
};

}  // namespace statemamba
