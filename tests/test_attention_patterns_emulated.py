"""Document masks, sliding windows, left padding, softcapping and sinks in the attention kernels' own
CUDA source, run on the CPU emulator (tests/emulator) against the float64 reference: the 2x rule of
test_attention_emulated.py for out, lse, dq, dk and dv, over every kernel family that takes them
(the tensor-core kernels' PATTERN instances at each head dim, CUDA-core float32, split-key decoding).

The kernels take the pattern as each query's first visible key (`first_keys` in
scratchformer/ops/attention.py); the reference builds its mask from the document ids and window
on its own. Tiles outside every query's pattern must be skipped, not read and masked: keys there
hold NaN, which any product would spread, and the results must not change by a bit.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_attention_emulated import assert_within_twice_the_reference, make_inputs

from scratchformer.ops import reference
from scratchformer.ops.attention import first_keys


def documents(lengths_per_row):
    """document ids [B, T] from each row's document lengths (runs numbered from 0)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row])


def left_padded(t, real_lengths):
    """A ragged batch as `GPT.generate` feeds it: each pad slot its own document, then one document."""
    rows = []
    for n in real_lengths:
        rows.append(torch.cat([-1 - torch.arange(t - n), torch.zeros(n, dtype=torch.long)]))
    return torch.stack(rows)


def reference_run(q, k, v, dout, dtype, document_ids, left, softcap=None, sinks=None):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference.causal_attention(*leaves, q.shape[-1] ** -0.5, document_ids, left, softcap, sinks)
    out.backward(dout.to(dtype))
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def emulated_run(kernels, q, k, v, dout, document_ids, left, arch=80, softcap=None, sinks=None):
    scale = q.shape[-1] ** -0.5
    first = None
    if document_ids is not None or left is not None:
        first = first_keys(q.shape[2], k.shape[2], document_ids, left).expand(q.shape[0], -1).contiguous()
    cap = softcap or 0.0
    out, lse, splits = kernels.forward(q, k, v, scale, arch=arch, first_key=first, sinks=sinks, softcap=cap)
    return [out, lse, *kernels.backward(dout, q, k, v, out, lse, scale, arch=arch, first_key=first, softcap=cap)], splits


def head_sinks(heads):
    """A sink logit per head, from below the scores to above them."""
    return torch.linspace(-2.0, 3.0, heads)


def check(kernels, batch, heads, kv_heads, t_q, t_k, dim, dtype, document_ids=None, left=None, softcap=None,
          sinks=False, arch=80):
    q, k, v, dout = make_inputs(batch, heads, kv_heads, t_q, t_k, dim, dtype)
    sinks = head_sinks(heads) if sinks else None
    got, splits = emulated_run(kernels, q, k, v, dout, document_ids, left, arch, softcap, sinks)
    assert_within_twice_the_reference(got, reference_run(q, k, v, dout, dtype, document_ids, left, softcap, sinks),
                                      reference_run(q, k, v, dout, torch.float64, document_ids, left, softcap, sinks))
    return got, splits


