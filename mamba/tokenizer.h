#pragma once
// Tokenizer: the byte-level BPE of GPT-NeoX (and so of the Mamba checkpoints), read from a
// Hugging Face tokenizer.json. encode/decode give exactly what HF `tokenizers` gives:
//   auto tok = Tokenizer::from_file(dir + "/tokenizer.json");
//   std::vector<int64_t> ids = tok.encode("Hello world");   // add_special_tokens=False
//   std::string text = tok.decode(ids);                       // skip_special_tokens=False
// Supported: model BPE (merges as "a b" strings or [a, b] pairs), added tokens (special or not),
// normalizer none or NFC, pre-tokenizer ByteLevel or Sequence[Split(GPT-2 regex), ByteLevel],
// decoder ByteLevel. Anything else is refused at load with a c10::Error naming it.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace statemamba {

class Tokenizer {
 public:
  // Throws c10::Error naming the file and the problem (missing, bad JSON, unsupported component).
  static Tokenizer from_file(const std::string& tokenizer_json_path);
  // The same from the JSON text itself; `origin` names it in errors.
  static Tokenizer from_json(const std::string& json, const std::string& origin = "tokenizer.json");

  // Ids as HF tokenizers' encode(text, add_special_tokens=False) gives; invalid UTF-8 -> c10::Error
  // naming the byte offset.
  std::vector<int64_t> encode(const std::string& text) const;
  // Text as HF decode(ids, skip_special_tokens=False); an id out of range -> c10::Error. Bytes that
  // do not form valid UTF-8 (a token boundary splitting a character) become U+FFFD, as in HF.
  std::string decode(const std::vector<int64_t>& ids) const;

  std::optional<int64_t> token_to_id(const std::string& token) const;
  // The token's string as stored in the vocabulary (byte-level alphabet), or nullopt if unused.
  std::optional<std::string> id_to_token(int64_t id) const;
  // One more than the largest id in the vocabulary or the added tokens (HF get_vocab_size(True)).
  int64_t vocab_size() const;
  std::optional<int64_t> eos_id() const;  // "<|endoftext|>", else "</s>", "<|end_of_text|>", "<eos>"
  bool is_special(int64_t id) const;      // an added token marked "special"

  // Copies share the loaded tables (immutable); encode/decode are safe to call from several threads.
 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace statemamba
