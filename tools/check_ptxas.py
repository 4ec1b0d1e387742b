"""Compile every CUDA kernel with `-Xptxas -v` and fail on register spills, and on the ptxas
warnings that undo the Hopper kernel (setmaxnreg ignored, wgmma serialised).

Runs without a GPU: it only needs the CUDA toolkit. Prints one markdown table row per kernel and
architecture (registers, stack frame, spill bytes) and exits 1 if any kernel spills or warns so.

    python tools/check_ptxas.py [--arch-list "8.0;9.0a"]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cuda_toolkit

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"
# The flags torch's build gives nvcc that change code generation (see setup.py's extension).
BUILD_FLAGS = [
    "-O3", "-std=c++17", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
# ptxas notes (printed as info) that undo the Hopper kernel's design: setmaxnreg ignored (C7508),
# a compiler-injected warpgroup fence (C7519), wgmma serialised (C7520 and kin).
HOPPER_WARNING = re.compile(r"\((C7508|C751\d|C752\d)\)|wgmma.mma_async instructions are serialized")


WARNINGS: list[str] = []  # the Hopper warnings seen, over all sources


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def report(source: Path, nvcc: str, arch_list: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", str(source), "-o", os.path.join(tmp, "k.o"), "-I", str(KERNELS),
               "-Xptxas", "-v", *BUILD_FLAGS, *cuda_toolkit.gencode_flags(arch_list)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nvcc failed on {source.name}:\n{result.stderr}")
    rows, current = [], None
    warnings = WARNINGS
    for line in result.stderr.splitlines():
        if m := ENTRY.search(line):
            current = {"file": source.name, "kernel": m.group(1), "arch": m.group(2)}
            rows.append(current)
        elif current and (m := FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := REGS.search(line)):
            current["registers"] = int(m.group(1))
        if HOPPER_WARNING.search(line):
            warnings.append(f"{source.name}: {line.strip()}")
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        name = name.replace("(anonymous namespace)::", "").replace("scratchformer::", "")
        row["kernel"] = re.sub(r"^void |\(.*", "", name)  # drop the return type and the arguments
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch-list", default=cuda_toolkit.arch_list(), help="compute capabilities (default %(default)s)")
    args = parser.parse_args()
    home = cuda_toolkit.find_cuda_home()
    if home is None:
        sys.exit("check_ptxas: no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)")
    nvcc = os.path.join(home, "bin", "nvcc")
    rows = [row for source in sorted(KERNELS.glob("*.cu")) for row in report(source, nvcc, args.arch_list)]
    print("| file | kernel | arch | registers | stack | spill stores | spill loads |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['file']} | `{r['kernel']}` | {r['arch']} | {r.get('registers', '?')} | {r.get('stack', '?')} "
              f"| {r.get('spill_stores', '?')} | {r.get('spill_loads', '?')} |")
    spilling = [r for r in rows if r.get("spill_stores", 1) or r.get("spill_loads", 1)]
    for r in spilling:
        print(f"SPILL: {r['kernel']} on {r['arch']} ({r['file']})", file=sys.stderr)
    for w in WARNINGS:
        print(f"HOPPER: {w}", file=sys.stderr)
    print(f"{len(rows)} kernel builds checked, {len(spilling)} with spills, {len(WARNINGS)} Hopper warnings")
    return 1 if spilling or WARNINGS or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
