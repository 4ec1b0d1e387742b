"""Every attention configuration on the CPU emulator, against the float64 reference.

    python tools/emulated_sweep.py                 # the whole grid (a few hundred cases: ~10-20 min on 2 cores)
    python tools/emulated_sweep.py --dims 64 --dtypes bfloat16
    python tools/emulated_sweep.py --arch 90       # an emulated H100: the wgmma forward (fp16/bf16, D 64/128)
    python tools/emulated_sweep.py --arch 86       # an emulated RTX 30 (99 KB a block): dkv_kernel at D 96/128

The tests run a chosen sample of shapes; this walks the full grid the kernels support: float32,
float16 and bfloat16, head sizes 32/64/96/128, MHA, GQA and MQA, and lengths on and off the tile
multiples for each path (decoding with up to 16 queries, prefill, Tq < Tk), forward and backward,
with the tests' rule (error at most twice the reference's in the same precision, plus a small
floor). Prints one line per case (with its error over the bound) and a summary with the worst
ratio per dtype; exits 1 if any case fails. With --arch 90 the launcher sees an H100 and takes the
Hopper forward (attention_hopper.cu) where it serves; the grid then defaults to what that changes,
with one longer case (six 128-key tiles: the stage ring wraps around several times). With
--arch 86 a block may have 99 KB of shared memory, not an A100's 163 KB: dk/dv at D 96 and 128 take
dkv_kernel instead of dkv_wide_kernel, and the grid defaults to those (fp16/bf16).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from emulated_kernels import EmulatedKernels, build  # noqa: E402
from test_attention_emulated import assert_within_twice_the_reference, emulated_run, make_inputs, reference_run  # noqa: E402

LENGTHS = [(1, 1), (1, 300), (5, 300), (16, 257), (17, 17), (63, 64), (64, 64), (65, 200), (130, 130), (100, 333)]
HEADS = [(4, 4), (4, 2), (4, 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=80, choices=(80, 86, 90),
                        help="the emulated GPU: 80 (A100), 86 (RTX 30) or 90 (H100)")
    parser.add_argument("--dtypes", help="default float32,float16,bfloat16 (float16,bfloat16 with --arch 90)")
    parser.add_argument("--dims", help="default 32,64,96,128 (64,128 with --arch 90)")
    args = parser.parse_args()
    hopper = args.arch == 90
    args.dtypes = args.dtypes or ("float16,bfloat16" if args.arch != 80 else "float32,float16,bfloat16")
    args.dims = args.dims or {80: "32,64,96,128", 86: "96,128", 90: "64,128"}[args.arch]
    lengths = LENGTHS + [(300, 700)] if hopper else LENGTHS
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        kernels = EmulatedKernels(build(Path(tmp)))
        failures, worst, cases = [], {}, list(itertools.product(dtypes, dims, HEADS, lengths))
        start = time.time()
        for i, (dtype, dim, (heads, kv_heads), (t_q, t_k)) in enumerate(cases, 1):
            name = f"{str(dtype).removeprefix('torch.')} D={dim} H={heads}/{kv_heads} Tq={t_q} Tk={t_k}"
            q, k, v, dout = make_inputs(2, heads, kv_heads, t_q, t_k, dim, dtype)
            try:
                got, _ = emulated_run(kernels, q, k, v, dout, arch=args.arch)
                ratio, output = assert_within_twice_the_reference(
                    got, reference_run(q, k, v, dout, dtype), reference_run(q, k, v, dout, torch.float64))
                verdict = f"ok (error / bound {ratio:.2f}, {output})"
                key = str(dtype).removeprefix("torch.")
                worst[key] = max(worst.get(key, (0.0, "")), (ratio, f"{output} at {name}"))
            except AssertionError as e:
                verdict = f"FAIL: {e}"
                failures.append(name)
            print(f"[{i}/{len(cases)}] {name}: {verdict}", flush=True)
    print(f"\n{len(cases) - len(failures)} of {len(cases)} cases within twice the reference's error ({time.time() - start:.0f} s)")
    for key, (ratio, where) in worst.items():
        print(f"  {key}: worst error / bound {ratio:.2f} ({where}; the bound is 2 x the reference's error + a floor)")
    for name in failures:
        print(f"  failed: {name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
