// gmma_reference.h: an independent, header-only reference for the shared-memory and register layouts
// used by Hopper's wgmma.mma_async (m64nNk16, 16-bit A/B, f32 accumulators) and by the swizzle modes
// of bulk tensor copies (TMA, cp.async.bulk.tensor with a CUtensorMap). Plain C++17, no CUDA.
//
// It exists to check a CPU emulator of those instructions against, so it is derived from the
// published definitions and not from the emulator. Sources, cited per function below:
//   [PTX-DESC]  PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" ->
//               "Matrix Descriptor Format" (bit fields, 16-byte encoding, swizzle-mode values).
//   [PTX-SMEM]  PTX ISA, "Shared Memory Matrix Layout" and its strides tables (swizzle atoms per
//               mode and major-ness, what LBO and SBO mean for K-major / MN-major layouts).
//   [PTX-FRAG]  PTX ISA, "Register Fragments", "Matrix Fragments for wgmma.mma_async.m64nNk16".
//   [CUTE-ATOM] CUTLASS include/cute/atom/mma_traits_sm90_gmma.hpp: GMMA::Layout_{K,MN}_{INTER,SW32,
//               SW64,SW128}_Atom(_Bits); the canonical-layout comment above make_gmma_desc;
//               make_gmma_desc; GMMA::DescriptorIterator; GMMA::CLayout_64xN; GMMA::ALayout_64x16.
//   [CUTE-DESC] CUTLASS include/cute/arch/mma_sm90_desc.hpp: union GmmaDescriptor (bit fields) and
//               enum GMMA::LayoutType (INTERLEAVE = 0, B128 = 1, B64 = 2, B32 = 3).
//   [CUTE-SWZ]  CUTLASS include/cute/swizzle.hpp: Swizzle<B,M,S>::apply (offset ^ ((offset & YYY) >> S)),
//               and include/cute/pointer_swizzle.hpp: swizzle_ptr applies that function to the
//               (byte) shared-memory address ("position-dependent" swizzle, as the hardware does).
//   [CUTE-TILE] CUTLASS include/cute/layout.hpp: tile_to_shape (default order LayoutLeft: the atom is
//               repeated along the first mode, MN, first), blocked_product, logical_divide, complement.
//   [CU-TMAP]   CUDA driver API, cuTensorMapEncodeTiled: CUtensorMapSwizzle ("swizzle 16B chunks
//               within a 32B / 64B / 128B span") and the box requirements quoted at tma_box_offset.
//
// Conventions: elements are 16-bit (fp16 / bf16) for the wgmma functions. "MN" is M for operand A
// and N for operand B; an operand tile is MN x K. Byte offsets are from a tile whose shared-memory
// address is 1024-byte aligned, so every swizzle pattern (period 256, 512 or 1024 bytes) starts at
// the tile base and address bits equal offset bits below bit 10.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace gmma_reference {

enum class Swizzle { kNone = 0, k32B = 32, k64B = 64, k128B = 128 };  // kNone = CuTe's INTERLEAVE
enum class Major { kK, kMN };  // which dimension of the operand is contiguous in memory

