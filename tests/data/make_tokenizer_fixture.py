#!/usr/bin/env python3
"""Builds the tokenizer fixture for tests/test_tokenizer.cpp with HF `tokenizers`:

  tiny-tokenizer/tokenizer.json   a byte-level BPE (vocab 800) trained here on a small built-in corpus,
                                  in GPT-NeoX-20B's configuration: NFC normalizer, ByteLevel
                                  pre-tokenizer (add_prefix_space=false) and decoder, special tokens
                                  <|endoftext|> (0) and <|padding|> (1), and non-special added tokens
                                  (a run of spaces, normalized, as NeoX has; and a word).
  tiny-tokenizer/reference.json   HF's encode(s, add_special_tokens=False).ids and decode(ids) for
                                  hard strings ("decoded" only where it is not the string
                                  itself, i.e. where NFC changed it), under the base configuration and some variants (each a
                                  patch of top-level keys of tokenizer.json), and HF's decode of id
                                  sequences that split multi-byte characters.

  pip install --target DIR tokenizers unicodedata2==16.0.0
  PYTHONPATH=DIR python3 tests/data/make_tokenizer_fixture.py [--check-unicode]

--check-unicode instead compares, for every code point, the character classes and NFC of
mamba/unicode_tables.inc's source (tools/gen_unicode_tables.py) with what HF tokenizers does, and
prints the differences (there should be none).
"""
import json
import os
import random
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tiny-tokenizer")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's the dog's day; they're sure we've won.",
    "Mamba is a selective state space model. The state carries what the model remembers between tokens.",
    "In 2023, researchers released models with 130M, 370M, 790M, 1.4B and 2.8B parameters.",
    "def forward(self, x):\n    return self.out_proj(self.mixer(self.norm(x)))\n\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "Zürich, Genève, Köln, Málaga, São Paulo, Kraków, Ærøskøbing — façade, naïve, coöperate.",
    "Москва — столица России. Привет, как дела? Ελληνικά: καλημέρα κόσμε.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। สวัสดีชาวโลก",
    "Emoji: 😀 😃 👍🏽 👩‍💻 🇯🇵 ❤️ — and symbols: © ® ™ € £ ¥ ± × ÷ ≤ ≥ ∞ √ ∑.",
    "Numbers: 3.14159, 2.71828, 1,000,000 and 1234567890. Phone: +1 (555) 010-9999.",
    "I'M SURE HE'S RIGHT, BUT THEY'LL SAY WE'D BETTER NOT. Don't! Won't? Can't...",
    "<html><body><p class=\"x\">Hello &amp; goodbye</p></body></html>",
    "   indented text\n\n\nwith blank lines   \n\ttabs\tand\ttrailing spaces   ",
    "statemamba statemamba the statemamba tokenizer",
]


def train():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=800, min_frequency=1, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_tokens([AddedToken("  ", normalized=True), AddedToken("statemamba", normalized=True)])
    return tok


