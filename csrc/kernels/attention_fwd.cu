// Causal attention forward on tensor cores (fp16, bf16), and the forward's dispatch.
//
// Tiling (FlashAttention-2's forward). A block of 4 warps owns 128 queries of one head, 32 per
// warp (two 16-row mma tiles, so every K and V fragment read from shared memory feeds two
// products). Two blocks share an SM, so one block's softmax overlaps the other's tensor work.
// Each K/V tile read from L2 serves 128 queries: with 64 the loads, at about 32 FLOP per byte,
// would bound the speed before the tensor cores. The block walks N-key tiles of K and V (N from
// block_n(): as many as fit in registers beside the output; cp.async into padded shared memory:
// 8 ldmatrix rows then fall in distinct banks) up to the last key its last query sees, so
// causal masking halves the work. Per tile and warp:
//   S = Q K^T            mma.sync m16n8k16, fp32 accumulators (32 x N scores); Q is re-read
//                        from shared memory (in registers it would not leave room for O at D 128)
//   online softmax       running row max m (of the raw scores) and sum l in fp32; exponentials
//                        in base 2 with the scale folded in: p = 2^(s * scale log2e - m')
//   O = O * alpha + P V  P goes from C to A fragments in registers (see attention.cuh)
// V(j) loads while S(j) is computed, K(j+1) while softmax(j) and P(j) V(j) run: two barriers
// per tile. Tiles that cross the causal diagonal or the end of the keys (a few: up to four at
// D = 128) run a masked copy of the loop body; the others carry no masking code. With a pattern
// (first_key, kernels.h) the block starts at the tile of its first query's first key, so tiles
// wholly outside a document or a window are never read, and tiles below its last query's first
// key are masked too. Softcapping caps the scores of each tile as they come (in raw units, so the
// rest is unchanged); a sink joins l at the end. The output is normalised by l
// and written once through shared memory (whole rows, 16 bytes a thread); the log-sum-exp
// m + log(l) is kept for the backward. Blocks run longest-first (the last queries of every
// head first) so the tail of the grid is short.
#include <cuda_runtime.h>

#include <type_traits>

#include "attention.cuh"
#include "attention_launch.cuh"

namespace scratchformer {
namespace {

constexpr int kWarps = 4;
constexpr int kBlockM = 32 * kWarps;  // queries per block, 32 per warp
constexpr int kThreads = 32 * kWarps;

// Keys per tile: as many as fit in registers beside the output (found by compiling: one more
// 16-key step spills). A thread holds 32 x N / 32 = N scores and D outputs; a larger N spreads
// the per-tile work (rescaling the output, row statistics, barriers) over more tensor-core
// instructions. PATTERN: the instance that takes first_key, softcap and sinks (a separate one, so
// that plain causal attention carries none of their code or registers), 16 keys fewer for them.
template <int D, bool PATTERN = false>
__host__ __device__ constexpr int block_n() {
  return PATTERN ? (D == 32 ? 112 : D == 64 ? 96 : D == 96 ? 32 : 48) : (D == 32 ? 128 : D == 64 ? 96 : D == 96 ? 80 : 48);
}

template <typename T, int D, bool PATTERN>
__host__ __device__ constexpr int forward_shared_bytes() {  // Q, K and V tiles
  return (kBlockM + 2 * block_n<D, PATTERN>()) * (D + 8) * int(sizeof(T));
}

template <typename T, int D, bool PATTERN>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(AttentionForward a) {
  constexpr int STRIDE = D + 8;  // elements per shared row
  constexpr int kBlockN = block_n<D, PATTERN>();
  const int* first_key = PATTERN ? a.first_key : nullptr;  // nullptr: the pattern's code folds away
  constexpr int KSLABS = D / 16, DTILES = D / 8, NTILES = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);  // [kBlockM][STRIDE]
  T* k_s = q_s + kBlockM * STRIDE;      // [kBlockN][STRIDE]
  T* v_s = k_s + kBlockN * STRIDE;      // [kBlockN][STRIDE]

