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
// weight and bias have weight_dtype: dtype, or kFloat32.
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
// Row chunks of the deterministic dweight/dbias reduction (sizes its scratch buffer).
int layer_norm_backward_chunks(int64_t rows, int64_t C);

// Compute capabilities (e.g. 80, 90) that the kernels were compiled for; returns how many,
// writing at most `capacity` of them.
int compiled_cuda_archs(int* out, int capacity);

// CUDA runtime version the kernels were compiled against (e.g. 13000).
int compiled_cuda_version();

}  // namespace scratchformer
