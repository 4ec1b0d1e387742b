// cross_entropy: one chunk of linear_cross_entropy (scratchformer/ops/cross_entropy.py). Given the
// chunk's logits z [rows, V] (from cuBLAS, in the inputs' dtype), each row's loss
//   (1 - ls) * (lse - z[t]) + ls * (lse - mean(z)),  0 where t == ignore_index,
// and, when asked, its gradient written over the logits in place (so the chunk never holds a
// second [rows, V] buffer, nor a float32 copy):
//   dz[j] = w * (softmax(z)[j] - (1 - ls) * [j == t] - ls / V),  w = row_scale * scale (0 if ignored).
// With softcap, z = softcap * tanh(raw / softcap) first and dz gains the factor 1 - tanh^2.
// A target outside [0, V) that is not ignore_index is never read: its row's loss and gradient are
// NaN, so that the mistake shows (as a NaN loss) instead of reading past the row.
//
// One thread block per row, 16-byte vector loads. Pass one keeps, per thread, a running max and
// the sum of exp(z - max) (rescaled when the max grows: one read of the row for both) and the sum
// of z; three block reductions give lse and mean(z). Pass two re-reads the row (L1/L2, not DRAM)
// and writes the gradient. All arithmetic is fp32 whatever the storage type.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace scratchformer {
namespace {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Max over the block (1-D), every thread gets it; `scratch` as block_sum's.
__device__ __forceinline__ float block_max(float v, float (*scratch)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[0][warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[0][lane] : -INFINITY;
  return warp_max(v);
}

template <bool CAP>
__device__ __forceinline__ float capped(float z, float softcap) {
  if constexpr (CAP) return softcap * tanhf(z / softcap);
  return z;
}

template <typename T, bool ALIGNED, bool CAP, bool GRAD>
__global__ void cross_entropy_kernel(T* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets,
                                     const float* __restrict__ row_scale, float scale, int64_t ignore_index,
                                     float label_smoothing, float softcap, int V, float* __restrict__ loss) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float scratch[1][32];
  const int64_t row = blockIdx.x;
  T* z = logits + row * stride;
  const int64_t target = targets[row];
  const bool counted = target != ignore_index;
  const bool in_range = target >= 0 && target < V;
  const int step = blockDim.x * VEC;

  float running_max = -INFINITY, sum_exp = 0.f, sum_z = 0.f;
  for (int i = threadIdx.x * VEC; i < V; i += step) {
    float a[VEC];
    load_floats<ALIGNED>(z, i, V, a);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (i + k >= V) break;
      const float v = capped<CAP>(a[k], softcap);
      sum_z += v;
      if (v > running_max) {
        sum_exp = sum_exp * expf(running_max - v) + 1.f;  // exp(-inf) = 0 on the first value
        running_max = v;
      } else {
        sum_exp += expf(v - running_max);
      }
    }
  }
  const float row_max = block_max(running_max, scratch);
  const float mine = running_max == -INFINITY ? 0.f : sum_exp * expf(running_max - row_max);
  const float lse = row_max + logf(block_sum(mine, scratch));
  const float mean_z = block_sum(sum_z, scratch) / V;
  // Every thread reads the target's logit before any thread overwrites the row (pass two).
  const float z_target = !counted ? 0.f : in_range ? capped<CAP>(to_float(z[target]), softcap) : NAN;
  if (threadIdx.x == 0)
    loss[row] = counted ? (1.f - label_smoothing) * (lse - z_target) + label_smoothing * (lse - mean_z) : 0.f;
  if constexpr (!GRAD) return;
  __syncthreads();

  const float weight = !counted ? 0.f : in_range ? (row_scale ? row_scale[row] : 1.f) * scale : NAN;
  const float uniform = label_smoothing / V;
  for (int i = threadIdx.x * VEC; i < V; i += step) {
    float a[VEC];
    load_floats<ALIGNED>(z, i, V, a);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = capped<CAP>(a[k], softcap);
      float g = expf(v - lse) - uniform - (i + k == target ? 1.f - label_smoothing : 0.f);
      if constexpr (CAP) g *= 1.f - (v / softcap) * (v / softcap);  // d softcap * tanh(x / softcap) / dx
      a[k] = g * weight;
    }
    store_floats<ALIGNED>(z, i, V, a);
  }
}

int row_threads(int V, int vec) {
  int threads = 32;
  while (threads < 1024 && threads * vec < V) threads *= 2;
  return threads;
}

template <typename T>
const char* launch(const CrossEntropyChunk& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = a.V % VEC == 0 && a.stride % VEC == 0 && reinterpret_cast<uintptr_t>(a.logits) % 16 == 0;
  auto run = [&](auto aligned_, auto cap_, auto grad_) {
    constexpr bool A = decltype(aligned_)::value, C = decltype(cap_)::value, G = decltype(grad_)::value;
    cross_entropy_kernel<T, A, C, G><<<unsigned(a.rows), row_threads(a.V, VEC), 0, stream>>>(
        static_cast<T*>(a.logits), a.stride, a.targets, a.row_scale, a.scale, a.ignore_index, a.label_smoothing,
        a.softcap, a.V, a.loss);
  };
  auto with_grad = [&](auto aligned_, auto cap_) {
    if (a.grad) run(aligned_, cap_, std::true_type{}); else run(aligned_, cap_, std::false_type{});
  };
  auto with_cap = [&](auto aligned_) {
    if (a.softcap > 0.f) with_grad(aligned_, std::true_type{}); else with_grad(aligned_, std::false_type{});
  };
  if (vec_ok) with_cap(std::true_type{}); else with_cap(std::false_type{});
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_cross_entropy(const CrossEntropyChunk& args, void* stream) {
  if (args.rows == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32: return launch<float>(args, s);
    case DType::kFloat16: return launch<__half>(args, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(args, s);
  }
  return "cross_entropy: unsupported dtype";
}

}  // namespace scratchformer