  const AttentionShape& s = a.shape;
  // Blocks start in blockIdx order, x fastest: every head's longest (last) query tile first, so
  // the short diagonal tiles fill the tail of the last wave.
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;
  const int b = blockIdx.x / s.heads, h = blockIdx.x % s.heads;
  const int kv_head = h / (s.heads / s.kv_heads);
  const int offset = s.t_k - s.t_q;
  // Warp w owns queries m0 + 32 w .. + 31 and reads (and at the end writes) only those rows of
  // q_s. Lane l's rows: m0 + 32 w + l / 4 + 8 r, r < 4 (m tile r / 2, C fragment half r % 2).

  const float scale2 = a.scale * kLog2e;
  const int key_end = min(s.t_k, min(m0 + kBlockM, s.t_q) + offset);  // past the last query's last key
  // Tiles below `plain_end` hold only keys every query of the block sees on the causal side: no
  // masking from `low_end` (where the last query's first key is) on.
  const int plain_end = min(key_end, m0 + offset + 1) / kBlockN * kBlockN;
  const int key_begin = first_key_of(first_key, s, b, m0) / kBlockN * kBlockN;
  const int low_end = first_key_of(first_key, s, b, min(m0 + kBlockM, s.t_q) - 1);

  // The K and V heads' row 0, kept in shared memory: the loop's registers go to the accumulators.
  __shared__ const T* kv_head_rows[2];
  if (threadIdx.x == 0) {
    kv_head_rows[0] = row_ptr<T>(a.k, a.k_stride, b, kv_head, 0);
    kv_head_rows[1] = row_ptr<T>(a.v, a.v_stride, b, kv_head, 0);
  }
  // And the block's first keys (the first step's barrier publishes them).
  __shared__ int first_key_s[PATTERN ? kBlockM : 1];
  if (PATTERN && threadIdx.x < kBlockM) first_key_s[threadIdx.x] = first_key_of(first_key, s, b, m0 + threadIdx.x);
  load_tile_async<T, kBlockM, D, STRIDE, kThreads>(q_s, a.q, a.q_stride, b, h, m0, s.t_q);
  load_tile_async<T, kBlockN, D, STRIDE, kThreads>(k_s, a.k, a.k_stride, b, kv_head, key_begin, key_end);
  cp_async_commit();

  float o[2][DTILES][4] = {};                                     // [m tile][d tile]
  float m_row[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};  // max raw score of row r so far
  float l_row[4] = {0.f, 0.f, 0.f, 0.f};                          // its sum over this thread's columns

  // One K/V tile at n0: S = Q K^T, masking (when `masked`), online softmax, O += P V.
  auto step = [&](int n0, auto masked) {
    cp_async_wait<0>();  // K(j) has landed
    __syncthreads();     // for every thread; and every warp is done with V(j - 1)
    load_rows_async<T, kBlockN, D, STRIDE, kThreads>(v_s, kv_head_rows[1], a.v_stride.time, n0, key_end);
    cp_async_commit();

    // This thread's ldmatrix rows: of its warp's Q rows (A fragments), of K and of V (B
    // fragments). Derived afresh each tile: held through the loop they would cost registers.
    const int tid = special_register_tid_x(), lane = tid % 32, mi = lane / 8;
    const T* q_ld = q_s + (tid / 32 * 32 + lane % 16) * STRIDE + (lane / 16) * 8;
    const T* k_ld = k_s + ((mi / 2) * 8 + lane % 8) * STRIDE + (mi % 2) * 8;
    const T* v_ld = v_s + ((mi % 2) * 8 + lane % 8) * STRIDE + (mi / 2) * 8;

    float sc[2][NTILES][4] = {};
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) {
      uint32_t qf[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(qf[mt], q_ld + mt * 16 * STRIDE + kk * 16);
#pragma unroll
      for (int nt = 0; nt < NTILES; nt += 2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, k_ld + nt * 8 * STRIDE + kk * 16);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(sc[mt][nt], qf[mt], kf[0], kf[1]);
          mma_16816<T>(sc[mt][nt + 1], qf[mt], kf[2], kf[3]);
        }
      }
    }

