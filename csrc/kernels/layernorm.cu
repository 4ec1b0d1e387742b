// layer_norm: y = (h - mean) * rstd * weight + bias over each row of C values, where h = x, or
// h = x + residual (written out too: pre-norm blocks need both), and its backward.
//
// Forward and dx: one thread block per row. The block has 32..1024 threads, about one 16-byte
// vector (VEC = 8 values of fp16/bf16, 4 of fp32) per thread; a thread takes every blockDim-th
// vector of the row. Three passes over the row: the sum (mean), the sum of squared deviations
// from that mean (variance without cancellation), then normalize and write. Passes two and
// three re-read the row, which is at most tens of KB and still in L1/L2, so DRAM sees it once.
// Statistics and arithmetic are fp32 whatever the storage type. Rows that are not 16-byte
// aligned, or C not a multiple of VEC, take the same code with element-wise accesses.
//
// dweight, dbias: two stages and no atomics, so the result is bitwise identical run to run.
// Stage 1: blocks of 32 columns x 8 row lanes walk one chunk of rows; each column's 8 partial
// sums are added in shared memory in a fixed order and written to a [chunks, C] fp32 buffer.
// Stage 2: one thread per column adds its chunks in order.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace scratchformer {
namespace {

constexpr int kColumnsPerBlock = 32;  // stage 1 of dweight/dbias
constexpr int kRowLanes = 8;

template <typename T>
__host__ __device__ constexpr int vec_of() {
  return 16 / sizeof(T);
}

template <typename T, typename W, bool ALIGNED, bool RESIDUAL>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                                      int64_t r_stride, const W* __restrict__ weight, const W* __restrict__ bias,
                                      T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean_out,
                                      float* __restrict__ rstd_out, int C, float eps) {
  constexpr int VEC = vec_of<T>();
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* src = x + row * x_stride;
  const int step = blockDim.x * VEC;

  float sum = 0.f;
  if constexpr (RESIDUAL) {
    // h = x + residual, rounded to T as a separate addition would be; the norm reads that h.
    const T* res = residual + row * r_stride;
    T* h_row = h + row * int64_t(C);
    for (int i = threadIdx.x * VEC; i < C; i += step) {
      float a[VEC], b[VEC];
      load_floats<ALIGNED>(src, i, C, a);
      load_floats<ALIGNED>(res, i, C, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) a[k] = to_float(from_float<T>(a[k] + b[k]));
      store_floats<ALIGNED>(h_row, i, C, a);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += i + k < C ? a[k] : 0.f;
    }
    src = h_row;  // each thread re-reads only what it wrote itself
  } else {
    for (int i = threadIdx.x * VEC; i < C; i += step) {
      float a[VEC];
      load_floats<ALIGNED>(src, i, C, a);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += a[k];  // zeros past C
    }
  }
  const float mean = block_sum(sum, scratch) / C;

  float squares = 0.f;
  for (int i = threadIdx.x * VEC; i < C; i += step) {
    float a[VEC];
    load_floats<ALIGNED>(src, i, C, a);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = i + k < C ? a[k] - mean : 0.f;
      squares += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) / C + eps);

  T* out = y + row * int64_t(C);
  for (int i = threadIdx.x * VEC; i < C; i += step) {
    float a[VEC], w[VEC], b[VEC];
    load_floats<ALIGNED>(src, i, C, a);
    load_floats<ALIGNED>(weight, i, C, w);
    load_floats<ALIGNED>(bias, i, C, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = (a[k] - mean) * rstd * w[k] + b[k];
    store_floats<ALIGNED>(out, i, C, a);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, xhat = (x - mean) * rstd;
// plus grad_h, the gradient that reached h directly (the residual variant's second output).
template <typename T, typename W, bool ALIGNED, bool GRAD_H>
__global__ void layer_norm_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, int64_t x_stride,
                                     const W* __restrict__ weight, const float* __restrict__ mean_in,
                                     const float* __restrict__ rstd_in, const T* __restrict__ grad_h,
                                     T* __restrict__ dx, int C) {
  constexpr int VEC = vec_of<T>();
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_stride;
  const T* dy_row = dy + row * int64_t(C);
  const float mean = mean_in[row], rstd = rstd_in[row];
  const int step = blockDim.x * VEC;

  float sum_g = 0.f, sum_gx = 0.f;
  for (int i = threadIdx.x * VEC; i < C; i += step) {
    float a[VEC], d[VEC], w[VEC];
    load_floats<ALIGNED>(x_row, i, C, a);
    load_floats<ALIGNED>(dy_row, i, C, d);
    load_floats<ALIGNED>(weight, i, C, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = d[k] * w[k];  // zero past C: d is zero there
      sum_g += g;
      sum_gx += g * (a[k] - mean) * rstd;
    }
  }
  const float mean_g = block_sum(sum_g, scratch) / C;
  const float mean_gx = block_sum(sum_gx, scratch) / C;

  T* dx_row = dx + row * int64_t(C);
  for (int i = threadIdx.x * VEC; i < C; i += step) {
    float a[VEC], d[VEC], w[VEC];
    load_floats<ALIGNED>(x_row, i, C, a);
    load_floats<ALIGNED>(dy_row, i, C, d);
    load_floats<ALIGNED>(weight, i, C, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = rstd * (d[k] * w[k] - mean_g - (a[k] - mean) * rstd * mean_gx);
    if constexpr (GRAD_H) {
      float e[VEC];
      load_floats<ALIGNED>(grad_h + row * int64_t(C), i, C, e);
#pragma unroll
      for (int k = 0; k < VEC; ++k) a[k] += e[k];
    }
    store_floats<ALIGNED>(dx_row, i, C, a);
  }
}

template <typename T>
__global__ void layer_norm_dwdb_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x, int64_t x_stride,
                                               const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                               float* __restrict__ partial_w, float* __restrict__ partial_b,
                                               int64_t rows, int C, int64_t rows_per_chunk) {
  __shared__ float sw[kRowLanes][kColumnsPerBlock + 1];
  __shared__ float sb[kRowLanes][kColumnsPerBlock + 1];
  const int col = blockIdx.x * kColumnsPerBlock + threadIdx.x;
  const int64_t first = blockIdx.y * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  float acc_w = 0.f, acc_b = 0.f;
  if (col < C) {
    for (int64_t r = first + threadIdx.y; r < last; r += kRowLanes) {
      const float d = to_float(dy[r * C + col]);
      acc_w += d * (to_float(x[r * x_stride + col]) - mean_in[r]) * rstd_in[r];
      acc_b += d;
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && col < C) {
    float w = 0.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) {
      w += sw[k][threadIdx.x];
      b += sb[k][threadIdx.x];
    }
    partial_w[blockIdx.y * int64_t(C) + col] = w;
    partial_b[blockIdx.y * int64_t(C) + col] = b;
  }
}

template <typename W>
__global__ void layer_norm_dwdb_final_kernel(const float* __restrict__ partial_w, const float* __restrict__ partial_b,
                                             int chunks, int C, W* __restrict__ dw, W* __restrict__ db) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= C) return;
  float w = 0.f, b = 0.f;
  for (int k = 0; k < chunks; ++k) {
    w += partial_w[k * int64_t(C) + col];
    b += partial_b[k * int64_t(C) + col];
  }
  dw[col] = from_float<W>(w);
  db[col] = from_float<W>(b);
}

