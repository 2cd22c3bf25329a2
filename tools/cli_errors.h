#pragma once
// What the programs add to cxxopts' errors: "Argument ‘abc’ failed to parse" names the value, not
// the option it was given to, so the option is found in argv.
#include <cstring>
#include <string>

namespace statemamba::tools {

// " (the value of --flag)" when `message` quotes a value that followed an option in argv (as
// "--flag value" or "--flag=value"), else "".
inline std::string option_of_bad_value(int argc, char** argv, const std::string& message) {
  auto quoted = [&](const std::string& value) { return message.find("\u2018" + value + "\u2019") != std::string::npos; };
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] != '-') continue;
    const char* equals = std::strchr(argv[i], '=');
    if (equals && quoted(equals + 1)) return " (the value of " + std::string(argv[i], static_cast<size_t>(equals - argv[i])) + ")";
    if (!equals && i + 1 < argc && quoted(argv[i + 1])) return std::string(" (the value of ") + argv[i] + ")";
  }
  return "";
}

}  // namespace statemamba::tools
