// Attention on CUDA cores: the fp32 path (forward and backward), the split-key decoding forward
// for every dtype (flash-decoding), and the small kernels both paths share.
//
// Tiling. A block of 4 warps takes 4 "rows" and walks 32-key tiles that its 128 threads stage in
// shared memory as fp32. In the forward and dq kernels a row is a query; the rows of a block are
// consecutive in (query head within the kv group, query position), so at decoding time (Tq = 1)
// the query heads that share a kv head also share each K/V tile read. Inside a warp, lane j
// scores key j of the tile (a dot product over D read from shared memory) and lane l owns
// output dimensions l, l + 32, ...; the softmax runs online in the log2 domain (running max and
// sum per row, rescaled as tiles arrive), so no Tq x Tk matrix ever exists.
//
// Split keys (forward with Tq <= 16): blockIdx.z takes one range of keys; each range writes its
// normalised output and log-sum-exp in fp32, and `combine` weighs the ranges by exp(lse) — the
// same merge the online softmax does tile by tile. One token at batch 1 then still fills the GPU.
//
// dk, dv: a warp per key, lanes over 32-query tiles of every query head in the kv group, so the
// group's sum happens in registers (no atomics; the result is deterministic).
//
// A pattern (first_key, kernels.h): a block reads keys from its rows' least first key on (a
// dk/dv block, queries up to the last that sees one of its keys); each row masks the keys before
// its own first key.
#include <cuda_runtime.h>

#include "attention.cuh"
#include "attention_launch.cuh"

