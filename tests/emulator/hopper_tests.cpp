// Unit tests of the emulated Hopper instructions (tests/emulator/hopper.cuh), run one per process
// by tests/test_emulator_hopper.py: `hopper_tests NAME key=value...`. Each emulated instruction is
// checked against plain C++ arithmetic on random data, with shared-memory layouts, descriptors and
// register positions taken from gmma_reference.h, an independent definition written from the PTX
// ISA and CUTLASS/CuTe's published layouts. Exit 0 and "ok" when the result matches; the
// emulator's own refusals abort with their message (the tests of deliberate mistakes expect them).
#include <cstdio>
#include <map>
#include <random>
#include <string>

#include "gmma_reference.h"
#include "hopper.cuh"

using namespace scratchformer;
namespace ref = gmma_reference;

namespace {

std::map<std::string, std::string> opts;
int opt(const char* key, int fallback) { return opts.count(key) ? std::stoi(opts[key]) : fallback; }
std::string opt_s(const char* key, const char* fallback) { return opts.count(key) ? opts[key] : fallback; }

ref::Swizzle swizzle_of(int bytes) { return ref::Swizzle(bytes); }
TmaSwizzle tma_swizzle_of(int bytes) {
  return bytes == 0 ? TmaSwizzle::kNone : bytes == 32 ? TmaSwizzle::k32B : bytes == 64 ? TmaSwizzle::k64B : TmaSwizzle::k128B;
}

template <typename T>
uint16_t bits_of(float x);
template <>
uint16_t bits_of<__half>(float x) {
  return __float2half_rn(x).bits;
}
template <>
uint16_t bits_of<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x).bits;
}

template <typename T>
std::vector<uint16_t> random_bits(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = bits_of<T>(normal(rng));
  return v;
}

// C[m][n] = sum_k A[m][k] B[n][k] in double; the emulated result must agree to float rounding.
template <typename T>
int compare_gemm(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, const std::vector<float>& c, int M, int N,
                 int K) {
  double worst = 0;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double sum = 0, mag = 0;
      for (int k = 0; k < K; ++k) {
        const double x = double(emulated::value<T>(a[m * K + k])) * emulated::value<T>(b[n * K + k]);
        sum += x, mag += std::fabs(x);
      }
      const double err = std::fabs(c[m * N + n] - sum) / (1e-6 * mag + 1e-30);
      if (!(err <= 1.0)) {
        std::printf("mismatch at (%d, %d): got %.6g, expected %.6g\n", m, n, c[m * N + n], sum);
        return 1;
      }
      worst = std::max(worst, err);
    }
  std::printf("ok (worst error %.3g of the bound)\n", worst);
  return 0;
}

// The 1024-aligned (in the shared window) start of the dynamic shared memory after `skip` bytes.
unsigned char* aligned_tile(unsigned char* smem, uint32_t skip) {
  const uint32_t window = smem_addr(smem) + skip;
  return smem + skip + (1024 - window % 1024) % 1024;
}

// ---- wgmma: A (64 per warpgroup x K) and B (N x K) from shared memory or A from registers -------

struct GemmParams {
  const uint16_t* a;  // [64 * groups][K], row-major
  const uint16_t* b;  // [N][K]
  float* out;         // [64 * groups][N]
  int k, groups, swizzle, desc_swizzle;
  bool b_mn_major, a_in_registers;
  // Deliberate mistakes.
  bool skip_proxy_fence, skip_wgmma_fence, skip_wait, touch_smem, touch_accumulators, touch_a, write_after_fence;
};

uint64_t with_swizzle_field(uint64_t desc, int swizzle) {  // the layout field alone replaced
  const uint64_t field = swizzle == 0 ? 0 : swizzle == 128 ? 1 : swizzle == 64 ? 2 : 3;
  return (desc & ~(uint64_t(3) << 62)) | field << 62;
}

