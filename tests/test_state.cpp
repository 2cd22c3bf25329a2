// The state API on its own: construction, copies, row surgery, validation and files.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <thread>

#include <sys/stat.h>
#include <unistd.h>

#include "mamba/config.h"
#include "state/state.h"
#include "support/expect_error.h"
#include "support/tmpdir.h"

namespace statemamba {
namespace {

using test::expect_error;
using test::TempDir;

// Tiny tensors: extra threads only contend with each other (and with a busy machine).
const bool kSingleThreaded = (at::set_num_threads(1), true);

// d_inner 32, d_conv 4, d_state 8, two layers.
MambaConfig small_config() { return MambaConfig(16, 2, 37).d_state(8); }

MambaStackState random_state(const StateSpec& spec, int64_t batch, at::ScalarType dtype = at::kFloat) {
  auto s = MambaStackState::zeros(spec, batch, at::kCPU, dtype);
  for (auto& l : s.layers) {
    l.conv_state.normal_();
    l.ssm_state.normal_();
  }
  s.tokens = 123;
  return s;
}

void expect_same(const MambaStackState& a, const MambaStackState& b) {
  ASSERT_EQ(a.n_layer(), b.n_layer());
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.fingerprint, b.fingerprint);
  EXPECT_EQ(a.config, b.config);
  for (int64_t i = 0; i < a.n_layer(); ++i) {
    for (auto [x, y, name] : {std::tuple{a.layers[i].conv_state, b.layers[i].conv_state, "conv_state"},
                              std::tuple{a.layers[i].ssm_state, b.layers[i].ssm_state, "ssm_state"}}) {
      EXPECT_EQ(x.scalar_type(), y.scalar_type()) << "layer " << i << " " << name;
      EXPECT_TRUE(x.sizes() == y.sizes() && at::equal(x, y)) << "layer " << i << " " << name << " differs";
    }
  }
}

TEST(State, ZerosFollowTheContract) {
  const auto config = small_config();
  const auto s = MambaStackState::zeros(config, 3);
  ASSERT_EQ(s.n_layer(), 2);
  EXPECT_EQ(s.tokens, 0);
  EXPECT_EQ(s.fingerprint, config.fingerprint());
  EXPECT_EQ(s.config, config.to_json());
  for (const auto& l : s.layers) {
    EXPECT_EQ(l.conv_state.sizes(), (std::vector<int64_t>{3, 32, 3}));
    EXPECT_EQ(l.ssm_state.sizes(), (std::vector<int64_t>{3, 32, 8}));
    EXPECT_EQ(l.dtype(), at::kFloat);
    EXPECT_EQ(l.conv_state.count_nonzero().item<int64_t>() + l.ssm_state.count_nonzero().item<int64_t>(), 0);
  }
  EXPECT_EQ(MambaStackState::zeros(config, 1, at::kCPU, at::kDouble).dtype(), at::kDouble);
  expect_error([&] { MambaStackState::zeros(config, 1, at::kCPU, at::kHalf); }, {"float32 or float64", "Half"});
}

TEST(State, CloneCopiesDetachShares) {
  auto s = random_state(small_config(), 2);
  const auto c = s.clone();
  const auto d = s.detach();
  s.layers[0].ssm_state.fill_(7);
  EXPECT_NE(c.layers[0].ssm_state.max().item<float>(), 7);
  EXPECT_EQ(d.layers[0].ssm_state.min().item<float>(), 7);
  EXPECT_EQ(c.tokens, 123);
}

TEST(State, ToConvertsDtypeAndKeepsValues) {
  const auto s = random_state(small_config(), 2);
  const auto d = s.to(at::kCPU, at::kDouble);
  EXPECT_EQ(d.dtype(), at::kDouble);
  EXPECT_EQ(d.tokens, s.tokens);
  expect_same(d.to(at::kCPU, at::kFloat), s);
  expect_error([&] { s.to(at::kCPU, at::kBFloat16); }, {"MambaInferenceState::to", "float32 or float64"});
}

TEST(State, ResetZeroesMaskedRowsOnly) {
  const auto s = random_state(small_config(), 3);
  auto r = s.clone();
  r.reset(torch::tensor({false, true, false}));
  for (int64_t i = 0; i < 2; ++i) {
    for (auto [before, after] : {std::pair{s.layers[i].conv_state, r.layers[i].conv_state},
                                 std::pair{s.layers[i].ssm_state, r.layers[i].ssm_state}}) {
      EXPECT_TRUE(at::equal(after[0], before[0]));
      EXPECT_EQ(after[1].count_nonzero().item<int64_t>(), 0);
      EXPECT_TRUE(at::equal(after[2], before[2]));
    }
  }
  expect_error([&] { r.reset(torch::tensor({true, false})); }, {"mask", "bool [batch] = [3]", "[2]"});
  expect_error([&] { r.reset(torch::tensor({1, 0, 1})); }, {"mask", "bool"});
}

TEST(State, SelectForksAndReordersRows) {
  const auto s = random_state(small_config(), 2);
  const auto f = s.select(torch::tensor({1, 1, 0}));
  EXPECT_EQ(f.batch(), 3);
  EXPECT_EQ(f.tokens, s.tokens);
  for (int64_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(at::equal(f.layers[i].ssm_state[0], s.layers[i].ssm_state[1]));
    EXPECT_TRUE(at::equal(f.layers[i].ssm_state[1], s.layers[i].ssm_state[1]));
    EXPECT_TRUE(at::equal(f.layers[i].conv_state[2], s.layers[i].conv_state[0]));
  }
  expect_same(s.index_select(torch::tensor({0, 1})), s);
  expect_error([&] { s.select(torch::tensor({0, 2})); }, {"selects row 2", "batch of 2"});
  expect_error([&] { s.select(torch::tensor({0.5})); }, {"indices", "int64"});
}

TEST(State, CatJoinsRowsOfOneModel) {
  auto s = random_state(small_config(), 3);
  auto a = s.select(torch::tensor({0})), b = s.select(torch::tensor({1, 2}));
  b.tokens = 200;
  auto joined = MambaStackState::cat({a, b});
  EXPECT_EQ(joined.tokens, 200);
  joined.tokens = s.tokens;
  expect_same(joined, s);

  auto other = random_state(small_config().norm_eps(1e-6), 1);
  expect_error([&] { MambaStackState::cat({s, other}); }, {"state 1", "another model"});
  auto wide = random_state(small_config().d_state(4), 1);
  wide.fingerprint = s.fingerprint;
  expect_error([&] { MambaStackState::cat({s, wide}); }, {"state 1", "ssm_state [1, 32, 4]", "[3, 32, 8]"});
}

TEST(State, ValidateNamesLayerTensorAndShapes) {
  const auto config = small_config();
  auto s = random_state(config, 2);
  s.validate_for(config);
  s.validate_for(config, 2, at::kCPU, at::kFloat);

  auto bad = s.clone();
  bad.layers[1].ssm_state = at::zeros({2, 32, 4});
  expect_error([&] { bad.validate_for(config); },
               {"layer 1", "ssm_state", "[2, 32, 4]", "[batch, d_inner, d_state] = [2, 32, 8]"});
  bad = s.clone();
  bad.layers[0].conv_state = at::zeros({2, 32, 4});
  expect_error([&] { bad.validate_for(config); }, {"layer 0", "conv_state", "[2, 32, 4]", "[2, 32, 3]"});
  bad = s.clone();
  bad.layers[1] = bad.layers[1].select(torch::tensor({0}));
  expect_error([&] { bad.validate_for(config); }, {"layer 1", "batch 1", "layer 0 has 2"});
  bad = s.clone();
  bad.layers[1].ssm_state = bad.layers[1].ssm_state.to(at::kHalf);
  expect_error([&] { bad.validate_for(config); }, {"layer 1", "float32 or float64", "Half"});

  expect_error([&] { s.validate_for(small_config().n_layer(3)); }, {"2 layers", "the model has 3"});
  // Same shapes, another architecture: the fingerprint tells them apart.
  expect_error([&] { s.validate_for(small_config().rms_norm(false)); }, {"another model", s.fingerprint});
  expect_error([&] { s.validate_for(config, 3, at::kCPU, at::kFloat); }, {"batch 2", "input has batch 3"});
  expect_error([&] { s.validate_for(config, 2, at::kCPU, at::kDouble); }, {"state is Float", "needs Double"});
}

class StateFiles : public ::testing::TestWithParam<const char*> {
 protected:
  std::string file(const std::string& stem) const { return dir.file(stem + GetParam()); }
  TempDir dir;
};

TEST_P(StateFiles, SaveLoadRoundTripsExactly) {
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const auto s = random_state(small_config(), 3, dtype);
    const auto path = file("state");
    s.save(path);
    expect_same(MambaStackState::load(path), s);
    expect_same(MambaStackState::load(path, small_config()), s);
  }
  // Only the file itself is left: the temporary was renamed over it.
  EXPECT_EQ(dir.entries(), std::vector<std::string>{std::string("state") + GetParam()});
}

