// Causal attention on Hopper (sm_90a, fp16/bf16, D 64 and 128): wgmma, bulk tensor copies and
// warp specialisation, after FlashAttention-3's design. The forward first, then the backward's
// dk/dv and dq kernels (further down, each with its own tiling note).
//
// Forward. A block of three warpgroups owns 128 queries of one head. Warpgroup 0 is the producer: one of
// its threads issues the bulk tensor copies (TMA) of the Q tile and of each 128-key K and V tile
// into a ring of kStages shared-memory stages, each completing on its "full" mbarrier; it gives
// its registers to the others (setmaxnreg). Warpgroups 1 and 2 are the consumers, 64 query rows
// each: per key tile
//   S = Q K^T         wgmma m64n128k16 from shared memory (Q and K K-major, 128-byte swizzle)
//   online softmax    in registers, as the mma.sync kernel (exp2 with the scale folded in);
//                     masking only on tiles that cross the causal diagonal or the keys' end
//   O = O alpha + P V wgmma m64nDk16, P from registers (the accumulator layout is, value for
//                     value, the A-register layout), V from shared memory MN-major
// and release the stage through its "empty" mbarrier (one arrival per consumer warp), which the
// producer waits for before refilling it. Tiles past a sequence's end are zero-filled by the
// copy engine, so loads need no bounds code. Shared tiles are 64-column panels (128 bytes per
// row, the swizzle's span) side by side: one copy box each, and a descriptor start address
// that steps 32 bytes per 16 columns inside a panel.
// Within a consumer, S(j) is issued together with P(j - 1) V(j - 1), and the softmax of S(j)
// runs while the tensor cores finish P(j - 1) V(j - 1); the two consumers take turns issuing
// (named barriers: ping-pong), so that one's softmax also overlaps the other's products. The
// output leaves through ordinary stores (FlashAttention-3 stages it for a bulk copy).
//
// Patterns (first_key, kernels.h), softcapping and sinks: each kernel has an instance that takes
// them (PATTERN; plain causal attention compiles as before). A block's walk starts at the tile of
// its first query's first key, so whole tiles outside a document or a window are never copied in;
// the ring's stages and parities count from that first tile, in producer and consumers alike.
// Tiles below the last query's first key are masked too; a dk/dv block walks only the queries up
// to the last one that sees one of its keys (the producer's second warp stages their first keys
// beside lse and delta), and one that no query sees loads nothing and writes zeros. Scores are
// capped in raw units as each tile comes (dS takes the cap's derivative); a sink joins l at the end.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "attention.cuh"
#include "attention_launch.cuh"
#include "hopper.cuh"

namespace scratchformer {
namespace {

constexpr int kConsumers = 2;               // warpgroups computing, 64 query rows each
constexpr int kHopperThreads = 128 * (kConsumers + 1);
constexpr int kHopperBlockM = 64 * kConsumers;
constexpr int kHopperBlockN = 128;          // keys per tile
constexpr int kStages = 2;
constexpr int kPanel = 64;                  // columns per shared panel: 128 bytes of 16-bit values

// Shared memory: the mbarriers in the first 1 KB, then (1024-aligned) Q and the K and V stages.
template <int D>
__host__ __device__ constexpr int hopper_tile_bytes(int rows) {
  return rows * D * 2;
}
template <int D>
__host__ __device__ constexpr int hopper_shared_bytes() {
  // 2 KB: the barriers, and room to align the tiles to 1024 bytes wherever the buffer starts.
  return 2048 + hopper_tile_bytes<D>(kHopperBlockM) + 2 * kStages * hopper_tile_bytes<D>(kHopperBlockN);
}

#if !defined(__CUDA_ARCH__) || defined(SCRATCHFORMER_SM90A)
// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"), 128-byte swizzle, addresses in
// 16-byte units. K-major: rows 128 bytes apart, 8-row groups 1024 apart (stride byte offset);
// the leading byte offset is unused there (1 by convention).
__device__ __forceinline__ uint64_t k_major_descriptor(uint32_t address) {
  return uint64_t((address >> 4) & 0x3fff) | uint64_t(1) << 16 | uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;
}
// MN-major: 8 k rows of 128 bytes (64 MN values) form 1024-byte groups, consecutive along k
// (stride byte offset 1024); the next 64 MN values are a panel further (leading byte offset).
__device__ __forceinline__ uint64_t mn_major_descriptor(uint32_t address, uint32_t panel_bytes) {
  return uint64_t((address >> 4) & 0x3fff) | uint64_t((panel_bytes >> 4) & 0x3fff) << 16 | uint64_t(1024 >> 4) << 32 |
         uint64_t(1) << 62;
}

// A tile of `rows` rows (from row0 of a head of a batch) and D columns into 64-column panels at
// dst, one bulk copy per panel, completing on bar.
template <int D>
__device__ __forceinline__ void load_panels(unsigned char* dst, const CUtensorMap* map, uint64_t* bar, int rows, int row0,
                                            int head, int batch) {
#pragma unroll
  for (int p = 0; p < D / kPanel; ++p) tma_load_4d(dst + p * rows * 128, map, bar, p * kPanel, row0, head, batch);
}

// acc (64 x N) = A B^T over D columns: A's 64 rows start at shared address a in panels of a_rows
// rows, B's N rows at b in panels of b_rows rows (both K-major). Issued, not waited for.
template <typename T, int N, int D>
__device__ __forceinline__ void product_over_d(float (&acc)[N / 2], uint32_t a, int a_rows, uint32_t b, int b_rows) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t step = (kk % 4) * 32;  // 16 columns further inside the panel
    wgmma_ss<T, N, false>(acc, k_major_descriptor(a + (kk / 4) * a_rows * 128 + step),
                          k_major_descriptor(b + (kk / 4) * b_rows * 128 + step), kk > 0);
  }
}

// acc (64 x D) += A B: A's 16-column slabs in registers, B's rows (as many as A has columns) at
// shared address b, MN-major in panels of `rows` rows. Issued, not waited for.
template <typename T, int D, int SLABS>
__device__ __forceinline__ void accumulate_product(float (&acc)[D / 2], const uint32_t (&a)[SLABS][4], uint32_t b, int rows) {
#pragma unroll
  for (int ks = 0; ks < SLABS; ++ks) wgmma_rs<T, D, true>(acc, a[ks], mn_major_descriptor(b + ks * 16 * 128, rows * 128), true);
}

