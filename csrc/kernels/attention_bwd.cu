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
//   Only tiles on the causal diagonal (and a head's last, partial one) run the masking code.
//   When batch * kv heads * key tiles would not fill the GPU (small batch, MQA), blockIdx.z
//   shares the group's (query head, query tile) work out among dkv_splits blocks (dkv_share in
//   attention.cuh), and dkv_reduce_kernel adds their fp32 sums in a fixed order.
// - dq_kernel: a block owns 128 queries of one head, 32 per warp (Q and dO re-read from shared
//   memory as A fragments; at D = 128, 64 queries, 16 per warp, Q and dO held in registers) and
//   walks 32-key (64 at D = 32) tiles up to its last visible key (double-buffered): S = Q K^T,
//   dP = dO V^T, dQ += dS K; masking only on the diagonal tiles.
// Shared tiles are padded as in the forward; fragment layouts are in attention.cuh.
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
__host__ __device__ constexpr int dkv_key_tiles(int d) { return d <= 64 ? 2 : 1; }
__host__ __device__ constexpr int dkv_block_keys(int d) { return 4 * 16 * dkv_key_tiles(d); }

// The query tile a dkv block walks: as large as S^T and dP^T (2 x keys x tile floats a warp)
// leave registers for.
__host__ __device__ constexpr int dkv_query_tile(int d) { return d <= 32 ? 64 : 32; }

