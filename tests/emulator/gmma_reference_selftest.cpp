// Self-consistency checks of gmma_reference.h that need no emulator and no GPU.
// Build: g++ -std=c++17 -O1 -Wall tests/emulator/gmma_reference_selftest.cpp -o /tmp/gmma_selftest
#include "gmma_reference.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace gmma_reference;

namespace {

long checks = 0;

void expect(bool ok, const char* what, long a = 0, long b = 0) {
  ++checks;
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s (%ld vs %ld)\n", what, a, b);
    std::abort();
  }
}

const Swizzle kModes[] = {Swizzle::kNone, Swizzle::k32B, Swizzle::k64B, Swizzle::k128B};
const Major kMajors[] = {Major::kK, Major::kMN};

int span_of(Swizzle s) { return s == Swizzle::kNone ? 16 : int(s); }  // bytes along the contiguous dim per atom row
int log2_units(Swizzle s) { return s == Swizzle::kNone ? 0 : s == Swizzle::k32B ? 1 : s == Swizzle::k64B ? 2 : 3; }

// Atom extents written out again from the atom definitions (not taken from the header).
int atom_mn(Major m, Swizzle s) { return m == Major::kK ? 8 : span_of(s) / 2; }
int atom_k(Major m, Swizzle s) { return m == Major::kK ? span_of(s) / 2 : 8; }

// The hardware swizzle written out as "16-byte chunk index XOR 128-byte line index" on an address.
long xor_chunks(Swizzle s, long addr) {
  const long units = 1L << log2_units(s);  // chunks per span
  const long line = (addr >> 7) & (units - 1);
  return addr ^ (line << 4);
}

// 1. element_offset is a bijection from the tile's elements onto its 2-byte slots.
void check_bijection() {
  const int sizes[][2] = {{64, 64}, {128, 64}, {64, 128}, {192, 128}, {128, 192}, {256, 64}, {8, 8},
                          {16, 16}, {8, 32}, {32, 8}, {24, 48}};
  int tiles = 0;
  for (Major m : kMajors)
    for (Swizzle s : kModes)
      for (auto& sz : sizes) {
        const int MN = sz[0], K = sz[1];
        if (MN % atom_mn(m, s) || K % atom_k(m, s)) continue;
        std::vector<int> used(size_t(MN) * K, 0);
        for (int mn = 0; mn < MN; ++mn)
          for (int k = 0; k < K; ++k) {
            const long off = element_offset(m, s, MN, K, mn, k);
            expect(off >= 0 && off < 2L * MN * K && off % 2 == 0, "element_offset in range and 2-aligned", off);
            used[off / 2]++;
          }
        for (int u : used) expect(u == 1, "every 2-byte slot used exactly once", u, 1);
        ++tiles;
      }
  std::printf("element_offset bijection: %d tiles ok\n", tiles);
}

