// scratchformer._bpe: the C++ core of the byte-level BPE tokenizer (pybind11, no torch).
//
// Python (scratchformer/tokenizer.py) keeps the vocabulary files, special tokens and decoding;
// this module does the hot loops: pre-tokenizing, encoding (on several threads for a batch,
// without the GIL) and training.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "byte_level.h"
#include "encoder.h"
#include "pretokenizer.h"
#include "trainer.h"
#include "unicode_tables.h"

namespace py = pybind11;
using namespace scratchformer::bpe;

namespace {

// The encoder plus one Python int per token id, made once: filling the result list then costs a
// reference count per id instead of an allocation (this was a quarter of encode's time).
struct PyEncoder {
  Encoder encoder;
  std::vector<py::object> ints;

  PyEncoder(std::vector<std::string> tokens, const std::vector<std::pair<uint32_t, uint32_t>>& merges)
      : encoder(std::move(tokens), merges) {
    ints.reserve(encoder.size());
    for (size_t i = 0; i < encoder.size(); ++i) ints.push_back(py::int_(i));
  }

  // Straight through the C API: pybind11's item assignment costs more than the encoding itself.
  py::list to_list(const std::vector<uint32_t>& ids) const {
    PyObject* list = PyList_New(Py_ssize_t(ids.size()));
    if (!list) throw py::error_already_set();
    for (size_t i = 0; i < ids.size(); ++i) {
      PyObject* item = ints[ids[i]].ptr();
      Py_INCREF(item);
      PyList_SET_ITEM(list, Py_ssize_t(i), item);
    }
    return py::reinterpret_steal<py::list>(list);
  }
};

// The UTF-8 bytes of a str, without copying them (CPython caches them on the object).
std::string_view utf8_view(const py::str& text) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
  if (!data) throw py::error_already_set();
  return {data, size_t(size)};
}

std::vector<std::vector<uint32_t>> encode_many(const Encoder& enc, const std::vector<std::string_view>& texts,
                                               size_t threads) {
  std::vector<std::vector<uint32_t>> out(texts.size());
  threads = std::max<size_t>(1, std::min(threads, texts.size()));
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (size_t i = t; i < texts.size(); i += threads) enc.encode(texts[i], out[i]);
    });
  }
  for (auto& th : pool) th.join();
  return out;
}

}  // namespace

PYBIND11_MODULE(_bpe, m) {
  m.doc() = "C++ core of scratchformer's byte-level BPE tokenizer";
  m.attr("unicode_version") = kUnicodeVersion;

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

  m.def(
      "pretokenize",
      [](const std::string& text) {
        std::vector<py::bytes> pieces;
        pretokenize(text, [&](size_t b, size_t e) { pieces.emplace_back(text.data() + b, e - b); });
        return pieces;
      },
      py::arg("text"), "GPT-2's pre-tokenization of text, as UTF-8 pieces.");

  py::class_<PyEncoder>(m, "Encoder")
      .def(py::init([](const std::vector<py::bytes>& tokens, const std::vector<std::pair<uint32_t, uint32_t>>& merges) {
             std::vector<std::string> raw(tokens.begin(), tokens.end());
             return new PyEncoder(std::move(raw), merges);
           }),
           py::arg("tokens"), py::arg("merges"))
      .def(
          "encode",
          [](const PyEncoder& self, const py::str& str) {
            const std::string_view text = utf8_view(str);
            std::vector<uint32_t> ids;
            {
              py::gil_scoped_release release;  // text stays alive: the caller holds str
              ids.reserve(text.size() / 3);
              self.encoder.encode(text, ids);
            }
            return self.to_list(ids);
          },
          py::arg("text"), "Token ids of text (no special tokens).")
      .def(
          "encode_batch",
          [](const PyEncoder& self, const std::vector<py::str>& strs, size_t threads) {
            std::vector<std::string_view> texts;
            texts.reserve(strs.size());
            for (const auto& s : strs) texts.push_back(utf8_view(s));
            std::vector<std::vector<uint32_t>> ids;
            {
              py::gil_scoped_release release;  // strs keeps the texts alive
              ids = encode_many(self.encoder, texts, threads);
            }
            py::list out(ids.size());
            for (size_t i = 0; i < ids.size(); ++i) out[i] = self.to_list(ids[i]);
            return out;
          },
          py::arg("texts"), py::arg("threads"), "Token ids of each text, on several threads.");

  m.def(
      "train",
      [](const std::vector<std::string>& texts, size_t n_merges, std::function<void(size_t)> progress) {
        std::vector<std::string_view> views(texts.begin(), texts.end());
        TrainResult result;
        if (progress) {
          result = train_bpe(views, n_merges, [&](size_t done) { progress(done); });
        } else {
          py::gil_scoped_release release;
          result = train_bpe(views, n_merges);
        }
        std::vector<py::bytes> tokens(result.tokens.begin(), result.tokens.end());
        return py::make_tuple(tokens, result.merges);
      },
      py::arg("texts"), py::arg("n_merges"), py::arg("progress") = nullptr,
      "Learn up to n_merges merges: returns (token bytes by id, merges as id pairs).");
}
