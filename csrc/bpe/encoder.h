// Byte-level BPE encoding: piece bytes -> token ids, merging pairs in rank order.
//
// Per piece (see pretokenizer.h):
// - Fast path: most pieces are whole tokens (" the", " of"); one hash lookup settles them.
// - Short pieces: a vector of parts; repeatedly find the adjacent pair with the lowest merge
//   rank (leftmost on ties) and merge it. Quadratic, but n is small and the loop is tight.
// - Long pieces (runs of one character, long numbers, base64...): the same merges in the same
//   order over a linked list of parts, taken from per-rank buckets (O(n)) when merges only ever
//   create higher-rank pairs, as in any trained vocabulary, else from a min-heap of
//   (rank, position) (O(n log n)); a 1 MB run of spaces never goes quadratic.
// Merging the lowest-rank pair first, leftmost first, gives exactly GPT-2's segmentation.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flat_map.h"

namespace scratchformer::bpe {

class Encoder {
 public:
  // tokens: bytes of each id; merges: (left id, right id) in rank order. Throws
  // std::invalid_argument naming the problem for an inconsistent vocabulary.
  Encoder(std::vector<std::string> tokens, const std::vector<std::pair<uint32_t, uint32_t>>& merges);

  // Ids of text (UTF-8), pre-tokenized with GPT-2's pattern, appended to out.
  void encode(std::string_view text, std::vector<uint32_t>& out) const;
  // Ids of one piece, appended to out.
  void encode_piece(std::string_view piece, std::vector<uint32_t>& out) const;

  size_t size() const { return tokens_.size(); }

 private:
  using Merge = MergeTable::Value;  // rank, and the id of the merged token
  const Merge* find(uint32_t a, uint32_t b) const { return merges_.find(a, b); }
  void encode_short(std::string_view piece, std::vector<uint32_t>& out) const;
  void encode_long(std::string_view piece, std::vector<uint32_t>& out) const;

  std::vector<std::string> tokens_;
  TokenTable ids_;  // bytes -> id, over tokens_
  MergeTable merges_;
  uint32_t byte_ids_[256];
  bool ranks_grow_ = true;  // every merge uses tokens made by earlier merges (true of trained BPE)
};

}  // namespace scratchformer::bpe
