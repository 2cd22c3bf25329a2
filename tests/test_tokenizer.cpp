// The tokenizer against HF tokenizers' own outputs (tests/data/tiny-tokenizer, made by
// tests/data/make_tokenizer_fixture.py), plus its errors and the statemamba-tokenize program.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "mamba/tokenizer.h"
#include "support/expect_error.h"
#include "support/program.h"
#include "support/tmpdir.h"

namespace {

using json = nlohmann::json;
using statemamba::Tokenizer;
using statemamba::test::expect_error;

std::string data_dir() {
  const char* dir = std::getenv("STATEMAMBA_TEST_DATA");
  return std::string(dir && *dir ? dir : "tests/data") + "/tiny-tokenizer";
}

using statemamba::test::read_text;

const json& base_json() {
  static const json j = json::parse(read_text(data_dir() + "/tokenizer.json"));
  return j;
}
const json& reference() {
  static const json j = json::parse(read_text(data_dir() + "/reference.json"));
  return j;
}

Tokenizer with_patch(const json& patch) {
  json j = base_json();
  for (const auto& [key, value] : patch.items()) j[key] = value;
  return Tokenizer::from_json(j.dump(), "patched tokenizer.json");
}

std::string show(const std::string& s) { return json(s).dump(); }  // escaped, for failure messages

// Every hard string of every variant: ids as HF's, decode as HF's.
TEST(Tokenizer, MatchesHuggingFaceOnEveryReferenceString) {
  size_t checked = 0;
  for (const json& variant : reference()["variants"]) {
    const std::string name = variant["name"];
    const Tokenizer tok = with_patch(variant["patch"]);
    for (const json& c : variant["cases"]) {
      const std::string text = c["text"];
      const auto expected = c["ids"].get<std::vector<int64_t>>();
      EXPECT_EQ(tok.encode(text), expected) << "variant " << name << ", text " << show(text);
      const std::string decoded = c.contains("decoded") ? c["decoded"].get<std::string>() : text;
      EXPECT_EQ(tok.decode(expected), decoded) << "variant " << name << ", text " << show(text);
      ++checked;
    }
  }
  EXPECT_GT(checked, 400u);
}

TEST(Tokenizer, RoundTripGivesTheTextBackWhenNfcLeavesItAlone) {
  const Tokenizer tok = Tokenizer::from_file(data_dir() + "/tokenizer.json");
  for (const char* s : {"", "plain ascii", "  two  spaces  ", "Zürich 東京 👩‍💻\t\n", "<|endoftext|>x<|padding|>"})
    EXPECT_EQ(tok.decode(tok.encode(s)), s) << show(s);
}

TEST(Tokenizer, DecodesSplitMultiByteCharactersAsHuggingFace) {
  const Tokenizer tok = Tokenizer::from_file(data_dir() + "/tokenizer.json");
  for (const json& c : reference()["decodes"]) {
    const auto ids = c["ids"].get<std::vector<int64_t>>();
    EXPECT_EQ(tok.decode(ids), c["text"].get<std::string>()) << "ids " << c["ids"].dump();
  }
}

// tokenizers >= 0.20 writes merges as [a, b]; older files have "a b". Both must give the same ids.
TEST(Tokenizer, MergesAsStringsEqualMergesAsPairs) {
  json j = base_json();
  json& merges = j["model"]["merges"];
  ASSERT_TRUE(merges.at(0).is_array()) << "the fixture was expected to hold [a, b] merges";
  for (json& m : merges) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  const Tokenizer strings = Tokenizer::from_json(j.dump());
  const Tokenizer pairs = Tokenizer::from_json(base_json().dump());
  for (const json& c : reference()["variants"][0]["cases"]) {
    EXPECT_EQ(strings.encode(c["text"]), c["ids"].get<std::vector<int64_t>>()) << show(c["text"]);
    EXPECT_EQ(strings.encode(c["text"]), pairs.encode(c["text"]));
  }
}

TEST(Tokenizer, VocabularyQueries) {
  const Tokenizer tok = Tokenizer::from_file(data_dir() + "/tokenizer.json");
  EXPECT_EQ(tok.vocab_size(), reference()["vocab_size"].get<int64_t>());
  EXPECT_EQ(tok.token_to_id("<|endoftext|>"), 0);
  EXPECT_EQ(tok.token_to_id("<|padding|>"), 1);
  EXPECT_EQ(tok.eos_id(), 0);
  EXPECT_TRUE(tok.is_special(0));
  const auto added = tok.token_to_id("statemamba");
  ASSERT_TRUE(added.has_value());
  EXPECT_FALSE(tok.is_special(*added));
  EXPECT_EQ(tok.token_to_id("no such token"), std::nullopt);
  EXPECT_EQ(tok.id_to_token(0), "<|endoftext|>");
  EXPECT_EQ(tok.id_to_token(tok.vocab_size()), std::nullopt);
  // Every id decodes, and the byte stand-in "Ġ" is a space.
  for (int64_t id = 0; id < tok.vocab_size(); ++id) EXPECT_NO_THROW(tok.decode({id}));
  EXPECT_EQ(tok.decode({*tok.token_to_id("\xC4\xA0")}), " ");
}

TEST(Tokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  const Tokenizer tok = Tokenizer::from_file(data_dir() + "/tokenizer.json");
  expect_error([&] { tok.decode({5, tok.vocab_size()}); },
               {"ids[1]", std::to_string(tok.vocab_size()), "not a token id"});
  expect_error([&] { tok.decode({-1}); }, {"ids[0]", "-1"});
}

TEST(Tokenizer, InvalidUtf8NamesTheByteOffset) {
  const Tokenizer tok = Tokenizer::from_file(data_dir() + "/tokenizer.json");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"abc\xFF", "byte offset 3"},           {"ab\xE2\x82", "byte offset 2 (truncated"},
      {"\xC0\xAF overlong", "byte offset 0"}, {"a\xED\xA0\x80 surrogate", "byte offset 1"},
      {"\xF4\x90\x80\x80", "byte offset 0"},  {"\xC3\xA9\x80 lone continuation", "byte offset 2"},
      {"ok \xE2\x82x", "byte offset 3"},      {std::string("nul\0ok\xF8", 7), "byte offset 6"},
  };
  for (const auto& [text, where] : cases)
    expect_error([&] { tok.encode(text); }, {"Tokenizer::encode", "not valid UTF-8", where});
  EXPECT_EQ(tok.decode(tok.encode(std::string("nul\0ok", 6))), std::string("nul\0ok", 6));
}

