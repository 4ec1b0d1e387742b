// Open-addressing hash tables for the encoder's two lookups, several times faster than
// std::unordered_map here: no node allocations, one cache line per probe, a cheap hash.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace scratchformer::bpe {

inline uint64_t mix(uint64_t h) {
  h ^= h >> 32;
  h *= 0xd6e8feb86659fd93ull;
  h ^= h >> 32;
  return h;
}

// A hash of a short byte string, eight bytes at a time.
inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull * (n + 1);
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = mix(h ^ w) * 0x9E3779B97F4A7C15ull;
  }
  if (n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = mix(h ^ w);
  }
  return h;
}

inline size_t table_size(size_t n) {
  size_t size = 16;
  while (size < 2 * n) size *= 2;  // load factor <= 1/2
  return size;
}

// Token bytes -> id, the bytes living in an external vector<string> indexed by id. Each slot
// keeps the first eight bytes and the length, so most lookups (tokens are short) compare
// within the slot and never touch the token's own memory.
class TokenTable {
 public:
  static constexpr uint32_t kEmpty = UINT32_MAX;

  void build(const std::vector<std::string>& tokens) {
    tokens_ = &tokens;
    slots_.assign(table_size(tokens.size()), Slot{0, 0, kEmpty, 0});
    mask_ = slots_.size() - 1;
  }
  // false if an equal token is already there.
  bool insert(uint32_t id) {
    const std::string& t = (*tokens_)[id];
    if (find(t) != kEmpty) return false;
    const uint64_t h = hash_bytes(t.data(), t.size());
    size_t i = h & mask_;
    while (slots_[i].id != kEmpty) i = (i + 1) & mask_;
    slots_[i] = Slot{h, head(t.data(), t.size()), id, uint32_t(t.size())};
    return true;
  }
  uint32_t find(std::string_view bytes) const {
    const uint64_t h = hash_bytes(bytes.data(), bytes.size());
    const uint64_t first = head(bytes.data(), bytes.size());
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.id == kEmpty) return kEmpty;
      if (s.hash == h && s.len == bytes.size() && s.head == first &&
          (bytes.size() <= 8 || std::memcmp((*tokens_)[s.id].data() + 8, bytes.data() + 8, bytes.size() - 8) == 0))
        return s.id;
    }
  }

 private:
  static uint64_t head(const char* p, size_t n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n < 8 ? n : 8);
    return w;
  }
  struct Slot {
    uint64_t hash;
    uint64_t head;  // the first eight bytes, zero-padded
    uint32_t id;
    uint32_t len;
  };
  const std::vector<std::string>* tokens_ = nullptr;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// (left id, right id) -> (rank, merged id).
class MergeTable {
 public:
  struct Value {
    uint32_t rank;
    uint32_t id;
  };

  void build(size_t n) {
    slots_.assign(table_size(n), Slot{kEmptyKey, {0, 0}});
    mask_ = slots_.size() - 1;
  }
  void insert(uint32_t a, uint32_t b, Value v) {
    const uint64_t key = make_key(a, b);
    for (size_t i = mix(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmptyKey || slots_[i].key == key) { slots_[i] = Slot{key, v}; return; }
    }
  }
  const Value* find(uint32_t a, uint32_t b) const {
    const uint64_t key = make_key(a, b);
    for (size_t i = mix(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s.value;
      if (s.key == kEmptyKey) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmptyKey = UINT64_MAX;
  static uint64_t make_key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }
  struct Slot {
    uint64_t key;
    Value value;
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

}  // namespace scratchformer::bpe
