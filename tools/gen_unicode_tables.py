#!/usr/bin/env python3
"""Generates mamba/unicode_tables.inc: the Unicode tables mamba/tokenizer.cpp needs, from Python's
unicodedata, or from the `unicodedata2` package when it is importable (its Unicode version is
written into the output).

  pip install --target DIR unicodedata2==16.0.0
  PYTHONPATH=DIR python3 tools/gen_unicode_tables.py > mamba/unicode_tables.inc

The committed tables are Unicode 16.0, which is what the Oniguruma regex engine inside HF tokenizers
0.2x uses for \\p{L}, \\p{N} and \\s (tests/data/make_tokenizer_fixture.py --check-unicode compares
every code point). HF's NFC, however, runs on older Unicode data (crate
unicode-normalization-alignments): the characters in HF_NFC_UNKNOWN below have no combining class,
decomposition or composition there, so they get none here either.

Tables (all sorted, code point ranges inclusive):
  kLetterRanges      \\p{L}  (Lu Ll Lt Lm Lo)
  kNumberRanges      \\p{N}  (Nd Nl No)
  kWhiteSpaceRanges  \\s as Oniguruma (HF tokenizers' regex engine) defines it for Unicode:
                     U+0009..U+000D, U+0085 and categories Zs Zl Zp (= the White_Space property)
  kWordRanges        \\w as Rust's regex crate defines it (used by added tokens' single_word):
                     Alphabetic + M + Nd + Pc + Join_Control, with Alphabetic taken as L + Nl +
                     the Other_Alphabetic symbols (circled/squared letters; its marks are in M)
  kCombiningClasses  canonical combining class != 0, as (first, last, class)
  kDecompositions    canonical decompositions, one level: (code point, first, second or 0)
  kCompositions      primary composites for NFC: (first, second, composite), i.e. two-code-point
                     canonical decompositions whose composite NFC keeps (not excluded)
Hangul syllables are composed/decomposed algorithmically in the C++ and are not listed.
"""
import sys

try:
    import unicodedata2 as unicodedata
except ImportError:
    import unicodedata

MAX = 0x110000


def ranges(predicate):
    out, start = [], None
    for cp in range(MAX + 1):
        inside = cp < MAX and predicate(cp)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            out.append((start, cp - 1))
            start = None
    return out


def category(cp):
    return unicodedata.category(chr(cp))


OTHER_ALPHABETIC_SYMBOLS = [(0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189)]


# Found by tests/data/make_tokenizer_fixture.py --check-unicode (HF tokenizers 0.23.3): marks whose
# combining class HF's NFC does not know, and composites it neither decomposes nor composes.
# Marks with a combining class since Unicode 10 (HF's NFC treats them as starters), then
# composites HF neither decomposes nor composes.
HF_NFC_UNKNOWN_MARKS = {
    0x07FD, 0x0897, 0x0898, 0x0899, 0x089A, 0x089B, 0x089C, 0x089D, 0x089E, 0x089F, 0x08CA, 0x08CB,
    0x08CC, 0x08CD, 0x08CE, 0x08CF, 0x08D0, 0x08D1, 0x08D2, 0x08D3, 0x09FE, 0x0C3C, 0x0D3B, 0x0D3C,
    0x0EBA, 0x1715, 0x1ABF, 0x1AC0, 0x1AC1, 0x1AC2, 0x1AC3, 0x1AC4, 0x1AC5, 0x1AC6, 0x1AC7, 0x1AC8,
    0x1AC9, 0x1ACA, 0x1ACB, 0x1ACC, 0x1ACD, 0x1ACE, 0x1DF6, 0x1DF7, 0x1DF8, 0x1DF9, 0x1DFA, 0xA82C,
    0x10D24, 0x10D25, 0x10D26, 0x10D27, 0x10D69, 0x10D6A, 0x10D6B, 0x10D6C, 0x10D6D, 0x10EAB,
    0x10EAC, 0x10EFD, 0x10EFE, 0x10EFF, 0x10F46, 0x10F47, 0x10F48, 0x10F49, 0x10F4A, 0x10F4B,
    0x10F4C, 0x10F4D, 0x10F4E, 0x10F4F, 0x10F50, 0x10F82, 0x10F83, 0x10F84, 0x10F85, 0x11070,
    0x1133B, 0x113CE, 0x113CF, 0x113D0, 0x1145E, 0x11839, 0x1183A, 0x1193D, 0x1193E, 0x11943,
    0x119E0, 0x11A34, 0x11A47, 0x11A99, 0x11D42, 0x11D44, 0x11D45, 0x11D97, 0x11F41, 0x11F42,
    0x1612F, 0x16FF0, 0x16FF1, 0x1E08F, 0x1E130, 0x1E131, 0x1E132, 0x1E133, 0x1E134, 0x1E135,
    0x1E136, 0x1E2AE, 0x1E2EC, 0x1E2ED, 0x1E2EE, 0x1E2EF, 0x1E4EC, 0x1E4ED, 0x1E4EE, 0x1E4EF,
    0x1E5EE, 0x1E5EF,
}
HF_NFC_UNKNOWN_COMPOSITES = {
    0x105C9, 0x105E4, 0x11383, 0x11385, 0x1138E, 0x11391, 0x113C5, 0x113C7, 0x113C8, 0x11938,
    0x16121, 0x16122, 0x16123, 0x16124, 0x16125, 0x16126, 0x16127, 0x16128, 0x16D68, 0x16D69,
    0x16D6A,
}
HF_NFC_UNKNOWN = HF_NFC_UNKNOWN_MARKS | HF_NFC_UNKNOWN_COMPOSITES


