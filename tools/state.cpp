// statemamba-state: the local library of saved states ("cartridges": a document read once by a
// model, kept to continue from). Entries are made by `statemamba-generate ... --state-name NAME`
// or added from a state file here; `statemamba-generate --load-state NAME` starts from one.
//
//   statemamba-state list
//   statemamba-state show manual
//   statemamba-state add manual manual.h5 --source manual.txt --model mamba-130m
//   statemamba-state path manual
//   statemamba-state rm manual
#include <torch/torch.h>

#include <cxxopts.hpp>
#include <iomanip>
#include <iostream>

#include "mamba/state_library.h"
#include "tools/cli_errors.h"

using namespace statemamba;

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void need(const std::vector<std::string>& operands, size_t n, const std::string& usage) {
  if (operands.size() != n) throw UsageError("usage: statemamba-state " + usage);
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("statemamba-state",
                       "The local state library: states a model built from documents, kept by name.\n"
                       "  list                 every state: name, tokens read, model, date, source\n"
                       "  show NAME            its metadata (JSON)\n"
                       "  path NAME            its state file (.h5), for other programs\n"
                       "  add NAME FILE        copy a .h5/.pt state file into the library\n"
                       "  rm NAME              remove it\n");
  cli.positional_help("COMMAND [ARGS...]");
  // clang-format off
  cli.add_options()
      ("dir", "library directory (default: $STATEMAMBA_STATE_DIR, else ~/.cache/statemamba/states)",
       cxxopts::value<std::string>())
      ("source", "add: what the state has read", cxxopts::value<std::string>()->default_value(""))
      ("model", "add: the model it was built with", cxxopts::value<std::string>()->default_value(""))
      ("replace", "add: replace an existing entry of that name")
      ("command", "", cxxopts::value<std::string>())
      ("operands", "", cxxopts::value<std::vector<std::string>>())
      ("h,help", "show this help");
  // clang-format on
  cli.parse_positional({"command", "operands"});

  try {
    auto args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help({""}) << std::endl;
      return 0;
    }
    if (!args.count("command")) throw UsageError("a command is required: list, show, path, add or rm");
    const std::string command = args["command"].as<std::string>();
    const auto operands = args.count("operands") ? args["operands"].as<std::vector<std::string>>()
                                                 : std::vector<std::string>{};
    StateLibrary library(args.count("dir") ? args["dir"].as<std::string>() : StateLibrary::default_dir());

    if (command == "list") {
      need(operands, 0, "list");
      const auto entries = library.list();
      if (entries.empty()) {
        std::cout << "no states in " << library.dir() << "\n";
        return 0;
      }
      std::cout << std::left << std::setw(24) << "NAME" << std::setw(10) << "TOKENS" << std::setw(7) << "BATCH"
                << std::setw(18) << "FINGERPRINT" << std::setw(22) << "DATE" << "SOURCE (MODEL)\n";
      for (const auto& e : entries)
        std::cout << std::setw(24) << e.name << std::setw(10) << e.tokens << std::setw(7) << e.batch << std::setw(18)
                  << e.fingerprint << std::setw(22) << e.date << e.source << (e.model.empty() ? "" : " (" + e.model + ")")
                  << "\n";
    } else if (command == "show") {
      need(operands, 1, "show NAME");
      std::cout << library.metadata_json(operands[0]);
    } else if (command == "path") {
      need(operands, 1, "path NAME");
      std::cout << library.info(operands[0]).file << "\n";
    } else if (command == "add") {
      need(operands, 2, "add NAME FILE [--source TEXT] [--model NAME] [--replace]");
      StateLibrary::check_name(operands[0]);
      StateInfo info;
      info.source = args["source"].as<std::string>();
      if (info.source.empty()) info.source = operands[1];
      info.model = args["model"].as<std::string>();
      const StateInfo stored =
          library.add(operands[0], MambaStackState::load(operands[1]), info, args.count("replace") > 0);
      std::cout << "added '" << stored.name << "' (" << stored.tokens << " tokens, " << stored.batch << " row"
                << (stored.batch == 1 ? "" : "s") << ") to " << library.dir() << "\n";
    } else if (command == "rm") {
      need(operands, 1, "rm NAME");
      library.remove(operands[0]);
      std::cout << "removed '" << operands[0] << "' from " << library.dir() << "\n";
    } else {
      throw UsageError("unknown command '" + command + "': expected list, show, path, add or rm");
    }
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "statemamba-state: " << e.what() << "\n(see --help)" << std::endl;
    return 2;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "statemamba-state: " << e.what() << statemamba::tools::option_of_bad_value(argc, argv, e.what())
              << "\n(see --help)" << std::endl;
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "statemamba-state: error: " << e.what_without_backtrace() << std::endl;
    return 1;
  }
}