namespace scratchformer {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 32;

// Stage rows [t0, t0 + kTile) of head h (zeros past t_end) as fp32, D + 1 floats apart: lanes
// reading one column of different rows then hit different banks. Global reads are 16 bytes wide
// (the glue passes 16-byte aligned rows).
template <typename T, int D>
__device__ void stage_rows(float (*tile)[D + 1], const void* base, const Strides& s, int b, int h, int t0,
                           int t_end) {
  constexpr int VEC = 16 / sizeof(T), CHUNKS = D / VEC;
  for (int i = threadIdx.x; i < kTile * CHUNKS; i += kThreads) {
    const int r = i / CHUNKS, d = i % CHUNKS * VEC;
    float x[VEC] = {};
    if (t0 + r < t_end) load_floats<true, VEC>(row_ptr<T>(base, s, b, h, t0 + r), d, D, x);
#pragma unroll
    for (int k = 0; k < VEC; ++k) tile[r][d + k] = x[k];
  }
}

// The (query head, query position) of row r of a kv head's rows; the largest position among
// rows [r0, r0 + kWarps) is what bounds the keys a block must read.
struct QueryRows {
  int group, t_q;
  __device__ int head(int kv_head, int r) const { return kv_head * group + r / t_q; }
  __device__ int position(int r) const { return r % t_q; }
  __device__ int last_position(int r0) const {
    const int r1 = min(group * t_q, r0 + kWarps) - 1;
    return r1 / t_q != r0 / t_q ? t_q - 1 : r1 % t_q;
  }
  __device__ int first_position(int r0) const {  // the least, which bounds the first key a block reads
    const int r1 = min(group * t_q, r0 + kWarps) - 1;
    return r1 / t_q != r0 / t_q ? 0 : r0 % t_q;
  }
};

// The row of this warp: batch, kv head, query head, position, the block's first row, and whether
// the row exists (the last block of a kv head may have fewer rows than warps).
struct WarpRow {
  int b, kv_head, h, t, r0;
  bool active;
};

__device__ WarpRow warp_row(const AttentionShape& s, const QueryRows& rows) {
  const int b = blockIdx.y / s.kv_heads, kv_head = blockIdx.y % s.kv_heads;
  const int r0 = blockIdx.x * kWarps, r = r0 + threadIdx.x / 32;
  const bool active = r < rows.group * s.t_q;
  return {b, kv_head, rows.head(kv_head, active ? r : r0), rows.position(active ? r : r0), r0, active};
}

// The forward's K/V staging: rows of T, 16 bytes of padding each, so that the 16-byte reads of
// 8 lanes from 8 consecutive rows (one quarter-warp) fall in 8 different bank groups.
template <typename T, int D>
__host__ __device__ constexpr int staged_stride() {
  return D + 16 / int(sizeof(T));
}

template <typename T, int D>
__host__ __device__ constexpr int forward_simt_shared_bytes() {  // two buffers of a K and a V tile
  return 2 * 2 * kTile * staged_stride<T, D>() * int(sizeof(T));
}

// Forward on CUDA cores: every dtype at decoding time (Tq <= 16), and float32 throughout. The
// block's rows (up to 4, see QueryRows) share each 32-key tile of K and V, staged in their own
// dtype by cp.async into two buffers (the next tile loads while this one is used). Every warp
// computes: with n rows, each row gets 4 / n warps (n rounded up to a power of two), which take
// 32 n / 4 keys of each tile each; within a warp, lanes split a key's dot product into 4 / n parts
// (added by shuffles), the lanes of a quarter-warp always on 8 different keys (distinct banks). Each warp keeps its own online softmax (running max, sum and output in
// the log2 domain); at the end the warps of a row merge theirs through shared memory. In P V
// lane l owns output dims l D / 32 .. (l + 1) D / 32 - 1: one contiguous read of a V row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(AttentionForward a, int chunk) {
  constexpr int STRIDE = staged_stride<T, D>(), ELEMS = 16 / int(sizeof(T)), CHUNKS = D / ELEMS, P = D / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  T* kv_s = reinterpret_cast<T*>(smem);  // [buffer][K, V][kTile][STRIDE]
  __shared__ __align__(32) float q_s[kWarps][D];
  __shared__ float merge_m[kWarps], merge_l[kWarps], merge_o[kWarps][D];
  const AttentionShape& s = a.shape;
  const QueryRows rows{s.heads / s.kv_heads, s.t_q};
  const int b = blockIdx.y / s.kv_heads, kv_head = blockIdx.y % s.kv_heads;
  const int r0 = blockIdx.x * kWarps, n_rows = min(kWarps, rows.group * s.t_q - r0);
  const int per_row = n_rows == 1 ? 4 : n_rows == 2 ? 2 : 1;  // warps per row; also lanes per key
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int my_row = warp / per_row, slot = warp % per_row;
  const bool active = my_row < n_rows;
  const int r = r0 + (active ? my_row : 0);
  const int h = rows.head(kv_head, r), t = rows.position(r);
  // Lane l scores key l % (32 / per_row) of its warp's share, part l / (32 / per_row) of the dot
  // product: the 8 lanes of a quarter-warp read 8 different rows (distinct banks).
  const int keys_per_warp = kTile / per_row, key_lane = slot * keys_per_warp + lane % keys_per_warp;
  const int part = lane / keys_per_warp;
  const int offset = s.t_k - s.t_q;
  const int range_begin = blockIdx.z * chunk;
  const int key_end = min(min(s.t_k, range_begin + chunk), rows.last_position(r0) + offset + 1);
  const int key_begin = max(range_begin, first_key_of(a.first_key, s, b, rows.first_position(r0)));
  const int last_key = min(key_end - 1, t + offset);  // the last key this row sees in this range
  const int first = first_key_of(a.first_key, s, b, t);  // and its first key

  // Scores in log2 units: exp(x) = exp2(x * log2(e)), folded into q once.
  const float scale2 = a.scale * kLog2e;
  const T* q_row = row_ptr<T>(a.q, a.q_stride, b, h, t);
  if (slot == 0)
    for (int d = lane; d < D; d += 32) q_s[my_row % kWarps][d] = active ? to_float(q_row[d]) * scale2 : 0.f;
  const float* q = q_s[my_row % kWarps];

  const T* k_head = row_ptr<T>(a.k, a.k_stride, b, kv_head, 0);
  const T* v_head = row_ptr<T>(a.v, a.v_stride, b, kv_head, 0);
  auto stage = [&](int buf, int k0) {  // keys [k0, k0 + kTile) into buffer buf, zeros past key_end
    T* k_tile = kv_s + buf * 2 * kTile * STRIDE;
    load_rows_async<T, kTile, D, STRIDE, kThreads>(k_tile, k_head, a.k_stride.time, k0, key_end);
    load_rows_async<T, kTile, D, STRIDE, kThreads>(k_tile + kTile * STRIDE, v_head, a.v_stride.time, k0, key_end);
  };

