// Byte-level BPE training over pre-tokenized word counts.
//
// Words are counted once; each merge then touches only the words that contain the merged pair
// (an index from pair to words), updating pair counts incrementally instead of recounting the
// corpus. The next merge is the most frequent pair; ties go to the pair whose (left bytes, right
// bytes) sorts first, so training is deterministic and matches the Python trainer exactly.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace scratchformer::bpe {

struct TrainResult {
  std::vector<std::string> tokens;  // 256 bytes, then one token per merge
  std::vector<std::pair<uint32_t, uint32_t>> merges;
};

// Learns up to n_merges merges (fewer if every piece is down to one token). progress(merges_done) is called
// every `progress_every` merges when given.
TrainResult train_bpe(const std::vector<std::string_view>& texts, size_t n_merges,
                      const std::function<void(size_t)>& progress = {}, size_t progress_every = 1000);

}  // namespace scratchformer::bpe
