"""tools/sass_stats.py: its SASS reading on a hand-written listing, and on the built kernels where
cuobjdump and nvdisasm are installed (the `sass` extra; CI installs it)."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

import scratchformer

spec = importlib.util.spec_from_file_location("sass_stats", Path(__file__).resolve().parent.parent / "tools" / "sass_stats.py")
sass_stats = sys.modules["sass_stats"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_stats)

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R4, R7, R12 ;
.L_x_1:
        /*0040*/                   LDS.U16 R3, [R2+0x10] ;
        /*0050*/                   MUFU.EX2 R3, R3 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   I2F.U32.RP R5, R9 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/                   NOP ;
        /*00a0*/              @!P0 BRA `(.L_x_3) ;
        /*00b0*/                   BRA `(.L_x_4) ;
.L_x_4:
        /*00c0*/                   EXIT ;
"""


def test_the_hot_loop_is_the_backward_branch_with_the_most_tensor_core_work():
    loop = sass_stats.hot_loop(LISTING)
    # .L_x_3 to its branch: 9 instructions without the NOP; the inner loop (.L_x_1) counts once,
    # the forward branch to .L_x_4 is no loop.
    assert (loop.instructions, loop.hmma, loop.ldsm, loop.lds, loop.mufu, loop.bar, loop.idiv) == (9, 2, 1, 1, 1, 1, 1)


COLD_BLOCK = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
.L_x_7:
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R4 ;
        /*0030*/              @!P0 BRA `(.L_x_5) ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   FMUL R2, R2, R3 ;
        /*0060*/               @P1 BRA `(.L_x_7) ;
        /*0070*/                   EXIT ;
.L_x_5:
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R4 ;
        /*0090*/              @!P0 BRA `(.L_x_5) ;
        /*00a0*/                   BRA `(.L_x_0) ;