  float m = -INFINITY, l = 0.f, o[P] = {};
  if (key_begin < key_end) stage(0, key_begin);
  cp_async_commit();
  for (int k0 = key_begin, it = 0; k0 < key_end; k0 += kTile, ++it) {
    __syncthreads();  // every warp is done with the other buffer (and q_s is written, the first time)
    if (k0 + kTile < key_end) stage((it + 1) % 2, k0 + kTile);
    cp_async_commit();   // (an empty group after the last tile)
    cp_async_wait<1>();  // this tile has landed
    __syncthreads();
    if (!active || k0 > last_key || k0 + kTile <= first) continue;  // warp-uniform
    const T* k_tile = kv_s + it % 2 * 2 * kTile * STRIDE;
    const T* v_tile = k_tile + kTile * STRIDE;

    // This lane's part of its key's dot product: chunks part, part + per_row, ... of the row.
    float score = 0.f;
    for (int c = part; c < CHUNKS; c += per_row) {
      float kx[ELEMS], qx[ELEMS];
      load_floats<true, ELEMS>(k_tile + key_lane * STRIDE, c * ELEMS, D, kx);
      load_floats<true, ELEMS>(q, c * ELEMS, D, qx);
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) score += qx[e] * kx[e];
    }
    for (int step = keys_per_warp; step < 32; step <<= 1) score += __shfl_xor_sync(0xffffffffu, score, step);
    if (a.softcap > 0.f) score = Softcap::in_units(a.softcap, kLn2).apply(score);  // scores are in log2 units
    if (k0 + key_lane > last_key || k0 + key_lane < first) score = -INFINITY;
    const float m_new = fmaxf(m, warp_max(score));  // -inf while this warp has seen no visible key
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m - m_use), p = exp2f(score - m_use);
    l = l * alpha + warp_sum(part == 0 ? p : 0.f);
#pragma unroll
    for (int i = 0; i < P; ++i) o[i] *= alpha;
    const int keys = min(keys_per_warp, last_key - k0 - slot * keys_per_warp + 1);
    for (int j = 0; j < keys; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const T* v_row = v_tile + (slot * keys_per_warp + j) * STRIDE + lane * P;
#pragma unroll
      for (int i = 0; i < P; ++i) o[i] += pj * to_float(v_row[i]);
    }
    m = m_new;
  }

  // Merge the warps of each row: weights 2^(m_w - max m).
  if (per_row > 1) {
    if (lane == 0) merge_m[warp] = m, merge_l[warp] = l;
#pragma unroll
    for (int i = 0; i < P; ++i) merge_o[warp][lane * P + i] = o[i];
    __syncthreads();
    if (slot != 0) return;
    m = -INFINITY;
    for (int w = warp; w < warp + per_row; ++w) m = fmaxf(m, merge_m[w]);
    const float m_use = m == -INFINITY ? 0.f : m;
    l = 0.f;
#pragma unroll
    for (int i = 0; i < P; ++i) o[i] = 0.f;
    for (int w = warp; w < warp + per_row; ++w) {
      const float weight = exp2f(merge_m[w] - m_use);
      l += weight * merge_l[w];
#pragma unroll
      for (int i = 0; i < P; ++i) o[i] += weight * merge_o[w][lane * P + i];
    }
  }
  if (!active) return;

  const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + t;
  float corr = 1.f;
  if (a.sinks != nullptr && gridDim.z == 1) {  // the sink joins the sum (split ranges: in combine_kernel)
    const float sink = a.sinks[h] * kLog2e, both = fmaxf(m, sink);
    corr = exp2f(m - both);
    l = l * corr + exp2f(sink - both);
    m = both;
  }
  const float inv = l > 0.f ? corr / l : 0.f;  // l == 0: this key range holds no visible key
  const float lse = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  if (gridDim.z == 1) {
    T* out = static_cast<T*>(a.out) + row * D + lane * P;
#pragma unroll
    for (int i = 0; i < P; ++i) out[i] = from_float<T>(o[i] * inv);
    if (lane == 0) a.lse[row] = lse;
  } else {
    const int64_t rows_total = int64_t(s.batch) * s.heads * s.t_q;
    float* out = a.partial_out + (blockIdx.z * rows_total + row) * D + lane * P;
#pragma unroll
    for (int i = 0; i < P; ++i) out[i] = o[i] * inv;
    if (lane == 0) a.partial_lse[blockIdx.z * rows_total + row] = lse;
  }
}

