// Causal attention backward on tensor cores (fp16, bf16), and the backward's dispatch.
//
// With P = softmax(scale * Q K^T) recomputed from the saved log-sum-exp (P = exp2(S' - lse'),
// S' and lse' in log2 units), dP = dO V^T and delta = rowsum(dO * O) - dlse (delta_kernel, in
// attention_simt.cu):
//   dS = P * (dP - delta),  dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K.
// Two kernels, neither with atomics, so results are deterministic:
// - dkv_kernel: a block of 4 warps owns 128 keys of one kv head (32 per warp) at D <= 64, 64
//   (16 per warp) above, keys as the rows of every product. It walks 64- (D = 32) or 32-query
//   tiles of each query head of the kv group, from the first query that sees its first key
//   (double-buffered: the next tile loads during this one), computing S^T = K Q^T and
//   dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q; the group's sum is in its accumulators.
//   With 32 keys a warp, each Q and dO fragment read from shared memory feeds four products.
//   At D = 96 and 128, where a block may have 128 / 156 KB of shared memory (A100, H100),
//   dkv_wide_kernel takes its place: 8 warps over 128 keys, P^T and dS^T through shared memory.
//   Only tiles on the causal diagonal (and a head's last, partial one) run the masking code.
//   When batch * kv heads * key tiles would not fill the GPU (small batch, MQA), blockIdx.z
//   shares the group's (query head, query tile) work out among dkv_splits blocks (dkv_share in
//   attention.cuh), and dkv_reduce_kernel adds their fp32 sums in a fixed order.
// - dq_kernel: a block owns 128 queries of one head, 32 per warp (Q and dO re-read from shared
//   memory as A fragments; at D = 128, 64 queries, 16 per warp, Q and dO held in registers) and
//   walks 32-key (64 at D = 32) tiles up to its last visible key (double-buffered): S = Q K^T,
//   dP = dO V^T, dQ += dS K; masking only on the diagonal tiles. At D = 128, where a block may
//   have 136 KB of shared memory, dq_wide_kernel takes its place: 8 warps over 128 queries,
//   dS through shared memory.
// With a pattern (first_key, kernels.h) or softcapping, each kernel runs an instance of its own
// (PATTERN; plain causal attention compiles as before) that walks only the
// tiles whose keys some query of the block sees (a dk/dv block: the queries up to the last one
// that sees one of its keys), masks those where a query's first key falls inside, and caps the
// recomputed scores, dS taking the cap's derivative. Shared tiles are padded as in the forward;
// fragment layouts are in attention.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "attention.cuh"
#include "attention_launch.cuh"