namespace detail {

[[noreturn]] inline void fail(const std::string& what) {
  throw std::invalid_argument("gmma_reference: " + what);
}
inline void require(bool ok, const char* what) {
  if (!ok) fail(what);
}

// log2(span / 16): the B of CuTe's Swizzle<B,4,3> for the mode ([CUTE-ATOM]: INTER uses
// Swizzle<0,4,3>, SW32 Swizzle<1,4,3>, SW64 Swizzle<2,4,3>, SW128 Swizzle<3,4,3>).
inline int swizzle_bits(Swizzle s) {
  switch (s) {
    case Swizzle::kNone: return 0;
    case Swizzle::k32B: return 1;
    case Swizzle::k64B: return 2;
    case Swizzle::k128B: return 3;
  }
  fail("unknown swizzle mode");
}

// Swizzle<B,4,3> on a byte address/offset ([CUTE-SWZ]): the B bits starting at bit 7 (which 128-byte
// line, mod 2^B) are XORed into the B bits starting at bit 4 (which 16-byte chunk). B = 0 is identity.
inline long swizzle_bytes(int B, long byte_offset) {
  const long yyy = ((1L << B) - 1) << 7;
  return byte_offset ^ ((byte_offset & yyy) >> 3);
}

// Extents (in 16-bit elements) of the GMMA layout atom for (major, swizzle) [CUTE-ATOM]. The atoms
// are given in bits there; for 16-bit elements:
//   Layout_K_{INTER,SW32,SW64,SW128}_Atom : (8 rows of MN) x (8,16,32,64 of K), K contiguous
//   Layout_MN_{INTER,SW32,SW64,SW128}_Atom: (8,16,32,64 of MN) x (8 of K), MN contiguous
// i.e. one "row" along the contiguous dimension is 16 << B bytes and an atom is 8 such rows.
struct Atom {
  int mn, k;
};
inline Atom atom_of(Major major, Swizzle s) {
  const int wide = 8 << swizzle_bits(s);
  return major == Major::kK ? Atom{8, wide} : Atom{wide, 8};
}

// The element offset, before swizzling, of (mn, k) in the MN x K tile built by
// tile_to_shape(atom, (MN, K)) in the default (column-major over atoms) order [CUTE-TILE]: atom (i, j)
// (i along MN, j along K) starts at (i + (MN / atom.mn) * j) * atom size; inside an atom the
// contiguous dimension has stride 1 and the other has stride equal to the atom's contiguous extent.
inline long layout_offset(Major major, Swizzle s, int MN, int K, int mn, int k) {
  const Atom a = atom_of(major, s);
  require(MN > 0 && K > 0 && MN % a.mn == 0 && K % a.k == 0,
          "MN and K must be positive multiples of the layout atom's extents");
  require(mn >= 0 && mn < MN && k >= 0 && k < K, "(mn, k) outside the tile");
  const long atom_elems = long(a.mn) * a.k;
  const long atom_index = long(mn / a.mn) + long(MN / a.mn) * (k / a.k);
  const int r_mn = mn % a.mn, r_k = k % a.k;
  const long inside = major == Major::kK ? long(r_mn) * a.k + r_k : long(r_k) * a.mn + r_mn;
  return atom_index * atom_elems + inside;
}

}  // namespace detail

// ----------------------------------------------------------------------------------------------
// element_offset: where element (mn, k) of an MN x K tile of 16-bit elements really is, in bytes
// from the (1024-aligned) tile base, when the tile is stored as CuTe stores
// tile_to_shape(GMMA::Layout_<major>_<swizzle>_Atom<half_t>, Shape<MN,K>) in shared memory.
// Follows [CUTE-ATOM] (the atoms), [CUTE-TILE] (tile_to_shape, default order) and [CUTE-SWZ] (the
// swizzle acts on the byte address; the base is 1024-aligned, so on the byte offset).
// Examples: K-major SW128, 64 x 64: offset = r*128 + ((k/8 ^ r%8) * 16) + (k%8)*2.
//           K-major INTER: 8x8 "core matrices" of 128 contiguous bytes, ordered down MN first.
// ----------------------------------------------------------------------------------------------
inline long element_offset(Major major, Swizzle swizzle, int MN, int K, int mn, int k) {
  const long unswizzled = 2 * detail::layout_offset(major, swizzle, MN, K, mn, k);
  return detail::swizzle_bytes(detail::swizzle_bits(swizzle), unswizzled);
}

// ----------------------------------------------------------------------------------------------
// Descriptor fields ([PTX-DESC], same positions as union GmmaDescriptor in [CUTE-DESC]):
//   bits  0..13  start address >> 4      (PTX: matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4)
//   bits 16..29  leading  dimension byte offset (LBO) >> 4
//   bits 32..45  stride   dimension byte offset (SBO) >> 4
//   bits 49..51  base offset (CUTLASS always 0: patterns start at 1024/512/256-aligned addresses)
//   bits 62..63  swizzle / layout type: 0 = none (INTERLEAVE), 1 = 128B, 2 = 64B, 3 = 32B
// All of start, LBO and SBO are in 16-byte units ("uint128_t units" in CuTe).
//
// Meaning of LBO / SBO (the canonical layouts in the comment above make_gmma_desc [CUTE-ATOM], the
// same as the strides tables of [PTX-SMEM]; T = 8 elements = 16 bytes, W = span / 16 = 1,2,4,8):
//   K-major,  INTERLEAVE : ((8,m),(T,2)) : ((1T,SBO),(1,LBO))
//       SBO = from one 8-row (MN) core-matrix group to the next; LBO = from the first 8 K-elements
//       (16 bytes) to the next 8 (the second core matrix along K).
//   K-major,  swizzled   : ((8,m),(T,2)) : ((WT,SBO),(1,T))
//       SBO = from one 8-row group to the next (one atom: 8 rows x span); LBO unused, CUTLASS
//       writes 1 (PTX: "not used, assumed to be 1").
//   MN-major, INTERLEAVE : ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//       SBO = from one 8-element (16-byte) MN group to the next; LBO = from one 8-row K group to the
//       next.   (Note the swap relative to the swizzled MN-major case.)
//   MN-major, swizzled   : ((T,W,m),(8,k)) : ((1,T,LBO),(WT,SBO))
//       LBO = from one span-wide MN block (W*T elements) to the next; SBO = from one 8-row K group
//       to the next.
// The comments on the bit fields inside mma_sm90_desc.hpp describe LBO/SBO differently (and
// inconsistently with make_gmma_desc); this header follows make_gmma_desc's code, which agrees with
// the PTX tables.
// ----------------------------------------------------------------------------------------------
struct DescriptorFields {
  uint32_t start_address;  // bytes (field << 4)
  uint32_t lbo;            // bytes (field << 4)
  uint32_t sbo;            // bytes (field << 4)
  uint32_t base_offset;    // the raw 3-bit field
  uint32_t layout_type;    // the raw 2-bit field: 0 none, 1 = 128B, 2 = 64B, 3 = 32B
};

