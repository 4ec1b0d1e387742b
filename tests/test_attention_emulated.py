"""The attention kernels' own CUDA source, run on the CPU emulator (tests/emulator), against the
float64 reference: the flash-attention rule of the GPU tests (error at most twice the reference's
in the same precision, plus a small floor) for the output, the log-sum-exp, dq, dk and dv.

This checks the kernels' logic everywhere the tests run: tiling and its edges, masking, the
online softmax, GQA indexing, split-key decoding, the backward's recomputation, and that every
read of shared memory follows the barrier and the cp.async wait it needs. It cannot check what
only hardware shows (speed, and the PTX fragment layouts, which emulator and kernels both take
from the PTX ISA): the `cuda` tests in test_attention_kernel.py do that on a GPU.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchformer.ops import reference


@pytest.fixture
def kernels(emulated):
    return emulated


def make_inputs(batch, heads, kv_heads, t_q, t_k, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + batch * 1009 + t_q * 101 + t_k * 7 + dim + kv_heads)
    q = torch.randn(batch, heads, t_q, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, t_k, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, t_k, dim, generator=g).to(dtype)
    dout = torch.randn(batch, heads, t_q, dim, generator=g).to(dtype)
    return q, k, v, dout


def reference_run(q, k, v, dout, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference.causal_attention(*leaves, q.shape[-1] ** -0.5)
    out.backward(dout.to(dtype))
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def emulated_run(kernels, q, k, v, dout, arch=80):
    scale = q.shape[-1] ** -0.5
    out, lse, splits = kernels.forward(q, k, v, scale, arch=arch)
    return [out, lse, *kernels.backward(dout, q, k, v, out, lse, scale, arch=arch)], splits


def assert_within_twice_the_reference(got, low, truth):
    """Each output's error at most twice the reference's in the same precision, plus a small
    floor. Returns the largest error / bound over the outputs, and that output's name."""
    worst = (0.0, "")
    for name, g, l, t in zip(["out", "lse", "dq", "dk", "dv"], got, low, truth):
        assert torch.isfinite(g).all(), f"{name}: not finite (an element was never written?)"
        err = (g.double() - t).abs().max().item()
        err_ref = (l.double() - t).abs().max().item()
        floor = 1e-4 * (1 + t.abs().max().item())
        assert err <= 2 * err_ref + floor, f"{name}: kernel error {err:.3g} > 2 x reference {err_ref:.3g} + {floor:.2g}"
        worst = max(worst, (err / (2 * err_ref + floor), name))
    return worst


CASES = [
    # (batch, heads, kv_heads, t_q, t_k, dim, dtype): the tensor-core path takes 16-bit types with
    # more than 16 queries, the split-key path up to 16 queries, the CUDA-core path float32.
    (1, 2, 2, 17, 17, 64, torch.bfloat16),
    (1, 4, 1, 130, 130, 64, torch.float16),
    (1, 2, 1, 100, 333, 128, torch.bfloat16),
    (2, 4, 2, 65, 65, 32, torch.float16),
    (1, 2, 1, 150, 290, 32, torch.bfloat16),  # dk/dv: three 128-key blocks, the last partial
    (1, 2, 2, 70, 200, 96, torch.bfloat16),
    (2, 4, 2, 1, 1, 64, torch.bfloat16),
    pytest.param(1, 4, 1, 1, 700, 128, torch.float16, marks=pytest.mark.slow),  # 18 s
    (2, 4, 4, 5, 300, 64, torch.bfloat16),
    (1, 4, 2, 1, 200, 96, torch.bfloat16),  # two rows per block: two warps per row
    (1, 4, 2, 16, 257, 32, torch.float32),
    (1, 2, 1, 40, 90, 64, torch.float32),
    (1, 2, 2, 33, 33, 128, torch.float32),
]


def case_id(case):
    batch, heads, kv_heads, t_q, t_k, dim, dtype = case
    return f"B{batch}-H{heads}/{kv_heads}-T{t_q}x{t_k}-D{dim}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("batch, heads, kv_heads, t_q, t_k, dim, dtype", CASES,
                         ids=[case_id(c.values if hasattr(c, "values") else c) for c in CASES])
def test_emulated_kernels_against_float64(kernels, batch, heads, kv_heads, t_q, t_k, dim, dtype):
    q, k, v, dout = make_inputs(batch, heads, kv_heads, t_q, t_k, dim, dtype)
    got, splits = emulated_run(kernels, q, k, v, dout)
    if t_q == 1 and t_k >= 256:
        assert splits > 1, "decoding against a long cache should split the keys"
    assert_within_twice_the_reference(got, reference_run(q, k, v, dout, dtype), reference_run(q, k, v, dout, torch.float64))


