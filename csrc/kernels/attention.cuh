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

// Rows [t0, t0 + ROWS) of a head (its row 0 at `head`, rows `time` elements apart) into a
// shared tile with row stride STRIDE elements; rows at or past t_end become zeros. THREADS
// threads copy in passes of THREADS / CHUNKS rows, one 16-byte chunk of a row per thread and
// pass. Nothing per thread is kept between copies: a thread derives its row and chunk from the
// thread index register each time (cheaper than holding them through a loop short of registers).
template <typename T, int ROWS, int D, int STRIDE, int THREADS>
__device__ __forceinline__ void load_rows_async(T* tile, const T* head, int64_t time, int t0, int t_end) {
  constexpr int ELEMS = 16 / int(sizeof(T)), CHUNKS = D / ELEMS;  // 16-byte chunks per row
  constexpr int PASS_ROWS = THREADS / CHUNKS, PASSES = (ROWS + PASS_ROWS - 1) / PASS_ROWS;
  const int tid = special_register_tid_x(), row = tid / CHUNKS, chunk = tid % CHUNKS;
  if (THREADS % CHUNKS != 0 && row >= PASS_ROWS) return;  // threads past a whole number of rows (D = 96) idle
  const T* p = head + (t0 + row) * time + chunk * ELEMS;
  T* dst = tile + row * STRIDE + chunk * ELEMS;
  const int left = t_end - t0 - row;
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    if (ROWS % PASS_ROWS != 0 && row + i * PASS_ROWS >= ROWS) break;
    cp_async_16(dst + i * PASS_ROWS * STRIDE, p, i * PASS_ROWS < left);
    p += PASS_ROWS * time;
  }
}

// The same for head h of batch b of a [B, H, T, D] tensor with strides s.
template <typename T, int ROWS, int D, int STRIDE, int THREADS>
__device__ __forceinline__ void load_tile_async(T* tile, const void* tensor, const Strides& s, int b, int h, int t0,
                                                int t_end) {
  load_rows_async<T, ROWS, D, STRIDE, THREADS>(tile, row_ptr<T>(tensor, s, b, h, 0), s.time, t0, t_end);
}

// ---- the pattern (first_key, kernels.h) ----------------------------------------------------

// Whether a call has a pattern, softcapping or sinks: the mma.sync kernels then run their
// instance that takes them.
__host__ __device__ inline bool patterned(const AttentionForward& a) {
  return a.first_key != nullptr || a.softcap > 0.f || a.sinks != nullptr;
}
__host__ __device__ inline bool patterned(const AttentionBackward& a) { return a.first_key != nullptr || a.softcap > 0.f; }

// The first key `query` of batch b sees (0 without a pattern); queries past the end read the
// last one's, which is what their masking needs (their P is zero anyway).
__device__ __forceinline__ int first_key_of(const int* first_key, const AttentionShape& s, int b, int query) {
  return first_key == nullptr ? 0 : first_key[int64_t(b) * s.t_q + min(query, s.t_q - 1)];
}

// The first query from `lo` on whose first key is past `key` (Tq if none): first_key is
// nondecreasing, so queries [lo, result) see `key` where causality lets them, and none after
// do. A binary search: every thread of a block runs it alike, its loads cached.
__device__ __forceinline__ int first_query_past(const int* first_key, const AttentionShape& s, int b, int lo, int key) {
  if (first_key == nullptr) return s.t_q;
  const int* row = first_key + int64_t(b) * s.t_q;
  int hi = s.t_q;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (row[mid] > key) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Softcapping in the units a kernel keeps its scores in (raw q.k, or already scaled): with
// cap = softcap in those units, s -> cap * tanh(s / cap), of derivative 1 - tanh^2. tanh from one
// ex2.approx (about 1e-7 absolute; tanh.approx.f32, 2^-11 relative, would move a logit of 50 by
// 0.02), its exponent clamped so that the division never meets infinity. Kernels branch once on
// a.softcap and run their element loop with Softcap or with NoSoftcap, which compiles away.
struct Softcap {
  float cap, inv;  // inv = 1 / cap
  __device__ static Softcap in_units(float softcap, float unit) {  // unit: one unit of score, in logits
    return {softcap / unit, unit / softcap};
  }
  __device__ float apply(float s) const {
    return cap * (1.f - __fdividef(2.f, exp2_approx(fminf(2.f * kLog2e * s * inv, 64.f)) + 1.f));
  }
  __device__ float derivative(float capped) const {  // d apply(s) / ds, from apply(s)
    const float t = capped * inv;
    return 1.f - t * t;
  }
};
struct NoSoftcap {
  __device__ float apply(float s) const { return s; }
  __device__ float derivative(float) const { return 1.f; }
};
// The same decided per score (the CUDA-core backward): caps `score` (in `unit`s of logit) when
// softcap > 0 and returns d capped / d score (1 without a cap).
__device__ __forceinline__ float cap_score(float& score, float softcap, float unit) {
  if (softcap <= 0.f) return 1.f;
  const Softcap cap = Softcap::in_units(softcap, unit);
  score = cap.apply(score);
  return cap.derivative(score);
}

// A dk/dv block's share of its kv group's work when the backward is split (dkv_splits): the
// (query head, query tile) pairs from the first query that sees the block's keys on, head-major,
// cut into `splits` contiguous ranges of which split z takes the z-th. The splits' sums are added
// in split order, so gradients do not depend on the GPU's timing.
struct DkvShare {
  int head;   // the first pair's query head, within the group
  int i0;     // its first query
  int tiles;  // how many pairs
};
__host__ __device__ inline DkvShare dkv_share(int group, int tiles_per_head, int first_query, int tile, int z, int splits) {
  // The first total % splits ranges hold one pair more than the others (32-bit: no overflow).
  const int total = group * tiles_per_head, least = total / splits, longer = total % splits;
  const int begin = z * least + min(z, longer), tiles = least + (z < longer);
  return {begin / tiles_per_head, first_query + begin % tiles_per_head * tile, tiles};
}

}  // namespace scratchformer
