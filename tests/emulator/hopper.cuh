// CPU versions of the Hopper instructions in csrc/kernels/hopper.cuh, on top of emulator.h:
// mbarriers, bulk tensor copies (TMA) against an emulated tensor map, wgmma, the async-proxy
// fence, setmaxnreg and named barriers. Each follows the PTX ISA, and each is no kinder than a GPU:
// - A bulk copy's destination holds NaN garbage from its issue until a thread waits on its
//   mbarrier (the data lands then, as late as hardware may deliver it); a wgmma that reads bytes
//   of a copy still in flight fails.
// - A wgmma's accumulators hold NaN from its issue to the wait_group that completes it; writing
//   them in between fails, as does a wgmma issued with no wgmma.fence since the last wait, a
//   warpgroup whose threads disagree on the operands, a thread that exits with one in flight,
//   and shared memory a pending wgmma reads that changes before its wait.
// - The async proxy (tensor cores, copy engine) reads its own view of shared memory: ordinary
//   stores reach it only through fence.proxy.async, so a missing fence fails the read. (One
//   thread's fence publishes every store made so far, by any thread: kinder than hardware,
//   where each writing thread must fence.)
// Swizzles are functions of the shared-window address, as on the GPU; see emu::smem_window.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "emulator.h"
#include "tensor_core.cuh"

#define __grid_constant__

// The driver's opaque 128-byte tensor map; here it holds the encoded fields themselves.
struct alignas(64) CUtensorMap {
  const unsigned char* base;
  int elem_bytes, rank, swizzle;  // swizzle: scratchformer::TmaSwizzle
  uint64_t dims[5], strides[5];   // strides in bytes; strides[0] = elem_bytes
  uint32_t box[5];
};

namespace scratchformer {

enum class TmaSwizzle : int { kNone = 0, k32B = 1, k64B = 2, k128B = 3 };  // CU_TENSOR_MAP_SWIZZLE_*

inline int swizzle_span(TmaSwizzle s) { return s == TmaSwizzle::kNone ? 0 : 16 << int(s); }

// The checks cuTensorMapEncodeTiled makes (CUDA driver API reference) for what we use.
inline const char* make_tensor_map(CUtensorMap* map, const void* base, int elem_bytes, int rank,
                                   const uint64_t* dims, const uint64_t* strides_bytes, const uint32_t* box,
                                   TmaSwizzle swizzle) {
  if (rank < 1 || rank > 5) return "tensor map rank must be 1 to 5";
  if (elem_bytes != 2 && elem_bytes != 4) return "tensor map elements must be 2 or 4 bytes";
  if (reinterpret_cast<uintptr_t>(base) % 16) return "tensor map global address must be 16-byte aligned";
  std::memset(map, 0, sizeof(*map));
  map->base = static_cast<const unsigned char*>(base);
  map->elem_bytes = elem_bytes, map->rank = rank, map->swizzle = int(swizzle);
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 1 || dims[i] > (uint64_t(1) << 32)) return "tensor map dimension out of range";
    if (box[i] < 1 || box[i] > 256) return "tensor map box dimension must be 1 to 256";
    map->dims[i] = dims[i], map->box[i] = box[i];
    map->strides[i] = i == 0 ? uint64_t(elem_bytes) : strides_bytes[i - 1];
    if (i > 0 && (map->strides[i] % 16 || map->strides[i] >= (uint64_t(1) << 40)))
      return "tensor map strides must be multiples of 16 bytes below 2^40";
  }
  const uint32_t inner = box[0] * uint32_t(elem_bytes);
  if (inner % 16) return "tensor map box's inner dimension must be a multiple of 16 bytes";
  if (swizzle != TmaSwizzle::kNone && inner > uint32_t(swizzle_span(swizzle)))
    return "tensor map box's inner dimension must not exceed the swizzle span";
  return nullptr;
}

// ---- the emulator's state --------------------------------------------------------------------

