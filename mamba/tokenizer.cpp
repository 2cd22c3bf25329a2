// Byte-level BPE as HF `tokenizers` runs it (tokenizer.json), step for step:
//   1. added tokens with normalized=false are cut out of the raw text (leftmost-longest matches);
//   2. each remaining piece is normalized (NFC or nothing), then added tokens with normalized=true
//      are cut out of it;
//   3. each remaining piece is pre-tokenized (optional Split on the GPT-2 regex, then ByteLevel:
//      optional prefix space, optional GPT-2 regex split, bytes -> printable characters);
//   4. each pre-token is merged by BPE (lowest merge rank first, leftmost on ties).
// Decoding maps each token's characters back to bytes and replaces invalid UTF-8 with U+FFFD.
#include "mamba/tokenizer.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

namespace statemamba {
namespace {

using json = nlohmann::json;

// ---- Unicode tables ------------------------------------------------------------------------------
struct CodePointRange {
  uint32_t first, last;
};
struct CombiningClassRange {
  uint32_t first, last, combining_class;
};
struct Decomposition {
  uint32_t code_point, first, second;  // second == 0: a singleton decomposition
};
struct Composition {
  uint32_t first, second, composite;
};
#include "mamba/unicode_tables.inc"

constexpr uint32_t kMaxCodePoint = 0x10FFFF;
enum CharClass : uint8_t { kLetter = 1, kNumber = 2, kSpace = 4, kWord = 8 };

// One byte of class flags per code point (1.1 MB), built once: the pre-tokenizer asks per character.
const uint8_t* class_table() {
  static const std::vector<uint8_t> table = [] {
    std::vector<uint8_t> t(kMaxCodePoint + 1, 0);
    auto mark = [&t](const CodePointRange* ranges, size_t n, uint8_t flag) {
      for (size_t i = 0; i < n; ++i)
        for (uint32_t cp = ranges[i].first; cp <= ranges[i].last; ++cp) t[cp] |= flag;
    };
    mark(kLetterRanges, std::size(kLetterRanges), kLetter);
    mark(kNumberRanges, std::size(kNumberRanges), kNumber);
    mark(kWhiteSpaceRanges, std::size(kWhiteSpaceRanges), kSpace);
    mark(kWordRanges, std::size(kWordRanges), kWord);
    return t;
  }();
  return table.data();
}

uint32_t combining_class(uint32_t cp) {
  if (cp < 0x300) return 0;
  auto it = std::upper_bound(std::begin(kCombiningClasses), std::end(kCombiningClasses), cp,
                             [](uint32_t c, const CombiningClassRange& r) { return c < r.first; });
  if (it == std::begin(kCombiningClasses)) return 0;
  --it;
  return cp <= it->last ? it->combining_class : 0;
}

// ---- UTF-8 ---------------------------------------------------------------------------------------
// Length of the well-formed UTF-8 sequence at s[i] (Unicode Table 3-7), or 0 if there is none; in
// that case *bad_length is the length of its maximal subpart (at least 1), which gets one U+FFFD.
size_t utf8_sequence_length(const unsigned char* s, size_t n, size_t i, size_t* bad_length) {
  const unsigned char b0 = s[i];
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) need = 2;
  else if (b0 >= 0xE0 && b0 <= 0xEF) need = 3, lo = b0 == 0xE0 ? 0xA0 : 0x80, hi = b0 == 0xED ? 0x9F : 0xBF;
  else if (b0 >= 0xF0 && b0 <= 0xF4) need = 4, lo = b0 == 0xF0 ? 0x90 : 0x80, hi = b0 == 0xF4 ? 0x8F : 0xBF;
  else {
    *bad_length = 1;
    return 0;
  }
  size_t k = 1;
  for (; k < need && i + k < n; ++k) {
    const unsigned char b = s[i + k];
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) break;
  }
  if (k == need) return need;
  *bad_length = k;
  return 0;
}

