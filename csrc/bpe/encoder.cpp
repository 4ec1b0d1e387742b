#include "encoder.h"

#include <algorithm>
#include <queue>
#include <stdexcept>
#include <unordered_map>

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
  // Rank of the merge that made each token (bytes: none), to know whether ranks only grow.
  std::vector<int64_t> made_at(tokens_.size(), -1);
  ranks_grow_ = true;
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
    ranks_grow_ = ranks_grow_ && made_at[a] < rank && made_at[b] < rank;
    made_at[merged] = rank;
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
  // Parts as a linked list over byte positions; a merge keeps the left node.
  const uint32_t n = uint32_t(piece.size());
  struct Node {
    uint32_t id, prev, next;
  };
  // Reused across calls: a fresh allocation this large is a fresh mmap every time, and its page
  // faults cost more than the merging (the buffer keeps the size of the longest piece seen).
  thread_local std::vector<Node> node;
  node.resize(n);
  for (uint32_t i = 0; i < n; ++i)
    node[i] = {byte_ids_[static_cast<unsigned char>(piece[i])], i > 0 ? i - 1 : kNone, i + 1 < n ? i + 1 : kNone};
  auto rank_at = [&](uint32_t i) -> uint32_t {
    if (i == kNone || node[i].id == kNone || node[i].next == kNone) return kNone;
    const Merge* m = find(node[i].id, node[node[i].next].id);
    return m ? m->rank : kNone;
  };
  auto merge_at = [&](uint32_t i) {
    const uint32_t j = node[i].next;
    node[i].id = find(node[i].id, node[j].id)->id;
    node[j].id = kNone;  // dead
    node[i].next = node[j].next;
    if (node[j].next != kNone) node[node[j].next].prev = i;
  };

  if (ranks_grow_) {
    // Every merge only creates pairs of a higher rank, so ranks come out in increasing order:
    // a bucket of positions per rank, each processed left to right, replaces the heap and the
    // whole piece costs O(n) (plus sorting a bucket that filled out of order).
    thread_local std::unordered_map<uint32_t, std::vector<uint32_t>> buckets;
    buckets.clear();
    std::priority_queue<uint32_t, std::vector<uint32_t>, std::greater<uint32_t>> pending;
    auto push = [&](uint32_t i) {
      const uint32_t r = rank_at(i);
      if (r == kNone) return;
      auto& bucket = buckets[r];
      if (bucket.empty()) pending.push(r);
      bucket.push_back(i);
    };
    for (uint32_t i = 0; i + 1 < n; ++i) push(i);
    while (!pending.empty()) {
      const uint32_t r = pending.top();
      pending.pop();
      thread_local std::vector<uint32_t> positions;
      positions.swap(buckets[r]);  // the bucket takes the old buffer back for reuse
      buckets[r].clear();
      if (!std::is_sorted(positions.begin(), positions.end())) std::sort(positions.begin(), positions.end());
      for (uint32_t i : positions) {
        if (rank_at(i) != r) continue;  // stale: one side has merged since
        merge_at(i);
        push(node[i].prev);
        push(i);
      }
    }
  } else {
    // (rank, position of the left part): the smallest rank first, then the leftmost.
    std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<uint64_t>> heap;
    auto push = [&](uint32_t i) {
      if (const uint32_t r = rank_at(i); r != kNone) heap.push((uint64_t(r) << 32) | i);
    };
    for (uint32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const uint32_t r = uint32_t(heap.top() >> 32), i = uint32_t(heap.top());
      heap.pop();
      if (rank_at(i) != r) continue;  // stale
      merge_at(i);
      push(node[i].prev);
      push(i);
    }
  }
  for (uint32_t i = 0; i != kNone; i = node[i].next) out.push_back(node[i].id);
}

}  // namespace scratchformer::bpe