namespace emulated {

constexpr uint32_t kPoison = 0x7fc0dead;  // a quiet NaN: the value of anything not yet delivered

inline float poison_float() {
  float f;
  std::memcpy(&f, &kPoison, 4);
  return f;
}
inline bool is_poison(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u == kPoison;
}

// Byte address bits [4, 4 + log2(span / 16)) XOR the bits 3 above them: CuTe's Swizzle<B,4,3>.
inline uint32_t swizzle_address(uint32_t a, int span) {
  if (span == 0) return a;
  const uint32_t mask = uint32_t(span / 16 - 1) << 4;
  return a ^ ((a >> 3) & mask);
}

struct BulkCopy {
  CUtensorMap map;
  int coords[5];
  uint32_t dst;  // shared-window address
  long bytes;
};

struct Mbarrier {
  int count = 0, pending = 0;
  long tx = 0, phase = 0;
  bool fenced = false;  // fence.mbarrier_init (or fence.proxy.async) by its initialising thread
  int init_thread = -1;
  long init_generation = 0;  // the block barrier generation at init: others may use it after the next
  std::vector<BulkCopy> copies;  // issued, not landed
};

struct NamedBarrier {
  int arrived = 0, expected = 0;
  uint64_t warps = 0;  // which warps have arrived in this round
  long generation = 0;
};

struct WgmmaOp {
  int n = 0;
  std::vector<float> a, b;  // a[row * 16 + k] (64 x 16), b[col * 16 + k] (n x 16)
  // How to read the shared-memory operands again at the wait, and what they were at the issue.
  bool a_in_smem = false, trans_b = false;
  uint64_t desc_a = 0, desc_b = 0;
  std::vector<uint16_t> a_bits, b_bits;
  bool rechecked = false;
  int fetched = 0;
};

struct PendingWgmma {
  std::shared_ptr<WgmmaOp> op;
  float* d;
  std::vector<float> result;
  const uint32_t* a = nullptr;  // A registers (wgmma_rs), which must hold still until the wait
  uint32_t a_values[4] = {};
};

struct State {
  std::map<const void*, Mbarrier> mbarriers;
  NamedBarrier named[16];
  std::map<std::pair<int, long>, std::shared_ptr<WgmmaOp>> building;  // (warpgroup, issue number)
  std::vector<long> issued;                                           // wgmma issues per thread
  // Per thread: registers wgmma has used (address -> 32-bit words) and their values at the last
  // wgmma.fence; a wgmma finding them changed since was not fenced against that write.
  std::vector<std::map<const void*, std::vector<uint32_t>>> fenced;
  std::map<int, int> registers;  // warpgroup -> its setmaxnreg count, once set
};
inline State state;

inline bool in_flight(uint32_t window, long bytes) {  // overlaps a bulk copy not landed yet
  for (const auto& [bar, m] : state.mbarriers)
    for (const BulkCopy& c : m.copies)
      if (long(window) < long(c.dst) + c.bytes && long(c.dst) < long(window) + bytes) return true;
  return false;
}

constexpr uint64_t kMbarrierBits = 0x5eed5eed5eed5eedull;  // what an initialised mbarrier's word holds here

inline Mbarrier& mbarrier(const void* bar) {
  auto it = state.mbarriers.find(bar);
  if (it == state.mbarriers.end()) emu::fail("an mbarrier used before mbarrier.init");
  if (*static_cast<const uint64_t*>(bar) != kMbarrierBits) emu::fail("an mbarrier's word overwritten by an ordinary store");
  Mbarrier& m = it->second;
  if (emu::linear_thread != m.init_thread && emu::block_generation == m.init_generation)
    emu::fail("an mbarrier used by another thread before a block barrier followed its init");
  return m;
}

// PTX ISA, mbarrier contents: pending arrivals in [0, 2^20 - 1], tx-count in [-(2^20 - 1), 2^20 - 1].
inline void check_ranges(const Mbarrier& m) {
  if (m.pending < 0) emu::fail("more arrivals on an mbarrier than its phase expects");
  if (m.tx > (1 << 20) - 1 || m.tx < -((1 << 20) - 1)) emu::fail("an mbarrier's transaction count out of range");
}

inline void complete_phase_if_done(Mbarrier& m) {
  check_ranges(m);
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.count;
    ++emu::progress;
  }
}