    cp_async_wait<0>();  // V(j) has landed
    __syncthreads();     // for every thread; and every warp is done with K(j)
    if (n0 + kBlockN < key_end) load_rows_async<T, kBlockN, D, STRIDE, kThreads>(k_s, kv_head_rows[0], a.k_stride.time, n0 + kBlockN, key_end);
    cp_async_commit();   // (an empty group after the last tile)

    if (PATTERN && a.softcap > 0.f) {  // capped in raw units: the max, masking and softmax below are unchanged
      const Softcap cap = Softcap::in_units(a.softcap, a.scale);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[mt][nt][e] = cap.apply(sc[mt][nt][e]);
    }

    if constexpr (decltype(masked)::value) {  // keys past the end, past a query's diagonal or before its first key
      // This thread's first query, derived here afresh: held through S it would cost registers.
      const int tid = special_register_tid_x();
      const int row = tid / 32 * 32 + tid % 32 / 4, first = m0 + row, column = 2 * (tid % 4);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        // Row r sees the columns nt * 8 + e from `from` up to below `seen` of this tile.
        const int seen = min(key_end, first + 8 * r + offset + 1) - n0 - column;
        const int from = PATTERN ? first_key_s[row + 8 * r] - n0 - column : 0;
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (nt * 8 + e >= seen || (PATTERN && nt * 8 + e < from)) sc[r / 2][nt][2 * (r % 2) + e] = -INFINITY;
      }
    }

    // Online softmax: rescale what was accumulated by 2^((m_old - m_new) scale log2e). P is
    // packed to T as soon as it is known (A fragments, see attention.cuh): half the registers.
    uint32_t pa[2][kBlockN / 16][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = 2 * mt + hf;
        float mx = m_row[r];
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) mx = fmaxf(mx, fmaxf(sc[mt][nt][2 * hf], sc[mt][nt][2 * hf + 1]));
        mx = quad_max(mx);
        // Finite on plain tiles. A masked tile may hide every key from a row that has seen none
        // yet (one before its first key): then nothing is added (2^-inf = 0), and no inf - inf.
        const float shift = PATTERN && decltype(masked)::value && mx == -INFINITY ? 0.f : -mx * scale2;
        const float alpha = exp2_approx(fmaf(m_row[r], scale2, shift));
        m_row[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
          sc[mt][nt][2 * hf] = exp2_approx(fmaf(sc[mt][nt][2 * hf], scale2, shift));
          sc[mt][nt][2 * hf + 1] = exp2_approx(fmaf(sc[mt][nt][2 * hf + 1], scale2, shift));
          sum += sc[mt][nt][2 * hf] + sc[mt][nt][2 * hf + 1];
        }
        l_row[r] = fmaf(l_row[r], alpha, sum);  // this thread's columns; the quad's sum comes at the end
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
          o[mt][dt][2 * hf] *= alpha;
          o[mt][dt][2 * hf + 1] *= alpha;
        }
      }
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks) c_to_a<T>(pa[mt][ks], sc[mt][2 * ks], sc[mt][2 * ks + 1]);
    }

