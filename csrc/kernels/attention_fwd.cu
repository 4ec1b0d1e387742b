// Causal attention forward on tensor cores (fp16, bf16), and the forward's dispatch.
//
// Tiling (FlashAttention-2's forward). A block of 8 warps owns 128 queries of one head, 16 per
// warp; its Q tile stays in registers as mma A fragments. (Each K/V tile read from L2 serves 128
// queries: with 64 the loads, at about 32 FLOP per byte, would bound the speed before the
// tensor cores.) It walks 64-key tiles of K and V (cp.async into padded shared memory: 8
// ldmatrix rows then fall in distinct banks; the next K tile loads while this one's softmax and
// P V run) up to the last key its last query sees, so causal masking halves the work. Per tile and warp:
//   S = Q K^T            mma.sync m16n8k16, fp32 accumulators (16 x 64 scores)
//   online softmax       running row max m and sum l in fp32, log2 domain, 4-lane shuffles
//   O = O * alpha + P V  P goes from C to A fragments in registers (see attention.cuh)
// Masks are applied only to tiles that cross the causal diagonal or the end of the keys. The
// output is normalised by l and written once; the log-sum-exp m + log(l) is kept for the
// backward. Blocks run longest-first (the last queries of every head first) so the tail of the
// grid is short.
#include <cuda_runtime.h>

#include <type_traits>

#include "attention.cuh"
#include "attention_launch.cuh"

namespace scratchformer {
namespace {

constexpr int kWarps = 8;
constexpr int kBlockM = 16 * kWarps;  // queries per block, 16 per warp
constexpr int kBlockN = 64;           // keys per tile
constexpr int kThreads = 32 * kWarps;
static_assert(kBlockM == 2 * kBlockN, "the Q tile is staged through the K and V buffers");

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(AttentionForward a) {
  constexpr int STRIDE = D + 8;  // elements per shared row
  constexpr int KSLABS = D / 16, DTILES = D / 8, NTILES = kBlockN / 8;
  __shared__ __align__(16) T kv_s[2 * kBlockN * STRIDE];
  T* k_s = kv_s;
  T* v_s = kv_s + kBlockN * STRIDE;

  const AttentionShape& s = a.shape;
  // Blocks start in blockIdx order, x fastest: every head's longest (last) query tile first, so
  // the short diagonal tiles fill the tail of the last wave.
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;
  const int b = blockIdx.x / s.heads, h = blockIdx.x % s.heads;
  const int kv_head = h / (s.heads / s.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4, mi = lane / 8;  // mi: the ldmatrix matrix this lane addresses
  const int offset = s.t_k - s.t_q;
  const int query0 = m0 + warp * 16 + g;  // this thread's rows: query0 and query0 + 8

  // The Q tile, staged through k_s and v_s, into A fragments.
  load_tile_async<T, kBlockM, D, STRIDE, kThreads>(kv_s, a.q, a.q_stride, b, h, m0, s.t_q);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t q_frag[KSLABS][4];
#pragma unroll
  for (int kk = 0; kk < KSLABS; ++kk)
    ldmatrix_x4(q_frag[kk], &kv_s[(warp * 16 + lane % 16) * STRIDE + kk * 16 + (lane / 16) * 8]);

  const float scale2 = a.scale * kLog2e;
  const int key_end = min(s.t_k, min(m0 + kBlockM, s.t_q) + offset);  // past the last query's last key
  float o[DTILES][4] = {};
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};

  // Loads overlap compute: V(j) lands while S(j) is computed, K(j+1) while softmax(j) and
  // P(j) V(j) run. One buffer each suffices, with a barrier before each is refilled.
  __syncthreads();  // every warp has its Q fragments: the buffers may take K and V
  load_tile_async<T, kBlockN, D, STRIDE, kThreads>(k_s, a.k, a.k_stride, b, kv_head, 0, key_end);
  cp_async_commit();
  for (int n0 = 0; n0 < key_end; n0 += kBlockN) {
    load_tile_async<T, kBlockN, D, STRIDE, kThreads>(v_s, a.v, a.v_stride, b, kv_head, n0, key_end);
    cp_async_commit();
    cp_async_wait<1>();  // K(j) has landed; V(j) may still be in flight
    __syncthreads();

    float sc[NTILES][4] = {};
#pragma unroll
    for (int kk = 0; kk < KSLABS; ++kk) {
#pragma unroll
      for (int nt = 0; nt < NTILES; nt += 2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, &k_s[((nt + mi / 2) * 8 + lane % 8) * STRIDE + kk * 16 + (mi % 2) * 8]);
        mma_16816<T>(sc[nt], q_frag[kk], kf[0], kf[1]);
        mma_16816<T>(sc[nt + 1], q_frag[kk], kf[2], kf[3]);
      }
    }

    __syncthreads();  // every warp is done with K(j): fetch K(j+1) (an empty group after the last tile)
    if (n0 + kBlockN < key_end)
      load_tile_async<T, kBlockN, D, STRIDE, kThreads>(k_s, a.k, a.k_stride, b, kv_head, n0 + kBlockN, key_end);
    cp_async_commit();

    // Scale into log2 units; mask keys past the end or past a query's diagonal.
    const bool masked = n0 + kBlockN > key_end || n0 + kBlockN - 1 > m0 + offset;
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + nt * 8 + 2 * c + (e & 1), query = query0 + (e >> 1) * 8;
        sc[nt][e] = masked && (key >= key_end || key > query + offset) ? -INFINITY : sc[nt][e] * scale2;
      }
    }

