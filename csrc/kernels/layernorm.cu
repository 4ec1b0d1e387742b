// layer_norm: y = (h - mean) * rstd * weight + bias over each row of C values, where h = x, or
// h = x + residual (written out too: pre-norm blocks need both), and its backward. Without a
// bias, RMSNorm on the same code (the RMS template flag): y = h * rstd * weight, the mean taken as
// 0 (rstd = 1 / sqrt(mean(h^2) + eps)), and no mean(g) term nor dbias in the backward.
//
// Forward: one thread block per row. The block has 32..1024 threads, about one 16-byte
// vector (VEC = 8 values of fp16/bf16, 4 of fp32) per thread; a thread takes every blockDim-th
// vector of the row. Three passes over the row: the sum (mean), the sum of squared deviations
// from that mean (variance without cancellation), then normalize and write. Passes two and
// three re-read the row, which is at most tens of KB and still in L1/L2, so DRAM sees it once.
// Statistics and arithmetic are fp32 whatever the storage type. Rows that are not 16-byte
// aligned, or C not a multiple of VEC, take the same code with element-wise accesses.
//
// Backward: dx, and dweight/dbias without atomics, so the result is bitwise identical run to
// run. A block of 512 threads owns a chunk of consecutive rows: BX threads span a row (V
// vectors each) and 512 / BX rows are worked on at once. Each thread keeps its columns' sums
// of dy * xhat and dy in registers over the chunk's rows, while it computes dx from the same
// loads, so DRAM sees x and dy once and dx once (3n bytes). The block then adds its row
// lanes' sums in a fixed order into a [chunks, C] fp32 buffer, and a second kernel adds the
// chunks in order, one thread per column. chunks: two blocks per SM, fixed for a device.
//
// Rows wider than kMaxBackwardC (d_model 12288, 16384...) have too many columns for registers:
// there dx comes from one block per row, two passes over the row (its sums, then dx; the second
// from L1/L2), and dweight/dbias from a second kernel that re-reads x and dy column-wise, each
// thread one column over a chunk of rows, into the same [chunks, C] buffer and final sum.
// Deterministic as well; 5n bytes instead of 3n, on a path no model of ours takes.
//
// g = dy * weight is rounded to fp32 once and that same value used twice: were the compiler to
// contract g - mean(g) into one fma, a row of one channel (where g - mean(g) is exactly 0) would
// get dx = rstd * (rounding error of g), with rstd up to 1/sqrt(eps).
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace scratchformer {
namespace {

constexpr int kBackwardThreads = 512;
constexpr int kMaxBackwardC = 8192;  // the widest row whose column sums fit in a thread's registers (no spills)
constexpr int kWideThreads = 512;    // wide rows: dx block size, and columns per dweight/dbias block

template <typename T>
__host__ __device__ constexpr int vec_of() {
  return 16 / sizeof(T);
}

template <typename T, typename W, bool ALIGNED, bool RESIDUAL, bool RMS>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                                      int64_t r_stride, const W* __restrict__ weight, const W* __restrict__ bias,
                                      T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean_out,
                                      float* __restrict__ rstd_out, int C, float eps) {
  constexpr int VEC = vec_of<T>();
  __shared__ float scratch[1][32];
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
  } else if constexpr (!RMS) {
    for (int i = threadIdx.x * VEC; i < C; i += step) {
      float a[VEC];
      load_floats<ALIGNED>(src, i, C, a);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += a[k];  // zeros past C
    }
  }
  const float mean = RMS ? 0.f : block_sum(sum, scratch) / C;

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
    float a[VEC], w[VEC], b[VEC] = {};
    load_floats<ALIGNED>(src, i, C, a);
    load_floats<ALIGNED>(weight, i, C, w);
    if constexpr (!RMS) load_floats<ALIGNED>(bias, i, C, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = RMS ? a[k] * rstd * w[k] : (a[k] - mean) * rstd * w[k] + b[k];
    store_floats<ALIGNED>(out, i, C, a);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx of the VEC columns at i of one row, from the row's mean(g) and mean(g * xhat); plus grad_h's.
template <bool ALIGNED, bool GRAD_H, typename T, typename W>
__device__ __forceinline__ void store_dx(const T* x_row, const T* dy_row, const W* weight, const T* grad_h_row, T* dx_row,
                                         int i, int C, float mean, float rstd, float mean_g, float mean_gx) {
  constexpr int VEC = vec_of<T>();
  float a[VEC], d[VEC], w[VEC], out[VEC];
  load_floats<ALIGNED>(x_row, i, C, a);
  load_floats<ALIGNED>(dy_row, i, C, d);
  load_floats<ALIGNED>(weight, i, C, w);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float g = __fmul_rn(d[k], w[k]);  // the g of the row's sums, bit for bit
    out[k] = rstd * (g - mean_g - (a[k] - mean) * rstd * mean_gx);
  }
  if constexpr (GRAD_H) {
    float e[VEC];
    load_floats<ALIGNED>(grad_h_row, i, C, e);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] += e[k];
  }
  store_floats<ALIGNED>(dx_row, i, C, out);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, xhat = (x - mean) * rstd;
// plus grad_h, the gradient that reached h directly (the residual variant's second output).
// Also this chunk's sums of dy * xhat and dy for every column (see the top of this file).
// A thread's columns: vectors at (threadIdx.x + j * BX) * VEC, j < V (at most MAXV).
template <typename T, typename W, bool ALIGNED, bool GRAD_H, bool RMS, int MAXV>
__global__ void __launch_bounds__(kBackwardThreads, 1) layer_norm_bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, int64_t x_stride, const W* __restrict__ weight,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, const T* __restrict__ grad_h,
    T* __restrict__ dx, float* __restrict__ partial_w, float* __restrict__ partial_b, int64_t rows, int C,
    int64_t rows_per_chunk) {
  constexpr int VEC = vec_of<T>();
  __shared__ float scratch[kBackwardThreads / 32][32];
  __shared__ float lane_w[kBackwardThreads / 32][32 * VEC], lane_b[kBackwardThreads / 32][32 * VEC];
  const int bx = blockDim.x;
  const int64_t first = blockIdx.x * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  float acc_w[MAXV][VEC] = {}, acc_b[MAXV][VEC] = {};

  // Every row lane takes the same number of turns (some past `last`): block_sum has barriers.
  for (int64_t r0 = first; r0 < last; r0 += blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool live = row < last;
    const int64_t at = live ? row : first;  // a row that exists, for the lanes past the end
    const T* x_row = x + at * x_stride;
    const T* dy_row = dy + at * int64_t(C);
    const float mean = RMS ? 0.f : mean_in[at], rstd = rstd_in[at];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
      const int i = (threadIdx.x + j * bx) * VEC;
      if (i >= C) break;
      float a[VEC], d[VEC], w[VEC];
      load_floats<ALIGNED>(x_row, i, C, a);
      load_floats<ALIGNED>(dy_row, i, C, d);
      load_floats<ALIGNED>(weight, i, C, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (a[k] - mean) * rstd, g = __fmul_rn(d[k], w[k]);  // past C: d is zero, nothing is added
        sum_g += g;
        sum_gx += g * xhat;
        if (live) {
          acc_w[j][k] += d[k] * xhat;
          acc_b[j][k] += d[k];
        }
      }
    }
    const float mean_g = RMS ? 0.f : block_sum(sum_g, scratch) / C;  // RMSNorm's output has no mean taken out
    const float mean_gx = block_sum(sum_gx, scratch) / C;
    if (!live) continue;
    T* dx_row = dx + row * int64_t(C);
    // The second pass re-reads the thread's own vectors: L1 or L2 hits, not DRAM.
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
      const int i = (threadIdx.x + j * bx) * VEC;
      if (i >= C) break;
      store_dx<ALIGNED, GRAD_H>(x_row, dy_row, weight, GRAD_H ? grad_h + row * int64_t(C) : nullptr, dx_row, i, C, mean, rstd, mean_g, mean_gx);
    }
  }

  // The chunk's column sums: row lanes added in order, 32 columns' vectors at a time.