uint32_t decode_at(const unsigned char* s, size_t i, size_t len) {
  if (len == 1) return s[i];
  uint32_t cp = s[i] & (0xFF >> (len + 1));
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Code points of valid UTF-8 text, with the byte offset where each starts (plus one past the end).
struct DecodedText {
  std::vector<uint32_t> code_points;
  std::vector<size_t> offsets;
};

DecodedText decode_utf8(const std::string& text) {
  DecodedText d;
  d.code_points.reserve(text.size());
  d.offsets.reserve(text.size() + 1);
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    size_t bad = 0;
    const size_t len = utf8_sequence_length(s, text.size(), i, &bad);
    TORCH_INTERNAL_ASSERT(len > 0, "text was validated as UTF-8 before");
    d.code_points.push_back(decode_at(s, i, len));
    d.offsets.push_back(i);
    i += len;
  }
  d.offsets.push_back(text.size());
  return d;
}

void check_utf8(const std::string& text, const char* what) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    size_t bad = 0;
    const size_t len = utf8_sequence_length(s, text.size(), i, &bad);
    if (len == 0) {
      std::ostringstream bytes;
      for (size_t k = 0; k < bad; ++k) bytes << (k ? " " : "") << "0x" << std::hex << int(s[i + k]);
      const bool truncated = i + bad == text.size() && s[i] >= 0xC2 && s[i] <= 0xF4;
      TORCH_CHECK(false, what, ": the text is not valid UTF-8 at byte offset ", i, " (",
                  truncated ? "truncated sequence " : "invalid byte sequence ", bytes.str(), ")");
    }
    i += len;
  }
}

// Bytes -> text, one U+FFFD per maximal invalid subpart (Rust's String::from_utf8_lossy, as HF).
std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    size_t bad = 0;
    const size_t len = utf8_sequence_length(s, bytes.size(), i, &bad);
    if (len) {
      out.append(bytes, i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return out;
}

// ---- NFC -----------------------------------------------------------------------------------------
constexpr uint32_t kHangulS = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161, kHangulT = 0x11A7;
constexpr uint32_t kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr uint32_t kHangulNCount = kHangulVCount * kHangulTCount, kHangulSCount = kHangulLCount * kHangulNCount;

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kHangulS && cp < kHangulS + kHangulSCount) {
    const uint32_t s = cp - kHangulS;
    out.push_back(kHangulL + s / kHangulNCount);
    out.push_back(kHangulV + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount) out.push_back(kHangulT + s % kHangulTCount);
    return;
  }
  auto it = std::lower_bound(std::begin(kDecompositions), std::end(kDecompositions), cp,
                             [](const Decomposition& d, uint32_t c) { return d.code_point < c; });
  if (it == std::end(kDecompositions) || it->code_point != cp) {
    out.push_back(cp);
    return;
  }
  decompose(it->first, out);
  if (it->second) decompose(it->second, out);
}

std::optional<uint32_t> compose(uint32_t first, uint32_t second) {
  if (first >= kHangulL && first < kHangulL + kHangulLCount && second >= kHangulV &&
      second < kHangulV + kHangulVCount)
    return kHangulS + ((first - kHangulL) * kHangulVCount + (second - kHangulV)) * kHangulTCount;
  if (first >= kHangulS && first < kHangulS + kHangulSCount && (first - kHangulS) % kHangulTCount == 0 &&
      second > kHangulT && second < kHangulT + kHangulTCount)
    return first + (second - kHangulT);
  const Composition key{first, second, 0};
  auto it = std::lower_bound(std::begin(kCompositions), std::end(kCompositions), key,
                             [](const Composition& a, const Composition& b) {
                               return a.first != b.first ? a.first < b.first : a.second < b.second;
                             });
  if (it != std::end(kCompositions) && it->first == first && it->second == second) return it->composite;
  return std::nullopt;
}

// Canonical decomposition, canonical ordering, canonical composition (UAX #15).
std::string nfc(const std::string& text) {
  // Below U+0300 every character is NFC_Quick_Check=Yes and none composes with a later one.
  if (std::all_of(text.begin(), text.end(), [](char c) { return static_cast<unsigned char>(c) < 0xCC; }))
    return text;
  const DecodedText in = decode_utf8(text);
  std::vector<uint32_t> d;
  d.reserve(in.code_points.size() + 8);
  for (uint32_t cp : in.code_points) decompose(cp, d);
  // Stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [](uint32_t a, uint32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  std::vector<uint32_t> out;
  out.reserve(d.size());
  ptrdiff_t starter = -1;
  for (uint32_t cp : d) {
    const uint32_t cc = combining_class(cp);
    if (starter >= 0) {
      // Between the starter and cp lie only uncomposed non-starters, in class order: the last decides.
      const bool adjacent = out.size() == static_cast<size_t>(starter) + 1;
      const uint32_t last_cc = adjacent ? 0 : combining_class(out.back());
      if (adjacent || (last_cc != 0 && last_cc < cc)) {
        if (auto composite = compose(out[starter], cp)) {
          out[starter] = *composite;
          continue;
        }
      }
    }
    out.push_back(cp);
    if (cc == 0) starter = static_cast<ptrdiff_t>(out.size()) - 1;
  }
  std::string result;
  result.reserve(text.size());
  for (uint32_t cp : out) append_utf8(result, cp);
  return result;
}