// Deliver the copies issued against this mbarrier: read global memory box by box (zeros outside
// the tensor), write shared memory through the swizzle, then complete their transactions.
inline void land(Mbarrier& m) {
  for (const BulkCopy& c : m.copies) {
    const CUtensorMap& t = c.map;
    const long elems = c.bytes / t.elem_bytes;
    const int span = swizzle_span(TmaSwizzle(t.swizzle));
    for (long e = 0; e < elems; ++e) {
      long rest = e, offset = 0;
      bool inside = true;
      for (int i = 0; i < t.rank; ++i) {
        const long x = c.coords[i] + rest % t.box[i];
        rest /= t.box[i];
        if (x < 0 || x >= long(t.dims[i])) inside = false;
        offset += x * long(t.strides[i]);
      }
      const uint32_t dst = swizzle_address(c.dst + uint32_t(e * t.elem_bytes), span);
      unsigned char bytes[4] = {};
      if (inside) std::memcpy(bytes, t.base + offset, t.elem_bytes);
      std::memcpy(emu::smem_at(dst, t.elem_bytes), bytes, t.elem_bytes);
      std::memcpy(emu::async_at(dst, t.elem_bytes), bytes, t.elem_bytes);
    }
    m.tx -= c.bytes;
  }
  m.copies.clear();
  complete_phase_if_done(m);
}

inline void reset_block() {
  state.mbarriers.clear();
  for (NamedBarrier& b : state.named) b = NamedBarrier{};
  state.building.clear();
  state.issued.assign(emu::block_dim.x * emu::block_dim.y * emu::block_dim.z, 0);
  state.fenced.assign(state.issued.size(), {});
  state.registers.clear();
}

// Registers a wgmma reads or writes must not change between the wgmma.fence and the wgmma.
inline void check_fenced(const void* regs, int words) {
  auto& mine = state.fenced[emu::linear_thread];
  auto it = mine.find(regs);
  if (it != mine.end() && (int(it->second.size()) != words || std::memcmp(it->second.data(), regs, 4 * words)))
    emu::fail("registers a wgmma uses were written after the wgmma.fence before it");
}
inline void note_fenced(const void* regs, int words) {
  const auto* w = static_cast<const uint32_t*>(regs);
  state.fenced[emu::linear_thread][regs].assign(w, w + words);
}
// A block ends with no bulk copy in flight and no named barrier half-arrived.
inline void end_block() {
  for (const auto& [bar, m] : state.mbarriers)
    if (!m.copies.empty()) emu::fail("a block exits with bulk copies in flight (no thread waited for them)");
  for (const NamedBarrier& b : state.named)
    if (b.arrived) emu::fail("a block exits with a named barrier partly arrived (unbalanced arrive/sync)");
}
inline const bool registered = (emu::hopper_block_start = reset_block, emu::hopper_block_end = end_block, true);

}  // namespace emulated

// ---- mbarriers --------------------------------------------------------------------------------

inline void mbarrier_init(uint64_t* bar, int count) {
  if (count < 1 || count > (1 << 20) - 1) emu::fail("mbarrier.init count out of range");
  if (reinterpret_cast<uintptr_t>(bar) % 8) emu::fail("an mbarrier must be 8-byte aligned");
  if (emulated::state.mbarriers.count(bar)) emu::fail("mbarrier.init on an mbarrier already initialised");
  emulated::Mbarrier m;
  m.count = m.pending = count;
  m.init_thread = emu::linear_thread;
  m.init_generation = emu::block_generation;
  emulated::state.mbarriers[bar] = m;
  *bar = emulated::kMbarrierBits;  // the object's bits are the hardware's own, not the program's
}

// fence.mbarrier_init: this thread's mbarrier.init become visible to the async proxy.
inline void fence_mbarrier_init() {
  for (auto& [bar, m] : emulated::state.mbarriers)
    if (m.init_thread == emu::linear_thread) m.fenced = true;
}

inline void mbarrier_arrive(uint64_t* bar) {
  emulated::Mbarrier& m = emulated::mbarrier(bar);
  --m.pending;
  ++emu::progress;
  emulated::complete_phase_if_done(m);
}

inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  emulated::Mbarrier& m = emulated::mbarrier(bar);
  m.tx += bytes;
  mbarrier_arrive(bar);
}

namespace emulated {
inline bool phase_done(uint64_t* bar, uint32_t parity) {
  Mbarrier& m = mbarrier(bar);
  // A phase completed without waiting for a copy (no expect_tx for it) does not deliver it.
  if (uint32_t(m.phase & 1) != (parity & 1)) return true;
  if (!m.copies.empty()) land(m);
  return uint32_t(m.phase & 1) != (parity & 1);
}
}  // namespace emulated