template <typename T, int N, bool TRANS_B>
void gemm_kernel(GemmParams p) {
  const int M = 64 * p.groups, K = p.k;
  const ref::Swizzle swz = swizzle_of(p.swizzle);
  const ref::Major b_major = TRANS_B ? ref::Major::kMN : ref::Major::kK;
  unsigned char* a_tile = aligned_tile(emu::dynamic_smem(), 0);
  unsigned char* b_tile = aligned_tile(a_tile, M * K * 2);
  const int tid = threadIdx.x;
  for (int i = tid; i < M * K; i += blockDim.x)
    std::memcpy(a_tile + ref::element_offset(ref::Major::kK, swz, M, K, i / K, i % K), &p.a[i], 2);
  for (int i = tid; i < N * K; i += blockDim.x)
    std::memcpy(b_tile + ref::element_offset(b_major, swz, N, K, i / K, i % K), &p.b[i], 2);
  if (!p.skip_proxy_fence) fence_proxy_async();
  __syncthreads();

  const int g = tid / 128, t = tid % 128;
  float d[N / 2];
  // A in registers: written before the fence, held until the wait (a pending wgmma reads them).
  uint32_t a_regs[8][4];  // K <= 128
  for (int ks = 0; p.a_in_registers && ks < K / 16; ++ks)
    for (int reg = 0; reg < 4; ++reg) {
      a_regs[ks][reg] = 0;
      for (int half = 0; half < 2; ++half) {
        int row, k;
        ref::a_fragment_position(t, reg, half, &row, &k);
        a_regs[ks][reg] |= uint32_t(p.a[(64 * g + row) * K + 16 * ks + k]) << (16 * half);
      }
    }
  if (!p.skip_wgmma_fence) wgmma_fence();
  for (int ks = 0; ks < K / 16; ++ks) {
    const uint64_t db = with_swizzle_field(ref::descriptor(b_major, swz, N, K, smem_addr(b_tile), 0, 16 * ks), p.desc_swizzle);
    if (p.a_in_registers) {
      wgmma_rs<T, N, TRANS_B>(d, a_regs[ks], db, ks > 0);
    } else {
      const uint64_t da =
          with_swizzle_field(ref::descriptor(ref::Major::kK, swz, M, K, smem_addr(a_tile), 64 * g, 16 * ks), p.desc_swizzle);
      wgmma_ss<T, N, TRANS_B>(d, da, db, ks > 0);
    }
  }
  wgmma_commit();
  if (p.touch_smem && tid == 0) {  // a change the async proxy sees, before the wait
    b_tile[0] ^= 1;
    fence_proxy_async();
  }
  if (p.touch_accumulators) d[0] = 0.f;
  if (p.touch_a) a_regs[0][0] ^= 1;
  if (!p.skip_wait) wgmma_wait<0>();
  if (p.write_after_fence) {  // accumulators written between the fence and the wgmma that adds to them
    wgmma_fence();
    d[0] = 1.f;
    wgmma_ss<T, N, TRANS_B>(d, ref::descriptor(ref::Major::kK, swz, M, K, smem_addr(a_tile), 64 * g, 0),
                            ref::descriptor(b_major, swz, N, K, smem_addr(b_tile), 0, 0), true);
    wgmma_commit();
    wgmma_wait<0>();
  }
  for (int i = 0; i < N / 2; ++i) {
    int row, col;
    ref::accumulator_position(N, t, i, &row, &col);
    p.out[(64 * g + row) * N + col] = d[i];
  }
  if (p.skip_wait) wgmma_wait<0>();  // the read above came first: it saw what was there
}

template <typename T, int N>
int run_gemm() {
  GemmParams p{};
  p.k = opt("k", 64), p.groups = opt("groups", 2), p.swizzle = opt("swizzle", 128);
  p.desc_swizzle = opt("desc_swizzle", p.swizzle);
  p.b_mn_major = opt_s("b", "k") == "mn", p.a_in_registers = opt_s("a", "smem") == "regs";
  p.skip_proxy_fence = opt("skip_proxy_fence", 0), p.skip_wgmma_fence = opt("skip_wgmma_fence", 0);
  p.skip_wait = opt("skip_wait", 0), p.touch_smem = opt("touch_smem", 0), p.touch_accumulators = opt("touch_accumulators", 0);
  p.touch_a = opt("touch_a", 0), p.write_after_fence = opt("write_after_fence", 0);
  const int M = 64 * p.groups, K = p.k;
  const auto a = random_bits<T>(size_t(M) * K, 1), b = random_bits<T>(size_t(N) * K, 2);
  std::vector<float> out(size_t(M) * N, -1.f);
  p.a = a.data(), p.b = b.data(), p.out = out.data();
  const int smem = (M + N) * K * 2 + 3 * 1024;
  auto kernel = p.b_mn_major ? gemm_kernel<T, N, true> : gemm_kernel<T, N, false>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  emu::launch(kernel, dim3(1), dim3(128 * p.groups), smem, nullptr, p);
  if (p.skip_wait) {
    int nan = 0;
    for (float x : out) nan += std::isnan(x);
    std::printf("%d of %zu accumulators read before the wait were NaN\n", nan, out.size());
    return nan == int(out.size()) ? 0 : 1;
  }
  return compare_gemm<T>(a, b, out, M, N, K);
}