inline DescriptorFields decode_descriptor(uint64_t d) {
  DescriptorFields f;
  f.start_address = uint32_t(d & 0x3FFF) << 4;
  f.lbo = uint32_t((d >> 16) & 0x3FFF) << 4;
  f.sbo = uint32_t((d >> 32) & 0x3FFF) << 4;
  f.base_offset = uint32_t((d >> 49) & 0x7);
  f.layout_type = uint32_t((d >> 62) & 0x3);
  return f;
}

// The 2-bit layout-type value for a swizzle mode (GMMA::LayoutType in [CUTE-DESC], [PTX-DESC]).
inline uint32_t layout_type_code(Swizzle s) {
  switch (s) {
    case Swizzle::kNone: return 0;
    case Swizzle::k128B: return 1;
    case Swizzle::k64B: return 2;
    case Swizzle::k32B: return 3;
  }
  detail::fail("unknown swizzle mode");
}

// descriptor with an explicit operand extent along MN (64 for A, N for B). make_gmma_desc derives
// LBO/SBO from logical_divide of the operand sub-tensor; when a mode it reads has a single repeat
// (one 8-row group for K-major or MN-major INTERLEAVE, i.e. mn_extent == 8; one span-wide block for
// MN-major swizzled, i.e. mn_extent == span/2) CuTe's complement/composition give that mode stride 0,
// so CUTLASS writes 0 into the field (SBO resp. LBO). The hardware never steps that stride then.
// mn_extent = 0 means "unknown": every field gets the tile's real stride (what the 7-argument
// descriptor() below returns); that value is correct for any extent and differs from CUTLASS's
// bits only in those never-used fields.
inline uint64_t descriptor(Major major, Swizzle swizzle, int MN, int K, uint32_t tile_address, int mn0,
                           int k0, int mn_extent) {
  using namespace detail;
  const Atom a = atom_of(major, swizzle);
  require(tile_address % 1024 == 0, "tile_address must be 1024-byte aligned");
  require(MN > 0 && K > 0 && MN % a.mn == 0 && K % a.k == 0,
          "MN and K must be positive multiples of the layout atom's extents");
  require(k0 >= 0 && k0 % 16 == 0 && k0 + 16 <= K, "k0 must be a multiple of 16 with k0 + 16 <= K");
  require(mn0 >= 0 && mn0 % a.mn == 0 && mn0 < MN,
          "mn0 must be a multiple of the atom's MN extent (8 for K-major, span/2 for MN-major)");
  if (mn_extent != 0) {
    require(mn_extent % 8 == 0 && mn_extent >= 8 && mn_extent <= 256 && mn0 + mn_extent <= MN,
            "mn_extent must be 8..256, a multiple of 8, and fit in the tile");
    if (major == Major::kMN)
      require(mn_extent % a.mn == 0, "MN-major: mn_extent must be a multiple of the span (span/2 elements)");
  }

  // Strides of the tile in 16-byte units (see the LBO/SBO table above).
  const long atom_u128 = long(a.mn) * a.k / 8;  // 8 * W
  uint32_t lbo, sbo;
  if (major == Major::kK) {
    // Next 8-row group: the next atom down MN (atoms are 8 rows tall).
    sbo = uint32_t(atom_u128);
    // Second 8-element K chunk: INTERLEAVE -> next atom along K (a whole MN column of atoms later);
    // swizzled -> the next 16 bytes of the same row, which the hardware assumes; CUTLASS writes 1.
    lbo = swizzle == Swizzle::kNone ? uint32_t(atom_u128 * (MN / a.mn)) : 1u;
    if (mn_extent == 8) sbo = 0;  // single 8-row group (N = 8): degenerate mode in CuTe
  } else {
    const uint32_t next_mn_block = uint32_t(atom_u128);                // next atom along MN
    const uint32_t next_k_group = uint32_t(atom_u128 * (MN / a.mn));   // next atom along K (= MN)
    if (swizzle == Swizzle::kNone) {
      sbo = next_mn_block;
      lbo = next_k_group;
      if (mn_extent == 8) sbo = 0;
    } else {
      lbo = next_mn_block;
      sbo = next_k_group;
      if (mn_extent == a.mn) lbo = 0;
    }
  }
  require(lbo <= 0x3FFF && sbo <= 0x3FFF, "LBO/SBO do not fit in 14 bits (tile too large)");

  // make_gmma_desc on the sub-tensor at the tile's origin, then DescriptorIterator::operator+ adds the
  // sub-matrix's (unswizzled) offset in 16-byte units to the whole 64-bit value [CUTE-ATOM].
  uint64_t d = 0;
  d |= uint64_t((tile_address >> 4) & 0x3FFF);
  d |= uint64_t(lbo & 0x3FFF) << 16;
  d |= uint64_t(sbo & 0x3FFF) << 32;
  d |= uint64_t(0) << 49;  // base_offset
  d |= uint64_t(layout_type_code(swizzle)) << 62;
  const long off_bytes = 2 * layout_offset(major, swizzle, MN, K, mn0, k0);
  d += uint64_t(off_bytes / 16);
  return d;
}

