"""The emulator's Hopper instructions (tests/emulator/hopper.cuh), each against plain C++ math and
the independent layout definitions of tests/emulator/gmma_reference.h: wgmma (shared-memory and
register A, K- and MN-major B, every swizzle mode, two warpgroups, commit/wait groups, scale-d),
bulk tensor copies (1-4 dimensions, swizzles, zero fill outside the tensor, padded strides),
mbarrier phases and parity, named barriers, and a warp-specialised TMA -> wgmma pipeline.

Then the deliberate mistakes a GPU would punish, each of which the emulator must refuse: reading
accumulators or a copy's destination before the wait, a missing fence.proxy.async or wgmma.fence,
shared memory changed under a pending wgmma, a wrong swizzle, a missing mbarrier wait, a partial
warpgroup, divergent setmaxnreg, a deadlock. Each test is one run of tests/emulator/hopper_tests.cpp.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

EMULATOR = Path(__file__).resolve().parent / "emulator"


@pytest.fixture(scope="module")
def hopper_tests(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the emulator's tests")
    exe = tmp_path_factory.mktemp("hopper") / "hopper_tests"
    cmd = ["g++", "-std=c++17", "-O1", "-fno-strict-aliasing", "-ftrivial-auto-var-init=pattern", "-I", str(EMULATOR),
           str(EMULATOR / "hopper_tests.cpp"), "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    return exe


def run(exe, name, **options):
    args = [str(exe), name, *(f"{k}={v}" for k, v in options.items())]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def passes(exe, name, **options):
    result = run(exe, name, **options)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
    return result.stdout


def refused(exe, name, message, **options):
    """The emulator stops the run with `message`: a GPU would not have computed the right thing."""
    result = run(exe, name, **options)
    assert result.returncode != 0, f"not refused: {result.stdout}"
    assert message in result.stderr, result.stderr


# K-major A and B: every swizzle, both types, N from 8 to 256; K spans several k-steps (and, at
# K = 128 with the 128-byte swizzle, two swizzle atoms along K).
@pytest.mark.parametrize("swizzle", [0, 32, 64, 128])
@pytest.mark.parametrize("dtype,n,k", [("bf16", 64, 64), ("f16", 128, 64), ("bf16", 8, 128), ("f16", 256, 64)])
def test_wgmma_k_major(hopper_tests, swizzle, dtype, n, k):
    passes(hopper_tests, "gemm", dtype=dtype, n=n, k=k, swizzle=swizzle)


# B MN-major (the transposed operand, as V in P V); N covers one or several MN atoms.
@pytest.mark.parametrize("swizzle", [0, 32, 64, 128])
@pytest.mark.parametrize("dtype,n", [("bf16", 64), ("f16", 128), ("bf16", 256)])
def test_wgmma_mn_major_b(hopper_tests, swizzle, dtype, n):
    passes(hopper_tests, "gemm", dtype=dtype, n=n, k=64, swizzle=swizzle, b="mn")


@pytest.mark.parametrize("b", ["k", "mn"])
@pytest.mark.parametrize("swizzle", [0, 128])
def test_wgmma_a_from_registers(hopper_tests, b, swizzle):
    passes(hopper_tests, "gemm", dtype="bf16", n=128, k=64, swizzle=swizzle, b=b, a="regs")
    passes(hopper_tests, "gemm", dtype="f16", n=64, k=128, swizzle=swizzle, b=b, a="regs", groups=1)


def test_wgmma_groups_and_scale_d(hopper_tests):
    passes(hopper_tests, "groups")


@pytest.mark.parametrize("swizzle", [0, 32, 64, 128])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_bulk_tensor_copy(hopper_tests, swizzle, rank):
    out = passes(hopper_tests, "copy", rank=rank, swizzle=swizzle)
    assert "elements outside the tensor" in out and not out.startswith("ok (0 of")


def test_bulk_tensor_copy_inside_and_past_the_end(hopper_tests):
    passes(hopper_tests, "copy", swizzle=128, c0=0, c1=0)  # wholly inside
    out = passes(hopper_tests, "copy", swizzle=0, c0=90, c1=45, box0=40)  # mostly outside
    assert "ok (" in out


def test_pipeline_of_copies_and_wgmma(hopper_tests):
    passes(hopper_tests, "pipeline", tiles=5, stages=2)
    passes(hopper_tests, "pipeline", tiles=7, stages=3)


def test_named_barriers_and_mbarrier_phases(hopper_tests):
    passes(hopper_tests, "turns")


# ---- the mistakes ---------------------------------------------------------------------------------


def test_accumulators_are_garbage_until_the_wait(hopper_tests):
    out = passes(hopper_tests, "gemm", n=64, skip_wait=1)
    assert "were NaN" in out


def test_copy_destination_is_garbage_until_the_wait(hopper_tests):
    out = passes(hopper_tests, "copy", swizzle=128, read_early=1)
    assert "were garbage" in out


@pytest.mark.parametrize("message, options", [
    ("no fence.proxy.async", {"skip_proxy_fence": 1}),  # ordinary stores, then a wgmma reads them
    ("no wgmma.fence", {"skip_wgmma_fence": 1}),
    ("changed before its wait_group", {"touch_smem": 1}),  # shared memory a pending wgmma reads
    ("written while a wgmma on them is pending", {"touch_accumulators": 1}),
    ("written after the wgmma.fence", {"write_after_fence": 1}),
    ("A registers changed", {"a": "regs", "touch_a": 1}),  # under a pending wgmma_rs
], ids=lambda x: x if isinstance(x, str) else "")
def test_wgmma_misuse_is_refused(hopper_tests, message, options):
    refused(hopper_tests, "gemm", message, **options)

@pytest.mark.parametrize("stored,described", [(128, 64), (64, 32), (32, 128)])
def test_wrong_swizzle_gives_wrong_products(hopper_tests, stored, described):
    result = run(hopper_tests, "gemm", n=64, k=64, swizzle=stored, desc_swizzle=described)
    assert result.returncode != 0 and ("mismatch" in result.stdout or "swizzle" in result.stderr), result.stdout


def test_missing_full_barrier_wait_is_refused(hopper_tests):
    refused(hopper_tests, "pipeline", "has not delivered", skip_full_wait=1)


def test_missing_empty_barrier_wait_is_refused(hopper_tests):
    result = run(hopper_tests, "pipeline", skip_empty_wait=1)
    assert result.returncode != 0
    refusals = ("still filling", "changed before its wait_group", "more arrivals on an mbarrier")
    assert any(r in result.stderr for r in refusals), result.stderr


def test_mbarrier_needs_init_and_its_fence(hopper_tests):
    refused(hopper_tests, "rules", "before mbarrier.init", mode=2)
    refused(hopper_tests, "copy", "fence.mbarrier_init", skip_fence=1)


def test_warpgroup_rules(hopper_tests):
    refused(hopper_tests, "rules", "partial warpgroups", mode=0)
    refused(hopper_tests, "rules", "setmaxnreg for different counts", mode=1)


def test_deadlock_on_a_phase_that_never_completes(hopper_tests):
    refused(hopper_tests, "turns", "deadlock", mode=1)


def test_a_copy_no_one_expects_is_not_waited_for(hopper_tests):
    """A plain arrive (no expect_tx) completes the phase at once: the wait returns before the copy
    lands (the block reads garbage, as on a GPU) and the block ends with the copy in flight."""
    refused(hopper_tests, "copy", "bulk copies in flight", swizzle=128, plain_arrive=1)


@pytest.mark.parametrize("mode, message", [
    (3, "setmaxnreg.inc below, or .dec above"),
    (4, "different counts or directions"),
    (5, "arrives twice at a named barrier"),
    (6, "already initialised"),
    (7, "more arrivals on an mbarrier than its phase expects"),
    (8, "named barrier partly arrived"),
])
def test_more_rules(hopper_tests, mode, message):
    refused(hopper_tests, "rules", message, mode=mode)