namespace scratchformer {
namespace {

constexpr int kThreads = 128;

// dkv's key rows per warp, in 16-row m tiles: 2 where the accumulators of 32 keys (dK and dV,
// 2 D floats a thread) fit in registers, so every Q and dO fragment feeds four products (D <= 64);
// 1 above.
// The instance that takes a pattern or softcapping (PATTERN) holds their bounds beside the
// accumulators: one m tile a warp, as above D = 64.
__host__ __device__ constexpr int dkv_key_tiles(int d, bool pattern = false) { return d <= 64 && !pattern ? 2 : 1; }
__host__ __device__ constexpr int dkv_block_keys(int d, bool pattern = false) { return 4 * 16 * dkv_key_tiles(d, pattern); }

// The query tile a dkv block walks: as large as S^T and dP^T (2 x keys x tile floats a warp)
// leave registers for.
__host__ __device__ constexpr int dkv_query_tile(int d) { return d <= 32 ? 64 : 32; }

// K, V, and two buffers of (Q, dO, lse, delta); elements of `size` bytes.
__host__ __device__ constexpr int dkv_shared_bytes(int d, int size, bool pattern = false) {
  return (2 * dkv_block_keys(d, pattern) + 4 * dkv_query_tile(d)) * (d + 8) * size + 4 * dkv_query_tile(d) * int(sizeof(float));
}

// Writes a warp's rows of dK (which = 0, scaled) or dV (which = 1): keys key0 + 8 r, r < 2 KT
// (m tile r / 2), columns 8 dt + 2 c; in T, or, when the backward is split, this block's fp32
// sums to dkv_partial.
template <typename T, int D, int KT>
__device__ __forceinline__ void store_dkv(const AttentionBackward& a, const float (&acc)[KT][D / 8][4], int which,
                                          int b, int kv_head, int key0) {
  const AttentionShape& s = a.shape;
  const int c = threadIdx.x % 4;
  const float scale = which == 0 ? a.scale : 1.f;
#pragma unroll
  for (int r = 0; r < 2 * KT; ++r) {
    const int key = key0 + r * 8, km = r / 2, h = r % 2;
    if (key >= s.t_k) continue;
    const int64_t row = (int64_t(b) * s.kv_heads + kv_head) * s.t_k + key;
    if (a.dkv_splits > 1) {
      const int64_t rows = int64_t(s.batch) * s.kv_heads * s.t_k;
      float* part = a.dkv_partial + ((2 * int64_t(blockIdx.z) + which) * rows + row) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(part + dt * 8 + 2 * c) = make_float2(acc[km][dt][2 * h], acc[km][dt][2 * h + 1]);
      continue;
    }
    T* out = static_cast<T*>(which == 0 ? a.dk : a.dv) + row * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * c) = pack2<T>(acc[km][dt][2 * h] * scale, acc[km][dt][2 * h + 1] * scale);
  }
}

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kThreads, 1) dkv_kernel(AttentionBackward a) {
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  constexpr int KT = dkv_key_tiles(D, PATTERN), BN = dkv_block_keys(D, PATTERN), BM = dkv_query_tile(D);
  constexpr int STRIDE = D + 8, KSLABS = D / 16, DTILES = D / 8, QTILES = BM / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);  // [BN][STRIDE]
  T* v_s = k_s + BN * STRIDE;           // [BN][STRIDE]
  T* q_buf = v_s + BN * STRIDE;         // [2][BM][STRIDE]: the query tile and the next one
  T* do_buf = q_buf + 2 * BM * STRIDE;  // [2][BM][STRIDE]
  float* lse_buf = reinterpret_cast<float*>(do_buf + 2 * BM * STRIDE);  // [2][BM], log2 units
  float* delta_buf = lse_buf + 2 * BM;                                  // [2][BM]

  const AttentionShape& s = a.shape;
  const int group = s.heads / s.kv_heads;
  const int n0 = blockIdx.y * BN;  // longest first over the whole grid: key tile 0 sees every query
  const int b = blockIdx.x / s.kv_heads, kv_head = blockIdx.x % s.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4, mi = lane / 8;
  const int offset = s.t_k - s.t_q;
  const int key0 = n0 + warp * 16 * KT + g;  // this thread's rows: key0 + 8 r, r < 2 KT (m tile r / 2)
  const float scale2 = a.scale * kLog2e;

  // The query tiles: those from the first query that sees key n0 on, for each query head of
  // the kv group (this block's share of them). Tile `it + 1` loads into the other buffer while
  // tile `it` is computed.
  // With a pattern, queries from q_end on see none of the block's keys, and those from
  // plain_end on miss key n0 (their tiles are masked). Without one both are s.t_q, written as
  // such where used: read from the kernel's parameters it takes no register (held in one, the
  // plain instance spills on sm_100).
  const int first_query = max(0, n0 - offset);
  const int q_end = PATTERN ? first_query_past(first_key, s, b, first_query, min(n0 + BN, s.t_k) - 1) : s.t_q;
  const int plain_end = PATTERN ? first_query_past(first_key, s, b, first_query, n0) : s.t_q;
  const int tiles_per_head = (q_end - first_query + BM - 1) / BM;
  // A pattern may leave a block, or a split of it, without work: no query tiles, none loaded.
  const DkvShare share = dkv_share(group, PATTERN ? max(1, tiles_per_head) : tiles_per_head, first_query, BM,
                                   blockIdx.z, a.dkv_splits);
  const int tiles = PATTERN && tiles_per_head == 0 ? 0 : share.tiles;
  // Cursors instead of it / tiles_per_head: no integer division in the loop.
  int load_h = kv_head * group + share.head, load_i0 = share.i0;  // the next tile to load
  auto load_query_tile = [&](int buf) {
    const int h = load_h, i0 = load_i0;
    load_i0 += BM;
    if (load_i0 >= (PATTERN ? q_end : s.t_q)) load_i0 = first_query, ++load_h;
    load_tile_async<T, BM, D, STRIDE, kThreads>(q_buf + buf * BM * STRIDE, a.q, a.q_stride, b, h, i0, s.t_q);
    load_tile_async<T, BM, D, STRIDE, kThreads>(do_buf + buf * BM * STRIDE, a.dout, a.dout_stride, b, h, i0, s.t_q);
    if (threadIdx.x < BM) {
      const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + i0 + threadIdx.x;
      const bool in = i0 + int(threadIdx.x) < s.t_q;
      lse_buf[buf * BM + threadIdx.x] = in ? a.lse[row] * kLog2e : INFINITY;  // P = 0 past the end
      delta_buf[buf * BM + threadIdx.x] = in ? a.delta[row] : 0.f;
    }
  };

  if (!PATTERN || tiles > 0) {  // a block without work loads nothing (and leaves no copy in flight)
    load_tile_async<T, BN, D, STRIDE, kThreads>(k_s, a.k, a.k_stride, b, kv_head, n0, s.t_k);
    load_tile_async<T, BN, D, STRIDE, kThreads>(v_s, a.v, a.v_stride, b, kv_head, n0, s.t_k);
    load_query_tile(0);
  }
  cp_async_commit();

  float dk[KT][DTILES][4] = {}, dv[KT][DTILES][4] = {};
  int next_i0 = share.i0;  // the first query of the next tile to compute

  // One query tile: S^T, dP^T, P^T and dS^T, then dV += P^T dO and dK += dS^T Q. `masked`: zero
  // P where a query does not see a key (tiles on the diagonal, and the last of a head).
  auto step = [&](int it, int i0, auto masked) {
    __syncthreads();  // every warp is done with tile it - 1: its buffer may take tile it + 1
    if (it + 1 < tiles) load_query_tile((it + 1) % 2);
    cp_async_commit();   // (an empty group after the last tile)
    cp_async_wait<1>();  // tile it (and K, V) have landed
    __syncthreads();
    const T* q_s = q_buf + it % 2 * BM * STRIDE;
    const T* do_s = do_buf + it % 2 * BM * STRIDE;
    const float* lse_s = lse_buf + it % 2 * BM;
    const float* delta_s = delta_buf + it % 2 * BM;

    // S^T = K Q^T and dP^T = V dO^T: 16 KT keys x BM queries per warp.
    float st[KT][QTILES][4] = {}, dpt[KT][QTILES][4] = {};
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) {
      uint32_t kf[KT][4], vf[KT][4];
#pragma unroll
      for (int km = 0; km < KT; ++km) {
        const int row = (warp * 16 * KT + km * 16 + lane % 16) * STRIDE + kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(kf[km], &k_s[row]);
        ldmatrix_x4(vf[km], &v_s[row]);
      }
#pragma unroll
      for (int nt = 0; nt < QTILES; nt += 2) {
        const int row = ((nt + mi / 2) * 8 + lane % 8) * STRIDE + kk * 16 + (mi % 2) * 8;
        uint32_t qf[4], df[4];
        ldmatrix_x4(qf, &q_s[row]);
        ldmatrix_x4(df, &do_s[row]);
#pragma unroll
        for (int km = 0; km < KT; ++km) {
          mma_16816<T>(st[km][nt], kf[km], qf[0], qf[1]);
          mma_16816<T>(st[km][nt + 1], kf[km], qf[2], qf[3]);
          mma_16816<T>(dpt[km][nt], vf[km], df[0], df[1]);
          mma_16816<T>(dpt[km][nt + 1], vf[km], df[2], df[3]);
        }
      }
    }

    // P^T = 2^(S^T scale log2e - lse') and dS^T = P^T (dP^T - delta), S^T capped first and dS^T
    // times the cap's derivative with softcapping. Queries past the end have lse' = inf, so P = 0
    // there; masked tiles also zero keys a query does not see.
    auto probabilities = [&](const auto& cap) {
#pragma unroll
    for (int nt = 0; nt < QTILES; ++nt) {
      const float2 lse2 = *reinterpret_cast<const float2*>(&lse_s[nt * 8 + 2 * c]);
      const float2 delta = *reinterpret_cast<const float2*>(&delta_s[nt * 8 + 2 * c]);
      int from[2] = {0, 0};  // the first keys of this thread's two queries (masked tiles)
      if constexpr (decltype(masked)::value)
        for (int e = 0; e < 2; ++e) from[e] = first_key_of(first_key, s, b, i0 + nt * 8 + 2 * c + e);
#pragma unroll
      for (int km = 0; km < KT; ++km)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float score = cap.apply(st[km][nt][e]);
          float p = exp2_approx(fmaf(score, scale2, -(e & 1 ? lse2.y : lse2.x)));
          if constexpr (decltype(masked)::value) {
            // Key key0 + 8 r sees the queries from key - offset on whose first key is not past it.
            const int query = i0 + nt * 8 + 2 * c + (e & 1), key = key0 + km * 16 + (e >> 1) * 8;
            if (key > query + offset || key >= s.t_k || (PATTERN && key < from[e & 1])) p = 0.f;
          }
          st[km][nt][e] = p;
          dpt[km][nt][e] = p * (dpt[km][nt][e] - (e & 1 ? delta.y : delta.x)) * cap.derivative(score);
        }
    }
    };
    if (PATTERN && a.softcap > 0.f)
      probabilities(Softcap::in_units(a.softcap, a.scale));
    else
      probabilities(NoSoftcap{});

    // dV += P^T dO and dK += dS^T Q.