// Ping-pong: the two consumer warpgroups take turns issuing products (named barriers 1 and 2), so
// that while one works on registers (softmax, gradients of the scores) the other's products keep
// the tensor cores busy. Consumer 0 goes first; every turn but consumer 1's last hands over, so
// the barriers balance.
struct PingPong {
  int group, turns, turn = 0;
  __device__ PingPong(int group_, int turns_) : group(group_), turns(turns_) {
    if (group == 1 && turns > 0) named_barrier_arrive(1, 256);  // a block without work takes no turns
  }
  __device__ void take() { named_barrier_sync(1 + group, 256); }
  __device__ void hand_over() {
    if (++turn < turns || group == 0) named_barrier_arrive(2 - group, 256);
  }
};

// The backward's score products: x = A1 B1^T and y = A2 B2^T over D (as product_over_d; A's in
// panels of a_rows rows, B's of b_rows), issued in this warpgroup's turn and waited for.
template <typename T, int N, int D>
__device__ __forceinline__ void score_products(PingPong& turns, float (&x)[N / 2], uint32_t a1, uint32_t b1,
                                               float (&y)[N / 2], uint32_t a2, uint32_t b2, int a_rows, int b_rows) {
  turns.take();
  wgmma_fence_operand(x);
  wgmma_fence_operand(y);
  wgmma_fence();
  product_over_d<T, N, D>(x, a1, a_rows, b1, b_rows);
  product_over_d<T, N, D>(y, a2, a_rows, b2, b_rows);
  wgmma_commit();
  turns.hand_over();
  wgmma_wait<0>();
  wgmma_fence_operand(x);
  wgmma_fence_operand(y);
}
#endif

// 1 in the sm_90a image of this file, 0 in any other GPU image: which one the device loaded
// says whether the wgmma kernel can run there.
#if !defined(__CUDA_ARCH__) || defined(SCRATCHFORMER_SM90A)
__device__ int hopper_image = 1;
#else
__device__ int hopper_image = 0;
#endif

struct HopperParams {
  AttentionShape shape;
  float scale;
  void* out;
  float* lse;
  const int* first_key;  // as AttentionForward's (the PATTERN instance reads these three)
  float softcap;
  const float* sinks;
};

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kHopperThreads, 1)
    hopper_forward_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                          const __grid_constant__ CUtensorMap v_map, HopperParams a) {
#if defined(__CUDA_ARCH__) && !defined(SCRATCHFORMER_SM90A)
  __trap();  // built for another GPU: the launcher takes this kernel only on sm_90a builds
#else
  constexpr int BN = kHopperBlockN;
  constexpr int Q_BYTES = hopper_tile_bytes<D>(kHopperBlockM), KV_BYTES = hopper_tile_bytes<D>(BN);
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* k_full = q_full + 1;  // [kStages] each: full (data landed), empty (consumers done)
  uint64_t* v_full = k_full + kStages;
  uint64_t* k_empty = v_full + kStages;
  uint64_t* v_empty = k_empty + kStages;
  // The swizzle is a function of the shared address: tiles start on a 1024-byte boundary.
  const uint32_t base = smem_addr(smem);
  unsigned char* q_tile = smem + 1024 + (1024 - base % 1024) % 1024;
  unsigned char* k_tiles = q_tile + Q_BYTES;  // [kStages][D / 64][BN][128 bytes]
  unsigned char* v_tiles = k_tiles + kStages * KV_BYTES;

  const AttentionShape& s = a.shape;
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kHopperBlockM;  // longest rows first, over the whole grid
  const int b = blockIdx.x / s.heads, h = blockIdx.x % s.heads;
  const int kv_head = h / (s.heads / s.kv_heads);
  const int offset = s.t_k - s.t_q;
  const int key_end = min(s.t_k, min(m0 + kHopperBlockM, s.t_q) + offset);  // past the last query's last key
  const int tiles = (key_end + BN - 1) / BN;
  // Tiles below plain_tiles hold only keys every query of the block sees on the causal side. With
  // a pattern the walk starts at the tile of the first query's first key (first_tile; the ring's
  // stages and parities count from there), and keys below the last query's first key (low_end)
  // are masked too.
  const int plain_tiles = min(key_end, m0 + offset + 1) / BN;
  const int first_tile = first_key_of(first_key, s, b, m0) / BN;
  const int low_end = first_key_of(first_key, s, b, min(m0 + kHopperBlockM, s.t_q) - 1);

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&k_full[i], 1);
      mbarrier_init(&v_full[i], 1);
      mbarrier_init(&k_empty[i], 4 * kConsumers);  // one arrival per consumer warp
      mbarrier_init(&v_empty[i], 4 * kConsumers);
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // the producer
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(q_full, Q_BYTES);
      load_panels<D>(q_tile, &q_map, q_full, kHopperBlockM, m0, h, b);
      for (int j = first_tile; j < tiles; ++j) {
        const int stage = (j - first_tile) % kStages;
        const uint32_t parity = (((j - first_tile) / kStages) & 1) ^ 1;  // the first pass finds every stage empty
        mbarrier_wait(&k_empty[stage], parity);
        mbarrier_arrive_expect_tx(&k_full[stage], KV_BYTES);
        load_panels<D>(k_tiles + stage * KV_BYTES, &k_map, &k_full[stage], BN, j * BN, kv_head, b);
        mbarrier_wait(&v_empty[stage], parity);
        mbarrier_arrive_expect_tx(&v_full[stage], KV_BYTES);
        load_panels<D>(v_tiles + stage * KV_BYTES, &v_map, &v_full[stage], BN, j * BN, kv_head, b);
      }
    }
  } else {  // a consumer: 64 query rows
    setmaxnreg_inc<240>();
    const int t = threadIdx.x - 128 * (threadIdx.x / 128), group = threadIdx.x / 128 - 1;
    const int warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
    const int query0 = m0 + 64 * group + 16 * warp + g;  // this thread's rows: query0 and query0 + 8
    const float scale2 = a.scale * kLog2e;
    const uint32_t q_rows = smem_addr(q_tile) + 64 * group * 128;
    const int from[2] = {first_key_of(first_key, s, b, query0), first_key_of(first_key, s, b, query0 + 8)};  // rows' first keys

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
    mbarrier_wait(q_full, 0);

    // S(j) = Q K(j)^T into sc: 64 x 128 fp32. Register i: row g + 8 ((i / 2) % 2), key 8 (i / 4) + 2c + i % 2.
    float sc[BN / 2];
    uint32_t pa[BN / 16][4];  // P(j - 1) as A registers: 16-key slabs
    // The waits for K(j) and V(j) come before the wgmma.fence: a spin loop between the fence and
    // the products would make ptxas fence again inside it and serialise the wgmma (C7520).
    auto stage = [&](int j) { return (j - first_tile) % kStages; };
    auto wait_full = [&](uint64_t* full, int j) { mbarrier_wait(&full[stage(j)], ((j - first_tile) / kStages) & 1); };
    auto issue_s = [&](int j) {
      product_over_d<T, BN, D>(sc, q_rows, kHopperBlockM, smem_addr(k_tiles + stage(j) * KV_BYTES), BN);
      wgmma_commit();
    };
    // O += P(j) V(j): V's rows (keys) as k, its columns (d) as N, MN-major.
    auto issue_pv = [&](int j) {
      accumulate_product<T, D>(o, pa, smem_addr(v_tiles + stage(j) * KV_BYTES), BN);
      wgmma_commit();
    };
    auto fence_registers = [&] {  // before the products' issue
      wgmma_fence_operand(sc);
      wgmma_fence_operand(o);
#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) wgmma_fence_operand(pa[ks]);
      wgmma_fence();
    };
    PingPong turns(group, tiles - first_tile + 1);  // the first tile's S, each S(j) with P(j - 1) V(j - 1), the last P V

    // Online softmax of S(j) in place (sc becomes P(j), unnormalised); returns O's factor per row.
    // `masked`: keys past a query's diagonal, before its first key or past the end count as -inf.
    // Softcapping caps the raw scores first (in raw units: the rest is unchanged).
    auto softmax = [&](int j, auto masked, float (&alpha)[2]) {
      const int n0 = j * BN;
      if (PATTERN && a.softcap > 0.f) {
        const Softcap cap = Softcap::in_units(a.softcap, a.scale);
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) sc[i] = cap.apply(sc[i]);
      }
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        if constexpr (decltype(masked)::value) {
          const int key = n0 + 8 * (i / 4) + 2 * c + i % 2, r = (i / 2) % 2;
          if (key > query0 + 8 * r + offset || key >= s.t_k || (PATTERN && key < from[r])) sc[i] = -INFINITY;
        }
        tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], sc[i]);
      }
      float shift[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m_row[r], quad_max(tile_max[r]));
        // Finite on plain tiles (without a pattern key 0 is in tile 0). A masked tile may hide every
        // key from a row that has seen none yet (all before its first key): then nothing is added
        // (2^-inf = 0), and no inf - inf.
        const float top = PATTERN && decltype(masked)::value && m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = exp2_approx((m_row[r] - top) * scale2);
        shift[r] = top * scale2;
        m_row[r] = m_new;
        l_row[r] *= alpha[r];
      }
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        sc[i] = exp2_approx(fmaf(sc[i], scale2, -shift[(i / 2) % 2]));
        l_row[(i / 2) % 2] += sc[i];
      }
    };
    auto rescale_and_pack = [&](const float (&alpha)[2]) {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i / 2) % 2];
