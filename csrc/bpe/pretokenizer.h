// GPT-2's pre-tokenizer as a hand-written state machine over code points.
//
// It splits text exactly as the regular expression
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// does, without a regex engine: at each position the first alternative that matches decides,
// and each alternative is a greedy run of one character class, so one left-to-right pass with
// one code point of look-ahead is enough. The pieces are what BPE merges within.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "unicode_tables.h"

namespace scratchformer::bpe {

enum class CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

namespace detail {

template <size_t N>
inline bool in_ranges(const uint32_t (&ranges)[N][2], uint32_t cp) {
  size_t lo = 0, hi = N;  // binary search for the last range starting at or before cp
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (ranges[mid][0] <= cp) lo = mid + 1; else hi = mid;
  }
  return lo > 0 && cp <= ranges[lo - 1][1];
}

// Unicode's White_Space property.
inline bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

struct AsciiTable {
  CharClass cls[128];
  constexpr AsciiTable() : cls() {
    for (int c = 0; c < 128; ++c) {
      cls[c] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ? CharClass::kLetter
               : (c >= '0' && c <= '9')                          ? CharClass::kNumber
               : ((c >= 0x09 && c <= 0x0D) || c == ' ')          ? CharClass::kSpace
                                                                  : CharClass::kOther;
    }
  }
};
inline constexpr AsciiTable kAscii{};

}  // namespace detail

inline CharClass classify(uint32_t cp) {
  if (cp < 128) return detail::kAscii.cls[cp];
  if (detail::is_space(cp)) return CharClass::kSpace;
  if (detail::in_ranges(kLetterRanges, cp)) return CharClass::kLetter;
  if (detail::in_ranges(kNumberRanges, cp)) return CharClass::kNumber;
  return CharClass::kOther;
}

// Decode the code point at text[i] (valid UTF-8, as Python strings give); sets its length.
inline uint32_t decode_utf8(std::string_view text, size_t i, size_t* len) {
  const auto b0 = static_cast<unsigned char>(text[i]);
  if (b0 < 0x80) { *len = 1; return b0; }
  auto cont = [&](size_t k) { return static_cast<unsigned char>(text[i + k]) & 0x3Fu; };
  if (b0 < 0xE0) { *len = 2; return ((b0 & 0x1Fu) << 6) | cont(1); }
  if (b0 < 0xF0) { *len = 3; return ((b0 & 0x0Fu) << 12) | (cont(1) << 6) | cont(2); }
  *len = 4;
  return ((b0 & 0x07u) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3);
}

// Calls emit(begin, end) for each piece of text, in order; the pieces cover text exactly.
template <typename Emit>
void pretokenize(std::string_view text, Emit&& emit) {
  const size_t n = text.size();
  size_t i = 0;
  size_t len = 0;
  while (i < n) {
    const size_t start = i;
    const uint32_t cp = decode_utf8(text, i, &len);
    // 's 't 're 've 'm 'll 'd (lowercase only, as in GPT-2)
    if (cp == '\'' && i + 1 < n) {
      const char a = text[i + 1], b = i + 2 < n ? text[i + 2] : '\0';
      size_t take = 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') take = 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) take = 3;
      if (take) { emit(start, i + take); i += take; continue; }
    }
    CharClass cls = classify(cp);
    size_t j = i + len;  // end of the optional leading space
    if (cp == ' ' && j < n) {
      size_t next_len;
      const CharClass next = classify(decode_utf8(text, j, &next_len));
      if (next != CharClass::kSpace) { cls = next; i = j; }  // " ?X+": the space joins the run
    }
    if (cls != CharClass::kSpace) {
      // A run of letters, of numbers, or of anything else that is not whitespace.
      size_t k = i;
      while (k < n) {
        size_t l;
        if (classify(decode_utf8(text, k, &l)) != cls) break;
        k += l;
      }
      emit(start, k);
      i = k;
      continue;
    }
    // Whitespace: the whole run at the end of the text, else all but its last character (which
    // then joins what follows or stands alone), but at least one character.
    size_t k = i, last = i;
    while (k < n) {
      size_t l;
      if (classify(decode_utf8(text, k, &l)) != CharClass::kSpace) break;
      last = k;
      k += l;
    }
    const size_t end = (k == n || last == start) ? k : last;
    emit(start, end);
    i = end;
  }
}

}  // namespace scratchformer::bpe
