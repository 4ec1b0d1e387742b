// A CPU stand-in for the parts of CUDA the attention kernels use, so their own source runs
// without a GPU (tests/test_attention_emulated.py). Every thread of a block is a fiber
// (ucontext) on one OS thread; a fiber runs until it waits at a barrier, then the next one runs.
// __syncthreads is a block barrier, and warp-wide operations (shuffles, ldmatrix, mma) exchange
// values through a per-warp buffer between two warp barriers. Blocks run one after another.
// cp.async copies are deferred until the issuing thread's cp.async.wait_group, so a kernel that
// reads shared memory before waiting sees stale data, as it could on a GPU. Shared memory, static
// and dynamic, is filled with 0xff bytes (NaN in every float format) for each block, as
// a GPU gives a block whatever the previous one left: a read of memory the block never wrote
// turns into NaN. Locals start as a byte pattern too (-ftrivial-auto-var-init=pattern).
// The Hopper instructions (wgmma, bulk tensor copies, mbarriers: tests/emulator/hopper.cuh) keep
// their per-thread and per-block state here, so a block starts clean and a thread that exits with
// work in flight fails.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <vector>

// ---- language ------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One copy shared by the block's fibers; blocks run one at a time. The build follows every
// declaration with emu::fresh_shared (tests/emulated_kernels.py), which fills it with garbage
// once per block.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define CUDART_VERSION 13000

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(8) int2 {
  int x, y;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount, cudaDevAttrComputeCapabilityMajor, cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor, cudaDevAttrReservedSharedMemoryPerBlock
};

namespace emu {

inline dim3 thread_idx, block_idx, grid_dim, block_dim;
inline int linear_thread = 0;  // x fastest, as warps are formed on a GPU
inline int warp_of() { return linear_thread / 32; }
inline int lane_of() { return linear_thread % 32; }
inline int sm_count = 8;
inline int compute_capability = 80;  // the emulated GPU's (80: A100, 86: RTX 30, 90: H100)
// The most dynamic shared memory a kernel may opt in to: 163 KB on an A100, 227 KB on an H100, 99 KB
// on sm_86/89/120.
inline int max_dynamic_smem() {
  return compute_capability == 80 ? 166912 : compute_capability == 90 || compute_capability == 100 ? 232448 : 101376;
}
// Dynamic shared memory above 48 KB needs the kernel's own opt-in (cudaFuncSetAttribute), as on a GPU.
inline std::map<const void*, long> dynamic_smem_limits;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
  // cp.async: committed groups and the open one, each a list of 16-byte copies.
  struct Copy {
    void* dst;
    const void* src;
    bool valid;
  };
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
  // wgmma: issued operations not yet in a group, committed groups, and whether a wgmma.fence
  // came after the last wait (a wgmma reads registers other instructions may have written).
  std::vector<std::shared_ptr<void>> wgmma_open;
  std::vector<std::vector<std::shared_ptr<void>>> wgmma_groups;
  bool wgmma_fenced = false;
};

inline std::vector<Fiber> fibers;
inline ucontext_t scheduler;
inline int current = 0;
inline std::function<void()> body;
inline long progress = 0;  // barrier releases and exits: a round without any is a deadlock
inline int block_arrived = 0, block_alive = 0;
inline long block_generation = 0;
inline int warp_arrived[32], warp_alive[32];
inline long warp_generation[32];
alignas(16) inline unsigned char warp_exchange[32][32][64];
inline std::vector<unsigned char> dynamic_smem_buffer;
inline long block_serial = 0;  // counts the blocks run, over all launches
// Warpgroups (4 consecutive warps from a multiple of 4) exchange through their own buffer.
inline int group_arrived[8], group_alive[8];
inline long group_generation[8];
alignas(16) inline unsigned char group_exchange[8][128][64];
// Shared memory as the async proxy (tensor cores reading descriptors, the copy engine) sees it:
// the generic proxy's stores reach it only through fence.proxy.async.
inline std::vector<unsigned char> async_view;
// Per-block state of the Hopper instructions (mbarriers, named barriers), reset for each block.
inline std::function<void()> hopper_block_start = [] {};
inline std::function<void()> hopper_block_end = [] {};

// Called by every thread at a static __shared__ declaration: the first call of each block fills
// the array with 0xff bytes, before any thread of the block can have written it.
inline void fresh_shared(void* array, std::size_t bytes) {
  static std::map<void*, long> filled;  // array -> block_serial of its last fill
  long& last = filled[array];
  if (last != block_serial) {
    std::memset(array, 0xff, bytes);
    last = block_serial;
  }
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulator: %s (block %u,%u,%u thread %d)\n", what, block_idx.x, block_idx.y, block_idx.z,
               linear_thread);
  std::abort();
}