#pragma unroll
  for (int j = 0; j < MAXV; ++j) {
    for (int base = j * bx; base < (j + 1) * bx && base * VEC < C; base += 32) {
      // Threads base..base+31 of each row lane hold vectors base..base+31 of slab j.
      const bool mine = int(threadIdx.x) + j * bx >= base && int(threadIdx.x) + j * bx < base + 32;
      __syncthreads();  // the previous round's readers are done
      if (mine) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          lane_w[threadIdx.y][(threadIdx.x + j * bx - base) * VEC + k] = acc_w[j][k];
          lane_b[threadIdx.y][(threadIdx.x + j * bx - base) * VEC + k] = acc_b[j][k];
        }
      }
      __syncthreads();
      for (int e = threadIdx.y * bx + threadIdx.x; e < 32 * VEC; e += bx * blockDim.y) {
        const int col = base * VEC + e;
        if (col >= C) continue;
        float w = 0.f, b = 0.f;
        for (int y = 0; y < int(blockDim.y); ++y) {
          w += lane_w[y][e];
          b += lane_b[y][e];
        }
        partial_w[blockIdx.x * int64_t(C) + col] = w;
        partial_b[blockIdx.x * int64_t(C) + col] = b;
      }
    }
  }
}

// Wide rows, dx: one block per row (see the top of this file).
template <typename T, typename W, bool ALIGNED, bool GRAD_H, bool RMS>
__global__ void __launch_bounds__(kWideThreads, 1) layer_norm_bwd_wide_dx_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, int64_t x_stride, const W* __restrict__ weight,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, const T* __restrict__ grad_h,
    T* __restrict__ dx, int C) {
  constexpr int VEC = vec_of<T>();
  __shared__ float scratch[1][32];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_stride;
  const T* dy_row = dy + row * int64_t(C);
  const float mean = RMS ? 0.f : mean_in[row], rstd = rstd_in[row];
  const int step = blockDim.x * VEC;
  float sum_g = 0.f, sum_gx = 0.f;
  for (int i = threadIdx.x * VEC; i < C; i += step) {
    float a[VEC], d[VEC], w[VEC];
    load_floats<ALIGNED>(x_row, i, C, a);
    load_floats<ALIGNED>(dy_row, i, C, d);
    load_floats<ALIGNED>(weight, i, C, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = __fmul_rn(d[k], w[k]);  // past C: d is zero
      sum_g += g;
      sum_gx += g * (a[k] - mean) * rstd;
    }
  }
  const float mean_g = RMS ? 0.f : block_sum(sum_g, scratch) / C;
  const float mean_gx = block_sum(sum_gx, scratch) / C;
  T* dx_row = dx + row * int64_t(C);
  for (int i = threadIdx.x * VEC; i < C; i += step)
    store_dx<ALIGNED, GRAD_H>(x_row, dy_row, weight, GRAD_H ? grad_h + row * int64_t(C) : nullptr, dx_row, i, C, mean, rstd, mean_g, mean_gx);
}