template <typename T>
int gemm_for_type() {
  switch (opt("n", 64)) {
    case 8: return run_gemm<T, 8>();
    case 64: return run_gemm<T, 64>();
    case 96: return run_gemm<T, 96>();
    case 128: return run_gemm<T, 128>();
    case 256: return run_gemm<T, 256>();
  }
  std::printf("unsupported n\n");
  return 2;
}

int test_gemm() { return opt_s("dtype", "bf16") == "f16" ? gemm_for_type<__half>() : gemm_for_type<__nv_bfloat16>(); }

// scale-d = 0 ignores what the registers hold; two groups complete one wait at a time.
template <typename T>
void groups_kernel(GemmParams p) {
  unsigned char* a_tile = aligned_tile(emu::dynamic_smem(), 0);
  unsigned char* b_tile = aligned_tile(a_tile, 64 * 16 * 2);
  for (int i = threadIdx.x; i < 64 * 16; i += 128) {
    std::memcpy(a_tile + ref::element_offset(ref::Major::kK, ref::Swizzle::k32B, 64, 16, i / 16, i % 16), &p.a[i], 2);
    std::memcpy(b_tile + ref::element_offset(ref::Major::kK, ref::Swizzle::k32B, 64, 16, i / 16, i % 16), &p.b[i], 2);
  }
  fence_proxy_async();
  __syncthreads();
  const uint64_t da = ref::descriptor(ref::Major::kK, ref::Swizzle::k32B, 64, 16, smem_addr(a_tile), 0, 0);
  const uint64_t db = ref::descriptor(ref::Major::kK, ref::Swizzle::k32B, 64, 16, smem_addr(b_tile), 0, 0);
  float first[32], second[32];
  for (float& x : first) x = 1e30f;  // scale-d = 0: never added
  wgmma_fence();
  wgmma_ss<T, 64, false>(first, da, db, false);
  wgmma_commit();
  wgmma_ss<T, 64, false>(second, da, db, false);
  wgmma_ss<T, 64, false>(second, da, db, true);  // chained in one group: 2 A B
  wgmma_commit();
  wgmma_wait<1>();
  const int t = threadIdx.x;
  int pending_nan = 0;
  for (float x : second) pending_nan += std::isnan(x);
  for (int i = 0; i < 32; ++i) {
    int row, col;
    ref::accumulator_position(64, t, i, &row, &col);
    p.out[row * 64 + col] = first[i];
  }
  wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) {
    int row, col;
    ref::accumulator_position(64, t, i, &row, &col);
    p.out[64 * 64 + row * 64 + col] = second[i] / 2;
  }
  p.out[2 * 64 * 64 + t] = float(pending_nan);
}

int test_groups() {
  using T = __nv_bfloat16;
  const auto a = random_bits<T>(64 * 16, 3), b = random_bits<T>(64 * 16, 4);
  std::vector<float> out(2 * 64 * 64 + 128);
  GemmParams p{};
  p.a = a.data(), p.b = b.data(), p.out = out.data();
  emu::launch(groups_kernel<T>, dim3(1), dim3(128), 8 * 1024, nullptr, p);
  for (int t = 0; t < 128; ++t)
    if (out[2 * 64 * 64 + t] != 32) {
      std::printf("the second group's accumulators were readable before its wait (thread %d)\n", t);
      return 1;
    }
  std::vector<float> first(out.begin(), out.begin() + 64 * 64), second(out.begin() + 64 * 64, out.begin() + 2 * 64 * 64);
  return compare_gemm<T>(a, b, first, 64, 64, 16) || compare_gemm<T>(a, b, second, 64, 64, 16);
}

// ---- bulk tensor copies -----------------------------------------------------------------------

struct CopyParams {
  CUtensorMap map;
  int coords[4];
  long bytes;
  unsigned char* out;  // the shared-memory image of the destination
  bool read_early, skip_fence, plain_arrive;
};