inline void yield() { swapcontext(&fibers[current].context, &scheduler); }

inline void block_barrier() {
  const long target = block_generation + 1;
  if (++block_arrived == block_alive) {
    block_arrived = 0;
    ++block_generation;
    ++progress;
    return;
  }
  while (block_generation < target) yield();
}

inline void warp_barrier() {
  const int w = warp_of();
  const long target = warp_generation[w] + 1;
  if (++warp_arrived[w] == warp_alive[w]) {
    warp_arrived[w] = 0;
    ++warp_generation[w];
    ++progress;
    return;
  }
  while (warp_generation[w] < target) yield();
}

// Every lane of the warp contributes `mine`; returns all 32 contributions, by lane.
template <typename V>
std::vector<V> warp_all(const V& mine) {
  static_assert(sizeof(V) <= 64, "exchange slot too small");
  const int w = warp_of(), lane = lane_of();
  std::memcpy(warp_exchange[w][lane], &mine, sizeof(V));
  warp_barrier();
  if (warp_alive[w] != 32) fail("a warp-wide operation with exited lanes");
  std::vector<V> all(32);
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], warp_exchange[w][l], sizeof(V));
  warp_barrier();  // every lane has read before the slots are reused
  return all;
}

inline void group_barrier() {
  const int g = warp_of() / 4;
  const long target = group_generation[g] + 1;
  if (++group_arrived[g] == group_alive[g]) {
    group_arrived[g] = 0;
    ++group_generation[g];
    ++progress;
    return;
  }
  while (group_generation[g] < target) yield();
}

// The warpgroup's 128 threads each contribute `mine`; returns all contributions, by thread.
template <typename V>
std::vector<V> group_all(const V& mine) {
  static_assert(sizeof(V) <= 64, "exchange slot too small");
  if (block_dim.x * block_dim.y * block_dim.z % 128) fail("a warpgroup instruction in a block of partial warpgroups");
  const int g = warp_of() / 4, t = linear_thread % 128;
  std::memcpy(group_exchange[g][t], &mine, sizeof(V));
  group_barrier();
  if (group_alive[g] != 128) fail("a warpgroup-wide operation with exited threads");
  std::vector<V> all(128);
  for (int l = 0; l < 128; ++l) std::memcpy(&all[l], group_exchange[g][l], sizeof(V));
  group_barrier();
  return all;
}

inline void trampoline() {
  body();
  Fiber& f = fibers[current];
  if (!f.wgmma_open.empty() || !f.wgmma_groups.empty()) fail("a thread exits with a wgmma not waited for");
  f.done = true;
  const int w = warp_of();
  --block_alive;
  --warp_alive[w];
  --group_alive[w / 4];
  ++progress;
  // Threads that exit no longer hold back the barriers the others wait at.
  if (block_arrived > 0 && block_arrived == block_alive) {
    block_arrived = 0;
    ++block_generation;
  }
  if (warp_arrived[w] > 0 && warp_arrived[w] == warp_alive[w]) {
    warp_arrived[w] = 0;
    ++warp_generation[w];
  }
  if (group_arrived[w / 4] > 0 && group_arrived[w / 4] == group_alive[w / 4]) {
    group_arrived[w / 4] = 0;
    ++group_generation[w / 4];
  }
  swapcontext(&f.context, &scheduler);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t, Args&&... args) {
  const int threads = int(block.x * block.y * block.z);
  if (threads % 32 || threads > 1024) fail("unsupported block shape");
  const auto opt_in = dynamic_smem_limits.find(reinterpret_cast<const void*>(kernel));
  const long limit = opt_in == dynamic_smem_limits.end() ? 48 * 1024 : opt_in->second;
  if (long(smem) > limit) fail("dynamic shared memory above the limit set for this kernel");
  grid_dim = grid;
  block_dim = block;
  body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        // 1024 spare bytes: the window address of the buffer's start is 16 mod 1024 (see smem_window).
        dynamic_smem_buffer.assign(smem + 1024 + 16, 0xff);
        async_view.assign(dynamic_smem_buffer.size(), 0xff);
        ++block_serial;
        hopper_block_start();
        fibers.resize(threads);
        block_arrived = 0;
        block_alive = threads;
        for (int w = 0; w < threads / 32; ++w) {
          warp_arrived[w] = 0;
          warp_alive[w] = 32;
        }
        for (int g = 0; g < 8; ++g) {
          group_arrived[g] = 0;
          group_alive[g] = std::min(128, std::max(0, threads - 128 * g));
        }
        for (int t = 0; t < threads; ++t) {
          Fiber& f = fibers[t];
          f.done = false;
          f.groups.clear();
          f.open.clear();
          f.wgmma_open.clear();
          f.wgmma_groups.clear();
          f.wgmma_fenced = false;
          f.stack.resize(64 * 1024);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = nullptr;
          makecontext(&f.context, trampoline, 0);
        }
        for (int remaining = threads; remaining > 0;) {
          const long before = progress;
          remaining = 0;
          for (int t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            current = t;
            linear_thread = t;
            thread_idx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
            swapcontext(&scheduler, &fibers[t].context);
            remaining += !fibers[t].done;
          }
          if (remaining > 0 && progress == before) fail("deadlock: threads wait at barriers that never complete");
        }
        hopper_block_end();
      }
}