// try_wait.parity: true once the phase of that parity has completed (the current phase has the
// other parity). A false answer yields the thread first and counts as progress (the caller goes
// on to something else): wait with mbarrier_wait, whose spin the deadlock check sees through.
inline bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  if (emulated::phase_done(bar, parity)) return true;
  ++emu::progress;
  emu::yield();
  return false;
}

inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!emulated::phase_done(bar, parity)) emu::yield();
}

// ---- named barriers (bar.sync / bar.arrive with an id and a thread count) ---------------------

inline emulated::NamedBarrier& named_barrier(int id, int threads) {
  if (id < 1 || id > 15) emu::fail("named barrier ids here are 1 to 15 (0 is __syncthreads)");
  if (threads % 32 || threads < 32) emu::fail("a named barrier's thread count must be a multiple of 32");
  emulated::NamedBarrier& b = emulated::state.named[id];
  if (b.arrived == 0) b.expected = threads;
  if (b.expected != threads) emu::fail("a named barrier used with two different thread counts at once");
  return b;
}

// bar.arrive / bar.sync are .aligned: a whole warp arrives at once and counts 32 threads; a warp
// arriving twice before the barrier completes is an error.
inline void named_barrier_arrive(int id, int threads) {
  for (int other : emu::warp_all(id))
    if (other != id) emu::fail("a warp's lanes arrive at different named barriers");
  emulated::NamedBarrier& b = named_barrier(id, threads);
  if (emu::lane_of() != 0) return;
  const uint64_t bit = uint64_t(1) << emu::warp_of();
  if (b.warps & bit) emu::fail("a warp arrives twice at a named barrier before it completes");
  b.warps |= bit;
  if ((b.arrived += 32) == b.expected) {
    b.arrived = 0;
    b.warps = 0;
    ++b.generation;
    ++emu::progress;
  }
}

inline void named_barrier_sync(int id, int threads) {
  emulated::NamedBarrier& b = named_barrier(id, threads);
  const long target = b.generation + 1;
  named_barrier_arrive(id, threads);
  while (b.generation < target) emu::yield();
}

// ---- the async proxy --------------------------------------------------------------------------

// fence.proxy.async.shared::cta: ordinary stores made so far become visible to the async proxy.
inline void fence_proxy_async() {
  std::memcpy(emu::async_view.data(), emu::dynamic_smem_buffer.data(), emu::async_view.size());
  // An mbarrier initialised by this thread may take bulk-copy completions from now on.
  fence_mbarrier_init();
}

// ---- bulk tensor copies -----------------------------------------------------------------------

namespace emulated {
// cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes: the box at
// `coords` (innermost first) into shared memory at dst; its bytes complete on bar's transaction
// count. Elements outside the tensor are zeros.
inline void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int rank, const int* coords) {
  if (rank != map->rank) emu::fail("a bulk tensor copy's dimension count differs from its tensor map's");
  emulated::Mbarrier& m = emulated::mbarrier(bar);
  if (!m.fenced) emu::fail("a bulk copy completes on an mbarrier not published by fence.mbarrier_init");
  const uint32_t window = emu::smem_window(dst);
  const int span = swizzle_span(TmaSwizzle(map->swizzle));
  if (window % 128) emu::fail("a bulk tensor copy's shared-memory destination must be 128-byte aligned");
  if (span && window % (8 * span)) emu::fail("a swizzled bulk copy's destination must be aligned to its swizzle pattern (8 x span)");
  if (span && map->box[0] * map->elem_bytes != uint32_t(span))
    emu::fail("emulated swizzled bulk copies need the box's inner dimension to fill the swizzle span");
  emulated::BulkCopy c{*map, {}, window, map->elem_bytes};
  for (int i = 0; i < rank; ++i) c.coords[i] = coords[i], c.bytes *= map->box[i];
  emu::smem_at(window, c.bytes);
  if (emulated::in_flight(window, c.bytes)) emu::fail("a bulk copy into shared memory another copy is still filling");
  // Until it lands the destination is garbage, for the generic proxy and the async one.
  std::memset(emu::smem_at(window, c.bytes), 0xff, c.bytes);
  std::memset(emu::async_at(window, c.bytes), 0xff, c.bytes);
  m.copies.push_back(c);
  ++emu::progress;
}
}  // namespace emulated

inline void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  const int coords[] = {c0, c1};
  emulated::tma_load(dst, map, bar, 2, coords);
}
inline void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  const int coords[] = {c0, c1, c2};
  emulated::tma_load(dst, map, bar, 3, coords);
}
inline void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  const int coords[] = {c0, c1, c2, c3};
  emulated::tma_load(dst, map, bar, 4, coords);
}