// 2. K-major SW128, 64 x 64: the explicit Swizzle<3,4,3> formula (row r is 128 bytes; 16-byte chunk
//    k/8 lands at chunk (k/8) ^ (r % 8)); also SW64/SW32/INTER written out by hand.
void check_explicit_formulas() {
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 64; ++k) {
      const long want = r * 128L + (((k / 8) ^ (r % 8)) * 16L) + (k % 8) * 2L;
      expect(element_offset(Major::kK, Swizzle::k128B, 64, 64, r, k) == want, "K SW128 64x64 formula",
             element_offset(Major::kK, Swizzle::k128B, 64, 64, r, k), want);
    }
  // K-major SW64, 64 x 32: rows of 64 bytes; chunk (k/8) ^ ((r/2) % 4).
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 32; ++k) {
      const long want = r * 64L + (((k / 8) ^ ((r / 2) % 4)) * 16L) + (k % 8) * 2L;
      expect(element_offset(Major::kK, Swizzle::k64B, 64, 32, r, k) == want, "K SW64 64x32 formula");
    }
  // K-major SW32, 64 x 16: rows of 32 bytes; chunk (k/8) ^ ((r/4) % 2).
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 16; ++k) {
      const long want = r * 32L + (((k / 8) ^ ((r / 4) % 2)) * 16L) + (k % 8) * 2L;
      expect(element_offset(Major::kK, Swizzle::k32B, 64, 16, r, k) == want, "K SW32 64x16 formula");
    }
  // K-major INTERLEAVE, 64 x 32: 8x8 core matrices of 128 bytes, down MN first, then along K.
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 32; ++k) {
      const long want = ((r / 8) + 8L * (k / 8)) * 128 + (r % 8) * 16 + (k % 8) * 2;
      expect(element_offset(Major::kK, Swizzle::kNone, 64, 32, r, k) == want, "K INTER 64x32 formula");
    }
  // MN-major SW128, 64 (MN) x 16 (K): each K row is 128 bytes of MN; chunk (mn/8) ^ (k % 8).
  for (int mn = 0; mn < 64; ++mn)
    for (int k = 0; k < 16; ++k) {
      const long want = k * 128L + (((mn / 8) ^ (k % 8)) * 16L) + (mn % 8) * 2L;
      expect(element_offset(Major::kMN, Swizzle::k128B, 64, 16, mn, k) == want, "MN SW128 64x16 formula");
    }
  // K-major SW128 128 x 128: second K atom column starts after all 16 MN atoms (tile_to_shape order).
  expect(element_offset(Major::kK, Swizzle::k128B, 128, 128, 0, 64) == 16 * 1024, "K SW128 K-atom order");
  expect(element_offset(Major::kK, Swizzle::k128B, 128, 128, 8, 0) == 1024, "K SW128 MN-atom order");
  std::printf("explicit swizzle formulas: ok\n");
}

// 3. TMA boxes vs. the GMMA layouts.
void check_tma() {
  // (a) K-major: a rows x cols box of 16-bit elements with cols * 2 == span is the K-major atom layout.
  for (Swizzle s : kModes) {
    const int cols = span_of(s) / 2;
    for (int rows : {8, 64, 128, 256}) {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c)
          expect(tma_box_offset(s, 2, rows, cols, r, c) == element_offset(Major::kK, s, rows, cols, r, c),
                 "TMA box == K-major element_offset", tma_box_offset(s, 2, rows, cols, r, c),
                 element_offset(Major::kK, s, rows, cols, r, c));
    }
  }
  // (b) MN-major: a box whose inner extent is the MN span and whose rows are K is the MN-major layout.
  for (Swizzle s : kModes) {
    const int cols = span_of(s) / 2;  // MN elements
    for (int rows : {8, 16, 64}) {     // K
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c)
          expect(tma_box_offset(s, 2, rows, cols, r, c) == element_offset(Major::kMN, s, cols, rows, c, r),
                 "TMA box == MN-major element_offset");
    }
  }
  // (c) a wide K-major tile (K = 2 atoms) loaded as two boxes, the second at the next K-atom column.
  {
    const int MN = 64, K = 128;
    for (int r = 0; r < MN; ++r)
      for (int k = 0; k < K; ++k) {
        const long box_base = (k / 64) * long(MN) * 128;
        expect(box_base + tma_box_offset(Swizzle::k128B, 2, MN, 64, r, k % 64) ==
                   element_offset(Major::kK, Swizzle::k128B, MN, K, r, k),
               "two 64-wide boxes == K-major SW128 tile");
      }
  }
  // (d) no swizzle: dense row-major; other element sizes with pitch == span are the chunk XOR.
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 40; ++c)
      expect(tma_box_offset(Swizzle::kNone, 4, 16, 40, r, c) == r * 160L + c * 4L, "TMA none is dense");
  for (Swizzle s : {Swizzle::k32B, Swizzle::k64B, Swizzle::k128B})
    for (int eb : {1, 4, 8}) {
      const int cols = span_of(s) / eb;
      for (int r = 0; r < 32; ++r)
        for (int c = 0; c < cols; ++c)
          expect(tma_box_offset(s, eb, 32, cols, r, c) == xor_chunks(s, long(r) * span_of(s) + long(c) * eb),
                 "TMA swizzle == 16B chunk XOR 128B line");
    }
  // (e) pitch < span (the modelled case): still a bijection onto the box when rows * pitch is a
  //     multiple of 128 bytes.
  int narrow = 0;
  for (Swizzle s : {Swizzle::k64B, Swizzle::k128B})
    for (int pitch = 16; pitch < span_of(s); pitch *= 2)
      for (int rows : {8, 16, 64}) {
        if ((rows * pitch) % 128) continue;
        const int cols = pitch / 2;
        std::vector<int> used(size_t(rows) * cols, 0);
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c) {
            const long off = tma_box_offset(s, 2, rows, cols, r, c);
            expect(off >= 0 && off < long(rows) * pitch, "narrow box offset in range", off);
            used[off / 2]++;
          }
        for (int u : used) expect(u == 1, "narrow box bijection");
        ++narrow;
      }
  // (f) the driver's box rules are enforced.
  bool threw = false;
  try { tma_box_offset(Swizzle::k64B, 2, 8, 64, 0, 0); } catch (const std::invalid_argument&) { threw = true; }
  expect(threw, "inner extent > span rejected");
  threw = false;
  try { tma_box_offset(Swizzle::kNone, 2, 8, 4, 0, 0); } catch (const std::invalid_argument&) { threw = true; }
  expect(threw, "inner extent not a multiple of 16 bytes rejected");
  std::printf("tma_box_offset: ok (%d narrow-box bijections)\n", narrow);
}

