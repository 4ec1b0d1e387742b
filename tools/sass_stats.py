"""A static profile of the compiled kernels: resources, occupancy and each kernel's hot loop.

    python tools/sass_stats.py                       # the installed scratchformer's kernels, sm_80 and sm_90(a)
    python tools/sass_stats.py --arch sm_90 --lib build/.../_kernels.abi3.so --filter "attention_fwd:.*bfloat16"
    python tools/sass_stats.py --check               # exit 1 when a kernel passes the ceilings below

Needs cuobjdump and nvdisasm: `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` (the
`sass` extra), or the copies triton ships with torch, or a CUDA toolkit on PATH.

For every kernel instantiation compiled for an architecture: registers, static shared memory
(plus the dynamic shared memory its launcher asks for), threads per block, and the blocks and
warps one SM holds. Then the hot loop: the loop (a backward branch and the code it jumps back
over) holding the most tensor-core instructions (of several such, the leanest: the masked copy
of a loop body that only the tiles on the causal diagonal run is not the steady state), or, for
kernels without them, the most instructions. In it: instructions, HMMA (mma.sync), HGMMA (Hopper's wgmma, each
a whole warpgroup's 64 x N x 16 product), LDSM (ldmatrix), other shared loads, MUFU (exp2, rcp),
block barriers, and integer divisions (their SASS expansion starts with I2F.U32.RP). Counts are
static, per iteration: an inner loop inside the hot one counts once. These are facts of the
compiled code, not timings; they predict where a kernel spends issue slots.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Per-SM limits: registers, shared memory a block may use (bytes), threads, resident blocks.
SM_LIMITS = {
    80: (65536, 163 * 1024, 2048, 32),
    86: (65536, 99 * 1024, 1536, 16),
    89: (65536, 99 * 1024, 1536, 24),
    90: (65536, 227 * 1024, 2048, 32),
    100: (65536, 227 * 1024, 2048, 32),
    120: (65536, 99 * 1024, 1536, 32),
}

# Ceilings the kernel-efficiency work aims at (see the README); --check holds them.
CEILINGS = {
    "forward": {"instr_per_hmma": {32: 5.0, 64: 5.0, 96: 5.0, 128: 4.0}, "ldsm_per_hmma": 0.35},
    "backward": {"instr_per_hmma": 5.5, "ldsm_per_hmma": 0.45},
    "min_warps_per_sm": 8,
}


# Ceilings not met yet, each with why: (kernel pattern, the ceiling's word in the message, reason).
# --check reports these and fails on any other passed ceiling, and on an entry here that no
# longer matches anything (delete it: the ceiling is met).
KNOWN = [
    (r"^dkv_kernel<\w+, (96|128), false>", "ldmatrix", "runs at D = 96 and 128 only where a block may not have "
     "dkv_wide_kernel's 128 / 156 KB of shared memory (sm_86/89/120: 99 KB): 16 keys per warp "
     "there (32 would need 2 D accumulator floats a thread), so each Q/dO fragment feeds two products (0.5 at best)"),
    (r"^dq_kernel<\w+, 128, false>", "ldmatrix", "runs at D = 128 only where a block may not have dq_wide_kernel's 136 KB "
     "of shared memory (sm_86/89/120: 99 KB): 16 queries per warp there (two 16-row tiles would need Q and dO in "
     "shared memory, leaving one 4-warp block per SM)"),
    (r"^forward_kernel<\w+, 32, false>$", "instructions", "D = 32: one score per HMMA, and each score costs about 4.5 "
     "instructions (FFMA, MUFU, FMNMX, FADD, half an F2FP) besides the HMMA: the floor is above the ceiling"),
    # The PATTERN instances (first_key, softcap, sinks; attention_fwd.cu, attention_bwd.cu), not tuned yet:
    (r"^(forward|dq|dkv|dq_wide|dkv_wide)_kernel<\w+, \d+, true>$", "instructions", "the PATTERN instance: its loop carries the "
     "softcapping code behind a uniform branch (per score a tanh from an ex2 and a division, and in the backward its "
     "derivative), counted here whether a call caps or not, besides the first-key masking"),
    (r"^(dq|dkv)_kernel<\w+, \d+, true>$", "ldmatrix", "the PATTERN instance: 16 keys per warp in dk/dv at every D "
     "and 16-key dq tiles at D = 96, so that its bounds and the cap fit in registers without spilling"),
    (r"^forward_kernel<\w+, 96, true>$", "ldmatrix", "the PATTERN instance at D = 96: 32-key tiles (48 or more spill "
     "with the pattern's registers on some architecture)"),
]


def known(violation: str) -> str | None:
    """The reason a passed ceiling is known, or None."""
    kernel = violation.split(" on sm_")[0]
    for pattern, word, reason in KNOWN:
        if re.search(pattern, kernel) and word in violation:
            return reason
    return None


def find_tool(name: str) -> str:
    """cuobjdump / nvdisasm: the registry package's, triton's, then PATH's."""
    for root in map(Path, sys.path):
        for candidate in (root / "nvidia" / "cu13" / "bin" / name, root / "nvidia" / "cuda_nvdisasm" / "bin" / name,
                          root / "nvidia" / "cuda_cuobjdump" / "bin" / name, root / "triton" / "backends" / "nvidia" / "bin" / name):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    sys.exit(f"sass_stats: {name} not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"sass_stats: {' '.join(cmd[:2])} failed: {result.stderr.strip()[:500]}")
    return result.stdout


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        out = names
    short = {}
    for name, pretty in zip(names, out):
        pretty = pretty.replace("(anonymous namespace)::", "").replace("scratchformer::", "").removeprefix("void ")
        pretty = re.sub(r"\([^()]*\)$", "", pretty)  # drop the parameter list
        short[name] = pretty
    return short


def dynamic_shared_bytes(file: str, kernel: str) -> int:
    """The dynamic shared memory a launcher requests; mirrors forward_shared_bytes(),
    dkv_shared_bytes(), dkv_wide_shared_bytes(), dq_shared_bytes(), dq_wide_shared_bytes() and forward_simt_shared_bytes() in the attention .cu
    files, and the hopper_*shared_bytes() in attention_hopper.cu: keep them in step."""
    if m := re.match(r"hopper_(forward|dkv|dq)_kernel<\w+, (\d+), (true|false)>", kernel):  # attention_hopper.cu
        kind, d, pattern = m.group(1), int(m.group(2)), m.group(3) == "true"
        if kind == "forward":  # hopper_shared_bytes(): barriers and alignment, Q, two stages of K and V
            return 2048 + 128 * d * 2 + 2 * 2 * 128 * d * 2
        if kind == "dkv":  # hopper_dkv_shared_bytes(): K and V, two stages of Q, dO, lse and delta (and first keys)
            return 2048 + 2 * 128 * d * 2 + 2 * 2 * 64 * d * 2 + (3 if pattern else 2) * 2 * 64 * 4
        return 2048 + 2 * 128 * d * 2 + 2 * 2 * 64 * d * 2  # hopper_dq_shared_bytes(): Q and dO, two stages of K and V
    if m := re.match(r"dq_wide_kernel<\w+, (\d+), (true|false)>", kernel):  # dO, Q (then dS), two buffers of 64-key K and V
        return (2 * 128 + 4 * 64) * (int(m.group(1)) + 8) * 2
    if m := re.match(r"dkv_wide_kernel<\w+, (\d+), (true|false)>", kernel):  # K, V, two Q buffers, dO (64 queries), P^T, dS^T, lse, delta
        return (2 * 128 + 3 * 64) * (int(m.group(1)) + 8) * 2 + 2 * 128 * 72 * 2 + 4 * 64 * 4
    m = re.match(r"(dkv|dq|forward)_kernel<(\w+), (\d+)(, true|, false)?>", kernel)
    if file not in ("attention_fwd", "attention_bwd", "attention_simt") or not m:
        return 0
    size, d = (2 if m.group(2) in ("__half", "__nv_bfloat16") else 4), int(m.group(3))
    pattern = m.group(4) == ", true"  # the instance that takes first_key, softcap and sinks
    if file == "attention_simt":  # forward_simt_shared_bytes() in attention_simt.cu: two K/V tiles of 32 keys
        return 4 * 32 * (d + 16 // size) * size if m.group(1) == "forward" else 0
    if m.group(1) == "forward":  # forward_shared_bytes() in attention_fwd.cu: Q, K, V tiles of block_n() keys
        keys = {32: 112, 64: 96, 96: 32, 128: 48}[d] if pattern else {32: 128, 64: 96, 96: 80, 128: 48}[d]
        return (128 + 2 * keys) * (d + 8) * size
    if m.group(1) == "dq":  # dq_shared_bytes(): Q and dO (two row tiles per warp, D <= 96), two K/V buffers of dq_key_tile()
        keys = {32: 32, 64: 32, 96: 16, 128: 32}[d] if pattern else (64 if d <= 32 else 32)
        return ((2 * 128 if d <= 96 else 0) + 4 * keys) * (d + 8) * size
    keys, inner = (128 if d <= 64 and not pattern else 64), (64 if d <= 32 else 32)  # dkv_block_keys(), dkv_query_tile()
    return (2 * keys + 4 * inner) * (d + 8) * size + 4 * inner * 4


@dataclass
class Loop:
    instructions: int = 0
    hmma: int = 0
    hgmma: int = 0
    ldsm: int = 0
    lds: int = 0
    mufu: int = 0
    bar: int = 0
    idiv: int = 0


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"`\((\.L_x_\d+)\)")


def hot_loop(sass: str) -> Loop | None:
    """The loop with the most tensor-core instructions (the leanest of those, see below; else the
    most instructions) in one function's SASS."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        if m := LABEL.match(line.strip()):
            labels[m.group(1)] = len(instructions)
        elif m := INSTRUCTION.search(line):
            instructions.append((m.group(3), m.group(4), bool(m.group(2))))
    # Cold blocks (an mbarrier wait's retry) sit after the function's last unconditional EXIT and
    # branch back into it: those branches close no loop.
    last_exit = max((i for i, (op, _, predicated) in enumerate(instructions) if op == "EXIT" and not predicated),
                    default=len(instructions))
    loops = []  # (start, end, Loop)
    for end, (op, rest, _) in enumerate(instructions):
        target = BRANCH.search(rest)
        if op != "BRA" or end > last_exit or not target or labels.get(target.group(1), end + 1) > end:
            continue
        start = labels[target.group(1)]
        body = [(o, r) for o, r, _ in instructions[start : end + 1]]
        loop = Loop(instructions=sum(1 for o, _ in body if o != "NOP"))
        for o, _ in body:
            loop.hmma += o.startswith("HMMA")
            loop.hgmma += o.startswith("HGMMA")
            loop.ldsm += o.startswith("LDSM")
            loop.lds += o.startswith("LDS") and not o.startswith("LDSM")
            loop.mufu += o.startswith("MUFU")
            loop.bar += o.startswith("BAR.SYNC") or o == "BAR"
            loop.idiv += o.startswith("I2F.U32.RP") or o.startswith("I2F.RP")
        loops.append((start, end, loop))
    best, best_key = None, None
    for start, end, loop in loops:
        tensor = loop.hmma + loop.hgmma
        # A loop around loops with tensor work (runs of masked and plain tiles) is not the hot one.
        if tensor and any(s >= start and e <= end and (s, e) != (start, end) and l.hmma + l.hgmma for s, e, l in loops):
            continue
        # Among loops with equally many tensor instructions, a kernel's steady state is the leanest:
        # tiles on the causal diagonal run a masked copy of the loop body, a few iterations per block.
        key = (tensor, -loop.instructions if tensor else loop.instructions)
        if best_key is None or key > best_key:
            best, best_key = loop, key
    return best


def functions_of(cubin: str, nvdisasm: str) -> dict[str, str]:
    """Mangled name -> its SASS."""
    text = run([nvdisasm, "-c", cubin])
    parts = re.split(r"^//-+ \.text\.(\S+) -+$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def resources(cubin: str, cuobjdump: str) -> dict[str, dict]:
    usage = {}
    current = None
    for line in run([cuobjdump, "-res-usage", cubin]).splitlines():
        if m := re.search(r"Function (\S+):", line):
            current = m.group(1)
        elif current and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            usage[current] = {"regs": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3)), "local": int(m.group(4))}
    elf = run([cuobjdump, "-elf", cubin])
    for name in usage:
        section = elf.rsplit(f".nv.info.{name}\n", 1)  # its attributes, after the section table
        own = section[1].split(".nv.info.", 1)[0] if len(section) > 1 else ""  # this function's attributes only
        m = re.search(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)", own)
        usage[name]["threads"] = int(m.group(1), 16) * int(m.group(2), 16) * int(m.group(3), 16) if m else None
    return usage


def occupancy(arch: int, regs: int, shared: int, threads: int | None) -> tuple[int, int] | None:
    """(blocks, warps) resident per SM, from registers (allocated per warp in units of 256),
    shared memory and threads; None when the block size is not recorded in the binary (a kernel
    without __launch_bounds__)."""
    if not threads:
        return None
    reg_limit, smem_limit, thread_limit, block_limit = SM_LIMITS.get(arch, SM_LIMITS[90])
    warps = (threads + 31) // 32
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(block_limit, thread_limit // threads, reg_limit // (regs_per_warp * warps))
    if shared:
        # 1 KB per block is reserved for the system; sm_90 binaries already count it in SHARED.
        blocks = min(blocks, smem_limit // (shared + (1024 if arch < 90 else 0)))
    return blocks, blocks * warps


def profile(library: str, archs: list[str], pattern: str | None) -> list[dict]:
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    listing = run([cuobjdump, "-lelf", library])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            # sm_90 means the H100 image: sm_90a where the build has it (the default), else sm_90.
            wanted = "sm_90a?" if arch == "sm_90" else re.escape(arch)
            cubins = re.findall(rf"ELF file\s+\d+: (\S+\.{wanted}\.cubin)", listing)
            if not cubins:
                sys.exit(f"sass_stats: {library} has no code for {arch}")
            for cubin in cubins:
                subprocess.run([cuobjdump, "-xelf", cubin, library], cwd=tmp, capture_output=True, check=True)
                path = os.path.join(tmp, cubin)
                usage, sass = resources(path, cuobjdump), functions_of(path, nvdisasm)
                names = demangle(list(usage))
                for mangled, res in usage.items():
                    kernel, file = names[mangled], cubin.split(".")[0]
                    if pattern and not re.search(pattern, f"{file}:{kernel}"):
                        continue
                    if file == "attention_hopper" and arch != "sm_90":
                        continue  # elsewhere its body is a trap the launcher never reaches
                    shared = res["shared"] + dynamic_shared_bytes(file, kernel)
                    number = int(arch.removeprefix("sm_").rstrip("a"))
                    occ = occupancy(number, res["regs"], shared, res["threads"])
                    rows.append({"file": file, "kernel": kernel, "arch": arch, **res, "shared": shared,
                                 "blocks": occ[0] if occ else None, "warps": occ[1] if occ else None,
                                 "loop": hot_loop(sass.get(mangled, ""))})
    return rows


def ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(rows: list[dict]) -> str:
    head = ("| file | kernel | arch | regs | smem KB | threads | blocks/SM | warps/SM | loop instr | HMMA | instr/HMMA "
            "| LDSM | LDSM/HMMA | HGMMA | LDS | MUFU | BAR | int div |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        loop = r["loop"] or Loop()
        lines.append(
            f"| {r['file']} | `{r['kernel']}` | {r['arch']} | {r['regs']} | {r['shared'] / 1024:.1f} | {r['threads'] or '?'} "
            f"| {r['blocks'] if r['blocks'] is not None else '?'} | {r['warps'] if r['warps'] is not None else '?'} "
            f"| {loop.instructions} | {loop.hmma} | {ratio(loop.instructions, loop.hmma)} | {loop.ldsm} "
            f"| {ratio(loop.ldsm, loop.hmma)} | {loop.hgmma} | {loop.lds} | {loop.mufu} | {loop.bar} | {loop.idiv} |"
        )
    return "\n".join(lines)


def violations(rows: list[dict]) -> list[str]:
    found = []
    for r in rows:
        loop, kernel = r["loop"], r["kernel"]
        where = f"{kernel} on {r['arch']}"
        if r["local"]:
            found.append(f"{where}: {r['local']} bytes of local memory (spills)")
        if r["warps"] is not None and r["warps"] < CEILINGS["min_warps_per_sm"]:
            found.append(f"{where}: {r['warps']} warps per SM, fewer than {CEILINGS['min_warps_per_sm']}")
        if r["file"] == "attention_hopper" and r["arch"] == "sm_90" and not (loop and loop.hgmma):
            found.append(f"{where}: no HGMMA in its loop (the wgmma path compiled to something else)")
        if not loop or not loop.hmma:
            continue
        kind = {"attention_fwd": "forward", "attention_bwd": "backward"}.get(r["file"])
        if kind is None:
            continue
        limit = CEILINGS[kind]["instr_per_hmma"]
        if isinstance(limit, dict):
            limit = limit.get(int(re.search(r"<\w+, (\d+)", kernel).group(1)), 5.0)
        if loop.instructions / loop.hmma > limit:
            found.append(f"{where}: {loop.instructions / loop.hmma:.2f} instructions per HMMA in its loop, ceiling {limit}")
        if loop.ldsm / loop.hmma > CEILINGS[kind]["ldsm_per_hmma"]:
            found.append(f"{where}: {loop.ldsm / loop.hmma:.2f} ldmatrix per HMMA, ceiling {CEILINGS[kind]['ldsm_per_hmma']}")
        if kind == "forward" and loop.bar > 1 and (r["blocks"] or 0) < 2:
            found.append(f"{where}: {loop.bar} barriers per tile with {r['blocks']} block per SM (ceiling: 1, or 2 blocks)")
        if kind == "backward" and loop.idiv:
            found.append(f"{where}: an integer division in its loop")
    return found


def default_library() -> str:
    try:
        import scratchformer
    except ImportError:
        sys.exit("sass_stats: scratchformer is not installed: give --lib")
    libs = glob.glob(os.path.join(os.path.dirname(scratchformer.__file__), "_kernels*.so"))
    if not libs:
        sys.exit("sass_stats: the installed scratchformer has no kernels library")
    return libs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", help="the kernels library (default: the installed scratchformer's)")
    parser.add_argument("--arch", default="sm_80,sm_90", help="architectures, comma-separated (default sm_80,sm_90)")
    parser.add_argument("--filter", help="only kernels whose FILE:NAME matches this regular expression, e.g. attention_fwd:")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a kernel passes a ceiling not listed in KNOWN (or a KNOWN entry matches nothing)")
    args = parser.parse_args()
    rows = profile(args.lib or default_library(), args.arch.split(","), args.filter)
    print(table(rows))
    if args.check:
        found = violations(rows)
        new = [v for v in found if known(v) is None]
        stale = [p for p, word, _ in KNOWN if not any(re.search(p, v.split(" on sm_")[0]) and word in v for v in found)]
        print(f"\n{len(found) - len(new)} ceilings passed, known (sass_stats.KNOWN):")
        for pattern, word, reason in KNOWN:
            print(f"  {pattern} {word}: {reason}")
        print(f"{len(new)} not known" + "".join(f"\n  {v}" for v in new))
        if stale and not args.filter:
            print("KNOWN entries that match nothing (the ceiling is met: delete them): " + ", ".join(stale))
        sys.exit(1 if new or (stale and not args.filter) else 0)


if __name__ == "__main__":
    main()