#pragma unroll
    for (int qs = 0; qs < BM / 16; ++qs) {
      uint32_t pa[KT][4], dsa[KT][4];
#pragma unroll
      for (int km = 0; km < KT; ++km) {
        c_to_a<T>(pa[km], st[km][2 * qs], st[km][2 * qs + 1]);
        c_to_a<T>(dsa[km], dpt[km][2 * qs], dpt[km][2 * qs + 1]);
      }
#pragma unroll
      for (int dt = 0; dt < DTILES; dt += 2) {
        const int row = (qs * 16 + (mi % 2) * 8 + lane % 8) * STRIDE + (dt + mi / 2) * 8;
        uint32_t f[4];
        ldmatrix_x4_trans(f, &do_s[row]);
#pragma unroll
        for (int km = 0; km < KT; ++km) {
          mma_16816<T>(dv[km][dt], pa[km], f[0], f[1]);
          mma_16816<T>(dv[km][dt + 1], pa[km], f[2], f[3]);
        }
        ldmatrix_x4_trans(f, &q_s[row]);
#pragma unroll
        for (int km = 0; km < KT; ++km) {
          mma_16816<T>(dk[km][dt], dsa[km], f[0], f[1]);
          mma_16816<T>(dk[km][dt + 1], dsa[km], f[2], f[3]);
        }
      }
    }
  };
  // A tile needs no mask when every query in it sees every key of the block and all exist.
  auto plain = [&](int i0) { return i0 + offset >= n0 + BN - 1 && i0 + BM <= (PATTERN ? plain_end : s.t_q) && n0 + BN <= s.t_k; };
  auto advance = [&](int i0) { return i0 + BM < (PATTERN ? q_end : s.t_q) ? i0 + BM : first_query; };  // the next head starts over
  for (int it = 0; it < tiles;) {
    for (; it < tiles && !plain(next_i0); ++it, next_i0 = advance(next_i0)) step(it, next_i0, std::true_type{});
    for (; it < tiles && plain(next_i0); ++it, next_i0 = advance(next_i0)) step(it, next_i0, std::false_type{});
  }

  store_dkv<T, D>(a, dk, 0, b, kv_head, key0);
  store_dkv<T, D>(a, dv, 1, b, kv_head, key0);
}

