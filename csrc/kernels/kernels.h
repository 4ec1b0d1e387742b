// The interface between the torch glue (ops.cpp) and the CUDA kernels.
//
// Plain C++ types only: no torch and no CUDA headers, so each .cu compiles in seconds and the
// glue builds against torch's stable ABI. Launchers return nullptr on success, else a message.
#pragma once

#include <cstdint>

namespace scratchformer {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[i] = a[i] + alpha * b[i] for n contiguous elements, on `stream` (a cudaStream_t).
const char* launch_scaled_add(DType dtype, const void* a, const void* b, float alpha, void* out,
                              int64_t n, void* stream);

// Compute capabilities (e.g. 80, 90) that the kernels were compiled for; returns how many,
// writing at most `capacity` of them.
int compiled_cuda_archs(int* out, int capacity);

// CUDA runtime version the kernels were compiled against (e.g. 13000).
int compiled_cuda_version();

}  // namespace scratchformer