@pytest.mark.parametrize("dtype, t_q", [(torch.bfloat16, 70), (torch.float32, 20)])
def test_emulated_gradient_through_the_log_sum_exp(kernels, dtype, t_q):
    q, k, v, dout = make_inputs(1, 2, 1, t_q, t_q + 3, 64, dtype)
    dlse = torch.randn(1, 2, t_q, generator=torch.Generator().manual_seed(t_q))
    scale = 64**-0.5
    out, lse, _ = kernels.forward(q, k, v, scale)
    got = [out, lse, *kernels.backward(dout, q, k, v, out, lse, scale, dlse)]

    def reference_with_lse(cast):
        leaves = [cast(t).clone().requires_grad_() for t in (q, k, v)]
        out, lse = reference.causal_attention(*leaves, scale)
        ((out * cast(dout)).sum() + (lse * cast(dlse)).sum()).backward()
        return [out.detach(), lse.detach()] + [t.grad for t in leaves]

    assert_within_twice_the_reference(got, reference_with_lse(lambda t: t), reference_with_lse(lambda t: t.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_kernels_read_strided_inputs_in_place(kernels, dtype):
    """q/k/v as the model makes them: transposed views of one projection, rows 3*H*D apart."""
    batch, t, heads, dim = 1, 40, 2, 64
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, t, 3, heads, dim, generator=g).to(dtype)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    dout = torch.randn(batch, heads, t, dim, generator=g).to(dtype)
    assert not q.is_contiguous()
    got, _ = emulated_run(kernels, q, k, v, dout)
    contiguous, _ = emulated_run(kernels, q.contiguous(), k.contiguous(), v.contiguous(), dout)
    for a, b in zip(got, contiguous):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, t_q, t_k", [(torch.bfloat16, 80, 80), (torch.float32, 50, 60), (torch.bfloat16, 3, 400)])
def test_emulated_perturbing_a_key_never_reaches_the_queries_that_cannot_see_it(kernels, dtype, t_q, t_k):
    q, k, v, dout = make_inputs(1, 2, 1, t_q, t_k, 64, dtype)
    offset = t_k - t_q
    j = t_k - t_q // 2 - 1
    before, _ = emulated_run(kernels, q, k, v, dout)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, j] += 1.0
    v2[:, :, j] -= 2.0
    after, _ = emulated_run(kernels, q, k2, v2, dout)
    blind = torch.arange(t_q) + offset < j
    assert blind.any() and (~blind).any()
    for name, x, y in [("out", before[0], after[0]), ("dq", before[2], after[2])]:
        assert torch.equal(x[:, :, blind], y[:, :, blind]), f"{name} of queries that cannot see key {j} changed"
        assert not torch.equal(x[:, :, ~blind], y[:, :, ~blind]), f"{name} of queries that see key {j} did not change"


@pytest.mark.slow
def test_the_emulator_catches_a_tail_tile_left_unfilled(tmp_path):
    """Shared memory holds garbage on a GPU; so it does here. A kernel that skipped the zero fill of
    rows past the sequence end would multiply masked (zero) probabilities by garbage: 0 x NaN."""
    from emulated_kernels import EmulatedKernels, build

    fill = "cp_async_16(dst + i * PASS_ROWS * STRIDE, p, i * PASS_ROWS < left);"
    mutated = EmulatedKernels(build(tmp_path, {"attention.cuh": (fill, "if (i * PASS_ROWS < left) " + fill)}))
    q, k, v, dout = make_inputs(2, 4, 4, 5, 300, 64, torch.bfloat16)
    got, _ = emulated_run(mutated, q, k, v, dout)
    assert not all(torch.isfinite(t).all() for t in got)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads, arch, t_q, t_k, dim", [(1, 80, 100, 100, 64), (2, 80, 100, 100, 64),
                                                            (2, 90, 100, 100, 64), (8, 80, 100, 100, 64),
                                                            (8, 90, 100, 100, 64), (2, 80, 150, 290, 64),
                                                            (2, 80, 150, 290, 128), (2, 86, 100, 100, 64)])