void copy_kernel(CopyParams p) {
  auto* bar = reinterpret_cast<uint64_t*>(emu::dynamic_smem());
  unsigned char* dst = aligned_tile(emu::dynamic_smem(), 8);
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    if (!p.skip_fence) fence_mbarrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (p.plain_arrive)  // the phase completes at once: nothing waits for the copy
      mbarrier_arrive(bar);
    else
      mbarrier_arrive_expect_tx(bar, uint32_t(p.bytes));
    emulated::tma_load(dst, &p.map, bar, p.map.rank, p.coords);
  }
  if (!p.read_early) mbarrier_wait(bar, 0);
  __syncthreads();
  if (threadIdx.x == 0) {
    std::memcpy(p.out, dst, p.bytes);
    if (p.read_early) mbarrier_wait(bar, 0);  // after the read: it saw what was there
  }
}

int test_copy() {
  const int rank = opt("rank", 2), swizzle = opt("swizzle", 128), elem = 2;
  // A [d3][d2][d1][d0] tensor of 16-bit values whose rows are padded (strides beyond the extents).
  uint64_t dims[4] = {uint64_t(opt("d0", 100)), uint64_t(opt("d1", 50)), 3, 2};
  const uint64_t pitch0 = (dims[0] * elem + 31) / 16 * 16;  // bytes per row: a multiple of 16, with padding
  uint64_t strides[3] = {pitch0, pitch0 * (dims[1] + 1), pitch0 * (dims[1] + 1) * 4};
  const uint64_t total = strides[2] * dims[3] / elem;
  std::vector<uint16_t> global(total);
  std::mt19937 rng(5);
  for (auto& x : global) x = uint16_t(rng() % 65535 + 1);  // never 0: zero fill is visible
  const int box0 = swizzle ? swizzle / elem : opt("box0", 40);
  uint32_t box[4] = {uint32_t(box0), uint32_t(opt("box1", 16)), 2, 2};
  CopyParams p{};
  if (const char* err = make_tensor_map(&p.map, global.data(), elem, rank, dims, strides, box, tma_swizzle_of(swizzle))) {
    std::printf("make_tensor_map: %s\n", err);
    return 1;
  }
  const int coords[4] = {opt("c0", -8), opt("c1", 40), opt("c2", 1), opt("c3", 1)};
  p.bytes = elem;
  for (int i = 0; i < rank; ++i) p.coords[i] = coords[i], p.bytes *= box[i];
  std::vector<unsigned char> out(p.bytes);
  p.out = out.data();
  p.read_early = opt("read_early", 0), p.skip_fence = opt("skip_fence", 0), p.plain_arrive = opt("plain_arrive", 0);
  emu::launch(copy_kernel, dim3(1), dim3(64), p.bytes + 2048, nullptr, p);
  if (p.read_early) {
    long garbage = 0;
    for (unsigned char c : out) garbage += c == 0xff;
    std::printf("%ld of %ld bytes read before the wait were garbage\n", garbage, p.bytes);
    return garbage == p.bytes ? 0 : 1;
  }
  const long cols = box[0], rows = p.bytes / elem / cols;
  long zeros = 0;
  for (long e = 0; e < rows * cols; ++e) {
    long rest = e, offset = 0;
    bool inside = true;
    for (int i = 0; i < rank; ++i) {
      const long x = coords[i] + rest % box[i];
      rest /= box[i];
      inside &= x >= 0 && x < long(dims[i]);
      offset += x * long(i == 0 ? elem : strides[i - 1]);
    }
    const uint16_t want = inside ? global[offset / elem] : 0;
    uint16_t got;
    std::memcpy(&got, &out[ref::tma_box_offset(swizzle_of(swizzle), elem, int(rows), int(cols), int(e / cols), int(e % cols))], 2);
    if (got != want) {
      std::printf("mismatch at box element %ld: got %u, expected %u\n", e, got, want);
      return 1;
    }
    zeros += !inside;
  }
  std::printf("ok (%ld of %ld elements outside the tensor, zero-filled)\n", zeros, rows * cols);
  return 0;
}

// ---- a warp-specialised pipeline: TMA producer, wgmma consumer, full/empty mbarriers ---------

struct PipeParams {
  CUtensorMap q_map, k_map;  // Q [64][64], K [tiles * 64][64], bf16, 128-byte swizzle
  int tiles, stages;
  float* out;  // [tiles][64][64]: S_j = Q K_j^T
  bool skip_full_wait, skip_empty_wait;
};

