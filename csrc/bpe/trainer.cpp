#include "trainer.h"

#include <queue>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include "pretokenizer.h"

namespace scratchformer::bpe {

namespace {
using Pair = std::pair<uint32_t, uint32_t>;
uint64_t key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }
Pair unkey(uint64_t k) { return {uint32_t(k >> 32), uint32_t(k)}; }
}  // namespace

TrainResult train_bpe(const std::vector<std::string_view>& texts, size_t n_merges,
                      const std::function<void(size_t)>& progress, size_t progress_every) {
  std::unordered_map<std::string_view, int64_t> counts;
  for (std::string_view text : texts)
    pretokenize(text, [&](size_t b, size_t e) { ++counts[text.substr(b, e - b)]; });

  std::vector<std::vector<uint32_t>> words;
  std::vector<int64_t> freq;
  words.reserve(counts.size());
  freq.reserve(counts.size());
  for (const auto& [piece, count] : counts) {
    words.emplace_back(piece.begin(), piece.end());
    for (auto& b : words.back()) b &= 0xFF;  // chars to byte values
    freq.push_back(count);
  }

  TrainResult result;
  for (int b = 0; b < 256; ++b) result.tokens.emplace_back(1, char(b));
  auto& tokens = result.tokens;

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::unordered_set<uint32_t>> where;
  for (uint32_t w = 0; w < words.size(); ++w) {
    const auto& word = words[w];
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      pair_count[key(word[i], word[i + 1])] += freq[w];
      where[key(word[i], word[i + 1])].insert(w);
    }
  }

  struct Entry {
    int64_t count;
    uint64_t pair;
  };
  // Heap order: most frequent first, then the smallest (left bytes, right bytes).
  auto after = [&tokens](const Entry& x, const Entry& y) {
    if (x.count != y.count) return x.count < y.count;
    const auto [xa, xb] = unkey(x.pair);
    const auto [ya, yb] = unkey(y.pair);
    if (int c = tokens[xa].compare(tokens[ya]); c != 0) return c > 0;
    return tokens[xb].compare(tokens[yb]) > 0;
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(after)> heap(after);
  for (const auto& [k, c] : pair_count) heap.push({c, k});

  std::unordered_set<uint64_t> changed;
  std::vector<uint32_t> merged;
  while (result.merges.size() < n_merges && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    auto pc = pair_count.find(top.pair);
    if (pc == pair_count.end() || pc->second != top.count) continue;  // stale
    const auto [a, b] = unkey(top.pair);
    const uint32_t new_id = uint32_t(tokens.size());
    tokens.push_back(tokens[a] + tokens[b]);
    result.merges.push_back({a, b});
    changed.clear();
    auto touched = std::move(where[top.pair]);
    where.erase(top.pair);
    for (uint32_t w : touched) {
      auto& word = words[w];
      const int64_t f = freq[w];
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const uint64_t k = key(word[i], word[i + 1]);
        pair_count[k] -= f;
        changed.insert(k);
      }
      merged.clear();
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == a && word[i + 1] == b) {
          merged.push_back(new_id);
          i += 2;
        } else {
          merged.push_back(word[i++]);
        }
      }
      word.swap(merged);
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const uint64_t k = key(word[i], word[i + 1]);
        pair_count[k] += f;
        where[k].insert(w);
        changed.insert(k);
      }
    }
    pair_count.erase(top.pair);
    for (uint64_t k : changed) {
      auto it = pair_count.find(k);
      if (it == pair_count.end()) continue;
      if (it->second > 0) heap.push({it->second, k}); else pair_count.erase(it);
    }
    if (progress && result.merges.size() % progress_every == 0) progress(result.merges.size());
  }
  return result;
}

}  // namespace scratchformer::bpe