TEST_P(StateFiles, SaveReplacesAWholeFile) {
  const auto path = file("state");
  random_state(small_config(), 3).save(path);
  const auto second = random_state(small_config(), 1);
  second.save(path);
  expect_same(MambaStackState::load(path), second);
  expect_error([&] { second.save(dir.file("missing/state") + GetParam()); }, {"directory", "does not exist"});
}

TEST_P(StateFiles, LoadRefusesAnotherModel) {
  const auto path = file("state");
  random_state(small_config(), 2).save(path);
  expect_error([&] { MambaStackState::load(path, small_config().d_state(16)); },
               {path, "does not fit this model", "ssm_state", "[2, 32, 16]"});
  expect_error([&] { MambaStackState::load(path, small_config().rms_norm(false)); }, {path, "another model"});
}

TEST_P(StateFiles, TruncatedFilesAreClearErrors) {
  const auto path = file("state");
  random_state(small_config(), 4).save(path);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  ASSERT_EQ(::truncate(path.c_str(), st.st_size / 2), 0);
  expect_error([&] { MambaStackState::load(path); }, {"MambaStackState::load", path, "truncated"});
}

TEST_P(StateFiles, ForeignFilesAreClearErrors) {
  const auto path = file("foreign");
  std::ofstream(path) << "not a state";
  expect_error([&] { MambaStackState::load(path); }, {"MambaStackState::load", path});
  expect_error([&] { MambaStackState::load(file("absent")); }, {"no such file"});
}