// ---- wgmma ------------------------------------------------------------------------------------

namespace emulated {

// Shared-window address of element (mn, k) (k < 16) of a wgmma operand given by its matrix
// descriptor (PTX ISA, "Matrix Descriptor Format" and "Shared Memory Matrix Layout"): start
// address bits 0-13, leading byte offset 16-29, stride byte offset 32-45 (all in 16-byte units),
// base offset 49-51, layout 62-63 (0 interleave, 1 128-byte, 2 64-byte, 3 32-byte swizzle).
// K-major: 8-row core groups SBO apart; swizzled rows are `span` bytes apart with k contiguous,
// interleaved core matrices are 8 rows x 16 bytes with the two k halves LBO apart.
// MN-major: swizzled, `span` bytes of MN per k row, 8 k rows per group, groups SBO apart and
// MN chunks of span / 2 elements LBO apart; interleaved, 8 MN x 8 k core matrices, MN groups
// SBO apart and k groups LBO apart.
inline uint32_t operand_address(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
  const int base_offset = int((desc >> 49) & 7), layout = int(desc >> 62);
  if (base_offset != 0) emu::fail("wgmma descriptors with a base offset are not emulated: align swizzled tiles to their pattern");
  const int span = layout == 0 ? 0 : layout == 1 ? 128 : layout == 2 ? 64 : 32;
  if (span && (start & ~uint32_t(span - 1)) % (8 * span))
    emu::fail("a swizzled wgmma operand's rows must start on its swizzle pattern (8 x span bytes)");
  uint32_t a;
  if (!mn_major) {
    if (span)
      a = start + (mn / 8) * sbo + (mn % 8) * span + k * 2;
    else
      a = start + (mn / 8) * sbo + (k / 8) * lbo + (mn % 8) * 16 + (k % 8) * 2;
  } else {
    if (span) {
      const int chunk = span / 2;  // MN elements per row of the pattern
      a = start + (mn / chunk) * lbo + (k / 8) * sbo + (k % 8) * span + (mn % chunk) * 2;
    } else {
      a = start + (mn / 8) * sbo + (k / 8) * lbo + (k % 8) * 16 + (mn % 8) * 2;
    }
  }
  return swizzle_address(a, span);
}

// Read a rows x 16 operand through its descriptor, as the async proxy sees it.
inline std::vector<uint16_t> read_operand(uint64_t desc, bool mn_major, int rows) {
  std::vector<uint16_t> bits(rows * 16);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) {
      const uint32_t a = operand_address(desc, mn_major, r, k);
      if (a % 2) emu::fail("a wgmma operand element at an odd address");
      if (in_flight(a, 2)) emu::fail("a wgmma reads shared memory a bulk copy has not delivered (no mbarrier wait?)");
      std::memcpy(&bits[r * 16 + k], emu::async_at(a, 2), 2);
      if (std::memcmp(&bits[r * 16 + k], emu::smem_at(a, 2), 2))
        emu::fail("a wgmma reads shared memory written by ordinary stores with no fence.proxy.async since");
    }
  return bits;
}

