// Hopper's asynchronous instructions, one wrapper each (PTX inline assembly): mbarriers, bulk
// tensor copies (TMA) with the host-side tensor map, the async-proxy fence, wgmma and its
// fence/commit/wait, setmaxnreg and named barriers. Kept apart, as tensor_core.cuh is, so that
// tests/emulator/hopper.cuh can swap in CPU versions with the same names and semantics.
//
// Targets: mbarrier, cp.async.bulk.tensor and fence.proxy.async need sm_90; wgmma and setmaxnreg
// need sm_90a (built as -gencode=arch=compute_90a,code=sm_90a). Compiled for an older GPU each
// traps, and the launchers never take a path that reaches them there.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (the type only: no driver library is linked)
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "tensor_core.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SCRATCHFORMER_SM90 1
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SCRATCHFORMER_SM90A 1
#endif

namespace scratchformer {

// ---- tensor maps (host) -------------------------------------------------------------------------

enum class TmaSwizzle : int { kNone = 0, k32B = 1, k64B = 2, k128B = 3 };  // CU_TENSOR_MAP_SWIZZLE_*

// A tiled tensor map over `rank` dimensions of elem_bytes-sized elements (dims[0] innermost,
// strides_bytes[i] the stride of dims[i + 1]), copied box by box into shared memory with the
// swizzle; elements outside the tensor arrive as zeros. Through the driver's entry point that
// the runtime exposes, so no libcuda link is needed. nullptr on success, else what was refused.
inline const char* make_tensor_map(CUtensorMap* map, const void* base, int elem_bytes, int rank, const uint64_t* dims,
                                   const uint64_t* strides_bytes, const uint32_t* box, TmaSwizzle swizzle) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 13000  // the unversioned query is deprecated there; older runtimes lack this one
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
    return reinterpret_cast<Encode>(fn);
  }();
  if (!encode) return "the CUDA driver has no cuTensorMapEncodeTiled (a driver for CUDA 12 or newer is needed)";
  if (elem_bytes != 2 && elem_bytes != 4) return "tensor map elements must be 2 or 4 bytes";
  const cuuint32_t unit_strides[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode(map, elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_UINT32,
                            cuuint32_t(rank), const_cast<void*>(base), reinterpret_cast<const cuuint64_t*>(dims),
                            reinterpret_cast<const cuuint64_t*>(strides_bytes), reinterpret_cast<const cuuint32_t*>(box),
                            unit_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CUtensorMapSwizzle(int(swizzle)),
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? nullptr : "cuTensorMapEncodeTiled refused the tensor map (alignment, strides or box)";
}

// ---- mbarriers ----------------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
#ifdef SCRATCHFORMER_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Makes this thread's mbarrier.init visible to the async proxy (the copy engine's completions).
__device__ __forceinline__ void fence_mbarrier_init() {
#ifdef SCRATCHFORMER_SM90
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef SCRATCHFORMER_SM90
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Expect `bytes` more of transactions (bulk copies) in this phase, and arrive.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef SCRATCHFORMER_SM90
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// True once the phase with this parity has completed.
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 1;
#ifdef SCRATCHFORMER_SM90
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "  selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
  return done != 0;
}

__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// ---- named barriers -----------------------------------------------------------------------------

// bar.sync / bar.arrive on barrier `id` (1-15; 0 is __syncthreads) among `threads` threads.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- the async proxy ----------------------------------------------------------------------------

// Ordinary shared-memory stores so far become visible to the tensor cores and the copy engine.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef SCRATCHFORMER_SM90
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// ---- bulk tensor copies -------------------------------------------------------------------------

// The box at the coordinates (innermost first) into shared memory at dst (128-byte aligned; to
// its swizzle pattern's 8 x span bytes when swizzled), completing its bytes on bar. `map` is the
// address of a __grid_constant__ kernel parameter.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
#ifdef SCRATCHFORMER_SM90
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
#ifdef SCRATCHFORMER_SM90
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
#ifdef SCRATCHFORMER_SM90
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// ---- wgmma --------------------------------------------------------------------------------------

// Registers of the wgmma asm statements below: "+f" operands d[0..N/2) come first.
#define SCRATCHFORMER_ACC32                                                                                             \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, " \
  "%25, %26, %27, %28, %29, %30, %31}"
#define SCRATCHFORMER_ACC64                                                                                             \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, " \
  "%25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SCRATCHFORMER_F8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define SCRATCHFORMER_F32(i) SCRATCHFORMER_F8(i), SCRATCHFORMER_F8(i + 8), SCRATCHFORMER_F8(i + 16), SCRATCHFORMER_F8(i + 24)

// An empty asm that reads and writes these registers: the compiler may not move their other
// accesses across it. Around wgmma_fence and wgmma_wait, so that no access to accumulators or A
// registers drifts into the span where a wgmma owns them (PTX ISA: undefined behaviour).
template <int K>
__device__ __forceinline__ void wgmma_fence_operand(float (&r)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int K>
__device__ __forceinline__ void wgmma_fence_operand(uint32_t (&r)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// wgmma.fence: registers written by other instructions may be read by the wgmma that follow.
__device__ __forceinline__ void wgmma_fence() {
#ifdef SCRATCHFORMER_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef SCRATCHFORMER_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
// Every group but the newest N has completed: their accumulators may be read.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef SCRATCHFORMER_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// The PTX text of one m64nNk16 wgmma with fp32 accumulators: the scale-d predicate from operand
// SCALE, B transposed (MN-major) by immediate TRANS; A from a descriptor (A_OPERAND "%k") or
// four registers ("{%a, %b, %c, %d}").
#define SCRATCHFORMER_WGMMA(NN, TY, ACC, A_OPERAND, B, SCALE, TRANS, TRANS_A) \
  "{\n"                                                                       \
  "  .reg .pred p;\n"                                                         \
  "  setp.ne.b32 p, %" SCALE ", 0;\n"                                         \
  "  wgmma.mma_async.sync.aligned.m64n" NN "k16.f32." TY "." TY " " ACC ", " A_OPERAND ", %" B ", p, 1, 1, " TRANS_A "%" TRANS ";\n" \
  "}\n"

// d (this thread's N/2 fp32 accumulators) = A B (+ d when accumulate), A 64 x 16 and B 16 x N
// from shared memory through descriptors; A K-major, B K-major or (TRANS_B) MN-major.
template <typename T, int N, bool TRANS_B>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_ss: N of 64 or 128");
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma: fp16 or bf16 inputs");
#ifdef SCRATCHFORMER_SM90A
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && bf16)
    asm volatile(SCRATCHFORMER_WGMMA("64", "bf16", SCRATCHFORMER_ACC32, "%32", "33", "34", "35", "0, ")
                 : SCRATCHFORMER_F32(0)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
  else if constexpr (N == 64)
    asm volatile(SCRATCHFORMER_WGMMA("64", "f16", SCRATCHFORMER_ACC32, "%32", "33", "34", "35", "0, ")
                 : SCRATCHFORMER_F32(0)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
  else if constexpr (bf16)
    asm volatile(SCRATCHFORMER_WGMMA("128", "bf16", SCRATCHFORMER_ACC64, "%64", "65", "66", "67", "0, ")
                 : SCRATCHFORMER_F32(0), SCRATCHFORMER_F32(32)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
  else
    asm volatile(SCRATCHFORMER_WGMMA("128", "f16", SCRATCHFORMER_ACC64, "%64", "65", "66", "67", "0, ")
                 : SCRATCHFORMER_F32(0), SCRATCHFORMER_F32(32)
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// The same with A from registers: per warp w of the warpgroup, rows 16w..16w+15 in
// mma.m16n8k16's A layout (attention.cuh).
template <typename T, int N, bool TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N of 64 or 128");
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma: fp16 or bf16 inputs");
#ifdef SCRATCHFORMER_SM90A
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && bf16)
    asm volatile(SCRATCHFORMER_WGMMA("64", "bf16", SCRATCHFORMER_ACC32, "{%32, %33, %34, %35}", "36", "37", "38", "")
                 : SCRATCHFORMER_F32(0)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
  else if constexpr (N == 64)
    asm volatile(SCRATCHFORMER_WGMMA("64", "f16", SCRATCHFORMER_ACC32, "{%32, %33, %34, %35}", "36", "37", "38", "")
                 : SCRATCHFORMER_F32(0)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
  else if constexpr (bf16)
    asm volatile(SCRATCHFORMER_WGMMA("128", "bf16", SCRATCHFORMER_ACC64, "{%64, %65, %66, %67}", "68", "69", "70", "")
                 : SCRATCHFORMER_F32(0), SCRATCHFORMER_F32(32)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
  else
    asm volatile(SCRATCHFORMER_WGMMA("128", "f16", SCRATCHFORMER_ACC64, "{%64, %65, %66, %67}", "68", "69", "70", "")
                 : SCRATCHFORMER_F32(0), SCRATCHFORMER_F32(32)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(TRANS_B)));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// ---- setmaxnreg ---------------------------------------------------------------------------------

// The whole warpgroup moves its per-thread register budget up or down (24 to 256, a multiple of
// 8). Honoured only with a register cap at entry (__launch_bounds__(threads, 1)) and each
// warpgroup role one branch of one if/else; ptxas warns (C7508) when it ignores it.
template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(REGS >= 24 && REGS <= 256 && REGS % 8 == 0, "setmaxnreg takes 24 to 256 registers, a multiple of 8");
#ifdef SCRATCHFORMER_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(REGS >= 24 && REGS <= 256 && REGS % 8 == 0, "setmaxnreg takes 24 to 256 registers, a multiple of 8");
#ifdef SCRATCHFORMER_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace scratchformer