// Wide rows, dweight/dbias: thread (blockIdx.x, threadIdx.x) owns one column, blockIdx.y one
// chunk of rows; a warp reads 32 consecutive values of a row, so each row is read coalesced.
template <typename T, bool RMS>
__global__ void __launch_bounds__(kWideThreads) layer_norm_bwd_wide_dwdb_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, int64_t x_stride, const float* __restrict__ mean_in,
    const float* __restrict__ rstd_in, float* __restrict__ partial_w, float* __restrict__ partial_b, int64_t rows,
    int C, int64_t rows_per_chunk) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= C) return;
  const int64_t first = blockIdx.y * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  float w = 0.f, b = 0.f;
  for (int64_t row = first; row < last; ++row) {
    const float d = to_float(dy[row * int64_t(C) + col]);
    w += d * ((to_float(x[row * x_stride + col]) - (RMS ? 0.f : mean_in[row])) * rstd_in[row]);
    b += d;
  }
  partial_w[blockIdx.y * int64_t(C) + col] = w;
  partial_b[blockIdx.y * int64_t(C) + col] = b;
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
  if (db) db[col] = from_float<W>(b);  // RMSNorm has no bias
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
  auto launch = [&](auto aligned_, auto residual_, auto rms_) {
    constexpr bool A = decltype(aligned_)::value, R = decltype(residual_)::value, N = decltype(rms_)::value;
    layer_norm_fwd_kernel<T, W, A, R, N><<<grid, block, 0, stream>>>(x, a.x_stride, r, a.r_stride, w, b, y, h, a.mean,
                                                                      a.rstd, a.C, a.eps);
  };
  auto with_rms = [&](auto aligned_, auto residual_) {
    if (a.bias) launch(aligned_, residual_, std::false_type{}); else launch(aligned_, residual_, std::true_type{});
  };
  auto with_residual = [&](auto aligned_) {
    if (a.residual) with_rms(aligned_, std::true_type{}); else with_rms(aligned_, std::false_type{});
  };
  if (vec_ok) with_residual(std::true_type{}); else with_residual(std::false_type{});
  return last_error();
}