# Documents of random lengths off the tile multiples, with a one-token document; sequences of
# another length per row.
DOCS_300 = documents([[37, 1, 90, 130, 42], [200, 100]])
DOCS_150 = documents([[1, 64, 3, 82], [150]])
GRID = [
    # (batch, heads, kv_heads, t_q, t_k, dim, dtype, document_ids, window left)
    (2, 2, 1, 300, 300, 64, torch.bfloat16, DOCS_300, None),     # tensor cores, MQA
    (2, 4, 2, 300, 300, 32, torch.float16, DOCS_300, None),      # D 32: 128-key tiles, 64-query dk/dv tiles
    (2, 2, 2, 150, 150, 128, torch.bfloat16, DOCS_150, None),    # D 128 (no 8-warp kernels with a pattern)
    (2, 2, 1, 150, 150, 96, torch.float16, DOCS_150, None),      # D 96: 32-key forward tiles, 16-key dq tiles
    (1, 2, 1, 300, 300, 64, torch.bfloat16, None, 20),           # a window shorter than a tile
    (1, 2, 2, 300, 300, 128, torch.float16, None, 150),          # and longer
    (2, 2, 1, 300, 300, 64, torch.float16, DOCS_300, 50),        # both
    (1, 2, 1, 100, 300, 64, torch.bfloat16, DOCS_300[:1], 70),   # fewer queries than keys (a KV cache)
    (2, 2, 1, 150, 150, 64, torch.float32, DOCS_150, 40),        # CUDA cores, float32
    (1, 4, 2, 120, 300, 32, torch.float32, DOCS_300[1:], None),
    (2, 4, 2, 1, 300, 64, torch.bfloat16, DOCS_300, None),       # decoding: split keys, each query's own document
    (2, 2, 1, 7, 300, 128, torch.float16, None, 100),
    (3, 2, 1, 9, 80, 64, torch.bfloat16, left_padded(80, [80, 33, 1]), None),  # a ragged batch, left-padded
    (3, 2, 1, 40, 40, 64, torch.float16, left_padded(40, [40, 17, 5]), None),
]
GRID = [case + (None, False) for case in GRID] + [
    # ... + (softcap, sinks): capping hard (scores about N(0, 1)), and sinks from -2 to 3
    (1, 2, 1, 300, 300, 64, torch.bfloat16, None, None, 1.0, False),
    (2, 2, 2, 150, 150, 128, torch.float16, None, None, 1.0, False),
    (1, 2, 1, 150, 150, 96, torch.bfloat16, None, None, 2.0, True),
    (1, 4, 2, 150, 150, 32, torch.float16, None, None, None, True),
    (2, 2, 1, 150, 150, 64, torch.float32, DOCS_150, None, 1.5, True),  # CUDA cores
    (2, 4, 2, 1, 300, 64, torch.bfloat16, DOCS_300, None, 1.0, True),  # split keys: the sink in the combine
    (2, 2, 1, 300, 300, 64, torch.float16, DOCS_300, 50, 1.0, True),   # everything at once
]


def grid_id(case):
    batch, heads, kv_heads, t_q, t_k, dim, dtype, docs, left, softcap, sinks = case
    pattern = "+".join(p for p, on in (("docs", docs is not None), (f"window{left}", left is not None),
                                       (f"softcap{softcap}", softcap is not None), ("sinks", sinks)) if on)
    return f"B{batch}-H{heads}/{kv_heads}-T{t_q}x{t_k}-D{dim}-{str(dtype).split('.')[-1]}-{pattern}"


@pytest.mark.parametrize("case", GRID, ids=map(grid_id, GRID))
def test_patterns_in_the_emulated_kernels_against_float64(emulated, case):
    batch, heads, kv_heads, t_q, t_k, dim, dtype, docs, left, softcap, sinks = case
    _, splits = check(emulated, batch, heads, kv_heads, t_q, t_k, dim, dtype, docs, left, softcap, sinks)
    if t_q == 1:
        assert splits > 1, "decoding against a long cache should split the keys (some ranges then see no key)"


# An RTX 30/40/50 (99 KB of shared memory a block) runs the 4-warp backward kernels at D 96 and 128
# where an A100 runs the 8-warp ones (the grid above).
RTX_GRID = [
    (2, 2, 2, 150, 150, 128, torch.bfloat16, DOCS_150, None, None, False),
    (1, 2, 1, 150, 150, 96, torch.float16, None, 40, 2.0, True),
]


@pytest.mark.parametrize("case", RTX_GRID, ids=map(grid_id, RTX_GRID))
def test_patterns_in_the_emulated_4_warp_backward_at_large_head_dims(emulated, case):
    check(emulated, *case, arch=86)


# ---- the Hopper kernels (attention_hopper.cu): their PATTERN instances on an emulated H100 ----