// The block's dynamic shared memory. Its shared-window address (what __cvta_generic_to_shared gives,
// and what swizzles and descriptors see) is 16 mod 1024, as when a little static shared memory
// precedes it: a kernel must align its swizzled tiles itself.
constexpr uint32_t kDynamicWindowBase = 1024 + 16;
inline unsigned char* dynamic_smem() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(dynamic_smem_buffer.data());
  return reinterpret_cast<unsigned char*>(((p + 1023) & ~uintptr_t(1023)) + 16);
}
inline long dynamic_smem_bytes() { return long(dynamic_smem_buffer.size()) - 1024 - 16; }
// Shared-window address of a pointer into dynamic shared memory; anything else fails.
inline uint32_t smem_window(const void* p) {
  const long off = static_cast<const unsigned char*>(p) - dynamic_smem();
  if (off < 0 || off >= dynamic_smem_bytes() + 1) fail("an address outside the dynamic shared memory where one inside is needed");
  return uint32_t(off) + kDynamicWindowBase;
}
inline unsigned char* smem_at(uint32_t window, long bytes = 1) {
  const long off = long(window) - long(kDynamicWindowBase);
  if (off < 0 || off + bytes > dynamic_smem_bytes()) fail("a shared-memory address outside the block's dynamic shared memory");
  return dynamic_smem() + off;
}
inline unsigned char* async_at(uint32_t window, long bytes = 1) {
  return async_view.data() + (smem_at(window, bytes) - dynamic_smem_buffer.data());
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define blockDim emu::block_dim

inline void __syncthreads() { emu::block_barrier(); }
// A warp barrier: every lane arrives (and has made its shared-memory writes) before any goes on.
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_all(0); }
inline float __fdividef(float x, float y) { return x / y; }
// mul.rn: a product rounded to float, never fused into a later add (the build contracts
// a * b + c into fma elsewhere, as nvcc does); out of line, so no fma can absorb it.
__attribute__((noinline)) inline float __fmul_rn(float x, float y) { return x * y; }

template <typename V>
inline V __shfl_sync(unsigned, V v, int src) {
  return emu::warp_all(v)[src & 31];
}
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask) {
  return emu::warp_all(v)[emu::lane_of() ^ mask];
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "invalid argument"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = emu::compute_capability == 80 ? 0 : emu::compute_capability == 90 ? 1 : 2;  // each emulated GPU kind is a device of its own
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrComputeCapabilityMajor         ? emu::compute_capability / 10
           : attribute == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::max_dynamic_smem()
           // An SM's shared memory is a block's most plus the 1 KB the runtime reserves a block.
           : attribute == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? emu::max_dynamic_smem() + 1024
           : attribute == cudaDevAttrReservedSharedMemoryPerBlock     ? 1024
                                                                      : emu::sm_count;
  return cudaSuccess;
}
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone, cudaStreamCaptureStatusActive };
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;  // no CUDA graphs here
  return cudaSuccess;
}
// __device__ variables are host variables here.
template <typename V>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const V& symbol, std::size_t bytes) {
  std::memcpy(dst, &symbol, bytes);
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int bytes) {
  if (bytes > emu::max_dynamic_smem()) return cudaErrorInvalidValue;
  emu::dynamic_smem_limits[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}

// ---- 16-bit floating point ---------------------------------------------------------------

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return float(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = _Float16(x);  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = 0x7fc0;
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    b.bits = uint16_t(bits >> 16);
  }
  return b;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