// 4. Descriptors. (a) hand-computed field values; (b) an interpreter of the canonical layouts of
//    PTX / make_gmma_desc, driven only by the decoded fields, reproduces element_offset for every
//    element of the operand block.
long desc_address(uint64_t d, Major major, int m, int k) {
  const DescriptorFields f = decode_descriptor(d);
  const Swizzle s = f.layout_type == 0 ? Swizzle::kNone
                    : f.layout_type == 1 ? Swizzle::k128B
                    : f.layout_type == 2 ? Swizzle::k64B
                                         : Swizzle::k32B;
  const long W = 1L << log2_units(s);
  const long start = f.start_address / 16, lbo = f.lbo / 16, sbo = f.sbo / 16;
  long unit, byte_in_unit;  // 16-byte unit index, byte inside the unit
  if (major == Major::kK) {
    // ((8,m),(T,2)) : ((W*T or 1T, SBO), (1, LBO or T))  in 16-byte units: row step W, 8-row step SBO,
    // second K chunk LBO (INTERLEAVE) or the next unit (swizzled).
    const long kchunk = s == Swizzle::kNone ? (k / 8) * lbo : (k / 8);
    unit = start + (m % 8) * W + (m / 8) * sbo + kchunk;
    byte_in_unit = (k % 8) * 2;
  } else if (s == Swizzle::kNone) {
    // ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
    unit = start + (m / 8) * sbo + (k % 8) + (k / 8) * lbo;
    byte_in_unit = (m % 8) * 2;
  } else {
    // ((T,W,m),(8,k)) : ((1,T,LBO),(W*T,SBO))
    unit = start + ((m / 8) % W) + (m / (8 * W)) * lbo + (k % 8) * W + (k / 8) * sbo;
    byte_in_unit = (m % 8) * 2;
  }
  return xor_chunks(s, unit * 16 + byte_in_unit);
}

