// statemamba-tokenize: text -> token ids (or ids -> text) with a HF tokenizer.json.
//   statemamba-tokenize -m DIR -i "Hello world"        prints 12092,1533
//   echo -n "12092,1533" | statemamba-tokenize -t tokenizer.json --decode
#include <cxxopts.hpp>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mamba/tokenizer.h"
#include "tools/cli_errors.h"

namespace {

std::string trim(const std::string& s) {
  const size_t first = s.find_first_not_of(" \t\r\n"), last = s.find_last_not_of(" \t\r\n");
  return first == std::string::npos ? "" : s.substr(first, last - first + 1);
}

// "1, 2,3\n" -> {1, 2, 3}; blank input -> no ids; anything else is an error naming the bad entry.
std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  const std::string all = trim(text);
  if (all.empty()) return ids;
  std::istringstream in(all + ",");  // every entry, the last included, ends with a comma
  std::string entry;
  while (std::getline(in, entry, ',')) {
    const std::string token = trim(entry);
    size_t used = 0;
    long long value = -1;
    try {
      value = std::stoll(token, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (token.empty() || used != token.size() || value < 0)
      throw std::invalid_argument("--decode: entry " + std::to_string(ids.size()) + " '" + token +
                                  "' is not a non-negative integer id (expected ids like 12,0,7)");
    ids.push_back(value);
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("statemamba-tokenize",
                       "Encode text to token ids (one line, comma-separated) or decode ids to text, as HF "
                       "tokenizers does (no special tokens added or skipped).");
  cli.add_options()("t,tokenizer", "path of a tokenizer.json", cxxopts::value<std::string>())(
      "m,model-dir", "a model directory holding tokenizer.json", cxxopts::value<std::string>())(
      "i,input", "the text (or with --decode the ids); default: all of stdin, as is (a final newline is text too)", cxxopts::value<std::string>())(
      "decode", "decode comma-separated ids to text")("h,help", "show this help");
  std::string path, input;
  bool decode = false;
  try {
    auto args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help() << std::endl;
      return 0;
    }
    if (!args.unmatched().empty())
      throw cxxopts::exceptions::exception("unexpected argument '" + args.unmatched().front() + "' (text goes after -i)");
    if (args.count("tokenizer") == args.count("model-dir"))
      throw cxxopts::exceptions::exception("give exactly one of -t/--tokenizer FILE and -m/--model-dir DIR");
    path = args.count("tokenizer") ? args["tokenizer"].as<std::string>()
                                   : args["model-dir"].as<std::string>() + "/tokenizer.json";
    decode = args.count("decode") > 0;
    if (args.count("input")) {
      input = args["input"].as<std::string>();
    } else {
      input.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    }
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "statemamba-tokenize: " << e.what() << statemamba::tools::option_of_bad_value(argc, argv, e.what()) << "\n" << cli.help() << std::endl;
    return 2;
  }

  try {
    const auto tokenizer = statemamba::Tokenizer::from_file(path);
    if (decode) {
      std::vector<int64_t> ids;
      try {
        ids = parse_ids(input);
      } catch (const std::invalid_argument& e) {
        std::cerr << "statemamba-tokenize: " << e.what() << std::endl;
        return 2;
      }
      std::cout << tokenizer.decode(ids);
      std::cout.flush();
    } else {
      const auto ids = tokenizer.encode(input);
      for (size_t k = 0; k < ids.size(); ++k) std::cout << (k ? "," : "") << ids[k];
      std::cout << "\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << "statemamba-tokenize: " << e.what_without_backtrace() << std::endl;
    return 1;
  }
  return 0;
}