def is_word(cp):
    c = category(cp)
    if c[0] in "LM" or c in ("Nd", "Nl", "Pc") or cp in (0x200C, 0x200D):
        return True
    return any(lo <= cp <= hi for lo, hi in OTHER_ALPHABETIC_SYMBOLS)


def is_hangul_syllable(cp):
    return 0xAC00 <= cp <= 0xD7A3


def main():
    letters = ranges(lambda cp: category(cp)[0] == "L")
    numbers = ranges(lambda cp: category(cp)[0] == "N")
    spaces = ranges(lambda cp: 0x09 <= cp <= 0x0D or cp == 0x85 or category(cp) in ("Zs", "Zl", "Zp"))
    words = ranges(is_word)

    classes = []
    for cp in range(MAX):
        ccc = unicodedata.combining(chr(cp))
        if ccc and cp not in HF_NFC_UNKNOWN:
            if classes and classes[-1][1] == cp - 1 and classes[-1][2] == ccc:
                classes[-1][1] = cp
            else:
                classes.append([cp, cp, ccc])

    decompositions, compositions = [], []
    for cp in range(MAX):
        if is_hangul_syllable(cp) or cp in HF_NFC_UNKNOWN:
            continue
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<"):  # none, or a compatibility one
            continue
        parts = [int(x, 16) for x in d.split()]
        assert len(parts) in (1, 2), (hex(cp), d)
        decompositions.append((cp, parts[0], parts[1] if len(parts) == 2 else 0))
        if len(parts) == 2 and unicodedata.normalize("NFC", chr(cp)) == chr(cp):
            compositions.append((parts[0], parts[1], cp))
    compositions.sort()

    w = sys.stdout.write
    w("// Generated by tools/gen_unicode_tables.py from %s: Unicode %s.\n"
      % (unicodedata.__name__, unicodedata.unidata_version))
    w("// Do not edit; re-run the script instead.\n")
    w('#define STATEMAMBA_UNICODE_VERSION "%s"\n' % unicodedata.unidata_version)

    def emit_ranges(name, rs):
        w("static const CodePointRange %s[] = {\n" % name)
        for i in range(0, len(rs), 6):
            w("  " + " ".join("{0x%X, 0x%X}," % r for r in rs[i:i + 6]) + "\n")
        w("};\n")

    emit_ranges("kLetterRanges", letters)
    emit_ranges("kNumberRanges", numbers)
    emit_ranges("kWhiteSpaceRanges", spaces)
    emit_ranges("kWordRanges", words)
    w("static const CombiningClassRange kCombiningClasses[] = {\n")
    for i in range(0, len(classes), 5):
        w("  " + " ".join("{0x%X, 0x%X, %d}," % tuple(c) for c in classes[i:i + 5]) + "\n")
    w("};\n")
    w("static const Decomposition kDecompositions[] = {\n")
    for i in range(0, len(decompositions), 5):
        w("  " + " ".join("{0x%X, 0x%X, 0x%X}," % d for d in decompositions[i:i + 5]) + "\n")
    w("};\n")
    w("static const Composition kCompositions[] = {\n")
    for i in range(0, len(compositions), 5):
        w("  " + " ".join("{0x%X, 0x%X, 0x%X}," % c for c in compositions[i:i + 5]) + "\n")
    w("};\n")


if __name__ == "__main__":
    main()