// ----------------------------------------------------------------------------------------------
// descriptor: the 64-bit wgmma shared-memory matrix descriptor CUTLASS builds (make_gmma_desc +
// DescriptorIterator offset, [CUTE-ATOM]; fields per [PTX-DESC]/[CUTE-DESC]) for the operand sub-matrix
// starting at element (mn0, k0) of the tile described at element_offset, covering the MN rows one
// wgmma m64nNk16 reads and 16 K. Start address = tile_address + unswizzled byte offset of (mn0, k0)
// (the hardware applies the swizzle to the addresses it computes); base offset 0.
// Table (16-bit elements, values in bytes; the fields hold these >> 4):
//   K-major  INTER : LBO = MN*16 (next K core matrix)   SBO = 128  (next 8 rows)
//   K-major  SW32  : LBO = 16 (CUTLASS's 1, unused)      SBO = 256
//   K-major  SW64  : LBO = 16 (unused)                   SBO = 512
//   K-major  SW128 : LBO = 16 (unused)                   SBO = 1024
//   MN-major INTER : LBO = MN*16 (next 8 K rows)         SBO = 128  (next 8 MN elements)
//   MN-major SW32  : LBO = 256  (next 16 MN elements)    SBO = MN*16 (next 8 K rows)
//   MN-major SW64  : LBO = 512  (next 32 MN elements)    SBO = MN*16
//   MN-major SW128 : LBO = 1024 (next 64 MN elements)    SBO = MN*16
// The operand's MN extent is not a parameter here, so degenerate fields get the real stride; see the
// 8-argument overload above for CUTLASS's exact bits (0 in a single-repeat field).
// ----------------------------------------------------------------------------------------------
inline uint64_t descriptor(Major major, Swizzle swizzle, int MN, int K, uint32_t tile_address, int mn0,
                           int k0) {
  return descriptor(major, swizzle, MN, K, tile_address, mn0, k0, 0);
}

// ----------------------------------------------------------------------------------------------
// accumulator_position: wgmma m64nNk16 with f32 accumulators, thread t of the warpgroup, register
// d_i (0 <= i < N/2). Follows GMMA::CLayout_64xN [CUTE-ATOM]: a (thread, value) -> column-major index
// into the 64 x N tile, thread shape (4,8,4) strides (128,1,16) [i.e. lane%4, lane/4, warp], value
// shape (2,2,N/8) strides (64,8,512). The same as [PTX-FRAG]: row = 16*warp + lane/4 + 8*((i/2)%2),
// col = 2*(lane%4) + i%2 + 8*(i/4).
// ----------------------------------------------------------------------------------------------
inline void accumulator_position(int N, int t, int i, int* row, int* col) {
  detail::require(N >= 8 && N <= 256 && N % 8 == 0, "N must be a multiple of 8 in 8..256");
  detail::require(t >= 0 && t < 128, "t must be 0..127");
  detail::require(i >= 0 && i < N / 2, "i must be 0..N/2-1");
  const long thread_part = 128L * (t % 4) + 1L * ((t / 4) % 8) + 16L * (t / 32);
  const long value_part = 64L * (i % 2) + 8L * ((i / 2) % 2) + 512L * (i / 4);
  const long idx = thread_part + value_part;  // column-major in 64 x N
  *row = int(idx % 64);
  *col = int(idx / 64);
}