TEST_P(StateFiles, ThreadsSaveAndLoadAtOnce) {
  const auto s = random_state(small_config(), 2);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const auto path = file("state" + std::to_string(t));
      for (int i = 0; i < 5; ++i) {
        s.save(path);
        const auto back = MambaStackState::load(path);
        ok[t] += at::equal(back.layers[1].ssm_state, s.layers[1].ssm_state);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(ok, std::vector<int>(4, 5));
}

INSTANTIATE_TEST_SUITE_P(Formats, StateFiles, ::testing::Values(".pt", ".h5"),
                         [](const auto& info) { return std::string(info.param + 1); });

// A torch archive with our layout but other header values.
void write_archive(const std::string& path, const std::string& format, int64_t version) {
  torch::serialize::OutputArchive root;
  root.write("format", format);
  root.write("format_version", version);
  root.write("n_layer", int64_t{1});
  root.write("tokens", int64_t{0});
  root.write("fingerprint", std::string());
  root.write("config", std::string("{}"));
  root.save_to(path);
}

TEST(StateFileHeader, NewerOrForeignFormatsAreRefused) {
  TempDir dir;
  const auto path = dir.file("state.pt");
  write_archive(path, "statemamba.MambaStackState", 99);
  expect_error([&] { MambaStackState::load(path); }, {"format version 99", "reads version 1"});
  write_archive(path, "something.else", 1);
  expect_error([&] { MambaStackState::load(path); }, {"not a statemamba state file", "something.else"});
  torch::serialize::OutputArchive empty;
  empty.save_to(path);
  expect_error([&] { MambaStackState::load(path); }, {"not a statemamba state file", "'format'"});
}

TEST(StateFileHeader, UnknownExtensionsAreRefused) {
  const auto s = random_state(small_config(), 1);
  expect_error([&] { s.save("/tmp/state.bin"); }, {"'.bin'", "use .pt", ".h5"});
  expect_error([&] { MambaStackState::load("/tmp/state"); }, {"use .pt"});
}

}  // namespace
}  // namespace statemamba
