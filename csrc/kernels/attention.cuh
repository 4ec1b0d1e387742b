// Helpers shared by the attention kernels: tensor-core instructions (mma.sync, ldmatrix),
// asynchronous copies (cp.async) and the index arithmetic of the attention contract.
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and c = lane % 4:
//   A (16x16, row-major), 4 registers of 2 values: a0 = A[g][2c..2c+1], a1 = A[g+8][2c..2c+1],
//                                                   a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   B (16x8, "col"), 2 registers: b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
//   C (16x8, fp32), 4 floats: c0, c1 = C[g][2c..2c+1], c2, c3 = C[g+8][2c..2c+1]
// So a C fragment of two neighbouring n-tiles is, value for value, an A fragment: scores
// computed as C become the probabilities fed to the next product as A without leaving registers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.h"
#include "tensor_core.cuh"

namespace scratchformer {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reductions over the 4 lanes (one quad) that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Element (b, h, t, 0) of a tensor with unit stride along D.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const Strides& s, int b, int h, int t) {
  return static_cast<const T*>(base) + b * s.batch + h * s.head + t * s.time;
}

// Two floats rounded to T and packed into one register, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The A fragment of a 16x16 slab made of two neighbouring C fragments (n-tiles 2s and 2s+1).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// ---- tiles ---------------------------------------------------------------------------------

// Rows [t0, t0 + ROWS) of head h of a [B, H, T, D] tensor into a shared tile with row stride
// STRIDE elements; rows at or past `t_end` become zeros. All threads of the block take part.
template <typename T, int ROWS, int D, int STRIDE, int THREADS>
__device__ __forceinline__ void load_tile_async(T* tile, const void* base, const Strides& s, int b, int h, int t0,
                                                int t_end) {
  constexpr int CHUNKS = D * int(sizeof(T)) / 16;  // 16-byte pieces per row
  for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
    const int r = i / CHUNKS, c = i % CHUNKS;
    const bool valid = t0 + r < t_end;
    const T* src = valid ? row_ptr<T>(base, s, b, h, t0 + r) + c * (16 / sizeof(T)) : static_cast<const T*>(base);
    cp_async_16(tile + r * STRIDE + c * (16 / int(sizeof(T))), src, valid);
  }
}

}  // namespace scratchformer
