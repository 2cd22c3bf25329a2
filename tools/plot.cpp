// statemamba-plot: one PNG with a curve per statemamba-rl run, from the runs' metrics JSON (what
// statemamba-rl writes into --out as <controller>-h<horizon>.json), e.g. to compare runs trained
// into different folders or on different machines.
//   statemamba-plot -o acc.png out/a/mamba-h1000.json out/b/gru-h1000.json
//   statemamba-plot -o delay.png -y episode_length --title "curriculum" 'out/a/mamba-h1000.json=seed 0'
// A run's label is its folder's name (or the text after '='); -y and -x name any column of
// the metrics (accuracy, mean_return, entropy, episode_length, env_steps, update, ...).
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "rl/plot.h"
#include "tools/cli_errors.h"

namespace {

using json = nlohmann::json;
using statemamba::rl::Series;

// "path/to/dir/run.json=label" -> (path, label); the label defaults to the file's folder name,
// else the file's name.
std::pair<std::string, std::string> path_and_label(const std::string& spec) {
  const size_t equals = spec.find('=');
  const std::string path = spec.substr(0, equals);
  if (equals != std::string::npos) return {path, spec.substr(equals + 1)};
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash == 0) return {path, path};
  const size_t start = path.rfind('/', slash - 1) + 1;  // npos + 1 == 0: a relative folder
  return {path, path.substr(start, slash - start)};
}

// One run's (x, y) columns from its metrics JSON; std::runtime_error naming the file and what is
// wrong with it.
Series read_series(const std::string& path, const std::string& label, const std::string& x, const std::string& y) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  json doc;
  try {
    doc = json::parse(in);
  } catch (const json::exception& e) {
    throw std::runtime_error(path + " is not JSON: " + e.what());
  }
  if (!doc.is_object() || !doc.contains("history") || !doc["history"].is_array())
    throw std::runtime_error(path + " is not statemamba-rl metrics: expected an object with a \"history\" array");
  Series s;
  s.label = label;
  for (const auto& row : doc["history"]) {
    if (!row.is_object()) throw std::runtime_error(path + ": update " + std::to_string(s.x.size() + 1) + " is not an object");
    for (const auto& column : {x, y})
      if (!row.contains(column)) {
        std::string columns;
        for (const auto& item : row.items()) columns += (columns.empty() ? "" : ", ") + item.key();
        throw std::runtime_error(path + ": update " + std::to_string(s.x.size() + 1) + " has no column '" + column +
                                 "' (it has " + columns + ")");
      }
    auto number = [&](const std::string& column) {
      const json& v = row[column];
      if (v.is_null()) return std::numeric_limits<double>::quiet_NaN();  // e.g. no answer yet
      if (!v.is_number()) throw std::runtime_error(path + ": column '" + column + "' holds " + v.dump() + ", not a number");
      return v.get<double>();
    };
    s.x.push_back(number(x));
    s.y.push_back(number(y));
  }
  if (s.x.empty()) throw std::runtime_error(path + " holds no updates");
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("statemamba-plot", "One PNG with a curve per statemamba-rl run, from the runs' metrics JSON.");
  cli.custom_help("-o PNG [options]").positional_help("RUN.json[=LABEL]...");
  cli.add_options()
      ("o,out", "the PNG to write", cxxopts::value<std::string>())
      ("y,y-axis", "the metric on the vertical axis", cxxopts::value<std::string>()->default_value("accuracy"))
      ("x,x-axis", "the metric on the horizontal axis", cxxopts::value<std::string>()->default_value("update"))
      ("title", "the plot's title", cxxopts::value<std::string>()->default_value(""))
      ("h,help", "show this help");
  // The runs are what is left over: cxxopts would split a positional list at commas, labels too.
  cli.allow_unrecognised_options();
  try {
    const auto args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help() << std::endl;
      return 0;
    }
    if (!args.count("out")) throw cxxopts::exceptions::exception("-o/--out: the PNG to write is required");
    const std::vector<std::string> runs = args.unmatched();
    for (const auto& run : runs)
      if (run.size() > 1 && run[0] == '-') throw cxxopts::exceptions::exception("unknown option '" + run + "'");
    if (runs.empty()) throw cxxopts::exceptions::exception("no runs given: name one or more metrics JSON files");
    const std::string out = args["out"].as<std::string>();
    statemamba::rl::PlotOptions options;
    std::vector<Series> series;
    options.x_label = args["x-axis"].as<std::string>();
    options.y_label = args["y-axis"].as<std::string>();
    options.title = args["title"].as<std::string>();
    if (options.y_label == "accuracy") options.y_min = 0, options.y_max = 1;
    for (const auto& spec : runs) {
      const auto [path, label] = path_and_label(spec);
      series.push_back(read_series(path, label, options.x_label, options.y_label));
    }
    statemamba::rl::plot_lines(out, series, options);
    std::cout << "plot: " << out << " (" << series.size() << (series.size() == 1 ? " run)" : " runs)") << std::endl;
    return 0;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "statemamba-plot: " << e.what() << statemamba::tools::option_of_bad_value(argc, argv, e.what())
              << "\n(statemamba-plot --help lists the options)" << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "statemamba-plot: " << e.what() << std::endl;
    return 1;
  }
}