template <typename T>
void issue(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, bool trans_b, bool accumulate) {
  emu::Fiber& f = emu::fibers[emu::current];
  if (!f.wgmma_fenced) emu::fail("a wgmma issued with no wgmma.fence since the last wait_group (or the kernel's start)");
  struct Operands {
    uint64_t desc_a, desc_b;
    uint32_t a[4];
    int accumulate, trans_b;
  };
  Operands mine{desc_a, desc_b, {}, int(accumulate), int(trans_b)};
  if (a_regs) std::memcpy(mine.a, a_regs, sizeof(mine.a));
  const auto all = emu::group_all(mine);
  for (const Operands& o : all)
    if (o.desc_a != mine.desc_a || o.desc_b != mine.desc_b || o.accumulate != mine.accumulate || o.trans_b != mine.trans_b)
      emu::fail("a warpgroup's threads issue one wgmma with different descriptors or flags");

  // The warpgroup's first thread here reads the operands; the others share them.
  const int group = emu::warp_of() / 4, t = emu::linear_thread % 128;
  const long number = state.issued[emu::linear_thread]++;
  std::shared_ptr<WgmmaOp>& slot = state.building[{group, number}];
  if (!slot) {
    slot = std::make_shared<WgmmaOp>();
    WgmmaOp& op = *slot;
    op.n = n, op.a_in_smem = !a_regs, op.trans_b = trans_b, op.desc_a = desc_a, op.desc_b = desc_b;
    op.a.resize(64 * 16);
    if (!a_regs) {
      op.a_bits = read_operand(desc_a, false, 64);
      for (int i = 0; i < 64 * 16; ++i) op.a[i] = value<T>(op.a_bits[i]);
    } else {
      // A in registers: thread t of warp w holds rows 16w + t/4 (+8), k = 2(t%4) (+1, +8), as mma.m16n8k16's A.
      for (int u = 0; u < 128; ++u) {
        const int w = u / 32, g = (u % 32) / 4, c = u % 4;
        for (int reg = 0; reg < 4; ++reg)
          for (int half = 0; half < 2; ++half) {
            const int row = 16 * w + g + 8 * (reg & 1), k = 2 * c + half + 8 * (reg >> 1);
            op.a[row * 16 + k] = value<T>(uint16_t(all[u].a[reg] >> (16 * half)));
          }
      }
    }
    op.b_bits = read_operand(desc_b, trans_b, n);
    op.b.resize(n * 16);
    for (int i = 0; i < n * 16; ++i) op.b[i] = value<T>(op.b_bits[i]);
  }
  std::shared_ptr<WgmmaOp> op = slot;
  if (++op->fetched == 128) state.building.erase({group, number});

  check_fenced(d, n / 2);
  if (a_regs) check_fenced(a_regs, 4);
  // The accumulator's input: the newest pending result for d, or the registers as they are.
  std::vector<float> in(d, d + n / 2);
  const PendingWgmma* newest = nullptr;
  auto consider = [&](const std::shared_ptr<void>& p) {
    auto* q = static_cast<PendingWgmma*>(p.get());
    const long qn = long(q->result.size());
    if (q->d == d) {
      if (q->op->n != n) emu::fail("a wgmma of another shape on accumulators a pending wgmma holds");
      newest = q;
    } else if (q->d < d + n / 2 && d < q->d + qn) {
      emu::fail("a wgmma's accumulators overlap part of a pending wgmma's");
    }
  };
  for (const auto& g : f.wgmma_groups)
    for (const auto& p : g) consider(p);
  for (const auto& p : f.wgmma_open) consider(p);
  if (newest) {
    for (int i = 0; i < n / 2; ++i)
      if (!is_poison(d[i])) emu::fail("wgmma accumulators written while a wgmma on them is pending");
    in = newest->result;
  }
  auto pending = std::make_shared<PendingWgmma>();
  pending->op = op;
  pending->d = d;
  pending->result.resize(n / 2);
  // D layout: thread t of warp w, register i: row 16w + t/4 + 8((i/2)%2), column 8(i/4) + 2(t%4) + i%2.
  const int w = t / 32, g = (t % 32) / 4, c = t % 4;
  for (int i = 0; i < n / 2; ++i) {
    const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * c + (i & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += op->a[row * 16 + k] * op->b[col * 16 + k];
    pending->result[i] = (accumulate ? in[i] : 0.f) + sum;
  }
  for (int i = 0; i < n / 2; ++i) d[i] = poison_float();
  if (a_regs) {
    pending->a = a_regs;
    std::memcpy(pending->a_values, a_regs, sizeof(pending->a_values));
    note_fenced(a_regs, 4);
  }
  note_fenced(d, n / 2);  // this wgmma's own write (the poison) is no unfenced change
  f.wgmma_open.push_back(pending);
}

}  // namespace emulated

// wgmma.fence: registers written by other instructions may now be read by the wgmma that follow.
inline void wgmma_fence() {
  emu::group_all(0);  // .sync.aligned: the whole warpgroup
  emu::fibers[emu::current].wgmma_fenced = true;
  for (auto& [regs, words] : emulated::state.fenced[emu::linear_thread])
    std::memcpy(words.data(), regs, 4 * words.size());
}

// Keeps the compiler from moving accesses to these registers across a wgmma fence or wait (on
// the GPU an empty asm that reads and writes them); nothing to do here.
template <int K>
inline void wgmma_fence_operand(float (&)[K]) {}
template <int K>
inline void wgmma_fence_operand(uint32_t (&)[K]) {}