int row_threads(int C, int vec) {
  int threads = 32;
  while (threads < 1024 && threads * vec < C) threads *= 2;
  return threads;
}

bool aligned(const void* p, size_t bytes = 16) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, typename W>
const char* forward(const LayerNormForward& a, cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  // weight and bias are read VEC at a time too: 32 bytes for float32 next to 16-bit x.
  const bool vec_ok = a.C % VEC == 0 && a.x_stride % VEC == 0 && aligned(a.x) && aligned(a.weight, sizeof(W) * VEC) &&
                      aligned(a.bias, sizeof(W) * VEC) && aligned(a.y) &&
                      (a.residual == nullptr || (a.r_stride % VEC == 0 && aligned(a.residual) && aligned(a.h)));
  const dim3 grid(unsigned(a.rows)), block(row_threads(a.C, VEC));
  auto x = static_cast<const T*>(a.x);
  auto r = static_cast<const T*>(a.residual);
  auto w = static_cast<const W*>(a.weight);
  auto b = static_cast<const W*>(a.bias);
  auto y = static_cast<T*>(a.y);
  auto h = static_cast<T*>(a.h);
#define SCRATCHFORMER_LN_FWD(ALIGNED, RESIDUAL)                                                        \
  layer_norm_fwd_kernel<T, W, ALIGNED, RESIDUAL><<<grid, block, 0, stream>>>(x, a.x_stride, r, a.r_stride, w, b, \
                                                                            y, h, a.mean, a.rstd, a.C, a.eps)
  if (a.residual) {
    if (vec_ok) SCRATCHFORMER_LN_FWD(true, true); else SCRATCHFORMER_LN_FWD(false, true);
  } else {
    if (vec_ok) SCRATCHFORMER_LN_FWD(true, false); else SCRATCHFORMER_LN_FWD(false, false);
  }
#undef SCRATCHFORMER_LN_FWD
  return last_error();
}