#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) {
        pa[ks][0] = pack2<T>(sc[8 * ks + 0], sc[8 * ks + 1]);
        pa[ks][1] = pack2<T>(sc[8 * ks + 2], sc[8 * ks + 3]);
        pa[ks][2] = pack2<T>(sc[8 * ks + 4], sc[8 * ks + 5]);
        pa[ks][3] = pack2<T>(sc[8 * ks + 6], sc[8 * ks + 7]);
      }
    };
    auto release = [&](uint64_t* empty, int j) {
      if (lane == 0) mbarrier_arrive(&empty[stage(j)]);
    };
    // Masked: tiles below the last query's first key, and from plain_tiles on.
    auto plain = [&](int j) { return j * BN >= low_end && j < plain_tiles; };

    // The first tile alone; then each step issues S(j) with P(j - 1) V(j - 1) and runs the softmax
    // of S(j) while the tensor cores finish P(j - 1) V(j - 1); the last P V closes.
    {
      wait_full(k_full, first_tile);
      turns.take();
      fence_registers();
      issue_s(first_tile);
      turns.hand_over();
      wgmma_wait<0>();
      wgmma_fence_operand(sc);
      release(k_empty, first_tile);
      float alpha[2];
      if (plain(first_tile))
        softmax(first_tile, std::false_type{}, alpha);
      else
        softmax(first_tile, std::true_type{}, alpha);
      rescale_and_pack(alpha);
    }
    auto step = [&](int j, auto masked) {
      wait_full(k_full, j);
      wait_full(v_full, j - 1);
      turns.take();
      fence_registers();
      issue_s(j);
      issue_pv(j - 1);
      turns.hand_over();
      wgmma_wait<1>();  // S(j) done; P(j - 1) V(j - 1) may still run
      wgmma_fence_operand(sc);
      release(k_empty, j);
      float alpha[2];
      softmax(j, masked, alpha);
      wgmma_wait<0>();
      wgmma_fence_operand(o);
#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) wgmma_fence_operand(pa[ks]);  // P(j - 1) is free to overwrite
      release(v_empty, j - 1);
      rescale_and_pack(alpha);
    };
    int j = first_tile + 1;
    if constexpr (PATTERN)
      for (; j < tiles && j * BN < low_end; ++j) step(j, std::true_type{});
    for (; j < plain_tiles; ++j) step(j, std::false_type{});
    for (; j < tiles; ++j) step(j, std::true_type{});
    wait_full(v_full, tiles - 1);
    turns.take();
    fence_registers();
    issue_pv(tiles - 1);
    turns.hand_over();
    wgmma_wait<0>();
    wgmma_fence_operand(o);
    release(v_empty, tiles - 1);

    // Normalise and write this thread's pairs of columns; the log-sum-exp per row.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = query0 + 8 * r;
      // The row's max in log2 units, and its sum (at least 1: every query sees its own position).
      float top = m_row[r] * scale2, l = quad_sum(l_row[r]), corr = 1.f;
      if (query >= s.t_q) continue;
      if (PATTERN && a.sinks != nullptr) {  // the sink joins the sum, everything rescaled to the larger of max and sink
        const float sink = a.sinks[h] * kLog2e, both = fmaxf(top, sink);
        corr = exp2_approx(top - both);
        l = fmaf(l, corr, exp2_approx(sink - both));
        top = both;
      }
      const float inv = __fdividef(corr, l);
      T* out = static_cast<T*>(a.out) + (int64_t(blockIdx.x) * s.t_q + query) * D;  // blockIdx.x = b * heads + h
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(out + 8 * dt + 2 * c) = pack2<T>(o[4 * dt + 2 * r] * inv, o[4 * dt + 2 * r + 1] * inv);
      if (c == 0) a.lse[int64_t(blockIdx.x) * s.t_q + query] = (top + log2f(l)) * kLn2;
    }
  }