#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
#pragma unroll
      for (int dt = 0; dt < DTILES; dt += 2) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, v_ld + ks * 16 * STRIDE + dt * 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(o[mt][dt], pa[mt][ks], vf[0], vf[1]);
          mma_16816<T>(o[mt][dt + 1], pa[mt][ks], vf[2], vf[3]);
        }
      }
    }
  };
  int n0 = key_begin;
  for (; n0 < low_end; n0 += kBlockN) step(n0, std::true_type{});
  for (; n0 < plain_end; n0 += kBlockN) step(n0, std::false_type{});
  for (; n0 < key_end; n0 += kBlockN) step(n0, std::true_type{});

  // Normalise, stage the warp's 32 rows in its own rows of q_s, then write whole rows. The
  // indices are derived afresh from the special registers: holding them through the loop
  // would take registers the loop needs.
  {
    const int lane = special_register_tid_x() % 32, warp = special_register_tid_x() / 32;
    const int g = lane / 4, c = lane % 4;
    const int warp_query0 = (gridDim.y - 1 - blockIdx.y) * kBlockM + warp * 32, query0 = warp_query0 + g;
    T* q_warp = reinterpret_cast<T*>(smem) + warp * 32 * STRIDE;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int mt = r / 2, hf = r % 2;
      // The row's max in log2 units, and its sum (at least 1: every query sees its own position).
      float top = m_row[r] * a.scale * kLog2e, l = quad_sum(l_row[r]), corr = 1.f;
      if (PATTERN && a.sinks != nullptr) {  // the sink joins the sum, everything rescaled to the larger of max and sink
        const float sink = a.sinks[blockIdx.x % s.heads] * kLog2e, both = fmaxf(top, sink);
        corr = exp2_approx(top - both);
        l = fmaf(l, corr, exp2_approx(sink - both));
        top = both;
      }
      const float inv = __fdividef(corr, l);
      T* staged = q_warp + (mt * 16 + hf * 8 + g) * STRIDE;
#pragma unroll
      for (int dt = 0; dt < DTILES; ++dt)
        *reinterpret_cast<uint32_t*>(staged + dt * 8 + 2 * c) =
            pack2<T>(o[mt][dt][2 * hf] * inv, o[mt][dt][2 * hf + 1] * inv);
      const int query = query0 + 8 * r;
      if (c == 0 && query < s.t_q)
        a.lse[int64_t(blockIdx.x) * s.t_q + query] = (top + log2f(l)) * kLn2;
    }
    __syncwarp();
    constexpr int ELEMS = 16 / int(sizeof(T)), CHUNKS = D / ELEMS;
    T* out = static_cast<T*>(a.out) + (int64_t(blockIdx.x) * s.t_q + warp_query0) * D;  // blockIdx.x = b * heads + h
    const int rows = min(32, s.t_q - warp_query0);
#pragma unroll
    for (int i = lane; i < 32 * CHUNKS; i += 32) {
      const int r = i / CHUNKS, chunk = i % CHUNKS;
      if (r < rows)
        *reinterpret_cast<Pack<T, ELEMS>*>(out + r * D + chunk * ELEMS) =
            *reinterpret_cast<const Pack<T, ELEMS>*>(q_warp + r * STRIDE + chunk * ELEMS);
    }
  }
}

template <typename T, int D, bool PATTERN>
void forward_launch(const AttentionForward& a, cudaStream_t stream) {
  constexpr int bytes = forward_shared_bytes<T, D, PATTERN>();
  // Above 48 KB of dynamic shared memory a kernel must opt in.
  if (cudaFuncSetAttribute(forward_kernel<T, D, PATTERN>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    return;  // the launcher's cudaGetLastError reports it
  const dim3 grid(a.shape.batch * a.shape.heads, (a.shape.t_q + kBlockM - 1) / kBlockM);
  forward_kernel<T, D, PATTERN><<<grid, kThreads, bytes, stream>>>(a);
}

}  // namespace

template <typename T, int D>
void forward_tensor_cores(const AttentionForward& a, cudaStream_t stream) {
  if (patterned(a))
    forward_launch<T, D, true>(a, stream);
  else
    forward_launch<T, D, false>(a, stream);
}

#define SCRATCHFORMER_FORWARD(T, D) template void forward_tensor_cores<T, D>(const AttentionForward&, cudaStream_t);
SCRATCHFORMER_FOR_EACH_TENSOR_CORE_TYPE(SCRATCHFORMER_FORWARD)

bool attention_head_dim_supported(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128;
}

int attention_forward_splits(const AttentionShape& shape, DType) {
  if (shape.t_q > kDecodeMaxQueries) return 1;
  int sm_count = 0;
  if (!device_attribute(cudaDevAttrMultiProcessorCount, &sm_count)) return 1;
  return forward_simt_splits(shape, sm_count);
}

const char* launch_attention_forward(const AttentionForward& a, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  const bool supported = dispatch_attention(a.dtype, a.shape.head_dim, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    if constexpr (std::is_same_v<T, float>) {
      forward_simt<T, D>(a, st);
    } else {
      if (a.shape.t_q <= kDecodeMaxQueries)
        forward_simt<T, D>(a, st);
      else if (!forward_hopper<T, D>(a, st))
        forward_tensor_cores<T, D>(a, st);
    }
  });
  if (!supported) return "unsupported dtype or head dim";
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace scratchformer
