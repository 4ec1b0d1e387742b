#include "encoder.h"

#include <algorithm>
#include <queue>
#include <stdexcept>

#include "pretokenizer.h"

namespace scratchformer::bpe {

namespace {
constexpr size_t kLongPiece = 64;  // parts beyond which the heap beats rescanning
constexpr uint32_t kNone = UINT32_MAX;
}  // namespace

Encoder::Encoder(std::vector<std::string> tokens,
                 const std::vector<std::pair<uint32_t, uint32_t>>& merges)
    : tokens_(std::move(tokens)) {
  ids_.build(tokens_);
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), kNone);
  for (uint32_t i = 0; i < tokens_.size(); ++i) {
    if (!ids_.insert(i))
      throw std::invalid_argument("token " + std::to_string(i) + " duplicates an earlier token");
    if (tokens_[i].size() == 1) byte_ids_[static_cast<unsigned char>(tokens_[i][0])] = i;
  }
  for (int b = 0; b < 256; ++b)
    if (byte_ids_[b] == kNone)
      throw std::invalid_argument("no token for byte " + std::to_string(b));
  merges_.build(merges.size());
  for (uint32_t rank = 0; rank < merges.size(); ++rank) {
    const auto [a, b] = merges[rank];
    if (a >= tokens_.size() || b >= tokens_.size())
      throw std::invalid_argument("merge " + std::to_string(rank) + " refers to an unknown token id");
    const uint32_t merged = ids_.find(tokens_[a] + tokens_[b]);
    if (merged == TokenTable::kEmpty)
      throw std::invalid_argument("merge " + std::to_string(rank) + " makes a token not in the vocabulary");
    if (find(a, b) != nullptr)
      throw std::invalid_argument("merge " + std::to_string(rank) + " repeats an earlier merge");
    merges_.insert(a, b, Merge{rank, merged});
  }
}

void Encoder::encode(std::string_view text, std::vector<uint32_t>& out) const {
  pretokenize(text, [&](size_t begin, size_t end) { encode_piece(text.substr(begin, end - begin), out); });
}

void Encoder::encode_piece(std::string_view piece, std::vector<uint32_t>& out) const {
  if (piece.size() == 1) {
    out.push_back(byte_ids_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (const uint32_t id = ids_.find(piece); id != TokenTable::kEmpty) {
    out.push_back(id);
    return;
  }
  if (piece.size() <= kLongPiece) encode_short(piece, out); else encode_long(piece, out);
}

void Encoder::encode_short(std::string_view piece, std::vector<uint32_t>& out) const {
  uint32_t parts[kLongPiece];
  size_t n = piece.size();
  for (size_t i = 0; i < n; ++i) parts[i] = byte_ids_[static_cast<unsigned char>(piece[i])];
  while (n > 1) {
    uint32_t best_rank = kNone;
    size_t best = 0;
    for (size_t i = 0; i + 1 < n; ++i) {
      const Merge* m = find(parts[i], parts[i + 1]);
      if (m && m->rank < best_rank) { best_rank = m->rank; best = i; }
    }
    if (best_rank == kNone) break;
    parts[best] = find(parts[best], parts[best + 1])->id;
    std::copy(parts + best + 2, parts + n, parts + best + 1);
    --n;
  }
  out.insert(out.end(), parts, parts + n);
}

void Encoder::encode_long(std::string_view piece, std::vector<uint32_t>& out) const {
  const size_t n = piece.size();
  std::vector<uint32_t> id(n), next(n), prev(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) {
    id[i] = byte_ids_[static_cast<unsigned char>(piece[i])];
    next[i] = i + 1 < n ? uint32_t(i + 1) : kNone;
    prev[i] = i > 0 ? uint32_t(i - 1) : kNone;
  }
  // (rank, position of the left part): the smallest rank first, then the leftmost.
  using Entry = std::pair<uint32_t, uint32_t>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push = [&](uint32_t i) {
    if (i == kNone || next[i] == kNone) return;
    if (const Merge* m = find(id[i], id[next[i]])) heap.push({m->rank, i});
  };
  for (uint32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const auto [rank, i] = heap.top();
    heap.pop();
    if (!alive[i] || next[i] == kNone) continue;
    const Merge* m = find(id[i], id[next[i]]);
    if (!m || m->rank != rank) continue;  // stale: one side has merged since
    const uint32_t j = next[i];
    id[i] = m->id;
    alive[j] = false;
    next[i] = next[j];
    if (next[j] != kNone) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  for (uint32_t i = 0; i != kNone; i = next[i]) out.push_back(id[i]);
}

}  // namespace scratchformer::bpe