// Merge the key ranges of each row: out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s); a
// sink adds exp(sink) to the denominator.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(AttentionForward a) {
  constexpr int PER_LANE = D / 32;
  const int64_t rows_total = int64_t(a.shape.batch) * a.shape.heads * a.shape.t_q;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows_total) return;
  float m = -INFINITY;
  for (int s = lane; s < a.splits; s += 32) m = fmaxf(m, a.partial_lse[s * rows_total + row]);
  m = warp_max(m);  // finite: some range holds the query's own position, which it sees
  const float sink = a.sinks != nullptr ? a.sinks[row / a.shape.t_q % a.shape.heads] : -INFINITY;
  m = fmaxf(m, sink);
  float sum = expf(sink - m), o[PER_LANE] = {};
  for (int s = 0; s < a.splits; ++s) {
    const float w = expf(a.partial_lse[s * rows_total + row] - m);
    const float* part = a.partial_out + (s * rows_total + row) * D;
    sum += w;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) o[i] += w * part[lane + 32 * i];
  }
  T* out = static_cast<T*>(a.out) + row * D;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) out[lane + 32 * i] = from_float<T>(o[i] / sum);
  if (lane == 0) a.lse[row] = m + logf(sum);
}

// delta = rowsum(dout * out) - dlse, the softmax backward's correction term; a warp per row.
// (A gradient g reaching lse_i = log sum_j exp(s_ij) adds g p_ij to ds_ij = p_ij (dp_ij - delta_i):
// the same as lowering delta_i by g.)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) delta_kernel(AttentionBackward a) {
  const AttentionShape& s = a.shape;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(s.batch) * s.heads * s.t_q) return;
  const int t = int(row % s.t_q), h = int(row / s.t_q % s.heads), b = int(row / s.t_q / s.heads);
  const T* dout = row_ptr<T>(a.dout, a.dout_stride, b, h, t);
  const T* out = static_cast<const T*>(a.out) + row * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_float(dout[d]) * to_float(out[d]);
  acc = warp_sum(acc);
  if (lane == 0) a.delta[row] = acc - (a.dlse != nullptr ? a.dlse[row] : 0.f);
}

// dq = scale * sum_j ds_ij k_j with ds_ij = p_ij (dout_i . v_j - delta_i); rows as in the forward.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(AttentionBackward a) {
  constexpr int PER_LANE = D / 32;
  __shared__ float k_s[kTile][D + 1];
  __shared__ float v_s[kTile][D + 1];
  __shared__ float q_s[kWarps][D];
  __shared__ float do_s[kWarps][D];
  const AttentionShape& s = a.shape;
  const QueryRows rows{s.heads / s.kv_heads, s.t_q};
  const auto [b, kv_head, h, t, r0, active] = warp_row(s, rows);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int offset = s.t_k - s.t_q;
  const int key_end = min(s.t_k, rows.last_position(r0) + offset + 1);
  const int last_key = t + offset, first = first_key_of(a.first_key, s, b, t);

  const float scale2 = a.scale * kLog2e;
  const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + t;
  const float lse2 = active ? a.lse[row] * kLog2e : 0.f;
  const float delta = active ? a.delta[row] : 0.f;
  const T* q_row = row_ptr<T>(a.q, a.q_stride, b, h, t);
  const T* do_row = row_ptr<T>(a.dout, a.dout_stride, b, h, t);
  for (int d = lane; d < D; d += 32) {
    q_s[warp][d] = active ? to_float(q_row[d]) * scale2 : 0.f;
    do_s[warp][d] = active ? to_float(do_row[d]) : 0.f;
  }

  float dq[PER_LANE] = {};
  for (int k0 = first_key_of(a.first_key, s, b, rows.first_position(r0)); k0 < key_end; k0 += kTile) {
    __syncthreads();
    stage_rows<T, D>(k_s, a.k, a.k_stride, b, kv_head, k0, key_end);
    stage_rows<T, D>(v_s, a.v, a.v_stride, b, kv_head, k0, key_end);
    __syncthreads();
    if (!active || k0 > last_key || k0 + kTile <= first) continue;
    float ds = 0.f;
    if (k0 + lane <= last_key && k0 + lane >= first) {
      float score = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        score += q_s[warp][d] * k_s[lane][d];
        dp += do_s[warp][d] * v_s[lane][d];
      }
      const float slope = cap_score(score, a.softcap, kLn2);  // scores in log2 units
      ds = exp2f(score - lse2) * (dp - delta) * slope;
    }
    const int keys = min(kTile, last_key - k0 + 1);
    for (int j = 0; j < keys; ++j) {
      const float dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) dq[i] += dsj * k_s[j][lane + 32 * i];
    }
  }
  if (!active) return;
  T* out = static_cast<T*>(a.dq) + row * D;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) out[lane + 32 * i] = from_float<T>(dq[i] * a.scale);
}