// ---- dk/dv at D = 96 and 128 on GPUs that give a block 160 KB of shared memory (A100, H100) ----
// dkv_kernel's warps own 16 keys each at these head dims (the dK and dV accumulators of 32 keys
// would not fit in registers), so every Q and dO fragment it reads feeds two products. Here (after
// FlashAttention-2) 8 warps share 128 keys and work each 64-query tile in two phases, P^T and dS^T
// passing through shared memory between them:
//  1. warp (kw, half) = (warp % 4, warp / 4): S^T = K Q^T, P^T, dP^T = V dO^T and dS^T for keys
//     32 kw.. and queries 32 half.. of the tile (each fragment read feeds four products); P^T and
//     dS^T are written out in T.
//  2. the warps of half 0 add P^T dO to dV, those of half 1 dS^T Q to dK, for their 32 keys and
//     all of D (each dO or Q fragment feeds two key tiles, each P^T or dS^T fragment D / 8).
// ldmatrix per product: 0.41 at D = 128, 0.42 at D = 96 (dkv_kernel: 0.62). dO is single-buffered
// to fit an A100: a tile's dO loads while its S^T and P^T are computed (not in the PATTERN
// instance, which computes S^T and dP^T before P^T and dS^T: with softcapping dS^T needs each
// capped score's slope, and registers for it besides P^T would spill).
__host__ __device__ constexpr bool dkv_wide_takes(int d) { return d >= 96; }
constexpr int kWideThreads = 256, kWideKeys = 128, kWideQueries = 64, kWidePStride = kWideQueries + 8;
__host__ __device__ constexpr int dkv_wide_shared_bytes(int d) {  // K, V, two Q buffers, dO, P^T, dS^T, two (lse, delta)
  return (2 * kWideKeys + 3 * kWideQueries) * (d + 8) * 2 + 2 * kWideKeys * kWidePStride * 2 + 4 * kWideQueries * 4;
}

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kWideThreads, 1) dkv_wide_kernel(AttentionBackward a) {
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  constexpr int BN = kWideKeys, BM = kWideQueries, STRIDE = D + 8, PSTRIDE = kWidePStride;
  constexpr int KSLABS = D / 16, DTILES = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);  // [BN][STRIDE]
  T* v_s = k_s + BN * STRIDE;           // [BN][STRIDE]
  T* q_buf = v_s + BN * STRIDE;         // [2][BM][STRIDE]: the query tile and the next one
  T* do_s = q_buf + 2 * BM * STRIDE;    // [BM][STRIDE]
  T* p_s = do_s + BM * STRIDE;          // [BN][PSTRIDE]: P^T, keys as rows
  T* ds_s = p_s + BN * PSTRIDE;         // [BN][PSTRIDE]: dS^T
  float* lse_buf = reinterpret_cast<float*>(ds_s + BN * PSTRIDE);  // [2][BM], log2 units
  float* delta_buf = lse_buf + 2 * BM;                             // [2][BM]
  static_assert(dkv_wide_shared_bytes(D) == ((2 * BN + 3 * BM) * STRIDE + 2 * BN * PSTRIDE) * int(sizeof(T)) + 4 * BM * 4);

  const AttentionShape& s = a.shape;
  const int group = s.heads / s.kv_heads;
  const int n0 = blockIdx.y * BN;
  const int b = blockIdx.x / s.kv_heads, kv_head = blockIdx.x % s.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4, mi = lane / 8;
  const int kw = warp % 4, half = warp / 4;
  const int offset = s.t_k - s.t_q;
  const int key0 = n0 + kw * 32 + g;  // this thread's keys: key0 + 8 r, r < 4 (m tile r / 2)
  const float scale2 = a.scale * kLog2e;

  // The query tiles as in dkv_kernel (q_end, plain_end: see there), with cursors for the next Q
  // and the next dO to load.
  // With a pattern both bounds wait in shared memory (held in registers, the loop spills), and so
  // do the first keys of the query tiles, beside their lse and delta.
  const int first_query = max(0, n0 - offset);
  __shared__ int bounds_s[2];  // q_end, plain_end
  __shared__ int first_key_buf[PATTERN ? 2 * BM : 1];  // [2][BM]
  if (PATTERN && threadIdx.x == 0) {
    bounds_s[0] = first_query_past(first_key, s, b, first_query, min(n0 + BN, s.t_k) - 1);
    bounds_s[1] = first_query_past(first_key, s, b, first_query, n0);
  }
  if (PATTERN) __syncthreads();
  const int tiles_per_head = ((PATTERN ? bounds_s[0] : s.t_q) - first_query + BM - 1) / BM;
  const DkvShare share = dkv_share(group, PATTERN ? max(1, tiles_per_head) : tiles_per_head, first_query, BM,
                                   blockIdx.z, a.dkv_splits);
  const int tiles = PATTERN && tiles_per_head == 0 ? 0 : share.tiles;
  int q_h = kv_head * group + share.head, q_i0 = share.i0, do_h = q_h, do_i0 = q_i0;
  auto next = [&](int& h, int& i0) {
    i0 += BM;
    if (i0 >= (PATTERN ? bounds_s[0] : s.t_q)) i0 = first_query, ++h;
  };
  auto load_query_tile = [&](int buf) {
    load_tile_async<T, BM, D, STRIDE, kWideThreads>(q_buf + buf * BM * STRIDE, a.q, a.q_stride, b, q_h, q_i0, s.t_q);
    if (threadIdx.x < BM) {
      const int64_t row = (int64_t(b) * s.heads + q_h) * s.t_q + q_i0 + threadIdx.x;
      const bool in = q_i0 + int(threadIdx.x) < s.t_q;
      lse_buf[buf * BM + threadIdx.x] = in ? a.lse[row] * kLog2e : INFINITY;  // P = 0 past the end
      delta_buf[buf * BM + threadIdx.x] = in ? a.delta[row] : 0.f;
      if (PATTERN) first_key_buf[buf * BM + threadIdx.x] = first_key_of(first_key, s, b, q_i0 + threadIdx.x);
    }
    next(q_h, q_i0);
  };

  if (!PATTERN || tiles > 0) {  // a block without work loads nothing (and leaves no copy in flight)
    load_tile_async<T, BN, D, STRIDE, kWideThreads>(k_s, a.k, a.k_stride, b, kv_head, n0, s.t_k);
    load_tile_async<T, BN, D, STRIDE, kWideThreads>(v_s, a.v, a.v_stride, b, kv_head, n0, s.t_k);
    load_query_tile(0);
  }
  cp_async_commit();

  float acc[2][DTILES][4] = {};  // dV (half 0) or dK (half 1) of this warp's 32 keys
  int next_i0 = share.i0;

  // 32 keys x 32 queries of X Y^T: X (K or V) rows of this warp's keys, Y (Q or dO) of its half.
  auto products = [&](float (&c_tile)[2][4][4], const T* x_s, const T* y_s) {
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) {
      uint32_t xf[2][4];
#pragma unroll
      for (int km = 0; km < 2; ++km)
        ldmatrix_x4(xf[km], &x_s[(kw * 32 + km * 16 + lane % 16) * STRIDE + kk * 16 + (lane / 16) * 8]);
#pragma unroll
      for (int nt = 0; nt < 4; nt += 2) {
        uint32_t yf[4];
        ldmatrix_x4(yf, &y_s[(half * 32 + (nt + mi / 2) * 8 + lane % 8) * STRIDE + kk * 16 + (mi % 2) * 8]);
#pragma unroll
        for (int km = 0; km < 2; ++km) {
          mma_16816<T>(c_tile[km][nt], xf[km], yf[0], yf[1]);
          mma_16816<T>(c_tile[km][nt + 1], xf[km], yf[2], yf[3]);
        }
      }
    }
  };
  // A 32 x 32 tile of this warp into p_s or ds_s, in T.
  auto store = [&](T* dst, const float (&c_tile)[2][4][4]) {
#pragma unroll
    for (int km = 0; km < 2; ++km)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<uint32_t*>(&dst[(kw * 32 + km * 16 + h * 8 + g) * PSTRIDE + half * 32 + nt * 8 + 2 * c]) =
              pack2<T>(c_tile[km][nt][2 * h], c_tile[km][nt][2 * h + 1]);
  };

  auto step = [&](int it, int i0, auto masked) {
    __syncthreads();  // every warp is done with tile it - 1: dO, P^T, dS^T and the other Q buffer are free
    load_tile_async<T, BM, D, STRIDE, kWideThreads>(do_s, a.dout, a.dout_stride, b, do_h, do_i0, s.t_q);
    next(do_h, do_i0);
    cp_async_commit();
    if (it + 1 < tiles) load_query_tile((it + 1) % 2);
    cp_async_commit();   // (an empty group after the last tile)
    cp_async_wait<2>();  // Q of tile it (and K, V) have landed
    __syncthreads();
    const T* q_s = q_buf + it % 2 * BM * STRIDE;
    const float* lse_s = lse_buf + it % 2 * BM;
    const float* delta_s = delta_buf + it % 2 * BM;
    const int* first_s = first_key_buf + it % 2 * BM;

    float pt[2][4][4] = {}, dpt[2][4][4] = {};
    if constexpr (PATTERN) {
      // Both products first, then P^T and dS^T in one pass: dS^T takes each capped score's slope,
      // which P^T's registers would have overwritten (so dO's load no longer overlaps S^T here).
      cp_async_wait<1>();  // dO of tile it has landed too
      __syncthreads();
      products(pt, k_s, q_s);
      products(dpt, v_s, do_s);
      auto probabilities = [&](const auto& cap) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int col = half * 32 + nt * 8 + 2 * c;  // this thread's two queries of the tile
          const float2 lse2 = *reinterpret_cast<const float2*>(&lse_s[col]);
          const float2 delta = *reinterpret_cast<const float2*>(&delta_s[col]);
          const int2 from = *reinterpret_cast<const int2*>(&first_s[col]);
#pragma unroll
          for (int km = 0; km < 2; ++km)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float score = cap.apply(pt[km][nt][e]);
              float p = exp2_approx(fmaf(score, scale2, -(e & 1 ? lse2.y : lse2.x)));
              if constexpr (decltype(masked)::value) {
                const int query = i0 + col + (e & 1), key = key0 + km * 16 + (e >> 1) * 8;
                if (key > query + offset || key >= s.t_k || key < (e & 1 ? from.y : from.x)) p = 0.f;
              }
              pt[km][nt][e] = p;
              dpt[km][nt][e] = p * (dpt[km][nt][e] - (e & 1 ? delta.y : delta.x)) * cap.derivative(score);
            }
        }
      };
      if (a.softcap > 0.f)
        probabilities(Softcap::in_units(a.softcap, a.scale));
      else
        probabilities(NoSoftcap{});
      store(p_s, pt);
    } else {
      // Phase 1: P^T = 2^(S^T scale log2e - lse'), zero past the end (lse' = inf) and, on masked
      // tiles, where a query does not see a key; then dS^T = P^T (dP^T - delta).
      products(pt, k_s, q_s);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const float2 lse2 = *reinterpret_cast<const float2*>(&lse_s[half * 32 + nt * 8 + 2 * c]);
#pragma unroll
        for (int km = 0; km < 2; ++km)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float p = exp2_approx(fmaf(pt[km][nt][e], scale2, -(e & 1 ? lse2.y : lse2.x)));
            if constexpr (decltype(masked)::value) {
              const int query = i0 + half * 32 + nt * 8 + 2 * c + (e & 1), key = key0 + km * 16 + (e >> 1) * 8;
              if (key > query + offset || key >= s.t_k) p = 0.f;
            }
            pt[km][nt][e] = p;
          }
      }
      store(p_s, pt);
      cp_async_wait<1>();  // dO of tile it has landed
      __syncthreads();
      products(dpt, v_s, do_s);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const float2 delta = *reinterpret_cast<const float2*>(&delta_s[half * 32 + nt * 8 + 2 * c]);
#pragma unroll
        for (int km = 0; km < 2; ++km)
#pragma unroll
          for (int e = 0; e < 4; ++e) dpt[km][nt][e] = pt[km][nt][e] * (dpt[km][nt][e] - (e & 1 ? delta.y : delta.x));
      }
    }
    store(ds_s, dpt);
    __syncthreads();  // P^T and dS^T of the whole tile are written

    // Phase 2: dV += P^T dO (half 0) or dK += dS^T Q (half 1) over this warp's 32 keys.
    const T* a_s = half == 0 ? p_s : ds_s;
    const T* b_s = half == 0 ? do_s : q_s;