TEST(Tokenizer, MalformedTokenizerJsonGivesClearErrors) {
  auto load = [](const json& j) { return [s = j.dump()] { Tokenizer::from_json(s, "bad.json"); }; };
  expect_error([] { Tokenizer::from_json("{\"model\": ", "bad.json"); }, {"bad.json", "not valid JSON"});
  expect_error([] { Tokenizer::from_json("[1, 2]", "bad.json"); }, {"bad.json", "JSON object"});
  json j = base_json();
  j.erase("model");
  expect_error(load(j), {"bad.json", "no \"model\""});
  j = base_json();
  j["model"]["type"] = "WordPiece";
  expect_error(load(j), {"bad.json", "\"WordPiece\"", "not supported"});
  j = base_json();
  j["model"]["merges"][3] = json::array({"zz-not-a-token", "a"});
  expect_error(load(j), {"bad.json", "merges[3]", "not in model.vocab", "zz-not-a-token"});
  j = base_json();
  j["model"]["merges"][0] = "onlyonetoken";
  expect_error(load(j), {"bad.json", "merges[0]", "two tokens"});
  j = base_json();
  j["model"]["merges"][1] = 42;
  expect_error(load(j), {"bad.json", "merges[1]"});
  j = base_json();
  j["model"]["vocab"]["a"] = "seven";
  expect_error(load(j), {"bad.json", "model.vocab[\"a\"]", "non-negative integer"});
  j = base_json();
  j["normalizer"] = {{"type", "NFKC"}};
  expect_error(load(j), {"bad.json", "normalizer", "NFKC", "not supported"});
  j = base_json();
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_error(load(j), {"bad.json", "pre-tokenizer", "Whitespace", "not supported"});
  j = base_json();
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "\\s+"}}}, {"behavior", "Isolated"}},
                                           {{"type", "ByteLevel"}, {"use_regex", false}}}}};
  expect_error(load(j), {"bad.json", "GPT-2 regex"});
  j = base_json();
  j["decoder"] = nullptr;
  expect_error(load(j), {"bad.json", "decoder", "only ByteLevel"});
  j = base_json();
  j["added_tokens"][0].erase("id");
  expect_error(load(j), {"bad.json", "added_tokens[0]", "\"id\""});
  j = base_json();
  j["added_tokens"][1]["lstrip"] = "yes";
  expect_error(load(j), {"bad.json", "lstrip", "true or false"});
  expect_error([] { Tokenizer::from_file("/nonexistent/dir/tokenizer.json"); },
               {"/nonexistent/dir/tokenizer.json", "cannot open"});
}