    // Online softmax: rescale what was accumulated by exp2(m_old - m_new).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_row[r];
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      mx = quad_max(mx);
      const float m_use = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet stays at zero
      const float alpha = exp2f(m_row[r] - m_use);
      m_row[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt) {
        sc[nt][2 * r] = exp2f(sc[nt][2 * r] - m_use);
        sc[nt][2 * r + 1] = exp2f(sc[nt][2 * r + 1] - m_use);
        sum += sc[nt][2 * r] + sc[nt][2 * r + 1];
      }
      l_row[r] = l_row[r] * alpha + sum;  // this thread's columns; the quad's sum comes at the end
#pragma unroll
      for (int dt = 0; dt < DTILES; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<1>();  // V(j) has landed; K(j+1) may still be in flight
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t pa[4];
      c_to_a<T>(pa, sc[2 * ks], sc[2 * ks + 1]);
#pragma unroll
      for (int dt = 0; dt < DTILES; dt += 2) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, &v_s[(ks * 16 + (mi % 2) * 8 + lane % 8) * STRIDE + (dt + mi / 2) * 8]);
        mma_16816<T>(o[dt], pa, vf[0], vf[1]);
        mma_16816<T>(o[dt + 1], pa, vf[2], vf[3]);
      }
    }
    __syncthreads();  // every warp is done with V(j): the next iteration refills v_s
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) l_row[r] = quad_sum(l_row[r]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int query = query0 + r * 8;
    if (query >= s.t_q) continue;
    const int64_t row = (int64_t(b) * s.heads + h) * s.t_q + query;
    const float inv = 1.f / l_row[r];  // every query sees key 0, so l > 0
    T* out = static_cast<T*>(a.out) + row * D;
#pragma unroll
    for (int dt = 0; dt < DTILES; ++dt)
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * c) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (c == 0) a.lse[row] = (m_row[r] + log2f(l_row[r])) * kLn2;
  }
}

}  // namespace

template <typename T, int D>
void forward_tensor_cores(const AttentionForward& a, cudaStream_t stream) {
  const dim3 grid(a.shape.batch * a.shape.heads, (a.shape.t_q + kBlockM - 1) / kBlockM);
  forward_kernel<T, D><<<grid, kThreads, 0, stream>>>(a);
}

#define SCRATCHFORMER_FORWARD(T, D) template void forward_tensor_cores<T, D>(const AttentionForward&, cudaStream_t);
SCRATCHFORMER_FOR_EACH_TENSOR_CORE_TYPE(SCRATCHFORMER_FORWARD)

bool attention_head_dim_supported(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128;
}

int attention_forward_splits(const AttentionShape& shape, DType) {
  if (shape.t_q > kDecodeMaxQueries) return 1;
  int device = 0, sm_count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
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
      else
        forward_tensor_cores<T, D>(a, st);
    }
  });
  if (!supported) return "unsupported dtype or head dim";
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace scratchformer