#pragma unroll
    for (int qs = 0; qs < BM / 16; ++qs) {
      uint32_t af[2][4];
#pragma unroll
      for (int km = 0; km < 2; ++km)
        ldmatrix_x4(af[km], &a_s[(kw * 32 + km * 16 + lane % 16) * PSTRIDE + qs * 16 + (lane / 16) * 8]);
#pragma unroll
      for (int dt = 0; dt < DTILES; dt += 2) {
        uint32_t f[4];
        ldmatrix_x4_trans(f, &b_s[(qs * 16 + (mi % 2) * 8 + lane % 8) * STRIDE + (dt + mi / 2) * 8]);
#pragma unroll
        for (int km = 0; km < 2; ++km) {
          mma_16816<T>(acc[km][dt], af[km], f[0], f[1]);
          mma_16816<T>(acc[km][dt + 1], af[km], f[2], f[3]);
        }
      }
    }
  };
  auto plain = [&](int i0) { return i0 + offset >= n0 + BN - 1 && i0 + BM <= (PATTERN ? bounds_s[1] : s.t_q) && n0 + BN <= s.t_k; };
  auto advance = [&](int i0) { return i0 + BM < (PATTERN ? bounds_s[0] : s.t_q) ? i0 + BM : first_query; };
  for (int it = 0; it < tiles;) {
    for (; it < tiles && !plain(next_i0); ++it, next_i0 = advance(next_i0)) step(it, next_i0, std::true_type{});
    for (; it < tiles && plain(next_i0); ++it, next_i0 = advance(next_i0)) step(it, next_i0, std::false_type{});
  }
  store_dkv<T, D>(a, acc, half == 0 ? 1 : 0, b, kv_head, key0);
}

// ---- dq at D = 128 on GPUs that give a block 136 KB of shared memory (A100, H100) --------------
// dq_kernel's warps own 16 queries each at D = 128 (Q and dO held in registers), so every K and
// V fragment it reads feeds two products. Here 8 warps share 128 queries and work each 64-key
// tile in two phases, dS passing through shared memory:
//  1. warp (qw, half) = (warp % 4, warp / 4): S = Q K^T (Q's fragments held in registers for the
//     block), dP = dO V^T and dS for queries 32 qw.. and keys 32 half.. of the tile (each K, V
//     and dO fragment feeds four products); dS is written out in T;
//  2. the same warp adds dS K to dQ for its 32 queries and the half of D from 64 half on.
// ldmatrix per product: 0.38 (dq_kernel: 0.50).
__host__ __device__ constexpr bool dq_wide_takes(int d) { return d == 128; }
constexpr int kDqWideQueries = 128, kDqWideKeys = 64, kDqWideSStride = kDqWideKeys + 8;
__host__ __device__ constexpr int dq_wide_shared_bytes(int d) {  // dO, Q (then dS), two buffers of (K, V)
  return (2 * kDqWideQueries + 4 * kDqWideKeys) * (d + 8) * 2;
}

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kWideThreads, 1) dq_wide_kernel(AttentionBackward a) {
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  constexpr int BM = kDqWideQueries, BN = kDqWideKeys, STRIDE = D + 8, SSTRIDE = kDqWideSStride;
  constexpr int KSLABS = D / 16, HALF_DTILES = D / 16;  // n tiles of 8 in half of D
  static_assert(BM * SSTRIDE <= BM * STRIDE, "dS takes Q's place");
  extern __shared__ __align__(16) unsigned char smem[];
  T* do_s = reinterpret_cast<T*>(smem);  // [BM][STRIDE]
  T* q_s = do_s + BM * STRIDE;           // [BM][STRIDE], until every warp holds its Q fragments
  T* ds_s = q_s;                         // [BM][SSTRIDE]: then dS of the key tile
  T* kv_s = q_s + BM * STRIDE;           // [2][K, V][BN][STRIDE]: tile j + 1 loads while j is used
  static_assert(dq_wide_shared_bytes(D) == (2 * BM + 4 * BN) * STRIDE * int(sizeof(T)));

  const AttentionShape& s = a.shape;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // longest rows first, over the whole grid
  const int b = blockIdx.x / s.heads, h = blockIdx.x % s.heads;
  const int kv_head = h / (s.heads / s.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4, mi = lane / 8;
  const int qw = warp % 4, half = warp / 4;
  const int offset = s.t_k - s.t_q;
  const int query0 = m0 + qw * 32 + g;  // this thread's rows: query0 + 8 r, r < 4 (m tile r / 2)
  const float scale2 = a.scale * kLog2e;

  const int key_end = min(s.t_k, min(m0 + BM, s.t_q) + offset);
  const int tiles = (key_end + BN - 1) / BN;
  // With a pattern: from the tile of the first query's first key; masked below the last query's.
  const int first_tile = first_key_of(first_key, s, b, m0) / BN;
  const int low_end = first_key_of(first_key, s, b, min(m0 + BM, s.t_q) - 1);
  auto load_key_tile = [&](int j) {
    T* k_tile = kv_s + j % 2 * 2 * BN * STRIDE;
    load_tile_async<T, BN, D, STRIDE, kWideThreads>(k_tile, a.k, a.k_stride, b, kv_head, j * BN, key_end);
    load_tile_async<T, BN, D, STRIDE, kWideThreads>(k_tile + BN * STRIDE, a.v, a.v_stride, b, kv_head, j * BN, key_end);
  };
  load_tile_async<T, BM, D, STRIDE, kWideThreads>(q_s, a.q, a.q_stride, b, h, m0, s.t_q);
  load_tile_async<T, BM, D, STRIDE, kWideThreads>(do_s, a.dout, a.dout_stride, b, h, m0, s.t_q);
  cp_async_commit();
  if (first_tile < tiles) load_key_tile(first_tile);
  cp_async_commit();
  // Q and dO as A fragments: this lane's ldmatrix row of m tile mt, slab kk.
  auto a_row = [&](int mt, int kk) { return (qw * 32 + mt * 16 + lane % 16) * STRIDE + kk * 16 + (lane / 16) * 8; };
  uint32_t q_frag[2][KSLABS][4];
  cp_async_wait<1>();  // Q and dO have landed
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) ldmatrix_x4(q_frag[mt][kk], &q_s[a_row(mt, kk)]);
  // (The first key tile's barriers come before any warp writes dS over Q.)
  float lse2[4], delta[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int query = query0 + r * 8;
    const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + query;
    lse2[r] = query < s.t_q ? a.lse[row] * kLog2e : INFINITY;  // P = 0 past the end
    delta[r] = query < s.t_q ? a.delta[row] : 0.f;
  }
  // The block's first keys in shared memory (held in registers they spill); the first step's
  // barrier publishes them.
  __shared__ int first_key_s[PATTERN ? BM : 1];
  if (PATTERN && threadIdx.x < BM) first_key_s[threadIdx.x] = first_key_of(first_key, s, b, m0 + threadIdx.x);

  float dq[2][HALF_DTILES][4] = {};
  // One key tile: S, dP, dS (phase 1), then dQ += dS K (phase 2). `masked`: zero P where a query
  // does not see a key.
  auto step = [&](int j, auto masked) {
    __syncthreads();  // every warp is done with tile j - 1: its buffer may take tile j + 1, dS is free
    if (j + 1 < tiles) load_key_tile(j + 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile j has landed
    __syncthreads();
    const int n0 = j * BN;
    const T* k_s = kv_s + j % 2 * 2 * BN * STRIDE;
    const T* v_s = k_s + BN * STRIDE;

    float sc[2][4][4] = {}, dp[2][4][4] = {};
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) {
      uint32_t df[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(df[mt], &do_s[a_row(mt, kk)]);
#pragma unroll
      for (int nt = 0; nt < 4; nt += 2) {
        const int row = (half * 32 + (nt + mi / 2) * 8 + lane % 8) * STRIDE + kk * 16 + (mi % 2) * 8;
        uint32_t kf[4], vf[4];
        ldmatrix_x4(kf, &k_s[row]);
        ldmatrix_x4(vf, &v_s[row]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(sc[mt][nt], q_frag[mt][kk], kf[0], kf[1]);
          mma_16816<T>(sc[mt][nt + 1], q_frag[mt][kk], kf[2], kf[3]);
          mma_16816<T>(dp[mt][nt], df[mt], vf[0], vf[1]);
          mma_16816<T>(dp[mt][nt + 1], df[mt], vf[2], vf[3]);
        }
      }
    }
    // dS = P (dP - delta) with P = 2^(S scale log2e - lse'), written to ds_s in T (with
    // softcapping: of the scores capped in a pass of their own, times the cap's derivative).
    auto probabilities = [&](auto slope) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          float ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 2 * mt + (e >> 1);
            const float score = sc[mt][nt][e];
            float p = exp2_approx(fmaf(score, scale2, -lse2[r]));
            if constexpr (decltype(masked)::value) {
              const int key = n0 + half * 32 + nt * 8 + 2 * c + (e & 1);
              if (key >= key_end || key > query0 + r * 8 + offset || (PATTERN && key < first_key_s[query0 - m0 + r * 8])) p = 0.f;
            }
            ds[e] = p * (dp[mt][nt][e] - delta[r]) * slope.derivative(score);
          }
          T* dst = &ds_s[(qw * 32 + mt * 16 + g) * SSTRIDE + half * 32 + nt * 8 + 2 * c];
          *reinterpret_cast<uint32_t*>(dst) = pack2<T>(ds[0], ds[1]);
          *reinterpret_cast<uint32_t*>(dst + 8 * SSTRIDE) = pack2<T>(ds[2], ds[3]);
        }
    };
    if (PATTERN && a.softcap > 0.f) {
      const Softcap cap = Softcap::in_units(a.softcap, a.scale);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[mt][nt][e] = cap.apply(sc[mt][nt][e]);
      probabilities(cap);
    } else {
      probabilities(NoSoftcap{});
    }
    __syncthreads();  // dS of the whole tile is written

    // dQ += dS K over this warp's 32 queries and half of D.
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      uint32_t dsa[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(dsa[mt], &ds_s[(qw * 32 + mt * 16 + lane % 16) * SSTRIDE + ks * 16 + (lane / 16) * 8]);
#pragma unroll
      for (int dt = 0; dt < HALF_DTILES; dt += 2) {
        uint32_t kf[4];
        ldmatrix_x4_trans(kf, &k_s[(ks * 16 + (mi % 2) * 8 + lane % 8) * STRIDE + half * (D / 2) + (dt + mi / 2) * 8]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(dq[mt][dt], dsa[mt], kf[0], kf[1]);
          mma_16816<T>(dq[mt][dt + 1], dsa[mt], kf[2], kf[3]);
        }
      }
    }
  };
  // Tiles below plain_tiles hold only keys that every query of the block sees on the causal side.
  const int plain_tiles = min(key_end, m0 + offset + 1) / BN;
  int j = first_tile;
  if constexpr (PATTERN)
    for (; j * BN < low_end; ++j) step(j, std::true_type{});
  for (; j < plain_tiles; ++j) step(j, std::false_type{});
  for (; j < tiles; ++j) step(j, std::true_type{});