"""


def test_branches_back_from_cold_blocks_close_no_loop():
    # The retry block after EXIT jumps back to .L_x_0: no loop of two HGMMA; the tile loop is .L_x_7.
    loop = sass_stats.hot_loop(COLD_BLOCK)
    assert (loop.instructions, loop.hgmma) == (5, 1)


def test_occupancy_from_registers_shared_memory_and_threads():
    # 224 registers x 256 threads: 57344 of 65536 registers, one block; 128 threads at 168 registers
    # and 35 KB: registers allow 3 blocks, sm_80's 163 KB of shared memory 4.
    assert sass_stats.occupancy(90, 224, 35 * 1024, 256) == (1, 8)
    assert sass_stats.occupancy(80, 168, 35 * 1024, 128) == (3, 12)
    assert sass_stats.occupancy(80, 64, 100 * 1024, 128) == (1, 4)
    assert sass_stats.occupancy(90, 64, 0, None) is None


def _tools_and_kernels():
    if not scratchformer.build_info().cuda_kernels:
        return "built without CUDA kernels"
    for tool in ("cuobjdump", "nvdisasm"):
        if not any((Path(p) / "nvidia" / "cu13" / "bin" / tool).exists() for p in sys.path) and not shutil.which(tool):
            return f"no {tool} (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    return None


@pytest.mark.skipif(_tools_and_kernels() is not None, reason=str(_tools_and_kernels()))
def test_the_forward_kernels_loop_holds_the_tiles_tensor_core_work():
    rows = sass_stats.profile(sass_stats.default_library(), ["sm_90"], r"^attention_fwd:forward_kernel<__nv_bfloat16")
    loops = {r["kernel"]: r["loop"] for r in rows}
    assert len(loops) == 8  # the plain and the PATTERN instance at each head dim
    for d, n, n_pattern in ((32, 128, 112), (64, 96, 96), (96, 80, 32), (128, 48, 48)):  # block_n() in attention_fwd.cu
        # Per warp (two 16-row m tiles) and n-key tile: S = Q K^T is 2 x (n / 8) n-tiles x (D / 16)
        # k-slabs of m16n8k16, O += P V is 2 x (D / 8) n-tiles x (n / 16) k-slabs: n D / 32 HMMA.
        assert loops[f"forward_kernel<__nv_bfloat16, {d}, false>"].hmma == n * d // 32
        assert loops[f"forward_kernel<__nv_bfloat16, {d}, true>"].hmma == n_pattern * d // 32
    assert all(r["local"] == 0 and r["warps"] >= 8 for r in rows)


def test_check_fails_on_a_passed_ceiling_unless_it_is_known():
    """The ceilings --check holds, on made-up profiles: a forward at 4.5 instructions per HMMA (D=128)
    passes its 4.0, a dkv kernel's ldmatrix ratio its 0.45 (a KNOWN case for dkv_kernel at D = 128, not at 64
    nor for dkv_wide_kernel), spills
    always count."""
    def row(file, kernel, instructions, hmma, ldsm, local=0, warps=8, blocks=2):
        loop = sass_stats.Loop(instructions=instructions, hmma=hmma, ldsm=ldsm)
        return {"file": file, "kernel": kernel, "arch": "sm_90", "local": local, "warps": warps, "blocks": blocks, "loop": loop}

    fast = row("attention_fwd", "forward_kernel<__nv_bfloat16, 128, false>", 3.9 * 192, 192, 64)
    slow = row("attention_fwd", "forward_kernel<__nv_bfloat16, 128, false>", 4.5 * 192, 192, 64)
    dkv = row("attention_bwd", "dkv_kernel<__half, 128, false>", 4.8 * 256, 256, 144)
    spilling = row("attention_fwd", "forward_kernel<__half, 64, false>", 4 * 192, 192, 56, local=16)
    assert sass_stats.violations([fast]) == []
    [found] = sass_stats.violations([slow])
    assert "4.50 instructions per HMMA" in found and sass_stats.known(found) is None
    [found] = sass_stats.violations([dkv])
    assert "0.56 ldmatrix per HMMA" in found and "dkv_wide_kernel" in sass_stats.known(found)
    [found] = sass_stats.violations([{**dkv, "kernel": "dkv_kernel<__half, 64, false>"}])
    assert sass_stats.known(found) is None  # met at D <= 64: 32 keys per warp
    [found] = sass_stats.violations([{**dkv, "kernel": "dkv_wide_kernel<__half, 128, false>"}])
    assert sass_stats.known(found) is None  # what A100s and H100s run at D = 128 has no excuse
    [found] = sass_stats.violations([spilling])
    assert "spills" in found and sass_stats.known(found) is None
    [found] = sass_stats.violations([{**slow, "kernel": "forward_kernel<__nv_bfloat16, 128, true>"}])
    assert "PATTERN instance" in sass_stats.known(found)  # its loop carries the softcapping code
    [found] = sass_stats.violations([{**spilling, "kernel": "forward_kernel<__half, 64, true>"}])
    assert sass_stats.known(found) is None  # no instance may spill


@pytest.mark.skipif(_tools_and_kernels() is not None, reason=str(_tools_and_kernels()))
def test_the_hopper_kernels_run_wgmma_in_their_loops():
    """The sm_90a image: HGMMA (not HMMA) in each steady-state loop, per tile and consumer
    warpgroup: forward D / 16 for S = Q K^T and 128 / 16 for P V; dk/dv 2 D / 16 for S^T and dP^T
    and 2 x 64 / 16 for dV and dK; dq 2 D / 16 for S and dP and 64 / 16 for dQ (the loop found is
    the tile loop, not the span the mbarrier waits' cold retry blocks jump back over); no spills;
    12 warps, one block per SM. The same for the PATTERN instances (first_key, softcap, sinks)."""
    rows = sass_stats.profile(sass_stats.default_library(), ["sm_90"], r"^attention_hopper:")
    kinds = ("forward", "dkv", "dq")
    assert {r["kernel"] for r in rows} == {f"hopper_{k}_kernel<{t}, {d}, {p}>" for k in kinds for t in ("__half", "__nv_bfloat16")
                                           for d in (64, 128) for p in ("false", "true")}
    for r in rows:
        kind, d = r["kernel"].split("_")[1], int(r["kernel"].split(", ")[1])
        per_tile = {"forward": d // 16 + 128 // 16, "dkv": 2 * d // 16 + 2 * 64 // 16, "dq": 2 * d // 16 + 64 // 16}[kind]
        assert r["loop"].hmma == 0 and r["loop"].hgmma == per_tile, r["kernel"]
        assert r["local"] == 0 and (r["blocks"], r["warps"]) == (1, 12)
    assert sass_stats.violations(rows) == []


def test_check_fails_when_the_hopper_loop_has_no_wgmma():
    loop = sass_stats.Loop(instructions=900, hmma=64, ldsm=20)
    row = {"file": "attention_hopper", "kernel": "hopper_forward_kernel<__half, 64, false>", "arch": "sm_90", "local": 0,
           "warps": 12, "blocks": 1, "loop": loop}
    [found] = sass_stats.violations([row])
    assert "no HGMMA" in found and sass_stats.known(found) is None