// ---- pre-tokenization ----------------------------------------------------------------------------
const char* const kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// Splits `text` where the GPT-2 regex matches (every character is in some match), by hand:
// the alternatives in order at each position, as a backtracking engine (Oniguruma) takes them.
std::vector<std::string> split_gpt2(const std::string& text) {
  const DecodedText d = decode_utf8(text);
  const uint8_t* classes = class_table();
  const auto& cps = d.code_points;
  const size_t n = cps.size();
  auto cls = [&](size_t k) { return classes[cps[k]]; };
  auto is_other = [&](size_t k) { return (cls(k) & (kLetter | kNumber | kSpace)) == 0; };
  std::vector<std::string> pieces;
  size_t i = 0;
  while (i < n) {
    size_t end = i;
    if (cps[i] == '\'' && i + 1 < n) {
      const uint32_t a = cps[i + 1], b = i + 2 < n ? cps[i + 2] : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') end = i + 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) end = i + 3;
    }
    if (end == i) {
      const size_t j = cps[i] == ' ' && i + 1 < n ? i + 1 : i;  // the optional leading space
      auto run = [&](auto&& in_class) {
        size_t k = j;
        while (k < n && in_class(k)) ++k;
        return k;
      };
      if (cls(j) & kLetter) end = run([&](size_t k) { return (cls(k) & kLetter) != 0; });
      else if (cls(j) & kNumber) end = run([&](size_t k) { return (cls(k) & kNumber) != 0; });
      else if (is_other(j)) end = run(is_other);
      else {
        // \s+(?!\S): the whitespace run, less its last character if a non-space follows; else \s+.
        size_t k = i;
        while (k < n && (cls(k) & kSpace)) ++k;
        end = (k < n && k - i > 1) ? k - 1 : k;
      }
    }
    pieces.emplace_back(text, d.offsets[i], d.offsets[end] - d.offsets[i]);
    i = end;
  }
  return pieces;
}

// GPT-2's printable stand-ins for the 256 bytes.
std::array<std::string, 256> byte_to_unicode() {
  std::array<std::string, 256> table;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    std::string s;
    append_utf8(s, printable ? b : next++);
    table[b] = s;
  }
  return table;
}

struct PreTokenizerStep {
  enum Kind { kSplitGpt2, kByteLevel } kind;
  bool add_prefix_space = false;
  bool use_regex = false;
};

struct AddedToken {
  int64_t id;
  std::string content;
  bool single_word, lstrip, rstrip, normalized, special;
};

struct MergeTarget {
  int32_t rank, new_id;
};

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "Tokenizer: cannot open '", path, "': ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  TORCH_CHECK(!in.bad(), "Tokenizer: error reading '", path, "'");
  return ss.str();
}

}  // namespace

struct Tokenizer::Impl {
  std::string origin;
  std::unordered_map<std::string, int64_t> vocab;  // the model's
  std::unordered_map<int64_t, std::string> id_to_vocab;
  std::unordered_map<uint64_t, MergeTarget> merges;
  std::optional<int64_t> unk_id;
  bool fuse_unk = false, ignore_merges = false;
  std::array<int32_t, 256> byte_ids{};  // the vocab id of each byte's stand-in, -1 if absent
  std::array<std::string, 256> byte_chars = byte_to_unicode();
  std::unordered_map<std::string, uint8_t> char_to_byte;

  std::vector<AddedToken> added;                  // in the file's order
  std::unordered_map<int64_t, size_t> added_by_id;
  std::unordered_map<std::string, int64_t> added_by_content;
  // Per pass (raw text, normalized text): token indices by first byte, longest first.
  std::array<std::vector<size_t>, 256> raw_by_byte, normalized_by_byte;
  std::vector<std::string> match_content;  // per added token: content as matched (normalized if so)