HOPPER_GRID = [
    # fp16/bf16 at D 64 and 128 with more than 16 queries: 128-query blocks over 128-key tiles
    # (forward), 128-key dk/dv blocks over 64-query tiles, 64-key dq tiles.
    (2, 2, 1, 300, 300, 64, torch.bfloat16, DOCS_300, None, None, False),     # documents, MQA
    # Keys 0-127's last query (128, of a 29-key document) opens a 64-query tile of its own.
    (1, 2, 1, 300, 300, 128, torch.bfloat16, documents([[100, 29, 171]]), None, None, False),
    # Enough dk/dv blocks that the backward is not split: a block walks both heads of its group.
    (3, 2, 1, 300, 300, 64, torch.bfloat16, torch.cat([DOCS_300, documents([[100, 29, 171]])]), None, None, False),
    (1, 2, 1, 300, 300, 128, torch.float16, None, 20, None, False),          # a window shorter than a tile
    (1, 2, 1, 300, 300, 64, torch.bfloat16, None, 129, None, False),         # and longer: masked tiles below plain ones
    (1, 2, 1, 100, 300, 64, torch.float16, DOCS_300[:1], 70, None, False),   # fewer queries than keys
    (3, 2, 1, 150, 150, 128, torch.bfloat16, left_padded(150, [150, 77, 5]), None, None, False),  # left-padded
    (2, 2, 2, 150, 150, 128, torch.float16, None, None, 1.0, True),          # softcap and sinks
    (2, 2, 1, 300, 300, 64, torch.float16, DOCS_300, 50, 1.0, True),         # everything at once
]


@pytest.mark.parametrize("case", HOPPER_GRID, ids=map(grid_id, HOPPER_GRID))
def test_patterns_in_the_emulated_hopper_kernels_against_float64(emulated, case):
    got, _ = check(emulated, *case, arch=90)
    # The wgmma kernels ran (not the mma.sync ones, which round otherwise): forward, dq, and dk/dv.
    batch, heads, kv_heads, t_q, t_k, dim, dtype, docs, left, softcap, sinks = case
    q, k, v, dout = make_inputs(batch, heads, kv_heads, t_q, t_k, dim, dtype)
    a100, _ = emulated_run(emulated, q, k, v, dout, docs, left, 80, softcap, head_sinks(heads) if sinks else None)
    for name, i in (("out", 0), ("dq", 2), ("dk", 3)):
        assert not torch.equal(got[i], a100[i]), f"{name}: the same bits as the mma.sync kernels'"


# The key tiles the PATTERN instances walk on an A100 (attention_fwd.cu block_n(), attention_bwd.cu
# dq_key_tile(), dq_wide_kernel's 64 at D = 128) and their dk/dv blocks' keys (64; dkv_wide_kernel's
# 128 at D 96 and 128): keys below the start of the tile holding the first visible key are never read.
TILES = {32: (112, 32, 64), 64: (96, 32, 64), 96: (32, 16, 128), 128: (48, 64, 128)}


# And the Hopper kernels': 128-key forward tiles, 64-key dq tiles, 128-key dk/dv blocks.
HOPPER_TILES = (128, 64, 128)


@pytest.mark.parametrize("dim, dtype, t_q, t_k, docs, left, arch", [
    (64, torch.bfloat16, 50, 300, [[250, 50]], None, 80),   # the queries' document starts at key 250
    (128, torch.float16, 60, 300, None, 30, 80),            # a window: keys before 240 - 30 unseen
    (32, torch.float32, 40, 300, [[260, 40]], None, 80),
    (64, torch.bfloat16, 1, 300, [[200, 100]], None, 80),   # decoding, split keys
    (64, torch.bfloat16, 100, 400, [[300, 100]], None, 90),  # the Hopper kernels
    (128, torch.float16, 60, 400, None, 30, 90),
])
def test_tiles_outside_every_querys_pattern_are_never_read(emulated, dim, dtype, t_q, t_k, docs, left, arch):
    docs = documents(docs) if docs is not None else None
    first = int(first_keys(t_q, t_k, docs, left).min())
    unread = min(first // n * n for n in (TILES[dim] if arch == 80 else HOPPER_TILES))
    assert unread >= 128, "the case should leave whole tiles unread"
    q, k, v, dout = make_inputs(1, 2, 1, t_q, t_k, dim, dtype)
    clean = emulated_run(emulated, q, k, v, dout, docs, left, arch)[0]
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, :unread] = float("nan")
    v_nan[:, :, :unread] = float("nan")
    poisoned = emulated_run(emulated, q, k_nan, v_nan, dout, docs, left, arch)[0]
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], clean, poisoned):
        assert torch.equal(a, b), f"{name} changed: a tile outside every query's pattern was read"
    assert (clean[3][:, :, :unread] == 0).all() and (clean[4][:, :, :unread] == 0).all()