// dv_j = sum_i p_ij dout_i and dk_j = scale * sum_i ds_ij q_i over every query head i of the
// kv group; a warp per key, lane i per query of a 32-query tile.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dkv_kernel(AttentionBackward a) {
  constexpr int PER_LANE = D / 32;
  __shared__ float q_s[kTile][D + 1];
  __shared__ float do_s[kTile][D + 1];
  __shared__ float lse_s[kTile], delta_s[kTile];
  __shared__ float k_s[kWarps][D];
  __shared__ float v_s[kWarps][D];
  const AttentionShape& s = a.shape;
  const int group = s.heads / s.kv_heads;
  const int b = blockIdx.y / s.kv_heads, kv_head = blockIdx.y % s.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = blockIdx.x * kWarps, j = j0 + warp;
  const bool active = j < s.t_k;
  const int offset = s.t_k - s.t_q;
  const float scale2 = a.scale * kLog2e;
  const T* k_row = row_ptr<T>(a.k, a.k_stride, b, kv_head, active ? j : j0);
  const T* v_row = row_ptr<T>(a.v, a.v_stride, b, kv_head, active ? j : j0);
  for (int d = lane; d < D; d += 32) {
    k_s[warp][d] = active ? to_float(k_row[d]) * scale2 : 0.f;
    v_s[warp][d] = active ? to_float(v_row[d]) : 0.f;
  }

  float dk[PER_LANE] = {}, dv[PER_LANE] = {};
  const int first_query = max(0, j0 - offset);  // the first query that sees key j0
  // and the last that sees one of the block's keys, plus one
  const int q_end = first_query_past(a.first_key, s, b, first_query, min(j0 + kWarps, s.t_k) - 1);
  for (int g = 0; g < group; ++g) {
    const int h = kv_head * group + g;
    const float* lse = a.lse + (int64_t(b) * s.heads + h) * s.t_q;
    const float* delta = a.delta + (int64_t(b) * s.heads + h) * s.t_q;
    for (int i0 = first_query; i0 < q_end; i0 += kTile) {
      __syncthreads();
      stage_rows<T, D>(q_s, a.q, a.q_stride, b, h, i0, s.t_q);
      stage_rows<T, D>(do_s, a.dout, a.dout_stride, b, h, i0, s.t_q);
      if (threadIdx.x < kTile) {
        const bool in = i0 + threadIdx.x < s.t_q;
        lse_s[threadIdx.x] = in ? lse[i0 + threadIdx.x] * kLog2e : 0.f;
        delta_s[threadIdx.x] = in ? delta[i0 + threadIdx.x] : 0.f;
      }
      __syncthreads();
      const int last_query = min(s.t_q - 1, i0 + kTile - 1);
      // No query of the tile sees key j (first keys rise with the query):
      if (!active || last_query + offset < j || first_key_of(a.first_key, s, b, i0) > j) continue;
      const int query = i0 + lane;
      float p = 0.f, ds = 0.f;
      if (query < s.t_q && j <= query + offset && j >= first_key_of(a.first_key, s, b, query)) {
        float score = 0.f, dp = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
          score += q_s[lane][d] * k_s[warp][d];
          dp += do_s[lane][d] * v_s[warp][d];
        }
        const float slope = cap_score(score, a.softcap, kLn2);  // scores in log2 units
        p = exp2f(score - lse_s[lane]);
        ds = p * (dp - delta_s[lane]) * slope;
      }
      const int queries = last_query - i0 + 1;
      for (int x = 0; x < queries; ++x) {
        const float px = __shfl_sync(0xffffffffu, p, x), dsx = __shfl_sync(0xffffffffu, ds, x);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
          dv[i] += px * do_s[x][lane + 32 * i];
          dk[i] += dsx * q_s[x][lane + 32 * i];
        }
      }
    }
  }
  if (!active) return;
  const int64_t row = (int64_t(b) * s.kv_heads + kv_head) * s.t_k + j;
  T* dk_out = static_cast<T*>(a.dk) + row * D;
  T* dv_out = static_cast<T*>(a.dv) + row * D;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    dk_out[lane + 32 * i] = from_float<T>(dk[i] * a.scale);
    dv_out[lane + 32 * i] = from_float<T>(dv[i]);
  }
}

