// statemamba-rl end to end: its flags, its bad-flag messages, the horizon curriculum, and --resume
// (a run stopped and resumed writes the same metrics as one that never stopped); statemamba-plot
// on the metrics it writes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "support/program.h"
#include "support/tmpdir.h"

namespace {

using statemamba::test::ProgramResult;
using statemamba::test::read_text;

// A metrics CSV as a header and rows of cells.
struct Csv {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  size_t column(const std::string& name) const {
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return i;
    ADD_FAILURE() << "no column " << name;
    return 0;
  }
};

Csv read_csv(const std::string& path) {
  Csv csv;
  std::istringstream lines(read_text(path));
  std::string line;
  bool first = true;
  while (std::getline(lines, line)) {
    std::vector<std::string> cells;
    std::istringstream fields(line);
    for (std::string cell; std::getline(fields, cell, ',');) cells.push_back(cell);
    if (first) csv.header = cells, first = false;
    else csv.rows.push_back(cells);
  }
  return csv;
}

class RlProgram : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access(program_.c_str(), X_OK) != 0) GTEST_FAIL() << "no program " << program_ << " (build all targets first)";
  }
  ProgramResult rl(std::vector<std::string> args) {
    args.insert(args.end(), {"--device", "cpu", "--threads", "1"});
    return statemamba::test::run_program(program_, args, dir_.file("stderr"));
  }
  // A small memory task that a curriculum from delay 1 climbs to delay 6 in a few updates. An update
  // sees ~150 episodes, so a window of 200 answers spans two updates: a stage's restart shows in it.
  std::vector<std::string> curriculum_run(const std::string& out, int64_t updates) const {
    return {"--mode", "quick", "--controller", "mamba", "--num-bits", "1", "--horizon", "6", "--curriculum", "1",
            "--curriculum-threshold", "0.6", "--num-envs", "32", "--rollout-len", "16", "--accuracy-window", "200",
            "--total-updates", std::to_string(updates), "--checkpoint-every", "100", "--out", out};
  }

  const std::string program_ = statemamba::test::program_path("rl");
  statemamba::test::TempDir dir_;
};