MISTAKES = {
    # (file, text, mutation): each a bug in the pattern's handling the grid must catch.
    "forward: a document's first key masked": (
        "attention_fwd.cu", "(PATTERN && nt * 8 + e < from)", "(PATTERN && nt * 8 + e <= from)"),
    "forward: a tile skipped that holds a first key": (
        "attention_fwd.cu", "const int key_begin = first_key_of(first_key, s, b, m0) / kBlockN * kBlockN;",
        "const int key_begin = (first_key_of(first_key, s, b, m0) + kBlockN - 1) / kBlockN * kBlockN;"),
    "forward: a masked tile taken as plain": (
        "attention_fwd.cu", "for (; n0 < low_end; n0 += kBlockN) step(n0, std::true_type{});",
        "for (; n0 < low_end - kBlockN; n0 += kBlockN) step(n0, std::true_type{});"),
    "dk/dv: the last query that sees the block's keys dropped": (
        "attention_bwd.cu", "const int tiles_per_head = (q_end - first_query + BM - 1) / BM;",
        "const int tiles_per_head = (q_end - 1 - first_query + BM - 1) / BM;"),
    "dk/dv: a query's first key off by one": (
        "attention_bwd.cu", "(PATTERN && key < from[e & 1])", "(PATTERN && key <= from[e & 1])"),
    "dq: the low masked tiles run plain": (
        "attention_bwd.cu", "  int j = first_tile;\n  for (; j * BN < low_end; ++j) step(j, std::true_type{});\n  for (; j < plain_tiles; ++j) step(j, std::false_type{});\n  for (; j < tiles; ++j) step(j, std::true_type{});\n\n#pragma unroll\n  for (int r = 0; r < 2 * MT; ++r) {",
        "  int j = first_tile;\n  for (; j < plain_tiles; ++j) step(j, std::false_type{});\n  for (; j < tiles; ++j) step(j, std::true_type{});\n\n#pragma unroll\n  for (int r = 0; r < 2 * MT; ++r) {"),
    "CUDA cores: a row's first key ignored": (
        "attention_simt.cu", "if (k0 + key_lane > last_key || k0 + key_lane < first) score = -INFINITY;",
        "if (k0 + key_lane > last_key) score = -INFINITY;"),
    "dk/dv: the cap's derivative dropped": (
        "attention_bwd.cu", "st[km][nt][e] = p;\n          dpt[km][nt][e] = p * (dpt[km][nt][e] - (e & 1 ? delta.y : delta.x)) * cap.derivative(score);",
        "st[km][nt][e] = p;\n          dpt[km][nt][e] = p * (dpt[km][nt][e] - (e & 1 ? delta.y : delta.x));"),
    "forward: the sink left out of the sum": (
        "attention_fwd.cu", "l = fmaf(l, corr, exp2_approx(sink - both));", "l = l * corr;"),
    # The 8-warp kernels (an A100's at D 96 and 128; the grid's cases there):
    "dk/dv 8-warp: a query's first key ignored": (
        "attention_bwd.cu", "key >= s.t_k || key < (e & 1 ? from.y : from.x)) p = 0.f;", "key >= s.t_k) p = 0.f;"),
    "dq 8-warp: the low masked tiles run plain": (
        "attention_bwd.cu", "  int j = first_tile;\n  if constexpr (PATTERN)\n    for (; j * BN < low_end; ++j) step(j, std::true_type{});\n",
        "  int j = first_tile;\n"),
    "decoding: the sink left out of the combine": (
        "attention_simt.cu", "float sum = expf(sink - m), o[PER_LANE] = {};", "float sum = 0.f, o[PER_LANE] = {};"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_grid_catches_pattern_mistakes(tmp_path, mistake):
    from emulated_kernels import EmulatedKernels, build

    file, text, mutation = MISTAKES[mistake]
    mutated = EmulatedKernels(build(tmp_path, {file: (text, mutation)}))
    for case in GRID:
        try:
            check(mutated, *case)
        except AssertionError:
            return  # caught
    pytest.fail(f"no case of the grid catches: {mistake}")


HOPPER_MISTAKES = {
    # The same kinds of bug in the Hopper kernels' PATTERN code (attention_hopper.cu), and in the
    # ring's counting from a first tile other than 0.
    "forward: a document's first key masked": (
        "(PATTERN && key < from[r])) sc[i] = -INFINITY;", "(PATTERN && key <= from[r])) sc[i] = -INFINITY;"),
    "forward: the low masked tiles run plain": (
        "    if constexpr (PATTERN)\n      for (; j < tiles && j * BN < low_end; ++j) step(j, std::true_type{});\n", ""),
    "forward: the producer counts the ring from tile 0": (
        "        const int stage = (j - first_tile) % kStages;\n        const uint32_t parity = (((j - first_tile) / kStages) & 1) ^ 1;",
        "        const int stage = j % kStages;\n        const uint32_t parity = ((j / kStages) & 1) ^ 1;"),
    "forward: the sink left out of the sum": ("l = fmaf(l, corr, exp2_approx(sink - both));", "l = l * corr;"),
    "dk/dv: a query's first key off by one": ("(PATTERN && key < from[col + e])", "(PATTERN && key <= from[col + e])"),
    "dk/dv: the last query that sees the block's keys dropped": (
        "const int tiles_per_head = (q_end - first_query + kBwdQueries - 1) / kBwdQueries;",
        "const int tiles_per_head = (q_end - 1 - first_query + kBwdQueries - 1) / kBwdQueries;"),
    "dk/dv: a tile with queries that miss the first key taken as plain": (
        "i0 + kBwdQueries <= (PATTERN ? plain_end : s.t_q)", "i0 + kBwdQueries <= (PATTERN ? q_end : s.t_q)"),
    "dq: the low masked tiles run plain": (
        "    if constexpr (PATTERN)\n      for (; j * BN < low_end; ++j) step(j, std::true_type{});\n", ""),
    "dq: the consumers count the ring from tile 0": (
        "      const int stage = (j - first_tile) % kStages;\n      const uint32_t k_stage",
        "      const int stage = j % kStages;\n      const uint32_t k_stage"),
    "dq: the cap's derivative dropped": (
        "sc[i] = p * (dp[i] - delta[r]) * cap.derivative(score);", "sc[i] = p * (dp[i] - delta[r]);"),
    "dk/dv: the producer goes to the next head at the last query, not the last that sees the block": (
        "      if (i0 >= (PATTERN ? q_end : s.t_q)) i0 = first_query, ++h;", "      if (i0 >= s.t_q) i0 = first_query, ++h;"),
    "dk/dv: the consumers go to the next head at the last query": (
        "return i0 + kBwdQueries < (PATTERN ? q_end : s.t_q) ? i0 + kBwdQueries : first_query;",
        "return i0 + kBwdQueries < s.t_q ? i0 + kBwdQueries : first_query;"),
    "dk/dv: a block without work still arrives at the ping-pong barrier": (
        "if (group == 1 && turns > 0) named_barrier_arrive(1, 256);", "if (group == 1) named_barrier_arrive(1, 256);"),
    "dk/dv: a block without work still loads K and V": (
        "if (threadIdx.x == 0 && (!PATTERN || tiles > 0)) {", "if (threadIdx.x == 0) {"),
}
# A mutated Hopper kernel may stop the emulator (a wait that never completes), so the grid runs in
# a process of its own: exit 3 when a case's numbers are wrong, 0 when every case passes.
RUN_GRID = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from emulated_kernels import EmulatedKernels
from test_attention_patterns_emulated import HOPPER_GRID, check
lib = EmulatedKernels(Path(sys.argv[1]) / "libattention_emulated.so")
for case in HOPPER_GRID:
    try:
        check(lib, *case, arch=90)
    except AssertionError as e:
        print(e)
        sys.exit(3)
""".format(tests=str(Path(__file__).resolve().parent))


@pytest.mark.slow
@pytest.mark.parametrize("mistake", HOPPER_MISTAKES)
def test_the_hopper_grid_catches_pattern_mistakes(tmp_path, mistake):
    from emulated_kernels import build

    build(tmp_path, {"attention_hopper.cu": HOPPER_MISTAKES[mistake]})
    result = subprocess.run([sys.executable, "-c", RUN_GRID, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode != 0, f"no case of the Hopper grid catches: {mistake}"
    assert result.returncode == 3 or "emulator:" in result.stderr, result.stderr[-3000:]