#endif
}

// ---- backward: dk and dv -------------------------------------------------------------------------
//
// A block of three warpgroups owns 128 keys of one kv head (64 per consumer), with K and V in
// shared memory for the whole walk. The producer streams 64-query tiles of Q and dO (bulk tensor
// copies) and of the log-sum-exp and delta (its second warp, ordinary stores) through a
// two-stage ring, over every query head of the kv group from the first query that sees the
// block's first key (or the block's share of those tiles, dkv_share). Per tile and consumer:
//   S^T = K Q^T, dP^T = V dO^T      wgmma m64n64k16, all from shared memory (K-major)
//   P^T, dS^T = P^T (dP^T - delta)   in registers, masking only on diagonal and end tiles
//   dV += P^T dO, dK += dS^T Q       wgmma m64nDk16, P^T and dS^T from registers, dO and Q MN-major
// The two consumers take turns issuing S^T and dP^T (ping-pong). The kv group's sum stays in the
// accumulators: no atomics, gradients bitwise reproducible.
constexpr int kBwdKeys = kHopperDkvKeys;  // keys per dkv block: 64 per consumer
static_assert(kBwdKeys == 64 * kConsumers);
constexpr int kBwdQueries = kHopperDkvQueries;  // queries per tile

template <int D, bool PATTERN>
__host__ __device__ constexpr int hopper_dkv_shared_bytes() {
  // Barriers and alignment, K and V, two stages of Q and dO, two of lse and delta (and of the
  // queries' first keys with a pattern).
  return 2048 + 2 * hopper_tile_bytes<D>(kBwdKeys) + 2 * kStages * hopper_tile_bytes<D>(kBwdQueries) +
         (PATTERN ? 3 : 2) * kStages * kBwdQueries * 4;
}

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kHopperThreads, 1)
    hopper_dkv_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap do_map,
                      const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map,
                      AttentionBackward a) {
#if defined(__CUDA_ARCH__) && !defined(SCRATCHFORMER_SM90A)
  __trap();
#else
  constexpr int QSLABS = kBwdQueries / 16;
  constexpr int KV_BYTES = hopper_tile_bytes<D>(kBwdKeys), Q_BYTES = hopper_tile_bytes<D>(kBwdQueries);
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* q_full = kv_full + 1;  // [kStages]: Q, dO, lse and delta of a tile landed
  uint64_t* q_empty = q_full + kStages;
  const uint32_t base = smem_addr(smem);
  unsigned char* k_tile = smem + 1024 + (1024 - base % 1024) % 1024;  // [D / 64][kBwdKeys][128 bytes]
  unsigned char* v_tile = k_tile + KV_BYTES;
  unsigned char* q_tiles = v_tile + KV_BYTES;  // [kStages][D / 64][kBwdQueries][128 bytes]
  unsigned char* do_tiles = q_tiles + kStages * Q_BYTES;
  float* lse_s = reinterpret_cast<float*>(do_tiles + kStages * Q_BYTES);  // [kStages][kBwdQueries], log2 units
  float* delta_s = lse_s + kStages * kBwdQueries;
  int* first_key_s = reinterpret_cast<int*>(delta_s + kStages * kBwdQueries);  // [kStages][kBwdQueries] with a pattern

  const AttentionShape& s = a.shape;
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  const int group = s.heads / s.kv_heads;
  const int n0 = blockIdx.y * kBwdKeys;  // key tile 0 sees every query: the longest block first
  const int b = blockIdx.x / s.kv_heads, kv_head = blockIdx.x % s.kv_heads;
  const int offset = s.t_k - s.t_q;
  // From the first query that sees key n0 causally to q_end: with a pattern, queries from q_end on
  // see none of the block's keys, and those from plain_end on miss key n0 (their tiles are masked).
  const int first_query = max(0, n0 - offset);
  const int q_end = PATTERN ? first_query_past(first_key, s, b, first_query, min(n0 + kBwdKeys, s.t_k) - 1) : s.t_q;
  const int plain_end = PATTERN ? first_query_past(first_key, s, b, first_query, n0) : s.t_q;
  const int tiles_per_head = (q_end - first_query + kBwdQueries - 1) / kBwdQueries;
  // A pattern may leave a block without work: it loads nothing and writes zeros.
  const DkvShare share = dkv_share(group, PATTERN ? max(1, tiles_per_head) : tiles_per_head, first_query, kBwdQueries,
                                   blockIdx.z, a.dkv_splits);
  const int tiles = PATTERN && tiles_per_head == 0 ? 0 : share.tiles;  // this block's share of the group's query tiles

  if (threadIdx.x == 0) {
    mbarrier_init(kv_full, 1);
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&q_full[i], 2);              // the copies' thread and the lse/delta warp
      mbarrier_init(&q_empty[i], 4 * kConsumers);  // one arrival per consumer warp
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // the producer
    setmaxnreg_dec<24>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp > 1) return;
    int h = kv_head * group + share.head, i0 = share.i0;  // the next tile's head and first query
    if (threadIdx.x == 0 && (!PATTERN || tiles > 0)) {
      mbarrier_arrive_expect_tx(kv_full, 2 * KV_BYTES);
      load_panels<D>(k_tile, &k_map, kv_full, kBwdKeys, n0, kv_head, b);
      load_panels<D>(v_tile, &v_map, kv_full, kBwdKeys, n0, kv_head, b);
    }
    for (int it = 0; it < tiles; ++it) {
      const int stage = it % kStages;
      mbarrier_wait(&q_empty[stage], ((it / kStages) & 1) ^ 1);
      if (warp == 0) {
        if (lane == 0) {
          mbarrier_arrive_expect_tx(&q_full[stage], 2 * Q_BYTES);
          load_panels<D>(q_tiles + stage * Q_BYTES, &q_map, &q_full[stage], kBwdQueries, i0, h, b);
          load_panels<D>(do_tiles + stage * Q_BYTES, &do_map, &q_full[stage], kBwdQueries, i0, h, b);
        }
      } else {  // lse (in log2 units; +inf past the end, so P = 0 there) and delta
        for (int r = lane; r < kBwdQueries; r += 32) {
          const int query = i0 + r;
          const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + query;
          lse_s[stage * kBwdQueries + r] = query < s.t_q ? a.lse[row] * kLog2e : INFINITY;
          delta_s[stage * kBwdQueries + r] = query < s.t_q ? a.delta[row] : 0.f;
          if (PATTERN) first_key_s[stage * kBwdQueries + r] = first_key_of(first_key, s, b, query);
        }
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&q_full[stage]);
      }
      i0 += kBwdQueries;
      if (i0 >= (PATTERN ? q_end : s.t_q)) i0 = first_query, ++h;
    }
  } else {  // a consumer: 64 keys
    setmaxnreg_inc<240>();
    const int t = threadIdx.x % 128, cgroup = threadIdx.x / 128 - 1;
    const int warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
    const int key0 = n0 + 64 * cgroup + 16 * warp + g;  // this thread's rows: key0 and key0 + 8
    const float scale2 = a.scale * kLog2e;
    const uint32_t k_rows = smem_addr(k_tile) + 64 * cgroup * 128, v_rows = smem_addr(v_tile) + 64 * cgroup * 128;

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
    float st[kBwdQueries / 2], dpt[kBwdQueries / 2];  // S^T and dP^T: register i holds key row g + 8 ((i / 2) % 2), query 8 (i / 4) + 2c + i % 2
    uint32_t pa[QSLABS][4], dsa[QSLABS][4];
    PingPong turns(cgroup, tiles);  // around each tile's S^T and dP^T
    if (!PATTERN || tiles > 0) mbarrier_wait(kv_full, 0);

    // One query tile: `masked` zeroes P where a query does not see a key (diagonal and end tiles).
    auto step = [&](int it, int i0, auto masked) {
      const int stage = it % kStages;
      const uint32_t q_stage = smem_addr(q_tiles + stage * Q_BYTES), do_stage = smem_addr(do_tiles + stage * Q_BYTES);
      mbarrier_wait(&q_full[stage], (it / kStages) & 1);
      score_products<T, kBwdQueries, D>(turns, st, k_rows, q_stage, dpt, v_rows, do_stage, kBwdKeys, kBwdQueries);

      // P^T = 2^(S^T scale log2e - lse') and dS^T = P^T (dP^T - delta), packed as A registers
      // (dS^T times the cap's derivative with softcapping, the scores capped first).
      const float* lse = lse_s + stage * kBwdQueries;
      const float* delta = delta_s + stage * kBwdQueries;
      const int* from = first_key_s + stage * kBwdQueries;
      auto probabilities = [&](const auto& cap) {
#pragma unroll
        for (int i = 0; i < kBwdQueries / 2; i += 2) {
          const int col = 8 * (i / 4) + 2 * c;
          const float2 l2 = *reinterpret_cast<const float2*>(&lse[col]);
          const float2 d2 = *reinterpret_cast<const float2*>(&delta[col]);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float score = cap.apply(st[i + e]);
            float p = exp2_approx(fmaf(score, scale2, -(e ? l2.y : l2.x)));
            if constexpr (decltype(masked)::value) {
              const int key = key0 + 8 * ((i / 2) % 2), query = i0 + col + e;
              if (key > query + offset || key >= s.t_k || (PATTERN && key < from[col + e])) p = 0.f;
            }
            st[i + e] = p;
            dpt[i + e] = p * (dpt[i + e] - (e ? d2.y : d2.x)) * cap.derivative(score);
          }
        }
      };
      if (PATTERN && a.softcap > 0.f)
        probabilities(Softcap::in_units(a.softcap, a.scale));
      else
        probabilities(NoSoftcap{});
#pragma unroll
      for (int ks = 0; ks < QSLABS; ++ks) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          pa[ks][r] = pack2<T>(st[8 * ks + 2 * r], st[8 * ks + 2 * r + 1]);
          dsa[ks][r] = pack2<T>(dpt[8 * ks + 2 * r], dpt[8 * ks + 2 * r + 1]);
        }
      }

      // dV += P^T dO and dK += dS^T Q: the tile's queries as k, D as N (dO and Q MN-major).
      wgmma_fence_operand(dk);
      wgmma_fence_operand(dv);