int row_blocks(const AttentionShape& s) {
  return (s.heads / s.kv_heads * s.t_q + kWarps - 1) / kWarps;
}

}  // namespace

template <typename T, int D>
void forward_simt(const AttentionForward& a, cudaStream_t stream) {
  const AttentionShape& s = a.shape;
  // Whole 32-key tiles per range; splits was chosen so that every range holds keys.
  const int chunk = ((s.t_k + a.splits - 1) / a.splits + kTile - 1) / kTile * kTile;
  const dim3 grid(row_blocks(s), s.batch * s.kv_heads, a.splits);
  constexpr int bytes = forward_simt_shared_bytes<T, D>();
  // Above 48 KB of dynamic shared memory a kernel must opt in (float32 at D = 128).
  if (cudaFuncSetAttribute(forward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    return;  // the launcher's cudaGetLastError reports it
  forward_kernel<T, D><<<grid, kThreads, bytes, stream>>>(a, chunk);
  if (a.splits > 1) {
    const int64_t rows = int64_t(s.batch) * s.heads * s.t_q;
    combine_kernel<T, D><<<unsigned((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(a);
  }
}

template <typename T, int D>
void backward_delta(const AttentionBackward& a, cudaStream_t stream) {
  const int64_t rows = int64_t(a.shape.batch) * a.shape.heads * a.shape.t_q;
  delta_kernel<T, D><<<unsigned((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(a);
}

template <typename T, int D>
void backward_simt(const AttentionBackward& a, cudaStream_t stream) {
  const AttentionShape& s = a.shape;
  dq_kernel<T, D><<<dim3(row_blocks(s), s.batch * s.kv_heads), kThreads, 0, stream>>>(a);
  dkv_kernel<T, D><<<dim3((s.t_k + kWarps - 1) / kWarps, s.batch * s.kv_heads), kThreads, 0, stream>>>(a);
}

int forward_simt_splits(const AttentionShape& s, int sm_count) {
  // About eight blocks per SM: each streams its keys one 32-key tile at a time, waiting for
  // each, so it takes several per SM to keep the memory system busy. Each range at least 128
  // keys, at most 128 ranges.
  const int64_t blocks = int64_t(row_blocks(s)) * s.batch * s.kv_heads;
  const int64_t wanted = (8 * int64_t(sm_count) + blocks - 1) / blocks;
  const int64_t most = (s.t_k + 127) / 128;
  int splits = int(std::min<int64_t>(std::min<int64_t>(wanted, most), 128));
  if (splits <= 1) return 1;
  // Every range must be non-empty after rounding its length up to whole tiles.
  const int chunk = ((s.t_k + splits - 1) / splits + kTile - 1) / kTile * kTile;
  return (s.t_k + chunk - 1) / chunk;
}

#define SCRATCHFORMER_SIMT(T, D)                                                  \
  template void forward_simt<T, D>(const AttentionForward&, cudaStream_t);        \
  template void backward_delta<T, D>(const AttentionBackward&, cudaStream_t);     \
  template void backward_simt<T, D>(const AttentionBackward&, cudaStream_t);
SCRATCHFORMER_FOR_EACH_ATTENTION_TYPE(SCRATCHFORMER_SIMT)

}  // namespace scratchformer