template <typename T, typename W>
const char* backward(const LayerNormBackward& a, cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  const bool vec_ok = a.C % VEC == 0 && a.x_stride % VEC == 0 && aligned(a.dy) && aligned(a.x) &&
                      aligned(a.weight, sizeof(W) * VEC) && aligned(a.dx) && (a.grad_h == nullptr || aligned(a.grad_h));
  const dim3 grid(unsigned(a.rows)), block(row_threads(a.C, VEC));
  auto dy = static_cast<const T*>(a.dy);
  auto x = static_cast<const T*>(a.x);
  auto w = static_cast<const W*>(a.weight);
  auto gh = static_cast<const T*>(a.grad_h);
  auto dx = static_cast<T*>(a.dx);
#define SCRATCHFORMER_LN_DX(ALIGNED, GRAD_H) \
  layer_norm_dx_kernel<T, W, ALIGNED, GRAD_H><<<grid, block, 0, stream>>>(dy, x, a.x_stride, w, a.mean, a.rstd, gh, dx, a.C)
  if (a.grad_h) {
    if (vec_ok) SCRATCHFORMER_LN_DX(true, true); else SCRATCHFORMER_LN_DX(false, true);
  } else {
    if (vec_ok) SCRATCHFORMER_LN_DX(true, false); else SCRATCHFORMER_LN_DX(false, false);
  }
#undef SCRATCHFORMER_LN_DX
  if (const char* err = last_error()) return err;

  const int chunks = layer_norm_backward_chunks(a.rows, a.C);
  const int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
  float* partial_w = a.partial;
  float* partial_b = a.partial + int64_t(chunks) * a.C;
  const dim3 grid1((a.C + kColumnsPerBlock - 1) / kColumnsPerBlock, chunks), block1(kColumnsPerBlock, kRowLanes);
  layer_norm_dwdb_partial_kernel<T><<<grid1, block1, 0, stream>>>(dy, x, a.x_stride, a.mean, a.rstd, partial_w,
                                                                   partial_b, a.rows, a.C, rows_per_chunk);
  if (const char* err = last_error()) return err;
  layer_norm_dwdb_final_kernel<W><<<(a.C + 255) / 256, 256, 0, stream>>>(
      partial_w, partial_b, chunks, a.C, static_cast<W*>(a.dweight), static_cast<W*>(a.dbias));
  return last_error();
}

template <template <typename, typename> class Op, typename Args>
const char* dispatch(const Args& a, void* stream) {
  if (a.rows == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const bool w32 = a.weight_dtype == DType::kFloat32;
  switch (a.dtype) {
    case DType::kFloat32: return Op<float, float>::run(a, s);
    case DType::kFloat16: return w32 ? Op<__half, float>::run(a, s) : Op<__half, __half>::run(a, s);
    case DType::kBFloat16: return w32 ? Op<__nv_bfloat16, float>::run(a, s) : Op<__nv_bfloat16, __nv_bfloat16>::run(a, s);
  }
  return "layer_norm: unsupported dtype";
}

template <typename T, typename W>
struct Forward {
  static const char* run(const LayerNormForward& a, cudaStream_t s) { return forward<T, W>(a, s); }
};
template <typename T, typename W>
struct Backward {
  static const char* run(const LayerNormBackward& a, cudaStream_t s) { return backward<T, W>(a, s); }
};

}  // namespace

int layer_norm_backward_chunks(int64_t rows, int64_t C) {
  // Enough blocks to fill a GPU (about 1024 in stage 1), at least 32 rows per chunk.
  const int64_t col_blocks = (C + kColumnsPerBlock - 1) / kColumnsPerBlock;
  int64_t chunks = (1024 + col_blocks - 1) / col_blocks;
  const int64_t by_rows = (rows + 31) / 32;
  if (chunks > by_rows) chunks = by_rows;
  return int(chunks < 1 ? 1 : chunks);
}

const char* launch_layer_norm_forward(const LayerNormForward& args, void* stream) {
  return dispatch<Forward>(args, stream);
}

const char* launch_layer_norm_backward(const LayerNormBackward& args, void* stream) {
  return dispatch<Backward>(args, stream);
}

}  // namespace scratchformer