#pragma unroll
      for (int ks = 0; ks < QSLABS; ++ks) {
        wgmma_fence_operand(pa[ks]);
        wgmma_fence_operand(dsa[ks]);
      }
      wgmma_fence();
      accumulate_product<T, D>(dv, pa, do_stage, kBwdQueries);
      accumulate_product<T, D>(dk, dsa, q_stage, kBwdQueries);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operand(dk);
      wgmma_fence_operand(dv);
#pragma unroll
      for (int ks = 0; ks < QSLABS; ++ks) {
        wgmma_fence_operand(pa[ks]);
        wgmma_fence_operand(dsa[ks]);
      }
      __syncwarp();  // every lane has read this stage's lse and delta before its release
      if (lane == 0) mbarrier_arrive(&q_empty[stage]);
    };
    // A tile needs no mask when every query in it sees every key of the block and all exist.
    auto plain = [&](int i0) {
      return i0 + offset >= n0 + kBwdKeys - 1 && i0 + kBwdQueries <= (PATTERN ? plain_end : s.t_q) && n0 + kBwdKeys <= s.t_k;
    };
    auto advance = [&](int i0) {  // the next head starts over
      return i0 + kBwdQueries < (PATTERN ? q_end : s.t_q) ? i0 + kBwdQueries : first_query;
    };
    // Runs of masked and of plain tiles, each its own loop (the plain one carries no masking code).
    int i0 = share.i0;
    for (int it = 0; it < tiles;) {
      for (; it < tiles && !plain(i0); ++it, i0 = advance(i0)) step(it, i0, std::true_type{});
      for (; it < tiles && plain(i0); ++it, i0 = advance(i0)) step(it, i0, std::false_type{});
    }

    // dK (times the scale) and dV, or this block's fp32 share of the group when split.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key0 + 8 * r;
      if (key >= s.t_k) continue;
      const int64_t row = (int64_t(b) * s.kv_heads + kv_head) * s.t_k + key;
      if (a.dkv_splits > 1) {
        const int64_t rows = int64_t(s.batch) * s.kv_heads * s.t_k;
        float* dk_part = a.dkv_partial + ((2 * int64_t(blockIdx.z)) * rows + row) * D;
        float* dv_part = dk_part + rows * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          *reinterpret_cast<float2*>(dk_part + 8 * dt + 2 * c) = make_float2(dk[4 * dt + 2 * r], dk[4 * dt + 2 * r + 1]);
          *reinterpret_cast<float2*>(dv_part + 8 * dt + 2 * c) = make_float2(dv[4 * dt + 2 * r], dv[4 * dt + 2 * r + 1]);
        }
        continue;
      }
      T* dk_out = static_cast<T*>(a.dk) + row * D;
      T* dv_out = static_cast<T*>(a.dv) + row * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(dk_out + 8 * dt + 2 * c) =
            pack2<T>(dk[4 * dt + 2 * r] * a.scale, dk[4 * dt + 2 * r + 1] * a.scale);
        *reinterpret_cast<uint32_t*>(dv_out + 8 * dt + 2 * c) = pack2<T>(dv[4 * dt + 2 * r], dv[4 * dt + 2 * r + 1]);
      }
    }
  }