def hard_strings():
    rng = random.Random(1234)
    pool = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + " " * 20 + "\n\t.,;:!?'\"-()[]{}"
            + "éüßøçñåÆŒ" + "αβγδΩ" + "жщЯ" + "中文字日本語" + "한국" + "ािीु" + "\u0301\u0308\u0327"
            + "😀👍🏽🇯🇵" + "\u00a0\u3000\u2009\u200b\u2028" + "½²Ⅷ٣")
    long_text = "".join(rng.choice(pool) for _ in range(3000))
    corpus_words = " ".join(CORPUS).split(" ")
    words = " ".join(rng.choice(corpus_words) for _ in range(300))
    return [
        "", " ", "  ", "   ", "\n", "\t", "a", "Hello world", " Hello world", "Hello  world", "Hello   world",
        "hello\n\nworld", "line one\nline two\r\nline three\r", "tabs\tand\t\tmore\t", "trailing spaces   ",
        "   leading spaces", "\t \n \t\n", "nbsp\u00a0here and\u00a0\u00a0there", "ideographic\u3000space\u3000\u3000x",
        "thin\u2009space, en\u2002space, zero\u200bwidth, line\u2028sep, para\u2029sep, nel\u0085x",
        "control\x01\x1f\x7f chars", "vertical\x0btab and form\x0cfeed",
        "It's they're we've I'm you'll he'd", "IT'S THEY'RE WE'VE I'M YOU'LL HE'D", "'s 't 're 've 'm 'll 'd",
        "O'Neil's rock'n'roll ''quoted'' 'twas", "don't's'''s", "x'S", "'",
        "1234567890123456789012345678901234567890", "3.14159 2,718 1e-10 0x1F -42 +7 ½ ² Ⅷ ٣٤٥ ৩",
        "...!!!???---***", "a...b!!!c", "(nested [brackets {here}])", "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
        "Zürich Genève Köln São Paulo Kraków Ærøskøbing façade naïve", "Straße ß ẞ ﬁ ﬂ ŉ",
        "Москва Привет мир", "Ελληνικά καλημέρα", "東京は日本の首都です。", "北京是中国的首都", "서울 한국어 텍스트",
        "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "ქართული ენა", "Հայերեն", "ᚠᛇᚻ᛫ᛒᛦᚦ",
        "e\u0301 a\u0308 n\u0303 combining", "a\u0328\u0301 vs a\u0301\u0328 order", "\u212b \u2126 singletons",
        "\u1100\u1161\u11a8 jamo \uac01", "\u0958 excluded \u0915\u093c", "\u1e9b\u0323 \u0344", "\u0f73 \u0f75",
        "z\u0316\u0c3c marks HF's NFC does not know \U00011935\U00011930",
        "😀 😃 😄", "👍 👍🏻 👍🏽 👍🏿", "👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈", "🇯🇵🇺🇸🇩🇪", "❤️ ☺︎ ✌🏾", "keycap 1️⃣ #️⃣",
        "mixed 中文 and English and 日本語text123", "CamelCaseWords and snake_case_words", "ＦＵＬＬＷＩＤＴＨ １２３",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝓂𝒶𝓉𝒽 𝟙𝟚𝟛", "\U0001F600\U00010348\U00020000 astral", "\ufeffBOM at start",
        "<|endoftext|>", "<|endoftext|><|endoftext|>", "Hello<|endoftext|>world", "Hello <|endoftext|> world",
        "<|padding|>pad<|padding|>", "<|endoftext|> leading space after special", "text<|endoftext|>",
        "statemamba", "the statemamba tokenizer", "xstatemambay", "statemambastatemamba",
        "two  spaces  between", "three   spaces", "five     spaces end  ", "<|endoftext  |>", "<|endoftext|",
        long_text, words,
    ]


VARIANTS = {
    "base": {},
    "prefix_space_no_normalizer": {
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    },
    "split_then_bytelevel": {
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    },
    "no_regex": {
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    },
}


