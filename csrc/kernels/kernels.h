// The interface between the torch glue (ops.cpp) and the CUDA kernels.
//
// Plain C++ types only: no torch and no CUDA headers, so each .cu compiles in seconds and the
// glue builds against torch's stable ABI. Launchers return nullptr on success, else a message.
#pragma once

#include <cstdint>

namespace scratchformer {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// LayerNorm over rows of C values (layernorm.cu). Rows of x (and residual) are x_stride
// (r_stride) elements apart with unit stride inside a row; every other array is contiguous.
// weight and bias have weight_dtype: dtype, or kFloat32. bias nullptr (forward) or dbias nullptr
// (backward): RMSNorm, on the same kernels: no mean subtracted (mean written as 0, not read), no bias.
struct LayerNormForward {
  DType dtype, weight_dtype;
  const void* x;
  int64_t x_stride;
  const void* residual;  // nullptr: h = x; else h = x + residual, written to h
  int64_t r_stride;
  const void* weight;
  const void* bias;
  void* y;          // [rows, C]
  void* h;          // [rows, C] when residual is given
  float* mean;      // [rows]
  float* rstd;      // [rows]: 1 / sqrt(var + eps)
  int64_t rows;
  int C;
  float eps;
};

struct LayerNormBackward {
  DType dtype, weight_dtype;
  const void* dy;  // [rows, C]
  const void* x;   // the normalized input (h in the residual variant), rows x_stride apart
  int64_t x_stride;
  const void* weight;
  const float* mean;
  const float* rstd;
  const void* grad_h;  // nullptr, or the gradient reaching h directly: added to dx
  void* dx;            // [rows, C]
  void* dweight;       // [C], weight_dtype
  void* dbias;         // [C], weight_dtype
  float* partial;      // scratch: 2 * layer_norm_backward_chunks(rows, C) * C floats
  int64_t rows;
  int C;
};

const char* launch_layer_norm_forward(const LayerNormForward& args, void* stream);
const char* launch_layer_norm_backward(const LayerNormBackward& args, void* stream);
// Row chunks of the deterministic dweight/dbias reduction on the current device (sizes its
// scratch buffer).
int layer_norm_backward_chunks(int64_t rows, int64_t C);

// One chunk of linear_cross_entropy (cross_entropy.cu): each row's loss of the logits, and with
// `grad` its gradient (times row_scale[row] * scale, 0 on ignored rows) written over the logits.
// Rows are `stride` elements apart with unit stride inside a row.
struct CrossEntropyChunk {
  DType dtype;
  void* logits;             // [rows, V]: read, then overwritten by the gradient when `grad`
  int64_t stride;
  const int64_t* targets;   // [rows]
  const float* row_scale;   // [rows], or nullptr for 1
  float scale;
  int64_t ignore_index;
  float label_smoothing;
  float softcap;            // 0: none
  float* loss;              // [rows]
  int64_t rows;
  int V;
  bool grad;
};

const char* launch_cross_entropy(const CrossEntropyChunk& args, void* stream);

// Causal attention (attention_*.cu). q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]; Hq % Hkv == 0 and
// query head h reads kv head h / (Hq / Hkv); 1 <= Tq <= Tk and query i sees keys j <= i + Tk - Tq.
// Inputs have unit stride along D and the element strides below for the other dimensions, each
// row 16-byte aligned; outputs are contiguous. D is one of attention_head_dim_supported's.
// A pattern narrows what a query sees: with first_key (int32 [B, Tq], nondecreasing along each
// row, 0 <= first_key[i] <= i + Tk - Tq) query i sees only keys first_key[i] .. i + Tk - Tq. That is
// a packed document's start, a sliding window's left edge or a left-padded row's first real key,
// whichever is last (the glue computes it). nullptr: every key up to the diagonal.
// softcap > 0 caps each scaled score s at softcap * tanh(s / softcap) (Gemma 2); sinks (fp32 [Hq])
// adds exp(sinks[h]) to every softmax denominator of head h (gpt-oss), so lse includes it. The
// backward needs no sinks: P = exp(s - lse) already divides by them; d sinks is the glue's.
struct Strides {
  int64_t batch, head, time;
};

struct AttentionShape {
  int batch, heads, kv_heads, t_q, t_k, head_dim;
};

struct AttentionForward {
  DType dtype;
  AttentionShape shape;
  const void *q, *k, *v;
  Strides q_stride, k_stride, v_stride;
  const int* first_key;  // [B, Tq] or nullptr: see above
  float softcap;         // 0: none
  const float* sinks;    // [Hq] or nullptr
  float scale;
  void* out;   // [B, Hq, Tq, D]
  float* lse;  // [B, Hq, Tq]: natural log of the sum of exp(scaled scores) of each query
  // Flash-decoding: with splits > 1 the keys are cut into `splits` ranges done by separate
  // blocks; partial_out ([splits, B*Hq*Tq, D]) and partial_lse ([splits, B*Hq*Tq]) hold their
  // results until a second kernel combines them.
  int splits;
  float* partial_out;
  float* partial_lse;
};

struct AttentionBackward {
  DType dtype;
  AttentionShape shape;
  const void *q, *k, *v, *dout;
  Strides q_stride, k_stride, v_stride, dout_stride;
  const void* out;   // [B, Hq, Tq, D], the forward's output
  const float* lse;  // [B, Hq, Tq], the forward's log-sum-exp
  const float* dlse; // [B, Hq, Tq], the gradient reaching the log-sum-exp, or nullptr
  const int* first_key;  // [B, Tq] or nullptr, as the forward's
  float softcap;         // 0: none, as the forward's
  float scale;
  float* delta;      // scratch [B, Hq, Tq]: rowsum(dout * out) - dlse
  void *dq, *dk, *dv;  // [B, Hq, Tq, D], [B, Hkv, Tk, D], [B, Hkv, Tk, D]
  // Few (batch, kv head, key tile) blocks for the GPU: with dkv_splits > 1 the (query head,
  // query tile) work of each kv group is shared out among dkv_splits blocks per key tile, whose
  // sums wait in dkv_partial ([dkv_splits, 2, B*Hkv*Tk, D]: dk, dv) until a
  // second kernel adds them in split order, so gradients stay bitwise reproducible.
  int dkv_splits;
  float* dkv_partial;
};

bool attention_head_dim_supported(int head_dim);
// How many key ranges the forward should split into (1: none) on the current device.
int attention_forward_splits(const AttentionShape& shape, DType dtype);
const char* launch_attention_forward(const AttentionForward& args, void* stream);
// How many sets the backward should cut each kv group's query heads into (1: none) on the
// current device: enough for two waves of blocks where batch * kv heads * key tiles is fewer.
int attention_backward_dkv_splits(const AttentionShape& shape, DType dtype, void* stream);
const char* launch_attention_backward(const AttentionBackward& args, void* stream);

// The compute capability whose PTX is embedded (e.g. 100: a GPU of that capability or newer can
// compile the kernels at load time), or 0.
int compiled_ptx_arch();

// CUDA runtime version the kernels were compiled against (e.g. 13000).
int compiled_cuda_version();

}  // namespace scratchformer