#endif
}

// ---- backward: dq --------------------------------------------------------------------------------
//
// A block of three warpgroups owns 128 queries of one head (64 per consumer), with Q and dO in
// shared memory; the producer streams 64-key tiles of K and V through a two-stage ring up to the
// block's last visible key. Per tile and consumer:
//   S = Q K^T, dP = dO V^T       wgmma m64n64k16 from shared memory (K-major)
//   dS = P (dP - delta)          in registers, masking only on diagonal and end tiles
//   dQ += dS K                   wgmma m64nDk16, dS from registers, K MN-major
// The two consumers take turns issuing S and dP (ping-pong).
constexpr int kDqKeys = 64;  // keys per tile

template <int D>
__host__ __device__ constexpr int hopper_dq_shared_bytes() {
  return 2048 + 2 * hopper_tile_bytes<D>(kHopperBlockM) + 2 * kStages * hopper_tile_bytes<D>(kDqKeys);
}

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kHopperThreads, 1)
    hopper_dq_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap do_map,
                     const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map,
                     AttentionBackward a) {
#if defined(__CUDA_ARCH__) && !defined(SCRATCHFORMER_SM90A)
  __trap();
#else
  constexpr int BN = kDqKeys, NSLABS = BN / 16;
  constexpr int Q_BYTES = hopper_tile_bytes<D>(kHopperBlockM), KV_BYTES = hopper_tile_bytes<D>(BN);
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* kv_full = q_full + 1;  // [kStages]: K and V of a tile landed
  uint64_t* kv_empty = kv_full + kStages;
  const uint32_t base = smem_addr(smem);
  unsigned char* q_tile = smem + 1024 + (1024 - base % 1024) % 1024;  // [D / 64][128 rows][128 bytes]
  unsigned char* do_tile = q_tile + Q_BYTES;
  unsigned char* k_tiles = do_tile + Q_BYTES;  // [kStages][D / 64][BN][128 bytes]
  unsigned char* v_tiles = k_tiles + kStages * KV_BYTES;

  const AttentionShape& s = a.shape;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kHopperBlockM;  // longest rows first, over the whole grid
  const int b = blockIdx.x / s.heads, h = blockIdx.x % s.heads;
  const int kv_head = h / (s.heads / s.kv_heads);
  const int offset = s.t_k - s.t_q;
  const int key_end = min(s.t_k, min(m0 + kHopperBlockM, s.t_q) + offset);
  const int tiles = (key_end + BN - 1) / BN;
  const int plain_tiles = min(key_end, m0 + offset + 1) / BN;  // tiles every query of the block sees whole
  // With a pattern: from the tile of the first query's first key (the ring counts from there),
  // masked below the last query's first key too.
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  const int first_tile = first_key_of(first_key, s, b, m0) / BN;
  const int low_end = first_key_of(first_key, s, b, min(m0 + kHopperBlockM, s.t_q) - 1);

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&kv_full[i], 1);
      mbarrier_init(&kv_empty[i], 4 * kConsumers);
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // the producer
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(q_full, 2 * Q_BYTES);
      load_panels<D>(q_tile, &q_map, q_full, kHopperBlockM, m0, h, b);
      load_panels<D>(do_tile, &do_map, q_full, kHopperBlockM, m0, h, b);
      for (int j = first_tile; j < tiles; ++j) {
        const int stage = (j - first_tile) % kStages;
        mbarrier_wait(&kv_empty[stage], (((j - first_tile) / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(&kv_full[stage], 2 * KV_BYTES);
        load_panels<D>(k_tiles + stage * KV_BYTES, &k_map, &kv_full[stage], BN, j * BN, kv_head, b);
        load_panels<D>(v_tiles + stage * KV_BYTES, &v_map, &kv_full[stage], BN, j * BN, kv_head, b);
      }
    }
  } else {  // a consumer: 64 queries
    setmaxnreg_inc<240>();
    const int t = threadIdx.x % 128, cgroup = threadIdx.x / 128 - 1;
    const int warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
    const int query0 = m0 + 64 * cgroup + 16 * warp + g;  // this thread's rows: query0 and query0 + 8
    const float scale2 = a.scale * kLog2e;
    const uint32_t q_rows = smem_addr(q_tile) + 64 * cgroup * 128, do_rows = smem_addr(do_tile) + 64 * cgroup * 128;
    float lse2[2], delta[2];
    int from[2];  // the rows' first keys
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = query0 + 8 * r;
      const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + query;
      lse2[r] = query < s.t_q ? a.lse[row] * kLog2e : INFINITY;  // P = 0 past the end
      delta[r] = query < s.t_q ? a.delta[row] : 0.f;
      from[r] = first_key_of(first_key, s, b, query);
    }

    float dq[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
    float sc[BN / 2], dp[BN / 2];  // register i: query row g + 8 ((i / 2) % 2), key 8 (i / 4) + 2c + i % 2
    uint32_t dsa[NSLABS][4];
    PingPong turns(cgroup, tiles - first_tile);  // around each tile's S and dP
    mbarrier_wait(q_full, 0);

    auto step = [&](int j, auto masked) {
      const int stage = (j - first_tile) % kStages;
      const uint32_t k_stage = smem_addr(k_tiles + stage * KV_BYTES), v_stage = smem_addr(v_tiles + stage * KV_BYTES);
      mbarrier_wait(&kv_full[stage], ((j - first_tile) / kStages) & 1);
      score_products<T, BN, D>(turns, sc, q_rows, k_stage, dp, do_rows, v_stage, kHopperBlockM, BN);

      // dS = P (dP - delta), P = 2^(S scale log2e - lse'); masked tiles zero unseen keys. With
      // softcapping the scores are capped first and dS takes the cap's derivative.
      const int n0 = j * BN;
      auto probabilities = [&](const auto& cap) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) {
          const int r = (i / 2) % 2;
          const float score = cap.apply(sc[i]);
          float p = exp2_approx(fmaf(score, scale2, -lse2[r]));
          if constexpr (decltype(masked)::value) {
            const int key = n0 + 8 * (i / 4) + 2 * c + i % 2;
            if (key >= key_end || key > query0 + 8 * r + offset || (PATTERN && key < from[r])) p = 0.f;
          }
          sc[i] = p * (dp[i] - delta[r]) * cap.derivative(score);
        }
      };
      if (PATTERN && a.softcap > 0.f)
        probabilities(Softcap::in_units(a.softcap, a.scale));
      else
        probabilities(NoSoftcap{});
#pragma unroll
      for (int ks = 0; ks < NSLABS; ++ks)
#pragma unroll
        for (int q = 0; q < 4; ++q) dsa[ks][q] = pack2<T>(sc[8 * ks + 2 * q], sc[8 * ks + 2 * q + 1]);

      // dQ += dS K: the tile's keys as k, D as N (K MN-major).
      wgmma_fence_operand(dq);
#pragma unroll
      for (int ks = 0; ks < NSLABS; ++ks) wgmma_fence_operand(dsa[ks]);
      wgmma_fence();
      accumulate_product<T, D>(dq, dsa, k_stage, BN);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operand(dq);
#pragma unroll
      for (int ks = 0; ks < NSLABS; ++ks) wgmma_fence_operand(dsa[ks]);
      if (lane == 0) mbarrier_arrive(&kv_empty[stage]);
    };
    int j = first_tile;
    if constexpr (PATTERN)
      for (; j * BN < low_end; ++j) step(j, std::true_type{});
    for (; j < plain_tiles; ++j) step(j, std::false_type{});
    for (; j < tiles; ++j) step(j, std::true_type{});

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = query0 + 8 * r;
      if (query >= s.t_q) continue;
      T* out = static_cast<T*>(a.dq) + ((int64_t(b) * s.heads + h) * s.t_q + query) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(out + 8 * dt + 2 * c) =
            pack2<T>(dq[4 * dt + 2 * r] * a.scale, dq[4 * dt + 2 * r + 1] * a.scale);
    }
  }