template <typename T, int D>
__host__ __device__ constexpr int dkv_shared_bytes() {  // K, V, and two buffers of (Q, dO, lse, delta)
  return (2 * dkv_block_keys(D) + 4 * dkv_query_tile(D)) * (D + 8) * int(sizeof(T)) +
         4 * dkv_query_tile(D) * int(sizeof(float));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dkv_kernel(AttentionBackward a) {
  constexpr int KT = dkv_key_tiles(D), BN = dkv_block_keys(D), BM = dkv_query_tile(D);
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
  const int first_query = max(0, n0 - offset), tiles_per_head = (s.t_q - first_query + BM - 1) / BM;
  const DkvShare share = dkv_share(group, tiles_per_head, first_query, BM, blockIdx.z, a.dkv_splits);
  const int tiles = share.tiles;
  // Cursors instead of it / tiles_per_head: no integer division in the loop.
  int load_h = kv_head * group + share.head, load_i0 = share.i0;  // the next tile to load
  auto load_query_tile = [&](int buf) {
    const int h = load_h, i0 = load_i0;
    load_i0 += BM;
    if (load_i0 >= s.t_q) load_i0 = first_query, ++load_h;
    load_tile_async<T, BM, D, STRIDE, kThreads>(q_buf + buf * BM * STRIDE, a.q, a.q_stride, b, h, i0, s.t_q);
    load_tile_async<T, BM, D, STRIDE, kThreads>(do_buf + buf * BM * STRIDE, a.dout, a.dout_stride, b, h, i0, s.t_q);
    if (threadIdx.x < BM) {
      const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + i0 + threadIdx.x;
      const bool in = i0 + int(threadIdx.x) < s.t_q;
      lse_buf[buf * BM + threadIdx.x] = in ? a.lse[row] * kLog2e : INFINITY;  // P = 0 past the end
      delta_buf[buf * BM + threadIdx.x] = in ? a.delta[row] : 0.f;
    }
  };

  load_tile_async<T, BN, D, STRIDE, kThreads>(k_s, a.k, a.k_stride, b, kv_head, n0, s.t_k);
  load_tile_async<T, BN, D, STRIDE, kThreads>(v_s, a.v, a.v_stride, b, kv_head, n0, s.t_k);
  load_query_tile(0);
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

    // P^T = 2^(S^T scale log2e - lse') and dS^T = P^T (dP^T - delta). Queries past the end
    // have lse' = inf, so P = 0 there; masked tiles also zero keys a query does not see.
#pragma unroll
    for (int nt = 0; nt < QTILES; ++nt) {
      const float2 lse2 = *reinterpret_cast<const float2*>(&lse_s[nt * 8 + 2 * c]);
      const float2 delta = *reinterpret_cast<const float2*>(&delta_s[nt * 8 + 2 * c]);
#pragma unroll
      for (int km = 0; km < KT; ++km)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float p = exp2_approx(fmaf(st[km][nt][e], scale2, -(e & 1 ? lse2.y : lse2.x)));
          if constexpr (decltype(masked)::value) {
            // Key key0 + 8 r sees the queries from key - offset on.
            const int query = i0 + nt * 8 + 2 * c + (e & 1), key = key0 + km * 16 + (e >> 1) * 8;
            if (key > query + offset || key >= s.t_k) p = 0.f;
          }
          st[km][nt][e] = p;
          dpt[km][nt][e] = p * (dpt[km][nt][e] - (e & 1 ? delta.y : delta.x));
        }
    }

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
  auto plain = [&](int i0) { return i0 + offset >= n0 + BN - 1 && i0 + BM <= s.t_q && n0 + BN <= s.t_k; };
  auto advance = [&](int i0) { return i0 + BM < s.t_q ? i0 + BM : first_query; };  // the next head starts over
  for (int it = 0; it < tiles;) {
    for (; it < tiles && !plain(next_i0); ++it, next_i0 = advance(next_i0)) step(it, next_i0, std::true_type{});
    for (; it < tiles && plain(next_i0); ++it, next_i0 = advance(next_i0)) step(it, next_i0, std::false_type{});
  }

#pragma unroll
  for (int r = 0; r < 2 * KT; ++r) {
    const int key = key0 + r * 8, km = r / 2, h = r % 2;
    if (key >= s.t_k) continue;
    const int64_t row = (int64_t(b) * s.kv_heads + kv_head) * s.t_k + key;
    if (a.dkv_splits > 1) {  // this block's share of the group, unscaled, in fp32
      const int64_t rows = int64_t(s.batch) * s.kv_heads * s.t_k;
      float* dk_part = a.dkv_partial + ((2 * int64_t(blockIdx.z)) * rows + row) * D;
      float* dv_part = dk_part + rows * D;
#pragma unroll
      for (int dt = 0; dt < DTILES; ++dt) {
        *reinterpret_cast<float2*>(dk_part + dt * 8 + 2 * c) = make_float2(dk[km][dt][2 * h], dk[km][dt][2 * h + 1]);
        *reinterpret_cast<float2*>(dv_part + dt * 8 + 2 * c) = make_float2(dv[km][dt][2 * h], dv[km][dt][2 * h + 1]);
      }
      continue;
    }
    T* dk_out = static_cast<T*>(a.dk) + row * D;
    T* dv_out = static_cast<T*>(a.dv) + row * D;
#pragma unroll
    for (int dt = 0; dt < DTILES; ++dt) {
      *reinterpret_cast<uint32_t*>(dk_out + dt * 8 + 2 * c) =
          pack2<T>(dk[km][dt][2 * h] * a.scale, dk[km][dt][2 * h + 1] * a.scale);
      *reinterpret_cast<uint32_t*>(dv_out + dt * 8 + 2 * c) = pack2<T>(dv[km][dt][2 * h], dv[km][dt][2 * h + 1]);
    }
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
// otherwise weigh on its few products; 32 above, for registers.
template <int D>
__host__ __device__ constexpr int dq_key_tile() {
  return D <= 32 ? 64 : 32;
}

template <typename T, int D>
__host__ __device__ constexpr int dq_shared_bytes() {  // [Q, dO when held there] and two buffers of (K, V)
  return ((dq_row_tiles<D>() == 2 ? 2 * 128 : 0) + 4 * dq_key_tile<D>()) * (D + 8) * int(sizeof(T));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(AttentionBackward a) {
  constexpr int MT = dq_row_tiles<D>(), BM = 4 * 16 * MT, BN = dq_key_tile<D>();
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
  auto load_key_tile = [&](int j) {
    T* k_tile = kv_s + j % 2 * 2 * BN * STRIDE;
    load_tile_async<T, BN, D, STRIDE, kThreads>(k_tile, a.k, a.k_stride, b, kv_head, j * BN, key_end);
    load_tile_async<T, BN, D, STRIDE, kThreads>(k_tile + BN * STRIDE, a.v, a.v_stride, b, kv_head, j * BN, key_end);
  };
  load_key_tile(0);
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
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 2 * mt + (e >> 1);
          float p = exp2_approx(fmaf(sc[mt][nt][e], scale2, -lse2[r]));
          if constexpr (decltype(masked)::value) {
            const int key = n0 + nt * 8 + 2 * c + (e & 1);
            if (key >= key_end || key > query0 + r * 8 + offset) p = 0.f;
          }
          sc[mt][nt][e] = p * (dp[mt][nt][e] - delta[r]);
        }

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
  // Tiles below plain_tiles hold only keys that every query of the block sees.
  const int plain_tiles = min(key_end, m0 + offset + 1) / BN;
  int j = 0;
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

}  // namespace

int attention_backward_dkv_splits(const AttentionShape& s, DType dtype, void* stream) {
  if (dtype == DType::kFloat32) return 1;  // the CUDA-core backward is not split
  const int group = s.heads / s.kv_heads;
  int device = 0, sm_count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
  // Two waves of dk/dv blocks: an SM holds one block of the Hopper kernel, two of the mma.sync one
  // (on A100- and H100-class SMs; sm_86/89/120 fit one above D = 32, so there this asks for four).
  const bool hopper = hopper_takes(s.head_dim) && hopper_kernels_usable(static_cast<cudaStream_t>(stream));
  const int keys = hopper ? kHopperDkvKeys : dkv_block_keys(s.head_dim), per_sm = hopper ? 1 : 2;
  const int64_t blocks = int64_t(s.batch) * s.kv_heads * ((s.t_k + keys - 1) / keys), wanted = 2LL * per_sm * sm_count;
  // At most as many splits as the last key block (whose keys the fewest queries see) has query
  // tiles over the group, under either kernel's tiling (the launcher may yet fall back from the
  // Hopper kernel): every split of every block gets work (dkv_share).
  auto least_tiles = [&](int block_keys, int tile) {
    const int last_first_query = std::max(0, (s.t_k - 1) / block_keys * block_keys - (s.t_k - s.t_q));
    return int64_t(group) * ((s.t_q - last_first_query + tile - 1) / tile);
  };
  int64_t most = least_tiles(dkv_block_keys(s.head_dim), dkv_query_tile(s.head_dim));
  if (hopper_takes(s.head_dim)) most = std::min(most, least_tiles(kHopperDkvKeys, kHopperDkvQueries));
  return int(std::max<int64_t>(1, std::min((wanted + blocks - 1) / blocks, most)));
}

template <typename T, int D>
cudaError_t backward_tensor_cores(const AttentionBackward& a, cudaStream_t stream) {
  const AttentionShape& s = a.shape;
  if (!backward_dkv_hopper<T, D>(a, stream)) {
    constexpr int bytes = dkv_shared_bytes<T, D>();
    // Above 48 KB of dynamic shared memory a kernel must opt in.
    const cudaError_t err = cudaFuncSetAttribute(dkv_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
    const dim3 dkv_grid(s.batch * s.kv_heads, (s.t_k + dkv_block_keys(D) - 1) / dkv_block_keys(D), a.dkv_splits);
    dkv_kernel<T, D><<<dkv_grid, kThreads, bytes, stream>>>(a);
  }
  if (a.dkv_splits > 1) {
    const int64_t n = int64_t(s.batch) * s.kv_heads * s.t_k * D;
    const int blocks = int((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
    dkv_reduce_kernel<T><<<blocks, 256, 0, stream>>>(a.dkv_partial, a.dkv_splits, n, a.scale, static_cast<T*>(a.dk),
                                                      static_cast<T*>(a.dv));
  }
  if (backward_dq_hopper<T, D>(a, stream)) return cudaSuccess;
  constexpr int dq_bytes = dq_shared_bytes<T, D>(), dq_rows = 4 * 16 * dq_row_tiles<D>();
  const cudaError_t dq_err = cudaFuncSetAttribute(dq_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_bytes);
  if (dq_err != cudaSuccess) return dq_err;
  dq_kernel<T, D><<<dim3(s.batch * s.heads, (s.t_q + dq_rows - 1) / dq_rows), kThreads, dq_bytes, stream>>>(a);
  return cudaSuccess;
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
