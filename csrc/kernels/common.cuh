// Helpers shared by the kernels: conversions between storage types and fp32.
//
// Explicit intrinsics rather than implicit conversions: torch's build defines
// __CUDA_NO_HALF_CONVERSIONS__ (and the bf16 twin), which removes the implicit ones.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace scratchformer {

// An attribute of the current GPU into *value; false when it cannot be read.
inline bool device_attribute(cudaDeviceAttr attribute, int* value) {
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess && cudaDeviceGetAttribute(value, attribute, device) == cudaSuccess;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace scratchformer

namespace scratchformer {

// Sum over a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over one row of the block, the threads that share threadIdx.y (blockDim.x a multiple of
// 32; a 1-D block is one row); every one of them gets the total. `scratch` holds 32 floats per
// row of the block; consecutive calls may reuse it.
__device__ __forceinline__ float block_sum(float v, float (*scratch)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[threadIdx.y][warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[threadIdx.y][lane] : 0.f;
  return warp_sum(v);
}

// VEC values of T moved as one 16-byte access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Load VEC consecutive values starting at row[i] as floats: one vector access when ALIGNED
// (16-byte aligned and C % VEC == 0), else element by element with bounds checks (zeros past C).
template <bool ALIGNED, int VEC, typename T>
__device__ __forceinline__ void load_floats(const T* row, int i, int C, float (&out)[VEC]) {
  if constexpr (ALIGNED) {
    const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(row + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = i + k < C ? to_float(row[i + k]) : 0.f;
  }
}

template <bool ALIGNED, int VEC, typename T>
__device__ __forceinline__ void store_floats(T* row, int i, int C, const float (&in)[VEC]) {
  if constexpr (ALIGNED) {
    Pack<T, VEC> p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(row + i) = p;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (i + k < C) row[i + k] = from_float<T>(in[k]);
  }
}

}  // namespace scratchformer