void pipeline_kernel(PipeParams p) {
  constexpr int kTile = 64 * 64 * 2;
  auto* bars = reinterpret_cast<uint64_t*>(emu::dynamic_smem());  // q, full[stages], empty[stages]
  uint64_t *q_bar = bars, *full = bars + 1, *empty = bars + 1 + p.stages;
  unsigned char* q_tile = aligned_tile(emu::dynamic_smem(), 8 * (1 + 2 * p.stages));
  unsigned char* k_tiles = q_tile + kTile;
  const int tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(q_bar, 1);
    for (int s = 0; s < p.stages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], 4);  // one arrival per consumer warp
    }
    fence_mbarrier_init();
  }
  __syncthreads();
  if (tid < 128) {  // producer warpgroup: one thread issues the copies
    setmaxnreg_dec<40>();
    if (tid == 0) {
      mbarrier_arrive_expect_tx(q_bar, kTile);
      tma_load_2d(q_tile, &p.q_map, q_bar, 0, 0);
      for (int j = 0; j < p.tiles; ++j) {
        const int s = j % p.stages;
        if (!p.skip_empty_wait) mbarrier_wait(&empty[s], ((j / p.stages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(&full[s], kTile);
        tma_load_2d(k_tiles + s * kTile, &p.k_map, &full[s], 0, j * 64);
      }
    }
  } else {  // consumer warpgroup
    setmaxnreg_inc<232>();
    const int t = tid - 128;
    mbarrier_wait(q_bar, 0);
    for (int j = 0; j < p.tiles; ++j) {
      const int s = j % p.stages;
      if (!p.skip_full_wait) mbarrier_wait(&full[s], (j / p.stages) & 1);
      float acc[32];
      wgmma_fence();
      for (int ks = 0; ks < 4; ++ks) {
        const uint64_t dq = ref::descriptor(ref::Major::kK, ref::Swizzle::k128B, 64, 64, smem_addr(q_tile), 0, 16 * ks);
        const uint64_t dk = ref::descriptor(ref::Major::kK, ref::Swizzle::k128B, 64, 64, smem_addr(k_tiles + s * kTile), 0, 16 * ks);
        wgmma_ss<__nv_bfloat16, 64, false>(acc, dq, dk, ks > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      if (t % 32 == 0) mbarrier_arrive(&empty[s]);
      for (int i = 0; i < 32; ++i) {
        int row, col;
        ref::accumulator_position(64, t, i, &row, &col);
        p.out[(j * 64 + row) * 64 + col] = acc[i];
      }
    }
  }
}

int test_pipeline() {
  using T = __nv_bfloat16;
  PipeParams p{};
  p.tiles = opt("tiles", 5), p.stages = opt("stages", 2);
  p.skip_full_wait = opt("skip_full_wait", 0), p.skip_empty_wait = opt("skip_empty_wait", 0);
  const auto q = random_bits<T>(64 * 64, 6), k = random_bits<T>(size_t(p.tiles) * 64 * 64, 7);
  const uint64_t q_dims[2] = {64, 64}, k_dims[2] = {64, uint64_t(p.tiles) * 64}, stride[1] = {128};
  const uint32_t box[2] = {64, 64};
  if (make_tensor_map(&p.q_map, q.data(), 2, 2, q_dims, stride, box, TmaSwizzle::k128B) ||
      make_tensor_map(&p.k_map, k.data(), 2, 2, k_dims, stride, box, TmaSwizzle::k128B))
    return 2;
  std::vector<float> out(size_t(p.tiles) * 64 * 64);
  p.out = out.data();
  const int smem = (1 + p.stages) * 64 * 64 * 2 + 2048;
  cudaFuncSetAttribute(pipeline_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  emu::launch(pipeline_kernel, dim3(1), dim3(256), smem, nullptr, p);
  for (int j = 0; j < p.tiles; ++j) {
    std::vector<uint16_t> kj(k.begin() + j * 64 * 64, k.begin() + (j + 1) * 64 * 64);
    std::vector<float> sj(out.begin() + j * 64 * 64, out.begin() + (j + 1) * 64 * 64);
    if (compare_gemm<T>(q, kj, sj, 64, 64, 64)) return 1;
  }
  return 0;
}

// ---- mbarrier phases, named barriers, and the rules ------------------------------------------

struct SyncParams {
  int* out;
  int mode;
};

// Two warpgroups take turns through named barriers; a third party counts an mbarrier's phases.
void turns_kernel(SyncParams p) {
  auto* bar = reinterpret_cast<uint64_t*>(emu::dynamic_smem());
  int* log = reinterpret_cast<int*>(emu::dynamic_smem() + 64);
  const int tid = threadIdx.x, g = tid / 128;
  if (tid == 0) {
    mbarrier_init(bar, 256);
    log[0] = log[7] = 0;
  }
  __syncthreads();
  for (int round = 0; round < 3; ++round) {
    if (g == 1) named_barrier_sync(1 + round % 2, 256);  // wait for warpgroup 0's turn to end
    if (tid % 128 == 0) log[1 + log[0]++] = g;
    if (g == 0) named_barrier_arrive(1 + round % 2, 256);
    mbarrier_arrive(bar);
    mbarrier_wait(bar, round & 1);  // phase `round` completes once all 256 arrived
    if (tid == 0) log[8 + round] = mbarrier_try_wait(bar, round & 1) && !mbarrier_try_wait(bar, (round + 1) & 1);
    __syncthreads();
  }
  if (p.mode == 1 && tid == 0) mbarrier_wait(bar, 1);  // phase 3 never completes: a deadlock
  if (tid == 0)
    for (int i = 0; i < 11; ++i) p.out[i] = log[i];
}

int test_turns() {
  SyncParams p{};
  int out[11] = {};
  p.out = out, p.mode = opt("mode", 0);
  emu::launch(turns_kernel, dim3(1), dim3(256), 256, nullptr, p);
  const int want[11] = {6, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1};
  for (int i = 0; i < 11; ++i)
    if (out[i] != want[i]) {
      std::printf("mismatch at %d: got %d, expected %d\n", i, out[i], want[i]);
      return 1;
    }
  std::printf("ok\n");
  return 0;
}

void rules_kernel(SyncParams p) {
  switch (p.mode) {
    case 0: wgmma_fence(); break;  // in a block of 96 threads
    case 1:
      if (threadIdx.x < 64)
        setmaxnreg_inc<232>();
      else
        setmaxnreg_inc<240>();
      break;
    case 2: mbarrier_arrive(reinterpret_cast<uint64_t*>(emu::dynamic_smem())); break;
    case 3:  // up, then "down" to more
      setmaxnreg_inc<232>();
      setmaxnreg_dec<240>();
      break;
    case 4:  // half the warpgroup up, half down
      if (threadIdx.x < 64)
        setmaxnreg_inc<232>();
      else
        setmaxnreg_dec<232>();
      break;
    case 5:  // warp 0 arrives twice at a barrier of 64 threads that warp 1 never reaches
      if (threadIdx.x < 32) {
        named_barrier_arrive(1, 64);
        named_barrier_arrive(1, 64);
      }
      break;
    case 6:
      if (threadIdx.x == 0) {
        mbarrier_init(reinterpret_cast<uint64_t*>(emu::dynamic_smem()), 1);
        mbarrier_init(reinterpret_cast<uint64_t*>(emu::dynamic_smem()), 1);
      }
      break;
    case 8:  // an arrival nobody syncs on
      if (threadIdx.x < 32) named_barrier_arrive(2, 64);
      break;
    case 7: {  // one arrival too many in a phase still waiting for bytes
      auto* bar = reinterpret_cast<uint64_t*>(emu::dynamic_smem());
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_arrive_expect_tx(bar, 64);
        mbarrier_arrive(bar);
      }
      break;
    }
  }
}

int test_rules() {
  SyncParams p{};
  p.mode = opt("mode", 0);
  emu::launch(rules_kernel, dim3(1), dim3(p.mode == 0 ? 96 : 128), 64, nullptr, p);
  std::printf("no rule broken\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: hopper_tests gemm|groups|copy|pipeline|turns|rules [key=value...]\n");
    return 2;
  }
  for (int i = 2; i < argc; ++i) {
    const std::string kv = argv[i];
    const auto eq = kv.find('=');
    opts[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  const std::string name = argv[1];
  if (name == "gemm") return test_gemm();
  if (name == "groups") return test_groups();
  if (name == "copy") return test_copy();
  if (name == "pipeline") return test_pipeline();
  if (name == "turns") return test_turns();
  if (name == "rules") return test_rules();
  std::fprintf(stderr, "unknown test %s\n", name.c_str());
  return 2;
}