def added_flags_patch(base_json):
    """Added tokens with lstrip / rstrip / single_word, appended after the vocabulary."""
    n = max(t["id"] for t in base_json["added_tokens"]) + 1
    n = max(n, max(base_json["model"]["vocab"].values()) + 1)
    extra = [
        {"id": n, "content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False,
         "normalized": False, "special": True},
        {"id": n + 1, "content": "<sep>", "single_word": False, "lstrip": False, "rstrip": True,
         "normalized": False, "special": True},
        {"id": n + 2, "content": "word", "single_word": True, "lstrip": False, "rstrip": False,
         "normalized": True, "special": False},
        {"id": n + 3, "content": "Å", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": True, "special": False},
    ]
    return {"added_tokens": base_json["added_tokens"] + extra}


ADDED_FLAG_STRINGS = [
    "a <mask> b", "a   <mask>b", "\t\n<mask>", "<mask><mask>", "x<sep>   y", "x <sep>\t\ny", "<sep>",
    "word", "a word here", "sword words word.", "wordword", "_word", "word_", "éword", "word1",
    "A\u030a and \u212b and Å", "<mask>  <sep>  word  ", "  <mask>", "<|endoftext|>  <mask>",
]


def nfc_probes():
    """Strings that show NFC's combining classes and compositions, for every character HF's NFC does
    not know (tools/gen_unicode_tables.py HF_NFC_UNKNOWN) and a sample of those it does."""
    sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
    import gen_unicode_tables as g
    ud = g.unicodedata
    rng = random.Random(5)
    marks = [cp for cp in range(0x300, 0x110000) if not 0xD800 <= cp <= 0xDFFF and ud.combining(chr(cp))]
    composites = [cp for cp in range(0xC0, 0x110000) if not 0xD800 <= cp <= 0xDFFF
                  and len(ud.decomposition(chr(cp)).split()) == 2 and not ud.decomposition(chr(cp)).startswith("<")]
    probes = []
    for cp in sorted(g.HF_NFC_UNKNOWN_MARKS) + rng.sample([m for m in marks if m not in g.HF_NFC_UNKNOWN], 80):
        probes += ["a" + chr(cp) + "\u0334", "a\u0316" + chr(cp)]
    for cp in sorted(g.HF_NFC_UNKNOWN_COMPOSITES) + rng.sample([c for c in composites if c not in g.HF_NFC_UNKNOWN], 80):
        probes += ["".join(chr(int(x, 16)) for x in ud.decomposition(chr(cp)).split()), chr(cp)]
    return probes


def patched(base_json, patch):
    j = dict(base_json)
    j.update(patch)
    return Tokenizer.from_str(json.dumps(j))


def byte_ids(base_json):
    """The id of each byte's byte-level stand-in."""
    table = {}
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    for b, c in zip(bs, cs):
        table[b] = base_json["model"]["vocab"][chr(c)]
    return table


def decode_cases(tok, base_json):
    by = byte_ids(base_json)
    ids_of = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    seqs = [
        [by[0xE2]], [by[0xE2], by[0x82]], [by[0xE2], by[0x82], by[0xAC]], [by[0xF0], by[0x9F]],
        [by[0xF0], by[0x9F], by[0x98]], [by[0xF0], by[0x9F], by[0x98], by[0x80]], [by[0xE2], by[ord("a")]],
        [by[0xF0], by[0x80], by[0x80], by[0x80]], [by[0xC0], by[0xAF]], [by[0xFF]], [by[0x80]], [by[0xBF], by[0xBF]],
        [by[0xED], by[0xA0], by[0x80]], [by[0xF4], by[0x90], by[0x80], by[0x80]], [by[0xE0], by[0x80], by[0x80]],
        [by[0xC3]] + ids_of("x") + [by[0xA9]], [by[0xE4], by[0xB8]] + ids_of("<|endoftext|>") + [by[0xAD]],
        ids_of("€😀中")[:-1], ids_of("€😀中")[1:], [0, 1, 0], ids_of("a  b"), ids_of("statemamba  x"),
        [by[b] for b in range(256)],
    ]
    return [{"ids": s, "text": tok.decode(s, skip_special_tokens=False)} for s in seqs]


def check_unicode():
    sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
    import gen_unicode_tables as g
    ud = g.unicodedata
    print("tables from", ud.__name__, ud.unidata_version)
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False)
    nfc = normalizers.NFC()

    def ours(c):
        cp = ord(c)
        if 9 <= cp <= 13 or cp == 0x85 or ud.category(c) in ("Zs", "Zl", "Zp"):
            return "S"
        k = ud.category(c)[0]
        return k if k in "LN" else "O"

    def hf(c):
        for probe, k in (("a", "L"), ("1", "N"), ("!", "O")):
            if len(bl.pre_tokenize_str(probe + c)) == 1:
                return k
        return "S"

    diffs = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        if ours(c) != hf(c):
            diffs.append("class %04X ours %s HF %s" % (cp, ours(c), hf(c)))
        if cp not in g.HF_NFC_UNKNOWN:
            if nfc.normalize_str(c) != ud.normalize("NFC", c):
                diffs.append("NFC %04X" % cp)
            # U+0334 has class 1 and U+0316 class 220: between them they reveal any class.
            if ud.combining(c) and any(nfc.normalize_str(p) != ud.normalize("NFC", p)
                                       for p in ("a" + c + "\u0334", "a\u0316" + c)):
                diffs.append("combining class %04X" % cp)
            d = ud.decomposition(c)
            if d and not d.startswith("<") and len(d.split()) == 2:
                s = "".join(chr(int(x, 16)) for x in d.split())
                if nfc.normalize_str(s) != ud.normalize("NFC", s):
                    diffs.append("composition %04X" % cp)
    # The listed ones are checked against HF by the C++ test (nfc_probes in reference.json).
    print("\n".join(diffs) if diffs else "no differences outside HF_NFC_UNKNOWN")
    return 1 if diffs else 0


def main():
    if "--check-unicode" in sys.argv:
        sys.exit(check_unicode())
    import tokenizers
    os.makedirs(OUT, exist_ok=True)
    tok = train()
    base_json = json.loads(tok.to_str())
    with open(os.path.join(OUT, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(base_json, f, ensure_ascii=False, separators=(",", ":"))

    strings = hard_strings()
    variants = []
    for name, patch in list(VARIANTS.items()) + [("added_flags", added_flags_patch(base_json))]:
        t = patched(base_json, patch)
        cases = []
        extra = {"added_flags": ADDED_FLAG_STRINGS, "base": nfc_probes()}.get(name, [])
        for s in strings + extra:
            ids = t.encode(s, add_special_tokens=False).ids
            case = {"text": s, "ids": ids}
            decoded = t.decode(ids, skip_special_tokens=False)
            if decoded != s:  # NFC changed it; otherwise the round trip gives the text back
                case["decoded"] = decoded
            cases.append(case)
        variants.append({"name": name, "patch": patch, "cases": cases})
    reference = {
        "generator": "tests/data/make_tokenizer_fixture.py with tokenizers %s" % tokenizers.__version__,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "variants": variants,
        "decodes": decode_cases(tok, base_json),
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, separators=(",", ":"))
    for name in ("tokenizer.json", "reference.json"):
        print(name, os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()
