// scratchformer._bpe: the C++ core of the byte-level BPE tokenizer (pybind11, no torch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "byte_level.h"

namespace py = pybind11;
using namespace scratchformer::bpe;

PYBIND11_MODULE(_bpe, m) {
  m.doc() = "C++ core of scratchformer's byte-level BPE tokenizer";
  m.def(
      "byte_alphabet",
      [] {
        constexpr auto table = byte_to_code_point();
        std::vector<std::string> out;
        out.reserve(256);
        for (char32_t cp : table) out.push_back(utf8(cp));
        return out;
      },
      "The 256 strings that stand for bytes 0..255 in GPT-2's vocabulary files.");
}