TEST(Tokenizer, CopiesShareTablesAndThreadsAgree) {
  const Tokenizer tok = Tokenizer::from_file(data_dir() + "/tokenizer.json");
  const std::string text = reference()["variants"][0]["cases"].back()["text"];
  const auto expected = tok.encode(text);
  const Tokenizer copy = tok;
  std::vector<int64_t> a, b;
  std::thread t1([&] { for (int k = 0; k < 20; ++k) a = tok.encode(text); });
  std::thread t2([&] { for (int k = 0; k < 20; ++k) b = copy.encode(text); });
  t1.join();
  t2.join();
  EXPECT_EQ(a, expected);
  EXPECT_EQ(b, expected);
}

// A few MB of text must go through in seconds, not minutes.
TEST(Tokenizer, EncodesMegabytesQuickly) {
  const Tokenizer tok = Tokenizer::from_file(data_dir() + "/tokenizer.json");
  std::string text;
  for (const json& c : reference()["variants"][0]["cases"]) text += c["text"].get<std::string>() + "\n";
  while (text.size() < (2u << 20)) text += text;
  const auto start = std::chrono::steady_clock::now();
  const auto ids = tok.encode(text);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "  encoded " << text.size() / 1e6 << " MB into " << ids.size() << " ids in " << seconds << " s\n";
  EXPECT_LT(seconds, 30.0);
  EXPECT_EQ(tok.decode(ids).size(), tok.decode(tok.encode(text)).size());
}

// ---- statemamba-tokenize ----------------------------------------------------------------------
// Both streams together, as a user sees them.
statemamba::test::ProgramResult run_command(const std::string& command) {
  return statemamba::test::run_shell(command + " 2>&1");
}

TEST(TokenizeProgram, EncodesDecodesAndRefusesBadInput) {
  const std::string program = statemamba::test::program_path("tokenize");
  if (::access(program.c_str(), X_OK) != 0) GTEST_SKIP() << "no " << program << " (not built?)";
  const std::string file = data_dir() + "/tokenizer.json";
  const Tokenizer tok = Tokenizer::from_file(file);
  const std::string text = "Hello <|endoftext|> Zürich 東京";
  std::string ids_line;
  for (int64_t id : tok.encode(text)) ids_line += (ids_line.empty() ? "" : ",") + std::to_string(id);

  auto r = run_command("'" + program + "' -t '" + file + "' -i '" + text + "'");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(r.out, ids_line + "\n");
  r = run_command("printf '%s' '" + text + "' | '" + program + "' -m '" + data_dir() + "'");
  EXPECT_EQ(r.out, ids_line + "\n");
  r = run_command("'" + program + "' -t '" + file + "' --decode -i '" + ids_line + "'");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(r.out, text);
  r = run_command("echo '" + ids_line + "' | '" + program + "' -t '" + file + "' --decode");
  EXPECT_EQ(r.out, text);

  r = run_command("'" + program + "' --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("--decode"), std::string::npos);
  r = run_command("'" + program + "' -i x");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("exactly one of -t/--tokenizer"), std::string::npos) << r.out;
  r = run_command("'" + program + "' -t '" + file + "' --no-such-flag");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("no-such-flag"), std::string::npos) << r.out;
  r = run_command("'" + program + "' -m /nonexistent -i x");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.out.find("/nonexistent/tokenizer.json"), std::string::npos) << r.out;
  r = run_command("'" + program + "' -t '" + file + "' --decode -i '5,x,7'");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("entry 1 'x'"), std::string::npos) << r.out;
  r = run_command("'" + program + "' -t '" + file + "' --decode -i '5,99999'");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.out.find("99999"), std::string::npos) << r.out;
  r = run_command("printf 'ab\\377' | '" + program + "' -t '" + file + "'");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.out.find("byte offset 2"), std::string::npos) << r.out;
}

}  // namespace