inline void wgmma_commit() {
  emu::Fiber& f = emu::fibers[emu::current];
  f.wgmma_groups.push_back(std::move(f.wgmma_open));
  f.wgmma_open.clear();
}

// wgmma.wait_group N: every group but the newest N has completed; their accumulators are delivered.
template <int N>
inline void wgmma_wait() {
  emu::group_all(0);
  emu::Fiber& f = emu::fibers[emu::current];
  size_t done = 0;  // operations in the groups that complete now, oldest first
  std::vector<emulated::PendingWgmma*> order;
  for (size_t g = 0; g < f.wgmma_groups.size(); ++g)
    for (const auto& p : f.wgmma_groups[g]) {
      order.push_back(static_cast<emulated::PendingWgmma*>(p.get()));
      if (int(f.wgmma_groups.size() - g) > N) done = order.size();
    }
  for (const auto& p : f.wgmma_open) order.push_back(static_cast<emulated::PendingWgmma*>(p.get()));
  for (size_t i = 0; i < done; ++i) {
    emulated::PendingWgmma& pending = *order[i];
    emulated::WgmmaOp& op = *pending.op;
    if (!op.rechecked) {  // the shared memory it read must not have changed before this wait
      op.rechecked = true;
      if ((op.a_in_smem && emulated::read_operand(op.desc_a, false, 64) != op.a_bits) ||
          emulated::read_operand(op.desc_b, op.trans_b, op.n) != op.b_bits)
        emu::fail("shared memory read by a wgmma changed before its wait_group");
    }
    if (pending.a && std::memcmp(pending.a, pending.a_values, sizeof(pending.a_values)))
      emu::fail("a pending wgmma's A registers changed before its wait_group");
    bool chained = false;  // a later wgmma on the same registers carries this result on
    for (size_t j = i + 1; j < order.size(); ++j) chained |= order[j]->d == pending.d;
    if (chained) continue;
    for (float x : std::vector<float>(pending.d, pending.d + pending.result.size()))
      if (!emulated::is_poison(x)) emu::fail("wgmma accumulators written while a wgmma on them is pending");
    std::memcpy(pending.d, pending.result.data(), pending.result.size() * sizeof(float));
  }
  while (int(f.wgmma_groups.size()) > N) f.wgmma_groups.erase(f.wgmma_groups.begin());
  f.wgmma_fenced = false;
}

// wgmma.mma_async m64nNk16, fp32 accumulators (d: this thread's N/2), A and B from shared memory
// through descriptors; A K-major, B K-major or (TRANS_B) MN-major. accumulate = false: d = A B.
template <typename T, int N, bool TRANS_B>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N is a multiple of 8 up to 256");
  emulated::issue<T>(d, N, nullptr, desc_a, desc_b, TRANS_B, accumulate);
}

// The same with A from registers, in mma.m16n8k16's A layout per warp (warp w: rows 16w..16w+15).
template <typename T, int N, bool TRANS_B>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N is a multiple of 8 up to 256");
  emulated::issue<T>(d, N, a, 0, desc_b, TRANS_B, accumulate);
}

// ---- setmaxnreg -------------------------------------------------------------------------------

// setmaxnreg.{inc,dec}.sync.aligned.u32: the whole warpgroup, one action and one count in [24,
// 256], a multiple of 8; inc may not lower the warpgroup's count, dec may not raise it.
template <int REGS>
inline void setmaxnreg(int increase) {
  static_assert(REGS >= 24 && REGS <= 256 && REGS % 8 == 0, "setmaxnreg takes 24 to 256 registers, a multiple of 8");
  for (int r : emu::group_all(REGS * 2 + increase))
    if (r != REGS * 2 + increase) emu::fail("a warpgroup's threads ask setmaxnreg for different counts or directions");
  auto [it, first] = emulated::state.registers.emplace(emu::warp_of() / 4, REGS);
  if (!first && emu::linear_thread % 128 == 0) {
    if (increase ? it->second > REGS : it->second < REGS) emu::fail("setmaxnreg.inc below, or .dec above, the current count");
  }
  emu::group_all(0);  // every thread has checked before the count changes
  it->second = REGS;
}
template <int REGS>
inline void setmaxnreg_inc() {
  setmaxnreg<REGS>(1);
}
template <int REGS>
inline void setmaxnreg_dec() {
  setmaxnreg<REGS>(0);
}

}  // namespace scratchformer