  bool use_nfc = false;
  std::vector<PreTokenizerStep> pre_tokenizer;
  int64_t vocab_size = 0;

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache;

  std::string normalize(const std::string& s) const { return use_nfc ? nfc(s) : s; }

  // HF AddedVocabulary::find_matches: (token index or -1, [start, stop)) covering `text`.
  struct Segment {
    ptrdiff_t token;
    size_t start, stop;
  };
  std::vector<Segment> split_added(const std::string& text, const std::array<std::vector<size_t>, 256>& by_byte) const;
  void pre_tokenize(const std::string& text, std::vector<std::string>& out) const;
  void bpe(const std::string& piece, std::vector<int64_t>& out) const;
};


std::vector<Tokenizer::Impl::Segment> Tokenizer::Impl::split_added(
    const std::string& text, const std::array<std::vector<size_t>, 256>& by_byte) const {
  std::vector<Segment> segments;
  if (text.empty()) return segments;
  const uint8_t* classes = class_table();
  auto char_before = [&](size_t pos) -> uint32_t {  // the code point ending at byte pos
    size_t k = pos - 1;
    while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
    size_t bad = 0;
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    return decode_at(s, k, utf8_sequence_length(s, text.size(), k, &bad));
  };
  auto char_at = [&](size_t pos) -> uint32_t {
    size_t bad = 0;
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    return decode_at(s, pos, utf8_sequence_length(s, text.size(), pos, &bad));
  };
  size_t start_offset = 0;
  for (size_t pos = 0; pos < text.size();) {
    // Leftmost-longest, non-overlapping matches (aho-corasick MatchKind::LeftmostLongest).
    ptrdiff_t found = -1;
    for (size_t t : by_byte[static_cast<unsigned char>(text[pos])]) {
      const std::string& c = match_content[t];
      if (text.compare(pos, c.size(), c) == 0) {
        found = static_cast<ptrdiff_t>(t);
        break;
      }
    }
    if (found < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = added[found];
    size_t start = pos, stop = pos + match_content[found].size();
    pos = stop;
    if (token.single_word) {
      const bool word_before = start > 0 && (classes[char_before(start)] & kWord);
      const bool word_after = stop < text.size() && (classes[char_at(stop)] & kWord);
      if (word_before || word_after) continue;
    }
    if (token.lstrip) {
      size_t new_start = start;
      while (new_start > 0 && (classes[char_before(new_start)] & kSpace)) {
        --new_start;
        while (new_start > 0 && (static_cast<unsigned char>(text[new_start]) & 0xC0) == 0x80) --new_start;
      }
      start = std::max(new_start, start_offset);  // spaces an earlier match took stay with it
    }
    if (token.rstrip) {
      while (stop < text.size() && (classes[char_at(stop)] & kSpace)) {
        size_t bad = 0;
        stop += utf8_sequence_length(reinterpret_cast<const unsigned char*>(text.data()), text.size(), stop, &bad);
      }
    }
    if (start_offset < start) segments.push_back({-1, start_offset, start});
    segments.push_back({found, start, stop});
    start_offset = stop;
  }
  if (start_offset != text.size()) segments.push_back({-1, start_offset, text.size()});
  return segments;
}

void Tokenizer::Impl::pre_tokenize(const std::string& text, std::vector<std::string>& out) const {
  std::vector<std::string> pieces{text}, next;
  for (const PreTokenizerStep& step : pre_tokenizer) {
    next.clear();
    for (std::string& piece : pieces) {
      if (step.kind == PreTokenizerStep::kByteLevel && step.add_prefix_space && piece.rfind(' ', 0) != 0)
        piece.insert(piece.begin(), ' ');
      if (step.kind == PreTokenizerStep::kSplitGpt2 || step.use_regex) {
        for (std::string& p : split_gpt2(piece))
          if (!p.empty()) next.push_back(std::move(p));
      } else if (!piece.empty()) {
        next.push_back(std::move(piece));
      }
    }
    pieces.swap(next);
  }
  for (std::string& p : pieces) out.push_back(std::move(p));
}

// HF BPE Word::merge_all: a min-heap of (rank, position); stale entries are skipped.
void Tokenizer::Impl::bpe(const std::string& piece, std::vector<int64_t>& out) const {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(piece);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int64_t> ids;
  std::string mapped;
  if (ignore_merges) {
    for (unsigned char b : piece) mapped += byte_chars[b];
  }
  auto whole = ignore_merges ? vocab.find(mapped) : vocab.end();
  if (whole != vocab.end()) {
    ids.push_back(whole->second);
  } else {
    struct Symbol {
      int32_t id, prev, next;
      bool removed;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(piece.size());
    for (unsigned char b : piece) {
      int32_t id = byte_ids[b];
      if (id < 0) {
        if (!unk_id) continue;  // HF drops characters it has no token for when there is no unk
        if (fuse_unk && !symbols.empty() && symbols.back().id == *unk_id) continue;
        id = static_cast<int32_t>(*unk_id);
      }
      const int32_t k = static_cast<int32_t>(symbols.size());
      symbols.push_back({id, k - 1, k + 1, false});
    }
    if (!symbols.empty()) symbols.back().next = -1;
    struct Merge {
      int32_t rank, pos, new_id;
      bool operator<(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Merge> queue;
    for (size_t k = 0; k + 1 < symbols.size(); ++k) {
      auto it = merges.find(pair_key(symbols[k].id, symbols[k + 1].id));
      if (it != merges.end()) queue.push({it->second.rank, static_cast<int32_t>(k), it->second.new_id});
    }
    while (!queue.empty()) {
      const Merge top = queue.top();
      queue.pop();
      Symbol& left = symbols[top.pos];
      if (left.removed || left.next == -1) continue;
      const int32_t right_pos = left.next;
      auto current = merges.find(pair_key(left.id, symbols[right_pos].id));
      if (current == merges.end() || current->second.new_id != top.new_id) continue;
      left.id = top.new_id;
      symbols[right_pos].removed = true;
      left.next = symbols[right_pos].next;
      if (left.next != -1) symbols[left.next].prev = top.pos;
      if (left.prev != -1) {
        auto it = merges.find(pair_key(symbols[left.prev].id, left.id));
        if (it != merges.end()) queue.push({it->second.rank, left.prev, it->second.new_id});
      }
      if (left.next != -1) {
        auto it = merges.find(pair_key(left.id, symbols[left.next].id));
        if (it != merges.end()) queue.push({it->second.rank, top.pos, it->second.new_id});
      }
    }
    for (const Symbol& s : symbols)
      if (!s.removed) ids.push_back(s.id);
  }
  out.insert(out.end(), ids.begin(), ids.end());
  if (piece.size() <= 256) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= 100000) cache.clear();
    cache.emplace(piece, std::move(ids));
  }
}

// ---- loading -------------------------------------------------------------------------------------
namespace {

std::string describe(const json& j) {
  std::string s = j.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

bool flag(const json& object, const char* key, bool fallback, const std::string& where) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  TORCH_CHECK(it->is_boolean(), where, ": expected \"", key, "\" to be true or false, got ", describe(*it));
  return it->get<bool>();
}

std::string type_of(const json& j) {
  if (!j.is_object()) return "";
  auto it = j.find("type");
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

PreTokenizerStep parse_pre_tokenizer_step(const json& j, const std::string& where) {
  const std::string type = type_of(j);
  if (type == "ByteLevel")
    return {PreTokenizerStep::kByteLevel, flag(j, "add_prefix_space", true, where), flag(j, "use_regex", true, where)};
  if (type == "Split") {
    const json& pattern = j.value("pattern", json());
    const std::string regex = pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()
                                  ? pattern["Regex"].get<std::string>()
                                  : "";
    TORCH_CHECK(regex == kGpt2Pattern, where, ": only a Split on the GPT-2 regex ", kGpt2Pattern,
                " is supported, got pattern ", describe(pattern));
    const std::string behavior = j.value("behavior", std::string("Isolated"));
    TORCH_CHECK(behavior == "Isolated" && !flag(j, "invert", false, where), where,
                ": only Split with behavior \"Isolated\" and invert false is supported, got ", describe(j));
    return {PreTokenizerStep::kSplitGpt2};
  }
  TORCH_CHECK(false, where, ": pre-tokenizer ", describe(j),
              " is not supported (ByteLevel, or a Sequence of Split on the GPT-2 regex and ByteLevel)");
}

}  // namespace

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Tokenizer Tokenizer::from_file(const std::string& tokenizer_json_path) {
  return from_json(read_file(tokenizer_json_path), tokenizer_json_path);
}

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& origin) {
  auto impl = std::make_shared<Impl>();
  impl->origin = origin;
  const std::string at = "Tokenizer: " + origin;
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, at, ": not valid JSON: ", e.what());
  }
  TORCH_CHECK(root.is_object(), at, ": expected a JSON object at the top, got ", describe(root));
  try {
    // The model.
    TORCH_CHECK(root.contains("model") && root["model"].is_object(), at,
                ": no \"model\" object (is this a tokenizer.json of HF tokenizers?)");
    const json& model = root["model"];
    const std::string model_type = type_of(model);
    TORCH_CHECK(model_type == "BPE" || (model_type.empty() && model.contains("merges")), at, ": model type ",
                model.contains("type") ? describe(model["type"]) : std::string("(none)"),
                " is not supported; only \"BPE\" (byte-level) is");
    TORCH_CHECK(model.contains("vocab") && model["vocab"].is_object(), at, ": model.vocab must be an object");
    TORCH_CHECK(model.contains("merges") && model["merges"].is_array(), at, ": model.merges must be an array");
    TORCH_CHECK(model.value("dropout", json()).is_null() || model["dropout"] == 0, at,
                ": BPE dropout is not supported (got ", describe(model["dropout"]), ")");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const json v = model.value(key, json());
      TORCH_CHECK(v.is_null() || v == "", at, ": model.", key, " is not supported (got ", describe(v), ")");
    }
    TORCH_CHECK(!flag(model, "byte_fallback", false, at), at, ": model.byte_fallback is not supported");
    impl->fuse_unk = flag(model, "fuse_unk", false, at);
    impl->ignore_merges = flag(model, "ignore_merges", false, at);
    for (const auto& [token, id] : model["vocab"].items()) {
      TORCH_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0, at, ": model.vocab[", json(token).dump(),
                  "] must be a non-negative integer, got ", describe(id));
      impl->vocab[token] = id.get<int64_t>();
      impl->id_to_vocab[id.get<int64_t>()] = token;
      impl->vocab_size = std::max(impl->vocab_size, id.get<int64_t>() + 1);
    }
    TORCH_CHECK(impl->vocab_size < (int64_t(1) << 31), at, ": model.vocab has ids up to ", impl->vocab_size - 1,
                ", more than this tokenizer supports (2^31 - 1)");
    const json unk = model.value("unk_token", json());
    if (unk.is_string()) {
      auto it = impl->vocab.find(unk.get<std::string>());
      TORCH_CHECK(it != impl->vocab.end(), at, ": model.unk_token ", unk.dump(), " is not in model.vocab");
      impl->unk_id = it->second;
    }
    for (int b = 0; b < 256; ++b) {
      impl->char_to_byte[impl->byte_chars[b]] = static_cast<uint8_t>(b);
      auto it = impl->vocab.find(impl->byte_chars[b]);
      impl->byte_ids[b] = it == impl->vocab.end() ? -1 : static_cast<int32_t>(it->second);
    }
    const json& merges = model["merges"];
    impl->merges.reserve(merges.size() * 2);
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const json& m = merges[rank];
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t space = s.find(' ');
        TORCH_CHECK(space != std::string::npos && s.find(' ', space + 1) == std::string::npos, at, ": model.merges[",
                    rank, "] must be two tokens separated by one space, got ", describe(m));
        a = s.substr(0, space), b = s.substr(space + 1);
      } else {
        TORCH_CHECK(m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string(), at, ": model.merges[",
                    rank, "] must be \"a b\" or [\"a\", \"b\"], got ", describe(m));
        a = m[0].get<std::string>(), b = m[1].get<std::string>();
      }
      auto ia = impl->vocab.find(a), ib = impl->vocab.find(b), iab = impl->vocab.find(a + b);
      TORCH_CHECK(ia != impl->vocab.end() && ib != impl->vocab.end() && iab != impl->vocab.end(), at,
                  ": model.merges[", rank, "] ", describe(m), " refers to a token not in model.vocab (",
                  ia == impl->vocab.end() ? json(a).dump() : ib == impl->vocab.end() ? json(b).dump()
                                                                                     : json(a + b).dump(),
                  ")");
      impl->merges[pair_key(static_cast<int32_t>(ia->second), static_cast<int32_t>(ib->second))] = {
          static_cast<int32_t>(rank), static_cast<int32_t>(iab->second)};
    }

    // The normalizer.
    const json normalizer = root.value("normalizer", json());
    auto is_nfc = [](const json& n) { return type_of(n) == "NFC"; };
    if (is_nfc(normalizer)) {
      impl->use_nfc = true;
    } else if (type_of(normalizer) == "Sequence" && normalizer.contains("normalizers") &&
               normalizer["normalizers"].is_array() &&
               std::all_of(normalizer["normalizers"].begin(), normalizer["normalizers"].end(), is_nfc)) {
      impl->use_nfc = !normalizer["normalizers"].empty();
    } else {
      TORCH_CHECK(normalizer.is_null(), at, ": normalizer ", describe(normalizer),
                  " is not supported (only none or NFC)");
    }

    // The pre-tokenizer.
    const json pre = root.value("pre_tokenizer", json());
    if (type_of(pre) == "Sequence") {
      TORCH_CHECK(pre.contains("pretokenizers") && pre["pretokenizers"].is_array(), at,
                  ": pre_tokenizer Sequence without a \"pretokenizers\" array");
      for (const json& step : pre["pretokenizers"])
        impl->pre_tokenizer.push_back(parse_pre_tokenizer_step(step, at));
    } else {
      TORCH_CHECK(!pre.is_null(), at, ": no pre_tokenizer; a byte-level BPE needs a ByteLevel one");
      impl->pre_tokenizer.push_back(parse_pre_tokenizer_step(pre, at));
    }
    const auto byte_levels = std::count_if(impl->pre_tokenizer.begin(), impl->pre_tokenizer.end(),
                                           [](const PreTokenizerStep& s) { return s.kind == PreTokenizerStep::kByteLevel; });
    TORCH_CHECK(byte_levels == 1 && impl->pre_tokenizer.back().kind == PreTokenizerStep::kByteLevel, at,
                ": the pre_tokenizer must end with its only ByteLevel step, got ", describe(pre));

    // The decoder.
    const json decoder = root.value("decoder", json());
    TORCH_CHECK(type_of(decoder) == "ByteLevel", at, ": decoder ", describe(decoder),
                " is not supported (only ByteLevel)");

    // Added tokens.
    const json added = root.value("added_tokens", json::array());
    TORCH_CHECK(added.is_array(), at, ": added_tokens must be an array, got ", describe(added));
    for (size_t k = 0; k < added.size(); ++k) {
      const json& t = added[k];
      TORCH_CHECK(t.is_object() && t.contains("id") && t["id"].is_number_integer() && t["id"].get<int64_t>() >= 0 &&
                      t.contains("content") && t["content"].is_string(),
                  at, ": added_tokens[", k, "] needs a non-negative integer \"id\" and a string \"content\", got ",
                  describe(t));
      AddedToken token{t["id"].get<int64_t>(), t["content"].get<std::string>(), flag(t, "single_word", false, at),
                       flag(t, "lstrip", false, at), flag(t, "rstrip", false, at), flag(t, "normalized", true, at),
                       flag(t, "special", false, at)};
      check_utf8(token.content, (at + ": added_tokens[" + std::to_string(k) + "].content").c_str());
      if (token.content.empty()) continue;  // HF ignores these
      // HF (AddedVocabulary::add_tokens) assigns the ids itself rather than trusting the file's: a
      // token already known (added before, or in the model's vocabulary) keeps that id, a new one
      // takes the next id after the vocabulary. For well-formed files the two agree.
      const auto known = impl->added_by_content.find(token.content);
      const auto in_vocab = impl->vocab.find(token.content);
      const int64_t model_count = static_cast<int64_t>(impl->vocab.size());
      if (known != impl->added_by_content.end()) {
        token.id = known->second;
      } else if (in_vocab != impl->vocab.end()) {
        token.id = in_vocab->second;
      } else if (impl->added_by_content.empty()) {
        token.id = model_count;
      } else {
        int64_t max_id = 0;
        for (const auto& entry : impl->added_by_content) max_id = std::max(max_id, entry.second);
        token.id = max_id >= model_count || model_count == 0 ? max_id + 1 : model_count;
      }
      impl->vocab_size = std::max(impl->vocab_size, token.id + 1);
      const std::string match = token.normalized ? impl->normalize(token.content) : token.content;
      if (known != impl->added_by_content.end()) {  // a repeated token: its last flags count
        const size_t index = impl->added_by_id.at(token.id);
        impl->match_content[index] = match;
        impl->added[index] = std::move(token);
        continue;
      }
      impl->added_by_id[token.id] = impl->added.size();
      impl->added_by_content[token.content] = token.id;
      impl->match_content.push_back(match);
      impl->added.push_back(std::move(token));
    }
    for (size_t k = 0; k < impl->added.size(); ++k) {
      const std::string& c = impl->match_content[k];
      if (c.empty()) continue;
      auto& table = impl->added[k].normalized ? impl->normalized_by_byte : impl->raw_by_byte;
      table[static_cast<unsigned char>(c[0])].push_back(k);
    }
    for (auto* tables : {&impl->raw_by_byte, &impl->normalized_by_byte})
      for (auto& list : *tables)
        std::stable_sort(list.begin(), list.end(), [&](size_t x, size_t y) {
          return impl->match_content[x].size() > impl->match_content[y].size();
        });
  } catch (const json::exception& e) {
    TORCH_CHECK(false, at, ": unexpected structure: ", e.what());
  }
  return Tokenizer(std::move(impl));
}