#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int query = query0 + r * 8;
    if (query >= s.t_q) continue;
    T* out = static_cast<T*>(a.dq) + ((int64_t(b) * s.heads + h) * s.t_q + query) * D + half * (D / 2);
#pragma unroll
    for (int dt = 0; dt < HALF_DTILES; ++dt)
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * c) =
          pack2<T>(dq[r / 2][dt][2 * (r % 2)] * a.scale, dq[r / 2][dt][2 * (r % 2) + 1] * a.scale);
  }
}

// dq's 16-row tiles per warp: 2 (every K and V fragment feeds two products; Q and dO re-read
// from shared memory) where Q, dO and two K/V buffers leave room for two blocks per SM on an
// A100; 1 at D = 128 (Q and dO in registers).
template <int D>
__host__ __device__ constexpr int dq_row_tiles() {
  return D <= 96 ? 2 : 1;
}

// dq's key tile: 64 at D = 32, where a tile's fixed costs (barriers, copies, loop) would
// otherwise weigh on its few products; 32 above, for registers. The PATTERN instance holds its
// bounds and the cap besides: 32 at D = 32, 16 at D = 96 (found by compiling, as above).
template <int D, bool PATTERN = false>
__host__ __device__ constexpr int dq_key_tile() {
  return D <= 32 ? (PATTERN ? 32 : 64) : PATTERN && D == 96 ? 16 : 32;
}