// Threads across a row in the backward: a power of two from 32 to 512, about one vector each
// up to 512; beyond, V vectors each (MAXV the next of 1, 2 (4 for float32) at or above V).
int backward_row_threads(int C, int vec) { return row_threads(C, vec) < kBackwardThreads ? row_threads(C, vec) : kBackwardThreads; }

bool wide(int64_t C) { return C > kMaxBackwardC; }

template <typename T, typename W>
void backward_wide(const LayerNormBackward& a, bool vec_ok, int chunks, float* partial_w, float* partial_b,
                   cudaStream_t stream) {
  auto dy = static_cast<const T*>(a.dy);
  auto x = static_cast<const T*>(a.x);
  auto w = static_cast<const W*>(a.weight);
  auto gh = static_cast<const T*>(a.grad_h);
  auto dx = static_cast<T*>(a.dx);
  auto launch = [&](auto aligned_, auto grad_h_, auto rms_) {
    constexpr bool A = decltype(aligned_)::value, G = decltype(grad_h_)::value, N = decltype(rms_)::value;
    layer_norm_bwd_wide_dx_kernel<T, W, A, G, N><<<unsigned(a.rows), kWideThreads, 0, stream>>>(
        dy, x, a.x_stride, w, a.mean, a.rstd, gh, dx, a.C);
    const int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
    const dim3 grid((a.C + kWideThreads - 1) / kWideThreads, chunks);
    layer_norm_bwd_wide_dwdb_kernel<T, N><<<grid, kWideThreads, 0, stream>>>(
        dy, x, a.x_stride, a.mean, a.rstd, partial_w, partial_b, a.rows, a.C, rows_per_chunk);
  };
  auto with_rms = [&](auto aligned_, auto grad_h_) {
    if (a.dbias) launch(aligned_, grad_h_, std::false_type{}); else launch(aligned_, grad_h_, std::true_type{});
  };
  auto with_grad_h = [&](auto aligned_) {
    if (a.grad_h) with_rms(aligned_, std::true_type{}); else with_rms(aligned_, std::false_type{});
  };
  if (vec_ok) with_grad_h(std::true_type{}); else with_grad_h(std::false_type{});
}