// ---- encode / decode -----------------------------------------------------------------------------
std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  check_utf8(text, "Tokenizer::encode");
  const Impl& t = *impl_;
  std::vector<int64_t> ids;
  std::vector<std::string> pieces;
  auto encode_plain = [&](const std::string& normalized) {
    for (const auto& seg : t.split_added(normalized, t.normalized_by_byte)) {
      if (seg.token >= 0) {
        ids.push_back(t.added[seg.token].id);
        continue;
      }
      pieces.clear();
      t.pre_tokenize(normalized.substr(seg.start, seg.stop - seg.start), pieces);
      for (const std::string& piece : pieces) t.bpe(piece, ids);
    }
  };
  for (const auto& seg : t.split_added(text, t.raw_by_byte)) {
    if (seg.token >= 0) {
      ids.push_back(t.added[seg.token].id);
      continue;
    }
    const std::string normalized = t.normalize(text.substr(seg.start, seg.stop - seg.start));
    if (!normalized.empty()) encode_plain(normalized);
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  const Impl& t = *impl_;
  std::string bytes;
  for (size_t k = 0; k < ids.size(); ++k) {
    const std::string* token = nullptr;
    if (auto a = t.added_by_id.find(ids[k]); a != t.added_by_id.end()) {
      token = &t.added[a->second].content;
    } else if (auto v = t.id_to_vocab.find(ids[k]); v != t.id_to_vocab.end()) {
      token = &v->second;
    }
    TORCH_CHECK(token, "Tokenizer::decode: ids[", k, "] = ", ids[k], " is not a token id (the vocabulary has ids 0..",
                t.vocab_size - 1, " of ", t.origin, ")");
    // A token whose characters are all byte stand-ins gives those bytes; any other (an added token
    // like "  ") gives its own UTF-8, as HF's ByteLevel decoder does.
    std::string token_bytes;
    const DecodedText d = decode_utf8(*token);
    bool all_bytes = true;
    for (size_t c = 0; c < d.code_points.size() && all_bytes; ++c) {
      auto it = t.char_to_byte.find(token->substr(d.offsets[c], d.offsets[c + 1] - d.offsets[c]));
      if (it == t.char_to_byte.end()) all_bytes = false;
      else token_bytes += static_cast<char>(it->second);
    }
    bytes += all_bytes ? token_bytes : *token;
  }
  return utf8_lossy(bytes);
}

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  if (auto a = impl_->added_by_content.find(token); a != impl_->added_by_content.end()) return a->second;
  if (auto v = impl_->vocab.find(token); v != impl_->vocab.end()) return v->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int64_t id) const {
  if (auto a = impl_->added_by_id.find(id); a != impl_->added_by_id.end()) return impl_->added[a->second].content;
  if (auto v = impl_->id_to_vocab.find(id); v != impl_->id_to_vocab.end()) return v->second;
  return std::nullopt;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int64_t> Tokenizer::eos_id() const {
  for (const char* name : {"<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"})
    if (auto id = token_to_id(name)) return id;
  return std::nullopt;
}

bool Tokenizer::is_special(int64_t id) const {
  auto a = impl_->added_by_id.find(id);
  return a != impl_->added_by_id.end() && impl_->added[a->second].special;
}

}  // namespace statemamba