#endif
}

// A rank-4 map over [B][H][T][D] (D innermost) with the tensor's element strides: 64-column
// boxes of `rows` rows, 128-byte swizzle.
const char* attention_tensor_map(CUtensorMap* map, const void* base, Strides st, int batch, int heads, int t, int d,
                                 int rows) {
  // A dimension of extent 1 may carry any stride (a view's); the copy engine wants multiples of
  // 16 bytes everywhere, so such a stride is replaced by one that is (it is never stepped along).
  const uint64_t time = t == 1 ? uint64_t(d) * 2 : uint64_t(st.time) * 2;
  const uint64_t head = heads == 1 ? time * t : uint64_t(st.head) * 2;
  const uint64_t whole = batch == 1 ? head * heads : uint64_t(st.batch) * 2;
  const uint64_t dims[4] = {uint64_t(d), uint64_t(t), uint64_t(heads), uint64_t(batch)};
  const uint64_t strides[3] = {time, head, whole};
  const uint32_t box[4] = {uint32_t(kPanel), uint32_t(rows), 1, 1};
  return make_tensor_map(map, base, 2, 4, dims, strides, box, TmaSwizzle::k128B);
}

}  // namespace

// Whether the current device runs this build's sm_90a image (asked once per device and process),
// unless SCRATCHFORMER_WGMMA=0 asks for the mma.sync kernels (read at every call: benchmarks
// compare the two in one process).
bool hopper_kernels_usable(cudaStream_t stream) {
  const char* wanted = std::getenv("SCRATCHFORMER_WGMMA");
  if (wanted && wanted[0] == '0') return false;
  static std::atomic<int> usable[64];  // 0: not asked yet, 1: yes, 2: no
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return false;
  if (!usable[device].load()) {
    // Reading the flag is a synchronous copy, which a stream being captured into a CUDA graph
    // refuses: then this call takes the mma.sync kernels and the question waits for a later one.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess || capturing != cudaStreamCaptureStatusNone) return false;
    int image = 0;
    bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major == 9;
    if (yes && cudaMemcpyFromSymbol(&image, hopper_image, sizeof(image)) != cudaSuccess) {
      cudaGetLastError();  // no loadable image for this device: the error is this probe's, not the caller's
      yes = false;
    }
    usable[device] = yes && image == 1 ? 1 : 2;
  }
  return usable[device].load() == 1;
}