void check_descriptors() {
  // (a) hand-computed examples.
  {
    // K-major SW128, 128 x 64 tile at 0x1000; sub-matrix (64, 32): start = 0x1000 + 8 atoms * 1024 + 64.
    const uint64_t d = descriptor(Major::kK, Swizzle::k128B, 128, 64, 0x1000, 64, 32);
    const DescriptorFields f = decode_descriptor(d);
    expect(f.start_address == 0x1000 + 8 * 1024 + 64, "K SW128 start", f.start_address, 0x1000 + 8 * 1024 + 64);
    expect(f.lbo == 16 && f.sbo == 1024, "K SW128 LBO=1 unit, SBO=1024 B", f.lbo, f.sbo);
    expect(f.base_offset == 0 && f.layout_type == 1, "K SW128 base 0, type 1");
    expect((d & 0x3FFF) == ((0x1000 + 8 * 1024 + 64) >> 4), "start field raw");
    expect(((d >> 16) & 0x3FFF) == 1 && ((d >> 32) & 0x3FFF) == 64, "raw LBO 1, SBO 64");
    expect(d >> 62 == 1, "bits 62-63 = 1 for 128B");
    expect(d == ((uint64_t(1) << 62) | (uint64_t(64) << 32) | (uint64_t(1) << 16) | ((0x1000 + 8 * 1024 + 64) >> 4)),
           "K SW128 whole descriptor");
  }
  {
    // K-major INTERLEAVE, 64 x 32 at 0: LBO = 64 rows * 16 B = 1024, SBO = 128; k0 = 16 -> start 2048.
    const DescriptorFields f = decode_descriptor(descriptor(Major::kK, Swizzle::kNone, 64, 32, 0, 0, 16));
    expect(f.lbo == 1024 && f.sbo == 128 && f.layout_type == 0 && f.start_address == 2048, "K INTER fields",
           f.lbo, f.sbo);
  }
  {
    // K-major SW64 / SW32: SBO 512 / 256, LBO 16 (field 1); types 2 / 3.
    const DescriptorFields a = decode_descriptor(descriptor(Major::kK, Swizzle::k64B, 64, 64, 0x2000, 0, 16));
    expect(a.sbo == 512 && a.lbo == 16 && a.layout_type == 2 && a.start_address == 0x2000 + 32, "K SW64 fields");
    const DescriptorFields b = decode_descriptor(descriptor(Major::kK, Swizzle::k32B, 64, 32, 0x2000, 0, 16));
    expect(b.sbo == 256 && b.lbo == 16 && b.layout_type == 3 && b.start_address == 0x2000 + 64 * 32,
           "K SW32 fields (second K atom column)", b.start_address);
  }
  {
    // MN-major SW128, 128 (N) x 64 (K) tile: LBO = 1024 (next 64 N), SBO = 128*16 = 2048 (next 8 K).
    const DescriptorFields f = decode_descriptor(descriptor(Major::kMN, Swizzle::k128B, 128, 64, 0, 0, 16));
    expect(f.lbo == 1024 && f.sbo == 2048 && f.layout_type == 1, "MN SW128 fields", f.lbo, f.sbo);
    expect(f.start_address == 2 * 2 * 1024, "MN SW128 k0=16 start = two K atoms of the 2-wide MN column");
    // MN-major INTERLEAVE 64 x 32: SBO = 128 (next 8 MN), LBO = 64*16 = 1024 (next 8 K).
    const DescriptorFields g = decode_descriptor(descriptor(Major::kMN, Swizzle::kNone, 64, 32, 0, 0, 0));
    expect(g.sbo == 128 && g.lbo == 1024 && g.layout_type == 0, "MN INTER fields", g.lbo, g.sbo);
  }
  {
    // CUTLASS's zeros in single-repeat fields (the 8-argument form).
    expect(decode_descriptor(descriptor(Major::kMN, Swizzle::k128B, 128, 64, 0, 0, 0, 64)).lbo == 0,
           "A 64 rows, MN SW128: CUTLASS LBO 0");
    expect(decode_descriptor(descriptor(Major::kMN, Swizzle::k128B, 128, 64, 0, 0, 0, 128)).lbo == 1024,
           "B N=128, MN SW128: LBO 1024");
    expect(decode_descriptor(descriptor(Major::kMN, Swizzle::k64B, 64, 64, 0, 0, 0, 64)).lbo == 512,
           "A 64 rows, MN SW64: LBO 512");
    expect(decode_descriptor(descriptor(Major::kK, Swizzle::k128B, 64, 64, 0, 0, 0, 8)).sbo == 0,
           "B N=8, K SW128: CUTLASS SBO 0");
    expect(decode_descriptor(descriptor(Major::kMN, Swizzle::kNone, 64, 64, 0, 0, 0, 8)).sbo == 0,
           "B N=8, MN INTER: CUTLASS SBO 0");
    expect(descriptor(Major::kK, Swizzle::k128B, 128, 64, 0x4000, 64, 16, 64) ==
               descriptor(Major::kK, Swizzle::k128B, 128, 64, 0x4000, 64, 16),
           "non-degenerate: both forms agree");
  }

  // (b) interpreter over every operand block of several tiles.
  long blocks = 0;
  const int sizes[][2] = {{64, 64}, {128, 64}, {64, 128}, {256, 128}, {128, 32}, {192, 64}};
  const int extents[] = {8, 16, 32, 64, 128, 256};
  const uint32_t bases[] = {0, 1024, 0x9C00};
  for (Major m : kMajors)
    for (Swizzle s : kModes)
      for (auto& sz : sizes) {
        const int MN = sz[0], K = sz[1];
        if (MN % atom_mn(m, s) || K % atom_k(m, s)) continue;
        for (int E : extents) {
          if (E > MN || MN % E) continue;
          if (m == Major::kMN && E % atom_mn(m, s)) continue;
          for (uint32_t base : bases)
            for (int mn0 = 0; mn0 < MN; mn0 += E)
              for (int k0 = 0; k0 < K; k0 += 16)
                for (int form = 0; form < 2; ++form) {
                  const uint64_t d = form == 0 ? descriptor(m, s, MN, K, base, mn0, k0)
                                               : descriptor(m, s, MN, K, base, mn0, k0, E);
                  expect(decode_descriptor(d).base_offset == 0, "base offset 0");
                  for (int mm = 0; mm < E; ++mm)
                    for (int kk = 0; kk < 16; ++kk) {
                      const long got = desc_address(d, m, mm, kk) - long(base);
                      const long want = element_offset(m, s, MN, K, mn0 + mm, k0 + kk);
                      expect(got == want, "descriptor walk == element_offset", got, want);
                    }
                  ++blocks;
                }
        }
      }
  std::printf("descriptor: fields ok, %ld operand blocks walked through LBO/SBO == element_offset\n", blocks);
}

