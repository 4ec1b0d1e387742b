// scaled_add: out = a + alpha * b, elementwise.
//
// The op that proves the build end to end (plain-CUDA kernel -> stable-ABI glue -> torch op ->
// autograd and torch.compile) until the real kernels replace it. One thread per element in a
// grid-stride loop; arithmetic in fp32 whatever the storage type.
#include <cuda_runtime.h>

#include "common.cuh"
#include "kernels.h"

namespace scratchformer {
namespace {

template <typename T>
__global__ void scaled_add_kernel(const T* __restrict__ a, const T* __restrict__ b, float alpha,
                                  T* __restrict__ out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = from_float<T>(to_float(a[i]) + alpha * to_float(b[i]));
  }
}

template <typename T>
const char* launch(const void* a, const void* b, float alpha, void* out, int64_t n,
                   cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const int blocks = int(wanted < 65535 ? wanted : 65535);
  scaled_add_kernel<T><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), alpha, static_cast<T*>(out), n);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_scaled_add(DType dtype, const void* a, const void* b, float alpha, void* out,
                              int64_t n, void* stream) {
  if (n == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch<float>(a, b, alpha, out, n, s);
    case DType::kFloat16: return launch<__half>(a, b, alpha, out, n, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, b, alpha, out, n, s);
  }
  return "scaled_add: unsupported dtype";
}

}  // namespace scratchformer
