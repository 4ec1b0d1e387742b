// CPU versions of the GPU instructions in csrc/kernels/tensor_core.cuh, on top of emulator.h.
// They follow the PTX ISA's fragment layouts (see csrc/kernels/attention.cuh).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emulator.h"

namespace scratchformer {

namespace emulated {
template <typename T>
float value(uint16_t bits);
template <>
inline float value<__half>(uint16_t bits) {
  return __half2float(__half{bits});
}
template <>
inline float value<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__nv_bfloat16{bits});
}
inline void check_aligned(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16) emu::fail(what);
}
}  // namespace emulated

// Shared-window address (dynamic shared memory only), as __cvta_generic_to_shared gives it.
inline uint32_t smem_addr(const void* p) { return emu::smem_window(p); }

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  emulated::check_aligned(row, "ldmatrix row address not 16-byte aligned");
  const auto rows = emu::warp_all(static_cast<const uint16_t*>(row));
  const int lane = emu::lane_of();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* m = rows[8 * i + lane / 4];
    r[i] = uint32_t(m[2 * (lane % 4)]) | uint32_t(m[2 * (lane % 4) + 1]) << 16;
  }
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  emulated::check_aligned(row, "ldmatrix row address not 16-byte aligned");
  const auto rows = emu::warp_all(static_cast<const uint16_t*>(row));
  const int lane = emu::lane_of();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* first = rows[8 * i + 2 * (lane % 4)];
    const uint16_t* second = rows[8 * i + 2 * (lane % 4) + 1];
    r[i] = uint32_t(first[lane / 4]) | uint32_t(second[lane / 4]) << 16;
  }
}

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Fragments {
    uint32_t a[4], b[2];
  };
  const auto all = emu::warp_all(Fragments{{a[0], a[1], a[2], a[3]}, {b0, b1}});
  float A[16][16], B[16][8];
  auto lo = [](uint32_t r) { return emulated::value<T>(uint16_t(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return emulated::value<T>(uint16_t(r >> 16)); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, q = l % 4;
    const Fragments& f = all[l];
    A[g][2 * q] = lo(f.a[0]), A[g][2 * q + 1] = hi(f.a[0]);
    A[g + 8][2 * q] = lo(f.a[1]), A[g + 8][2 * q + 1] = hi(f.a[1]);
    A[g][2 * q + 8] = lo(f.a[2]), A[g][2 * q + 9] = hi(f.a[2]);
    A[g + 8][2 * q + 8] = lo(f.a[3]), A[g + 8][2 * q + 9] = hi(f.a[3]);
    B[2 * q][g] = lo(f.b[0]), B[2 * q + 1][g] = hi(f.b[0]);
    B[2 * q + 8][g] = lo(f.b[1]), B[2 * q + 9][g] = hi(f.b[1]);
  }
  const int lane = emu::lane_of(), g = lane / 4, q = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * q + (e & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[e] += sum;
  }
}

inline int special_register_tid_x() { return threadIdx.x; }

// ex2.approx.ftz.f32: a subnormal input counts as zero, a subnormal result becomes +0.
inline float exp2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  emulated::check_aligned(dst, "cp.async destination not 16-byte aligned");
  if (valid) emulated::check_aligned(src, "cp.async source not 16-byte aligned");
  emu::fibers[emu::current].open.push_back({dst, src, valid});
}

inline void cp_async_commit() {
  emu::Fiber& f = emu::fibers[emu::current];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

template <int PENDING>
inline void cp_async_wait() {
  emu::Fiber& f = emu::fibers[emu::current];
  while (int(f.groups.size()) > PENDING) {
    for (const auto& c : f.groups.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

}  // namespace scratchformer