// 5. Register fragments: bijections and the PTX row/col formulas.
void check_fragments() {
  for (int N = 8; N <= 256; N += 8) {
    std::vector<int> used(size_t(64) * N, 0);
    for (int t = 0; t < 128; ++t)
      for (int i = 0; i < N / 2; ++i) {
        int row, col;
        accumulator_position(N, t, i, &row, &col);
        const int warp = t / 32, lane = t % 32;
        expect(row == 16 * warp + lane / 4 + 8 * ((i / 2) % 2), "accumulator row formula", row);
        expect(col == 2 * (lane % 4) + (i % 2) + 8 * (i / 4), "accumulator col formula", col);
        used[size_t(row) * N + col]++;
      }
    for (int u : used) expect(u == 1, "accumulator: each of 64 x N once");
  }
  std::vector<int> used(64 * 16, 0);
  for (int t = 0; t < 128; ++t)
    for (int reg = 0; reg < 4; ++reg)
      for (int half = 0; half < 2; ++half) {
        int row, k;
        a_fragment_position(t, reg, half, &row, &k);
        const int warp = t / 32, lane = t % 32;
        // mma.m16n8k16 A fragment (a0..a7), shifted by 16 rows per warp.
        const int i = 2 * reg + half;
        const int want_row = 16 * warp + lane / 4 + ((i % 4) >= 2 ? 8 : 0);
        const int want_k = 2 * (lane % 4) + (i % 2) + (i >= 4 ? 8 : 0);
        expect(row == want_row && k == want_k, "A fragment formula", row * 100 + k, want_row * 100 + want_k);
        used[row * 16 + k]++;
      }
  for (int u : used) expect(u == 1, "A fragment: each of 64 x 16 once");
  std::printf("register fragments: ok (N = 8..256, A 64x16)\n");
}

}  // namespace

int main() {
  check_bijection();
  check_explicit_formulas();
  check_tma();
  check_descriptors();
  check_fragments();
  std::printf("all %ld checks passed\n", checks);
  return 0;
}