// ----------------------------------------------------------------------------------------------
// a_fragment_position: wgmma with A in registers (16-bit A): register reg (0..3) of thread t holds
// a_{2*reg} in its low 16 bits (half = 0) and a_{2*reg+1} in its high 16 bits ([PTX-FRAG]: four .f16x2
// registers, elements a0..a7 low to high). Follows GMMA::ALayout_64x16 (= CLayout_64x16) [CUTE-ATOM]
// with value index v = 2*reg + half, into the column-major 64 x 16 tile. Equivalently: row =
// 16*warp + lane/4 + 8*(reg%2), k = 2*(lane%4) + half + 8*(reg/2) (each warp holds mma.m16n8k16's A
// fragment for its 16 rows).
// ----------------------------------------------------------------------------------------------
inline void a_fragment_position(int t, int reg, int half, int* row, int* k) {
  detail::require(t >= 0 && t < 128, "t must be 0..127");
  detail::require(reg >= 0 && reg < 4 && (half == 0 || half == 1), "reg must be 0..3 and half 0 or 1");
  const int v = 2 * reg + half;
  const long thread_part = 128L * (t % 4) + 1L * ((t / 4) % 8) + 16L * (t / 32);
  const long value_part = 64L * (v % 2) + 8L * ((v / 2) % 2) + 512L * (v / 4);
  const long idx = thread_part + value_part;  // column-major in 64 x 16
  *row = int(idx % 64);
  *k = int(idx / 64);
}

// ----------------------------------------------------------------------------------------------
// tma_box_offset: a tiled TMA copy (interleave NONE, element strides 1) of a rows x cols box, cols
// innermost, elem_bytes per element, into shared memory at a 1024-byte aligned address with swizzle
// mode CU_TENSOR_MAP_SWIZZLE_{NONE,32B,64B,128B}: the byte offset from the destination of (row, col).
//
// What cuTensorMapEncodeTiled requires [CU-TMAP]: boxDim[i] in 1..256; with interleave NONE,
// boxDim[0] * elementSize must be a multiple of 16 bytes; with a swizzle, that inner extent must be
// <= the swizzle span ("CU_TENSOR_MAP_SWIZZLE_32B requires the bounding box inner dimension to be
// <= 32", 64B: <= 64, 128B: <= 128). The swizzle patterns repeat every 256 / 512 / 1024 bytes, which is
// why the destination should be aligned to that (PTX lists those as the pattern start alignments;
// 1024 covers all three).
//
// Model: the box is written densely, row-major (row pitch = cols * elem_bytes), and the swizzle is a
// function of the shared-memory address: the 16-byte chunk index within each span (address bits
// 4..4+B-1) is XORed with address bits 7..7+B-1 -- "swizzle 16B chunks within a span" [CU-TMAP], the
// same Swizzle<B,4,3> CuTe applies to shared-memory addresses [CUTE-SWZ] and the same pattern wgmma
// reads. When cols * elem_bytes == span this is exactly the K-major GMMA atom layout
// (element_offset(Major::kK, s, rows, cols, row, col) for 16-bit elements and rows % 8 == 0).
// When cols * elem_bytes < span the sources do not spell out the layout; this function keeps the same
// address-based rule on the dense box (NOT verified on hardware). The XOR only changes bits 4..6, so
// data stays inside its 128-byte line; but with pitch < span it moves between the box rows sharing a
// line, and if rows * pitch is not a multiple of 128 it can land past the box's last byte (still
// inside the last 128-byte line).
// ----------------------------------------------------------------------------------------------
inline long tma_box_offset(Swizzle swizzle, int elem_bytes, int rows, int cols, int row, int col) {
  using namespace detail;
  require(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
          "elem_bytes must be 1, 2, 4 or 8");
  require(rows >= 1 && rows <= 256 && cols >= 1 && cols <= 256, "box dimensions must be 1..256");
  require(row >= 0 && row < rows && col >= 0 && col < cols, "(row, col) outside the box");
  const long pitch = long(cols) * elem_bytes;
  require(pitch % 16 == 0, "cols * elem_bytes must be a multiple of 16 bytes (interleave NONE)");
  if (swizzle != Swizzle::kNone)
    require(pitch <= long(swizzle), "with a swizzle, cols * elem_bytes must be <= the swizzle span");
  const long linear = long(row) * pitch + long(col) * elem_bytes;
  return swizzle_bytes(swizzle_bits(swizzle), linear);
}

}  // namespace gmma_reference