template <typename T, int D, bool PATTERN>
__host__ __device__ constexpr int dq_shared_bytes() {  // [Q, dO when held there] and two buffers of (K, V)
  return ((dq_row_tiles<D>() == 2 ? 2 * 128 : 0) + 4 * dq_key_tile<D, PATTERN>()) * (D + 8) * int(sizeof(T));
}

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(AttentionBackward a) {
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  constexpr int MT = dq_row_tiles<D>(), BM = 4 * 16 * MT, BN = dq_key_tile<D, PATTERN>();
  constexpr int STRIDE = D + 8, KSLABS = D / 16, DTILES = D / 8, NTILES = BN / 8;
  constexpr bool FRAGS_IN_SMEM = MT == 2;  // Q and dO: re-read from shared memory each tile, or held in registers
  static_assert(FRAGS_IN_SMEM || 4 * BN >= 2 * BM, "the Q and dO tiles are staged through the K/V buffers");
  extern __shared__ __align__(16) unsigned char smem[];
  T* qdo_s = reinterpret_cast<T*>(smem);                      // [Q, dO][BM][STRIDE] (FRAGS_IN_SMEM)
  T* kv_s = qdo_s + (FRAGS_IN_SMEM ? 2 * BM * STRIDE : 0);    // [2][K, V][BN][STRIDE]: tile j + 1 loads while j is used

  const AttentionShape& s = a.shape;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // longest rows first, over the whole grid
  const int b = blockIdx.x / s.heads, h = blockIdx.x % s.heads;
  const int kv_head = h / (s.heads / s.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4, mi = lane / 8;
  const int offset = s.t_k - s.t_q;
  const int query0 = m0 + warp * 16 * MT + g;  // this thread's rows: query0 + 8 r, r < 2 MT (m tile r / 2)
  const float scale2 = a.scale * kLog2e;

  T* q_s = FRAGS_IN_SMEM ? qdo_s : kv_s;
  T* do_s = q_s + BM * STRIDE;
  load_tile_async<T, BM, D, STRIDE, kThreads>(q_s, a.q, a.q_stride, b, h, m0, s.t_q);
  load_tile_async<T, BM, D, STRIDE, kThreads>(do_s, a.dout, a.dout_stride, b, h, m0, s.t_q);
  cp_async_commit();
  // Q and dO as A fragments: this lane's ldmatrix row of m tile mt, slab kk.
  auto a_row = [&](int mt, int kk) { return (warp * 16 * MT + mt * 16 + lane % 16) * STRIDE + kk * 16 + (lane / 16) * 8; };
  uint32_t q_frag[FRAGS_IN_SMEM ? 1 : KSLABS][4], do_frag[FRAGS_IN_SMEM ? 1 : KSLABS][4];
  if constexpr (!FRAGS_IN_SMEM) {
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) {
      ldmatrix_x4(q_frag[kk], &q_s[a_row(0, kk)]);
      ldmatrix_x4(do_frag[kk], &do_s[a_row(0, kk)]);
    }
    __syncthreads();  // every warp has its Q and dO fragments: the buffers may take K and V
  }
  float lse2[2 * MT], delta[2 * MT];
#pragma unroll
  for (int r = 0; r < 2 * MT; ++r) {
    const int query = query0 + r * 8;
    const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + query;
    lse2[r] = query < s.t_q ? a.lse[row] * kLog2e : INFINITY;  // P = 0 past the end
    delta[r] = query < s.t_q ? a.delta[row] : 0.f;
  }

  const int key_end = min(s.t_k, min(m0 + BM, s.t_q) + offset);
  const int tiles = (key_end + BN - 1) / BN;
  // With a pattern: from the tile of the first query's first key; masked below the last query's.
  const int first_tile = first_key_of(first_key, s, b, m0) / BN;
  const int low_end = first_key_of(first_key, s, b, min(m0 + BM, s.t_q) - 1);
  auto load_key_tile = [&](int j) {
    T* k_tile = kv_s + j % 2 * 2 * BN * STRIDE;
    load_tile_async<T, BN, D, STRIDE, kThreads>(k_tile, a.k, a.k_stride, b, kv_head, j * BN, key_end);
    load_tile_async<T, BN, D, STRIDE, kThreads>(k_tile + BN * STRIDE, a.v, a.v_stride, b, kv_head, j * BN, key_end);
  };
  load_key_tile(first_tile);
  cp_async_commit();

  float dq[MT][DTILES][4] = {};
  // One key tile: S, dP, dS, then dQ += dS K. `masked`: zero P where a query does not see a key.
  auto step = [&](int j, auto masked) {
    __syncthreads();  // every warp is done with tile j - 1: its buffer may take tile j + 1
    if (j + 1 < tiles) load_key_tile(j + 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile j (and Q, dO) have landed
    __syncthreads();
    const int n0 = j * BN;
    const T* k_s = kv_s + j % 2 * 2 * BN * STRIDE;
    const T* v_s = k_s + BN * STRIDE;

    // S = Q K^T and dP = dO V^T: 16 MT queries x BN keys per warp.
    float sc[MT][NTILES][4] = {}, dp[MT][NTILES][4] = {};
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) {
      uint32_t qf[MT][4], df[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (FRAGS_IN_SMEM) {
          ldmatrix_x4(qf[mt], &q_s[a_row(mt, kk)]);
          ldmatrix_x4(df[mt], &do_s[a_row(mt, kk)]);
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) qf[mt][i] = q_frag[kk][i], df[mt][i] = do_frag[kk][i];
        }
      }
#pragma unroll
      for (int nt = 0; nt < NTILES; nt += 2) {
        const int row = ((nt + mi / 2) * 8 + lane % 8) * STRIDE + kk * 16 + (mi % 2) * 8;
        uint32_t kf[4], vf[4];
        ldmatrix_x4(kf, &k_s[row]);
        ldmatrix_x4(vf, &v_s[row]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(sc[mt][nt], qf[mt], kf[0], kf[1]);
          mma_16816<T>(sc[mt][nt + 1], qf[mt], kf[2], kf[3]);
          mma_16816<T>(dp[mt][nt], df[mt], vf[0], vf[1]);
          mma_16816<T>(dp[mt][nt + 1], df[mt], vf[2], vf[3]);
        }
      }
    }

    // dS = P (dP - delta) with P = 2^(S scale log2e - lse'); queries past the end have lse' =
    // inf (P = 0); masked tiles also zero keys past a query's diagonal or past the end.
    auto probabilities = [&](const auto& cap) {  // and dS, as in dkv_kernel
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 2 * mt + (e >> 1);
          const float score = cap.apply(sc[mt][nt][e]);
          float p = exp2_approx(fmaf(score, scale2, -lse2[r]));
          if constexpr (decltype(masked)::value) {
            const int key = n0 + nt * 8 + 2 * c + (e & 1), query = query0 + r * 8;
            if (key >= key_end || key > query + offset || (PATTERN && key < first_key_of(first_key, s, b, query))) p = 0.f;
          }
          sc[mt][nt][e] = p * (dp[mt][nt][e] - delta[r]) * cap.derivative(score);
        }
    };
    if (PATTERN && a.softcap > 0.f)
      probabilities(Softcap::in_units(a.softcap, a.scale));
    else
      probabilities(NoSoftcap{});

    // dQ += dS K.
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      uint32_t dsa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a<T>(dsa[mt], sc[mt][2 * ks], sc[mt][2 * ks + 1]);
#pragma unroll
      for (int dt = 0; dt < DTILES; dt += 2) {
        uint32_t kf[4];
        ldmatrix_x4_trans(kf, &k_s[(ks * 16 + (mi % 2) * 8 + lane % 8) * STRIDE + (dt + mi / 2) * 8]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(dq[mt][dt], dsa[mt], kf[0], kf[1]);
          mma_16816<T>(dq[mt][dt + 1], dsa[mt], kf[2], kf[3]);
        }
      }
    }
  };
  // Tiles below plain_tiles hold only keys that every query of the block sees on the causal side.
  const int plain_tiles = min(key_end, m0 + offset + 1) / BN;
  int j = first_tile;
  for (; j * BN < low_end; ++j) step(j, std::true_type{});
  for (; j < plain_tiles; ++j) step(j, std::false_type{});
  for (; j < tiles; ++j) step(j, std::true_type{});

#pragma unroll
  for (int r = 0; r < 2 * MT; ++r) {
    const int query = query0 + r * 8;
    if (query >= s.t_q) continue;
    T* out = static_cast<T*>(a.dq) + ((int64_t(b) * s.heads + h) * s.t_q + query) * D;
#pragma unroll
    for (int dt = 0; dt < DTILES; ++dt)
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * c) =
          pack2<T>(dq[r / 2][dt][2 * (r % 2)] * a.scale, dq[r / 2][dt][2 * (r % 2) + 1] * a.scale);
  }
}

// dk = scale * (the splits' dk sums), dv = the splits' dv sums, added in split order.
template <typename T>
__global__ void __launch_bounds__(256) dkv_reduce_kernel(const float* __restrict__ partial, int splits, int64_t n,
                                                         float scale, T* __restrict__ dk, T* __restrict__ dv) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float k = 0.f, v = 0.f;
    for (int z = 0; z < splits; ++z) {
      k += partial[2 * z * n + i];
      v += partial[(2 * z + 1) * n + i];
    }
    dk[i] = from_float<T>(k * scale);
    dv[i] = from_float<T>(v);
  }
}

// Whether the current GPU lets a kernel opt in to this much dynamic shared memory a block.
bool block_may_have(int bytes) {
  int most = 0;
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &most) && most >= bytes;
}

// How many blocks using this much dynamic shared memory an SM of the current GPU holds at once.
int blocks_per_sm(int bytes) {
  int per_sm = 0, reserved = 0;
  if (!device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, &per_sm) ||
      !device_attribute(cudaDevAttrReservedSharedMemoryPerBlock, &reserved))
    return 1;
  return std::max(1, per_sm / (bytes + reserved));
}