TEST_F(RlProgram, HelpListsEveryGroupOfFlags) {
  const ProgramResult r = rl({"--help"});
  EXPECT_EQ(r.status, 0) << r.err;
  for (const char* flag : {"--mode", "--controller", "--horizon", "--curriculum", "--curriculum-factor",
                           "--curriculum-threshold", "--num-bits", "--dt-min", "--rollout-len", "--grad-chunks",
                           "--resume", "--cuda-graph", "--grad-norms", "--skip-grad-spikes", "--advantage-norm"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag << " is not in --help:\n" << r.out;
}

TEST_F(RlProgram, BadFlagsNameTheFlagAndExit2) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--curriculum", "4", "--task", "repeat-previous"}, "--curriculum is for --task memory, got --task repeat-previous"},
      {{"--curriculum", "-3"}, "--curriculum must be 0 (off) or a starting delay, got -3"},
      {{"--curriculum", "2", "--curriculum-factor", "1"}, "--curriculum-factor must be in (1, 1000]"},
      {{"--curriculum-threshold", "1.5"}, "--curriculum-threshold must be in [0.000, 1.000], got 1.5"},
      {{"--mode", "fast"}, "--mode must be one of"},
      {{"--num-envs", "0"}, "--num-envs must be at least 1, got 0"},
      {{"--num-envs", "10", "--minibatches", "4"}, "--minibatches (4) must divide --num-envs (10)"},
      {{"--horizon", "abc"}, "Argument ‘abc’ failed to parse (the value of --horizon)"},
      {{"--stop-at=x"}, "(the value of --stop-at)"},
      {{"--no-such-flag"}, "no-such-flag"},
      {{"--skip-grad-spikes", "0.5"}, "--skip-grad-spikes must be 0 (off) or a factor in (1, 1e6], got 0.5"},
      {{"--advantage-norm", "max"}, "--advantage-norm must be one of std, off, got 'max'"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = c.args;
    args.insert(args.end(), {"--out", dir_.file("bad")});
    const ProgramResult r = rl(args);
    EXPECT_EQ(r.status, 2) << c.message << "\n" << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << "expected '" << c.message << "' in:\n" << r.err;
  }
  // A rejected command line trains nothing and writes nothing.
  EXPECT_NE(::access(dir_.file("bad").c_str(), F_OK), 0);
}

TEST_F(RlProgram, CurriculumGrowsTheDelayToTheTaskAskedFor) {
  const std::string out = dir_.file("curriculum");
  std::vector<std::string> args = curriculum_run(out, 40);
  args.push_back("--grad-norms");
  const ProgramResult r = rl(args);
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  // --grad-norms: a row per gradient step (4 epochs x 2 minibatches per update), a column per parameter.
  const Csv norms = read_csv(out + "/mamba-h6-grad-norms.csv");
  ASSERT_EQ(norms.rows.size(), 40u * 8u);
  ASSERT_GE(norms.header.size(), 4u);
  EXPECT_EQ(norms.header[0] + "," + norms.header[1] + "," + norms.header[2], "update,step,encoder.weight");
  EXPECT_EQ(norms.rows.back()[0] + "," + norms.rows.back()[1], "40,7");
  for (const auto& row : norms.rows) ASSERT_EQ(row.size(), norms.header.size());
  EXPECT_NE(r.out.find("at delay 1 after update"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("the delay is now 2"), std::string::npos) << r.out;

  // Episode lengths (delay + 2) never shrink, start at the curriculum's first stage and end at the task's.
  const Csv csv = read_csv(out + "/mamba-h6.csv");
  ASSERT_EQ(csv.rows.size(), 40u);
  const size_t length = csv.column("episode_length"), answers = csv.column("window_answers");
  EXPECT_EQ(std::stod(csv.rows.front()[length]), 3.0);
  double previous = 0;
  for (const auto& row : csv.rows) {
    EXPECT_GE(std::stod(row[length]), previous);
    previous = std::stod(row[length]);
  }
  EXPECT_EQ(previous, 8.0) << r.out;
  // A stage's statistics restart: the window counts only answers from episodes begun in it.
  bool restarted = false;
  for (size_t i = 1; i < csv.rows.size(); ++i)
    if (csv.rows[i][length] != csv.rows[i - 1][length])
      restarted |= std::stod(csv.rows[i][answers]) < std::stod(csv.rows[i - 1][answers]);
  EXPECT_TRUE(restarted);
}

TEST_F(RlProgram, ResumedCurriculumRunEqualsAnUninterruptedOne) {
  const std::string whole = dir_.file("whole"), split = dir_.file("split");
  ProgramResult r = rl(curriculum_run(whole, 12));
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  r = rl(curriculum_run(split, 5));
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  std::vector<std::string> resume = curriculum_run(split, 12);
  resume.push_back("--resume");
  r = rl(resume);
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("resumed mamba-h6 from"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("at update 5"), std::string::npos) << r.out;

  const Csv a = read_csv(whole + "/mamba-h6.csv"), b = read_csv(split + "/mamba-h6.csv");
  ASSERT_EQ(a.header, b.header);
  ASSERT_EQ(a.rows.size(), 12u);
  ASSERT_EQ(b.rows.size(), 12u);
  const size_t length = a.column("episode_length");
  // The curriculum moves on after the stop too (else the test would prove less).
  EXPECT_NE(a.rows[4][length], a.rows.back()[length]);
  for (size_t i = 0; i < a.rows.size(); ++i)
    for (size_t j = 0; j < a.header.size(); ++j) {
      const std::string& name = a.header[j];
      if (name == "seconds" || name == "steps_per_second" || name == "rollout_seconds") continue;  // timings
      EXPECT_EQ(a.rows[i][j], b.rows[i][j]) << name << " at update " << i + 1;
    }
}

TEST_F(RlProgram, PlotDrawsRunsFromTheirMetrics) {
  const std::string out = dir_.file("run"), png = dir_.file("runs.png");
  ASSERT_EQ(rl(curriculum_run(out, 3)).status, 0);
  const std::string plot = statemamba::test::program_path("plot"), err = dir_.file("plot-stderr");
  const std::string metrics = out + "/mamba-h6.json";
  ProgramResult r = statemamba::test::run_program(plot, {"-o", png, metrics + "=first, with a comma", metrics}, err);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("(2 runs)"), std::string::npos) << r.out;
  EXPECT_EQ(read_text(png).substr(0, 8), "\x89PNG\r\n\x1a\n");
  r = statemamba::test::run_program(plot, {"-o", png, "-y", "episode_length", metrics}, err);
  EXPECT_EQ(r.status, 0) << r.err;

  struct Case {
    std::vector<std::string> args;
    int status;
    std::string message;
  };
  std::ofstream(dir_.file("not.json")) << "{\"history\": [{\"update\": 1}]";
  std::ofstream(dir_.file("other.json")) << "{\"rows\": []}";
  const std::vector<Case> cases = {
      {{metrics}, 2, "-o/--out: the PNG to write is required"},
      {{"-o", png}, 2, "no runs given"},
      {{"-o", png, "--colour", "red", metrics}, 2, "unknown option '--colour'"},
      {{"-o", png, dir_.file("missing.json")}, 1, "cannot read " + dir_.file("missing.json")},
      {{"-o", png, dir_.file("not.json")}, 1, "not.json is not JSON"},
      {{"-o", png, dir_.file("other.json")}, 1, "expected an object with a \"history\" array"},
      {{"-o", png, "-y", "speed", metrics}, 1, "update 1 has no column 'speed' (it has accuracy, answers,"},
      {{"-o", dir_.file("no/such/dir/x.png"), metrics}, 1, "cannot write"},
  };
  for (const auto& c : cases) {
    r = statemamba::test::run_program(plot, c.args, err);
    EXPECT_EQ(r.status, c.status) << c.message << "\n" << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << "expected '" << c.message << "' in:\n" << r.err;
  }
}

}  // namespace