def test_emulated_backward_split_over_the_group_s_query_tiles_is_exact_and_reproducible(kernels, kv_heads, arch, t_q, t_k,
                                                                                       dim):
    """Few (batch, kv head, key tile) blocks for the GPU: each key tile's (query head, query tile)
    work over its kv group is cut into contiguous ranges among several blocks (some starting
    mid-head, of unequal lengths), whose sums are added in a fixed order: MQA, GQA and
    (kv_heads = 8) MHA; at D = 128 on an A100, for the wide dk/dv kernel; on an RTX 30, whose
    SMs hold one dk/dv block at D = 64."""
    q, k, v, dout = make_inputs(1, 8, kv_heads, t_q, t_k, dim, torch.bfloat16)
    scale = dim**-0.5
    out, lse, _ = kernels.forward(q, k, v, scale)
    truth = reference_run(q, k, v, dout, torch.float64)
    low = reference_run(q, k, v, dout, torch.bfloat16)
    group = 8 // kv_heads

    def least_tiles(block_keys, tile):  # the query tiles over the group of the last key block
        return group * -(-(t_q - max(0, (t_k - 1) // block_keys * block_keys - (t_k - t_q))) // tile)

    # D = 64: 128-key tiles for both the mma.sync and the Hopper kernel; an SM holds two mma.sync
    # dk/dv blocks (an RTX 30's one: two of 55.5 KB pass its 100 KB), one Hopper block. D = 128
    # on an A100: the wide kernel, 128 keys and 64-query tiles, one block an SM. At most as many splits as the last key tile has query tiles over the
    # group, under the coarsest tiling that may run (mma.sync: 32-query tiles of 128 keys at D = 64,
    # 64 keys at D = 128; Hopper and the wide kernel: 64-query tiles of 128 keys).
    keys, per_sm = 128, 2 if arch == 80 and dim == 64 else 1
    most = min(least_tiles(128 if dim == 64 else 64, 32), least_tiles(128, 64))
    blocks = kv_heads * -(-t_k // keys)
    results = {}
    for sm_count in (0, 1, 3, 132):
        got = kernels.backward(dout, q, k, v, out, lse, scale, sm_count=sm_count, arch=arch)
        # Enough splits for two waves of blocks, where the grid fills less than one.
        target = 2 * per_sm * sm_count
        wanted = 1 if 2 * blocks > target else max(1, min(-(-target // blocks), most))
        assert kernels.dkv_splits == wanted
        assert_within_twice_the_reference([out, lse, *got], low, truth)
        again = kernels.backward(dout, q, k, v, out, lse, scale, sm_count=sm_count, arch=arch)
        assert all(torch.equal(a, b) for a, b in zip(got, again))  # bitwise reproducible
        results[wanted] = got
    assert len(results) >= 2 and min(results) == 1 and max(results) == most


@pytest.mark.slow
@pytest.mark.parametrize("dim, dtype", [(96, torch.float16), (128, torch.bfloat16)])
def test_emulated_backward_at_d_96_and_128_on_gpus_with_and_without_160_kb_of_shared_memory(kernels, dim, dtype):
    """An A100 gives a block 163 KB of shared memory: dk/dv at D 96 and 128 take dkv_wide_kernel,
    dq at D 128 dq_wide_kernel; an RTX 30/40/50 (sm_86/89/120) gives 99 KB: dkv_kernel and
    dq_kernel. Both against the reference (GQA, fewer queries than keys, partial last tiles)."""
    q, k, v, dout = make_inputs(1, 4, 2, 150, 200, dim, dtype)
    low, truth = reference_run(q, k, v, dout, dtype), reference_run(q, k, v, dout, torch.float64)
    for arch in (80, 86):
        assert_within_twice_the_reference(emulated_run(kernels, q, k, v, dout, arch=arch)[0], low, truth)


WIDE_MISTAKES = [  # (output it spoils, the mutation) in each of the 8-warp kernels
    ("dk", ("store(ds_s, dpt);", "store(ds_s, pt);")),                                        # dkv_wide_kernel
    ("dq", ("ds[e] = p * (dp[mt][nt][e] - delta[r]) * slope.derivative(score);",
            "ds[e] = p * dp[mt][nt][e] * slope.derivative(score);")),  # dq_wide_kernel
]


@pytest.mark.slow
@pytest.mark.parametrize("output, mutation", WIDE_MISTAKES, ids=[m[0] for m in WIDE_MISTAKES])
def test_emulated_wide_kernels_run_where_the_gpu_gives_their_shared_memory(tmp_path, output, mutation):
    """With dkv_wide_kernel (dS^T written as P^T) or dq_wide_kernel (delta dropped) broken, an
    emulated A100's dk or dq is wrong and an emulated RTX 30's right: the launcher takes the wide
    kernels only where a block may have their shared memory, and the emulator refuses an opt-in
    above the device's limit."""
    from emulated_kernels import EmulatedKernels, build

    mutated = EmulatedKernels(build(tmp_path, {"attention_bwd.cu": mutation}))
    q, k, v, dout = make_inputs(1, 2, 1, 100, 100, 128, torch.bfloat16)
    low, truth = reference_run(q, k, v, dout, torch.bfloat16), reference_run(q, k, v, dout, torch.float64)
    with pytest.raises(AssertionError, match=f"{output}: kernel error"):
        assert_within_twice_the_reference(emulated_run(mutated, q, k, v, dout)[0], low, truth)
    assert_within_twice_the_reference(emulated_run(mutated, q, k, v, dout, arch=86)[0], low, truth)


# ---- the Hopper kernels (attention_hopper.cu: wgmma, bulk tensor copies, warp specialisation) ---

HOPPER_CASES = [
    # Taken on an emulated H100 for fp16/bf16 at D 64 and 128 with more than 16 queries: lengths
    # on and off the 128-row/128-key tiles, MHA/GQA/MQA, fewer queries than keys, batch > 1.
    (1, 2, 2, 17, 17, 64, torch.bfloat16),
    (1, 4, 1, 130, 130, 64, torch.float16),
    (1, 2, 1, 100, 333, 128, torch.bfloat16),
    (2, 4, 2, 256, 256, 128, torch.float16),
    (1, 2, 2, 255, 257, 64, torch.bfloat16),
    (1, 6, 2, 129, 400, 128, torch.float16),
]


@pytest.mark.slow
@pytest.mark.parametrize("batch, heads, kv_heads, t_q, t_k, dim, dtype", HOPPER_CASES, ids=map(case_id, HOPPER_CASES))
def test_emulated_hopper_kernels_against_float64(kernels, batch, heads, kv_heads, t_q, t_k, dim, dtype):
    """The wgmma forward, dk/dv and dq kernels on an emulated H100."""
    q, k, v, dout = make_inputs(batch, heads, kv_heads, t_q, t_k, dim, dtype)
    got, _ = emulated_run(kernels, q, k, v, dout, arch=90)
    assert_within_twice_the_reference(got, reference_run(q, k, v, dout, dtype), reference_run(q, k, v, dout, torch.float64))
    # The mma.sync kernels compute the same things another way: the two agree to rounding, not bits
    # (with many keys; a handful can round alike).
    other, _ = emulated_run(kernels, q, k, v, dout)
    assert t_k < 128 or not (torch.equal(got[0], other[0]) or torch.equal(got[3], other[3]))


@pytest.mark.parametrize("dim, dtype, t_q", [(32, torch.bfloat16, 70), (96, torch.float16, 70), (64, torch.float32, 70),
                                             (64, torch.bfloat16, 16)])
def test_emulated_h100_takes_the_other_kernels_where_wgmma_does_not_serve(kernels, dim, dtype, t_q):
    """D 32 and 96, fp32 and decoding run the same kernels on an H100 as on an A100."""
    q, k, v, dout = make_inputs(1, 2, 1, t_q, t_q + 5, dim, dtype)
    h100, a100 = emulated_run(kernels, q, k, v, dout, arch=90)[0], emulated_run(kernels, q, k, v, dout)[0]
    assert all(torch.equal(x, y) for x, y in zip(h100, a100))


def test_emulated_hopper_kernels_read_strided_inputs_in_place(kernels):
    """The copy engine takes the model's transposed views of one projection (rows 3*H*D apart)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 150, 3, 2, 128, generator=g).to(torch.bfloat16)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    dout = torch.randn(2, 2, 150, 128, generator=g).to(torch.bfloat16)
    got = emulated_run(kernels, q, k, v, dout, arch=90)[0]
    contiguous = emulated_run(kernels, q.contiguous(), k.contiguous(), v.contiguous(), dout, arch=90)[0]
    assert all(torch.equal(a, b) for a, b in zip(got, contiguous))


HOPPER_MISTAKES = {
    # Each edit is a bug a GPU would punish; the emulator must catch each one.
    "no wait for the last P V": ("    issue_pv(tiles - 1);\n    turns.hand_over();\n    wgmma_wait<0>();", "    issue_pv(tiles - 1);\n    turns.hand_over();"),
    "P V not waited for before O is rescaled": ("      softmax(j, masked, alpha);\n      wgmma_wait<0>();", "      softmax(j, masked, alpha);"),
    "no wait for K to land": ("      wait_full(k_full, j);\n", ""),
    "64-byte swizzle described": ("uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;\n}", "uint64_t(1024 >> 4) << 32 | uint64_t(2) << 62;\n}"),
    "dk/dv: no wait for Q and dO to land": ("      mbarrier_wait(&q_full[stage], (it / kStages) & 1);\n", ""),
    "dk/dv: the next tile loads before dV and dK are done": (
        "      wgmma_commit();\n      wgmma_wait<0>();\n      wgmma_fence_operand(dk);\n      wgmma_fence_operand(dv);\n"
        "#pragma unroll\n      for (int ks = 0; ks < QSLABS; ++ks) {\n        wgmma_fence_operand(pa[ks]);\n"
        "        wgmma_fence_operand(dsa[ks]);\n      }\n"
        "      __syncwarp();  // every lane has read this stage's lse and delta before its release\n"
        "      if (lane == 0) mbarrier_arrive(&q_empty[stage]);",
        "      wgmma_commit();\n      __syncwarp();\n      if (lane == 0) mbarrier_arrive(&q_empty[stage]);\n"
        "      wgmma_wait<0>();\n      wgmma_fence_operand(dk);\n      wgmma_fence_operand(dv);"),
    "dq: no wait for K and V to land": ("      mbarrier_wait(&kv_full[stage], ((j - first_tile) / kStages) & 1);\n", ""),
    "V released before P V is done": ("      wgmma_wait<0>();\n      wgmma_fence_operand(o);\n#pragma unroll\n      for (int ks = 0; ks < BN / 16; ++ks) wgmma_fence_operand(pa[ks]);  // P(j - 1) is free to overwrite\n      release(v_empty, j - 1);",
                                      "      release(v_empty, j - 1);\n      wgmma_wait<0>();\n      wgmma_fence_operand(o);"),
}
# A mutated kernel may stop the emulator (abort), so it runs in a process of its own.
RUN_ONE = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from emulated_kernels import EmulatedKernels
from test_attention_emulated import emulated_run, make_inputs
lib = EmulatedKernels(Path(sys.argv[1]) / "libattention_emulated.so")
q, k, v, dout = make_inputs(1, 2, 1, 200, 300, 128, torch.bfloat16)
torch.save(emulated_run(lib, q, k, v, dout, arch=90)[0], Path(sys.argv[1]) / "got.pt")
""".format(tests=str(Path(__file__).resolve().parent))


@pytest.mark.slow
@pytest.mark.parametrize("mistake", HOPPER_MISTAKES)
def test_emulator_catches_hopper_forward_mistakes(tmp_path, mistake):
    from emulated_kernels import build

    q, k, v, dout = make_inputs(1, 2, 1, 200, 300, 128, torch.bfloat16)
    build(tmp_path, {"attention_hopper.cu": HOPPER_MISTAKES[mistake]})
    result = subprocess.run([sys.executable, "-c", RUN_ONE, str(tmp_path)], capture_output=True, text=True, timeout=600)
    if result.returncode == 0:  # the run completed: its numbers must then be wrong
        got = torch.load(tmp_path / "got.pt")
        with pytest.raises(AssertionError):
            assert_within_twice_the_reference(got, reference_run(q, k, v, dout, torch.bfloat16),
                                              reference_run(q, k, v, dout, torch.float64))
    else:
        assert "emulator:" in result.stderr, result.stderr[-3000:]


def test_emulated_hopper_kernels_take_any_stride_on_an_extent_of_one(kernels):
    """A batch of one may carry any stride (a view's); the copy engine wants multiples of 16 bytes,
    so the tensor map is given one that is: the Hopper kernels still run (their results differ from
    the mma.sync kernels' in rounding) and agree with the contiguous run bit for bit."""
    q, k, v, dout = make_inputs(1, 2, 1, 200, 200, 64, torch.bfloat16)
    odd = [t.as_strided(t.shape, (12345,) + t.stride()[1:]) for t in (q, k, v)]
    got = emulated_run(kernels, *odd, dout, arch=90)[0]
    assert all(torch.equal(a, b) for a, b in zip(got, emulated_run(kernels, q, k, v, dout, arch=90)[0]))
    assert not torch.equal(got[0], emulated_run(kernels, q, k, v, dout)[0][0])