template <typename T, typename W>
void backward_narrow(const LayerNormBackward& a, bool vec_ok, int chunks, float* partial_w, float* partial_b,
                     cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  const int bx = backward_row_threads(a.C, VEC), v = (a.C + bx * VEC - 1) / (bx * VEC);
  const int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
  const dim3 block(bx, kBackwardThreads / bx);
  auto dy = static_cast<const T*>(a.dy);
  auto x = static_cast<const T*>(a.x);
  auto w = static_cast<const W*>(a.weight);
  auto gh = static_cast<const T*>(a.grad_h);
  auto dx = static_cast<T*>(a.dx);
  auto launch = [&](auto aligned_, auto grad_h_, auto rms_, auto maxv) {
    constexpr bool A = decltype(aligned_)::value, G = decltype(grad_h_)::value, N = decltype(rms_)::value;
    constexpr int M = decltype(maxv)::value;
    layer_norm_bwd_kernel<T, W, A, G, N, M><<<chunks, block, 0, stream>>>(dy, x, a.x_stride, w, a.mean, a.rstd, gh, dx,
                                                                           partial_w, partial_b, a.rows, a.C, rows_per_chunk);
  };
  auto with_maxv = [&](auto aligned_, auto grad_h_, auto rms_) {
    if (v <= 1) launch(aligned_, grad_h_, rms_, std::integral_constant<int, 1>{});
    else if (v <= 2 || VEC != 4) launch(aligned_, grad_h_, rms_, std::integral_constant<int, 2>{});
    else if constexpr (VEC == 4) launch(aligned_, grad_h_, rms_, std::integral_constant<int, 4>{});  // float32 only
  };
  auto with_rms = [&](auto aligned_, auto grad_h_) {
    if (a.dbias) with_maxv(aligned_, grad_h_, std::false_type{}); else with_maxv(aligned_, grad_h_, std::true_type{});
  };
  auto with_grad_h = [&](auto aligned_) {
    if (a.grad_h) with_rms(aligned_, std::true_type{}); else with_rms(aligned_, std::false_type{});
  };
  if (vec_ok) with_grad_h(std::true_type{}); else with_grad_h(std::false_type{});
}

template <typename T, typename W>
const char* backward(const LayerNormBackward& a, cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  const bool vec_ok = a.C % VEC == 0 && a.x_stride % VEC == 0 && aligned(a.dy) && aligned(a.x) &&
                      aligned(a.weight, sizeof(W) * VEC) && aligned(a.dx) && (a.grad_h == nullptr || aligned(a.grad_h));
  const int chunks = layer_norm_backward_chunks(a.rows, a.C);
  float* partial_w = a.partial;
  float* partial_b = a.partial + int64_t(chunks) * a.C;
  if (wide(a.C)) {
    backward_wide<T, W>(a, vec_ok, chunks, partial_w, partial_b, stream);
  } else {
    backward_narrow<T, W>(a, vec_ok, chunks, partial_w, partial_b, stream);
  }
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
  // About two blocks per SM, each over a run of rows (narrow rows: at least one row lane's worth;
  // wide rows: the dweight/dbias kernel's column blocks times its row chunks); fixed for a
  // device, so the order of the sums, and the result, is too.
  int sm_count = 0;
  if (!device_attribute(cudaDevAttrMultiProcessorCount, &sm_count)) sm_count = 1;
  int64_t chunks;
  if (wide(C)) {
    const int64_t column_blocks = (C + kWideThreads - 1) / kWideThreads;
    chunks = (2LL * sm_count + column_blocks - 1) / column_blocks;
    chunks = chunks < rows ? chunks : rows;
  } else {
    const int lanes = kBackwardThreads / backward_row_threads(int(C), 8);
    const int64_t by_rows = (rows + lanes - 1) / lanes;
    chunks = 2LL * sm_count < by_rows ? 2LL * sm_count : by_rows;
  }
  return int(chunks < 1 ? 1 : chunks);
}

const char* launch_layer_norm_forward(const LayerNormForward& args, void* stream) {
  return dispatch<Forward>(args, stream);
}

const char* launch_layer_norm_backward(const LayerNormBackward& args, void* stream) {
  return dispatch<Backward>(args, stream);
}

}  // namespace scratchformer
