// Byte-level alphabet of GPT-2's BPE.
//
// Byte-level BPE works on raw bytes, but GPT-2's vocabulary files store each token as text.
// Every byte is therefore given a printable Unicode code point: bytes that are already
// printable (and not space) keep their own code point, the 68 others are mapped, in byte
// order, to U+0100, U+0101, ...  Loading encoder.json / vocab.bpe needs exactly this table.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace scratchformer::bpe {

constexpr bool byte_is_printable(int b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

// Code point that stands for each byte.
constexpr std::array<char32_t, 256> byte_to_code_point() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = byte_is_printable(b) ? char32_t(b) : next++;
  return table;
}

inline std::string utf8(char32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
  return out;
}

}  // namespace scratchformer::bpe