// cudaFuncSetAttribute, leaving no error behind when it fails (the caller then takes another kernel).
template <typename Kernel>
bool allow_shared_bytes(Kernel kernel, int bytes) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess) return true;
  cudaGetLastError();
  return false;
}

template <typename T, int D, bool PATTERN>
bool forward_hopper_instance(const AttentionForward& a, cudaStream_t stream) {
  if constexpr (!hopper_takes(D)) {
    return false;
  } else {
    if (!hopper_kernels_usable(stream)) return false;
    const AttentionShape& s = a.shape;
    CUtensorMap q_map, k_map, v_map;
    if (attention_tensor_map(&q_map, a.q, a.q_stride, s.batch, s.heads, s.t_q, D, kHopperBlockM) ||
        attention_tensor_map(&k_map, a.k, a.k_stride, s.batch, s.kv_heads, s.t_k, D, kHopperBlockN) ||
        attention_tensor_map(&v_map, a.v, a.v_stride, s.batch, s.kv_heads, s.t_k, D, kHopperBlockN))
      return false;  // alignment or strides the copy engine does not take: the mma.sync kernel does
    constexpr int bytes = hopper_shared_bytes<D>();
    if (!allow_shared_bytes(hopper_forward_kernel<T, D, PATTERN>, bytes)) return false;
    const HopperParams p{s, a.scale, a.out, a.lse, a.first_key, a.softcap, a.sinks};
    const dim3 grid(s.batch * s.heads, (s.t_q + kHopperBlockM - 1) / kHopperBlockM);
    hopper_forward_kernel<T, D, PATTERN><<<grid, kHopperThreads, bytes, stream>>>(q_map, k_map, v_map, p);
    return true;
  }
}

// A pattern, softcapping or sinks: the kernel's instance that takes them (PATTERN).
template <typename T, int D>
bool forward_hopper(const AttentionForward& a, cudaStream_t stream) {
  return patterned(a) ? forward_hopper_instance<T, D, true>(a, stream) : forward_hopper_instance<T, D, false>(a, stream);
}

#define SCRATCHFORMER_HOPPER_FORWARD(T, D) template bool forward_hopper<T, D>(const AttentionForward&, cudaStream_t);
SCRATCHFORMER_FOR_EACH_TENSOR_CORE_TYPE(SCRATCHFORMER_HOPPER_FORWARD)

// The backward kernels' launch: Q and dO boxes of q_rows rows, K and V boxes of kv_rows rows.
template <typename Kernel>
bool launch_backward(Kernel kernel, int bytes, dim3 grid, int q_rows, int kv_rows, const AttentionBackward& a,
                     cudaStream_t stream) {
  const AttentionShape& s = a.shape;
  const int d = s.head_dim;
  CUtensorMap q_map, do_map, k_map, v_map;
  if (!hopper_kernels_usable(stream) || attention_tensor_map(&q_map, a.q, a.q_stride, s.batch, s.heads, s.t_q, d, q_rows) ||
      attention_tensor_map(&do_map, a.dout, a.dout_stride, s.batch, s.heads, s.t_q, d, q_rows) ||
      attention_tensor_map(&k_map, a.k, a.k_stride, s.batch, s.kv_heads, s.t_k, d, kv_rows) ||
      attention_tensor_map(&v_map, a.v, a.v_stride, s.batch, s.kv_heads, s.t_k, d, kv_rows) ||
      !allow_shared_bytes(kernel, bytes))
    return false;
  kernel<<<grid, kHopperThreads, bytes, stream>>>(q_map, do_map, k_map, v_map, a);
  return true;
}

// With a pattern or softcapping: the kernels' instance that takes them (PATTERN).
template <typename T, int D>
bool backward_dkv_hopper(const AttentionBackward& a, cudaStream_t stream) {
  if constexpr (!hopper_takes(D)) {
    return false;
  } else {
    const AttentionShape& s = a.shape;
    const dim3 grid(s.batch * s.kv_heads, (s.t_k + kBwdKeys - 1) / kBwdKeys, a.dkv_splits);
    if (patterned(a))
      return launch_backward(hopper_dkv_kernel<T, D, true>, hopper_dkv_shared_bytes<D, true>(), grid, kBwdQueries,
                             kBwdKeys, a, stream);
    return launch_backward(hopper_dkv_kernel<T, D, false>, hopper_dkv_shared_bytes<D, false>(), grid, kBwdQueries,
                           kBwdKeys, a, stream);
  }
}

#define SCRATCHFORMER_HOPPER_DKV(T, D) template bool backward_dkv_hopper<T, D>(const AttentionBackward&, cudaStream_t);
SCRATCHFORMER_FOR_EACH_TENSOR_CORE_TYPE(SCRATCHFORMER_HOPPER_DKV)

template <typename T, int D>
bool backward_dq_hopper(const AttentionBackward& a, cudaStream_t stream) {
  if constexpr (!hopper_takes(D)) {
    return false;
  } else {
    const AttentionShape& s = a.shape;
    const dim3 grid(s.batch * s.heads, (s.t_q + kHopperBlockM - 1) / kHopperBlockM);
    if (patterned(a))
      return launch_backward(hopper_dq_kernel<T, D, true>, hopper_dq_shared_bytes<D>(), grid, kHopperBlockM, kDqKeys, a,
                             stream);
    return launch_backward(hopper_dq_kernel<T, D, false>, hopper_dq_shared_bytes<D>(), grid, kHopperBlockM, kDqKeys, a,
                           stream);
  }
}

#define SCRATCHFORMER_HOPPER_DQ(T, D) template bool backward_dq_hopper<T, D>(const AttentionBackward&, cudaStream_t);
SCRATCHFORMER_FOR_EACH_TENSOR_CORE_TYPE(SCRATCHFORMER_HOPPER_DQ)

}  // namespace scratchformer