// Whether dk/dv takes dkv_wide_kernel: D = 96 or 128 on a GPU that gives a block its shared memory.
bool dkv_wide_runs(int head_dim) { return dkv_wide_takes(head_dim) && block_may_have(dkv_wide_shared_bytes(head_dim)); }

}  // namespace

int attention_backward_dkv_splits(const AttentionShape& s, DType dtype, void* stream) {
  if (dtype == DType::kFloat32) return 1;  // the CUDA-core backward is not split
  const int group = s.heads / s.kv_heads, d = s.head_dim;
  int sm_count = 0;
  if (!device_attribute(cudaDevAttrMultiProcessorCount, &sm_count)) return 1;
  // Two waves of dk/dv blocks: an SM holds one block of the Hopper or the wide kernel; of
  // dkv_kernel two where its shared memory allows (A100/H100; sm_86/89/120 one above D = 32), its
  // registers (up to 256 a thread) never more.
  const bool hopper = hopper_takes(d) && hopper_kernels_usable(static_cast<cudaStream_t>(stream));
  const bool wide = !hopper && dkv_wide_runs(d);
  const int keys = hopper ? kHopperDkvKeys : wide ? kWideKeys : dkv_block_keys(d);
  const int per_sm = hopper || wide ? 1 : std::min(2, blocks_per_sm(dkv_shared_bytes(d, 2)));
  const int64_t blocks = int64_t(s.batch) * s.kv_heads * ((s.t_k + keys - 1) / keys), wanted = 2LL * per_sm * sm_count;
  // A grid of at least one of the two waves gains little from splitting and its fp32 partials
  // (2 x splits x dk's elements) would be the largest: no split. Below that, blocks x splits <
  // 1.5 x wanted, so the partials stay under 1.5 x wanted x keys x D x 8 bytes on any problem.
  if (2 * blocks > wanted) return 1;
  // At most as many splits as the last key block (whose keys the fewest queries see) has query
  // tiles over the group, under any tiling that may run (the launcher may yet fall back from the
  // Hopper kernel): every split of every block gets work (dkv_share).
  auto least_tiles = [&](int block_keys, int tile) {
    const int last_first_query = std::max(0, (s.t_k - 1) / block_keys * block_keys - (s.t_k - s.t_q));
    return int64_t(group) * ((s.t_q - last_first_query + tile - 1) / tile);
  };
  int64_t most = least_tiles(dkv_block_keys(d), dkv_query_tile(d));
  if (hopper_takes(d)) most = std::min(most, least_tiles(kHopperDkvKeys, kHopperDkvQueries));
  if (dkv_wide_takes(d)) most = std::min(most, least_tiles(kWideKeys, kWideQueries));
  return int(std::max<int64_t>(1, std::min((wanted + blocks - 1) / blocks, most)));
}

namespace {

// dk and dv: the Hopper kernel, else the wide one where it runs, else dkv_kernel.
template <typename T, int D, bool PATTERN>
cudaError_t backward_dkv(const AttentionBackward& a, cudaStream_t stream) {
  const AttentionShape& s = a.shape;
  if (backward_dkv_hopper<T, D>(a, stream)) return cudaSuccess;
  if constexpr (dkv_wide_takes(D)) {
    if (dkv_wide_runs(D)) {
      constexpr int bytes = dkv_wide_shared_bytes(D);
      const cudaError_t err = cudaFuncSetAttribute(dkv_wide_kernel<T, D, PATTERN>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (err != cudaSuccess) return err;
      const dim3 grid(s.batch * s.kv_heads, (s.t_k + kWideKeys - 1) / kWideKeys, a.dkv_splits);
      dkv_wide_kernel<T, D, PATTERN><<<grid, kWideThreads, bytes, stream>>>(a);
      return cudaSuccess;
    }
  }
  constexpr int bytes = dkv_shared_bytes(D, sizeof(T), PATTERN);
  // Above 48 KB of dynamic shared memory a kernel must opt in.
  const cudaError_t err = cudaFuncSetAttribute(dkv_kernel<T, D, PATTERN>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  constexpr int keys = dkv_block_keys(D, PATTERN);
  const dim3 grid(s.batch * s.kv_heads, (s.t_k + keys - 1) / keys, a.dkv_splits);
  dkv_kernel<T, D, PATTERN><<<grid, kThreads, bytes, stream>>>(a);
  return cudaSuccess;
}

// dq: the Hopper kernel, else the wide one where it runs, else dq_kernel.
template <typename T, int D, bool PATTERN>
cudaError_t backward_dq(const AttentionBackward& a, cudaStream_t stream) {
  const AttentionShape& s = a.shape;
  if (backward_dq_hopper<T, D>(a, stream)) return cudaSuccess;
  if constexpr (dq_wide_takes(D)) {
    constexpr int bytes = dq_wide_shared_bytes(D);
    if (block_may_have(bytes)) {
      const cudaError_t err = cudaFuncSetAttribute(dq_wide_kernel<T, D, PATTERN>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (err != cudaSuccess) return err;
      const dim3 grid(s.batch * s.heads, (s.t_q + kDqWideQueries - 1) / kDqWideQueries);
      dq_wide_kernel<T, D, PATTERN><<<grid, kWideThreads, bytes, stream>>>(a);
      return cudaSuccess;
    }
  }
  constexpr int bytes = dq_shared_bytes<T, D, PATTERN>(), rows = 4 * 16 * dq_row_tiles<D>();
  const cudaError_t err = cudaFuncSetAttribute(dq_kernel<T, D, PATTERN>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  dq_kernel<T, D, PATTERN><<<dim3(s.batch * s.heads, (s.t_q + rows - 1) / rows), kThreads, bytes, stream>>>(a);
  return cudaSuccess;
}

}  // namespace

template <typename T, int D>
cudaError_t backward_tensor_cores(const AttentionBackward& a, cudaStream_t stream) {
  const AttentionShape& s = a.shape;
  const bool pattern = patterned(a);  // the kernels' instance that takes first_key and softcap
  const cudaError_t dkv_err = pattern ? backward_dkv<T, D, true>(a, stream) : backward_dkv<T, D, false>(a, stream);
  if (dkv_err != cudaSuccess) return dkv_err;
  if (a.dkv_splits > 1) {
    const int64_t n = int64_t(s.batch) * s.kv_heads * s.t_k * D;
    const int blocks = int((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
    dkv_reduce_kernel<T><<<blocks, 256, 0, stream>>>(a.dkv_partial, a.dkv_splits, n, a.scale, static_cast<T*>(a.dk),
                                                      static_cast<T*>(a.dv));
  }
  return pattern ? backward_dq<T, D, true>(a, stream) : backward_dq<T, D, false>(a, stream);
}

#define SCRATCHFORMER_BACKWARD(T, D) \
  template cudaError_t backward_tensor_cores<T, D>(const AttentionBackward&, cudaStream_t);
SCRATCHFORMER_FOR_EACH_TENSOR_CORE_TYPE(SCRATCHFORMER_BACKWARD)

const char* launch_attention_backward(const AttentionBackward& a, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSuccess;
  const bool supported = dispatch_attention(a.dtype, a.shape.head_dim, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    backward_delta<T, D>(a, st);
    if constexpr (std::is_same_v<T, float>)
      backward_simt<T, D>(a, st);
    else
      err = backward_tensor_cores<T, D>(a, st);
  });
  if (!supported) return "unsupported dtype or head dim";
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace scratchformer
