// The attention kernels' host-side entry points, shared by the files that define them
// (attention_fwd.cu, attention_bwd.cu, attention_simt.cu); each is explicitly instantiated for
// every (storage type, head dim) below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "kernels.h"

#define SCRATCHFORMER_FOR_EACH_HEAD_DIM(X, T) X(T, 32) X(T, 64) X(T, 96) X(T, 128)
#define SCRATCHFORMER_FOR_EACH_ATTENTION_TYPE(X) \
  SCRATCHFORMER_FOR_EACH_HEAD_DIM(X, float)      \
  SCRATCHFORMER_FOR_EACH_HEAD_DIM(X, __half)     \
  SCRATCHFORMER_FOR_EACH_HEAD_DIM(X, __nv_bfloat16)
#define SCRATCHFORMER_FOR_EACH_TENSOR_CORE_TYPE(X) \
  SCRATCHFORMER_FOR_EACH_HEAD_DIM(X, __half)       \
  SCRATCHFORMER_FOR_EACH_HEAD_DIM(X, __nv_bfloat16)

namespace scratchformer {

// Forwards with at most this many queries (decoding) take the split-key CUDA-core kernel.
constexpr int kDecodeMaxQueries = 16;

// CUDA cores, every dtype (attention_simt.cu).
template <typename T, int D> void forward_simt(const AttentionForward& a, cudaStream_t stream);
template <typename T, int D> void backward_delta(const AttentionBackward& a, cudaStream_t stream);
template <typename T, int D> void backward_simt(const AttentionBackward& a, cudaStream_t stream);
int forward_simt_splits(const AttentionShape& shape, int sm_count);

// Tensor cores, fp16 and bf16 (attention_fwd.cu, attention_bwd.cu).
template <typename T, int D> void forward_tensor_cores(const AttentionForward& a, cudaStream_t stream);
template <typename T, int D> cudaError_t backward_tensor_cores(const AttentionBackward& a, cudaStream_t stream);

// Hopper (attention_hopper.cu): wgmma and bulk tensor copies, where the device is sm_90 and this
// build has its sm_90a image. forward_hopper launches and returns true, or returns false (other
// GPU, head dim, or strides the copy engine does not take) and leaves it to the mma.sync kernel.
bool hopper_kernels_usable(cudaStream_t stream);
__host__ __device__ constexpr bool hopper_takes(int head_dim) { return head_dim == 64 || head_dim == 128; }
constexpr int kHopperDkvKeys = 128;    // keys per block of the Hopper dk/dv kernel
constexpr int kHopperDkvQueries = 64;  // and queries per tile it walks
template <typename T, int D> bool forward_hopper(const AttentionForward& a, cudaStream_t stream);
// The backward's dk/dv and dq on Hopper (same conditions); false: the mma.sync kernel runs instead.
template <typename T, int D> bool backward_dkv_hopper(const AttentionBackward& a, cudaStream_t stream);
template <typename T, int D> bool backward_dq_hopper(const AttentionBackward& a, cudaStream_t stream);

// Calls f(T{}, std::integral_constant<int, D>{}) for the dtype and head dim; false if unsupported.
template <typename F>
bool dispatch_attention(DType dtype, int head_dim, F&& f) {
  auto with_type = [&](auto type) {
    switch (head_dim) {
      case 32: f(type, std::integral_constant<int, 32>{}); return true;
      case 64: f(type, std::integral_constant<int, 64>{}); return true;
      case 96: f(type, std::integral_constant<int, 96>{}); return true;
      case 128: f(type, std::integral_constant<int, 128>{}); return true;
      default: return false;
    }
  };
  switch (dtype) {
    case DType::kFloat32: return with_type(float{});
    case DType::kFloat16: return with_type(__half{});
    case DType::kBFloat16: return with_type(__nv_bfloat16{});
  }
  return false;
}

}  // namespace scratchformer
